// The drizzle tables: the single source of row types. Migrations come from `npm run db:generate`.

import { pgCore } from './drizzle.ts';

const { bigint, bigserial, boolean, customType, index, integer, jsonb, pgTable, primaryKey, text, timestamp, uniqueIndex } = pgCore;

/** bytea as a Node Buffer. Tensor columns are set to STORAGE EXTERNAL in a migration (floats do not compress). */
export const bytea = customType<{ data: Buffer; driverData: Buffer }>({
  dataType: () => 'bytea',
});

/** Hyperparameters and membership of one param group, as in torch.optim.ASGD's param_groups. */
export interface GroupSpec {
  params: number[];
  lr: number;
  lambd: number;
  alpha: number;
  t0: number;
  weight_decay: number;
  /** Hyperparameters that are Python ints in PyTorch's group (weight_decay's default is the int 0): pickles keep the type. */
  int_keys?: string[];
  maximize: boolean;
  /** torch's foreach flag as given (absent or null: None); kept for the state_dict, the step is the single-tensor path's. */
  foreach?: boolean | null;
  /** Keys a loaded state_dict carried beyond ASGD's own (foreach, differentiable, capturable, …), echoed back. */
  extra?: Record<string, unknown>;
}

export interface ParamSpec {
  name: string;
  shape: number[];
}

/**
 * Hyperparameters a step sets, per group in the session's group order (null: that group unchanged).
 * `int_keys` lists the given keys that are Python ints (weight_decay given as a whole number).
 */
export type HyperDelta = (Partial<Pick<GroupSpec, 'lr' | 'lambd' | 'alpha' | 't0' | 'weight_decay' | 'maximize' | 'foreach'>> & { int_keys?: string[] } | null)[];

/**
 * A session's synchronous rounds (src/sessions/rounds.ts): a round of contributions at one version steps once
 * `contributions` are in, or their `samples` add up to `target_samples`, or `timeout_s` after its first
 * contribution when at least `min_contributions` are in.
 */
export interface Aggregation {
  contributions?: number;
  timeout_s?: number;
  min_contributions?: number;
  target_samples?: number;
}

/** What step_history keeps of a round's step (null for an ordinary step): the answer's `round`. */
export interface RoundRecord {
  contributions: number;
  /** The contributions' samples added up, or null when none reported any. */
  samples: number | null;
  timed_out: boolean;
}

/** Per-parameter scalar state (float32 values) or null when the parameter has not stepped yet. */
export type ScalarStateRow = { step: number; eta: number; mu: number } | null;

export const sessions = pgTable('sessions', {
  id: bigserial('id', { mode: 'number' }).primaryKey(),
  name: text('name').notNull(),
  params: jsonb('params').$type<ParamSpec[]>().notNull(),
  groups: jsonb('groups').$type<GroupSpec[]>().notNull(),
  numel: bigint('numel', { mode: 'number' }).notNull(),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  snapshotEvery: integer('snapshot_every').notNull(),
  keepSnapshots: integer('keep_snapshots').notNull(),
  maxStaleness: integer('max_staleness'),
  /** Byte bound on the step log (null: none; the count bound keep_snapshots still holds). */
  keepLogBytes: bigint('keep_log_bytes', { mode: 'number' }),
  /** Deleted by the sweeper after this many seconds without a step or a write (null: never). */
  expireAfterIdleS: integer('expire_after_idle_s'),
  /** Synchronous rounds (null: every step request is its own step). */
  aggregation: jsonb('aggregation').$type<Aggregation>(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  updatedAt: timestamp('updated_at', { withTimezone: true }).notNull().defaultNow(),
  /**
   * Until when some process waits for this session's next version (a waiting read or an event stream):
   * a step NOTIFYs asgd_versions only before then. Set and renewed by the waiting process
   * (src/sessions/notifier.ts); null: nobody has waited.
   */
  listenedUntil: timestamp('listened_until', { withTimezone: true }),
  /**
   * The version made by the session's last restore or state load (state_dict, checkpoint): a gradient
   * computed at an older version (its base_version) is of parameters the session's history no longer
   * holds, and is refused as stale. 0: none since the session was created.
   */
  historyFrom: bigint('history_from', { mode: 'number' }).notNull().default(0),
}, (t) => [uniqueIndex('sessions_name_key').on(t.name)]);

/** An immutable copy of parameters and optimizer state at one version. Written in one transaction. */
export const snapshots = pgTable('snapshots', {
  id: bigserial('id', { mode: 'number' }).primaryKey(),
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  reason: text('reason').notNull(),
  pinned: boolean('pinned').notNull().default(false),
  groups: jsonb('groups').$type<GroupSpec[]>().notNull(),
  scalars: jsonb('scalars').$type<ScalarStateRow[]>().notNull(),
  byteSize: bigint('byte_size', { mode: 'number' }).notNull(),
  chunkCount: integer('chunk_count').notNull(),
  /** sha256 over the tensor bytes (params then ax) and the canonical JSON of groups and scalars. */
  checksum: text('checksum').notNull(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
}, (t) => [uniqueIndex('snapshots_session_version_key').on(t.sessionId, t.version)]);

/** Tensor bytes of a snapshot in chunks, so that no single value nears PostgreSQL's 1 GB limit. */
export const snapshotChunks = pgTable('snapshot_chunks', {
  snapshotId: bigint('snapshot_id', { mode: 'number' }).notNull().references(() => snapshots.id, { onDelete: 'cascade' }),
  seq: integer('seq').notNull(),
  data: bytea('data').notNull(),
}, (t) => [primaryKey({ columns: [t.snapshotId, t.seq] })]);

/**
 * Replay points: a session's state written without WAL, so that a process taking a session over replays a
 * bounded stretch of the log (src/sessions/replay-points.ts). The tables are UNLOGGED (migration 0009):
 * PostgreSQL empties them after a crash of its own, and nothing is lost then, since snapshots and the log
 * still hold every version. Not restore points: never listed, never counted by keep_snapshots.
 */
export const replayPoints = pgTable('replay_points', {
  id: bigserial('id', { mode: 'number' }).primaryKey(),
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  groups: jsonb('groups').$type<GroupSpec[]>().notNull(),
  scalars: jsonb('scalars').$type<ScalarStateRow[]>().notNull(),
  byteSize: bigint('byte_size', { mode: 'number' }).notNull(),
  chunkCount: integer('chunk_count').notNull(),
  /** As snapshots.checksum (over the bytes stored). */
  checksum: text('checksum').notNull(),
  /** True: ax equalled the params bit for bit (no averaging yet), the chunks hold the params alone. */
  axFromParams: boolean('ax_from_params').notNull(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
}, (t) => [uniqueIndex('replay_points_session_version_key').on(t.sessionId, t.version)]);

/** Tensor bytes of a replay point in chunks, as snapshot_chunks. */
export const replayPointChunks = pgTable('replay_point_chunks', {
  pointId: bigint('point_id', { mode: 'number' }).notNull().references(() => replayPoints.id, { onDelete: 'cascade' }),
  seq: integer('seq').notNull(),
  data: bytea('data').notNull(),
}, (t) => [primaryKey({ columns: [t.pointId, t.seq] })]);

/**
 * One row per acknowledged step: the gradient, not the state. The state at version v is the newest
 * snapshot at or below v with the steps after it replayed (the kernel is deterministic).
 */
export const stepLog = pgTable('step_log', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  /** Indices of the parameters that had a gradient, in order; their float32 gradients are concatenated in `grads`. */
  present: jsonb('present').$type<number[]>().notNull(),
  grads: bytea('grads').notNull(),
  baseVersion: bigint('base_version', { mode: 'number' }),
  /** NULL: `grads` holds float32 values; 'float16' or 'bfloat16': the 16-bit bits as received (widened on replay). */
  gradDtype: text('grad_dtype').$type<'float16' | 'bfloat16'>(),
  /**
   * The hyperparameters the step set before it ran (one object per group, null for a group it left alone;
   * see src/sessions/step-input.ts), or null: replay applies them, so every version stays bit-exact.
   */
  hyper: jsonb('hyper').$type<HyperDelta>(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
}, (t) => [primaryKey({ columns: [t.sessionId, t.version] })]);

/**
 * The groups a session had at version 1 (created or forked), kept for its lifetime (its version-1 snapshot
 * is pruned like any other): the hyperparameters in force before a step first changed them (step_history).
 * Written with the session row by the statement that inserts it (repository.insertSession), so create and
 * fork record them in their transaction. A session made before migration 0006 has a row only when its
 * version-1 snapshot was still kept then. Apart from the session row: only the dashboard reads it.
 */
export const initialGroups = pgTable('initial_groups', {
  sessionId: bigint('session_id', { mode: 'number' }).primaryKey().references(() => sessions.id, { onDelete: 'cascade' }),
  groups: jsonb('groups').$type<GroupSpec[]>().notNull(),
});

/**
 * One row per committed step, kept for the session's lifetime (not pruned with the log): the training
 * series a dashboard plots (metrics the client sent, staleness) and the groups' values when the step
 * changed them.
 */
export const stepHistory = pgTable('step_history', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  staleness: integer('staleness').notNull(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  metrics: jsonb('metrics').$type<Record<string, number>>(),
  /** Each group's hyperparameters after the step, when the step changed any; else null. */
  hyper: jsonb('hyper').$type<Record<string, unknown>[]>(),
  /** A round's step: its size and how it closed; null for an ordinary step. */
  round: jsonb('round').$type<RoundRecord>(),
}, (t) => [primaryKey({ columns: [t.sessionId, t.version] })]);

/**
 * Changes of the groups' hyperparameters that are not steps: a load (state_dict, checkpoint) or a restore
 * whose groups differ from the ones before. With the steps' (step_history.hyper) and the first ones
 * (initial_groups) they tell the values every step ran with; kept for the session's lifetime.
 */
export const groupChanges = pgTable('group_changes', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  /** What made the version: load_state_dict, load_checkpoint, restore. */
  reason: text('reason').notNull(),
  /** Each group's hyperparameters after the change (as step_history.hyper). */
  hyper: jsonb('hyper').$type<Record<string, unknown>[]>().notNull(),
}, (t) => [primaryKey({ columns: [t.sessionId, t.version] })]);

/**
 * Versions made by a change of hyperparameters (PATCH param_groups) whose snapshot the next such change
 * replaced, no step coming between (repository.deleteSupersededSnapshot): their parameters and optimizer
 * state are those of the next snapshot, their groups these. Read with ?version= (history.buildState); they
 * go with the snapshots older than the oldest kept.
 */
export const replacedVersions = pgTable('replaced_versions', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  step: bigint('step', { mode: 'number' }).notNull(),
  groups: jsonb('groups').$type<GroupSpec[]>().notNull(),
}, (t) => [primaryKey({ columns: [t.sessionId, t.version] })]);

/**
 * The last version of each deleted session's name (deleted, or expired after expire_after_idle_s), for 30
 * days: a session created again under the name continues its versions, so that nothing kept of the deleted
 * one (a worker's base_version, an ETag) is taken for a version of the new one (a review: a running worker's
 * gradient of the deleted session's parameters was applied to the new session as a stale step).
 */
export const retiredNames = pgTable('retired_names', {
  name: text('name').primaryKey(),
  lastVersion: bigint('last_version', { mode: 'number' }).notNull(),
  retiredAt: timestamp('retired_at', { withTimezone: true }).notNull().defaultNow(),
});

/**
 * A worker's gradient for the open round of a session with `aggregation`: stored as it arrives, under the
 * session row lock, at the version it was computed on. The round's step (one transaction) reads the
 * round's rows, logs their mean as an ordinary step and deletes them. Rows at an older version than the
 * session's belong to no round any more (a load or restore moved the version): they are void.
 */
export const roundContributions = pgTable('round_contributions', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  version: bigint('version', { mode: 'number' }).notNull(),
  worker: text('worker').notNull(),
  samples: integer('samples'),
  /** As step_log: the parameters that have a gradient, their gradients concatenated, and their dtype. */
  present: jsonb('present').$type<number[]>().notNull(),
  grads: bytea('grads').notNull(),
  gradDtype: text('grad_dtype').$type<'float16' | 'bfloat16'>(),
  /** The contribution's param_groups as a HyperDelta (the round applies them; all contributions agree). */
  hyper: jsonb('hyper').$type<HyperDelta>(),
  metrics: jsonb('metrics').$type<Record<string, number>>(),
  idempotencyKey: text('idempotency_key'),
  requestHash: text('request_hash'),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
}, (t) => [
  primaryKey({ columns: [t.sessionId, t.version, t.worker] }),
  uniqueIndex('round_contributions_session_key').on(t.sessionId, t.idempotencyKey),
]);

/** Answers to steps sent with an Idempotency-Key, kept for the configured window. */
export const idempotencyKeys = pgTable('idempotency_keys', {
  sessionId: bigint('session_id', { mode: 'number' }).notNull().references(() => sessions.id, { onDelete: 'cascade' }),
  key: text('key').notNull(),
  requestHash: text('request_hash').notNull(),
  response: jsonb('response').$type<Record<string, unknown>>().notNull(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
}, (t) => [primaryKey({ columns: [t.sessionId, t.key] }), index('idempotency_keys_created_at_idx').on(t.createdAt)]);

/** API tokens: only a sha256 of the secret is stored. */
export const tokens = pgTable('tokens', {
  id: text('id').primaryKey(),
  name: text('name').notNull(),
  secretHash: text('secret_hash').notNull(),
  scope: text('scope').$type<'read' | 'step' | 'admin'>().notNull(),
  /** null: every session; otherwise the session names this token may touch. */
  sessions: jsonb('sessions').$type<string[] | null>(),
  createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  revokedAt: timestamp('revoked_at', { withTimezone: true }),
}, (t) => [uniqueIndex('tokens_secret_hash_key').on(t.secretHash)]);

/** A session as the service reads it (the listening lease is the notifier's bookkeeping, not the session's). */
export type SessionRow = Omit<typeof sessions.$inferSelect, 'listenedUntil' | 'historyFrom'>;
export type SnapshotRow = typeof snapshots.$inferSelect;
export type ReplayPointRow = typeof replayPoints.$inferSelect;
export type TokenRow = typeof tokens.$inferSelect;

export const schema = { sessions, snapshots, snapshotChunks, replayPoints, replayPointChunks, stepLog, stepHistory, groupChanges, replacedVersions, retiredNames, roundContributions, initialGroups, idempotencyKeys, tokens };
