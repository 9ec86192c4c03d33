// SQL of the session domain. Hot-path statements are prepared (named) on PostgreSQL and send bytea
// parameters in binary; PGlite gets base64 parameters (see Database.byteaParam).
import { PGLITE_COPY_FILE, type Database, type Queryable } from '../db/database.ts';
import type { Aggregation, GroupSpec, HyperDelta, ParamSpec, RoundRecord, ScalarStateRow, SessionRow, SnapshotRow } from '../db/schema.ts';
import type { GradDtype } from './gradients.ts';
import { pruneLogToBytes } from './retention.ts';
import { nextTurn } from './slices.ts';
import { groupHyperparameters } from './step-input.ts';
import { METRIC_BYTES_PER_PAGE } from './series.ts';

export const CHUNK_BYTES = 8 * 1024 * 1024;

/** Row types come from the drizzle schema; the raw SQL here reads its columns under the same names (aliases). */
/**
 * A session's row. `stamp` identifies the commit that last wrote it: the microseconds of its transaction's
 * now(), which the step log's rows (created_at) and a change's snapshot written in the same transaction
 * carry as well. A version number alone does not identify a state: after the database is restored from a
 * backup, or fails over to a standby that had not received the last commits, the session's version goes
 * back and new steps reach the same numbers with other gradients. A process's copy is used only where
 * its stamp shows it is of the database's history (ofHistory).
 */
export type SessionRecord = SessionRow & { stamp: string };

/** A timestamptz column as microseconds since the epoch (exact: extract gives numeric), as text: a commit's stamp. */
const stampOf = (column: string) => `(extract(epoch FROM ${column}) * 1000000)::int8::text`;
export type SnapshotRecord = SnapshotRow;

export interface StepLogEntry {
  version: number;
  present: number[];
  grads: Buffer;
  /** How `grads` holds the values: float32 (null in the log), or the float16/bfloat16 bits received. */
  gradDtype: GradDtype;
  /** The hyperparameters the step set before it ran (applied on replay), or null. */
  hyper: HyperDelta | null;
}

/** A change of the groups' hyperparameters that is not a step (series.ts hyperChanges reads them with the steps'). */
export async function insertGroupChange(q: Queryable, sessionId: number, version: number, step: number, reason: string, hyper: Record<string, unknown>[]): Promise<void> {
  await q.query('INSERT INTO group_changes (session_id, version, step, reason, hyper) VALUES ($1, $2, $3, $4, $5::jsonb)', [sessionId, version, step, reason, JSON.stringify(hyper)]);
}

/** The step_log.grad_dtype value: NULL for float32 (every row before the column existed). */
const gradDtypeColumn = (dtype: GradDtype) => (dtype === 'float32' ? null : dtype);

/** What a step writes besides its gradient: hyperparameters it sets, metrics for step_history. */
export interface StepExtras {
  hyper: HyperDelta | null;
  metrics: Record<string, number> | null;
}

/** The channel every version change is announced on, at commit: payload `<session name>:<version>:<step>`. */
export const VERSION_CHANNEL = 'asgd_versions';

/**
 * Marks `name` as listened to for `seconds` from now (never shortening a lease another process holds): until
 * then its steps NOTIFY asgd_versions (appendSteps). The UPDATE takes the session's row lock, so a step batch
 * either committed before it (the waiter's next read sees that version) or locks the row after it and sees
 * the lease. False when the session does not exist.
 */
export async function leaseListening(q: Queryable, name: string, seconds: number): Promise<boolean> {
  const rows = await q.query(
    `UPDATE sessions SET listened_until = greatest(listened_until, now() + make_interval(secs => $2)) WHERE name = $1 RETURNING id`,
    [name, seconds],
    { name: 'session_listen_lease' },
  );
  return rows.length > 0;
}

/**
 * `groups` (a jsonb list of GroupSpec) with a step's HyperDelta (the jsonb parameter `delta`) merged in:
 * src/sessions/step-input.ts applyHyperDelta in SQL, so that the single-statement step keeps the
 * session row's groups right without reading them first. Given keys replace the group's and leave
 * int_keys unless the delta lists them there; int_keys keep their order (a key that stays an int its
 * place, a new one at the end), so that a value given again as it was changes nothing.
 */
const mergeGroupsSql = (groups: string, delta: string) => `(
  SELECT jsonb_agg(CASE WHEN jsonb_typeof(d.value) = 'object' THEN
      (g.value || (d.value - 'int_keys')) || jsonb_build_object('int_keys',
        coalesce((SELECT jsonb_agg(k.value ORDER BY k.ordinality) FROM jsonb_array_elements(coalesce(g.value->'int_keys', '[]'::jsonb)) WITH ORDINALITY k
                  WHERE NOT (d.value ? (k.value #>> '{}')) OR coalesce(d.value->'int_keys', '[]'::jsonb) @> jsonb_build_array(k.value)), '[]'::jsonb)
        || coalesce((SELECT jsonb_agg(n.value ORDER BY n.ordinality) FROM jsonb_array_elements(coalesce(d.value->'int_keys', '[]'::jsonb)) WITH ORDINALITY n
                  WHERE NOT coalesce(g.value->'int_keys', '[]'::jsonb) @> jsonb_build_array(n.value)), '[]'::jsonb))
    ELSE g.value END ORDER BY g.ordinality)
  FROM jsonb_array_elements(${groups}) WITH ORDINALITY g
  LEFT JOIN jsonb_array_elements(${delta}) WITH ORDINALITY d ON d.ordinality = g.ordinality)`;

/** step_history's `hyper`: each group's hyperparameters (from a jsonb list of GroupSpec). */
const groupHyperSql = (groups: string) => `(
  SELECT jsonb_agg(jsonb_build_object('lr', g->'lr', 'lambd', g->'lambd', 'alpha', g->'alpha', 't0', g->'t0',
    'weight_decay', g->'weight_decay', 'maximize', g->'maximize') ORDER BY i)
  FROM jsonb_array_elements(${groups}) WITH ORDINALITY AS e(g, i))`;

/**
 * The groups' hyperparameters as JSON, as groupHyperSql builds them (a key a group lacks is null), for
 * comparing a copy's groups with the row's: jsonb compares numbers by value (15 equals 15.0).
 */
const hyperOf = (groups: readonly GroupSpec[]) => JSON.stringify(groupHyperparameters(groups));

/** The session columns as SessionRecord reads them, qualified by `t` ("sessions.") where a join needs it. */
const sessionColumns = (t = '') => `${t}id::float8 AS id, ${t}name, ${t}params, ${t}groups, ${t}numel::float8 AS numel, ${t}version::float8 AS version,
  ${t}step::float8 AS step, ${t}snapshot_every, ${t}keep_snapshots, ${t}max_staleness, ${t}keep_log_bytes::float8 AS keep_log_bytes, ${t}expire_after_idle_s,
  ${t}aggregation, ${t}created_at, ${t}updated_at, ${stampOf(`${t}updated_at`)} AS stamp`;
const SESSION_COLUMNS = sessionColumns();

function toSession(r: Record<string, unknown>): SessionRecord {
  return {
    id: r.id as number,
    name: r.name as string,
    params: r.params as ParamSpec[],
    groups: r.groups as GroupSpec[],
    numel: r.numel as number,
    version: r.version as number,
    step: r.step as number,
    snapshotEvery: r.snapshot_every as number,
    keepSnapshots: r.keep_snapshots as number,
    maxStaleness: (r.max_staleness as number | null) ?? null,
    keepLogBytes: (r.keep_log_bytes as number | null) ?? null,
    expireAfterIdleS: (r.expire_after_idle_s as number | null) ?? null,
    aggregation: (r.aggregation as Aggregation | null) ?? null,
    createdAt: new Date(r.created_at as string),
    updatedAt: new Date(r.updated_at as string),
    stamp: r.stamp as string,
  };
}

const SNAPSHOT_COLUMNS = `id::float8 AS id, session_id::float8 AS session_id, version::float8 AS version, step::float8 AS step, reason,
  pinned, groups, scalars, byte_size::float8 AS byte_size, chunk_count, checksum, created_at`;

/** The columns a snapshot and a replay point (replay-points.ts) share, from a row read under their names. */
export function storedStateOf(r: Record<string, unknown>): Omit<SnapshotRecord, 'reason' | 'pinned'> {
  return {
    id: r.id as number,
    sessionId: r.session_id as number,
    version: r.version as number,
    step: r.step as number,
    groups: r.groups as GroupSpec[],
    scalars: r.scalars as ScalarStateRow[],
    byteSize: r.byte_size as number,
    chunkCount: r.chunk_count as number,
    checksum: r.checksum as string,
    createdAt: new Date(r.created_at as string),
  };
}

const toSnapshot = (r: Record<string, unknown>): SnapshotRecord => ({ ...storedStateOf(r), reason: r.reason as string, pinned: r.pinned as boolean });

export async function insertSession(
  q: Queryable,
  s: Pick<SessionRecord, 'name' | 'params' | 'groups' | 'numel' | 'step' | 'snapshotEvery' | 'keepSnapshots' | 'maxStaleness'>
    & Partial<Pick<SessionRecord, 'keepLogBytes' | 'expireAfterIdleS' | 'aggregation'>>,
): Promise<SessionRecord | null> {
  // The groups it starts with are kept beside the row (initial_groups: the dashboard's charts begin there),
  // not in it: every step locks and reads the session row.
  const rows = await q.query(
    `WITH inserted AS (
       INSERT INTO sessions (name, params, groups, numel, version, step, snapshot_every, keep_snapshots, max_staleness, keep_log_bytes, expire_after_idle_s, aggregation)
       VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (name) DO NOTHING RETURNING *
     ), initial AS (
       INSERT INTO initial_groups (session_id, groups) SELECT id, groups FROM inserted
     )
     SELECT ${SESSION_COLUMNS} FROM inserted`,
    [s.name, JSON.stringify(s.params), JSON.stringify(s.groups), s.numel, s.step, s.snapshotEvery, s.keepSnapshots, s.maxStaleness,
      s.keepLogBytes ?? null, s.expireAfterIdleS ?? null, s.aggregation ? JSON.stringify(s.aggregation) : null],
  );
  if (!rows.length) return null;
  // Under the name of a deleted session (retired_names) its versions go on, and the gradients of that
  // session's versions are of replaced state (history_from): never taken for the new one's. Read in a
  // statement of its own, after the insert: a DELETE of the same name that committed while the insert waited
  // on the name's unique index wrote its row after the insert's snapshot (READ COMMITTED: this one's is new;
  // found by a read-through: read in the insert, the new session started at version 1 in that instant).
  const retired = await q.query(
    `UPDATE sessions SET version = r.last_version + 1, history_from = r.last_version + 1
       FROM (SELECT last_version FROM retired_names WHERE name = $2) r
       WHERE sessions.id = $1 AND sessions.version <= r.last_version
       RETURNING ${sessionColumns('sessions.')}`,
    [rows[0].id, s.name],
  );
  return toSession(retired.length ? retired[0] : rows[0]);
}

export async function findSession(q: Queryable, name: string, lock = false): Promise<SessionRecord | null> {
  const rows = await q.query(
    `SELECT ${SESSION_COLUMNS} FROM sessions WHERE name = $1${lock ? ' FOR NO KEY UPDATE' : ''}`,
    [name],
    { name: lock ? 'session_lock' : 'session_find' },
  );
  return rows.length ? toSession(rows[0]) : null;
}

/**
 * `only`: restrict to these names (a token limited to a list of sessions sees only those). `search`: names
 * that contain it, ignoring case (strpos, not LIKE: the text is matched literally).
 */
export async function listSessions(
  q: Queryable, after: string | null, limit: number, only: readonly string[] | null = null, search: string | null = null,
): Promise<SessionRecord[]> {
  const rows = await q.query(
    `SELECT ${SESSION_COLUMNS} FROM sessions WHERE ($1::text IS NULL OR name > $1) AND ($3::text[] IS NULL OR name = ANY($3::text[]))
       AND ($4::text IS NULL OR strpos(lower(name), lower($4::text)) > 0) ORDER BY name LIMIT $2`,
    [after, limit, only, search],
  );
  return rows.map(toSession);
}

/** Remembers the last versions of deleted sessions' names (retired_names), in a DELETE … RETURNING name, version's statement. */
export const RETIRE_NAMES_SQL = `INSERT INTO retired_names (name, last_version) SELECT name, version FROM gone
  ON CONFLICT (name) DO UPDATE SET last_version = greatest(retired_names.last_version, excluded.last_version), retired_at = now()`;

/** How long a deleted session's name keeps its last version (retired_names): 30 days. */
export const RETIRED_NAME_DAYS = 30;

export async function deleteSession(q: Queryable, name: string): Promise<boolean> {
  const rows = await q.query(
    `WITH gone AS (DELETE FROM sessions WHERE name = $1 RETURNING id, name, version), retired AS (${RETIRE_NAMES_SQL}) SELECT id FROM gone`,
    [name],
  );
  return rows.length > 0;
}

export async function updateSessionSettings(
  q: Queryable,
  id: number,
  s: Pick<SessionRecord, 'snapshotEvery' | 'keepSnapshots' | 'maxStaleness' | 'keepLogBytes' | 'expireAfterIdleS' | 'aggregation'>,
): Promise<SessionRecord> {
  const rows = await q.query(
    `UPDATE sessions SET snapshot_every = $2, keep_snapshots = $3, max_staleness = $4, keep_log_bytes = $5, expire_after_idle_s = $6, aggregation = $7, updated_at = now()
     WHERE id = $1 RETURNING ${SESSION_COLUMNS}`,
    [id, s.snapshotEvery, s.keepSnapshots, s.maxStaleness, s.keepLogBytes, s.expireAfterIdleS, s.aggregation ? JSON.stringify(s.aggregation) : null],
  );
  return toSession(rows[0]);
}

/**
 * Bumps the version (and the step count when `stepped`), optionally replacing the groups; returns the
 * session's new stamp. `replaced`: the new version replaces the state (a restore, a state_dict or checkpoint
 * load): gradients computed before it are refused from now on (sessions.history_from).
 */
export async function advanceSession(q: Queryable, id: number, version: number, step: number, groups?: GroupSpec[], replaced = false): Promise<string> {
  const history = replaced ? ', history_from = $2' : '';
  const rows = groups
    ? await q.query<{ stamp: string }>(
        `UPDATE sessions SET version = $2, step = $3, groups = $4, updated_at = now()${history} WHERE id = $1 RETURNING ${stampOf('updated_at')} AS stamp`,
        [id, version, step, JSON.stringify(groups)],
      )
    : await q.query<{ stamp: string }>(
        `UPDATE sessions SET version = $2, step = $3, updated_at = now()${history} WHERE id = $1 RETURNING ${stampOf('updated_at')} AS stamp`,
        [id, version, step],
        // Named (prepared once a connection) for the rounds' steps, which never replace the state.
        replaced ? undefined : { name: 'session_advance' },
      );
  return rows[0].stamp;
}

/**
 * Keeps session `sessionId` from being deleted until the transaction ends (FOR KEY SHARE: steps, which take
 * FOR NO KEY UPDATE, go on): false when it is gone already. Rows that reference it are then safe to insert.
 */
export async function holdSession(q: Queryable, sessionId: number): Promise<boolean> {
  const rows = await q.query('SELECT 1 FROM sessions WHERE id = $1 FOR KEY SHARE', [sessionId], { name: 'session_hold' });
  return rows.length > 0;
}

/**
 * Whether a copy of session `sessionId` at `version` stamped `stamp` is of the database's history: the
 * session is at that version with that stamp, or the step logged at that version, or the snapshot a change
 * wrote there in its own transaction, carries it. False after a restore or failover took the session back
 * and it reached the version again with other commits (or when nothing at that version is kept to tell).
 */
export async function ofHistory(q: Queryable, sessionId: number, version: number, stamps: readonly string[]): Promise<boolean> {
  if (stamps.length === 0) return false;
  const rows = await q.query<{ ok: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND version = $2 AND ${stampOf('updated_at')} = ANY($3::text[]))
       OR EXISTS (SELECT 1 FROM step_log WHERE session_id = $1 AND version = $2 AND ${stampOf('created_at')} = ANY($3::text[]))
       OR EXISTS (SELECT 1 FROM snapshots WHERE session_id = $1 AND version = $2 AND ${stampOf('created_at')} = ANY($3::text[])) AS ok`,
    [sessionId, version, stamps],
    { name: 'session_of_history' },
  );
  return rows[0]?.ok === true;
}

/** One step's row of the training series (kept for the session's lifetime). */
export async function insertHistory(
  q: Queryable,
  row: {
    sessionId: number; version: number; step: number; staleness: number; metrics: Record<string, number> | null; hyper: Record<string, unknown>[] | null;
    /** A round's step (rounds.ts): its size and how it closed. */
    round?: RoundRecord | null;
  },
): Promise<void> {
  await q.query(
    'INSERT INTO step_history (session_id, version, step, staleness, metrics, hyper, round) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb)',
    [row.sessionId, row.version, row.step, row.staleness, row.metrics === null ? null : JSON.stringify(row.metrics), row.hyper === null ? null : JSON.stringify(row.hyper),
      row.round ? JSON.stringify(row.round) : null],
    { name: 'step_history_insert' },
  );
}

/** Announces a new version to every process's listener (delivered when the transaction commits). */
export async function notifyVersion(q: Queryable, name: string, version: number, step: number): Promise<void> {
  await q.query('SELECT pg_notify($1, $2)', [VERSION_CHANNEL, `${name}:${version}:${step}`], { name: 'version_notify' });
}

export interface HistoryPoint {
  version: number;
  step: number;
  staleness: number;
  createdAt: Date;
  metrics: Record<string, number> | null;
  hyper: Record<string, unknown>[] | null;
}

const toHistory = (r: Record<string, unknown>): HistoryPoint => ({
  version: r.version as number,
  step: r.step as number,
  staleness: r.staleness as number,
  createdAt: new Date(r.created_at as string),
  metrics: (r.metrics as Record<string, number> | null) ?? null,
  hyper: (r.hyper as Record<string, unknown>[] | null) ?? null,
});

/**
 * The training series after `afterVersion`, oldest first, at most `limit` points, of which at most
 * `withHyper` are of steps that set hyperparameters (each lists every group's values), and no more after
 * METRIC_BYTES_PER_PAGE bytes of metrics.
 */
export async function readHistory(
  q: Queryable, sessionId: number, afterVersion: number, limit: number, withHyper = limit,
): Promise<{ points: HistoryPoint[]; more: boolean }> {
  const rows = await q.query(
    `SELECT version::float8 AS version, step::float8 AS step, staleness, created_at, metrics, hyper, fetched FROM (
       SELECT p.*, count(p.hyper) OVER (ORDER BY p.version) AS with_hyper, count(*) OVER () AS fetched,
         coalesce(sum(octet_length(p.metrics::text)) OVER (ORDER BY p.version ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS bytes_before
       FROM (
         SELECT version, step, staleness, created_at, metrics, hyper FROM step_history
         WHERE session_id = $1 AND version > $2 ORDER BY version LIMIT $3
       ) p
     ) h WHERE with_hyper <= $4 AND bytes_before < $5 ORDER BY version`,
    [sessionId, afterVersion, limit, withHyper, METRIC_BYTES_PER_PAGE],
  );
  // More after this page: it is full, or was cut short by withHyper or by the bytes of its metrics.
  const fetched = rows.length ? Number(rows[0].fetched) : 0;
  return { points: rows.map(toHistory), more: fetched === limit || rows.length < fetched };
}

/** The series point of one version, or null (a version made by a load or restore, not a step). */
export async function findHistoryPoint(q: Queryable, sessionId: number, version: number): Promise<HistoryPoint | null> {
  const rows = await q.query(
    'SELECT version::float8 AS version, step::float8 AS step, staleness, created_at, metrics, hyper FROM step_history WHERE session_id = $1 AND version = $2',
    [sessionId, version],
  );
  return rows.length ? toHistory(rows[0]) : null;
}

/** One step of a batch (repo.appendSteps): its gradient, what it sets, its checks and its Idempotency-Key. */
export interface BatchStep extends StepExtras {
  present: number[];
  grads: Buffer;
  gradDtype: GradDtype;
  ifMatch: number | null;
  baseVersion: number | null;
  /** With its request's hash; null: no key. */
  key: string | null;
  requestHash: string;
}

/** An answer recorded under one of the batch's keys before (`live`: within the window; else expired). */
export interface KnownKey {
  /** The step's position in the batch. */
  index: number;
  requestHash: string;
  response: Record<string, unknown>;
  live: boolean;
}

/** What a step is checked against besides its own If-Match and base_version (refusedAt): the session's, as locked. */
export interface StepChecks {
  maxStaleness: number | null;
  /** The session's history_from: a step computed at an older version is refused. */
  historyFrom: number;
}

export interface AppendedSteps extends StepChecks {
  /** The session's version when the row lock was granted (before the batch); its checks (StepChecks) then. */
  previousVersion: number;
  /** The session's stamp then: a copy at previousVersion with another stamp is not of the database's history. */
  previousStamp: string;
  /** The session has `aggregation`: nothing was written; its step requests are contributions (rounds.ts). */
  aggregated: boolean;
  /**
   * The batch's hyperparameters were checked against groups (`checkedGroups`) that are no longer the
   * session's (another process changed them since this process's copy was made): nothing was written; the
   * caller checks them again against the session's groups.
   */
  groupsMoved: boolean;
  /** The session after the batch (its steps are versions previousVersion+1..+n, in order); null: nothing written. */
  session: SessionRecord | null;
  /** The batch's keys that already have a row: nothing was written; the caller answers or clears them, then retries. */
  known: KnownKey[];
  /** The version of the session's newest snapshot (written by any process) when the batch ran; null: not read. */
  newestSnapshot: number | null;
}

/** The step's position in the batch (0-based) -> its version, when every step before it is accepted. */
const versionAt = (previous: number, index: number) => previous + index + 1;

/**
 * Whether a step is refused (If-Match, base_version, staleness, a gradient of a state replaced since) when
 * applied to version `before`, as appendSteps checks.
 */
export function refusedAt(s: Pick<BatchStep, 'ifMatch' | 'baseVersion'>, before: number, { maxStaleness, historyFrom }: StepChecks): boolean {
  return (s.ifMatch !== null && s.ifMatch !== before) || (s.baseVersion !== null && s.baseVersion > before)
    || (maxStaleness !== null && s.baseVersion !== null && before - s.baseVersion > maxStaleness)
    || (s.baseVersion !== null && s.baseVersion < historyFrom);
}

/**
 * The batch's steps' parameter columns in appendSteps' statement (its `input` CTE), in order. The gradients
 * are not among them: `input` is read by several parts of the statement, so PostgreSQL materializes it, and
 * a 4 MB bytea in a materialized CTE cost about 20 ms more per step than the bare INSERT (measured); they
 * are a VALUES list of their own, read once, by the INSERT into step_log.
 */
const BATCH_COLUMNS = ['present jsonb', 'base bigint', 'if_match bigint', 'hyper jsonb', 'metrics jsonb', 'dtype text', 'key text', 'hash text'];

/**
 * Group commit: a batch of steps as one statement (one round trip, autocommit). Lock the session row; if
 * none of the batch's keys has an answer recorded and every step passes its checks at its position, log the
 * gradients as versions v+1..v+n in order, advance the row once, write each step's row of step_history, its
 * answer under its Idempotency-Key, and, while some process listens to the session (its lease, as locked:
 * leaseListening), its NOTIFY (sent at commit). Otherwise write nothing and say why
 * (`known`, or the version the caller checks each step at with refusedAt). Only the batch's last step may set
 * hyperparameters. null when the session (this id, under this name) no longer exists: deleted, or its id is another
 * session's (a restore from a backup rewinds the id sequence, and a session created since may have it).
 *
 * Each step's key is looked up on its own (a LATERAL subquery that OFFSET 0 keeps from being flattened): an
 * index probe of the (session_id, key) primary key. Joined to `input`, or with `key = ANY(...)`, the generic
 * plan read every key the session recorded in the window: the statement took 3 ms more after 5,000 steps
 * with keys, and grew with every step (measured).
 *
 * The session's row lock is taken first, by a small statement sent in the same round trip and implicit
 * transaction (QueryOptions.lockFirst): when another process holds the lock, the wait happens there, and this
 * statement starts after it with a snapshot that sees the row as the last batch left it. Waiting inside this
 * statement, PostgreSQL re-initialized its whole plan (every CTE and subplan, EvalPlanQual) at each handoff:
 * three processes stepping one session made 555-609 steps a second that way, 1288-1318 now (measured).
 *
 * Keys: should a key another request recorded still be unseen by this statement's snapshot, its INSERT
 * fails on the key's primary key (23505) and nothing of the statement remains: the caller retries and finds
 * the answer (isKeyConflict). The checks and the new versions are those of the row as locked: the statement's
 * snapshot is taken once the lock is held (and under READ COMMITTED a lock wait inside it would end on the
 * newest row version as well).
 */
export async function appendSteps(
  db: Database, sessionId: number, name: string, steps: readonly BatchStep[], windowSeconds: number, checkedGroups: readonly GroupSpec[] | null = null,
): Promise<AppendedSteps | null> {
  if (steps.some((s, i) => s.hyper !== null && i !== steps.length - 1)) throw new Error('appendSteps: only the last step of a batch may set hyperparameters');
  // The groups the last step's hyperparameters were checked against (valid values, eta within float32, all
  // on the merged groups): the batch is written only while they are still the session's.
  const checked = steps[steps.length - 1].hyper !== null && checkedGroups !== null ? hyperOf(checkedGroups) : null;
  if (db.kind === 'pglite') return appendStepsPglite(db, sessionId, name, steps, windowSeconds, checked);
  const n = steps.length;
  const params: unknown[] = [sessionId, windowSeconds, name, checked];
  const rows: string[] = [];
  const gradRows: string[] = [];
  steps.forEach((s, i) => {
    const at = params.length;
    rows.push(`(${i}, ${BATCH_COLUMNS.map((c, j) => `$${at + j + 1}::${c.split(' ')[1]}`).join(', ')})`);
    params.push(JSON.stringify(s.present), s.baseVersion, s.ifMatch, s.hyper === null ? null : JSON.stringify(s.hyper),
      s.metrics === null ? null : JSON.stringify(s.metrics), gradDtypeColumn(s.gradDtype), s.key, s.requestHash);
  });
  steps.forEach((s, i) => {
    params.push(s.grads);
    gradRows.push(`(${i}, $${params.length}::bytea)`);
  });
  const last = `(SELECT hyper FROM input WHERE i = ${n - 1})`;
  // `notified` is a plain SELECT: referenced below, or PostgreSQL would not run it.
  const result = await db.query(
    `WITH locked AS (
       SELECT id, name, version, step, max_staleness, history_from, aggregation IS NOT NULL AS aggregated, coalesce(listened_until >= now(), false) AS listened,
         ${stampOf('updated_at')} AS stamp, groups AS old_groups
       FROM sessions WHERE id = $1 AND name = $3 FOR NO KEY UPDATE
     ), input (i, ${BATCH_COLUMNS.map((c) => c.split(' ')[0]).join(', ')}) AS (
       VALUES ${rows.join(', ')}
     ), known AS (
       SELECT input.i, k.request_hash, k.response, k.created_at >= now() - make_interval(secs => $2) AS live
       FROM input CROSS JOIN LATERAL (
         SELECT * FROM idempotency_keys k WHERE k.session_id = $1 AND k.key = input.key OFFSET 0
       ) k
     ), accepted AS (
       SELECT locked.* FROM locked
       WHERE NOT locked.aggregated AND NOT EXISTS (SELECT 1 FROM known)
         AND ($4::jsonb IS NULL OR $4::jsonb = ${groupHyperSql('locked.old_groups')})
         AND NOT EXISTS (SELECT 1 FROM input WHERE NOT (
           (if_match IS NULL OR if_match = locked.version + i)
           AND (base IS NULL OR base <= locked.version + i)
           AND (locked.max_staleness IS NULL OR base IS NULL OR locked.version + i - base <= locked.max_staleness)
           AND (base IS NULL OR base >= locked.history_from)))
     ), logged AS (
       INSERT INTO step_log (session_id, version, present, grads, base_version, hyper, grad_dtype)
       SELECT a.id, a.version + input.i + 1, input.present, g.grads, input.base, input.hyper, input.dtype
       FROM accepted a, input JOIN (VALUES ${gradRows.join(', ')}) AS g (i, grads) ON g.i = input.i
       RETURNING version
     ), advanced AS (
       UPDATE sessions SET version = a.version + ${n}, step = sessions.step + ${n}, updated_at = now(),
         groups = CASE WHEN ${last} IS NULL THEN sessions.groups ELSE ${mergeGroupsSql('sessions.groups', last)} END
       FROM accepted a WHERE sessions.id = a.id
       RETURNING ${sessionColumns('sessions.')}
     ), recorded AS (
       INSERT INTO step_history (session_id, version, step, staleness, metrics, hyper)
       SELECT a.id, a.version + input.i + 1, a.step + input.i + 1, CASE WHEN input.base IS NULL THEN 0 ELSE a.version + input.i - input.base END,
         input.metrics,
         -- A step that sets the values the groups already had changes nothing: not listed as a change (as a load is not).
         CASE WHEN input.hyper IS NULL OR ${groupHyperSql('advanced.groups')} = ${groupHyperSql('a.old_groups')} THEN NULL ELSE ${groupHyperSql('advanced.groups')} END
       FROM accepted a, input, advanced
     ), answered AS (
       INSERT INTO idempotency_keys (session_id, key, request_hash, response)
       SELECT a.id, input.key, input.hash, jsonb_build_object('session', a.name, 'step', a.step + input.i + 1, 'version', a.version + input.i + 1,
         'staleness', CASE WHEN input.base IS NULL THEN 0 ELSE a.version + input.i - input.base END)
       FROM accepted a, input WHERE input.key IS NOT NULL
     ), notified AS (
       SELECT pg_notify('${VERSION_CHANNEL}', a.name || ':' || (a.version + input.i + 1) || ':' || (a.step + input.i + 1)) FROM accepted a, input
       WHERE a.listened
     )
     SELECT locked.version::float8 AS previous_version, locked.stamp AS previous_stamp, locked.max_staleness AS previous_max_staleness, locked.history_from::float8 AS previous_history_from,
       locked.aggregated AS previous_aggregated, advanced.*,
       ($4::jsonb IS NOT NULL AND $4::jsonb IS DISTINCT FROM ${groupHyperSql('locked.old_groups')}) AS groups_moved,
       (SELECT count(*) FROM notified) + (SELECT count(*) FROM logged) AS written,
       (SELECT jsonb_agg(jsonb_build_object('index', i, 'request_hash', request_hash, 'response', response, 'live', live)) FROM known) AS known,
       (SELECT max(version) FROM snapshots WHERE session_id = $1 AND reason <> 'hyperparameters')::float8 AS newest_snapshot
     FROM locked LEFT JOIN advanced ON true`,
    params,
    { name: `step_append_${n}`, lockFirst: { name: 'step_lock_session', text: 'SELECT FROM sessions WHERE id = $1 AND name = $2 FOR NO KEY UPDATE', values: [sessionId, name] } },
  );
  if (result.length === 0) return null;
  const r = result[0];
  const known = ((r.known as { index: number; request_hash: string; response: Record<string, unknown>; live: boolean }[] | null) ?? [])
    .map((k) => ({ index: k.index, requestHash: k.request_hash, response: k.response, live: k.live }));
  return {
    previousVersion: r.previous_version as number,
    previousStamp: r.previous_stamp as string,
    maxStaleness: (r.previous_max_staleness as number | null) ?? null,
    historyFrom: r.previous_history_from as number,
    aggregated: r.previous_aggregated === true,
    groupsMoved: r.groups_moved === true,
    session: r.id === null || r.id === undefined ? null : toSession(r),
    known,
    newestSnapshot: (r.newest_snapshot as number | null) ?? null,
  };
}

/** True for the error of a batch whose key another request recorded meanwhile (appendSteps): retry it. */
export function isKeyConflict(err: unknown): boolean {
  const e = err as { code?: unknown; constraint?: unknown } | null;
  return e?.code === '23505' && typeof e.constraint === 'string' && e.constraint.startsWith('idempotency_keys');
}

/** Whether an answer is kept under `key` for the session named `name` (within the window): a retry is answered from it. */
export async function hasKeyAnswer(q: Queryable, name: string, key: string, windowSeconds: number): Promise<boolean> {
  const rows = await q.query(
    'SELECT 1 FROM idempotency_keys k JOIN sessions s ON s.id = k.session_id WHERE s.name = $1 AND k.key = $2 AND k.created_at >= now() - make_interval(secs => $3)',
    [name, key, windowSeconds],
  );
  return rows.length > 0;
}

/** Forgets expired answers under these keys (their window has passed: the keys are new again). */
export async function clearExpiredKeys(q: Queryable, sessionId: number, keys: string[], windowSeconds: number): Promise<void> {
  await q.query('DELETE FROM idempotency_keys WHERE session_id = $1 AND key = ANY($2::text[]) AND created_at < now() - make_interval(secs => $3)', [sessionId, keys, windowSeconds]);
}

/**
 * appendSteps on PGlite: a transaction (its statements are calls within this process, not round trips)
 * whose log rows arrive by binary COPY from a blob: 4 MB of gradients in 120-150 ms instead of 300-600 ms
 * as base64 text decoded in SQL. The checks are appendSteps' (refusedAt).
 */
async function appendStepsPglite(db: Database, sessionId: number, name: string, steps: readonly BatchStep[], windowSeconds: number, checked: string | null): Promise<AppendedSteps | null> {
  return db.transaction(async (tx) => {
    const locked = await tx.query<{ version: number; max_staleness: number | null; history_from: number; aggregated: boolean; stamp: string; groups: GroupSpec[] }>(
      `SELECT version::float8 AS version, max_staleness, history_from::float8 AS history_from, aggregation IS NOT NULL AS aggregated, ${stampOf('updated_at')} AS stamp, groups
       FROM sessions WHERE id = $1 AND name = $2 FOR NO KEY UPDATE`,
      [sessionId, name],
    );
    if (locked.length === 0) return null;
    const { version, max_staleness: maxStaleness, history_from: historyFrom, aggregated, stamp: previousStamp, groups: groupsBefore } = locked[0];
    const groupsMoved = checked !== null && checked !== hyperOf(groupsBefore);
    if (aggregated || groupsMoved) return { previousVersion: version, previousStamp, maxStaleness, historyFrom, aggregated, groupsMoved, session: null, known: [], newestSnapshot: null };
    const keys = steps.map((s) => s.key).filter((k): k is string => k !== null);
    const known: KnownKey[] = [];
    if (keys.length) {
      const found = await tx.query<{ key: string; request_hash: string; response: Record<string, unknown>; live: boolean }>(
        'SELECT key, request_hash, response, created_at >= now() - make_interval(secs => $3) AS live FROM idempotency_keys WHERE session_id = $1 AND key = ANY($2::text[])',
        [sessionId, keys, windowSeconds],
      );
      for (const f of found) known.push({ index: steps.findIndex((s) => s.key === f.key), requestHash: f.request_hash, response: f.response, live: f.live });
    }
    if (known.length || steps.some((s, i) => refusedAt(s, versionAt(version, i) - 1, { maxStaleness, historyFrom }))) {
      return { previousVersion: version, previousStamp, maxStaleness, historyFrom, aggregated, groupsMoved, session: null, known, newestSnapshot: null };
    }
    let step = 0;
    for (const [i, s] of steps.entries()) {
      const hyper = s.hyper === null ? null : JSON.stringify(s.hyper);
      const gradDtype = gradDtypeColumn(s.gradDtype);
      await tx.query(`COPY step_log (session_id, version, present, grads, base_version, hyper, grad_dtype) FROM '${PGLITE_COPY_FILE}' WITH (FORMAT binary)`, [], {
        copyFrom: copyRow([
          int8(sessionId), int8(versionAt(version, i)), jsonb(JSON.stringify(s.present)), s.grads, s.baseVersion === null ? null : int8(s.baseVersion),
          hyper === null ? null : jsonb(hyper), gradDtype === null ? null : Buffer.from(gradDtype, 'utf8'),
        ]),
      });
    }
    const lastHyper = steps[steps.length - 1].hyper;
    const rows = await tx.query(
      `UPDATE sessions SET version = $2, step = step + $4, updated_at = now(),
         groups = CASE WHEN $3::jsonb IS NULL THEN groups ELSE ${mergeGroupsSql('groups', '$3::jsonb')} END
       WHERE id = $1 RETURNING ${SESSION_COLUMNS}`,
      [sessionId, version + steps.length, lastHyper === null ? null : JSON.stringify(lastHyper), steps.length],
    );
    const session = toSession(rows[0]);
    const firstStep = session.step - steps.length;
    // A step that sets the values the groups already had changes nothing: not listed as a change (appendSteps).
    const after = groupHyperparameters(session.groups);
    const changed = JSON.stringify(after) !== JSON.stringify(groupHyperparameters(groupsBefore));
    for (const [i, s] of steps.entries()) {
      const v = versionAt(version, i);
      step = firstStep + i + 1;
      const staleness = s.baseVersion === null ? 0 : v - 1 - s.baseVersion;
      await insertHistory(tx, { sessionId, version: v, step, staleness, metrics: s.metrics, hyper: s.hyper === null || !changed ? null : after });
      if (s.key !== null) await saveIdempotentAnswer(tx, sessionId, s.key, s.requestHash, { session: session.name, step, version: v, staleness });
      await notifyVersion(tx, session.name, v, step);
    }
    // One process holds the data directory: its copy knows of every snapshot.
    return { previousVersion: version, previousStamp, maxStaleness, historyFrom, aggregated, groupsMoved, session, known, newestSnapshot: null };
  });
}

const int8 = (value: number) => {
  const out = Buffer.allocUnsafe(8);
  out.writeBigInt64BE(BigInt(value));
  return out;
};
/** jsonb's binary form: format version 1, then the text. */
const jsonb = (text: string) => Buffer.concat([Buffer.of(1), Buffer.from(text, 'utf8')]);

/** One row in PostgreSQL's binary COPY format (fields already in their binary forms; null for NULL), in one buffer. */
function copyRow(fields: (Buffer | null)[]): Uint8Array {
  const size = 19 + 2 + fields.reduce((n, f) => n + 4 + (f === null ? 0 : f.byteLength), 0) + 2;
  const out = Buffer.allocUnsafe(size);
  out.write('PGCOPY\n\xff\r\n\0', 0, 'latin1'); // signature (11 bytes)
  out.writeInt32BE(0, 11); // flags
  out.writeInt32BE(0, 15); // header extension length
  let at = out.writeInt16BE(fields.length, 19);
  for (const field of fields) {
    at = out.writeInt32BE(field === null ? -1 : field.byteLength, at);
    if (field !== null) at += field.copy(out, at);
  }
  out.writeInt16BE(-1, at); // trailer: field count -1
  return out;
}

/** The log entries in (fromVersion, toVersion], in order, at most `limit` of them. */
/**
 * The logged steps in (fromVersion, toVersion], at most `limit`, in version order, each handed to `onEntry`
 * as soon as it has arrived (the next is on its way meanwhile); how many were read.
 */
export async function readSteps(q: Queryable, sessionId: number, fromVersion: number, toVersion: number, limit: number, onEntry: (entry: StepLogEntry) => void): Promise<number> {
  let count = 0;
  // The gradient last: what applying it needs (its dtype, the hyperparameters it set) has arrived before it.
  await q.query(
    'SELECT version::float8 AS version, present, grad_dtype, hyper, grads FROM step_log WHERE session_id = $1 AND version > $2 AND version <= $3 ORDER BY version LIMIT $4',
    [sessionId, fromVersion, toVersion, limit],
    {
      name: 'step_log_read',
      binary: { version: 'float8', present: 'jsonb', grad_dtype: 'text', hyper: 'jsonb', grads: 'bytea' },
      onRow: ({ grad_dtype, ...row }: Omit<StepLogEntry, 'gradDtype'> & { grad_dtype: GradDtype | null }) => {
        count++;
        onEntry({ ...row, gradDtype: grad_dtype ?? 'float32' });
      },
    },
  );
  return count;
}

/** Writes a snapshot row and its tensor chunks (each at most CHUNK_BYTES, in order); null when one exists at that version. */
export async function insertSnapshot(
  db: Database,
  q: Queryable,
  s: Omit<SnapshotRecord, 'id' | 'createdAt' | 'chunkCount' | 'byteSize'>,
  chunks: readonly Buffer[],
): Promise<SnapshotRecord | null> {
  const byteSize = chunks.reduce((a, c) => a + c.byteLength, 0);
  const rows = await q.query(
    `INSERT INTO snapshots (session_id, version, step, reason, pinned, groups, scalars, byte_size, chunk_count, checksum)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (session_id, version) DO NOTHING RETURNING ${SNAPSHOT_COLUMNS}`,
    [s.sessionId, s.version, s.step, s.reason, s.pinned, JSON.stringify(s.groups), JSON.stringify(s.scalars), byteSize, chunks.length, s.checksum],
  );
  if (rows.length === 0) return null;
  const snapshot = toSnapshot(rows[0]);
  await insertChunks(db, q, 'snapshot_chunks (snapshot_id, seq, data)', snapshot.id, chunks);
  return snapshot;
}

/** Inserts `chunks` in order into `target` (a table with its owner, seq and data columns), owned by `ownerId`. */
export async function insertChunks(db: Database, q: Queryable, target: string, ownerId: number, chunks: readonly Buffer[]): Promise<void> {
  for (const [seq, chunk] of chunks.entries()) {
    await q.query(`INSERT INTO ${target} VALUES ($1, $2, ${db.byteaParam(3)})`, [ownerId, seq, db.byteaValue(chunk)], { name: `${target.split(' ')[0]}_insert` });
  }
}

/** pg_advisory_xact_lock(SNAPSHOT_SLOT_LOCK, session): the first key keeps these apart from other advisory locks. */
const SNAPSHOT_SLOT_LOCK = 0x5a5a;

/**
 * In a transaction about to write a scheduled snapshot: true when no snapshot of the session has a version
 * in the slot `slotStart` .. `slotStart + every - 1` (so this one is the slot's; a hyperparameters one, which
 * keep_snapshots does not count, takes none: PATCHes once a slot kept every scheduled snapshot out, and the
 * log was never pruned), holding a per-session lock
 * until the commit, so that two processes cannot both see the slot free. False: another process took it,
 * write nothing. Only the slot itself counts: a later slot's snapshot, written first by a process whose
 * copy was quicker, left this slot without one (seen in CI under load: 23 snapshots for 24 slots).
 */
export async function claimSnapshotSlot(q: Queryable, sessionId: number, slotStart: number, every: number): Promise<boolean> {
  await q.query('SELECT pg_advisory_xact_lock($1, ($2::bigint % 2147483647)::int)', [SNAPSHOT_SLOT_LOCK, sessionId]);
  // A statement of its own: under READ COMMITTED it sees what the lock holder before us committed.
  const rows = await q.query<{ taken: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM snapshots WHERE session_id = $1 AND version >= $2 AND version < $2::bigint + $3::bigint AND reason <> 'hyperparameters') AS taken`,
    [sessionId, slotStart, every],
  );
  return !rows[0].taken;
}

export async function findSnapshotAtOrBelow(q: Queryable, sessionId: number, version: number): Promise<SnapshotRecord | null> {
  const rows = await q.query(
    `SELECT ${SNAPSHOT_COLUMNS} FROM snapshots WHERE session_id = $1 AND version <= $2 ORDER BY version DESC LIMIT 1`,
    [sessionId, version],
  );
  return rows.length ? toSnapshot(rows[0]) : null;
}

export async function findSnapshot(q: Queryable, sessionId: number, id: number): Promise<SnapshotRecord | null> {
  const rows = await q.query(`SELECT ${SNAPSHOT_COLUMNS} FROM snapshots WHERE session_id = $1 AND id = $2`, [sessionId, id]);
  return rows.length ? toSnapshot(rows[0]) : null;
}

export async function listSnapshots(q: Queryable, sessionId: number): Promise<SnapshotRecord[]> {
  const rows = await q.query(`SELECT ${SNAPSHOT_COLUMNS} FROM snapshots WHERE session_id = $1 ORDER BY version DESC`, [sessionId]);
  return rows.map(toSnapshot);
}

/** The version of the session's oldest (`min`) or newest (`max`) snapshot; null without one. */
export async function snapshotVersion(q: Queryable, sessionId: number, which: 'min' | 'max'): Promise<number | null> {
  const rows = await q.query<{ v: number | null }>(`SELECT ${which === 'min' ? 'min' : 'max'}(version)::float8 AS v FROM snapshots WHERE session_id = $1`, [sessionId]);
  return rows[0]?.v ?? null;
}

export async function setSnapshotPinned(q: Queryable, sessionId: number, id: number, pinned: boolean): Promise<SnapshotRecord | null> {
  const rows = await q.query(`UPDATE snapshots SET pinned = $3 WHERE session_id = $1 AND id = $2 RETURNING ${SNAPSHOT_COLUMNS}`, [sessionId, id, pinned]);
  return rows.length ? toSnapshot(rows[0]) : null;
}

/**
 * A snapshot asked for at a version that already has one: it becomes the caller's (reason 'manual', pinned
 * if asked). A 'hyperparameters' snapshot there would otherwise stay disposable: replaced by the next change
 * of hyperparameters and not counted toward keep_snapshots, so the snapshot the caller was given could vanish.
 */
export async function claimSnapshot(q: Queryable, sessionId: number, id: number, pinned: boolean): Promise<SnapshotRecord | null> {
  const rows = await q.query(
    `UPDATE snapshots SET pinned = pinned OR $3, reason = CASE WHEN reason = 'hyperparameters' THEN 'manual' ELSE reason END
     WHERE session_id = $1 AND id = $2 RETURNING ${SNAPSHOT_COLUMNS}`,
    [sessionId, id, pinned],
  );
  return rows.length ? toSnapshot(rows[0]) : null;
}

/** Reads a snapshot's tensor bytes into `target` chunk by chunk (bounded memory); returns the chunks read. */
export function readSnapshotChunks(q: Queryable, snapshotId: number, onChunk: (seq: number, data: Buffer) => void): Promise<number> {
  return readChunks(q, 'SELECT data FROM snapshot_chunks WHERE snapshot_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq', 'snapshot_chunks_read', snapshotId, onChunk);
}

/** Reads the chunks `sql` selects ($1 the owner, $2..$3 the seq range) in batches, in order; returns how many. */
export async function readChunks(q: Queryable, sql: string, name: string, ownerId: number, onChunk: (seq: number, data: Buffer) => void): Promise<number> {
  const BATCH = 8;
  let seq = 0;
  for (;;) {
    const rows = await q.query<{ data: Buffer }>(sql, [ownerId, seq, seq + BATCH], { name, binary: { data: 'bytea' } });
    for (const [i, row] of rows.entries()) {
      if (i > 0) await nextTurn(); // a chunk is copied and hashed at once (8 MB); the others wait a turn
      onChunk(seq++, row.data);
    }
    if (rows.length < BATCH) return seq;
  }
}

/**
 * Retention: keep the newest `keep` snapshots and every pinned one; then drop the log behind the oldest
 * of the kept window (pinned snapshots outside it stand alone: readable, restorable, not replayed from),
 * and further behind a newer snapshot when the log outgrows the session's keep_log_bytes (retention.ts).
 */
/**
 * Keeps the newest `keep` snapshots and the log after the oldest of them. Snapshots of hyperparameter
 * changes (PATCH param_groups) are not counted: they are replay bases for the versions after them, not
 * restore points a worker's token could otherwise push out; they go once older than the oldest counted one.
 */
export async function pruneHistory(q: Queryable, sessionId: number): Promise<{ snapshots: number; steps: number }> {
  // keep_snapshots as the row has it now, not as the caller read it: a background snapshot's row was read by
  // the batch that made it due, and a PATCH raising keep_snapshots may have committed since (a review: the
  // snapshots just asked to be kept were pruned to the old count).
  const oldestKept = `SELECT min(version) FROM (SELECT version FROM snapshots WHERE session_id = $1 AND reason <> 'hyperparameters'
    ORDER BY version DESC LIMIT (SELECT keep_snapshots FROM sessions WHERE id = $1)) newest`;
  const deleted = await q.query(
    `DELETE FROM snapshots WHERE session_id = $1 AND NOT pinned AND version < (${oldestKept}) RETURNING id`,
    [sessionId],
  );
  const steps = await q.query(
    `DELETE FROM step_log WHERE session_id = $1 AND version <= (${oldestKept}) RETURNING version`,
    [sessionId],
  );
  // Replaced versions whose state went with the snapshot after them (a pinned one keeps its own).
  await q.query(
    `DELETE FROM replaced_versions rv WHERE rv.session_id = $1
       AND rv.step IS DISTINCT FROM (SELECT s.step FROM snapshots s WHERE s.session_id = rv.session_id AND s.version > rv.version ORDER BY s.version LIMIT 1)`,
    [sessionId],
  );
  return { snapshots: deleted.length, steps: steps.length + (await pruneLogToBytes(q, sessionId)) };
}

/**
 * Deletes the unpinned snapshot of `reason` at `version` (superseded by a change written after it, with
 * the same parameters and optimizer state), keeping its version's groups in replaced_versions.
 */
export async function deleteSupersededSnapshot(q: Queryable, sessionId: number, version: number, reason: string): Promise<void> {
  await q.query(
    `WITH gone AS (DELETE FROM snapshots WHERE session_id = $1 AND version = $2 AND reason = $3 AND NOT pinned RETURNING session_id, version, step, groups)
     INSERT INTO replaced_versions (session_id, version, step, groups) SELECT session_id, version, step, groups FROM gone`,
    [sessionId, version, reason],
  );
}

/**
 * A replaced version (replaced_versions) and the snapshot that holds its parameters and optimizer state:
 * the session's next snapshot after it, at the same step, every version between them replaced too.
 * Null when `version` is not one, or that snapshot is gone.
 */
export async function findReplacedVersion(q: Queryable, sessionId: number, version: number): Promise<{ groups: GroupSpec[]; snapshot: SnapshotRecord } | null> {
  const [replaced] = await q.query<{ step: string; groups: GroupSpec[] }>('SELECT step::text, groups FROM replaced_versions WHERE session_id = $1 AND version = $2', [sessionId, version]);
  if (!replaced) return null;
  const [next] = await q.query(`SELECT ${SNAPSHOT_COLUMNS} FROM snapshots WHERE session_id = $1 AND version > $2 ORDER BY version LIMIT 1`, [sessionId, version]);
  const snapshot = next ? toSnapshot(next) : null;
  if (!snapshot || snapshot.step !== Number(replaced.step)) return null;
  const [between] = await q.query<{ n: string }>('SELECT count(*)::text AS n FROM replaced_versions WHERE session_id = $1 AND version > $2 AND version < $3', [sessionId, version, snapshot.version]);
  if (Number(between.n) !== snapshot.version - version - 1) return null;
  return { groups: replaced.groups, snapshot };
}

export async function saveIdempotentAnswer(q: Queryable, sessionId: number, key: string, requestHash: string, response: Record<string, unknown>): Promise<void> {
  await q.query(
    `INSERT INTO idempotency_keys (session_id, key, request_hash, response) VALUES ($1, $2, $3, $4)
     ON CONFLICT (session_id, key) DO UPDATE SET request_hash = EXCLUDED.request_hash, response = EXCLUDED.response, created_at = now()`,
    [sessionId, key, requestHash, JSON.stringify(response)],
    { name: 'idempotency_save' },
  );
}

/** Expired keys one statement of pruneIdempotencyKeys deletes, and the statements one run makes at most. */
export const PRUNE_BATCH_KEYS = 10_000;
const PRUNE_BATCHES = 100;

/**
 * Deletes expired Idempotency-Key answers, PRUNE_BATCH_KEYS a statement (oldest first, by the created_at
 * index), until none is left or a run has made PRUNE_BATCHES statements. One statement for them all took
 * 27 s over 3 million keys, was cancelled at a short ASGD_DB_TIMEOUT_MS every minute and never shrank the
 * table, and sent every key to the process (an operator's review). Keys another replica is deleting are
 * skipped (SKIP LOCKED): replicas share the work rather than wait on each other's rows.
 */
export async function pruneIdempotencyKeys(q: Queryable, windowSeconds: number): Promise<number> {
  let pruned = 0;
  for (let batch = 0; batch < PRUNE_BATCHES; batch++) {
    const [row] = await q.query<{ n: number }>(
      `WITH expired AS (
         SELECT session_id, key FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED
       ), gone AS (
         DELETE FROM idempotency_keys k USING expired e WHERE k.session_id = e.session_id AND k.key = e.key RETURNING 1
       )
       SELECT count(*)::float8 AS n FROM gone`,
      [windowSeconds, PRUNE_BATCH_KEYS],
    );
    pruned += row?.n ?? 0;
    if ((row?.n ?? 0) < PRUNE_BATCH_KEYS) break;
  }
  return pruned;
}
