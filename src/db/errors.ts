// What a database error means for a request, from its SQLSTATE (PostgreSQL appendix A) or the driver's
// socket error: the HTTP layer turns the class into a status without knowing any SQL.
import { QUERY_CANCELED } from './silence.ts';

/** Codes that mean "try again", never "you sent something wrong": connection (08; but 08P01, a protocol
 *  violation, is a statement of ours PostgreSQL cannot take: a bug, not an outage), resources (53),
 *  operator intervention (57P01-03), serialization failure and deadlock (40001, 40P01). */
const RETRYABLE_SQLSTATE = /^(08(?!P01)|53|57P0[1-3]|40001|40P01)/;
const RETRYABLE_SOCKET = ['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN'];

/**
 * A connection that could not be made or was lost: one of the socket errors above, or ENOENT of a connect to a
 * Unix socket (DATABASE_URL's host=/var/run/postgresql: PostgreSQL removes its socket file while it is down,
 * so a restart read as ENOENT, a 500 and a start that gave up at once; found by an operator's review).
 */
function isSocketFailure(e: ErrorFields, code: string): boolean {
  return RETRYABLE_SOCKET.includes(code) || (code === 'ENOENT' && (e as { syscall?: unknown })?.syscall === 'connect');
}
const RETRYABLE_MESSAGE = /Connection terminated|connection timeout|timeout exceeded when trying to connect|Client has encountered a connection error|not queryable/i;
/** The server answers but will not serve us: database dropped or renamed (3D000), admin shutdown (57P04),
 *  our login changed (class 28), a privilege this role lacks (42501: a table a migration added without its
 *  grants), a read-only database (25006: a standby after a failover, default_transaction_read_only), a
 *  database that does not allow connections (55000: ALTER DATABASE ... ALLOW_CONNECTIONS false; a request
 *  before the health probe saw it was a 500, found by an operator's review). */
const UNAVAILABLE_SQLSTATE = /^(3D000|57P04|28[0-9A-Z]{3}|42501|25006|55000)$/;
/** Class 22, data exception: a value (a number out of a column's range, …) got past the route's checks. */
const BAD_VALUE_SQLSTATE = /^22[0-9A-Z]{3}$/;

export type DbErrorClass = 'retryable' | 'unavailable' | 'bad-value';

type ErrorFields = { code?: unknown; message?: unknown; severity?: unknown; cause?: unknown } | null | undefined;

/** The error itself, or PostgreSQL's that drizzle wrapped ("Failed query: …", with it as the cause); and its code. */
function unwrapped(err: unknown): { e: ErrorFields; code: string } {
  let e = err as ErrorFields;
  if (e && e.code === undefined && e.cause !== null && typeof e.cause === 'object' && (e.cause as { severity?: unknown }).severity !== undefined) e = e.cause as ErrorFields;
  return { e, code: typeof e?.code === 'string' ? e.code : '' };
}

/** The class of a database error, or null when `err` is not one. */
export function classifyDbError(err: unknown): DbErrorClass | null {
  const { e, code } = unwrapped(err);
  if (RETRYABLE_SQLSTATE.test(code) || isSocketFailure(e, code)) return 'retryable';
  if (typeof e?.message === 'string' && RETRYABLE_MESSAGE.test(e.message)) return 'retryable';
  // Only a server's error carries a severity; a JS error with a code like '22…' is not PostgreSQL's.
  if (e?.severity === undefined) return null;
  if (UNAVAILABLE_SQLSTATE.test(code)) return 'unavailable';
  if (BAD_VALUE_SQLSTATE.test(code)) return 'bad-value';
  return null;
}

/** True for an error of the database or of the way to it: PostgreSQL's (it carries a severity) or a classified one. */
export function isDbError(err: unknown): boolean {
  return (err as { severity?: unknown } | null)?.severity !== undefined || classifyDbError(err) !== null;
}

/**
 * One line for an operator about a failure to start, migrate or reach the database: PostgreSQL's own message
 * and SQLSTATE (drizzle wraps it as "Failed query: …" with the reason only in `cause`), the statement it
 * failed in, and for a refused connection where it tried.
 */
/**
 * The embedded database's file errors (PGlite's Emscripten file system throws `{ name: 'ErrnoError', errno }`,
 * no message): WASI's numbers of those a data directory meets.
 */
const WASI_ERRNO: Record<number, string> = {
  2: 'EACCES (permission denied)', 19: 'EDQUOT (disk quota exceeded)', 29: 'EIO (input/output error)', 44: 'ENOENT (no such file or directory)',
  48: 'ENOMEM (out of memory)', 51: 'ENOSPC (no space left on device)', 54: 'ENOTDIR (not a directory)', 63: 'EPERM (operation not permitted)',
  69: 'EROFS (read-only file system)',
};

export function describeDbFailure(err: unknown): string {
  const e = (err ?? {}) as { message?: unknown; code?: unknown; cause?: unknown; name?: unknown; errno?: unknown };
  if (e.name === 'ErrnoError' && typeof e.errno === 'number' && typeof e.message !== 'string') {
    return `the embedded database could not write its files in ASGD_DATA_DIR: ${WASI_ERRNO[e.errno] ?? `file system error ${e.errno}`}`;
  }
  const cause = e.cause !== null && typeof e.cause === 'object' ? e.cause as { message?: unknown; code?: unknown } : null;
  const message = typeof e.message === 'string' ? e.message : String(err);
  // The statement's first line that says something (a migration's text starts with a blank line: the
  // message read "while running " and nothing more; found by an operator's review).
  const failedQuery = /^Failed query: \s*([^\n]*)/.exec(message)?.[1];
  if (failedQuery !== undefined && cause && typeof cause.message === 'string') {
    return `${cause.message}${typeof cause.code === 'string' ? ` (SQLSTATE ${cause.code})` : ''} while running ${failedQuery.slice(0, 120)}`;
  }
  const code = typeof e.code === 'string' ? e.code : '';
  if (['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ETIMEDOUT'].includes(code)) return `cannot connect to PostgreSQL: ${message} (is it running there? DATABASE_URL)`;
  if (code === 'ENOENT' && (e as { syscall?: unknown }).syscall === 'connect') return `cannot connect to PostgreSQL: ${message} (no socket there: is it running, and is DATABASE_URL's host its socket directory?)`;
  if (/^[0-9A-Z]{5}$/.test(code) && (err as { severity?: unknown }).severity !== undefined) return `PostgreSQL: ${message} (SQLSTATE ${code})`;
  // node-postgres's own words when DATABASE_URL's sslmode asks for TLS (prefer included: no fallback) and the server has none.
  if (message === 'The server does not support SSL connections') {
    return `${message}: DATABASE_URL's sslmode asks for TLS (node-postgres takes prefer and require as verify-full, with no fallback to plain text); for a server without TLS use sslmode=disable`;
  }
  return message;
}

/** Why the database refuses this service, in words, from the SQLSTATE of a refusal (refusedBy). */
function refusalReason(sqlstate: string): string {
  switch (sqlstate) {
    case '25006': return 'the database is read-only (SQLSTATE 25006: a standby after a failover, or default_transaction_read_only)';
    case '42501': return 'the database refuses this service\'s queries (SQLSTATE 42501: a privilege this role lacks)';
    // "database … is not currently accepting connections": ALTER DATABASE … ALLOW_CONNECTIONS false.
    case '55000': return 'the database does not accept this service\'s connections now (SQLSTATE 55000: not accepting connections, or another object not ready; the log has PostgreSQL\'s words)';
    case '3D000': return 'the database is gone (SQLSTATE 3D000: dropped or renamed?)';
    case '57P04': return 'the database was dropped (SQLSTATE 57P04)';
    default: return sqlstate.startsWith('28')
      ? `the database refuses this service's login (SQLSTATE ${sqlstate}: the role or its password)`
      : `the database refuses this service's queries (SQLSTATE ${sqlstate}; the log has PostgreSQL's words)`;
  }
}

/**
 * PostgreSQL's words for a refusal an answer may carry (the table a privilege is missing on, the read-only
 * mode), or null: other refusals' messages name the database or the role, which a public answer does not.
 */
function refusalDetail(err: unknown): string | null {
  const code = refusedBy(err);
  if (code !== '42501' && code !== '25006') return null;
  const outer = err as { cause?: unknown } | null;
  const message = ((outer?.cause ?? err) as { message?: unknown }).message;
  return typeof message === 'string' ? message.slice(0, 300) : null;
}

/**
 * What a 503 answer says of a refusal (refusedBy): the reason in words, and PostgreSQL's own words where they
 * name no database or role; null when err is no refusal.
 */
export function refusalMessage(err: unknown): string | null {
  const code = refusedBy(err);
  return code === null ? null : [refusalReason(code), refusalDetail(err)].filter(Boolean).join(': ');
}

/**
 * The SQLSTATE of a PostgreSQL error that is no trouble reaching it (a privilege, a missing schema, a
 * login refused): what an operator must fix, not wait out; null for anything else. drizzle keeps
 * PostgreSQL's error as the cause.
 */
export function refusedBy(err: unknown): string | null {
  const outer = err as { cause?: unknown } | null;
  const e = (outer?.cause ?? err) as { code?: unknown; severity?: unknown } | null;
  return typeof e?.code === 'string' && e.severity !== undefined && classifyDbError(e) !== 'retryable' ? e.code : null;
}

/**
 * True when `err` says the database does not answer: no connection (refused, reset, dropped after
 * ASGD_DB_TIMEOUT_MS of silence: DatabaseSilentError's ETIMEDOUT), a statement cancelled (57014: after that
 * silence, a hung server or a lock wait), or the server going away. Not a retryable failure of one
 * transaction (a deadlock, a serialization failure, a resource limit).
 */
export function isUnanswered(err: unknown): boolean {
  const { e, code } = unwrapped(err);
  if (isSocketFailure(e, code) || code === QUERY_CANCELED || /^(08(?!P01)|57P0[1-3])/.test(code)) return true;
  return typeof e?.message === 'string' && RETRYABLE_MESSAGE.test(e.message);
}
