// Waiting for a PostgreSQL that is not there yet (starting, restarting): what start-up (src/plugins/db.ts)
// and the `migrate` command (src/cli.ts) do before they give up.
import { socketHostOf } from '../config.ts';
import { classifyDbError } from './errors.ts';

/** host:port/database of a connection string, for log lines (never its password). */
export function databaseTarget(url: string | null): string | null {
  if (!url) return null;
  const socket = socketHostOf(url);
  if (socket !== null) return `${socket}${/^[a-z]+:\/\/[^/?#]*(\/[^?#]*)?/i.exec(url)?.[1] ?? ''}`;
  try {
    const u = new URL(url);
    return `${u.hostname}:${u.port || 5432}${u.pathname}`;
  } catch {
    return null;
  }
}

/**
 * Runs `attempt` until it stops failing for want of a connection (a refused or dropped one, a database
 * starting up or out of slots: classifyDbError's 'retryable'), for at most `waitMs`; other failures, and the
 * last one after the wait, are thrown. Waits 0.5 s, then up to 5 s, between tries; `onWait` every 5 s of it.
 */
export async function untilConnected<T>(attempt: () => Promise<T>, opts: { waitMs: number; onWait: (err: unknown, waitedMs: number) => void }): Promise<T> {
  const started = Date.now();
  let said = -Infinity;
  for (let k = 1; ; k++) {
    try {
      return await attempt();
    } catch (err) {
      const waited = Date.now() - started;
      if (classifyDbError(err) !== 'retryable' || waited >= opts.waitMs) throw err;
      if (waited - said >= 5_000) {
        opts.onWait(err, waited);
        said = waited;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(opts.waitMs - waited, Math.min(5_000, 500 * k))));
    }
  }
}
