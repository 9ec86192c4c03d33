// The binary forms of the state on the wire: torch.save files and safetensors (the layouts live in
// src/formats). Downloads stream the tensors from the state copy (no second copy); uploads are one
// bounded Buffer whose tensors are read in place where aligned.
import { Readable } from 'node:stream';
import type { FastifyReply } from 'fastify';
import { errors } from '../../errors.ts';
import {
  checkpointKeys, FormatError, fromAsgdStateDict, fromCheckpoint, fromModelStateDict, MAX_PICKLE_ITEMS, MAX_PICKLE_OBJECTS, MAX_PICKLE_STACK_ITEMS, missingCheckpointPart, readOptimizerSafetensors, readSafetensors, readTorchSave, refuseUnreadInCheckpoint, toAsgdStateDict, toCheckpoint,
  toFloat32Tensor, toModelStateDict, writeOptimizerSafetensors, writeSafetensors, writeTorchSave, type ByteStream, type Float32Tensor, type PyDict, type Tensor, type TorchLoadOptions,
} from '../../formats/index.ts';
import type { BinaryGradient, GradientInput } from '../../sessions/gradients.ts';
import type { LoadedStateDict, StateView } from '../../sessions/model.ts';
import { modelBuffers, unknownEntry } from '../../sessions/load-plan.ts';
import { MAX_LOADED_STEP, MAX_PARAMS, recordIntegerLiterals } from '../../sessions/spec.ts';
import { firstNonFinite } from '../../sessions/tensors.ts';
import { asgdFromView, groupWithKinds, loadedFromAsgd, paramTensor, parseStateDict, readTensorField } from '../../sessions/state-dict.ts';
import { parseJsonWithin } from '../../formats/json-depth.ts';
import { MEDIA, type WireFormat } from '../media.ts';

/** A parameter as float32: float16 and bfloat16 (a half-precision model's weights) are widened exactly. */
function float32Of(tensor: Tensor, field: string): Float32Tensor {
  if (tensor.dtype === 'float32') return tensor;
  if (tensor.dtype === 'float16' || tensor.dtype === 'bfloat16') return toFloat32Tensor(tensor);
  // An integer tensor in a model's state_dict is a buffer (BatchNorm's num_batches_tracked), not a parameter.
  const buffer = /int|bool/.test(tensor.dtype) ? ' (a buffer, not a parameter? send the parameters only: dict(model.named_parameters()))' : '';
  throw errors.invalidTensor(field, `dtype ${tensor.dtype} is not supported; sessions hold float32 parameters (float16 and bfloat16 are widened exactly)${buffer}`);
}

/** Named float32 tensors (float16/bfloat16 widened) from a safetensors file or a torch.save'd dict of tensors (a model state_dict). */
/**
 * Limits on a torch.save file of one tensor per parameter (gradients, parameters) for a session of `count`
 * parameters: a real one takes about 26 pickle items and 10 values a tensor and one zip entry a storage
 * (measured on torch 1.13 files); 4-6x that, plus room for the file's own few, bounds what a hostile
 * file of a small session can make the reader do to milliseconds.
 */
export function perTensorLimits(count: number): TorchLoadOptions {
  return {
    // The floors leave room for what a checkpoint carries besides the state dicts (a loss history of tens
    // of thousands of floats: a review's 5,000 were refused by a two-parameter session) at a few MB of memory.
    maxItems: Math.min(128 * count + 131_072, MAX_PICKLE_ITEMS),
    maxObjects: Math.min(64 * count + 65_536, MAX_PICKLE_OBJECTS),
    maxStackItems: Math.min(16 * count + 4096, MAX_PICKLE_STACK_ITEMS),
    maxEntries: count + 16,
  };
}

/**
 * A create's torch.save file of at most MAX_PARAMS tensors: a model's parameters take about 40 pickle items
 * and 16 values a tensor (nn.Parameter's rebuild; measured on 100,000 of them), so 64 and 24 leave room. The
 * global bounds (33 million items) let a 33 MB file of one-byte opcodes hold the event loop 9-46 s (found by
 * a hostile-input review).
 */
export const CREATE_FILE_LIMITS: TorchLoadOptions = {
  maxItems: 64 * MAX_PARAMS + 131_072,
  maxObjects: 24 * MAX_PARAMS + 65_536,
  maxStackItems: 16 * MAX_PARAMS + 4096,
};

/**
 * Tensors an optimizer state_dict of a session of `count` parameters holds at most: step, eta, mu and ax
 * each (torch.save gives each its own storage), and a checkpoint the model's parameters besides. Its
 * pickle is bounded as a file of that many tensors: a hostile file sent to a small session (8 MiB of
 * empty dicts: 8 million values, 80-100 s of one core and 2.4 GB before) is refused at once.
 */
const STATE_DICT_TENSORS = 5;
const CHECKPOINT_TENSORS = 8;

export function readNamedTensors(format: WireFormat, body: Buffer, field: string, limits: TorchLoadOptions = {}, sessionParams?: readonly string[]): NamedTensors {
  const out = new Map<string, Float32Tensor>();
  const file = format === 'safetensors' ? readSafetensors(body, { dtypes: 'all', maxTensors: MAX_PARAMS }) : null;
  const model = file ? null : toModelStateDict(readTorchSave(body, { ...limits, name: field }), {}, field, 'INVALID_TENSOR');
  const tensors = file ? file.tensors : model!.tensors;
  const aliases = file ? new Map<string, string>() : aliasesOf(tensors);
  // Given the session's parameters, the buffers of a module's state_dict (torch.save(model.state_dict()): an
  // OrderedDict carrying the module's _metadata) are left out, as PUT checkpoint leaves them out
  // (modelBuffers), before their dtype is read (BatchNorm's int64 num_batches_tracked), and so is the second
  // name of a tied tensor whose first name is a parameter. In any other file (a dict of tensors, safetensors)
  // a name the session lacks is refused, as in JSON: it may be a parameter the session does not have (found
  // by a review: a layer added to the model was dropped without a word).
  // Either way a name the session lacks is refused before any dtype is read, naming what is missing (and a
  // wrapper's prefix, DDP's "module.": errors.unknownParameter): reviews saw a DDP model's state_dict and a
  // dict(model.state_dict()) without a parameter refused for an int64 buffer's dtype, "a buffer?".
  let leftOut = new Set<string>();
  if (sessionParams) {
    const tiedAgain = tiedAgainOf(aliases, sessionParams);
    const names = [...tensors.keys()].filter((name) => !tiedAgain(name));
    if (model?.metadata) leftOut = modelBuffers(names, sessionParams, field);
    else {
      const known = new Set(sessionParams);
      const unknown = names.find((name) => !known.has(name));
      if (unknown !== undefined) throw unknownEntry(field, unknown, sessionParams.filter((name) => !tensors.has(name)));
    }
  }
  for (const [name, tensor] of tensors) if (!leftOut.has(name)) out.set(name, float32Of(tensor, `${field}.${name}`));
  return { tensors: out, metadata: file ? file.metadata : new Map(), aliases };
}

export interface NamedTensors {
  tensors: Map<string, Float32Tensor>;
  metadata: Map<string, string>;
  /**
   * Names of a torch.save'd state_dict that are the same tensor as an earlier name (tied weights, as
   * `decoder.weight = encoder.weight` makes them: model.state_dict() names the one tensor twice, while
   * named_parameters() names it once), each with that earlier name.
   */
  aliases: Map<string, string>;
}

/**
 * Whether a name is the second name of a tied tensor whose first name is a session parameter (a tied model's
 * state_dict names the tensor twice, named_parameters() once): that tensor again, not an unknown parameter.
 */
export function tiedAgainOf(aliases: ReadonlyMap<string, string>, sessionParams: Iterable<string>): (name: string) => boolean {
  const known = new Set(sessionParams);
  return (name) => {
    const first = aliases.get(name);
    return first !== undefined && !known.has(name) && known.has(first);
  };
}

/** Entries that view exactly the same elements (storage, offset, shape) as an earlier one: alias -> first name. */
function aliasesOf(tensors: Map<string, Tensor>): Map<string, string> {
  const first = new Map<string, string>();
  const aliases = new Map<string, string>();
  for (const [name, tensor] of tensors) {
    const { data } = tensor;
    if (data.length === 0) continue; // empty tensors share nothing
    const key = `${data.byteOffset}:${data.byteLength}:${tensor.dtype}:${tensor.shape.join(',')}`;
    const seen = first.get(key);
    if (seen !== undefined && tensors.get(seen)!.data.buffer === data.buffer) aliases.set(name, seen);
    else if (seen === undefined) first.set(key, name);
  }
  return aliases;
}

/**
 * Gradients from a safetensors file or a torch.save'd dict: float32, or float16/bfloat16 kept as their
 * bits (widened exactly, and logged as received, by sessions/gradients.ts). Other dtypes are refused.
 * Given the session's parameter names (its layout's index), a safetensors header is bounded by their
 * count and refused at its first unknown name, before the rest of it is read.
 */
export function readGradients(format: WireFormat, body: Buffer, parameters?: ReadonlyMap<string, unknown>): { input: GradientInput; metadata: Map<string, string> } {
  const checkName = parameters && ((name: string) => {
    if (!parameters.has(name)) throw errors.unknownParameter(`grads.${name}`, name);
  });
  const file = format === 'safetensors'
    ? readSafetensors(body, { dtypes: 'all', maxTensors: parameters?.size ?? MAX_PARAMS, checkName })
    : { tensors: toModelStateDict(readTorchSave(body, { ...(parameters && perTensorLimits(parameters.size)), name: 'grads' }), {}, 'grads', 'INVALID_TENSOR').tensors, metadata: new Map<string, string>() };
  const tensors = new Map<string, BinaryGradient>();
  for (const [name, tensor] of file.tensors) {
    if (tensor.dtype === 'float16' || tensor.dtype === 'bfloat16') tensors.set(name, { shape: tensor.shape, dtype: tensor.dtype, data: tensor.data });
    else if (tensor.dtype === 'float32') tensors.set(name, tensor);
    else throw errors.invalidTensor(`grads.${name}`, `dtype ${tensor.dtype} is not supported; gradients are float32, float16 or bfloat16`);
  }
  return { input: { format: 'tensors', tensors }, metadata: file.metadata };
}

/** A state_dict from a torch.save file or the service's safetensors layout, for a session of `count` parameters. */
export function readStateDictBody(format: WireFormat, body: Buffer, count: number): LoadedStateDict {
  if (format === 'safetensors') {
    // Four tensors (step, eta, mu, ax) for each parameter of the session.
    const { state, paramGroups } = readOptimizerSafetensors(body, { maxTensors: STATE_DICT_TENSORS * count });
    if (paramGroups === undefined) throw errors.invalidStateDict('__metadata__.param_groups', 'is missing (a JSON list of the param groups)');
    const groups = parseJsonWithin(paramGroups, (problem) => errors.invalidStateDict('__metadata__.param_groups', problem ?? 'is not valid JSON'), undefined, recordIntegerLiterals);
    return parseStateDict({ state, param_groups: groups });
  }
  return loadedFromAsgd(toAsgdStateDict(scaledRead(body, STATE_DICT_TENSORS * count, 'state_dict', count), { toFloat32: true }));
}

/** readTorchSave under limits scaled to `tensors` tensors; a limit's refusal says they follow the session's size. */
function scaledRead(body: Buffer, tensors: number, name: string, params: number, unknownGlobals: 'refuse' | 'unread' = 'refuse'): ReturnType<typeof readTorchSave> {
  try {
    return readTorchSave(body, { ...perTensorLimits(tensors), name, unknownGlobals });
  } catch (err) {
    if (err instanceof FormatError && err.code === 'PICKLE_LIMIT_EXCEEDED') {
      throw new FormatError(err.code, `${err.message} (a ${name} of this session, ${params} parameter${params === 1 ? '' : 's'}, is read under limits that follow its size, with room for other keys; save the state dicts without large extras)`);
    }
    throw err;
  }
}

export interface CheckpointInput {
  stateDict: LoadedStateDict;
  params: Map<string, { shape: number[] | null; data: Float32Array }>;
  /** Absent: counted from the optimizer state, as a state_dict load counts it. */
  step: number | undefined;
  /** Where the request holds the parameters ("model", or the tutorial's "model_state_dict"), for messages. */
  paramsField: string;
}

/**
 * A checkpoint {"model", "optimizer", "step"} from a torch.save file; also PyTorch tutorial's
 * {"model_state_dict", "optimizer_state_dict", "epoch", …}, and without "step".
 */
export function readCheckpointFile(body: Buffer, sessionParams: readonly string[]): CheckpointInput {
  const count = sessionParams.length;
  // The keys the service leaves out may hold any object (a run's argparse.Namespace, numpy values): read
  // without building them, and refused in the parts it loads.
  const value = scaledRead(body, CHECKPOINT_TENSORS * count, 'checkpoint', count, 'unread');
  refuseUnreadInCheckpoint(value);
  const checkpoint = toCheckpoint(value, { toFloat32: true });
  // As the JSON form's schema checks it (the file's step is any Python int).
  if (checkpoint.step !== undefined && checkpoint.step < 0) throw errors.invalidStateDict('step', 'must be >= 0');
  if (checkpoint.step !== undefined && checkpoint.step > MAX_LOADED_STEP) throw errors.invalidStateDict('step', `must be at most ${MAX_LOADED_STEP} (2^50)`);
  // The model's parameters as PUT params takes them: float32 (or half widened), finite. Read again from the
  // file without the optimizer's conversion, which would round a float64 1e300 to Infinity.
  const modelKey = checkpointKeys(value as PyDict).model;
  const model = toModelStateDict((value as PyDict).get(modelKey)!, {}, `checkpoint.${modelKey}`);
  const params: CheckpointInput['params'] = new Map();
  // A tied model's state_dict names the tied tensor twice; the name the session lacks is that tensor again
  // (as PUT params takes it; the tutorial's {'model': model.state_dict(), ...} of AWD-LSTM).
  const tiedAgain = tiedAgainOf(aliasesOf(model.tensors), sessionParams);
  const buffers = modelBuffers([...model.tensors.keys()].filter((name) => !tiedAgain(name)), sessionParams, modelKey);
  for (const [name, tensor] of model.tensors) {
    if (tiedAgain(name) || buffers.has(name)) continue;
    params.set(name, finiteParam(float32Of(tensor, `${modelKey}.${name}`), `${modelKey}.${name}`));
  }
  return { stateDict: loadedFromAsgd(checkpoint.optimizer), params, step: checkpoint.step, paramsField: modelKey };
}

/** A parameter is finite, as create and PUT params require: a checkpoint is no way around that. */
function finiteParam(tensor: Float32Tensor, field: string): { shape: number[]; data: Float32Array } {
  const bad = firstNonFinite(tensor.data);
  if (bad >= 0) throw errors.invalidTensor(`${field}.data[${bad}]`, 'is not finite');
  return { shape: tensor.shape, data: tensor.data };
}

type CheckpointJson = {
  model?: Record<string, unknown>; optimizer?: unknown; model_state_dict?: Record<string, unknown>; optimizer_state_dict?: unknown; step?: number;
};

/** The parts of a checkpoint's JSON form, checked for its layout (before the session is looked up: a bad body is a 400 whatever the session). */
export function checkpointJsonParts(body: CheckpointJson) {
  // The checkpoint's own names or the tutorial's, as checkpointKeys takes them from a file; the rest is ignored.
  const pick = <K extends 'model' | 'optimizer'>(ours: K, theirs: `${K}_state_dict`) => {
    if (body[ours] !== undefined && body[theirs] !== undefined) throw errors.invalidStateDict(theirs, `given with ${ours}: one of the two`);
    return body[theirs] !== undefined ? { key: theirs, value: body[theirs] } : { key: ours, value: body[ours] };
  };
  const model = pick('model', 'model_state_dict');
  const optimizer = pick('optimizer', 'optimizer_state_dict');
  if (model.value === undefined) throw errors.invalidStateDict('model', missingCheckpointPart(Object.keys(body)));
  if (optimizer.value === undefined) throw errors.invalidStateDict('optimizer', missingCheckpointPart(Object.keys(body)));
  return { model: { key: model.key, value: model.value as Record<string, unknown> }, optimizer: optimizer.value, step: body.step };
}

/** A checkpoint from its JSON form's parts (structure checked by the route's schema; tensors and state here). */
export function readCheckpointJson(parts: ReturnType<typeof checkpointJsonParts>, sessionParams: readonly string[]): CheckpointInput {
  const { model, optimizer, step } = parts;
  const params: CheckpointInput['params'] = new Map();
  const entries = Object.entries(model.value);
  const buffers = modelBuffers(entries.map(([name]) => name), sessionParams, model.key);
  for (const [name, value] of entries) {
    if (buffers.has(name)) continue;
    // Shapes are checked against the session by the domain.
    const tensor = readTensorField(value, `${model.key}.${name}`, 'reject');
    params.set(name, { shape: tensor.shape, data: tensor.data });
  }
  return { stateDict: parseStateDict(optimizer), params, step, paramsField: model.key };
}

function sendStream(reply: FastifyReply, stream: ByteStream, type: string, filename: string) {
  reply.header('content-type', type);
  reply.header('content-length', String(stream.byteLength));
  reply.header('content-disposition', `attachment; filename="${filename}"`);
  return reply.send(Readable.from(stream.chunks, { objectMode: false }));
}

function namedParams(view: StateView, averaged: boolean): [string, Float32Tensor][] {
  return view.params.map((p, i) => [p.name, { dtype: 'float32', shape: [...p.shape], data: paramTensor(view, i, averaged) }]);
}

export function sendParams(reply: FastifyReply, format: WireFormat, view: StateView, averaged: boolean) {
  const base = `${view.session}-v${view.version}${averaged ? '-averaged' : ''}`;
  if (format === 'safetensors') {
    // The file's tensors are in the reference's order (by dtype, then name); param_names is the session's
    // (the model's) order, in which the clients hand them out, as the JSON and torch.save answers list them.
    const metadata = {
      format: 'pt', session: view.session, version: String(view.version), step: String(view.step), averaged: String(averaged),
      param_names: JSON.stringify(view.params.map((p) => p.name)),
    };
    return sendStream(reply, writeSafetensors(namedParams(view, averaged), metadata), MEDIA.safetensors[0], `${base}.safetensors`);
  }
  const model = fromModelStateDict({ tensors: new Map(namedParams(view, averaged)) });
  return sendStream(reply, writeTorchSave(model, { archiveName: base }), MEDIA.pt[0], `${base}.pt`);
}

export function sendStateDict(reply: FastifyReply, format: WireFormat, view: StateView) {
  const base = `${view.session}-v${view.version}-optimizer`;
  const sd = asgdFromView(view);
  if (format === 'safetensors') {
    const metadata = { session: view.session, version: String(view.version), step: String(view.step) };
    return sendStream(reply, writeOptimizerSafetensors(sd.state, view.groups.map(groupWithKinds), metadata), MEDIA.safetensors[0], `${base}.safetensors`);
  }
  return sendStream(reply, writeTorchSave(fromAsgdStateDict(sd), { archiveName: base }), MEDIA.pt[0], `${base}.pt`);
}

export function sendCheckpoint(reply: FastifyReply, view: StateView) {
  const base = `${view.session}-v${view.version}-checkpoint`;
  const checkpoint = fromCheckpoint({ model: { tensors: new Map(namedParams(view, false)) }, optimizer: asgdFromView(view), step: view.step });
  return sendStream(reply, writeTorchSave(checkpoint, { archiveName: base }), MEDIA.pt[0], `${base}.pt`);
}
