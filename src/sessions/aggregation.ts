// Synchronous rounds (issue 13), the parts that need no database: the `aggregation` option, when a round is
// due, and the combined gradient of a round, written as the documented formula (README "Rounds"):
//
//   for each parameter, the contributions that carry it in ascending order of `worker` (byte order):
//   s = g_1; s = fl32(s + g_k) for k = 2..n; mean = fl32(s / n)
//
// which torch reproduces elementwise with `s = g[0].clone(); for g in rest: s += g; s /= n` on float32
// tensors (at::div_true_kernel divides; it does not multiply by a reciprocal, checked against 1.13).
// In JS each operation is done in double and stored into a Float32Array: for +, - and / of float32 values
// double has more than 2p + 2 bits, so rounding twice gives the float32 result (Figueroa, "When is double
// rounding innocuous?", 1995).
import type { Aggregation } from '../db/schema.ts';
import { errors } from '../errors.ts';
import { widen, type GradDtype } from './gradients.ts';
import { MAX_METRICS } from './step-input.ts';
import type { SessionState } from './state.ts';

export type { Aggregation };

export const MAX_ROUND_CONTRIBUTIONS = 1024;
export const MAX_ROUND_TIMEOUT_S = 86_400;
/** samples is an int4 column; a target beyond any sum of them is pointless but harmless. */
export const MAX_SAMPLES = 2_147_483_647;
const KEYS = ['contributions', 'timeout_s', 'min_contributions', 'target_samples'];

/**
 * A step request sent to a session with `aggregation`: it is a contribution to the open round
 * (src/sessions/rounds.ts), not a step. Thrown by the step path before anything is written.
 */
export class AggregatedSession extends Error {
  readonly session: string;

  constructor(session: string) {
    super(`session ${session} takes contributions to rounds`);
    this.name = 'AggregatedSession';
    this.session = session;
  }
}

const whole = (value: unknown, field: string, min: number, max: number): number => {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min || value > max) throw errors.invalidBody(`${field}: must be a whole number from ${min} to ${max}`);
  return value;
};

/**
 * The `aggregation` of a create or settings request: undefined when absent, null to have none. The JSON
 * forms' schemas check the types too; this is the one check for every form (a file's options included),
 * with the rules between the keys.
 */
export function parseAggregation(value: unknown, field = 'aggregation'): Aggregation | null | undefined {
  if (value === undefined || value === null) return value;
  if (typeof value !== 'object' || Array.isArray(value)) throw errors.invalidBody(`${field}: must be an object {"contributions"?, "timeout_s"?, "min_contributions"?, "target_samples"?}`);
  const input = value as Record<string, unknown>;
  for (const key of Object.keys(input)) if (!KEYS.includes(key)) throw errors.invalidBody(`${field}.${key}: unknown key (one of ${KEYS.join(', ')})`);
  const out: Aggregation = {};
  if (input.contributions !== undefined) out.contributions = whole(input.contributions, `${field}.contributions`, 1, MAX_ROUND_CONTRIBUTIONS);
  if (input.timeout_s !== undefined) {
    const t = input.timeout_s;
    if (typeof t !== 'number' || !Number.isFinite(t) || t <= 0 || t > MAX_ROUND_TIMEOUT_S) throw errors.invalidBody(`${field}.timeout_s: must be a number of seconds above 0, at most ${MAX_ROUND_TIMEOUT_S}`);
    out.timeout_s = t;
  }
  if (input.min_contributions !== undefined) {
    if (out.timeout_s === undefined) throw errors.invalidBody(`${field}.min_contributions: only with timeout_s (the round waits for all contributions otherwise)`);
    out.min_contributions = whole(input.min_contributions, `${field}.min_contributions`, 1, out.contributions ?? MAX_ROUND_CONTRIBUTIONS);
  }
  if (input.target_samples !== undefined) out.target_samples = whole(input.target_samples, `${field}.target_samples`, 1, Number.MAX_SAFE_INTEGER);
  if (out.contributions === undefined && out.target_samples === undefined) throw errors.invalidBody(`${field}: needs contributions or target_samples (or both)`);
  return out;
}

/** The fewest contributions a round that timed out steps with. */
export const minContributions = (a: Aggregation) => a.min_contributions ?? a.contributions ?? 1;

/** What is known of an open round when deciding whether it steps. */
export interface RoundTally {
  contributions: number;
  /** The contributions' samples added up (0 when none reported any). */
  samples: number;
  /** Seconds since the round's first contribution, by the database's clock. */
  ageSeconds: number;
}

/** Whether the round steps now, and whether because of its timeout. */
export function roundDue(a: Aggregation, tally: RoundTally): { due: boolean; timedOut: boolean } {
  if (tally.contributions === 0) return { due: false, timedOut: false };
  if (a.contributions !== undefined && tally.contributions >= a.contributions) return { due: true, timedOut: false };
  // Whatever else it waits for (target_samples, a timeout): a round holds at most this many contributions
  // (a hostile review: a target_samples round took 1,500, all read at once when it stepped).
  if (tally.contributions >= MAX_ROUND_CONTRIBUTIONS) return { due: true, timedOut: false };
  if (a.target_samples !== undefined && tally.samples >= a.target_samples) return { due: true, timedOut: false };
  if (a.timeout_s !== undefined && tally.ageSeconds >= a.timeout_s && tally.contributions >= minContributions(a)) return { due: true, timedOut: true };
  return { due: false, timedOut: false };
}

/** A stored contribution's gradients, as step_log keeps a step's (gradients.ts packGradients). */
export interface ContributedGradients {
  worker: string;
  present: readonly number[];
  grads: Buffer;
  dtype: GradDtype;
}

/** Ascending byte order of ASCII worker ids (JS compares UTF-16 code units: the same for ASCII). */
export const byWorker = (a: { worker: string }, b: { worker: string }) => (a.worker < b.worker ? -1 : a.worker > b.worker ? 1 : 0);

/**
 * Writes the round's combined gradient into `state.arena.grads` (the formula above): `add` the
 * contributions in worker order, in as many calls as needed (a round's are read from the database a page at
 * a time, so that its gradients are never all in memory), then `finish`, which returns the parameters that
 * have one, ascending.
 */
export function contributionCombiner(state: SessionState): { add(contributions: readonly ContributedGradients[]): void; finish(): number[] } {
  const { layout } = state;
  const counts = new Uint32Array(layout.params.length);
  let scratch = new Float32Array(0);
  const add = (contributions: readonly ContributedGradients[]) => {
    for (const c of contributions) {
      const width = c.dtype === 'float32' ? 4 : 2;
      let total = 0;
      for (const i of c.present) total += layout.numels[i];
      if (c.grads.byteLength !== total * width) throw new Error(`contribution of ${c.worker} holds ${c.grads.byteLength} bytes, expected ${total * width}`);
      const aligned = c.grads.byteOffset % width === 0 ? c.grads : Buffer.from(c.grads);
      let at = 0;
      for (const i of c.present) {
        const numel = layout.numels[i];
        let g: Float32Array;
        if (c.dtype === 'float32') {
          g = new Float32Array(aligned.buffer, aligned.byteOffset + at * 4, numel);
        } else {
          if (scratch.length < numel) scratch = new Float32Array(numel);
          g = scratch.subarray(0, numel);
          widen(c.dtype, new Uint16Array(aligned.buffer, aligned.byteOffset + at * 2, numel), g);
        }
        at += numel;
        const s = state.grad(i);
        if (counts[i] === 0) s.set(g);
        else for (let k = 0; k < numel; k++) s[k] += g[k];
        counts[i]++;
      }
    }
  };
  const finish = () => {
    const present: number[] = [];
    counts.forEach((n, i) => {
      if (n === 0) return; // no contribution carries it: skipped, as PyTorch skips p.grad is None
      present.push(i);
      if (n === 1) return;
      const s = state.grad(i);
      for (let k = 0; k < s.length; k++) s[k] /= n;
    });
    return present;
  };
  return { add, finish };
}

/** The round's metrics: each name's mean over the contributions that report it (in worker order). */
export function averageMetrics(contributions: readonly { metrics: Record<string, number> | null }[]): Record<string, number> | null {
  const sums = new Map<string, { sum: number; n: number; values: number[] }>();
  for (const c of contributions) {
    for (const [name, value] of Object.entries(c.metrics ?? {})) {
      const entry = sums.get(name) ?? { sum: 0, n: 0, values: [] };
      entry.sum += value;
      entry.n++;
      entry.values.push(value);
      sums.set(name, entry);
    }
  }
  if (sums.size === 0) return null;
  // Finite values have a finite mean: when their sum overflows (two of 1.7e308), each is divided first.
  const mean = ({ sum, n, values }: { sum: number; n: number; values: number[] }) =>
    Number.isFinite(sum) ? sum / n : values.reduce((a, v) => a + v / n, 0);
  // As many names as a step carries: those the most contributions reported, then in worker order (a
  // hostile review: a round of 3 workers each with 32 names of its own stored a point of 96; of 1,024, 32,768).
  const kept = [...sums].map((entry, order) => ({ entry, order })).sort((a, b) => b.entry[1].n - a.entry[1].n || a.order - b.order).slice(0, MAX_METRICS);
  return Object.fromEntries(kept.sort((a, b) => a.order - b.order).map(({ entry: [name, e] }) => [name, mean(e)]));
}
