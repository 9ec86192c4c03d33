// The service's configuration: read from the environment once at boot, validated, typed, passed in.
// The CLI (src/cli.ts) maps its flags onto the same names.

import { isIP } from 'node:net';
import { VACUUM_INTERVAL_MS } from './db/vacuum.ts';
import { KERNEL_CHOICES, type KernelChoice } from './optim/index.ts';
import { SETTING_LIMITS } from './sessions/spec.ts';

export interface Config {
  host: string;
  port: number;
  /** postgres://… ; when absent the service runs on an embedded PostgreSQL (PGlite) in `dataDir`. */
  databaseUrl: string | null;
  dataDir: string;
  dbPoolSize: number;
  /** PostgreSQL: a statement silent this long fails with 503 and its connection is dropped (0: never). */
  dbTimeoutMs: number;
  /** PostgreSQL: how long start-up waits for a database that refuses connections (still starting, down) before giving up (0: not at all). */
  dbStartTimeoutMs: number;
  logLevel: string;
  /**
   * Which requests get the "incoming request" / "request completed" lines at info (the rest at debug):
   * all; auto = all but the per-step routes (step, params) unless they fail; errors = only failed
   * answers (4xx/5xx); none.
   */
  logRequests: 'all' | 'auto' | 'errors' | 'none';
  /** Admin bearer token; null = no auth configured (then only loopback is allowed unless `allowInsecure`). */
  adminToken: string | null;
  /** ASGD_ADMIN_TOKEN_PREVIOUS: also the admin's during a rotation (both accepted); null when unset. */
  previousAdminToken: string | null;
  allowInsecure: boolean;
  /**
   * ASGD_ALLOWED_HOSTS: with auth off, names a request's Host may carry besides the loopback ones
   * (localhost, *.localhost, 127.x.x.x, [::1]); lower case, without ports.
   */
  allowedHosts: string[];
  bodyLimitStep: number;
  bodyLimitCreate: number;
  bodyLimitDefault: number;
  /** Largest JSON body on any route: a JSON text is decoded into one string, which V8 caps at ~512 MiB. */
  bodyLimitJson: number;
  /** JSON body bytes a process parses and holds at once (bodies over 1 MiB, arrived whole, until answered; 0: no bound). */
  jsonInFlightBytes: number;
  /** ASGD_BODY_IN_FLIGHT_BYTES: request body bytes (over 1 MiB each) one process holds at once, received or waiting; 0: no bound. */
  bodyInFlightBytes: number;
  requestTimeoutMs: number;
  /** Open connections a process accepts (Node's server.maxConnections); more are closed as they come. */
  maxConnections: number;
  rateLimitPerMinute: number | null;
  defaultSnapshotEvery: number;
  defaultKeepSnapshots: number;
  /** Byte bound on a new session's step log (null: none, only the count bound). */
  defaultKeepLogBytes: number | null;
  /** New sessions are deleted after this many idle seconds (null: never). */
  defaultExpireAfterIdleS: number | null;
  /** How often this process runs the idle-session sweep (0 = never; one replica at a time does it). */
  sweepIntervalMs: number;
  /** Embedded database: how often tables with many dead rows are vacuumed (src/db/vacuum.ts); 0 = never. */
  vacuumIntervalMs: number;
  idempotencyWindowSeconds: number;
  /** How long a batch of steps may wait for clients that usually step again sooner (sessions/linger.ts); 0 = never. */
  stepLingerUs: number;
  /** How long a step naming its worker waits at most for that worker's earlier steps in this process (sessions/arrival-order.ts); 0 = no ordering. */
  workerOrderWaitMs: number;
  /** ASGD_KERNEL: 'auto' picks wasm-fma where its start-up self-test passes, else wasm. */
  kernel: KernelChoice;
  fma: boolean;
  /** Bytes of decoded session state one process keeps in memory before evicting the least used. */
  cacheBytes: number;
  /**
   * Sessions one process keeps decoded at most (the least used go first). Each holds its own WebAssembly
   * memory, for which V8 reserves about 8 GiB of address space however small it is: some 16,000 exhaust it.
   */
  cacheSessions: number;
  /** Background snapshots of a state (params + ax) up to this size copy it and write while steps go on; bigger ones are written in place, steps waiting. */
  snapshotCopyLimitBytes: number;
  /** The embedded database's writes are refused (507) while its disk has less free than this plus the write's size. */
  minFreeBytes: number;
  /** Log bytes between replay points (src/sessions/replay-points.ts); 0: none. */
  replayBoundBytes: number;
  /** under-pressure: answer 503 while the event loop lags more than this (0 = off). */
  maxEventLoopDelayMs: number;
  /** under-pressure: answer 503 while the V8 heap / the process RSS is above this many bytes (0 = off). */
  maxHeapUsedBytes: number;
  maxRssBytes: number;
  /** How often the database is probed; while it is unreachable every route but /healthz and /metrics answers 503 (0 = off). */
  healthCheckIntervalMs: number;
  /** /metrics needs a read token that is not limited to sessions (the counters name sessions). Open by default. */
  metricsRequireToken: boolean;
  /** Fastify's trustProxy: false, true, a hop count, or a comma-separated list of proxy addresses/CIDRs. */
  trustProxy: boolean | number | string[];
  /** Browser origins allowed to call the API (CORS, src/plugins/cors.ts): a list, '*' for any, null = off. */
  corsOrigins: string[] | '*' | null;
  /** Apply pending migrations when `serve` starts; null (unset) = yes. */
  migrateOnStart: boolean | null;
  /** After SIGTERM, in-flight requests get this long to finish before the process exits anyway. */
  shutdownTimeoutMs: number;
}

export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

function int(env: Env, key: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const raw = env[key];
  if (raw === undefined || raw === '') return fallback;
  if (!/^\d+$/.test(raw.trim())) throw new ConfigError(`${key} must be a whole number, got ${JSON.stringify(raw)}`);
  const value = Number(raw.trim());
  if (value < min || value > max) throw new ConfigError(`${key} must be between ${min} and ${max}, got ${value}`);
  return value;
}

/**
 * ASGD_MIN_FREE_BYTES: 0 (no guard) or at least two of PGlite's 16 MiB WAL segments. Below that a write
 * could leave PGlite without room for its next segment, where it spins for good (an operator's review:
 * 1 MiB on a 50 MB disk hung the process with 3 MB free).
 */
function minFree(env: Env): number {
  const value = int(env, 'ASGD_MIN_FREE_BYTES', 64 * MiB, 0);
  if (value > 0 && value < 32 * MiB) {
    throw new ConfigError(`ASGD_MIN_FREE_BYTES must be 0 (no guard) or at least ${32 * MiB} (two of the embedded database's 16 MiB WAL segments: below that a write can leave it no room for the next one, where it hangs), got ${value}`);
  }
  return value;
}

/** ASGD_BODY_LIMIT_STEP / _CREATE / _DEFAULT at most: 32 GiB (a 8e9-parameter model's float32 file). */
export const MAX_BODY_LIMIT = 32 * 1024 * 1024 * 1024;

/** ASGD_MAX_RSS_BYTES, unless 0: a process starts at about 260 MB, and a bound below that refused every request for good. */
const MIN_MAX_RSS_BYTES = 512 * 1024 * 1024;
/**
 * ASGD_MAX_HEAP_USED_BYTES and ASGD_MAX_EVENT_LOOP_DELAY_MS, unless 0: a process's heap in use starts at
 * tens of MB, and its event loop delay is sampled in steps of 10 ms; below these a bound (1000 bytes for a
 * MiB, 1 ms) refused every request for good while /healthz said 200 (found by an operator's review).
 */
const MIN_MAX_HEAP_USED_BYTES = 128 * 1024 * 1024;
const MIN_MAX_EVENT_LOOP_DELAY_MS = 100;

/** A memory bound that is 0 (off) or at least `floor` (a smaller one would refuse every request from the start). */
function offOrAtLeast(env: Env, key: string, floor: number, unit: 'bytes' | 'ms' = 'bytes'): number {
  const value = unit === 'ms' ? ms(env, key, 0, 0) : int(env, key, 0, 0);
  const shown = unit === 'ms' ? `${floor} ms` : `${floor} (${floor / (1024 * 1024)} MiB)`;
  if (value !== 0 && value < floor) throw new ConfigError(`${key} must be 0 (off) or at least ${shown}: below that the process refuses every request from its start, got ${value}`);
  return value;
}

/** The longest delay a Node timer takes (2^31 - 1 ms, about 24.8 days); a longer one fires after 1 ms. */
const TIMER_MAX_MS = 2_147_483_647;

/** A duration in milliseconds that a timer will wait (int, at most TIMER_MAX_MS). */
const ms = (env: Env, key: string, fallback: number, min: number): number => int(env, key, fallback, min, TIMER_MAX_MS);

/** The shortest ASGD_DB_TIMEOUT_MS but 0: below it not even a connection to a healthy local PostgreSQL starts. */
const MIN_DB_TIMEOUT_MS = 100;

/** ASGD_DB_TIMEOUT_MS: 0 (no timeout), or long enough to connect (a shorter one failed every start as "waiting for PostgreSQL"). */
function dbTimeout(env: Env): number {
  const value = ms(env, 'ASGD_DB_TIMEOUT_MS', 30_000, 0);
  if (value > 0 && value < MIN_DB_TIMEOUT_MS) {
    throw new ConfigError(`ASGD_DB_TIMEOUT_MS must be 0 (no timeout) or at least ${MIN_DB_TIMEOUT_MS}, got ${value}: a connection's start-up gets as long`);
  }
  return value;
}

function bool(env: Env, key: string, fallback: boolean): boolean {
  const raw = env[key];
  if (raw === undefined || raw === '') return fallback;
  const v = raw.trim().toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  throw new ConfigError(`${key} must be true or false, got ${JSON.stringify(raw)}`);
}

const MiB = 1024 * 1024;
/** ASGD_CACHE_SESSIONS at most: each cached session reserves ~8 GiB of the 128 TiB of address space (its wasm memory). */
const MAX_CACHE_SESSIONS = 10_000;
const LOG_REQUESTS: readonly string[] = ['all', 'auto', 'errors', 'none'];
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

function trustProxyOf(env: Env): Config['trustProxy'] {
  const raw = env.ASGD_TRUST_PROXY?.trim() ?? '';
  if (raw === '' || /^(false|0|no|off)$/i.test(raw)) return false;
  if (/^(true|yes|on)$/i.test(raw)) return true;
  if (/^\d{1,2}$/.test(raw)) return Number(raw);
  const list = raw.split(',').map((s) => s.trim()).filter(Boolean);
  for (const entry of list) {
    const [address, bits, ...rest] = entry.split('/');
    const family = isIP(address);
    const prefixOk = bits === undefined || (/^\d{1,3}$/.test(bits) && Number(bits) <= (family === 6 ? 128 : 32));
    if (family === 0 || !prefixOk || rest.length > 0) {
      throw new ConfigError(`ASGD_TRUST_PROXY: ${JSON.stringify(entry)} is not an IP address or CIDR (or use true, false or a hop count up to 99)`);
    }
  }
  return list;
}

/** ASGD_ALLOWED_HOSTS: host names (or IP addresses, IPv6 in brackets) as a Host header carries them, without a port. */
function allowedHostsOf(env: Env): string[] {
  return (env.ASGD_ALLOWED_HOSTS ?? '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean).map((entry) => {
    const name = entry.replace(/\.$/, '');
    const ipv6 = /^\[[0-9a-f:.]+\]$/.test(name) && isIP(name.slice(1, -1)) === 6;
    if (!ipv6 && !/^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$/.test(name)) {
      throw new ConfigError(`ASGD_ALLOWED_HOSTS: ${JSON.stringify(entry)} is not a host name or IP address (no port, no scheme; IPv6 in brackets)`);
    }
    return name;
  });
}

function corsOriginsOf(env: Env): Config['corsOrigins'] {
  const raw = env.ASGD_CORS_ORIGINS?.trim() ?? '';
  if (raw === '') return null;
  if (raw === '*') return '*';
  return raw.split(',').map((s) => s.trim()).filter(Boolean).map((entry) => {
    // An origin as a browser sends it: scheme://host[:port], no path; compared in URL's serialization.
    if (!/^https?:\/\/[^/?#\s*]+$/i.test(entry)) {
      throw new ConfigError(`ASGD_CORS_ORIGINS: ${JSON.stringify(entry)} is not an origin (http(s)://host[:port], no path); or use * alone`);
    }
    try {
      return new URL(entry).origin;
    } catch {
      throw new ConfigError(`ASGD_CORS_ORIGINS: ${JSON.stringify(entry)} is not an origin (http(s)://host[:port], no path); or use * alone`);
    }
  });
}

/**
 * libpq's form for a Unix socket, `postgres://user@/db?host=/var/run/postgresql` (an empty host and the
 * socket directory in `host`): no WHATWG URL, but pg reads it. The socket directory, or null.
 */
export function socketHostOf(raw: string): string | null {
  if (!/^postgres(?:ql)?:\/\/(?:[^/?#@]*@)?(?:[/?#]|$)/i.test(raw)) return null;
  const host = /[?&]host=([^&#]*)/.exec(raw)?.[1];
  if (!host) return null;
  try {
    return decodeURIComponent(host);
  } catch {
    return null;
  }
}

/**
 * DATABASE_URL: a PostgreSQL connection URL (postgres:// or postgresql://; with an empty host and `?host=`
 * a socket directory as libpq writes it; socket: or a socket directory path as pg reads them). Anything
 * else was tried as one (`notaurl` failed later as "ENOTFOUND base").
 * The message never repeats the value: it may hold a password.
 */
function databaseUrl(env: Env): string | null {
  const raw = env.DATABASE_URL?.trim() || null;
  if (raw === null || raw.startsWith('/')) return raw;
  if (socketHostOf(raw) !== null) return raw;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new ConfigError('DATABASE_URL must be a PostgreSQL URL, postgres://user:password@host:port/database; it is not a URL');
  }
  if (!['postgres:', 'postgresql:', 'socket:'].includes(url.protocol)) {
    throw new ConfigError(`DATABASE_URL must be a PostgreSQL URL, postgres://user:password@host:port/database; it is a ${url.protocol.slice(0, 20)}// URL`);
  }
  if (url.protocol !== 'socket:' && url.hostname === '') throw new ConfigError('DATABASE_URL must name a host: postgres://user:password@host:port/database');
  const sslmode = url.searchParams.get('sslmode');
  if (sslmode !== null && !SSL_MODES.includes(sslmode)) {
    throw new ConfigError(`DATABASE_URL's sslmode must be one of ${SSL_MODES.join(', ')}; it is ${JSON.stringify(sslmode.slice(0, 20))}`);
  }
  return raw;
}

/**
 * The sslmode values node-postgres reads (any other was taken as "use TLS"). Note: it treats prefer,
 * require and verify-ca as verify-full (the certificate and host name are checked; prefer does not fall
 * back to plain text); no-verify encrypts without checking.
 */
const SSL_MODES = ['disable', 'prefer', 'require', 'verify-ca', 'verify-full', 'no-verify'];

/** An admin token variable: unset or 16-512 visible ASCII characters. */
function adminTokenOf(env: NodeJS.ProcessEnv, name: string): string | null {
  const token = env[name]?.trim() || null;
  if (token !== null && token.length < 16) throw new ConfigError(`${name} must be at least 16 characters`);
  // What an Authorization: Bearer header can carry (src/plugins/auth.ts): a token outside it could never log in.
  if (token !== null && !/^[\x21-\x7e]{16,512}$/.test(token)) {
    throw new ConfigError(`${name} must be at most 512 characters of visible ASCII (no spaces): a bearer token cannot carry others`);
  }
  return token;
}

/** ASGD_IDEMPOTENCY_WINDOW_SECONDS at most: ten years. */
export const MAX_IDEMPOTENCY_WINDOW_S = 315_360_000;

/** A DNS name as RFC 1123 allows it: dot-separated labels of letters, digits and inner hyphens, at most 253 characters. */
const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/**
 * HOST: an IP address (IPv6 with or without brackets, listened on as the address itself) or a host name;
 * anything else is refused here, naming HOST, instead of failing at listen() after the database was opened.
 */
function hostOf(env: Env): string {
  const raw = env.HOST?.trim() || '127.0.0.1';
  const host = raw.replace(/^\[(.*)\]$/, '$1');
  if (isIP(host) !== 0) return host;
  // All digits and dots is meant as an IPv4 address (999.1.1.1 is none), not a name.
  if (!/^[\d.]+$/.test(host) && HOSTNAME.test(host)) return host;
  throw new ConfigError(`HOST must be an IP address (0.0.0.0, 127.0.0.1, ::) or a host name, got ${JSON.stringify(raw.slice(0, 100))}`);
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

export function loadConfig(env: Env = process.env): Config {
  const kernel = (env.ASGD_KERNEL?.trim() || 'auto') as KernelChoice;
  if (!KERNEL_CHOICES.includes(kernel)) throw new ConfigError(`ASGD_KERNEL must be one of ${KERNEL_CHOICES.join(', ')}, got ${JSON.stringify(kernel)}`);
  const logLevel = env.LOG_LEVEL?.trim() || 'info';
  if (!LOG_LEVELS.includes(logLevel)) throw new ConfigError(`LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(logLevel)}`);
  const logRequests = (env.ASGD_LOG_REQUESTS?.trim() || 'auto') as Config['logRequests'];
  if (!LOG_REQUESTS.includes(logRequests)) throw new ConfigError(`ASGD_LOG_REQUESTS must be one of ${LOG_REQUESTS.join(', ')}, got ${JSON.stringify(logRequests)}`);
  const adminToken = adminTokenOf(env, 'ASGD_ADMIN_TOKEN');
  const previousAdminToken = adminTokenOf(env, 'ASGD_ADMIN_TOKEN_PREVIOUS');
  if (previousAdminToken !== null && adminToken === null) {
    throw new ConfigError('ASGD_ADMIN_TOKEN_PREVIOUS is the old admin token during a rotation: set ASGD_ADMIN_TOKEN (the new one) too');
  }
  const config: Config = {
    host: hostOf(env),
    port: int(env, 'PORT', 8080, 0, 65535),
    databaseUrl: databaseUrl(env),
    dataDir: env.ASGD_DATA_DIR?.trim() || '.data/pglite',
    dbPoolSize: int(env, 'ASGD_DB_POOL_SIZE', 10, 1, 1000),
    dbTimeoutMs: dbTimeout(env),
    dbStartTimeoutMs: ms(env, 'ASGD_DB_START_TIMEOUT_MS', 60_000, 0),
    logLevel,
    logRequests,
    adminToken,
    previousAdminToken,
    allowInsecure: bool(env, 'ASGD_ALLOW_INSECURE', false),
    allowedHosts: allowedHostsOf(env),
    // A body is read into one buffer: at most what one process could hold (a limit of 1 TiB answered an
    // upload announcing it with a 500, the allocation failing; found by a review).
    bodyLimitStep: int(env, 'ASGD_BODY_LIMIT_STEP', 1024 * MiB, 1024, MAX_BODY_LIMIT),
    bodyLimitCreate: int(env, 'ASGD_BODY_LIMIT_CREATE', 2048 * MiB, 1024, MAX_BODY_LIMIT),
    bodyLimitDefault: int(env, 'ASGD_BODY_LIMIT_DEFAULT', 1 * MiB, 1024, MAX_BODY_LIMIT),
    bodyLimitJson: int(env, 'ASGD_BODY_LIMIT_JSON', 256 * MiB, 1024, 512 * MiB),
    jsonInFlightBytes: int(env, 'ASGD_JSON_IN_FLIGHT_BYTES', 512 * MiB, 0),
    bodyInFlightBytes: int(env, 'ASGD_BODY_IN_FLIGHT_BYTES', 1024 * MiB, 0),
    requestTimeoutMs: ms(env, 'ASGD_REQUEST_TIMEOUT_MS', 300_000, 0),
    maxConnections: int(env, 'ASGD_MAX_CONNECTIONS', 4096, 1),
    rateLimitPerMinute: env.ASGD_RATE_LIMIT_PER_MINUTE ? int(env, 'ASGD_RATE_LIMIT_PER_MINUTE', 0, 1) : null,
    // The defaults of session settings, within the bounds the API holds them to (a default the API would
    // refuse in a PATCH was copied into every new session and fork).
    defaultSnapshotEvery: int(env, 'ASGD_SNAPSHOT_EVERY', 100, 1, SETTING_LIMITS.snapshot_every),
    defaultKeepSnapshots: int(env, 'ASGD_KEEP_SNAPSHOTS', 10, 1, SETTING_LIMITS.keep_snapshots),
    // 0 or "none" turns the byte bound off; 4 GiB keeps a 1e6-parameter model's default log whole.
    defaultKeepLogBytes: /^\s*(none|0)\s*$/i.test(env.ASGD_KEEP_LOG_BYTES ?? '') ? null : int(env, 'ASGD_KEEP_LOG_BYTES', 4096 * MiB, 1, SETTING_LIMITS.keep_log_bytes),
    defaultExpireAfterIdleS: env.ASGD_EXPIRE_AFTER_IDLE_S?.trim() ? int(env, 'ASGD_EXPIRE_AFTER_IDLE_S', 0, 1, SETTING_LIMITS.expire_after_idle_s) : null,
    sweepIntervalMs: ms(env, 'ASGD_SWEEP_INTERVAL_MS', 60_000, 0),
    vacuumIntervalMs: ms(env, 'ASGD_VACUUM_INTERVAL_MS', VACUUM_INTERVAL_MS, 0),
    // At most ten years: PostgreSQL's now() - interval leaves the timestamp range past ~2e11 s, and every
    // retry of a keyed step then failed.
    idempotencyWindowSeconds: int(env, 'ASGD_IDEMPOTENCY_WINDOW_SECONDS', 86_400, 1, MAX_IDEMPOTENCY_WINDOW_S),
    stepLingerUs: int(env, 'ASGD_STEP_LINGER_US', 2_000, 0, 100_000),
    workerOrderWaitMs: int(env, 'ASGD_WORKER_ORDER_WAIT_MS', 2_000, 0, 60_000),
    kernel,
    fma: bool(env, 'ASGD_FMA', true),
    cacheBytes: int(env, 'ASGD_CACHE_BYTES', 4096 * MiB, 0),
    cacheSessions: int(env, 'ASGD_CACHE_SESSIONS', 4096, 1, MAX_CACHE_SESSIONS),
    snapshotCopyLimitBytes: int(env, 'ASGD_SNAPSHOT_COPY_LIMIT_BYTES', 256 * MiB, 0),
    minFreeBytes: minFree(env),
    // Replay points serve takeovers by other processes; the embedded database has one process, whose point
    // writes would run on its event loop: off there unless asked for.
    replayBoundBytes: int(env, 'ASGD_REPLAY_BOUND_BYTES', databaseUrl(env) ? 64 * MiB : 0, 0),
    maxEventLoopDelayMs: offOrAtLeast(env, 'ASGD_MAX_EVENT_LOOP_DELAY_MS', MIN_MAX_EVENT_LOOP_DELAY_MS, 'ms'),
    maxHeapUsedBytes: offOrAtLeast(env, 'ASGD_MAX_HEAP_USED_BYTES', MIN_MAX_HEAP_USED_BYTES),
    maxRssBytes: offOrAtLeast(env, 'ASGD_MAX_RSS_BYTES', MIN_MAX_RSS_BYTES),
    healthCheckIntervalMs: ms(env, 'ASGD_HEALTH_CHECK_INTERVAL_MS', 5_000, 0),
    metricsRequireToken: bool(env, 'ASGD_METRICS_REQUIRE_TOKEN', false),
    trustProxy: trustProxyOf(env),
    corsOrigins: corsOriginsOf(env),
    migrateOnStart: env.ASGD_MIGRATE?.trim() ? bool(env, 'ASGD_MIGRATE', false) : null,
    shutdownTimeoutMs: ms(env, 'ASGD_SHUTDOWN_TIMEOUT_MS', 60_000, 1),
  };
  if (!config.adminToken && !config.allowInsecure && !isLoopback(config.host)) {
    throw new ConfigError(
      `refusing to listen on ${config.host} without authentication: set ASGD_ADMIN_TOKEN (or ASGD_ALLOW_INSECURE=true to opt out)`,
    );
  }
  if (!config.adminToken && !config.allowInsecure && config.corsOrigins === '*') {
    // With auth off every request is the admin's: * would let every web page a browser here opens read,
    // change and delete every session (a security review).
    throw new ConfigError(
      'refusing ASGD_CORS_ORIGINS=* without authentication: every web page could read, change and delete every session; list the pages\' origins, or set ASGD_ADMIN_TOKEN (or ASGD_ALLOW_INSECURE=true to opt out)',
    );
  }
  return config;
}
