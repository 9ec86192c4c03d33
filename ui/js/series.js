// A session's training series as the charts need it: the metrics route's points (raw, or buckets of
// versions with min/max/mean when the server downsampled), and the figures derived from them.

/**
 * @typedef {{ version: number, step: number, time: number, staleness: number, staleness_max?: number,
 *   values: Record<string, number>, min?: Record<string, number>, max?: Record<string, number>, count?: number,
 *   version_from?: number, param_groups?: Record<string, any>[] }} Point
 * @typedef {{ version: number, step: number, time: string, reason?: string, param_groups: Record<string, any>[] }} HyperChange
 */

/**
 * How many points the page asks for: enough for a wide chart, few enough to open at once. Tests set fewer
 * (`window.asgdMaxPoints`, before the page's scripts run) to see the page switch to buckets sooner.
 * @type {number}
 */
export const MAX_POINTS = /** @type {any} */ (globalThis).asgdMaxPoints ?? 1500;

/** @param {any} p @returns {Point} */
export function toPoint(p) {
  // Metric names are the workers' (any of [A-Za-z0-9._-]): a name like "constructor" must not find
  // Object.prototype's member where a point lacks that metric, so the maps have no prototype.
  return { ...p, time: Date.parse(p.time), values: ownMap(p.values), ...(p.min && { min: ownMap(p.min) }), ...(p.max && { max: ownMap(p.max) }) };
}

/** @param {Record<string, number> | null | undefined} o @returns {Record<string, number>} */
function ownMap(o) {
  return Object.assign(Object.create(null), o ?? {});
}

/**
 * The session's present history: after a restore (or a load that set the step back) the series holds the
 * steps of the abandoned history too (steps 1..40, then 21..40 again). Walking from the newest point back,
 * a point is kept when its step is below the last kept one's, so the steps (and versions, and times) of
 * what is kept strictly increase. A series without a going-back is returned as it is.
 * @template {{ step: number }} T
 * @param {T[]} points in version order @returns {T[]}
 */
export function lineage(points) {
  let monotone = true;
  for (let i = 1; i < points.length && monotone; i++) monotone = points[i].step > points[i - 1].step;
  if (monotone) return points;
  /** @type {T[]} */
  const kept = [];
  let below = Infinity;
  for (let i = points.length - 1; i >= 0; i--) {
    if (points[i].step < below) {
      kept.push(points[i]);
      below = points[i].step;
    }
  }
  return kept.reverse();
}

/**
 * The present history up to the session as it is now: `lineage`, and when the session went back after the
 * last point (a restore or a load adds no point), without the points after its step, until a step comes.
 * @template {{ step: number, version: number }} T
 * @param {T[]} points in version order @param {{ step: number, version: number } | null} [now] the session
 * @returns {T[]}
 */
export function present(points, now) {
  const kept = lineage(points);
  const last = kept[kept.length - 1];
  if (!now || !last || now.version <= last.version || now.step >= last.step) return kept;
  return kept.filter((p) => p.step <= now.step);
}

/**
 * The hyperparameter changes of the present history, not those of an abandoned history: a change made by a
 * step that was kept, or one that is not a step (a load or restore) whose step is below that of the next
 * kept point (or, with `now`, not above the session's step when no point came after it).
 * @param {HyperChange[]} changes sorted by version @param {Point[]} kept `present`'s (or `lineage`'s) points
 * @param {Point[]} points all of them @param {{ step: number, version: number } | null} [now] the session
 */
export function changesOn(changes, kept, points, now = null) {
  if (kept.length === points.length) return changes;
  let k = 0;
  return changes.filter((c) => {
    while (k < kept.length && kept[k].version < c.version) k++;
    const p = kept[k];
    if (p === undefined) return now ? c.step <= now.step && c.version <= now.version : c.version > (points.at(-1)?.version ?? 0);
    if ((p.version_from ?? p.version) <= c.version) return true;
    return c.step < p.step && (k === 0 || c.step >= kept[k - 1].step);
  });
}

/** Metric names, loss first, then by name. @param {Point[]} points */
export function metricNames(points) {
  const names = new Set();
  for (const p of points) for (const k of Object.keys(p.values ?? {})) names.add(k);
  return [...names].sort((a, b) => (a === 'loss' ? -1 : b === 'loss' ? 1 : a < b ? -1 : a > b ? 1 : 0));
}

/** The window of the "steps/s" figure, in the list and on a session's page alike. */
export const RATE_WINDOW_MS = 60_000;
/** How the "steps/s" figure is labelled wherever it is shown: the same definition as the API's activity. */
export const RATE_LABEL = 'steps/s (steps in last min ÷ 60)';

/**
 * Steps per second as the sessions list shows it (the API's `activity.steps_per_second`): the steps made
 * in the last minute, divided by 60 (not by the span of those steps). Every point is a step (a bucket of
 * `count` steps when downsampled), those of an abandoned history too, as the server counts them. Not
 * `exact` when the oldest point counted is a bucket of several steps: its first ones may be older than the
 * minute (a bucket of 36 steps, 10 of them in the minute, gave 0.6 where the API said 0.1667; a review).
 * @param {Point[]} points @param {number} [now]
 */
export function stepsLastMinute(points, now = Date.now()) {
  let steps = 0;
  let i = points.length - 1;
  for (; i >= 0 && points[i].time > now - RATE_WINDOW_MS; i--) steps += points[i].count ?? 1;
  const oldest = points[i + 1];
  return { steps, perSecond: steps / (RATE_WINDOW_MS / 1000), exact: !oldest || (oldest.count ?? 1) <= 1 };
}

/**
 * Where the steps of a downsampled read that the cards need one by one begin: the oldest bucket whose last
 * step is in the last minute (its first steps may be older), else the last bucket (the last step's
 * staleness); -1 when the last point is not a bucket.
 * @param {Point[]} points @param {number} [now]
 */
export function rawTailFrom(points, now = Date.now()) {
  let i = points.length - 1;
  if (i < 0 || points[i].count === undefined) return -1;
  while (i > 0 && points[i - 1].count !== undefined && points[i - 1].time > now - RATE_WINDOW_MS) i--;
  return i;
}

/**
 * The series with the buckets of versions above `tail.after` up to `tail.upTo` replaced by their steps
 * (read one by one), for the cards: the charts keep the buckets.
 * @param {Point[]} points @param {{ after: number, upTo: number, points: Point[] } | null} tail
 */
export function withRawTail(points, tail) {
  if (!tail) return points;
  return [...points.filter((p) => p.version <= tail.after), ...tail.points, ...points.filter((p) => p.version > tail.upTo)];
}

/**
 * Steps per second at each point, over a window of ~1/100 of the series (at least one point), so that a
 * raw series of single steps is not dominated by the jitter between two requests.
 * @param {Point[]} points @returns {(number | null)[]}
 */
export function stepsPerSecond(points) {
  const w = Math.max(1, Math.round(points.length / 100));
  return points.map((p, i) => {
    if (i === 0) return null;
    const q = points[Math.max(0, i - w)];
    const dt = (p.time - q.time) / 1000;
    const ds = p.step - q.step;
    return dt > 0 && ds >= 0 ? ds / dt : null;
  });
}

/**
 * The groups' hyperparameters in force at each point: the newest change at or below its version; before
 * the first change, the session's first version's (`initial`). A service that does not say those: its
 * groups now when it never changed them, else unknown (null).
 * @param {Point[]} points @param {HyperChange[]} changes sorted by version @param {Record<string, any>[]} current
 * @param {Record<string, any>[] | null} [initial]
 * @returns {(Record<string, any>[] | null)[]}
 */
export function hyperAt(points, changes, current, initial = null) {
  let c = -1;
  return points.map((p) => {
    while (c + 1 < changes.length && changes[c + 1].version <= p.version) c++;
    if (c >= 0) return changes[c].param_groups;
    return initial ?? (changes.length === 0 ? current : null);
  });
}

/**
 * ASGD's eta and mu after a step, as torch.optim.asgd computes them from the group's values:
 * eta = lr / (1 + lambd * lr * step) ** alpha, mu = 1 / max(1, step - t0).
 * @param {Record<string, any>} g @param {number} step
 */
export function etaMu(g, step) {
  return { eta: g.lr / (1 + g.lambd * g.lr * step) ** g.alpha, mu: 1 / Math.max(1, step - g.t0) };
}
