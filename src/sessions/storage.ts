// What a session stores, in bytes, as PostgreSQL counts them: the sum over the session's rows of
// pg_column_size of each column (for a TOASTed value that is its stored size, read from the TOAST
// pointer without fetching the value) plus a 24-byte tuple header a row. Counting column by column
// keeps the 4 MB gradients of a 1e6-parameter log unread: pg_column_size(row.*) would detoast them.
// Per-step history (issue 11's step_history) is counted when that table exists.
import type { Queryable } from '../db/database.ts';

/** A heap tuple's header (23 bytes, aligned), counted once a row. */
const ROW_HEADER = 24;

/** The tables that hold rows of a session, besides the session row itself (step_history when it exists). */
const TABLES = ['step_log', 'snapshots', 'snapshot_chunks', 'replay_points', 'replay_point_chunks', 'idempotency_keys', 'step_history', 'round_contributions', 'initial_groups', 'group_changes', 'replaced_versions'] as const;
type Table = (typeof TABLES)[number];

/**
 * Each table's columns, read from the catalogue once a process: a column a later migration adds (a
 * gradient's dtype, a step's hyperparameters) is counted without anyone editing this file.
 */
let columns: Promise<Map<Table, string[]>> | null = null;

function columnsOf(q: Queryable): Promise<Map<Table, string[]>> {
  columns ??= q.query<{ relname: Table; columns: string[] }>(
    `SELECT c.relname::text AS relname, array_agg(a.attname::text ORDER BY a.attnum) AS columns
     FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
     WHERE c.relname = ANY($1::text[]) AND c.relkind = 'r' AND pg_table_is_visible(c.oid) AND a.attnum > 0 AND NOT a.attisdropped
     GROUP BY c.relname`,
    [[...TABLES]],
  ).then((rows) => {
    const found = new Map(rows.map((r) => [r.relname, r.columns]));
    // Read before the migrations ran (a /metrics scrape of a server started with ASGD_MIGRATE=false): kept,
    // it would leave every later storage query of the process without the tables' columns.
    if (!found.has('step_log')) columns = null;
    return found;
  });
  columns.catch(() => { columns = null; }); // a failed read is retried next time
  return columns;
}

const quote = (name: string) => `"${name.replace(/"/g, '""')}"`;

/**
 * SQL for one row's bytes of `table` under `alias`: the header plus pg_column_size of every column;
 * null when the table does not exist (step_history before issue 11's migration).
 */
export async function rowBytes(q: Queryable, table: Table, alias: string): Promise<string | null> {
  const list = (await columnsOf(q)).get(table);
  if (!list) return null;
  return `(${ROW_HEADER} + ${list.map((c) => `coalesce(pg_column_size(${alias}.${quote(c)}), 0)`).join(' + ')})::float8`;
}

/** The session row is small (names, shapes, hyperparameters): its whole-row size includes its header. */
const SESSION_ROW_BYTES = (alias: string) => `pg_column_size(${alias}.*)::float8`;

export interface SessionStorage {
  /** The step log: gradients since the oldest snapshot the log is kept behind. */
  log_bytes: number;
  log_steps: number;
  /** Snapshot rows and their tensor chunks. */
  snapshot_bytes: number;
  snapshots: number;
  /** The replay point (replay-points.ts) with its chunks: one a session, rarely two for a moment. */
  replay_point_bytes: number;
  /** The session row, its initial groups and later changes of them, Idempotency-Key answers, the per-step history (when that table exists) and an open round's contributions. */
  other_bytes: number;
  total_bytes: number;
}

/**
 * The per-step history's bytes of each session, counted once a process: rows are only appended, in
 * version order (each under the session's row lock, committed with the version), and kept for the
 * session's life, so the bytes through version V stay right and a later count reads only the rows after
 * V. Summing a 1,000,000-step history took ~1 s of PostgreSQL a read, and the dashboard reads the
 * session (its storage included) every second while steps stream in.
 */
const HISTORY_CACHE_SESSIONS = 10_000;
const counted = new WeakMap<Queryable, Map<number, { through: number; bytes: number }>>();

async function historyBytesOf(q: Queryable, rowSql: string, ids: number[]): Promise<Map<number, number>> {
  if (ids.length === 0) return new Map();
  // Per database (a test process holds several, whose session ids overlap).
  let historyCounted = counted.get(q);
  if (!historyCounted) counted.set(q, historyCounted = new Map());
  const start = ids.map((id) => historyCounted.get(id));
  const through = start.map((known) => known?.through ?? 0);
  const rows = await q.query<{ id: number; bytes: number; last: number | null }>(
    // A lateral subquery a session: each reads its rows after `through` by the primary key (a join was
    // planned as a scan of the whole history).
    `SELECT t.id::float8 AS id, x.bytes, x.last
     FROM unnest($1::bigint[], $2::bigint[]) AS t(id, through)
     CROSS JOIN LATERAL (
       SELECT coalesce(sum(${rowSql}), 0)::float8 AS bytes, max(h.version)::float8 AS last
       FROM step_history h WHERE h.session_id = t.id AND h.version > t.through) x`,
    [ids, through],
  );
  const out = new Map<number, number>();
  const index = new Map(ids.map((id, i) => [id, i]));
  rows.forEach((r) => {
    const known = start[index.get(r.id)!];
    const entry = { through: r.last ?? known?.through ?? 0, bytes: (known?.bytes ?? 0) + r.bytes };
    // Another count of the same session may have finished first: the one that read further wins.
    const now = historyCounted.get(r.id);
    if (!now || now.through <= entry.through) {
      historyCounted.delete(r.id); // re-inserted: the Map's order is then least recently used first
      historyCounted.set(r.id, entry);
      if (historyCounted.size > HISTORY_CACHE_SESSIONS) historyCounted.delete(historyCounted.keys().next().value!);
    }
    out.set(r.id, entry.bytes);
  });
  return out;
}

/** The stored bytes of the sessions `where` selects. */
async function storageQuery(q: Queryable, where: string, params: unknown[], limit: string): Promise<(SessionStorage & { id: number; name: string })[]> {
  const [log, snapshot, chunk, point, pointChunk, idempotency, history, contributions, initial, changes, replaced] = await Promise.all([
    rowBytes(q, 'step_log', 'l'), rowBytes(q, 'snapshots', 'p'), rowBytes(q, 'snapshot_chunks', 'c'), rowBytes(q, 'replay_points', 'rp'), rowBytes(q, 'replay_point_chunks', 'rc'), rowBytes(q, 'idempotency_keys', 'k'), rowBytes(q, 'step_history', 'h'),
    rowBytes(q, 'round_contributions', 'r'), rowBytes(q, 'initial_groups', 'g'), rowBytes(q, 'group_changes', 'gc'), rowBytes(q, 'replaced_versions', 'rv'),
  ]);
  const roundTerm = contributions ? `coalesce((SELECT sum(${contributions}) FROM round_contributions r WHERE r.session_id = s.id), 0)` : '0';
  const initialTerm = initial ? `coalesce((SELECT ${initial} FROM initial_groups g WHERE g.session_id = s.id), 0)` : '0';
  const pointTerm = point && pointChunk
    ? `coalesce((SELECT sum(${point} + coalesce((SELECT sum(${pointChunk}) FROM replay_point_chunks rc WHERE rc.point_id = rp.id), 0)) FROM replay_points rp WHERE rp.session_id = s.id), 0)`
    : '0';
  const changesTerm = changes ? `coalesce((SELECT sum(${changes}) FROM group_changes gc WHERE gc.session_id = s.id), 0)` : '0';
  const replacedTerm = replaced ? `coalesce((SELECT sum(${replaced}) FROM replaced_versions rv WHERE rv.session_id = s.id), 0)` : '0';
  const rows = await q.query<Record<string, number | string>>(
    `SELECT s.id::float8 AS id, s.name, lg.bytes AS log_bytes, lg.steps AS log_steps, sn.bytes AS snapshot_bytes, sn.n AS snapshots, ${pointTerm} AS replay_point_bytes,
       ${SESSION_ROW_BYTES('s')} + ik.bytes + ${roundTerm} + ${initialTerm} + ${changesTerm} + ${replacedTerm} AS other_bytes
     FROM sessions s
     CROSS JOIN LATERAL (SELECT coalesce(sum(${log}), 0) AS bytes, count(*)::float8 AS steps FROM step_log l WHERE l.session_id = s.id) lg
     CROSS JOIN LATERAL (
       SELECT coalesce(sum(${snapshot} + coalesce((SELECT sum(${chunk}) FROM snapshot_chunks c WHERE c.snapshot_id = p.id), 0)), 0) AS bytes,
              count(*)::float8 AS n
       FROM snapshots p WHERE p.session_id = s.id) sn
     CROSS JOIN LATERAL (SELECT coalesce(sum(${idempotency}), 0) AS bytes FROM idempotency_keys k WHERE k.session_id = s.id) ik
     ${where} ${limit}`,
    params,
  );
  const historyBytes = history ? await historyBytesOf(q, history, rows.map((r) => Number(r.id))) : new Map<number, number>();
  return rows.map((r) => {
    const out = {
      id: Number(r.id), name: String(r.name),
      log_bytes: Number(r.log_bytes), log_steps: Number(r.log_steps),
      snapshot_bytes: Number(r.snapshot_bytes), snapshots: Number(r.snapshots), replay_point_bytes: Number(r.replay_point_bytes),
      other_bytes: Number(r.other_bytes) + (historyBytes.get(Number(r.id)) ?? 0), total_bytes: 0,
    };
    out.total_bytes = out.log_bytes + out.snapshot_bytes + out.replay_point_bytes + out.other_bytes;
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
