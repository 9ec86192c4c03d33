// Reads of step_history for the dashboard: a long training series downsampled on the server (buckets of
// versions with min/max/mean of each metric, so a 100,000-step session opens with a few thousand
// numbers), the steps that changed hyperparameters, and the activity figures of the sessions list.
import type { Queryable } from '../db/database.ts';

export interface SeriesPoint {
  /** The last version in the point (its only one for a raw point). */
  version: number;
  step: number;
  time: Date;
  staleness: number;
  values: Record<string, number>;
  /** Buckets only: the first version in it, how many steps it holds, and min/max of each figure. */
  versionFrom?: number;
  count?: number;
  stalenessMax?: number;
  min?: Record<string, number>;
  max?: Record<string, number>;
}

/**
 * The series after `afterVersion` in at most `maxPoints` points: the raw points when there are that few,
 * else buckets of `width` consecutive versions (a version without a step, e.g. a restore, has no row).
 * Two grouped scans of the session's rows (by the primary key's range), whatever the series' length.
 */
export async function downsampledSeries(q: Queryable, sessionId: number, afterVersion: number, maxPoints: number): Promise<{ points: SeriesPoint[]; downsampled: boolean }> {
  const [range] = await q.query<{ n: number; last: number | null }>(
    'SELECT count(*)::float8 AS n, max(version)::float8 AS last FROM step_history WHERE session_id = $1 AND version > $2',
    [sessionId, afterVersion],
  );
  if (range.n <= maxPoints || range.last === null) {
    const rows = await q.query<{ version: number; step: number; staleness: number; created_at: string; metrics: Record<string, number> | null }>(
      `SELECT version::float8 AS version, step::float8 AS step, staleness, created_at, metrics FROM step_history
       WHERE session_id = $1 AND version > $2 ORDER BY version LIMIT $3`,
      [sessionId, afterVersion, maxPoints],
    );
    return {
      downsampled: false,
      points: rows.map((r) => ({ version: r.version, step: r.step, time: new Date(r.created_at), staleness: r.staleness, values: r.metrics ?? {} })),
    };
  }
  const width = Math.ceil((range.last - afterVersion) / maxPoints);
  const bucket = '((version - $2 - 1) / $3)';
  const buckets = await q.query<{ b: number; version_from: number; version: number; step: number; time: string; staleness: number; staleness_max: number; count: number }>(
    `SELECT ${bucket}::float8 AS b, min(version)::float8 AS version_from, max(version)::float8 AS version, max(step)::float8 AS step,
       max(created_at) AS time, avg(staleness)::float8 AS staleness, max(staleness)::float8 AS staleness_max, count(*)::float8 AS count
     FROM step_history WHERE session_id = $1 AND version > $2 GROUP BY 1 ORDER BY 1`,
    [sessionId, afterVersion, width],
  );
  const figures = await q.query<{ b: number; key: string; min: number; max: number; mean: number }>(
    `SELECT ${bucket}::float8 AS b, m.key, min(m.value::float8) AS min, max(m.value::float8) AS max, avg(m.value::float8) AS mean
     FROM step_history, jsonb_each_text(metrics) m
     WHERE session_id = $1 AND version > $2 AND metrics IS NOT NULL GROUP BY 1, 2`,
    [sessionId, afterVersion, width],
  );
  const byBucket = new Map<number, SeriesPoint>();
  const points = buckets.map((r) => {
    const point: SeriesPoint = {
      version: r.version, step: r.step, time: new Date(r.time), staleness: r.staleness, values: {},
      versionFrom: r.version_from, count: r.count, stalenessMax: r.staleness_max, min: {}, max: {},
    };
    byBucket.set(r.b, point);
    return point;
  });
  for (const f of figures) {
    const point = byBucket.get(f.b);
    if (!point) continue;
    point.values[f.key] = f.mean;
    point.min![f.key] = f.min;
    point.max![f.key] = f.max;
  }
  return { points, downsampled: true };
}

export interface HyperChange {
  version: number;
  step: number;
  time: Date;
  paramGroups: Record<string, unknown>[];
}

/** The steps after `afterVersion` that changed hyperparameters, with each group's values after them. */
export async function hyperChanges(q: Queryable, sessionId: number, afterVersion: number, limit: number): Promise<HyperChange[]> {
  const rows = await q.query<{ version: number; step: number; created_at: string; hyper: Record<string, unknown>[] }>(
    `SELECT version::float8 AS version, step::float8 AS step, created_at, hyper FROM step_history
     WHERE session_id = $1 AND version > $2 AND hyper IS NOT NULL ORDER BY version LIMIT $3`,
    [sessionId, afterVersion, limit],
  );
  return rows.map((r) => ({ version: r.version, step: r.step, time: new Date(r.created_at), paramGroups: r.hyper }));
}

export interface Activity {
  stepsLastMinute: number;
  lastStepAt: Date | null;
}

/** Steps of the last minute and the time of the last step, per session id. */
export async function sessionActivity(q: Queryable, ids: readonly number[]): Promise<Map<number, Activity>> {
  if (ids.length === 0) return new Map();
  // The count runs only for sessions that stepped within the minute, over the primary key's newest
  // versions (at most 60,000: 1,000 steps/s), so an idle session with a long history costs one index probe.
  const rows = await q.query<{ id: number; last_step_at: string | null; steps: number }>(
    `SELECT s.id::float8 AS id, last.created_at AS last_step_at,
       CASE WHEN last.created_at > now() - interval '1 minute' THEN (
         SELECT count(*)::float8 FROM step_history h
         WHERE h.session_id = s.id AND h.version > s.version - 60000 AND h.created_at > now() - interval '1 minute'
       ) ELSE 0 END AS steps
     FROM sessions s
     LEFT JOIN LATERAL (SELECT created_at FROM step_history h WHERE h.session_id = s.id ORDER BY version DESC LIMIT 1) last ON true
     WHERE s.id = ANY($1::bigint[])`,
    [ids],
  );
  return new Map(rows.map((r) => [r.id, { stepsLastMinute: r.steps, lastStepAt: r.last_step_at === null ? null : new Date(r.last_step_at) }]));
}
