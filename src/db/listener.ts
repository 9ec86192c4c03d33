// LISTEN on PostgreSQL for the whole process: one dedicated connection outside the pool (a pooled one
// would lose its LISTEN when returned), reconnecting with backoff after the server restarts or the
// connection drops. Notifications sent while it was down are lost, so `onReset` tells subscribers to
// re-read what they wait for.
import pg from 'pg';
import { APPLICATION_NAME } from './database.ts';
import { endWithin } from './silence.ts';

export interface ListenHandlers {
  onNotify(payload: string): void;
  /** The connection was (re)established after a loss: anything may have changed meanwhile. */
  onReset(): void;
  onError?(err: Error): void;
}

export interface Listener {
  close(): Promise<void>;
}

const MAX_BACKOFF_MS = 2_000;

/**
 * `silenceMs` (ASGD_DB_TIMEOUT_MS; 0: off): a LISTEN connection is quiet by nature, so after that long with
 * nothing heard it sends `SELECT 1`; no answer within as long again means the server is gone without
 * closing the connection (a black hole): it is dropped and connected again, and subscribers re-read.
 */
export async function listenPostgres(url: string, channel: string, handlers: ListenHandlers, silenceMs = 0): Promise<Listener> {
  let client: pg.Client | null = null;
  let closed = false;
  let backoff = 50;
  let timer: NodeJS.Timeout | null = null;

  const connect = async (): Promise<void> => {
    const next = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000, keepAlive: true, application_name: APPLICATION_NAME });
    // An error on an idle client is an event: unheard, it would end the process.
    next.on('error', (err) => {
      handlers.onError?.(err);
      lost(next);
    });
    next.on('end', () => lost(next));
    next.on('notification', (message) => {
      if (message.channel === channel && message.payload !== undefined) handlers.onNotify(message.payload);
    });
    try {
      await next.connect();
      await listenOn(next);
    } catch (err) {
      // A connection that came up but could not LISTEN (the server shutting down meanwhile, a role without
      // the right) is closed, not left open beside the next attempt's.
      void endWithin(next, 2_000);
      throw err;
    }
    if (closed) {
      await endWithin(next, 2_000);
      return;
    }
    client = next;
    backoff = 50;
  };

  const listenOn = async (next: pg.Client): Promise<void> => {
    if (silenceMs > 0) {
      const stream = (next as unknown as { connection: { stream: import('node:net').Socket } }).connection.stream;
      let pinged = false;
      stream.setTimeout(silenceMs);
      stream.on('timeout', () => {
        if (pinged) {
          stream.destroy(new Error(`the LISTEN connection got no answer to a ping within ${silenceMs / 1000} s`));
          return;
        }
        pinged = true;
        next.query('SELECT 1').then(() => (pinged = false), () => {});
      });
    }
    // A LISTEN connection is idle by nature: a server-side idle_session_timeout (PostgreSQL 14+) shorter than
    // the ping period closed it every few seconds, and every reconnect warned. It is turned off for this
    // connection only (the DBA's setting stays for the pool's); a server without the setting has no timeout.
    await next.query('SET idle_session_timeout = 0').catch(() => {});
    await next.query(`LISTEN ${pg.escapeIdentifier(channel)}`);
  };

  const lost = (which: pg.Client) => {
    if (client !== which) return;
    client = null;
    void endWithin(which, 2_000);
    schedule();
  };

  const schedule = () => {
    if (closed || timer) return;
    timer = setTimeout(async () => {
      timer = null;
      try {
        await connect();
        handlers.onReset();
      } catch (err) {
        handlers.onError?.(err as Error);
        backoff = Math.min(MAX_BACKOFF_MS, backoff * 2);
        schedule();
      }
    }, backoff);
    timer.unref();
  };

  try {
    await connect();
  } catch (err) {
    // The database may come later (the pool reports 503s meanwhile): keep trying in the background.
    handlers.onError?.(err as Error);
    schedule();
  }

  return {
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      const current = client;
      client = null;
      if (current) await endWithin(current, 2_000);
    },
  };
}
