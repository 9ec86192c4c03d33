// What a session stores, in bytes, as PostgreSQL counts them: the sum over the session's rows of
// pg_column_size of each column (for a TOASTed value that is its stored size, read from the TOAST
// pointer without fetching the value) plus a 24-byte tuple header a row. Counting column by column
// keeps the 4 MB gradients of a 1e6-parameter log unread: pg_column_size(row.*) would detoast them.
import type { Queryable } from '../db/database.ts';

/** A heap tuple's header (23 bytes, aligned), counted once a row. */
const ROW_HEADER = 24;

const rowBytes = (alias: string, columns: string[]) =>
  `(${ROW_HEADER} + ${columns.map((c) => `coalesce(pg_column_size(${alias}.${c}), 0)`).join(' + ')})::float8`;

/** One step_log row's bytes (retention.ts cuts the log by the same figure). */
export const LOG_ROW_BYTES = (alias: string) => rowBytes(alias, ['session_id', 'version', 'present', 'grads', 'base_version', 'created_at']);
const SNAPSHOT_ROW_BYTES = (alias: string) =>
  rowBytes(alias, ['id', 'session_id', 'version', 'step', 'reason', 'pinned', 'groups', 'scalars', 'byte_size', 'chunk_count', 'checksum', 'created_at']);
const CHUNK_ROW_BYTES = (alias: string) => rowBytes(alias, ['snapshot_id', 'seq', 'data']);
const IDEMPOTENCY_ROW_BYTES = (alias: string) => rowBytes(alias, ['session_id', 'key', 'request_hash', 'response', 'created_at']);
/** The session row is small (names, shapes, hyperparameters): its whole-row size includes its header. */
const SESSION_ROW_BYTES = (alias: string) => `pg_column_size(${alias}.*)::float8`;

export interface SessionStorage {
  /** The step log: gradients since the oldest snapshot the log is kept behind. */
  log_bytes: number;
  log_steps: number;
  /** Snapshot rows and their tensor chunks. */
  snapshot_bytes: number;
  snapshots: number;
  /** The session row, Idempotency-Key answers and the per-step history (when that table exists). */
  other_bytes: number;
  total_bytes: number;
}

/**
 * Per-step history rows (issue 11's step_history) are counted when the table exists: whole rows, which
 * are small (metrics and hyperparameters), so pg_column_size(row.*) costs nothing extra there.
 */
async function historyTerm(q: Queryable, ids: string): Promise<string> {
  const rows = await q.query<{ present: boolean }>("SELECT to_regclass('step_history') IS NOT NULL AS present");
  return rows[0]?.present
    ? `coalesce((SELECT sum((${ROW_HEADER} + pg_column_size(h.*))::float8) FROM step_history h WHERE h.session_id = ${ids}), 0)`
    : '0';
}

/** The stored bytes of the sessions `where` selects. */
async function storageQuery(q: Queryable, where: string, params: unknown[], limit: string): Promise<(SessionStorage & { id: number; name: string })[]> {
  const history = await historyTerm(q, 's.id');
  const rows = await q.query<Record<string, number | string>>(
    `SELECT s.id::float8 AS id, s.name, lg.bytes AS log_bytes, lg.steps AS log_steps, sn.bytes AS snapshot_bytes, sn.n AS snapshots,
       ${SESSION_ROW_BYTES('s')} + ik.bytes + ${history} AS other_bytes
     FROM sessions s
     CROSS JOIN LATERAL (SELECT coalesce(sum(${LOG_ROW_BYTES('l')}), 0) AS bytes, count(*)::float8 AS steps FROM step_log l WHERE l.session_id = s.id) lg
     CROSS JOIN LATERAL (
       SELECT coalesce(sum(${SNAPSHOT_ROW_BYTES('p')} + coalesce((SELECT sum(${CHUNK_ROW_BYTES('c')}) FROM snapshot_chunks c WHERE c.snapshot_id = p.id), 0)), 0) AS bytes,
              count(*)::float8 AS n
       FROM snapshots p WHERE p.session_id = s.id) sn
     CROSS JOIN LATERAL (SELECT coalesce(sum(${IDEMPOTENCY_ROW_BYTES('k')}), 0) AS bytes FROM idempotency_keys k WHERE k.session_id = s.id) ik
     ${where} ${limit}`,
    params,
  );
  return rows.map((r) => {
    const out = {
      id: Number(r.id), name: String(r.name),
      log_bytes: Number(r.log_bytes), log_steps: Number(r.log_steps),
      snapshot_bytes: Number(r.snapshot_bytes), snapshots: Number(r.snapshots),
      other_bytes: Number(r.other_bytes), total_bytes: 0,
    };
    out.total_bytes = out.log_bytes + out.snapshot_bytes + out.other_bytes;
    return out;
  });
}

/** One session's stored bytes; null when it does not exist. */
export async function sessionStorage(q: Queryable, sessionId: number): Promise<SessionStorage | null> {
  const [row] = await storageQuery(q, 'WHERE s.id = $1', [sessionId], '');
  if (!row) return null;
  const { id: _id, name: _name, ...storage } = row;
  return storage;
}

/** Several sessions' stored bytes, by session id (absent ids are left out). */
export async function storageOfSessions(q: Queryable, sessionIds: number[]): Promise<Map<number, SessionStorage>> {
  const rows = sessionIds.length ? await storageQuery(q, 'WHERE s.id = ANY($1::bigint[])', [sessionIds], '') : [];
  return new Map(rows.map(({ id, name: _name, ...storage }) => [id, storage]));
}

/** Every session's stored bytes (for /metrics), largest first. */
export async function allSessionStorage(q: Queryable): Promise<(SessionStorage & { name: string })[]> {
  const rows = await storageQuery(q, '', [], '');
  return rows.sort((a, b) => b.total_bytes - a.total_bytes);
}
