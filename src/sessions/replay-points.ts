// Replay points bound what a process replays to take a session over.
//
// The state at a version is the newest snapshot at or below it with the logged steps after it replayed.
// Snapshots are the user's restore points (snapshot_every, default 100 steps, counted by keep_snapshots),
// so a process that takes over a session after its owner crashed may replay up to snapshot_every steps:
// at 1e6 parameters that is 396 MB of logged gradients read back, several times the cost of loading the
// snapshot. A replay point is the state written every `replayPointInterval` steps to the UNLOGGED tables
// replay_points and replay_point_chunks (migration 0009): no WAL, no fsync, so it costs the database a heap
// write and no disk flush on the step's path. PostgreSQL empties unlogged tables after a crash of its own;
// nothing is lost then, since the snapshots and the log still hold every version (reads fall back to them,
// as they do when a point fails its checksum or is deleted while being read). A session keeps its newest
// point (two written at once may both stay until the next); a snapshot written after it supersedes it.
// Writing one does not hold up the session's steps: the point's foreign key takes a KEY SHARE lock on the
// session row, which the steps' FOR NO KEY UPDATE does not wait for. Points are never listed, restored or forked from.
// Until averaging starts (step t0, a million by default) ax is a copy of the params: a point then holds the
// params alone (ax_from_params), half the bytes.
import type { Database, Queryable } from '../db/database.ts';
import type { ReplayPointRow } from '../db/schema.ts';
import * as repo from './repository.ts';
import { stepBytes } from './retention.ts';

export type ReplayPointRecord = ReplayPointRow;

/**
 * Steps between replay points, or null when they are off (`boundBytes` 0): as many steps as log at most
 * `boundBytes` (ASGD_REPLAY_BOUND_BYTES), or four states' worth (8 bytes a parameter each) when that is
 * more, so that a big model is not rewritten every step or two. 1e6 parameters at the 64 MiB default: 16
 * steps; 5e7: 8; 1e3: 16,000 (a small model replays fast).
 */
export function replayPointInterval(s: { numel: number; params: readonly unknown[] }, boundBytes: number): number | null {
  if (boundBytes <= 0) return null;
  return Math.max(2, Math.floor(Math.max(boundBytes, 32 * s.numel) / stepBytes(s)));
}

/** True when the versions (previous, version] cross a multiple of `interval`: one batch in all processes does. */
export const replayPointDue = (previous: number, version: number, interval: number) => Math.floor(version / interval) > Math.floor(previous / interval);

const COLUMNS = `id::float8 AS id, session_id::float8 AS session_id, version::float8 AS version, step::float8 AS step,
  groups, scalars, byte_size::float8 AS byte_size, chunk_count, checksum, ax_from_params, created_at`;

const toReplayPoint = (r: Record<string, unknown>): ReplayPointRecord => ({ ...repo.storedStateOf(r), axFromParams: r.ax_from_params as boolean });

/** pg_advisory_xact_lock(REPLAY_POINT_LOCK, session): the first key keeps these apart from other advisory locks (the snapshot slot's is 0x5a5a). */
const REPLAY_POINT_LOCK = 0x5a5b;

/**
 * Writes a replay point and its chunks in `q`'s transaction, then drops the session's older points (a
 * reader of one of them in a consistent read keeps seeing it); null when one exists at that version.
 */
export async function insertReplayPoint(
  db: Database,
  q: Queryable,
  p: Pick<ReplayPointRecord, 'sessionId' | 'version' | 'step' | 'groups' | 'scalars' | 'checksum' | 'axFromParams'>,
  chunks: readonly Buffer[],
): Promise<ReplayPointRecord | null> {
  const byteSize = chunks.reduce((a, c) => a + c.byteLength, 0);
  const rows = await q.query(
    `INSERT INTO replay_points (session_id, version, step, groups, scalars, byte_size, chunk_count, checksum, ax_from_params)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (session_id, version) DO NOTHING RETURNING ${COLUMNS}`,
    [p.sessionId, p.version, p.step, JSON.stringify(p.groups), JSON.stringify(p.scalars), byteSize, chunks.length, p.checksum, p.axFromParams],
  );
  if (rows.length === 0) return null;
  const point = toReplayPoint(rows[0]);
  await repo.insertChunks(db, q, 'replay_point_chunks (point_id, seq, data)', point.id, chunks);
  // The older points go; this one too when a newer one committed meanwhile (a batch that crossed the next
  // multiple on another process). Under a per-session lock held to the commit, the DELETE a statement of its
  // own: a second writer's sees the first one's point once it committed (without the lock two points written
  // at once both stayed, each transaction blind to the other's: seen in CI's kill -9 test under load).
  await q.query('SELECT pg_advisory_xact_lock($1, ($2::bigint % 2147483647)::int)', [REPLAY_POINT_LOCK, p.sessionId]);
  await q.query('DELETE FROM replay_points WHERE session_id = $1 AND version < (SELECT max(version) FROM replay_points WHERE session_id = $1)', [p.sessionId]);
  return point;
}

/** The session's newest replay point at or below `version`, or null. */
export async function findReplayPointAtOrBelow(q: Queryable, sessionId: number, version: number): Promise<ReplayPointRecord | null> {
  const rows = await q.query(`SELECT ${COLUMNS} FROM replay_points WHERE session_id = $1 AND version <= $2 ORDER BY version DESC LIMIT 1`, [sessionId, version], {
    name: 'replay_point_find',
  });
  return rows.length ? toReplayPoint(rows[0]) : null;
}

/** Reads a replay point's tensor bytes chunk by chunk, in order; returns the chunks read. */
export function readReplayPointChunks(q: Queryable, pointId: number, onChunk: (seq: number, data: Buffer) => void): Promise<number> {
  return repo.readChunks(q, 'SELECT data FROM replay_point_chunks WHERE point_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq', 'replay_point_chunks_read', pointId, onChunk);
}

/** Drops the session's replay points below `version` (a snapshot there supersedes them). */
export async function dropReplayPointsBelow(q: Queryable, sessionId: number, version: number): Promise<void> {
  await q.query('DELETE FROM replay_points WHERE session_id = $1 AND version < $2', [sessionId, version]);
}
