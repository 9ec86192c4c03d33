// torch.optim.ASGD state_dicts in and out, independent of the wire format. Input is the plain structure
// of a state_dict (from JSON, or converted from a torch.save pickle): tensors are either JSON tensors
// or {shape, data: Float32Array}.
import { errors } from '../errors.ts';
import type { GroupSpec } from '../db/schema.ts';
import { FLAG_KEYS, HYPERPARAMETER_KEYS, integerLiterals, resolveHyperparameters, DEFAULT_GROUP, publicGroup } from './spec.ts';
import type { LoadedStateDict, StateView } from './model.ts';
import { JSON_NON_FINITE, jsonScalar, jsonTensor, rawJson, readJsonTensor, readScalar, type NonFinitePolicy } from './tensors.ts';
import { unstorableText } from '../formats/json-depth.ts';
import { ASGD_NUMERIC_KEYS, missingGroupKey, NOT_ASGD_STATE, PARAM_STATE_KEYS, stepCountProblem, stepNotFloat32, type AsgdParamGroup, type AsgdStateDict, type PyValue } from '../formats/index.ts';

export interface DecodedTensor {
  shape: number[];
  data: Float32Array;
}

const isDecoded = (v: unknown): v is DecodedTensor =>
  v !== null && typeof v === 'object' && (v as DecodedTensor).data instanceof Float32Array && Array.isArray((v as DecodedTensor).shape);

/** A tensor field: decoded binary, or a JSON tensor whose shape it carries itself. */
export function readTensorField(value: unknown, field: string, nonFinite: NonFinitePolicy = 'allow'): DecodedTensor {
  if (isDecoded(value)) return value;
  if (value === null || typeof value !== 'object' || Array.isArray(value) || !Array.isArray((value as { shape?: unknown }).shape)) {
    throw errors.invalidStateDict(field, 'must be a tensor {"shape", "data"}');
  }
  const shape = (value as { shape: unknown[] }).shape;
  if (shape.length > 16 || shape.some((d) => typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0)) {
    throw errors.invalidStateDict(`${field}.shape`, 'must be a list of whole numbers');
  }
  const numel = (shape as number[]).reduce((a, b) => a * b, 1);
  const data = (value as { data?: unknown }).data;
  if (!Array.isArray(data) || data.length !== numel) {
    throw errors.invalidStateDict(`${field}.data`, `must hold ${numel} numbers for shape ${JSON.stringify(shape)}`);
  }
  const out = new Float32Array(numel);
  readJsonTensor(value, field, shape as number[], out, nonFinite);
  return { shape: shape as number[], data: out };
}

/** A scalar that PyTorch stores as a 0-dim tensor: a number or a one-element tensor. */
function readStateScalar(value: unknown, field: string): number {
  if (isDecoded(value)) {
    if (value.data.length !== 1) throw errors.invalidStateDict(field, 'must be a scalar (0-dim tensor)');
    return value.data[0];
  }
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) return readStateScalar(readTensorField(value, field), field);
  return readScalar(value, field);
}

const isPlainObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v) && !isDecoded(v);

/** Parses a state_dict as torch.optim.Optimizer.load_state_dict reads it (validation against the session comes later). */
export function parseStateDict(body: unknown): LoadedStateDict {
  if (!isPlainObject(body)) throw errors.invalidStateDict('body', 'must be an object {"state", "param_groups"}');
  for (const key of Object.keys(body)) {
    if (key !== 'state' && key !== 'param_groups') throw errors.invalidStateDict(key, 'unknown key (a state_dict has "state" and "param_groups")');
  }
  const groups = body.param_groups;
  if (!Array.isArray(groups)) throw errors.invalidStateDict('param_groups', 'must be a list');
  const paramGroups = groups.map((g, k) => {
    const field = `param_groups[${k}]`;
    if (!isPlainObject(g)) throw errors.invalidStateDict(field, 'must be an object');
    if (!Array.isArray(g.params) || g.params.some((p) => typeof p !== 'number' || !Number.isSafeInteger(p))) {
      throw errors.invalidStateDict(`${field}.params`, 'must be a list of integer parameter ids');
    }
    for (const key of ['lr', 'lambd', 'alpha', 't0', 'weight_decay'] as const) {
      if (g[key] === undefined) throw errors.invalidStateDict(`${field}.${key}`, missingGroupKey(Object.keys(g)));
    }
    const known: Record<string, unknown> = {};
    const extra: Record<string, unknown> = {};
    const extraInts: string[] = [];
    for (const [key, value] of Object.entries(g)) {
      if (key === 'params') continue;
      if ((HYPERPARAMETER_KEYS as readonly string[]).includes(key) || (FLAG_KEYS as readonly string[]).includes(key)) known[key] = value;
      else {
        // Keys other code put there (initial_lr from an LR scheduler, …) travel along, as in PyTorch.
        if (key === 'param_names') {
          extra[key] = paramNames(value, (g.params as number[]).length, `${field}.${key}`);
          continue;
        }
        if (!(value === null || ['number', 'string', 'boolean'].includes(typeof value))) {
          throw errors.invalidStateDict(`${field}.${key}`, 'extra group keys must be numbers, strings, booleans or null (or param_names, a list of strings)');
        }
        if (typeof value === 'number' && !Number.isFinite(value)) throw errors.invalidStateDict(`${field}.${key}`, 'must be finite');
        // Python's json.dumps writes float('inf') as a bare Infinity, read as the string "Infinity" (as the API
        // reads it wherever a number may be one): here too it is the number, refused, not kept as text that a
        // .pt download would then pickle as a str (a review; the .pt path refuses the float).
        if (typeof value === 'string' && JSON_NON_FINITE.has(value)) {
          throw errors.invalidStateDict(`${field}.${key}`, `must be finite (${value}: a JSON body's NaN, Infinity and -Infinity, bare as Python's json.dumps writes them or quoted, are read as those numbers)`);
        }
        // Written as an integer (Python's json writes an int so): kept an int, as a .pt file's is, and refused
        // where JSON's numbers no longer hold it exactly, as a .pt file's is. Known for bodies up to 1 MiB
        // (read again with their numbers' text); a bigger body's extra numbers keep the kind they had.
        if (typeof value === 'number' && integerLiterals.get(g)?.has(key)) {
          if (!Number.isSafeInteger(value)) throw errors.invalidStateDict(`${field}.${key}`, 'integer out of range (JSON numbers hold integers exactly up to 2^53)');
          extraInts.push(key);
        }
        setExtra(extra, key, value, field);
      }
    }
    const hyper = resolveHyperparameters({ ...DEFAULT_GROUP, int_keys: [] }, known, field, integerLiterals.get(g));
    hyper.int_keys = [...(hyper.int_keys ?? []), ...extraInts];
    if (Object.keys(extra).length) hyper.extra = extra;
    return { params: g.params as number[], hyper };
  });
  const stateIn = body.state;
  if (!isPlainObject(stateIn)) throw errors.invalidStateDict('state', 'must be an object keyed by parameter id');
  const state: LoadedStateDict['state'] = new Map();
  for (const [key, entry] of Object.entries(stateIn)) {
    const field = `state.${key}`;
    // A whole number no group lists is kept by torch and used by no parameter: dropped at the load
    // (load-plan.ts), whatever its size (one of ten digits was refused as "not a whole number").
    if (!/^(0|[1-9]\d*)$/.test(key)) throw errors.invalidStateDict(field, 'keys must be parameter ids (whole numbers)');
    if (!isPlainObject(entry)) throw errors.invalidStateDict(field, 'must be an object {step, eta, mu, ax}');
    // {}: no state (torch leaves it when code read optimizer.state[p] of a parameter that never stepped).
    if (Object.keys(entry).length === 0) continue;
    for (const k of PARAM_STATE_KEYS) if (entry[k] === undefined) throw errors.invalidStateDict(`${field}.${k}`, 'is missing');
    // Another optimizer's state (SGD's momentum_buffer, Adam's exp_avg) would otherwise be dropped without a word.
    for (const k of Object.keys(entry)) if (!(PARAM_STATE_KEYS as readonly string[]).includes(k)) throw errors.invalidStateDict(`${field}.${k}`, NOT_ASGD_STATE);
    const ax = readTensorField(entry.ax, `${field}.ax`);
    const step = readStateScalar(entry.step, `${field}.step`);
    // Checked here, not by the database: a count it cannot store (or that could not be served back and
    // loaded again) is refused by name, the same for JSON, safetensors and checkpoint bodies.
    const problem = stepCountProblem(step) ?? stepNotFloat32(step, Math.fround(step));
    if (problem) throw errors.invalidStateDict(`${field}.step`, problem);
    state.set(Number(key), {
      step,
      eta: readStateScalar(entry.eta, `${field}.eta`),
      mu: readStateScalar(entry.mu, `${field}.mu`),
      ax: ax.data,
      axShape: ax.shape,
    });
  }
  return { paramGroups, state };
}

/** The JSON form of torch.optim.ASGD.state_dict() (newest PyTorch's keys). */
export function stateDictJson(view: StateView): { state: Record<string, unknown>; param_groups: Record<string, unknown>[] } {
  const state: Record<string, unknown> = {};
  view.scalars.forEach((s, i) => {
    if (!s) return;
    const from = view.layout.offsets[i];
    state[String(i)] = {
      step: jsonScalar(s.step),
      eta: jsonScalar(s.eta),
      mu: jsonScalar(s.mu),
      ax: jsonTensor(view.axData.subarray(from, from + view.layout.numels[i]), view.params[i].shape),
    };
  });
  return { state, param_groups: view.groups.map(groupWithKinds) };
}

/** A group for a state_dict's JSON (the JSON form, a safetensors file's param_groups): numbers of their kinds. */
export const groupWithKinds = (g: GroupSpec): Record<string, unknown> => floatsAsFloats(publicGroup(g), g.int_keys ?? [], Object.keys(g.extra ?? {}));

/**
 * A group for JSON.stringify with its whole float hyperparameters, and whole float extra keys (an LR
 * scheduler's `initial_lr` 1.0), written as floats (`1000000.0`, not `1000000`): read back (a JSON
 * state_dict loaded again, Python's json) they stay floats, as torch has them (a review: `initial_lr` came
 * back an int, and torch 1.13 then made a step's `eta` an int64 tensor); the int ones (int_keys) are
 * written as integers.
 */
function floatsAsFloats(group: Record<string, unknown>, intKeys: readonly string[], extraKeys: readonly string[]): Record<string, unknown> {
  for (const key of [...ASGD_NUMERIC_KEYS, ...extraKeys]) {
    const value = group[key];
    if (typeof value === 'number' && Number.isInteger(value) && Math.abs(value) < 1e21 && !intKeys.includes(key)) group[key] = rawJson(`${value}.0`);
  }
  return group;
}

/**
 * Parameter i, or its ASGD average (`ax`). A parameter that has not stepped has no `ax` in PyTorch;
 * its average is the parameter itself.
 */
export function paramTensor(view: StateView, i: number, averaged: boolean): Float32Array {
  const from = view.layout.offsets[i];
  const source = averaged && view.scalars[i] ? view.axData : view.paramData;
  return source.subarray(from, from + view.layout.numels[i]);
}

/** Parameters (or their averages) by name. */
export function paramsJson(view: StateView, averaged: boolean): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  view.params.forEach((p, i) => (out[p.name] = jsonTensor(paramTensor(view, i, averaged), p.shape)));
  return out;
}

// ---- the typed state_dict of src/formats (torch.save files) ----------------------------------------

/** Longest parameter name a param group's param_names may hold. */
const MAX_PARAM_NAME_LENGTH = 1024;

/**
 * A group's `param_names`: torch (2.6 on) keeps them in each group of an optimizer made from
 * model.named_parameters(), one per parameter of the group, and they travel with its state_dict. Names
 * only: loading does not match parameters by them, as in torch.
 */
function paramNames(value: unknown, count: number, field: string): string[] {
  if (!Array.isArray(value) || value.some((n) => typeof n !== 'string' || n.length === 0 || n.length > MAX_PARAM_NAME_LENGTH)) {
    throw errors.invalidStateDict(field, `must be a list of parameter names (strings of 1 to ${MAX_PARAM_NAME_LENGTH} characters)`);
  }
  if (value.length !== count) throw errors.invalidStateDict(field, `has ${value.length} names for the group's ${count} parameters`);
  return value as string[];
}

/**
 * Keeps an extra group key to serve back. `__proto__` cannot be one: as a property of a plain object it is
 * the prototype's setter (the value would vanish without a word), and JSON bodies refuse it already.
 */
function setExtra(extra: Record<string, unknown>, key: string, value: unknown, field: string): void {
  if (key === '__proto__') throw errors.invalidStateDict(`${field}.${key}`, 'is a reserved name; the extra keys of a param group are kept and served back, and this one cannot be');
  extra[key] = value;
}

/** A state_dict read from a torch.save file, validated like a JSON one. */
export function loadedFromAsgd(sd: AsgdStateDict): LoadedStateDict {
  const paramGroups = sd.paramGroups.map((g, k) => {
    const field = `param_groups[${k}]`;
    const hyper = resolveHyperparameters({ ...DEFAULT_GROUP, int_keys: [] }, {
      lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weightDecay, maximize: g.maximize,
      foreach: g.foreach, differentiable: g.differentiable, capturable: g.capturable,
    }, field);
    hyper.int_keys = [...(g.intKeys ?? [])];
    const extra: Record<string, unknown> = {};
    for (const [key, value] of g.extra ?? []) {
      if (typeof value === 'bigint') {
        if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) throw errors.invalidStateDict(`${field}.${key}`, 'integer out of range');
        setExtra(extra, key, Number(value), field);
        hyper.int_keys.push(key);
      } else if (value === null || typeof value === 'string' || typeof value === 'boolean' || (typeof value === 'number' && Number.isFinite(value))) {
        setExtra(extra, key, value, field);
      } else if (key === 'param_names') {
        extra[key] = paramNames(value, g.params.length, `${field}.${key}`);
      } else if (typeof value === 'number') {
        throw errors.invalidStateDict(`${field}.${key}`, `must be finite, got ${value}`);
      } else {
        throw errors.invalidStateDict(`${field}.${key}`, 'extra group keys must be numbers, strings, booleans or None (or param_names, a list of strings)');
      }
    }
    // A pickle's strings may hold a NUL (JSON's only as an escape, refused with the body): PostgreSQL stores
    // none, and answered a 400 naming nothing (found by a hostile-input review).
    const bad = unstorableText(extra, field);
    if (bad) throw errors.invalidStateDict(bad, 'text with a NUL character or an unpaired UTF-16 surrogate is not accepted (PostgreSQL stores none)');
    if (Object.keys(extra).length) hyper.extra = extra;
    return { params: g.params, hyper };
  });
  const state: LoadedStateDict['state'] = new Map();
  for (const [index, s] of sd.state) state.set(index, { step: s.step, eta: s.eta, mu: s.mu, ax: s.ax.data, axShape: s.ax.shape });
  return { paramGroups, state };
}

/** The session's optimizer state as the typed state_dict that src/formats pickles (tensors are views). */
export function asgdFromView(view: StateView): AsgdStateDict {
  const state: AsgdStateDict['state'] = new Map();
  view.scalars.forEach((s, i) => {
    if (!s) return;
    const from = view.layout.offsets[i];
    state.set(i, { step: s.step, eta: s.eta, mu: s.mu, ax: { dtype: 'float32', shape: [...view.params[i].shape], data: view.axData.subarray(from, from + view.layout.numels[i]) } });
  });
  const paramGroups: AsgdParamGroup[] = view.groups.map((g) => {
    const intKeys = new Set(g.int_keys ?? []);
    return {
      lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weightDecay: g.weight_decay, foreach: g.foreach ?? null, maximize: g.maximize,
      differentiable: false, capturable: false, params: g.params,
      intKeys: ASGD_NUMERIC_KEYS.filter((k) => intKeys.has(k)),
      extra: Object.entries(g.extra ?? {}).map(([k, v]): [string, PyValue] => [k, intKeys.has(k) && Number.isSafeInteger(v) ? BigInt(v as number) : (v as PyValue)]),
    };
  });
  return { state, paramGroups };
}
