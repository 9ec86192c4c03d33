// What a step may carry besides its gradients: the groups' hyperparameters for this step (a scheduler's
// `group['lr'] = …` before `optimizer.step()`) and training metrics. Validated before anything is written.
import { errors, type ApiError } from '../errors.ts';
import type { GroupSpec, HyperDelta } from '../db/schema.ts';
import { parseJsonWithin } from '../formats/json-depth.ts';
import type { BaseVersionFrom } from './model.ts';
import { checkGroupsOnStates, FLAG_KEYS, type StatesOf, HYPERPARAMETER_KEYS, integerLiterals, recordIntegerLiterals, resolveHyperparameters } from './spec.ts';

export const MAX_METRICS = 32;

/**
 * The 409 BASE_VERSION_AHEAD for a step's base_version newer than the session's version, naming where it was
 * given: the session is not the one the gradient came from (deleted and created again, or its database
 * restored), and the body carries its version for the worker to pull.
 */
export function baseVersionTooNew(baseVersion: number, version: number, from: BaseVersionFrom = 'body'): ApiError {
  return errors.baseVersionAhead(from === '__metadata__' ? '__metadata__.base_version' : 'base_version', baseVersion, version);
}

/**
 * `param_groups` of a step: exactly one object per session group, in the session's group order, each with
 * any of ASGD's hyperparameters (validated as at creation). Returns what each group sets (null: nothing),
 * or null when no group sets anything. With `states` (the parameters' states), values that would
 * overflow at a state's next step are refused too (spec.ts stateOverflow).
 */
export function parseStepHyper(
  value: unknown, groups: readonly GroupSpec[], field = 'param_groups', states?: StatesOf,
): HyperDelta | null {
  if (value === undefined || value === null) return null;
  if (!Array.isArray(value)) throw errors.invalidParamGroups(`${field}: must be a list with one object per parameter group`);
  if (value.length !== groups.length) {
    throw errors.invalidParamGroups(`${field}: ${value.length} groups given, the session has ${groups.length} (one object per group, in the session's order)`);
  }
  const delta: HyperDelta = value.map((raw, g) => {
    const at = `${field}[${g}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw errors.invalidParamGroups(`${at}: must be an object`);
    const input = raw as Record<string, unknown>;
    for (const key of Object.keys(input)) {
      if (key === 'params') throw errors.invalidParamGroups(`${at}.params: a step cannot move parameters between groups`);
      if (!(HYPERPARAMETER_KEYS as readonly string[]).includes(key) && !(FLAG_KEYS as readonly string[]).includes(key)) {
        throw errors.invalidParamGroups(`${at}.${key}: unknown key (one of ${[...HYPERPARAMETER_KEYS, ...FLAG_KEYS].join(', ')})`);
      }
    }
    // The checks of creation, on the group's values with these merged over them; and which of the given
    // values are Python ints (written as integer literals: `100`, not `100.0`), as torch keeps them.
    const resolved = resolveHyperparameters(groups[g], input, at, integerLiterals.get(input));
    const set: NonNullable<HyperDelta[number]> = {};
    for (const key of HYPERPARAMETER_KEYS) if (input[key] !== undefined) (set as Record<string, unknown>)[key] = input[key];
    // foreach changes nothing in the step (README), but a group's flag is kept as the caller last set it.
    if (input.foreach !== undefined && input.foreach !== (groups[g].foreach ?? null)) set.foreach = input.foreach as boolean | null;
    const intKeys = (resolved.int_keys ?? []).filter((k) => input[k] !== undefined);
    if (intKeys.length > 0) set.int_keys = intKeys;
    return Object.keys(set).length === 0 ? null : set;
  });
  if (!delta.some((d) => d !== null)) return null;
  // And on the states the step finds (the copy it steps), each group's values as they would be.
  if (states) checkGroupsOnStates(applyHyperDelta(groups, delta), states, field, (g) => delta[g]);
  return delta;
}

/**
 * The groups after a step's hyperparameters: given keys replace the group's, and stop being Python ints
 * unless given as one (resolveHyperparameters' rule). Mirrored in SQL by repository.mergeGroupsSql.
 */
export function applyHyperDelta(groups: readonly GroupSpec[], delta: HyperDelta): GroupSpec[] {
  return groups.map((group, g) => {
    const set = delta[g];
    if (!set) return group;
    const { int_keys: intKeys, ...values } = set;
    const given = Object.keys(values);
    const ints = intKeys ?? [];
    // In their order: one that stays an int keeps its place, a new one goes last (a value sent again as it
    // was changes nothing: no new version for a PATCH of the same values).
    const kept = (group.int_keys ?? []).filter((k) => !given.includes(k) || ints.includes(k));
    return {
      ...group,
      ...values,
      int_keys: [...kept, ...ints.filter((k) => !kept.includes(k))],
    };
  });
}

/**
 * Each group's hyperparameters, as step_history keeps them and as the step statement's groupHyperSql builds
 * them from the row (repository.ts): a key a group lacks is null there, so here too (else a copy's groups
 * never equal the row's and a step that sets hyperparameters is tried again for ever).
 */
export function groupHyperparameters(groups: readonly GroupSpec[]): Record<string, unknown>[] {
  return groups.map((g) => ({
    lr: g.lr ?? null, lambd: g.lambd ?? null, alpha: g.alpha ?? null, t0: g.t0 ?? null, weight_decay: g.weight_decay ?? null, maximize: g.maximize ?? null,
  }));
}

/**
 * A metric's name: 1-128 characters, none a control character or half of a surrogate pair. TensorBoard's and
 * Keras's names ("val/loss", "top-1 acc", "précision") are taken (a review: "val/loss" cost a worker its step
 * and its loop). Names are JSON keys and SQL parameters only, never part of a statement or a path.
 */
const METRIC_NAME = /^[^\p{Cc}\p{Cs}]{1,128}$/u;
export const METRIC_NAME_RULE = '1-128 characters, no control character';

/** `metrics` of a step: a flat object of at most 32 finite numbers by name (METRIC_NAME). */
export function parseMetrics(value: unknown, field = 'metrics'): Record<string, number> | null {
  if (value === undefined || value === null) return null;
  if (typeof value !== 'object' || Array.isArray(value)) throw errors.invalidMetrics(field, 'must be an object of numbers by name, e.g. {"loss": 0.41}');
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > MAX_METRICS) throw errors.invalidMetrics(field, `${entries.length} metrics; at most ${MAX_METRICS} are allowed`);
  for (const [name, v] of entries) {
    if (!METRIC_NAME.test(name)) throw errors.invalidMetrics(`${field}.${JSON.stringify(name.slice(0, 140)).slice(1, -1)}`, `a metric name must be ${METRIC_NAME_RULE}`);
    // Series are built as objects by metric name, which cannot hold this key (it vanished when downsampled).
    if (name === '__proto__') throw errors.invalidMetrics(`${field}.${name}`, 'cannot be a metric name (JSON answers could not hold it)');
    if (typeof v !== 'number' || !Number.isFinite(v)) throw errors.invalidMetrics(`${field}.${name}`, 'must be a finite number');
  }
  return entries.length === 0 ? null : (value as Record<string, number>);
}

/**
 * A JSON value from a safetensors step body's `__metadata__` (whose values are strings). `literals`: record
 * which numbers were integer literals (integerLiterals), for param_groups.
 */
export function metadataJson(metadata: ReadonlyMap<string, string>, key: string, literals = false): unknown {
  const text = metadata.get(key);
  if (text === undefined) return undefined;
  return parseJsonWithin(text, (problem) => errors.invalidBody(`__metadata__.${key}: ${problem ?? 'is not valid JSON'}`), undefined,
    literals ? (recordIntegerLiterals as (this: object, key: string, value: unknown) => unknown) : undefined);
}
