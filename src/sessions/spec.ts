// What a session is made of: named float32 parameters and torch.optim.ASGD param groups.
// Validation mirrors torch/optim/asgd.py (ASGD.__init__) and torch/optim/optimizer.py (add_param_group),
// and is stricter where a value would break the run (negative lambd/alpha, non-finite numbers).
import { errors, quoteValue } from '../errors.ts';
import type { GroupSpec, ParamSpec } from '../db/schema.ts';
import { ASGD_DEFAULTS, type AsgdHyperparameters } from '../optim/types.ts';
import { decayFactor } from '../optim/asgd.ts';
import { pow } from '../optim/pow.ts';

/**
 * A session name, the one definition: URLs, schemas, the log's session field and assertName use it.
 * `.` and `..` are refused: as a path segment they are dot segments, which clients and proxies resolve
 * away (RFC 3986 section 5.2.4), so no URL could name such a session. The lookahead ends the dots at any
 * character that is not a name's, so the source also works inside a longer pattern (src/app.ts).
 */
export const SESSION_NAME_SOURCE = '(?!\\.\\.?(?![A-Za-z0-9._-]))[A-Za-z0-9._-]{1,128}';
/** What a name may be, in words (the OpenAPI document, metric name errors; src/errors.ts says it too). */
/** The bounds of a session's settings: the API's (create, PATCH) and their defaults' in the environment (src/config.ts). */
export const SETTING_LIMITS = {
  snapshot_every: 1_000_000, keep_snapshots: 100_000, max_staleness: 2_147_483_647,
  keep_log_bytes: Number.MAX_SAFE_INTEGER, expire_after_idle_s: 2_147_483_647,
} as const;

export const SESSION_NAME_RULE = '1-128 characters of A-Za-z0-9._-, not "." or ".."';
export const NAME_PATTERN = new RegExp(`^${SESSION_NAME_SOURCE}$`);
export const PARAM_NAME_MAX = 256;
/** Largest session: every tensor and every logged gradient must stay below PostgreSQL's 1 GB value limit. */
export const MAX_SESSION_NUMEL = 250_000_000;
export const MAX_PARAMS = 100_000;
/**
 * The most steps a loaded checkpoint may say a session took: 2^50 (over 10^15), far below 2^53, so that the
 * steps after it are still counted exactly (answers compute step numbers in doubles).
 */
export const MAX_LOADED_STEP = 2 ** 50;
export const MAX_DIMS = 16;

export const HYPERPARAMETER_KEYS = ['lr', 'lambd', 'alpha', 't0', 'weight_decay', 'maximize'] as const;
/** Keys PyTorch puts in an ASGD group besides the hyperparameters; only their harmless values are accepted. */
export const FLAG_KEYS = ['foreach', 'differentiable', 'capturable'] as const;

export type HyperparameterInput = Partial<Record<(typeof HYPERPARAMETER_KEYS)[number] | (typeof FLAG_KEYS)[number], unknown>>;

export function assertName(value: unknown, field: string): string {
  if (typeof value !== 'string' || !NAME_PATTERN.test(value)) throw errors.invalidName(field);
  return value;
}

export function assertShape(value: unknown, field: string): number[] {
  if (!Array.isArray(value)) throw errors.invalidTensor(field, 'must be a list of whole numbers');
  if (value.length > MAX_DIMS) throw errors.invalidTensor(field, `${value.length} dimensions; at most ${MAX_DIMS} are allowed`);
  let numel = 1;
  for (const [i, d] of value.entries()) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) throw errors.invalidTensor(`${field}[${i}]`, 'must be a whole number >= 0');
    numel *= d;
    if (numel > MAX_SESSION_NUMEL) throw errors.invalidTensor(field, `more than ${MAX_SESSION_NUMEL} elements`);
  }
  return value as number[];
}

export const numelOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/**
 * The hyperparameters a JSON body wrote as integer literals (`10`, not `10.0`), by the object holding them
 * (recorded by recordIntegerLiterals for creation and state_dict bodies): torch keeps an int `t0` an int,
 * and its .pt file says so. An object with numbers of these keys has a set, empty when none was.
 */
export const integerLiterals = new WeakMap<object, ReadonlySet<string>>();


/**
 * A JSON.parse reviver that records integerLiterals from each number's source text (Node 24's JSON.parse):
 * of the hyperparameters, and of any other key of an object (a param group's extra keys: a scheduler's
 * `last_epoch`, a step count of one's own), never of an array's elements (a tensor's data).
 */
export function recordIntegerLiterals(this: object, key: string, value: unknown, context?: { source?: string }): unknown {
  if (typeof value === 'number' && !Array.isArray(this) && context?.source !== undefined) {
    const seen = (integerLiterals.get(this) ?? new Set<string>()) as Set<string>;
    if (/^-?\d+$/.test(context.source)) seen.add(key);
    integerLiterals.set(this, seen);
  }
  return value;
}

/**
 * Merges `input` over `base` and validates every hyperparameter. `field` prefixes error messages
 * (e.g. "param_groups[1].lr"). `integers`: which of the input's keys were integer literals (from
 * integerLiterals), when known; otherwise a whole weight_decay is taken for torch's int default.
 */
export function resolveHyperparameters(base: Omit<GroupSpec, 'params'>, input: HyperparameterInput | undefined, field: string, integers?: ReadonlySet<string>): Omit<GroupSpec, 'params'> {
  const out: Omit<GroupSpec, 'params'> = { ...base, int_keys: [...(base.int_keys ?? [])] };
  if (input === undefined) return out;
  if (input === null || typeof input !== 'object' || Array.isArray(input)) throw errors.invalidHyperparameter(field, 'must be an object');
  for (const key of ['lr', 'lambd', 'alpha', 't0', 'weight_decay'] as const) {
    const value = input[key];
    if (value === undefined) continue;
    if (typeof value !== 'number' || !Number.isFinite(value)) throw errors.invalidHyperparameter(`${field}.${key}`, 'must be a finite number');
    // An int beyond 2^53 is not the integer sent (9007199254740993 read as …992), and later written back as
    // another (a review): refused as a .pt file's is. Written as a float (1e18), it is a float.
    if (integers?.has(key) && !Number.isSafeInteger(value)) throw errors.invalidHyperparameter(`${field}.${key}`, 'integer out of range (JSON numbers hold integers exactly up to 2^53; write a float, such as 1e18)');
    out[key] = value;
    out.int_keys = out.int_keys!.filter((k) => k !== key);
    // Written as an integer: a Python int in torch's state_dict. Not known: a whole weight_decay is PyTorch's
    // int default, the others are Python floats.
    if (integers ? integers.has(key) : key === 'weight_decay' && Number.isInteger(value)) out.int_keys.push(key);
  }
  if (out.lr < 0) throw errors.invalidHyperparameter(`${field}.lr`, `Invalid learning rate: ${out.lr}`);
  // torch takes lr=-0.0, and its sign reaches the parameters (alpha=-eta adds +0.0 * grad, which turns a -0.0
  // parameter into +0.0); PostgreSQL's jsonb keeps no negative zero, so the step would be that of 0.0. (A
  // weight_decay of -0.0 is no weight decay in torch, `if weight_decay != 0`, as here.)
  if (Object.is(out.lr, -0)) throw errors.invalidHyperparameter(`${field}.lr`, 'must not be -0.0 (negative zero): the service cannot keep its sign; use 0.0');
  if (out.weight_decay < 0) throw errors.invalidHyperparameter(`${field}.weight_decay`, `Invalid weight_decay value: ${out.weight_decay}`);
  if (out.lambd < 0) {
    // torch takes it, but 1 + lambd * lr * step then falls to 0 and below: its eta fails there (a float
    // division by zero, a math domain error or a complex number, by version and alpha).
    throw errors.invalidHyperparameter(`${field}.lambd`, `must not be negative (${out.lambd}): ASGD's eta = lr / (1 + lambd * lr * step) ** alpha has a base that falls to 0 and below as the steps go on`);
  }
  const failure = etaFailure(out.lr, out.lambd, out.alpha);
  if (failure !== null) {
    // Named by the key this input gave (of those that make the power), alpha first.
    const key = (['alpha', 'lambd', 'lr'] as const).find((k) => input[k] !== undefined) ?? 'alpha';
    const what = failure.error === 'OverflowError' ? 'overflows' : 'divides by zero (the power underflows to 0)';
    throw errors.invalidHyperparameter(`${field}.${key}`, `with lr ${out.lr}, lambd ${out.lambd} and alpha ${out.alpha}, ASGD's eta = lr / (1 + lambd * lr * step) ** alpha `
      + `${what} at step ${failure.step} (torch raises ${failure.error} there, in the middle of a step)`);
  }
  const overflow = etaOverflowsFloat32(out.lr, out.lambd, out.alpha);
  if (overflow !== null) {
    const key = (['lr', 'alpha', 'lambd'] as const).find((k) => input[k] !== undefined) ?? 'lr';
    throw errors.invalidHyperparameter(`${field}.${key}`, `with lr ${out.lr}, lambd ${out.lambd} and alpha ${out.alpha}, ASGD's eta `
      + (overflow === 0 ? '(lr before the first step)' : `= lr / (1 + lambd * lr * step) ** alpha at step ${overflow}`)
      + ' is too large for float32, where torch keeps it: it would be infinite and step the parameters to infinity and NaN (a loaded eta must be finite too)');
  }
  // torch applies both as float32 scalars (grad.add(param, alpha=weight_decay), param.mul_(1 - lambd * eta)):
  // beyond float32's range, its first step raises (weight_decay) or takes the parameters to -inf (lambd),
  // a state the service (as for lr) could not load again (a review: both were taken; checked with torch 1.13
  // and 2.x).
  if (!Number.isFinite(Math.fround(out.weight_decay))) {
    throw errors.invalidHyperparameter(`${field}.weight_decay`, `${out.weight_decay} is too large for float32, where torch applies it: its first step raises RuntimeError (value cannot be converted to type float without overflow) in grad.add(param, alpha=weight_decay)`);
  }
  const decay = decayOverflowsFloat32(out.lr, out.lambd, out.alpha);
  if (decay !== null) {
    const key = (['lambd', 'lr', 'alpha'] as const).find((k) => input[k] !== undefined) ?? 'lambd';
    throw errors.invalidHyperparameter(`${field}.${key}`, `with lr ${out.lr}, lambd ${out.lambd} and alpha ${out.alpha}, ASGD's decay factor 1 - lambd * eta `
      + `${decay === 0 ? 'at the first step' : `at step ${decay + 1}`} is too large for float32, where torch applies it (param * (1 - lambd * eta)): it would be infinite and step the parameters to infinity and NaN`);
  }
  if (input.maximize !== undefined) {
    if (typeof input.maximize !== 'boolean') throw errors.invalidHyperparameter(`${field}.maximize`, 'must be true or false');
    out.maximize = input.maximize;
  }
  // foreach is kept as given (a state_dict of torch's foreach=True loads, and saves with it) and stepped as the
  // single-tensor path, as the README says; differentiable and capturable (autograd through the step, CUDA
  // graphs) name paths this service does not have.
  if (input.foreach !== undefined) {
    if (input.foreach !== null && typeof input.foreach !== 'boolean') throw errors.invalidHyperparameter(`${field}.foreach`, 'must be true, false or null');
    out.foreach = input.foreach;
  }
  for (const key of FLAG_KEYS) {
    const value = input[key];
    if (key === 'foreach' || value === undefined || value === null || value === false) continue;
    throw errors.invalidHyperparameter(
      `${field}.${key}`,
      `${key}=${quoteValue(value)} is not supported: the service computes PyTorch's single-tensor CPU path (use null or false)`,
    );
  }
  return out;
}

/** The float32 step count stops at 2**24 (step_t += 1 in float32): no step is later. */
const LAST_STEP = 2 ** 24;

/**
 * The first step (1..2**24) at which torch's `eta = lr / (1 + lambd * lr * step) ** alpha` (Python floats)
 * raises, and why, or null when none does. With lr, lambd >= 0 the base grows with the step, from 1:
 * - alpha > 0: the power grows; the first step whose power is infinite is found by a binary search, and it
 *   is an overflow (OverflowError) when its base is still finite (an infinite base gives inf, and eta 0, as
 *   here; the later steps' bases are infinite too);
 * - alpha < 0 (torch takes it; eta then grows with the step): the power falls towards 0; the first step at
 *   which it is 0 (an underflow, or an infinite base) divides lr by zero (ZeroDivisionError), and so does
 *   every later one.
 */
export function etaFailure(lr: number, lambd: number, alpha: number): { step: number; error: 'OverflowError' | 'ZeroDivisionError' } | null {
  const base = (step: number) => 1 + lambd * lr * step;
  const power = (step: number) => pow(base(step), alpha); // the kernel's (glibc's) pow: the same boundary
  // Past the first failing step (of its kind), every step's power fails in the same way.
  const failing = alpha < 0 ? (step: number) => power(step) === 0 : (step: number) => !Number.isFinite(power(step));
  if (!failing(LAST_STEP)) return null;
  let lo = 0; // fine at step 0 (no step): the power is 1
  let hi = LAST_STEP;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (failing(mid)) hi = mid;
    else lo = mid;
  }
  if (alpha < 0) return { step: hi, error: 'ZeroDivisionError' };
  return Number.isFinite(base(hi)) ? { step: hi, error: 'OverflowError' } : null;
}

/**
 * The first step (0..2**24; 0: eta's first value, lr itself) whose eta is infinite as float32, PyTorch's
 * eta tensor, or null when none is. torch takes such an lr and steps the parameters with an infinite eta;
 * the service would then hold a state it refuses to load. With alpha >= 0 eta only falls from lr; with
 * alpha < 0 it grows with the step (a binary search; the steps where the power is 0 are etaFailure's).
 */
export function etaOverflowsFloat32(lr: number, lambd: number, alpha: number): number | null {
  return firstInfiniteStep((step) => !Number.isFinite(etaAt(lr, lambd, alpha, step)), alpha < 0);
}

/** PyTorch's eta (a float32 tensor) after `step` steps: lr before the first, then lr / (1 + lambd * lr * step) ** alpha. */
function etaAt(lr: number, lambd: number, alpha: number, step: number): number {
  return Math.fround(step === 0 ? lr : lr / pow(1 + lambd * lr * step, alpha));
}

/**
 * The first step (0..2**24) at which `infinite` holds, or null: at step 0, or, where eta grows with the step
 * (`grows`: alpha < 0) and so `infinite` holds from some step on, the first (a binary search).
 */
function firstInfiniteStep(infinite: (step: number) => boolean, grows: boolean): number | null {
  if (infinite(0)) return 0;
  if (!grows || !infinite(LAST_STEP)) return null;
  let lo = 0;
  let hi = LAST_STEP;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (infinite(mid)) hi = mid;
    else lo = mid;
  }
  return hi;
}

/**
 * The first eta's step (0..2**24, as etaOverflowsFloat32 counts them; 0: lr itself, the first step's) at
 * which torch's decay factor `1 - lambd * eta` is infinite as float32, or null when none is. With alpha >= 0
 * eta only falls from lr; with alpha < 0 it grows with the step (a binary search). An eta that is itself
 * infinite is etaOverflowsFloat32's.
 */
export function decayOverflowsFloat32(lr: number, lambd: number, alpha: number): number | null {
  return firstInfiniteStep((step) => !Number.isFinite(decayFactor(etaAt(lr, lambd, alpha, step), lambd)), alpha < 0);
}

/**
 * What a group's values make of a parameter's state that has stepped (its float32 step count and the eta
 * its last step computed), or null when its next steps stay finite. resolveHyperparameters checks values
 * from a fresh state (eta from lr, steps 1..2**24). A state that stepped under other values decays at its
 * next step by 1 - lambd * eta with its own eta: lambd 3e38 set with lr 1e-30 on a state whose eta is 2
 * gives -6e38, and the parameters -inf and NaN (a hostile review: taken by a step, a PATCH and a load). And a
 * step count beyond 2**24 (a loaded one: float32 counts stop at 2**24) stays where it is, so every later
 * step's eta is computed at it (a loaded step of 2**40 with alpha -4: an infinite eta, then NaN).
 */
export function stateOverflow(h: { lr: number; lambd: number; alpha: number }, s: { step: number; eta: number }): { key: 'eta' | 'step'; message: string } | null {
  if (!Number.isFinite(decayFactor(s.eta, h.lambd))) {
    return { key: 'eta', message: `ASGD's decay factor 1 - lambd * eta at the next step (lambd ${h.lambd}, the state's eta ${s.eta}) is too large for float32: it would step the parameters to infinity and NaN` };
  }
  const next = Math.fround(s.step + 1);
  if (next <= LAST_STEP) return null;
  const base = 1 + h.lambd * h.lr * next;
  const power = pow(base, h.alpha);
  const at = `at the state's step ${s.step} (beyond 2**24 it no longer counts in float32, so every later step is at it too)`;
  if (h.alpha < 0 ? power === 0 : !Number.isFinite(power) && Number.isFinite(base)) {
    return { key: 'step', message: `with lr ${h.lr}, lambd ${h.lambd} and alpha ${h.alpha}, ASGD's eta = lr / (1 + lambd * lr * step) ** alpha ${h.alpha < 0 ? 'divides by zero' : 'overflows'} ${at} (torch raises there, in the middle of a step)` };
  }
  const eta = etaAt(h.lr, h.lambd, h.alpha, next);
  if (!Number.isFinite(eta) || !Number.isFinite(decayFactor(eta, h.lambd))) {
    return { key: 'step', message: `with lr ${h.lr}, lambd ${h.lambd} and alpha ${h.alpha}, ASGD's ${Number.isFinite(eta) ? 'decay factor 1 - lambd * eta' : 'eta'} ${at} is too large for float32: it would step the parameters to infinity and NaN` };
  }
  return null;
}

/** The parameters' states of a session's copy (SessionState), by parameter index, and their names. */
export interface StatesOf {
  readonly scalars: readonly ({ step: number; eta: number } | null)[];
  readonly layout: { readonly params: readonly { name: string }[] };
}

/**
 * Throws INVALID_HYPERPARAMETER when `groups` (the values a change sets, `changed` the groups it sets) would
 * overflow at the next step of a state of theirs (stateOverflow), naming `<field>[g].<key>` by the key the
 * change gave: lambd for the decay, else the first of lr, lambd and alpha.
 */
export function checkGroupsOnStates(groups: readonly GroupSpec[], state: StatesOf, field: string, changed: (g: number) => Record<string, unknown> | null): void {
  const { scalars } = state;
  for (const [g, group] of groups.entries()) {
    const given = changed(g);
    if (!given) continue;
    for (const i of group.params) {
      const s = scalars[i];
      const failure = s ? stateOverflow(group, s) : null;
      if (!failure) continue;
      const order = failure.key === 'eta' ? ['lambd', 'lr', 'alpha'] : ['lr', 'lambd', 'alpha'];
      const key = order.find((k) => given[k] !== undefined) ?? order[0];
      throw errors.invalidHyperparameter(`${field}[${g}].${key}`, `${failure.message} (parameter ${JSON.stringify(state.layout.params[i].name)})`);
    }
  }
}

export const DEFAULT_GROUP: Omit<GroupSpec, 'params'> = Object.freeze({
  lr: ASGD_DEFAULTS.lr,
  lambd: ASGD_DEFAULTS.lambd,
  alpha: ASGD_DEFAULTS.alpha,
  t0: ASGD_DEFAULTS.t0,
  weight_decay: 0,
  int_keys: ['weight_decay'],
  maximize: false,
});

export function kernelHyperparameters(group: GroupSpec): AsgdHyperparameters {
  return {
    lr: group.lr,
    lambd: group.lambd,
    alpha: group.alpha,
    t0: group.t0,
    weightDecay: group.weight_decay,
    maximize: group.maximize,
  };
}

export interface ParamGroupInput extends HyperparameterInput {
  params?: unknown;
  param_names?: unknown;
}

/**
 * Builds the groups from a create request. Returns the parameters in state_dict order (PyTorch numbers
 * them group by group, in order) and the groups with indices into that order.
 */
export function buildGroups(
  params: ParamSpec[],
  defaults: Omit<GroupSpec, 'params'>,
  groupsInput: unknown,
): { params: ParamSpec[]; groups: GroupSpec[]; order: number[] } {
  if (groupsInput === undefined || groupsInput === null) {
    return { params, groups: [{ ...defaults, params: params.map((_, i) => i) }], order: params.map((_, i) => i) };
  }
  if (!Array.isArray(groupsInput) || groupsInput.length === 0) throw errors.invalidParamGroups('param_groups: must be a non-empty list');
  const byName = new Map(params.map((p, i) => [p.name, i]));
  const seen = new Set<number>();
  const order: number[] = [];
  const groups: GroupSpec[] = [];
  for (const [g, raw] of groupsInput.entries()) {
    const field = `param_groups[${g}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw errors.invalidParamGroups(`${field}: must be an object`);
    const input = raw as ParamGroupInput;
    for (const key of Object.keys(input)) {
      if (key !== 'params' && key !== 'param_names' && !(HYPERPARAMETER_KEYS as readonly string[]).includes(key) && !(FLAG_KEYS as readonly string[]).includes(key)) {
        throw errors.invalidParamGroups(`${field}.${key}: unknown key`);
      }
    }
    if (!Array.isArray(input.params) || input.params.length === 0) throw errors.invalidParamGroups(`${field}.params: must be a non-empty list of parameter names`);
    const { params: _ignored, param_names: names, ...overrides } = input;
    const hyper = resolveHyperparameters(defaults, overrides, field, integerLiterals.get(input));
    // torch (2.6 on) keeps each group's parameter names when built from model.named_parameters(); they
    // travel with the state_dict as its param_names.
    if (names !== undefined) {
      if (!Array.isArray(names) || names.length !== input.params.length || names.some((n) => typeof n !== 'string' || n.length === 0 || n.length > 1024)) {
        throw errors.invalidParamGroups(`${field}.param_names: must be a list of names (strings of 1 to 1024 characters), one for each of the group's parameters`);
      }
      hyper.extra = { param_names: names };
    }
    const indices: number[] = [];
    for (const [k, name] of (input.params as unknown[]).entries()) {
      const index = typeof name === 'string' ? byName.get(name) : undefined;
      if (index === undefined) throw errors.invalidParamGroups(`${field}.params[${k}]: no parameter named ${quoteValue(name)}`);
      if (seen.has(index)) throw errors.invalidParamGroups(`${field}.params[${k}]: some parameters appear in more than one parameter group (${quoteValue(name)})`);
      seen.add(index);
      order.push(index);
      indices.push(order.length - 1);
    }
    groups.push({ ...hyper, params: indices });
  }
  const missing = params.filter((_, i) => !seen.has(i));
  if (missing.length > 0) throw errors.invalidParamGroups(`param_groups: parameter ${JSON.stringify(missing[0].name)} is in no group`);
  return { params: order.map((i) => params[i]), groups, order };
}

/** For each parameter (state_dict index), the index of its group. */
export function groupIndexOf(groups: GroupSpec[], paramCount: number): Int32Array {
  const out = new Int32Array(paramCount).fill(-1);
  groups.forEach((group, g) => group.params.forEach((p) => (out[p] = g)));
  return out;
}

/** A param group as torch.optim.ASGD.state_dict() writes it. */
export interface PublicGroup {
  lr: number; lambd: number; alpha: number; t0: number; weight_decay: number;
  foreach: boolean | null; maximize: boolean; differentiable: boolean; capturable: boolean;
  params: number[];
  [extra: string]: unknown;
}

/** The public view of a group, with the keys of torch.optim.ASGD's param_groups (newest PyTorch). */
export function publicGroup(group: GroupSpec): PublicGroup {
  return {
    lr: group.lr,
    lambd: group.lambd,
    alpha: group.alpha,
    t0: group.t0,
    weight_decay: group.weight_decay,
    foreach: group.foreach ?? null,
    maximize: group.maximize,
    differentiable: false,
    capturable: false,
    ...group.extra,
    params: group.params,
  };
}
