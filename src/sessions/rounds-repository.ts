// SQL of synchronous rounds (src/sessions/rounds.ts): contributions stored as they arrive, the open round's
// tally, the round's row of step_history, and what a waiting request reads to learn its round stepped.
// A round is the contributions of a session at the session's current version; rows at an older version
// belong to no round (a load or restore moved the version on) and are deleted by the next write.
import type { Database, Queryable } from '../db/database.ts';
import type { HyperDelta, RoundRecord } from '../db/schema.ts';
import { errors } from '../errors.ts';
import type { GradDtype } from './gradients.ts';
import type { ContributedGradients } from './aggregation.ts';
import type { SessionRecord } from './repository.ts';

/** The open round of a session, as session answers show it. */
export interface OpenRound {
  version: number;
  contributions: number;
  /** The contributions' samples added up; null when none reported any. */
  samples: number | null;
  /** Worker ids in ascending byte order. */
  workers: string[];
  /** Seconds since the round's first contribution (the database's clock). */
  ageSeconds: number;
  /** The param_groups of the first contribution in worker order (all contributions agree in effect). */
  hyper: HyperDelta | null;
}

export interface ContributionRow {
  worker: string;
  samples: number | null;
  present: number[];
  grads: Buffer;
  gradDtype: GradDtype;
  hyper: HyperDelta | null;
  metrics: Record<string, number> | null;
  idempotencyKey: string | null;
  requestHash: string | null;
}

const ROUND_COLUMNS = `count(*)::int AS contributions, sum(c.samples)::float8 AS samples,
  coalesce(array_agg(c.worker::text ORDER BY c.worker COLLATE "C"), '{}') AS workers,
  extract(epoch FROM clock_timestamp() - min(c.created_at))::float8 AS age_seconds,
  (array_agg(c.hyper ORDER BY c.worker COLLATE "C") FILTER (WHERE c.hyper IS NOT NULL))[1] AS hyper`;

const toRound = (version: number, r: Record<string, unknown>): OpenRound => ({
  version,
  contributions: r.contributions as number,
  samples: (r.samples as number | null) ?? null,
  workers: r.workers as string[],
  ageSeconds: Math.max(0, (r.age_seconds as number | null) ?? 0),
  hyper: (r.hyper as HyperDelta | null) ?? null,
});

/** The round at `version` (contributions 0 when none came yet). */
export async function readRound(q: Queryable, sessionId: number, version: number): Promise<OpenRound> {
  const rows = await q.query(`SELECT ${ROUND_COLUMNS} FROM round_contributions c WHERE c.session_id = $1 AND c.version = $2`, [sessionId, version], { name: 'round_read' });
  return toRound(version, rows[0]);
}

/** The open rounds of several sessions (at each one's version), by session id: one query for a page of sessions. */
export async function readOpenRounds(q: Queryable, sessions: readonly { id: number; version: number }[]): Promise<Map<number, OpenRound>> {
  if (sessions.length === 0) return new Map();
  const rows = await q.query(
    `SELECT s.id::float8 AS id, s.version::float8 AS version, ${ROUND_COLUMNS}
     FROM unnest($1::bigint[], $2::bigint[]) AS s(id, version) JOIN round_contributions c ON c.session_id = s.id AND c.version = s.version
     GROUP BY s.id, s.version`,
    [sessions.map((s) => s.id), sessions.map((s) => s.version)],
  );
  return new Map(rows.map((r) => [r.id as number, toRound(r.version as number, r)]));
}

/** The answer recorded under an Idempotency-Key within the window (a round's, or a step's before aggregation). */
export async function findKeyAnswer(q: Queryable, sessionId: number, key: string, windowSeconds: number): Promise<{ requestHash: string; response: Record<string, unknown> } | null> {
  const rows = await q.query<{ request_hash: string; response: Record<string, unknown> }>(
    'SELECT request_hash, response FROM idempotency_keys WHERE session_id = $1 AND key = $2 AND created_at >= now() - make_interval(secs => $3)',
    [sessionId, key, windowSeconds],
    { name: 'round_key_answer' },
  );
  return rows.length ? { requestHash: rows[0].request_hash, response: rows[0].response } : null;
}

/** The contribution an Idempotency-Key stored, at whatever version. */
export async function findContributionByKey(q: Queryable, sessionId: number, key: string): Promise<{ version: number; worker: string; requestHash: string | null } | null> {
  const rows = await q.query<{ version: number; worker: string; request_hash: string | null }>(
    'SELECT version::float8 AS version, worker, request_hash FROM round_contributions WHERE session_id = $1 AND idempotency_key = $2',
    [sessionId, key],
    { name: 'round_contribution_by_key' },
  );
  return rows.length ? { version: rows[0].version, worker: rows[0].worker, requestHash: rows[0].request_hash } : null;
}

/** The session's history_from: gradients computed before it are of a state since replaced. */
export async function historyFrom(q: Queryable, sessionId: number): Promise<number> {
  const rows = await q.query<{ history_from: number }>('SELECT history_from::float8 AS history_from FROM sessions WHERE id = $1', [sessionId]);
  return rows[0]?.history_from ?? 0;
}

/** Stores a contribution to the round at `version`; the caller holds the session row lock and checked it is new. */
export async function insertContribution(db: Database, q: Queryable, sessionId: number, version: number, c: ContributionRow): Promise<void> {
  await q.query(
    `INSERT INTO round_contributions (session_id, version, worker, samples, present, grads, grad_dtype, hyper, metrics, idempotency_key, request_hash)
     VALUES ($1, $2, $3, $4, $5, ${db.byteaParam(6)}, $7, $8::jsonb, $9::jsonb, $10, $11)`,
    [sessionId, version, c.worker, c.samples, JSON.stringify(c.present), db.byteaValue(c.grads), c.gradDtype === 'float32' ? null : c.gradDtype,
      c.hyper === null ? null : JSON.stringify(c.hyper), c.metrics === null ? null : JSON.stringify(c.metrics), c.idempotencyKey, c.requestHash],
    { name: 'round_contribution_insert' },
  );
}

/** A contribution as its round's step needs it besides its gradients (readContributionGradients). */
export type ContributionMeta = Omit<ContributionRow, 'grads' | 'gradDtype' | 'present'> & { ageSeconds: number };

/** The round's contributions without their gradients, in worker order (byte order). */
export async function readContributions(q: Queryable, sessionId: number, version: number): Promise<ContributionMeta[]> {
  type Row = Omit<ContributionMeta, 'idempotencyKey' | 'requestHash' | 'ageSeconds'> & { idempotency_key: string | null; request_hash: string | null; age_seconds: number };
  const rows = await q.query<Row>(
    `SELECT worker, samples, hyper, metrics, idempotency_key, request_hash,
       extract(epoch FROM clock_timestamp() - created_at)::float8 AS age_seconds
     FROM round_contributions WHERE session_id = $1 AND version = $2 ORDER BY worker COLLATE "C"`,
    [sessionId, version],
    {
      name: 'round_contributions_read',
      binary: { worker: 'text', samples: 'int4', hyper: 'jsonb', metrics: 'jsonb', idempotency_key: 'text', request_hash: 'text', age_seconds: 'float8' },
    },
  );
  return rows.map(({ idempotency_key, request_hash, age_seconds, ...row }) => ({
    ...row, idempotencyKey: idempotency_key, requestHash: request_hash, ageSeconds: Math.max(0, age_seconds),
  }));
}

/** Contributions a page of readContributionGradients holds at most. */
export const GRADIENT_PAGE = 8;

/**
 * The gradients of the round's contributions from the `from`-th on, in worker order (byte order), at most
 * GRADIENT_PAGE of them: a round's step adds them up a page at a time, never holding them all (a hostile
 * review: 900 contributions of 1 MiB took a process from 319 MB to 1.2 GB). Read under the session's row
 * lock, which a contribution also takes: the round's rows do not change between pages.
 */
export async function readContributionGradients(q: Queryable, sessionId: number, version: number, from: number): Promise<ContributedGradients[]> {
  const rows = await q.query<{ worker: string; present: number[]; grads: Buffer; grad_dtype: GradDtype | null }>(
    `SELECT worker, present, grads, grad_dtype FROM round_contributions
     WHERE session_id = $1 AND version = $2 ORDER BY worker COLLATE "C" LIMIT ${GRADIENT_PAGE} OFFSET $3`,
    [sessionId, version, from],
    { name: 'round_contribution_gradients_read', binary: { worker: 'text', present: 'jsonb', grads: 'bytea', grad_dtype: 'text' } },
  );
  return rows.map(({ grad_dtype, ...row }) => ({ ...row, dtype: grad_dtype ?? 'float32' }));
}

/** The round's step in the log: its combined gradient (float32), as an ordinary step computed at the round's version. */
export async function insertRoundStep(db: Database, q: Queryable, sessionId: number, step: { version: number; present: number[]; grads: Buffer; hyper: HyperDelta | null }): Promise<void> {
  await q.query(
    `INSERT INTO step_log (session_id, version, present, grads, base_version, hyper) VALUES ($1, $2, $3, ${db.byteaParam(4)}, $2::bigint - 1, $5::jsonb)`,
    [sessionId, step.version, JSON.stringify(step.present), db.byteaValue(step.grads), step.hyper === null ? null : JSON.stringify(step.hyper)],
    { name: 'round_step_insert' },
  );
}

/** Deletes the contributions below `version` (void) or, with `through`, up to and including it (a round that stepped). */
export async function deleteContributions(q: Queryable, sessionId: number, version: number, through: boolean): Promise<void> {
  await q.query(`DELETE FROM round_contributions WHERE session_id = $1 AND version ${through ? '<=' : '<'} $2`, [sessionId, version]);
}

/**
 * What became of the round at `version`: the session's version now, and the step that followed the round
 * (its step count and round record) when that step was the round's. null: the session is gone.
 */
export async function readRoundOutcome(
  q: Queryable, sessionId: number, version: number,
): Promise<{ name: string; version: number; step: number | null; round: RoundRecord | null } | null> {
  const rows = await q.query<{ name: string; version: number; step: number | null; round: RoundRecord | null }>(
    `SELECT s.name, s.version::float8 AS version, h.step::float8 AS step, h.round
     FROM sessions s LEFT JOIN step_history h ON h.session_id = s.id AND h.version = $2::bigint + 1 WHERE s.id = $1`,
    [sessionId, version],
    { name: 'round_outcome' },
  );
  return rows[0] ?? null;
}

/**
 * A change of `field` (PATCH of aggregation, of param_groups) is refused while a round has contributions
 * (they were made for the old settings, at this version). `instead`: what to do, appended to the message.
 */
export async function assertNoOpenRound(q: Queryable, session: SessionRecord, field = 'aggregation', instead = ''): Promise<void> {
  const round = await readRound(q, session.id, session.version);
  if (round.contributions > 0) throw errors.roundOpen(field, session.version, round.contributions, instead);
}
