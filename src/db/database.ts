// One interface over the two databases the service runs on: PostgreSQL through `pg` (DATABASE_URL set)
// and embedded PostgreSQL (PGlite) in a data directory. Drizzle serves the schema, migrations and
// simple queries; the hot path speaks SQL through the same connections (bytea parameters in binary).
import { existsSync, mkdirSync, readFileSync, statfsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { nodePostgres, nodePostgresMigrator, pgliteDrizzle } from './drizzle.ts';
import { getTableName } from 'drizzle-orm';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { schema } from './schema.ts';
import { to as copyTo } from 'pg-copy-streams';
import { writeBind, type BindConfig, type BindTarget } from './bind.ts';
import { BinaryCopyParser, copyToSql, type BinaryColumns } from './binary-results.ts';
import { describeDbFailure } from './errors.ts';
import { listenPostgres, type ListenHandlers, type Listener } from './listener.ts';
import { lockDataDir, type DataDirLock } from './data-dir-lock.ts';
import { ConfigError } from '../config.ts';
import { endWithin, pauseSilence, watchSilence } from './silence.ts';

export { DatabaseSilentError, QUERY_CANCELED } from './silence.ts';

export const MIGRATIONS_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'migrations');

/**
 * PGlite: the file in its in-memory file system (MEMFS) that `QueryOptions.copyFrom` fills. Its '/dev/blob'
 * device copies a COPY's input into PostgreSQL's buffer one byte at a time in JavaScript; a MEMFS file is read
 * with one memcpy per 64 KB: a 4 MB step log row took 5-10 ms less (bench: durable step on PGlite).
 */
export const PGLITE_COPY_FILE = '/tmp/asgd-copy-in';

export interface QueryOptions {
  /** Prepared statement name (PostgreSQL only; PGlite ignores it). */
  name?: string;
  /**
   * PGlite only: the bytes a `COPY … FROM '${PGLITE_COPY_FILE}'` reads (binary COPY skips base64 for large
   * bytea). They are handed to PGlite's in-memory file system as they are (no copy) and the file is removed
   * after the statement.
   */
  copyFrom?: Uint8Array;
  /**
   * Read the rows in binary (bytea as bytes, not hex text): the selected columns and their types, in
   * select order (see binary-results.ts). Only numeric parameters are allowed (PGlite inlines them).
   */
  binary?: BinaryColumns;
  /**
   * With `binary`: each row is handed to this as soon as it has arrived whole, in order, and the query
   * resolves to no rows. On PostgreSQL the next rows are still on their way meanwhile (a catch-up applies a
   * logged step while the next one arrives; none is held for the end). When it throws, the rest of the
   * rows are read and dropped (the connection stays usable) and the query rejects with its error.
   */
  onRow?: (row: never) => void;
  /**
   * PostgreSQL only: a statement (named, prepared once per connection) run just before this one in the same
   * round trip and the same implicit transaction: both go out before one Sync, and the transaction commits
   * at that Sync. For a row lock: a statement that would wait for it waits in this small one instead, and
   * then starts with a snapshot that already sees the row as the lock's last holder left it. A big
   * statement that waits for a row lock itself re-initializes its whole plan when the lock comes
   * (EvalPlanQual): with three processes stepping one session, 0.5x the steps a second (measured). Its rows
   * are dropped. PostgreSQL only (PGlite refuses it).
   */
  lockFirst?: { name: string; text: string; values: unknown[] };
}

export interface Queryable {
  query<R = Record<string, unknown>>(text: string, params?: unknown[], options?: QueryOptions): Promise<R[]>;
}

export interface TransactionOptions {
  /**
   * Read only, and every statement sees the database as of the first one (REPEATABLE READ): for reads that
   * must agree with each other (a snapshot, its chunks and the log after it) while other processes write
   * snapshots and prune. PGlite needs nothing: its transactions run alone.
   */
  consistentRead?: boolean;
}

export interface Database extends Queryable {
  readonly kind: 'postgres' | 'pglite';
  readonly orm: PgDatabase<PgQueryResultHKT, typeof schema>;
  transaction<T>(fn: (tx: Queryable) => Promise<T>, options?: TransactionOptions): Promise<T>;
  /** SQL for a bytea parameter at position n: PGlite gets base64 text decoded in SQL (its bytea serializer is slow). */
  byteaParam(n: number): string;
  byteaValue(buf: Buffer): unknown;
  /** Applies the migrations this build has that the database lacks; how many it applied (0: none pending). */
  migrate(): Promise<number>;
  /** Throws when the database is unreachable or the migrations are not applied; else how many are applied. */
  ready(): Promise<MigrationCount>;
  poolStats(): { total: number; idle: number; waiting: number };
  /** LISTEN on `channel` for this process (NOTIFY is sent at commit, by any process on the database). */
  listen(channel: string, handlers: ListenHandlers): Promise<Listener>;
  close(): Promise<void>;
}

export interface DatabaseOptions {
  databaseUrl: string | null;
  dataDir: string;
  poolSize: number;
  /**
   * PostgreSQL: a statement that hears nothing from the server for this long (a network black hole, a hung
   * server) fails with DatabaseSilentError and its connection is dropped; 0 waits for ever.
   */
  silenceTimeoutMs?: number;
  onError?: (err: Error) => void;
  /** Said once: the database has migrations this build does not know, a migration waits for another's lock. */
  onWarning?: (message: string) => void;
}


/** The database answers but lacks migrations this build needs (none at all: its tables are missing). */
export class NotMigratedError extends Error {
  constructor(applied: number, expected: number) {
    super(`the database is not migrated: ${applied} of ${expected} migrations applied (run \`asgd-serve migrate\`, or start with ASGD_MIGRATE=true)`);
  }
}

/** drizzle's journal of applied migrations; the table does not exist in an empty database. */
const APPLIED_MIGRATIONS_SQL = 'SELECT count(*)::text AS n FROM drizzle.__drizzle_migrations';

/**
 * PostgreSQL's readiness probe: the journal's count, and whether this role can use what the migrations made:
 * a database in read-only mode (a standby after a failover, default_transaction_read_only) takes no step, and
 * a table the role lacks a privilege on (one a migration added, without its grants) fails every request that
 * touches it. Either is a refusal (503, /readyz), not a 500 per request.
 */
// Each privilege asked on its own: given a list, has_table_privilege is true when the role holds ANY of them
// (a role granted only SELECT was ready, and every step failed; found by an operator's review). The
// sequences behind the tables' ids need USAGE (an insert's nextval); asked only of sequences (CASE: the
// planner may test a condition before relkind's, and has_sequence_privilege of a table is an error).
const POSTGRES_PROBE_SQL = `SELECT (${APPLIED_MIGRATIONS_SQL})::text AS n, current_setting('transaction_read_only') AS read_only,
  (SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
    WHERE ns.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname = ANY($1::text[])
      AND NOT (has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT')
        AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE'))) AS denied,
  (SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
    WHERE ns.nspname = 'public' AND c.relkind = 'S' AND CASE WHEN c.relkind = 'S' THEN NOT has_sequence_privilege(c.oid, 'USAGE') END
      AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i') AND t.relname = ANY($1::text[]))) AS denied_sequences`;
const TABLES = Object.values(schema).map((table) => getTableName(table));

/** An error as PostgreSQL raises it (a code and a severity): the health probe and the error plugin classify it by its SQLSTATE. */
const refusal = (code: string, message: string): Error => Object.assign(new Error(message), { code, severity: 'ERROR' });

/** The migrations the database's journal records, and those this build knows. */
export interface MigrationCount {
  applied: number;
  expected: number;
}

/** Throws NotMigratedError unless `count()` (APPLIED_MIGRATIONS_SQL's answer) covers every migration of this build. */
async function checkMigrated(count: () => Promise<string>, warn?: (message: string) => void): Promise<MigrationCount> {
  let applied: number;
  try {
    applied = Number(await count());
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (code !== '42P01' && code !== '3F000') throw err; // undefined table or schema: nothing applied yet
    applied = 0;
  }
  const expected = expectedMigrations();
  if (applied < expected) throw new NotMigratedError(applied, expected);
  // A newer build migrated it (a rolling upgrade under way, or a rollback): this build still serves, as its
  // own migrations are there and the newer ones add to them, but an operator rolling back should know.
  if (applied > expected && warn && !warnedNewer) {
    warnedNewer = true;
    warn(`the database has ${applied} migrations applied and this build knows ${expected}: a newer asgd-serve migrated it (fine during a rolling upgrade; after a rollback, check that build's release notes)`);
  }
  return { applied, expected };
}

let warnedNewer = false;

/** How many migrations the journal records (`count()` as in checkMigrated); 0 where there is no journal yet. */
async function appliedCount(count: () => Promise<string>): Promise<number> {
  try {
    return Number(await count());
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    // A journal this role may not read is not "nothing applied": that sent an operator who had missed a
    // grant to apply migrations that were all there (found by an operator's review).
    if (code === INSUFFICIENT_PRIVILEGE) {
      const out = new Error(`${(err as Error).message} (SQLSTATE ${INSUFFICIENT_PRIVILEGE}) while reading the migrations journal: a serving role needs USAGE ON SCHEMA drizzle and SELECT ON drizzle.__drizzle_migrations (README, "PostgreSQL", privileges); migrations are applied by the role that owns the schema (asgd-serve migrate)`);
      (out as { code?: string }).code = INSUFFICIENT_PRIVILEGE;
      throw out;
    }
    if (code !== '42P01' && code !== '3F000') throw err; // undefined table or schema: nothing applied yet
    return 0;
  }
}

/** SQLSTATE 42501: the role lacks a privilege. */
const INSUFFICIENT_PRIVILEGE = '42501';

/** A migration the connecting role may not run: PostgreSQL's reason, then what to do instead. */
function migrationPrivilegeError(err: unknown): Error {
  const out = new Error(`${describeDbFailure(err)}; migrations are pending and this database role may not apply them: run \`asgd-serve migrate\` as the role that owns the schema, and start the service with ASGD_MIGRATE=false, or grant this role CREATE on the database`);
  (out as { code?: string }).code = INSUFFICIENT_PRIVILEGE;
  return out;
}

const MIGRATION_LOCK = 7_142_053_311; // pg_advisory_lock key: one migrator at a time across replicas
/** A migration's wait for a table lock, and how often it tries (drizzle rolls all pending ones back between). */
const MIGRATION_LOCK_TIMEOUT_MS = 3_000;
const MIGRATION_ATTEMPTS = 10;
/** SQLSTATE 55P03: lock_timeout ran out. */
const LOCK_NOT_AVAILABLE = '55P03';

/** How many migrations this build ships: /readyz fails until the database has them all. */
function expectedMigrations(): number {
  const journal = JSON.parse(readFileSync(join(MIGRATIONS_DIR, 'meta', '_journal.json'), 'utf8')) as { entries: unknown[] };
  return journal.entries.length;
}

export async function openDatabase(options: DatabaseOptions): Promise<Database> {
  return options.databaseUrl ? openPostgres(options.databaseUrl, options) : openPglite(options.dataDir, options);
}

/**
 * The URL with `plan_cache_mode=force_generic_plan` added to its startup options. The hot statements are
 * named (prepared once per connection) and look rows up by key, so one generic plan serves every execution;
 * left to choose, PostgreSQL re-planned the step statement (a CTE of eight parts) on every execution.
 * Measured with three processes stepping one session: 20% more steps a second, 0.1 ms less PostgreSQL CPU
 * a step. Options already in the URL are kept; a URL that does not parse as one is used as it is.
 */
export function withGenericPlans(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return withGenericPlansText(url);
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') return url;
  // A '%' that starts no escape (a password "se%cret" written as it is): pg reads such a URL, but written
  // back by URL it would not read as the same; leave it alone (no generic plans, as before this option).
  if (/%(?![0-9A-Fa-f]{2})/.test(url)) return url;
  const given = parsed.searchParams.get('options');
  if (given?.includes('plan_cache_mode')) return url;
  parsed.searchParams.set('options', [given, '-c plan_cache_mode=force_generic_plan'].filter(Boolean).join(' '));
  return parsed.toString();
}

/**
 * withGenericPlans for a URL WHATWG's parser refuses, as libpq's Unix-socket form
 * `postgres://user@/db?host=/var/run/postgresql` (credentials and no host; found by an operator's review:
 * such a replica went without generic plans). The option is added to the query text as it is.
 */
function withGenericPlansText(url: string): string {
  const m = /^(postgres(?:ql)?:\/\/[^?#]*)(?:\?([^#]*))?(#.*)?$/.exec(url);
  if (!m) return url;
  const [, base, query = '', hash = ''] = m;
  const params = query === '' ? [] : query.split('&');
  const at = params.findIndex((p) => p.startsWith('options='));
  const option = '-c%20plan_cache_mode%3Dforce_generic_plan';
  if (at >= 0) {
    if (/plan_cache_mode/.test(decodeURIComponentSafe(params[at]))) return url;
    params[at] = `${params[at]}%20${option}`;
  } else params.push(`options=${option}`);
  return `${base}?${params.join('&')}${hash}`;
}

const decodeURIComponentSafe = (text: string): string => {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '));
  } catch {
    return text;
  }
};

/** The part of pg's connection a LockFirstQuery writes to (pg's own Query does the same). */
interface PgConnection {
  parsedStatements: Record<string, string>;
  bind(config: { portal: string; statement: string; values: unknown[]; valueMapper?: (v: unknown) => unknown }): void;
  execute(config: { portal: string; rows: number }): void;
}

/**
 * QueryOptions.lockFirst on PostgreSQL: pg's Query, with the Bind and Execute of an already prepared
 * statement run before its own, in one round trip and one implicit transaction: its Parse (the first time)
 * and Bind, to a portal of its own (LOCK_FIRST_PORTAL), then the locking statement's Bind and Execute, then
 * its Describe and Execute, and the one Sync. Its Bind comes first because PostgreSQL reads each message
 * whole before the next: a step's Bind carries its gradients (megabytes), and sent after the lock was taken,
 * a connection that went silent while sending it (a network cut, a dead host: PostgreSQL sees no close)
 * left the backend waiting for the rest while holding the session's row lock, and every replica's steps on
 * the session waited behind it for good (an operator's review: 11 minutes, until the backend was
 * terminated). The statement's snapshot is still taken after the lock: a portal of a statement that writes
 * (a data-modifying WITH) starts at its Execute. The locking statement's rows come before any
 * RowDescription, so pg's Query neither keeps them nor mistakes them for its own; the results arrive as an
 * array (one per statement).
 */
class LockFirstQuery extends (pg.Query as unknown as new (config: pg.QueryConfig, values?: unknown, callback?: (err: Error | null, res: pg.QueryResult | pg.QueryResult[]) => void) => { prepare(connection: PgConnection): void }) {
  readonly #lock: { name: string; values: unknown[] };

  constructor(config: pg.QueryConfig, lock: { name: string; values: unknown[] }, callback: (err: Error | null, res: pg.QueryResult | pg.QueryResult[]) => void) {
    super(config, undefined, callback);
    this.#lock = lock;
  }

  override prepare(connection: PgConnection): void {
    // pg's prepare writes Parse, Bind (to this.portal), Describe, Execute and Sync: the lock goes right after its Bind.
    const bind = connection.bind;
    connection.bind = (config) => {
      connection.bind = bind;
      bind.call(connection, config);
      bind.call(connection, { portal: '', statement: this.#lock.name, values: this.#lock.values.map((v) => (v === null ? null : String(v))) });
      connection.execute({ portal: '', rows: 0 });
    };
    try {
      super.prepare(connection);
    } finally {
      connection.bind = bind;
    }
  }
}

/** The portal a lockFirst statement is bound to, apart from the unnamed one its locking statement uses. */
const LOCK_FIRST_PORTAL = 'asgd_lock_first';

/** How long closing waits for PostgreSQL to close a connection before it is destroyed. */
const CLOSE_GRACE_MS = 2_000;

/** How the service's connections show in pg_stat_activity (an application_name in the URL wins). */
export const APPLICATION_NAME = 'asgd-serve';

/** SQLSTATE 53300: no connection slot (max_connections, or a role's or database's CONNECTION LIMIT). */
const TOO_MANY_CONNECTIONS = '53300';
/** How long a pool refused a new connection keeps to the connections it has. */
const SLOT_CAP_MS = 30_000;

/**
 * When PostgreSQL refuses this pool a new connection for want of a slot while the pool holds some, the pool
 * stops opening more for a while and the request waits for one of those (as it would at ASGD_DB_POOL_SIZE),
 * instead of failing with a 503: two replicas at the default pool size against a max_connections of 8 failed
 * a third of their requests. With no connection at all the error stands.
 */
function capOnRefusedSlots(pool: pg.Pool, max: number, warn?: (message: string) => void): void {
  const options = (pool as unknown as { options: { max: number } }).options;
  const connect = pool.connect.bind(pool) as () => Promise<pg.PoolClient>;
  let established = 0;
  pool.on('connect', () => established++);
  pool.on('remove', () => established--);
  let restore: NodeJS.Timeout | null = null;
  const attempt = (tries: number): Promise<pg.PoolClient> => connect().catch((err: unknown) => {
    // Connections made, not those still connecting (pg-pool's totalCount counts those, and they may fail too).
    if ((err as { code?: unknown }).code !== TOO_MANY_CONNECTIONS || established === 0 || tries === 0) throw err;
    if (options.max > established) {
      if (options.max === max) warn?.(`PostgreSQL has no connection slot for this process's next connection (${(err as Error).message}): it keeps to the ${established} it has for ${SLOT_CAP_MS / 1000} s (ASGD_DB_POOL_SIZE is ${max}); raise max_connections or lower ASGD_DB_POOL_SIZE`);
      options.max = established;
    }
    if (restore) clearTimeout(restore);
    restore = setTimeout(() => {
      options.max = max;
      restore = null;
    }, SLOT_CAP_MS);
    restore.unref();
    return attempt(tries - 1);
  });
  // pg-pool's query() checks out with a callback; everything else with the promise.
  (pool as unknown as { connect: unknown }).connect = (cb?: (err: Error | undefined, client?: pg.PoolClient, done?: (e?: Error) => void) => void) => {
    const pending = attempt(2);
    if (!cb) return pending;
    pending.then((client) => cb(undefined, client, (e?: Error) => client.release(e)), (err: Error) => cb(err));
    return undefined;
  };
}

async function openPostgres(url: string, options: DatabaseOptions): Promise<Database> {
  const silence = options.silenceTimeoutMs ?? 0;
  const pool = new pg.Pool({
    connectionString: withGenericPlans(url), max: options.poolSize, application_name: APPLICATION_NAME,
    // A connection that gets no answer to its start-up is given up after 10 s, sooner with a shorter silence timeout.
    connectionTimeoutMillis: silence > 0 ? Math.min(10_000, silence) : 10_000,
    // An idle connection to a server that vanished (no FIN, no RST) is noticed by the kernel's keepalive.
    keepAlive: true,
  });
  pool.on('connect', (client) => {
    watchSilence(client, silence, url);
    // Binds with large Buffer values (a step's gradients, a snapshot's chunks) written without copying them (bind.ts).
    const connection = (client as unknown as { connection: BindTarget & { bind(config: BindConfig): void } }).connection;
    const pgBind = connection.bind.bind(connection);
    connection.bind = (config) => writeBind(connection, config, pgBind);
    // A listener for the client's whole life. pg emits 'error' on a client whose server ends its connection
    // while no statement runs on it (PostgreSQL's shutdown sends each backend FATAL 57P01), and an 'error'
    // event nobody hears ends the process. A backend that has just started gets its FATAL in the same
    // packet as its ReadyForQuery: pg parses both at once, and between them the pool hands the new client
    // out, its own listener taken off, before the holder could add one (a service process died so at a
    // PostgreSQL restart in CI; test/db/ended-at-connect.test.ts). The pool's listener (idle clients) and
    // checkout's (held ones) still do the work: the client is marked unusable, its statements fail as
    // retryable, and it is dropped at its release. This one speaks only when it is the only one that heard.
    client.on('error', (err) => {
      if (client.listenerCount('error') === 1) options.onError?.(Object.assign(err, { unheard: true }));
    });
  });
  capOnRefusedSlots(pool, options.poolSize, options.onWarning);
  // An idle client losing its server must not crash the process; the next query reports it. pg-pool hangs
  // the whole client object on the error (`err.client`): not something to serialise into a log line.
  pool.on('error', (err) => {
    delete (err as Error & { client?: unknown }).client;
    options.onError?.(err);
  });

  /**
   * A client checked out of the pool for several statements. While checked out it has no pool listener:
   * when its connection dies between two statements (a database restart, a network cut) pg emits 'error'
   * on it, and an 'error' event nobody hears kills the process. Here it only marks the client broken; the
   * statement in flight or the next one rejects with the connection error, which callers map to a 503.
   */
  const checkout = async (): Promise<{ client: pg.PoolClient; release: (broken?: boolean) => void }> => {
    const client = await pool.connect();
    let lost = false;
    const onError = () => {
      lost = true;
    };
    client.on('error', onError);
    return {
      client,
      release(broken = false) {
        client.removeListener('error', onError);
        client.release(broken || lost);
      },
    };
  };
  const orm = nodePostgres.drizzle(pool, { schema });

  /**
   * The health probe's own connection, outside the pool: a pool whose connections are all taken (long
   * statements, lock waits) is not a database that is unreachable. Dropped after a failure; the next probe
   * connects again.
   */
  let probe: Promise<pg.Client> | null = null;
  const connectProbe = async (): Promise<pg.Client> => {
    const client = new pg.Client({ connectionString: withGenericPlans(url), connectionTimeoutMillis: silence > 0 ? Math.min(10_000, silence) : 10_000, keepAlive: true, application_name: APPLICATION_NAME });
    client.on('error', () => {}); // the query in flight reports it; an idle one's loss is found by the next probe
    try {
      await client.connect();
    } catch (err) {
      await endWithin(client, CLOSE_GRACE_MS);
      throw err;
    }
    watchSilence(client, silence, url);
    return client;
  };
  // One probe query at a time on the probe's connection: callers while one is in flight (/readyz polled
  // each second, the periodic check) share its answer. Each used to queue its own behind a query PostgreSQL
  // did not answer (a hung server), and pg warned of queries sent while one was running (an operator's review).
  let probing: Promise<string> | null = null;
  const probeCount = (): Promise<string> => (probing ??= probeOnce().finally(() => { probing = null; }));
  const probeOnce = async (): Promise<string> => {
    // A connection lost while idle (a restart of PostgreSQL) says nothing of the database now: one more try
    // on a new connection before the probe fails.
    for (let attempt = 0; ; attempt++) {
      const fresh = probe === null;
      const current = (probe ??= connectProbe());
      let client: pg.Client | null = null;
      let row: { n: string; read_only: string; denied: string | null; denied_sequences: string | null };
      try {
        client = await current;
        row = (await client.query<typeof row>(POSTGRES_PROBE_SQL, [TABLES])).rows[0];
      } catch (err) {
        // PostgreSQL's own error (an unmigrated database's missing table) leaves the connection usable;
        // a FATAL one (a restart terminating it) does not.
        const severity = (err as { severity?: unknown }).severity;
        if (severity !== undefined && severity !== 'FATAL' && severity !== 'PANIC') throw err;
        if (probe === current) probe = null;
        if (client) void endWithin(client, CLOSE_GRACE_MS);
        if (fresh || attempt > 0) throw err;
        continue;
      }
      if (row.read_only === 'on') throw refusal('25006', 'the database is read-only (transaction_read_only is on: a standby after a failover, or default_transaction_read_only); steps and creates cannot commit');
      if (row.denied) throw refusal('42501', `permission denied for table ${row.denied}: this role needs SELECT, INSERT, UPDATE, DELETE on every table (grants for tables a migration added?)`);
      if (row.denied_sequences) throw refusal('42501', `permission denied for sequence ${row.denied_sequences}: this role needs USAGE on the tables' sequences (GRANT USAGE ON ALL SEQUENCES IN SCHEMA public)`);
      return row.n;
    }
  };


  /**
   * Runs `fn` on `on`, or, given the pool, on a client checked out for it: released after, and destroyed
   * after a failure (as pg-pool does after a failed query: an error with a code may be PostgreSQL's FATAL
   * at shutdown, 57P01, on a connection that is closing).
   */
  const onClient = async <T>(on: pg.Pool | pg.PoolClient, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> => {
    if (!(on instanceof pg.Pool)) return fn(on);
    const own = await checkout();
    let result: T;
    try {
      result = await fn(own.client);
    } catch (err) {
      own.release(true);
      throw err;
    }
    own.release();
    return result;
  };

  /** A binary COPY of the query's rows to STDOUT (binary-results.ts). */
  const binaryRead = async <R>(on: pg.Pool | pg.PoolClient, text: string, params: unknown[], columns: BinaryColumns, onRow?: (row: R) => void): Promise<R[]> => {
    // An error of onRow is thrown once the COPY has been read to its end, after onClient: the connection is
    // then ready for the next statement, and goes back to the pool (onClient drops one that failed).
    let failure: { err: unknown } | null = null;
    const rows = await onClient(on, async (client) => {
      const read: R[] = [];
      const parser = new BinaryCopyParser<R>(columns, onRow ?? ((row) => read.push(row)));
      for await (const chunk of client.query(copyTo(copyToSql(text, params, 'STDOUT')))) {
        if (failure) continue;
        // The rows' own work (a replayed step) is no silence of the database's: the watch (silence.ts) is off
        // while it runs, and counts again from its end (a step slower than ASGD_DB_TIMEOUT_MS cancelled the COPY).
        const resume = onRow ? pauseSilence(client, silence) : null;
        try {
          parser.push(chunk as Buffer);
        } catch (err) {
          failure = { err };
        } finally {
          resume?.();
        }
      }
      if (!failure) parser.end();
      return read;
    });
    if (failure) throw (failure as { err: unknown }).err;
    return rows;
  };

  /** The statement after opts.lockFirst in one round trip (LockFirstQuery), on one connection. */
  const lockedRun = <R>(on: pg.Pool | pg.PoolClient, text: string, params: unknown[], opts: QueryOptions): Promise<R[]> =>
    onClient(on, async (client) => {
      const lock = opts.lockFirst!;
      const connection = (client as unknown as { connection: PgConnection }).connection;
      // Prepared on its own the first time, so that pg's bookkeeping of prepared statements stays right.
      if (connection.parsedStatements[lock.name] === undefined) await client.query({ name: lock.name, text: lock.text, values: lock.values });
      const results = await new Promise<pg.QueryResult | pg.QueryResult[]>((resolve, reject) => {
        const query = new LockFirstQuery({ text, values: params, name: opts.name, portal: LOCK_FIRST_PORTAL } as pg.QueryConfig, lock, (err, res) => (err ? reject(err) : resolve(res)));
        client.query(query as unknown as pg.Submittable);
      });
      return (Array.isArray(results) ? results[results.length - 1] : results).rows as R[];
    });

  const run = async <R>(client: pg.Pool | pg.PoolClient, text: string, params: unknown[] = [], opts: QueryOptions = {}) => {
    // Buffers travel as binary parameters; bytea results arrive hex-encoded unless the rows are read in
    // binary (opts.binary), which large bytea reads (snapshots, the step log) do.
    if (opts.binary) return binaryRead<R>(client, text, params, opts.binary, opts.onRow as ((row: R) => void) | undefined);
    if (opts.lockFirst) return lockedRun<R>(client, text, params, opts);
    const result = await client.query({ text, values: params, name: opts.name });
    return result.rows as R[];
  };

  return {
    kind: 'postgres',
    orm: orm as unknown as Database['orm'],
    query: (text, params, opts) => run(pool, text, params, opts),
    async transaction(fn, txOptions) {
      const { client, release } = await checkout();
      let broken = false;
      try {
        await client.query(txOptions?.consistentRead ? 'BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY' : 'BEGIN');
        const tx: Queryable = { query: (text, params, opts) => run(client, text, params, opts) };
        const result = await fn(tx);
        await client.query('COMMIT');
        return result;
      } catch (err) {
        try {
          await client.query('ROLLBACK');
        } catch {
          broken = true;
        }
        throw err;
      } finally {
        release(broken);
      }
    },
    byteaParam: (n) => `$${n}`,
    byteaValue: (buf) => buf,
    async migrate() {
      const { client, release } = await checkout();
      // A replica waiting out another's migration took ASGD_DB_TIMEOUT_MS of it for a hung database, cancelled
      // its wait and exited (found by an operator's review): the migration's connection has no such timer.
      const resume = pauseSilence(client, silence);
      try {
        // Nothing pending: no DDL at all (drizzle's migrator starts with CREATE SCHEMA IF NOT EXISTS, which
        // a serving role without CREATE on the database may not run, though the database is migrated).
        const applied = () => appliedCount(() => client.query<{ n: string }>(APPLIED_MIGRATIONS_SQL).then((r) => r.rows[0].n));
        if ((await applied()) >= expectedMigrations()) return 0;
        const free = (await client.query<{ locked: boolean }>('SELECT pg_try_advisory_lock($1) AS locked', [MIGRATION_LOCK])).rows[0].locked;
        if (!free) {
          options.onWarning?.(`waiting for another process's migration to finish (it holds PostgreSQL advisory lock ${MIGRATION_LOCK})`);
          await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK]);
        }
        try {
          // A migration that ALTERs a table waits for every transaction using it, and every statement on that
          // table then queues behind the ALTER: a 25 s read held each step on every replica for 22 s. Each
          // try waits at most MIGRATION_LOCK_TIMEOUT for a lock, then rolls back (drizzle runs the pending
          // migrations in one transaction) and lets traffic through before the next.
          // Counted under the lock: what another process applied while this one waited is not this one's.
          const before = await applied();
          await client.query(`SET lock_timeout = '${MIGRATION_LOCK_TIMEOUT_MS}ms'`);
          for (let attempt = 1; ; attempt++) {
            try {
              // On the client that holds the lock: through the pool it would need a second connection, which
              // never comes with ASGD_DB_POOL_SIZE=1 (migrate hung, then failed on the connection timeout).
              await nodePostgresMigrator.migrate(nodePostgres.drizzle(client, { schema }), { migrationsFolder: MIGRATIONS_DIR });
              return (await applied()) - before;
            } catch (err) {
              const code = (err as { cause?: { code?: unknown } }).cause?.code ?? (err as { code?: unknown }).code;
              if (code === INSUFFICIENT_PRIVILEGE) throw migrationPrivilegeError(err);
              if (code !== LOCK_NOT_AVAILABLE || attempt >= MIGRATION_ATTEMPTS) throw err;
              // The attempt, not a migration's number (an operator's review: "migration 3 of 10" with 2 pending).
              const pending = expectedMigrations() - before;
              options.onWarning?.(`applying ${pending} pending migration${pending === 1 ? '' : 's'} (attempt ${attempt} of ${MIGRATION_ATTEMPTS}) waited ${MIGRATION_LOCK_TIMEOUT_MS} ms for a table lock other transactions hold; rolled back, trying again in ${attempt} s`);
              await new Promise((resolve) => setTimeout(resolve, attempt * 1000));
            }
          }
        } finally {
          await client.query('RESET lock_timeout').catch(() => {});
          await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK]);
        }
      } finally {
        resume();
        release();
      }
    },
    ready: () => checkMigrated(probeCount, options.onWarning),
    poolStats: () => ({ total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount }),
    listen: (channel, handlers) => listenPostgres(url, channel, handlers, silence),
    async close() {
      // Idle connections end at once on a server that answers; a server that cannot answer (a black hole)
      // never closes them, and a shutdown must not wait for it.
      const ending = pool.end();
      const timer = setTimeout(() => {
        for (const c of (pool as unknown as { _clients: pg.Client[] })._clients) (c as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
      }, CLOSE_GRACE_MS);
      try {
        await ending;
      } finally {
        clearTimeout(timer);
      }
      const p = probe;
      probe = null;
      const client = await p?.catch(() => null);
      if (client) await endWithin(client, CLOSE_GRACE_MS);
    },
  };
}

/**
 * mkdir -p, one level at a time: Node's mkdirSync(dir, { recursive: true }) spins for good where a level
 * cannot be made and does not say so (under /proc: ENOENT after the parent exists), seen with
 * --data-dir /proc/x. Each missing level is made in turn; the first that fails throws, naming itself.
 */
function makeDirectories(dir: string): void {
  const missing: string[] = [];
  for (let d = resolve(dir); !existsSync(d); d = dirname(d)) {
    missing.unshift(d);
    if (dirname(d) === d) break;
  }
  for (const d of missing) {
    try {
      mkdirSync(d);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}

/**
 * memory:// databases: a fresh PGlite runs initdb, 2.4 s of CPU (WebAssembly) each time; one started from a
 * copy of a freshly initialised directory (`loadDataDir`) takes 0.9 s. A process that opens a second one
 * (a test suite, an application's tests) keeps that copy, 40 MB, made from its second database before the
 * migrations ran on it; a server that opens one keeps nothing.
 */
let memoryOpens = 0;
let memoryTemplate: Promise<Blob> | null = null;

/**
 * memory:// databases this process opens from now on start from `template`, a copy of a freshly initialised
 * directory (makeMemoryTemplate). The tests keep one on disk, so that no test process runs initdb.
 */
export function useMemoryTemplate(template: Blob): void {
  memoryTemplate = Promise.resolve(template);
}

/** A copy of a freshly initialised embedded database's directory (a tar file, 40 MB), for useMemoryTemplate. */
export async function makeMemoryTemplate(): Promise<Blob> {
  const client = await pgliteDrizzle().PGlite.create();
  try {
    return await client.dumpDataDir('none');
  } finally {
    await client.close();
  }
}

async function createInMemory(PGlite: ReturnType<typeof pgliteDrizzle>['PGlite']): Promise<InstanceType<typeof PGlite>> {
  memoryOpens += 1;
  const template = memoryTemplate ? await memoryTemplate.catch(() => null) : null;
  if (template) return PGlite.create({ loadDataDir: template });
  const client = await PGlite.create();
  if (memoryOpens >= 2 && !memoryTemplate) {
    const dump: Promise<Blob> = client.dumpDataDir('none');
    memoryTemplate = dump;
    try {
      await dump;
    } catch {
      // A copy that could not be made: this database is whole all the same, and the next one tries again.
      memoryTemplate = null;
    }
  }
  return client;
}

/** Free space below which a failed start of the embedded database names the disk. */
const LOW_DISK_BYTES = 64 * 1024 * 1024;

/** Bytes free on the disk holding `dir`, or null when not knowable. */
function freeBytes(dir: string): number | null {
  try {
    const fs = statfsSync(dir);
    return fs.bavail * fs.bsize;
  } catch {
    return null;
  }
}

async function openPglite(dataDir: string, options: DatabaseOptions): Promise<Database> {
  const { PGlite, drizzle: drizzlePglite, migrate: migratePglite } = pgliteDrizzle();
  let lock: DataDirLock | null = null;
  if (dataDir !== 'memory://') {
    try {
      makeDirectories(dataDir);
      // Before PGlite reads a file: a second owner would lose writes. (No logger yet: stderr, as start-up errors.)
      lock = await lockDataDir(dataDir, {
        onWait: (message) => process.stderr.write(`asgd-serve: ${message}\n`),
        // Another process owns the directory now: this one ends at once, without closing PGlite (its
        // checkpoint would write this process's pages over the new owner's). What it acknowledged since
        // the owner took over is that owner's loss to recover from; nothing more is acknowledged here.
        onLost: (error) => {
          process.stderr.write(`asgd-serve: fatal: ${error.message}\n`);
          process.exit(1);
        },
      });
    } catch (err) {
      // A directory that cannot be made or written (a file there, no permission): the setting is named.
      if (typeof (err as NodeJS.ErrnoException).code !== 'string' || !(err as NodeJS.ErrnoException).syscall) throw err;
      throw new ConfigError(`ASGD_DATA_DIR (--data-dir) ${dataDir}: the embedded database's directory cannot be used: ${(err as Error).message}`);
    }
  }
  let client: InstanceType<typeof PGlite>;
  try {
    client = lock ? await PGlite.create(dataDir) : await createInMemory(PGlite);
  } catch (err) {
    lock?.release();
    // A disk with no room for PGlite's next WAL segment fails its start with a message that names nothing
    // (an operator's review: "PGlite failed to initialize properly"): the disk is named when it is short.
    const free = lock ? freeBytes(dataDir) : null;
    if (free !== null && free < LOW_DISK_BYTES && err instanceof Error) {
      err.message += `; the disk holding ASGD_DATA_DIR (${resolve(dataDir)}) has ${free} bytes free: PGlite needs room for its WAL (16 MiB segments); free space or grow the volume`;
    }
    throw err;
  }
  const orm = drizzlePglite(client, { schema });
  /** The migrations journal's count (APPLIED_MIGRATIONS_SQL), as checkMigrated and appliedCount read it. */
  const journalCount = async () => (await client.query<{ n: string }>(APPLIED_MIGRATIONS_SQL)).rows[0].n;
  void options;

  const fix = <R>(rows: unknown[]): R[] => {
    // PGlite returns bytea as Uint8Array; the rest of the code expects Buffers (same memory, no copy).
    for (const row of rows as Record<string, unknown>[]) {
      for (const key in row) {
        const v = row[key];
        if (v instanceof Uint8Array && !Buffer.isBuffer(v)) row[key] = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      }
    }
    return rows as R[];
  };
  type Runner = Pick<typeof client, 'query'>;
  const run = async <R>(on: Runner, text: string, params: unknown[] = [], opts: QueryOptions = {}): Promise<R[]> => {
    lock?.assertHeld(); // never a statement on a directory another process has taken over
    // Nothing on PGlite sends it (its steps take their own path, appendStepsPglite): refused, not ignored.
    if (opts.lockFirst) throw new Error('QueryOptions.lockFirst: PostgreSQL only');
    if (opts.binary) {
      // No binary result format in PGlite: a binary COPY into its blob device (binary-results.ts).
      const result = await on.query(copyToSql(text, params, "'/dev/blob'"));
      if (!result.blob) return [];
      const rows: R[] = [];
      const parser = new BinaryCopyParser<R>(opts.binary, (opts.onRow as ((row: R) => void) | undefined) ?? ((row) => rows.push(row)));
      parser.push(Buffer.from(await result.blob.arrayBuffer()));
      parser.end();
      return rows;
    }
    if (opts.copyFrom) {
      // One statement at a time (PGlite's own mutex), so one file name serves every COPY.
      client.Module.FS.writeFile(PGLITE_COPY_FILE, opts.copyFrom, { canOwn: true });
      try {
        return fix<R>((await on.query(text, params)).rows);
      } finally {
        client.Module.FS.unlink(PGLITE_COPY_FILE);
      }
    }
    return fix<R>((await on.query(text, params)).rows);
  };
  // PGlite runs one statement at a time; transactions are serialised by its own mutex.
  return {
    kind: 'pglite',
    orm: orm as unknown as Database['orm'],
    query: (text, params, opts) => run(client, text, params, opts),
    transaction: (fn) => client.transaction(async (tx) => fn({ query: (text, params, opts) => run(tx, text, params, opts) })),
    byteaParam: (n) => `decode($${n}, 'base64')`,
    byteaValue: (buf) => buf.toString('base64'),
    async migrate() {
      const before = await appliedCount(journalCount);
      await migratePglite(orm, { migrationsFolder: MIGRATIONS_DIR });
      return (await appliedCount(journalCount)) - before;
    },
    ready: () => checkMigrated(journalCount),
    poolStats: () => ({ total: 1, idle: 1, waiting: 0 }),
    // In-process: PGlite delivers a committed NOTIFY to its own listeners.
    async listen(channel, handlers) {
      const unlisten = await client.listen(channel, handlers.onNotify);
      return { close: () => (client.closed ? Promise.resolve() : unlisten()) };
    },
    async close() {
      try {
        await client.close();
      } finally {
        lock?.release();
      }
    },
  };
}
