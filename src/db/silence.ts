// PostgreSQL that stops answering without closing the connection: a network black hole, a hung server, or
// a statement waiting for a lock another connection holds. pg waits for ever in all three; here a statement
// that hears nothing for ASGD_DB_TIMEOUT_MS is first cancelled over a second connection (PostgreSQL's
// CancelRequest): a server that answers aborts it, the client gets error 57014 and the connection stays
// usable, and nothing of the statement was committed. Where the cancel gets no answer either (the server is
// unreachable), the connection is destroyed: the statement fails with DatabaseSilentError, and whether a
// commit on its way took effect is unknown (a step retried with its Idempotency-Key counts once).
import type { Socket } from 'node:net';
import pg from 'pg';

/** The statement's connection was dropped after `ms` of silence and an unanswered cancel. */
export class DatabaseSilentError extends Error {
  readonly code = 'ETIMEDOUT';
  readonly ms: number;

  constructor(ms: number) {
    super(`the database did not answer for ${ms / 1000} s (ASGD_DB_TIMEOUT_MS) nor to a cancel; the connection was dropped`);
    this.name = 'DatabaseSilentError';
    this.ms = ms;
  }
}

/** PostgreSQL's query_canceled: our cancel (or statement_timeout, or an operator's pg_cancel_backend). */
export const QUERY_CANCELED = '57014';

/** How long a cancel may take before the connection is given up: the silence itself, at most 5 s. */
const cancelGraceMs = (ms: number) => Math.min(ms, 5_000);

/** The fields of pg's client (pg 8) these checks read; the black-hole tests notice a change. */
interface PgInternals {
  _activeQuery?: unknown;
  _sentQueryQueue?: unknown[];
  _queryQueue?: unknown[];
  processID: number | null;
  secretKey: number | null;
  connection: { stream: Socket };
}

const internals = (client: pg.Client) => client as unknown as PgInternals;

/** The statement running on the client (null when it is idle). */
function running(client: pg.Client): unknown {
  const c = internals(client);
  if (c._activeQuery) return c._activeQuery;
  if (c._sentQueryQueue?.length) return c._sentQueryQueue[0];
  return c._queryQueue?.length ? c._queryQueue[0] : null;
}

/** Asks the server to cancel what `client` runs (a CancelRequest over a new connection that lives at most `ms`). */
function sendCancel(connectionString: string, client: pg.Client, ms: number): void {
  const { processID, secretKey } = internals(client);
  if (processID === null || secretKey === null) return;
  // A client only for its parsed host and port and its connection object: it never starts a session.
  const canceller = new pg.Client({ connectionString }) as unknown as {
    host: string; port: number;
    connection: { stream: Socket; connect(port: number | string, host?: string): void; cancel(pid: number, key: number): void; on(event: string, fn: () => void): void; once(event: string, fn: () => void): void };
  };
  const { connection } = canceller;
  // Unreachable, refused or reset: the grace timer of watchSilence decides. pg's connection re-emits its
  // socket's errors as its own 'error' event, which nobody else hears here: unheard, it ended the process
  // (a chaos review: a black-holed database whose address then refused connections, or a hung server
  // killed with the cancel in its backlog).
  connection.on('error', () => {});
  connection.stream.on('error', () => {});
  const timer = setTimeout(() => connection.stream.destroy(), ms);
  timer.unref();
  connection.stream.once('close', () => clearTimeout(timer));
  connection.once('connect', () => connection.cancel(processID, secretKey)); // the server closes it after
  if (canceller.host?.startsWith('/')) connection.connect(`${canceller.host}/.s.PGSQL.${canceller.port}`);
  else connection.connect(canceller.port, canceller.host);
}

/**
 * Watches a pooled client: with a statement in flight and no byte either way for `ms` (the socket's own
 * inactivity timer, which a large write still draining keeps back), the statement is cancelled; if it is
 * still running `cancelGraceMs` later, the connection is destroyed (pg fails every statement on it with
 * DatabaseSilentError and the pool drops the client). An idle client's timer means nothing.
 */
export function watchSilence(client: pg.Client, ms: number, connectionString: string): void {
  if (ms <= 0) return;
  const stream = internals(client).connection.stream;
  stream.setTimeout(ms);
  stream.on('timeout', () => {
    const statement = running(client);
    if (statement === null) return;
    sendCancel(connectionString, client, cancelGraceMs(ms));
    const check = setTimeout(() => {
      if (running(client) === statement && !stream.destroyed) stream.destroy(new DatabaseSilentError(ms));
    }, cancelGraceMs(ms));
    check.unref();
  });
}

/**
 * Turns watchSilence's timer off on `client` until the returned function turns it back on (to `ms`). A
 * migration waits as long as it takes: for another replica's migration (the advisory lock), for a DDL
 * statement's own work; `asgd-serve migrate` has no such timer either.
 */
export function pauseSilence(client: pg.Client, ms: number): () => void {
  const stream = internals(client).connection.stream;
  stream.setTimeout(0);
  return () => {
    if (ms > 0 && !stream.destroyed) stream.setTimeout(ms);
  };
}

/**
 * Ends a client, or, when the server does not close the connection within `ms` (a black hole), destroys
 * it: a shutdown must not wait for a peer that cannot answer.
 */
export async function endWithin(client: pg.Client, ms: number): Promise<void> {
  const timer = setTimeout(() => internals(client).connection.stream.destroy(), ms);
  try {
    await client.end();
  } catch {
    // destroyed, or already gone: either way it is closed
  } finally {
    clearTimeout(timer);
  }
}
