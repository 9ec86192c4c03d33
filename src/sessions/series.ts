// Reads of step_history for the dashboard: a long training series downsampled on the server (buckets of
// versions with min/max/mean of each metric, so a 100,000-step session opens with a few thousand
// numbers), the steps that changed hyperparameters, and the activity figures of the sessions list.
import type { Database, Queryable } from '../db/database.ts';
import { errors } from '../errors.ts';
import type { GroupSpec } from '../db/schema.ts';

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

/** Metric names one downsampled read holds (a scan reads 5 columns a name, 8 more: within PostgreSQL's 1664). */
export const METRICS_PER_READ = 330;
/**
 * Figures (a name in a bucket: its min, max, count and two partial sums) one downsampled read computes at most:
 * the names it holds are fewer where the buckets are many. 330 names in 10,000 buckets were 16.5 million
 * values in one answer of PostgreSQL's, and eight such reads at once ran a replica out of heap (a hostile
 * review); the dashboard's reads (1,500 buckets) keep all 330.
 */
export const FIGURES_PER_READ = 500_000;
/** Downsampled reads one process runs at once; more wait their turn (each holds up to FIGURES_PER_READ figures). */
export const DOWNSAMPLED_READS_AT_ONCE = 2;

/** The metric names a downsampled read of `buckets` buckets holds at most. */
export const namesPerRead = (buckets: number): number => Math.max(1, Math.min(METRICS_PER_READ, Math.floor(FIGURES_PER_READ / Math.max(1, buckets))));

/** Downsampled reads that wait for a turn in one process, at most; more are 503 TOO_MANY_WAITERS. */
export const DOWNSAMPLED_READS_QUEUED = 16;

let readsRunning = 0;
const readsWaiting: (() => void)[] = [];
/**
 * Runs `fn` in its turn among this process's downsampled reads (DOWNSAMPLED_READS_AT_ONCE at a time, at
 * most DOWNSAMPLED_READS_QUEUED waiting). A read whose client is gone (`signal`) leaves the queue, and is
 * not run when its turn comes (a review: reads abandoned after 3 s still ran, 18 s each, ahead of the
 * dashboard's).
 */
async function inTurn<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  if (readsRunning >= DOWNSAMPLED_READS_AT_ONCE) {
    if (readsWaiting.length >= DOWNSAMPLED_READS_QUEUED) throw errors.tooManyWaiters('downsampled metrics reads (max_points) waiting for their turn', DOWNSAMPLED_READS_QUEUED);
    await new Promise<void>((resolve, reject) => {
      const turn = () => {
        signal?.removeEventListener('abort', gone);
        resolve();
      };
      const gone = () => {
        const at = readsWaiting.indexOf(turn);
        if (at >= 0) readsWaiting.splice(at, 1);
        reject(signal!.reason ?? new Error('the client is gone'));
      };
      readsWaiting.push(turn);
      signal?.addEventListener('abort', gone, { once: true });
      if (signal?.aborted) gone();
    });
  } else readsRunning++;
  try {
    if (signal?.aborted) throw signal.reason ?? new Error('the client is gone');
    return await fn();
  } finally {
    const next = readsWaiting.shift();
    if (next) next(); // the turn passes on: as many run
    else readsRunning--;
  }
}

/** Names the cache of `createMetricNames` holds over all its sessions; a session with more is not cached. */
const NAMES_CACHED = 200_000;

/**
 * The metric names a downsampled read of a session charts: at most METRICS_PER_READ of them, `loss` first,
 * then those the most steps reported, then by name; and how many names the session's steps reported in all.
 * A session's names had no bound (each step may bring 32 new ones): a read scanned the history once per 330
 * names, and 600 steps of new names held an embedded server 18 s (a review); one read is one scan now.
 *
 * Each session's names with the number of steps that reported them are kept per session id and extended
 * with the rows after the newest version already counted: rows are only appended, in version order (each
 * under the session's row lock), so counts through version V stay right; counting them over 100,000 rows
 * takes ~300 ms, which a page would otherwise pay on every open. The cache holds at most NAMES_CACHED names
 * (least recently read sessions go first); a session with more is counted afresh by each read.
 */
export function createMetricNames(capacity = NAMES_CACHED) {
  const known = new Map<number, { through: number; counts: Map<string, number> }>();
  let held = 0;
  const forget = (id: number) => {
    const entry = known.get(id);
    if (entry) held -= entry.counts.size;
    known.delete(id);
  };
  return async (q: Queryable, sessionId: number, through: number, most = METRICS_PER_READ): Promise<{ names: string[]; total: number }> => {
    let entry = known.get(sessionId);
    forget(sessionId);
    if (!entry || entry.through < through) {
      const from = entry && entry.through <= through ? entry.through : 0;
      const counts = new Map(from ? entry!.counts : []);
      // At most capacity + 1 names come back: a session with more is chosen among in SQL, below.
      const rows = await q.query<{ key: string; n: number }>(
        `SELECT key, count(*)::float8 AS n FROM step_history, jsonb_object_keys(metrics) AS key
         WHERE session_id = $1 AND version > $2 AND version <= $3 AND metrics IS NOT NULL GROUP BY key LIMIT $4`,
        [sessionId, from, through, capacity + 1],
      );
      for (const r of rows) counts.set(r.key, (counts.get(r.key) ?? 0) + r.n);
      if (counts.size > capacity) return chosenInSql(q, sessionId, 0, through, most);
      entry = { through, counts };
    }
    known.set(sessionId, entry); // (re-)inserted: the Map's order is then least recently read first
    held += entry.counts.size;
    for (const id of known.keys()) {
      if (held <= capacity || id === sessionId) break;
      forget(id);
    }
    const names = [...entry.counts].sort(([a, m], [b, n]) => Number(b === 'loss') - Number(a === 'loss') || n - m || (a < b ? -1 : a > b ? 1 : 0));
    return { names: names.slice(0, most).map(([name]) => name).sort(), total: entry.counts.size };
  };
}

/**
 * The names the steps after version `after` through `through` reported, chosen as createMetricNames
 * chooses them: for a session with more names than the cache holds, and for a read after a version (its
 * names are those of its steps: a read of the newest steps left out the one name they report, a review).
 */
async function chosenInSql(q: Queryable, sessionId: number, after: number, through: number, most: number): Promise<{ names: string[]; total: number }> {
  const rows = await q.query<{ key: string; total: number }>(
    `SELECT key, count(*) OVER ()::float8 AS total FROM (
       SELECT key, count(*) AS n FROM step_history, jsonb_object_keys(metrics) AS key
       WHERE session_id = $1 AND version > $2 AND version <= $3 AND metrics IS NOT NULL GROUP BY key
     ) k ORDER BY key = 'loss' DESC, n DESC, key COLLATE "C" LIMIT $4`,
    [sessionId, after, through, most],
  );
  return { names: rows.map((r) => r.key).sort(), total: rows[0]?.total ?? 0 };
}

export type MetricNames = ReturnType<typeof createMetricNames>;

/**
 * The series after `afterVersion` in at most `maxPoints` points: the raw points when there are that few,
 * else buckets of `width` consecutive versions from the first (a version without a step, e.g. a restore,
 * has no row). With the metric names known, one grouped scan in version order (the primary key) computes every figure
 * as a column. Expanding each row's metrics into rows (jsonb_each) and grouping those was 10x slower:
 * 200,000 rows sorted by (bucket, key), planned so large that PostgreSQL compiled the query (JIT).
 */
export async function downsampledSeries(
  db: Database, metricNames: MetricNames, sessionId: number, afterVersion: number, maxPoints: number, signal?: AbortSignal,
): Promise<{ points: SeriesPoint[]; downsampled: boolean; metricsLeftOut?: number }> {
  const [range] = await db.query<{ n: number; first: number | null; last: number | null }>(
    'SELECT count(*)::float8 AS n, min(version)::float8 AS first, max(version)::float8 AS last FROM step_history WHERE session_id = $1 AND version > $2',
    [sessionId, afterVersion],
  );
  if (range.n <= maxPoints || range.first === null || range.last === null) {
    const rows = await db.query<{ version: number; step: number; staleness: number; created_at: string; metrics: Record<string, number> | null }>(
      `SELECT version::float8 AS version, step::float8 AS step, staleness, created_at, metrics FROM step_history
       WHERE session_id = $1 AND version > $2 ORDER BY version LIMIT $3`,
      [sessionId, afterVersion, maxPoints],
    );
    return {
      downsampled: false,
      points: rows.map((r) => ({ version: r.version, step: r.step, time: new Date(r.created_at), staleness: r.staleness, values: r.metrics ?? {} })),
    };
  }
  return inTurn(() => downsampled(db, metricNames, sessionId, afterVersion, maxPoints, range.first!, range.last!, range.n), signal);
}

async function downsampled(
  db: Database, metricNames: MetricNames, sessionId: number, afterVersion: number, maxPoints: number, first: number, last: number, n: number,
): Promise<{ points: SeriesPoint[]; downsampled: boolean; metricsLeftOut?: number }> {
  const { width, room } = bucketWidth(first, last, n, maxPoints);
  const most = namesPerRead(Math.ceil((last - first + 1) / width));
  // A mean is summed in two parts: values of magnitude 1 or more each divided by a power of two at least
  // the bucket's width (exactly), so that their sum cannot overflow, and the others as they are, so that no
  // division underflows (PostgreSQL raises an error where a quotient of a nonzero value is 0: one metric of
  // 5e-324 made every downsampled read of the session fail, found by a review). The mean is put together
  // here, where a quotient that underflows is 0 or subnormal, as IEEE has it: a bucket of finite values has a
  // finite mean, whatever their size. (avg(float8) also sums the squares, which overflow above 1.3e154.)
  const scale = 2 ** Math.ceil(Math.log2(width));
  const rows = await db.transaction(async (tx) => {
    // The planner guesses 100 keys a row for jsonb_object_keys and would compile that query (JIT) for
    // seconds; the scan itself takes milliseconds.
    // The grouping sorts ~10 MB for 100,000 rows: in memory, not in a temporary file.
    if (db.kind === 'postgres') {
      await tx.query('SET LOCAL jit = off');
      await tx.query("SET LOCAL work_mem = '64MB'");
    }
    const { names: keys, total } = afterVersion > 0 ? await chosenInSql(tx, sessionId, afterVersion, last, most) : await metricNames(tx, sessionId, last, most);
    // Each metric is read from the row's jsonb once (the subquery; OFFSET 0 keeps it from being inlined).
    // $5 (the scale) is selected too: a session that reported no metrics has no figures that use it, and a
    // parameter the statement never names is refused by PostgreSQL.
    const values = keys.map((_, k) => `, (metrics->>$${k + 6})::float8 AS v${k}`).join('');
    const figures = keys.map((_, k) => `, min(v${k}) AS "min${k}", max(v${k}) AS "max${k}", count(v${k})::float8 AS "n${k}"`
      + `, sum(CASE WHEN abs(v${k}) >= 1 THEN v${k} / $5 END) AS "big${k}", sum(CASE WHEN abs(v${k}) < 1 THEN v${k} END) AS "small${k}"`).join('');
    const buckets = await tx.query<Record<string, number | string | null>>(
      `SELECT min(version)::float8 AS version_from, max(version)::float8 AS version,
         avg(staleness)::float8 AS staleness, max(staleness)::float8 AS staleness_max, count(*)::float8 AS count,
         min(step)::float8 AS step_min, max(step)::float8 AS step_max, $5::float8 AS scale${figures}
       FROM (SELECT version, step, staleness${values} FROM step_history WHERE session_id = $1 AND version > $2 OFFSET 0) r
       GROUP BY (version - $4) / $3 ORDER BY 1`,
      [sessionId, afterVersion, width, first, scale, ...keys],
    );
    // A bucket's step and time are those of its last version, not the largest in it: after a restore a
    // bucket can hold the abandoned history's last steps and then the first steps of the new one (its
    // largest step was an abandoned one, and the dashboard took the bucket for abandoned; a review).
    const ends = await tx.query<{ version: number; step: number; created_at: string }>(
      'SELECT version::float8 AS version, step::float8 AS step, created_at FROM step_history WHERE session_id = $1 AND version = ANY($2::bigint[])',
      [sessionId, buckets.flatMap((r) => [r.version, r.version_from])],
    );
    const at = new Map(ends.map((r) => [r.version, r]));
    // A bucket is one run of steps when its steps go up by one a row from its first version to its last. One
    // that is not spans a restore or a load (its abandoned steps and the new ones): it is read row by row and
    // split into its runs, so that no point mixes two histories (a browser review: the first point after a
    // restore averaged the abandoned steps' loss in). Within the room bucketWidth left; a restore or load
    // makes a version with no row, so there are at most as many such buckets as gaps.
    const runs = new Map<number, SeriesPoint[]>();
    for (const r of buckets) {
      if (runs.size >= room) break;
      const count = r.count as number;
      const oneRun = (r.step_max as number) - (r.step_min as number) === count - 1
        && at.get(r.version_from as number)?.step === r.step_min && at.get(r.version as number)?.step === r.step_max;
      if (oneRun) continue;
      const raw = await tx.query<RawRow>(
        `SELECT version::float8 AS version, step::float8 AS step, staleness, created_at, metrics FROM step_history
         WHERE session_id = $1 AND version >= $2 AND version <= $3 ORDER BY version`,
        [sessionId, r.version_from, r.version],
      );
      runs.set(r.version as number, splitRuns(raw).map((run) => runPoint(run, keys, scale)));
    }
    return { keys, total, buckets, at, runs };
  }, { consistentRead: true });
  const points = rows.buckets.flatMap((r) => rows.runs.get(r.version as number) ?? [bucketPoint(r)]);
  return { points, downsampled: true, ...(rows.total > rows.keys.length && { metricsLeftOut: rows.total - rows.keys.length }) };

  function bucketPoint(r: Record<string, number | string | null>): SeriesPoint {
    const last = rows.at.get(r.version as number)!;
    const point: SeriesPoint = {
      version: r.version as number, step: last.step, time: new Date(last.created_at), staleness: r.staleness as number, values: {},
      versionFrom: r.version_from as number, count: r.count as number, stalenessMax: r.staleness_max as number, min: {}, max: {},
    };
    rows.keys.forEach((key, k) => {
      const n = r[`n${k}`] as number;
      if (n === 0) return; // no step of this bucket reported it
      setFigure(point, key, { n, min: r[`min${k}`] as number, max: r[`max${k}`] as number, big: r[`big${k}`] as number | null ?? 0, small: r[`small${k}`] as number | null ?? 0 }, scale);
    });
    return point;
  }
}

interface RawRow { version: number; step: number; staleness: number; created_at: string; metrics: Record<string, number> | null }

/**
 * The width of downsampledSeries' buckets over versions first..last holding `rows` steps (the hyperparameter
 * history's buckets are the same), and the room it leaves for buckets split at a restore or load: a version
 * with no row (a restore, a load, a PATCH) may start another history, and each such split makes one more
 * point; the width leaves room for as many (fewer than half the points) so that the read stays within maxPoints.
 */
export function bucketWidth(first: number, last: number, rows: number, maxPoints: number): { width: number; room: number } {
  const room = Math.max(0, Math.min(last - first + 1 - rows, Math.floor((maxPoints - 1) / 2)));
  return { width: Math.ceil((last - first + 1) / (maxPoints - room)), room };
}

/** Rows in version order as runs of steps that go up by one (a restore or a load starts another). */
function splitRuns(rows: RawRow[]): RawRow[][] {
  const out: RawRow[][] = [];
  for (const row of rows) {
    const run = out[out.length - 1];
    if (run && row.step === run[run.length - 1].step + 1) run.push(row);
    else out.push([row]);
  }
  return out;
}

/** A run's point: the figures the grouped scan of downsampledSeries computes, here over the run's rows. */
function runPoint(run: RawRow[], keys: readonly string[], scale: number): SeriesPoint {
  const last = run[run.length - 1];
  const point: SeriesPoint = {
    version: last.version, step: last.step, time: new Date(last.created_at),
    staleness: run.reduce((a, r) => a + r.staleness, 0) / run.length, values: {},
    versionFrom: run[0].version, count: run.length, stalenessMax: Math.max(...run.map((r) => r.staleness)), min: {}, max: {},
  };
  for (const key of keys) {
    let n = 0;
    let min = Infinity;
    let max = -Infinity;
    let big = 0;
    let small = 0;
    for (const r of run) {
      const v = r.metrics?.[key];
      if (typeof v !== 'number') continue;
      n++;
      min = Math.min(min, v);
      max = Math.max(max, v);
      if (Math.abs(v) >= 1) big += v / scale;
      else small += v;
    }
    if (n > 0) setFigure(point, key, { n, min, max, big, small }, scale);
  }
  return point;
}

/**
 * A metric's figures in a point from the sums the mean is put together from (see downsampledSeries): the
 * mean within the point's range (the mean of equal values 1.7976931348623157e308 came out one ulp below
 * their min: a review), its min and max.
 */
function setFigure(point: SeriesPoint, key: string, f: { n: number; min: number; max: number; big: number; small: number }, scale: number): void {
  point.values[key] = Math.min(f.max, Math.max(f.min, (f.big / f.n) * scale + f.small / f.n));
  point.min![key] = f.min;
  point.max![key] = f.max;
}

export interface HyperChange {
  version: number;
  step: number;
  time: Date;
  /** 'step', or what else made the version: load_state_dict, load_checkpoint, restore. */
  reason: string;
  paramGroups: Record<string, unknown>[];
}

/**
 * The versions after `afterVersion` that changed hyperparameters, with each group's values after them:
 * steps that set them, and loads and restores that changed them (group_changes).
 */
/**
 * Most groups' values one answer of a session's history carries (a change, or a step that set
 * hyperparameters, lists every group's): a page of `limit` changes of a session of 20,000 groups was 212 MB
 * of JSON, built on the event loop, and every request of the process waited 36 s behind it (a review). With
 * many groups a page holds fewer changes than `limit` (its next_after_version goes on from there).
 */
export const GROUP_ENTRIES_PER_ANSWER = 100_000;

/**
 * The metrics a page of the training series holds at most, in bytes of their JSON (a page may pass it by
 * its last point): 10,000 steps of 32 names of 128 characters each were a 27 MB answer (a review).
 */
export const METRIC_BYTES_PER_PAGE = 8 * 1024 * 1024;

/** How many entries of a history listing every group's values fit an answer, at most `limit` (at least one). */
export const entriesWithin = (limit: number, groups: number): number => Math.max(1, Math.min(limit, Math.floor(GROUP_ENTRIES_PER_ANSWER / Math.max(1, groups))));

export async function hyperChanges(q: Queryable, sessionId: number, afterVersion: number, limit: number): Promise<HyperChange[]> {
  const rows = await q.query<ChangeRow>(`SELECT * FROM ${CHANGES_SQL} c ORDER BY version LIMIT $3`, [sessionId, afterVersion, limit]);
  return rows.map(changeOf);
}

/** The changes of session $1 after version $2 as one relation: the steps that set hyperparameters and group_changes. */
const CHANGES_SQL = `(SELECT version::float8 AS version, step::float8 AS step, created_at, 'step' AS reason, hyper FROM step_history
     WHERE session_id = $1 AND version > $2 AND hyper IS NOT NULL
     UNION ALL
     SELECT version::float8, step::float8, created_at, reason, hyper FROM group_changes WHERE session_id = $1 AND version > $2)`;

interface ChangeRow { version: number; step: number; created_at: string; reason: string; hyper: Record<string, unknown>[] }

const changeOf = (r: ChangeRow): HyperChange => ({ version: r.version, step: r.step, time: new Date(r.created_at), reason: r.reason, paramGroups: r.hyper });

/** The newest changes a downsampled read keeps as they are, whatever their bucket (the dashboard lists them). */
export const NEWEST_CHANGES_KEPT = 20;

/**
 * The changes after `afterVersion` fitted to the buckets of `downsampledSeries` with the same `afterVersion`
 * and `maxPoints` (the same first version and width), when there are more than `maxPoints`: in each bucket
 * its last change made by a step and its last change of another kind (a load, restore or PATCH), and the
 * newest NEWEST_CHANGES_KEPT changes whatever their bucket. The values in force at a bucket's last step
 * (its point on the dashboard's charts) are then exactly those the full history gives there. One scan in
 * version order; 100,000 changes are ~100 pages of the paged read.
 */
export async function downsampledHyperChanges(
  db: Database, sessionId: number, afterVersion: number, requestedPoints: number, groups = 1,
): Promise<{ changes: HyperChange[]; total: number; downsampled: boolean }> {
  // Within GROUP_ENTRIES_PER_ANSWER: with many groups, wider buckets and fewer of the newest kept as they are.
  const fit = Math.floor(GROUP_ENTRIES_PER_ANSWER / Math.max(1, groups) / 3);
  const maxPoints = Math.min(requestedPoints, Math.max(2, fit));
  const newestKept = Math.min(NEWEST_CHANGES_KEPT, Math.max(1, fit));
  return db.transaction(async (tx) => {
    const [range] = await tx.query<{ total: number; first: number | null; last: number | null; rows: number }>(
      `SELECT (SELECT count(*) FROM ${CHANGES_SQL} c)::float8 AS total, min(version)::float8 AS first, max(version)::float8 AS last, count(*)::float8 AS rows
       FROM step_history WHERE session_id = $1 AND version > $2`,
      [sessionId, afterVersion],
    );
    if (range.total <= maxPoints) {
      return { changes: await hyperChanges(tx, sessionId, afterVersion, maxPoints), total: range.total, downsampled: false };
    }
    if (db.kind === 'postgres') {
      await tx.query('SET LOCAL jit = off');
      await tx.query("SET LOCAL work_mem = '64MB'");
    }
    // No step after afterVersion (the changes are all loads/restores): buckets over the changes' own versions.
    let { first, last } = range;
    let stepRows = range.rows;
    if (first === null || last === null) {
      const [own] = await tx.query<{ first: number; last: number }>(
        'SELECT min(version)::float8 AS first, max(version)::float8 AS last FROM group_changes WHERE session_id = $1 AND version > $2',
        [sessionId, afterVersion],
      );
      ({ first, last } = own);
      stepRows = last - first + 1;
    }
    // The buckets of downsampledSeries (the same width for the same versions, rows and points).
    const { width } = bucketWidth(first!, last!, stepRows, maxPoints);
    const rows = await tx.query<ChangeRow>(
      `SELECT version, step, created_at, reason, hyper FROM (
         SELECT c.*,
           row_number() OVER (ORDER BY version DESC) AS from_end,
           row_number() OVER (PARTITION BY least(greatest(floor((version - $3) / $4), 0), $5 - 1), reason = 'step' ORDER BY version DESC) AS in_bucket
         FROM ${CHANGES_SQL} c
       ) r
       WHERE from_end <= $6 OR in_bucket = 1 ORDER BY version`,
      [sessionId, afterVersion, first, width, maxPoints, newestKept],
    );
    // Two buckets, each with its last change of each kind, are four changes: with more than 25,000 groups,
    // past GROUP_ENTRIES_PER_ANSWER (40,000 groups made 160,000 values; a review). The newest that fit are kept.
    const fits = Math.max(1, Math.floor(GROUP_ENTRIES_PER_ANSWER / Math.max(1, groups)));
    return {
      changes: rows.slice(-fits).map(changeOf),
      total: range.total,
      downsampled: true,
    };
  }, { consistentRead: true });
}

/**
 * Each group's hyperparameters at the session's first version (the initial_groups table), in the form of a
 * change's: what was in force before the first change. null when not known (see the table).
 */
export async function initialHyperparameters(q: Queryable, sessionId: number): Promise<Record<string, unknown>[] | null> {
  const [row] = await q.query<{ groups: GroupSpec[] }>('SELECT groups FROM initial_groups WHERE session_id = $1', [sessionId]);
  return row?.groups?.map((g) => ({ lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weight_decay, maximize: g.maximize })) ?? null;
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
