// The start-up line: what an operator needs to know about a process that just started, readable on a
// terminal (the message) and structured for log pipelines (the fields). Never the database password.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { socketHostOf, type Config } from './config.ts';

export const SERVICE_VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;

export type DatabaseLocation =
  | { kind: 'pglite'; dataDir: string }
  | { kind: 'postgres'; host: string; port: number; database: string; user: string | null };

/** Where the data lives, from the configuration: the data directory, or PostgreSQL without credentials. */
export function databaseLocation(config: Pick<Config, 'databaseUrl' | 'dataDir'>): DatabaseLocation {
  if (!config.databaseUrl) return { kind: 'pglite', dataDir: config.dataDir === 'memory://' ? 'memory://' : resolve(config.dataDir) };
  let url: URL;
  // libpq's socket form has an empty host (postgres://user@/db?host=/dir), which WHATWG URL refuses.
  const raw = socketHostOf(config.databaseUrl) === null ? config.databaseUrl : config.databaseUrl.replace(/^(postgres(?:ql)?:\/\/(?:[^/?#@]*@)?)(?=[/?#]|$)/i, '$1localhost');
  try {
    url = new URL(raw);
  } catch {
    return { kind: 'postgres', host: '(unparsable DATABASE_URL)', port: 5432, database: '', user: null };
  }
  // libpq also takes the host (a socket directory) and the database as query parameters.
  const host = url.searchParams.get('host') ?? (decodeURIComponent(url.hostname) || 'localhost');
  const database = url.searchParams.get('dbname') ?? (decodeURIComponent(url.pathname.slice(1)) || decodeURIComponent(url.username) || 'postgres');
  return { kind: 'postgres', host, port: Number(url.port || url.searchParams.get('port') || 5432), database, user: decodeURIComponent(url.username) || null };
}

function describe(db: DatabaseLocation): string {
  if (db.kind === 'pglite') {
    // PGlite does not fsync (README, "How a step is kept"): say so where the operator looks first.
    return db.dataDir === 'memory://' ? 'embedded PGlite in memory (nothing is kept)' : `embedded PGlite in ${db.dataDir} (no fsync: kept through a killed process, not a power cut)`;
  }
  return `PostgreSQL ${db.user ? `${db.user}@` : ''}${db.host}:${db.port}/${db.database}`;
}

export interface Banner {
  fields: {
    version: string;
    database: DatabaseLocation;
    auth: 'on' | 'off';
    url: string;
    docs: string;
    dashboard: string;
  };
  message: string;
}

/**
 * `url` is where the process listens (http://host:port, the real port when PORT=0); `bound`, when it listens
 * on every interface, what it bound (url is then the loopback address).
 */
export function startupBanner(config: Config, url: string, dashboardPath: string, bound?: string): Banner {
  const database = databaseLocation(config);
  const auth = config.adminToken ? 'on' : 'off';
  const docs = `${url}/docs`;
  const dashboard = `${url}${dashboardPath}`;
  const message =
    `asgd-serve ${SERVICE_VERSION} listening on ${bound ? `${bound}, port ${new URL(url).port}: here ${url}` : url} | database: ${describe(database)} | ` +
    `auth: ${auth === 'on' ? 'on (bearer tokens)' : 'off (no ASGD_ADMIN_TOKEN)'} | docs: ${docs} | dashboard: ${dashboard}`;
  return { fields: { version: SERVICE_VERSION, database, auth, url, docs, dashboard }, message };
}
