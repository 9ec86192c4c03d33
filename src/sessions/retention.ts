// The byte bound on a session's step log (keep_log_bytes), next to the count bound (keep_snapshots).
//
// The log can only be pruned behind a snapshot: the current state is the newest snapshot plus the log
// after it, and a version between two snapshots is the older one plus the log between them. Snapshots
// stand alone (their chunks are the whole state), so every kept snapshot stays readable and restorable
// whatever log is dropped. The bound holds in two parts:
// - a snapshot is due after at most floor(keep_log_bytes / step bytes) steps (snapshotInterval), so the
//   log after the newest snapshot never outgrows the bound;
// - when a snapshot is written, the log is cut at the oldest snapshot whose log after it fits in the
//   bound minus the room the next interval's steps need (pruneLogToBytes). So the log is at most
//   keep_log_bytes plus the steps committed while a background snapshot is being written.
// Versions whose log was dropped are no longer readable with ?version= (404 VERSION_NOT_AVAILABLE).
import type { Queryable } from '../db/database.ts';
import { rowBytes } from './storage.ts';

/** The settings of a session that size its log. */
export interface LogBound {
  numel: number;
  params: readonly unknown[];
  snapshotEvery: number;
  keepLogBytes: number | null;
}

/**
 * An upper bound on the bytes one step adds to the log: every gradient (4 bytes an element), the indices
 * of the parameters present (jsonb, a few bytes each) and the row's fixed columns and header.
 */
export function stepBytes(s: Pick<LogBound, 'numel' | 'params'>): number {
  return 4 * s.numel + 12 * s.params.length + 96;
}

/** Steps between snapshots: snapshot_every, or fewer when that many would outgrow keep_log_bytes. */
export function snapshotInterval(s: LogBound): number {
  if (s.keepLogBytes === null) return s.snapshotEvery;
  return Math.max(1, Math.min(s.snapshotEvery, Math.floor(s.keepLogBytes / stepBytes(s))));
}

/**
 * Drops the log behind the oldest snapshot after which the log fits in keep_log_bytes less one interval of
 * steps (never past the newest snapshot: the current state needs the log after it). Reads the session's
 * settings itself, so a PATCH takes effect at the next snapshot. Returns the log rows dropped.
 */
export async function pruneLogToBytes(q: Queryable, sessionId: number): Promise<number> {
  const rows = await q.query<{ numel: number; nparams: number; snapshot_every: number; keep_log_bytes: number | null }>(
    `SELECT numel::float8 AS numel, jsonb_array_length(params) AS nparams, snapshot_every, keep_log_bytes::float8 AS keep_log_bytes
     FROM sessions WHERE id = $1`,
    [sessionId],
  );
  if (rows.length === 0 || rows[0].keep_log_bytes === null) return 0;
  const r = rows[0];
  const bound: LogBound = { numel: r.numel, params: new Array(r.nparams), snapshotEvery: r.snapshot_every, keepLogBytes: r.keep_log_bytes };
  const budget = bound.keepLogBytes! - snapshotInterval(bound) * stepBytes(bound);
  const logRow = (await rowBytes(q, 'step_log', 'l'))!;
  // One pass over the session's snapshots and log together, newest first: at each snapshot the running sum
  // holds the bytes of the log after it (a log row at a snapshot's version sorts after that snapshot). Summing
  // the log after each snapshot on its own read the log once per kept snapshot: 2 ms a snapshot at the
  // defaults (10 kept, a snapshot every 100 steps), and seconds with keep_snapshots in the thousands.
  const deleted = await q.query(
    `WITH marks AS (
       SELECT version, 0 AS kind, 0::float8 AS bytes FROM snapshots WHERE session_id = $1
       UNION ALL
       SELECT l.version, 1, ${logRow} FROM step_log l WHERE l.session_id = $1
     ), after AS (
       SELECT version, kind, sum(bytes) OVER (ORDER BY version DESC, kind ROWS UNBOUNDED PRECEDING) AS bytes FROM marks
     ), cut AS (
       SELECT coalesce(
         (SELECT min(version) FROM after WHERE kind = 0 AND bytes <= $2),
         (SELECT max(version) FROM snapshots WHERE session_id = $1)) AS version
     )
     DELETE FROM step_log WHERE session_id = $1 AND version <= (SELECT version FROM cut) RETURNING version`,
    [sessionId, budget],
  );
  return deleted.length;
}
