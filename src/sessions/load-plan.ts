// Checking a state_dict (and a model's parameters) against a session before it is loaded, as
// torch.optim.Optimizer.load_state_dict does, and stricter. Pure: no database, no cache.
import type { GroupSpec, ScalarStateRow } from '../db/schema.ts';
import { errors } from '../errors.ts';
import type { LoadedParams, LoadedStateDict } from './model.ts';
import type { SessionRecord } from './repository.ts';
import { layoutOf, type Layout } from './state.ts';
import { stateOverflow } from './spec.ts';
import { firstNonFinite } from './tensors.ts';

/** What loading a state_dict sets: the groups (hyperparameters as loaded), each parameter's scalars and ax. */
export interface LoadPlan {
  groups: GroupSpec[];
  scalars: ScalarStateRow[];
  ax: (Float32Array | null)[];
}

/**
 * The model's entries that are not the session's parameters, when every parameter is among them: the
 * buffers Module.state_dict() holds besides its parameters (BatchNorm's running_mean, running_var and int64
 * num_batches_tracked, a positional encoding), which the tutorial's checkpoint carries. They are left out, as
 * load_state_dict(strict=False) leaves out what it does not know, before a tensor's dtype is read (an int64
 * buffer is no parameter to convert); checkModel then checks what is kept. With a parameter missing nothing
 * is left out, and the load is refused naming what does not fit (found by a review: every checkpoint of a
 * model with BatchNorm was refused).
 */
export function modelBuffers(names: Iterable<string>, sessionParams: readonly string[], field: string): Set<string> {
  const all = new Set(names);
  const known = new Set(sessionParams);
  const unknown = [...all].filter((name) => !known.has(name));
  const missing = sessionParams.filter((name) => !all.has(name));
  // A parameter missing and entries the session lacks: the first of those named (before its dtype, an int64
  // buffer's), and what is missing, in every format alike.
  if (missing.length > 0 && unknown.length > 0) throw unknownEntry(field, unknown[0], missing);
  return new Set(unknown);
}

/**
 * An entry the session has no parameter of, refused naming it and, when parameters are missing, which: a
 * module state_dict with a parameter missing (no entry is then taken for a buffer), or a plain dict of
 * tensors or a safetensors file (whose entries are all taken for parameters).
 */
export function unknownEntry(field: string, unknown: string, missing: readonly string[]) {
  if (missing.length === 0) return errors.unknownParameter(`${field}.${unknown}`, unknown, field === 'params' ? PARAMS_ONLY : undefined);
  const listed = missing.slice(0, 3).map((name) => JSON.stringify(name)).join(', ') + (missing.length > 3 ? `, … (${missing.length})` : '');
  return errors.unknownParameter(`${field}.${unknown}`, unknown, `the session's ${listed} ${missing.length === 1 ? 'is' : 'are'} missing from ${field} (entries that are not parameters, buffers, are left out only when every parameter is there)`);
}

/**
 * PUT params of a name the session lacks: a module state_dict's buffers are left out only from a torch.save
 * file (its _metadata says what it is), not from a plain dict, safetensors or JSON.
 */
export const PARAMS_ONLY = 'a buffer (BatchNorm\'s running_mean)? send the parameters only, dict(model.named_parameters()), or torch.save(model.state_dict()) as a file';

/**
 * A model state_dict must name exactly the session's parameters, with their shapes. `field`: where the
 * request holds them (a checkpoint's "model", PUT params' "params"), for the messages.
 */
export function checkModel(session: SessionRecord, layout: Layout, params: LoadedParams, field = 'model'): void {
  for (const pname of params.keys()) {
    if (!layout.index.has(pname)) throw errors.unknownParameter(`${field}.${pname}`, pname, field === 'params' ? PARAMS_ONLY : undefined);
  }
  session.params.forEach((p, i) => {
    const t = params.get(p.name);
    if (!t) throw errors.stateDictMismatch(`${field}.${p.name}: missing (every parameter of the session is needed)`);
    if ((t.shape && (t.shape.length !== p.shape.length || t.shape.some((d, k) => d !== p.shape[k]))) || t.data.length !== layout.numels[i]) {
      throw errors.shapeMismatch(`${field}.${p.name}`, `expected shape ${JSON.stringify(p.shape)}, got ${t.shape ? JSON.stringify(t.shape) : `${t.data.length} elements`}`);
    }
  });
}

/**
 * A state_dict's param_names (torch 2.6's named optimizers save them) that are the session's parameters in
 * another order, within a group or across groups: loaded by position, as torch loads it, each state would go to
 * another parameter (the model's order against a session's from a sorted safetensors file: found by a PyTorch
 * user's review, taken with 200 and the states swapped). Refused naming the first place they differ. The
 * session's names are its parameters', or those it was created with (param_names); other names (a DDP model's
 * "module." prefix, an optimizer of another model) are loaded by position, as torch does.
 */
function checkNamedOrder(session: SessionRecord, sd: LoadedStateDict): void {
  const places: { k: number; j: number; name: string }[] = [];
  for (const [k, g] of sd.paramGroups.entries()) {
    const names = g.hyper.extra?.param_names;
    if (!Array.isArray(names) || names.length !== session.groups[k].params.length || !names.every((n) => typeof n === 'string')) return;
    names.forEach((name: string, j) => places.push({ k, j, name }));
  }
  const theirs = session.groups.flatMap((g) => g.params.map((i) => session.params[i].name));
  const kept = session.groups.flatMap((g) => (Array.isArray(g.extra?.param_names) && g.extra.param_names.length === g.params.length ? g.extra.param_names as string[] : g.params.map(() => null)));
  const sorted = (list: readonly (string | null)[]) => [...list].sort().join('\0');
  const file = places.map((p) => p.name);
  for (const ours of [theirs, kept]) {
    if (ours.includes(null) || sorted(file) !== sorted(ours)) continue;
    const at = places.findIndex((p, i) => p.name !== ours[i]);
    if (at < 0) return;
    const { k, j, name } = places[at];
    throw errors.stateDictMismatch(`param_groups[${k}].param_names[${j}]: ${JSON.stringify(name)}, where the session's parameter ${j} of group ${k} is ${JSON.stringify(ours[at])}: the state_dict names the session's parameters in another order, and loading it by position would give each state to another parameter (README "Numbering": load it into an optimizer made from the parameters in the session's order)`);
  }
}

/** Validates a loaded state_dict against the session (groups by position, state by saved index) into a plan. */
export function planLoad(session: SessionRecord, sd: LoadedStateDict): LoadPlan {
  // torch's checks, in its order and words (the field named first), then one torch lacks, in every format
  // alike: a parameter id listed twice (torch maps it to the last, and the other parameter gets no state).
  if (sd.paramGroups.length !== session.groups.length) {
    throw errors.stateDictMismatch(`param_groups: loaded state dict has a different number of parameter groups (${sd.paramGroups.length}; the session has ${session.groups.length})`);
  }
  sd.paramGroups.forEach((g, k) => {
    const size = session.groups[k].params.length;
    if (g.params.length !== size) {
      throw errors.stateDictMismatch(`param_groups[${k}].params: loaded state dict contains a parameter group that doesn't match the size of optimizer's group (${g.params.length} ids; the session's group has ${size})`);
    }
  });
  const owners = new Map<number, number>();
  sd.paramGroups.forEach((g, k) => {
    for (const saved of g.params) {
      if (owners.has(saved)) throw errors.invalidStateDict(`param_groups[${k}].params`, `parameter ${saved} is already in group ${owners.get(saved)}`);
      owners.set(saved, k);
    }
  });
  const savedToIndex = new Map<number, number>();
  checkNamedOrder(session, sd);
  const groups: GroupSpec[] = [];
  sd.paramGroups.forEach((g, k) => {
    const mine = session.groups[k];
    g.params.forEach((saved, j) => savedToIndex.set(saved, mine.params[j]));
    // A state_dict without param_names (an optimizer made from parameters()) keeps the session's, as torch
    // 2.6's load_state_dict keeps the group's (found by a torch 2.x user's review: they were dropped).
    const names = mine.extra?.param_names;
    const hyper = names !== undefined && g.hyper.extra?.param_names === undefined ? { ...g.hyper, extra: { ...g.hyper.extra, param_names: names } } : g.hyper;
    groups.push({ ...hyper, params: mine.params });
  });
  const scalars: ScalarStateRow[] = session.params.map(() => null);
  const ax: (Float32Array | null)[] = session.params.map(() => null);
  const layout = layoutOf(session.params);
  const groupOf = new Map(groups.flatMap((g) => g.params.map((i) => [i, g] as const)));
  for (const [saved, s] of sd.state) {
    const i = savedToIndex.get(saved);
    if (i === undefined) continue; // PyTorch keeps state for unknown ids; no parameter would ever use it
    const shape = session.params[i].shape;
    if (s.axShape && (s.axShape.length !== shape.length || s.axShape.some((d, k) => d !== shape[k]))) {
      throw errors.stateDictMismatch(`state.${saved}.ax: shape ${JSON.stringify(s.axShape)} does not match parameter ${JSON.stringify(session.params[i].name)} of shape ${JSON.stringify(shape)}`);
    }
    if (s.ax.length !== layout.numels[i]) {
      throw errors.stateDictMismatch(`state.${saved}.ax: ${s.ax.length} elements, parameter ${JSON.stringify(session.params[i].name)} has ${layout.numels[i]}`);
    }
    // As parameters and gradients are: a NaN or infinite state would reach the parameters at the next step
    // (torch takes it as it is), and a file is the one way it could enter a session.
    const scalar = { step: Math.fround(s.step), eta: Math.fround(s.eta), mu: Math.fround(s.mu) };
    for (const key of ['eta', 'mu'] as const) {
      if (!Number.isFinite(scalar[key])) throw errors.invalidStateDict(`state.${saved}.${key}`, `must be finite in float32 (it is ${s[key]})`);
    }
    const bad = firstNonFinite(s.ax);
    if (bad >= 0) throw errors.invalidStateDict(`state.${saved}.ax`, `must be finite (element ${bad} is ${s.ax[bad]})`);
    // The loaded values' next step from this state (an eta computed under another lr, a step count past
    // float32's 2**24) must stay finite too.
    const failure = stateOverflow(groupOf.get(i)!, scalar);
    if (failure) throw errors.invalidStateDict(`state.${saved}.${failure.key}`, failure.message);
    scalars[i] = scalar;
    ax[i] = s.ax;
  }
  return { groups, scalars, ax };
}
