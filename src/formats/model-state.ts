// A module's state_dict (torch/nn/modules/module.py, Module.state_dict): an OrderedDict from
// parameter and buffer names to tensors, carrying the `_metadata` attribute (per-module versions
// that load_state_dict passes to _load_from_state_dict). And the checkpoint dict the service stores:
// {"model": <model state_dict>, "optimizer": <ASGD state_dict>, "step": int}.

import { FormatError } from './errors.ts';
import { expectDict, fromAsgdStateDict, invalid, toAsgdStateDict, type AsgdStateDict, type StateDictReadOptions } from './optimizer-state.ts';
import { findUnread, orderedDict, PyDict, pyIntToNumber, pyTypeName, type PyValue } from './pyvalue.ts';
import { isTensor, toFloat32Tensor, type Tensor } from './tensor.ts';

export interface ModelStateDict {
  /** Parameters and buffers by name, in order. Any dtype (buffers such as num_batches_tracked are int64). */
  tensors: Map<string, Tensor>;
  /** The OrderedDict's `_metadata` ({module prefix: {"version": int}}), kept as-is; absent for a plain dict. */
  metadata?: PyDict;
}

export interface Checkpoint {
  model: ModelStateDict;
  optimizer: AsgdStateDict;
  /** Training step the checkpoint was taken at (absent in a file that does not say it). */
  step?: number;
  /** Other top-level keys, in order; written after the known ones. */
  extra?: [string, PyValue][];
}

/**
 * Reads a model state_dict (an OrderedDict or plain dict of str -> tensor). With `toFloat32`,
 * floating tensors (float64, float16, bfloat16) become float32; integer and bool buffers are kept.
 */
export function toModelStateDict(value: PyValue, options: StateDictReadOptions = {}, path = 'model', entryCode: 'INVALID_STATE_DICT' | 'INVALID_TENSOR' = 'INVALID_STATE_DICT'): ModelStateDict {
  // Every problem of the file's shape under one code: a state_dict's where a checkpoint's model part is
  // read, a tensor's where a file of named tensors is (a review: a tuple and a nested dict had two codes).
  const refuse = (message: string) => new FormatError(entryCode, `${path} ${message}`);
  if (!(value instanceof PyDict)) throw refuse(`must be a dict of tensors by name, got ${pyTypeName(value)}`);
  const dict = value;
  // A checkpoint (this service's, or a training script's {model, optimizer}) where a model's state_dict belongs.
  if (dict.has('model') && dict.has('optimizer') && !isTensor(dict.get('model') as PyValue)) {
    throw refuse('is a checkpoint (model and optimizer), not a model state_dict: give its model state_dict here (GET …/params?format=pt, or torch.save(model.state_dict())), then load the checkpoint into the session (PUT …/checkpoint)');
  }
  const tensors = new Map<string, Tensor>();
  for (const [name, tensor] of dict) {
    if (typeof name !== 'string') throw refuse(`has a non-string key ${String(name)}`);
    if (!isTensor(tensor)) {
      // A dict of tensors under a name: a wrapper, such as the JSON step body's {"grads": {...}} (a review).
      const wrapped = tensor instanceof PyDict && [...tensor.values()].some((v) => isTensor(v))
        ? `: the file holds one tensor under each parameter's name ({name: tensor}, torch.save({n: p.grad for n, p in model.named_parameters()})), not a dict of them under ${JSON.stringify(name)}`
        : '';
      throw new FormatError(entryCode, `${path}[${JSON.stringify(name)}] must be a tensor, got ${pyTypeName(tensor)}${wrapped}`);
    }
    const floating = tensor.dtype === 'float64' || tensor.dtype === 'float16' || tensor.dtype === 'bfloat16';
    tensors.set(name, options.toFloat32 && floating ? toFloat32Tensor(tensor) : tensor);
  }
  const model: ModelStateDict = { tensors };
  const metadata = dict.attributes?.get('_metadata');
  if (metadata instanceof PyDict) model.metadata = metadata;
  return model;
}

/** The OrderedDict Module.state_dict() returns, with its `_metadata` when known. */
export function fromModelStateDict(model: ModelStateDict): PyDict {
  const dict = orderedDict(model.tensors);
  if (model.metadata) dict.attributes = new PyDict([['_metadata', model.metadata]]);
  return dict;
}

/**
 * The keys of a checkpoint's model and optimizer: this service's ("model", "optimizer") or those of
 * PyTorch's tutorial on saving a general checkpoint ("model_state_dict", "optimizer_state_dict"), not both.
 */
export function checkpointKeys(dict: PyDict): { model: string; optimizer: string } {
  const pick = (ours: string, theirs: string) => {
    if (dict.has(ours) && dict.has(theirs)) throw invalid(`checkpoint.${theirs}`, `given with checkpoint.${ours}: one of the two`);
    return dict.has(theirs) ? theirs : ours;
  };
  return { model: pick('model', 'model_state_dict'), optimizer: pick('optimizer', 'optimizer_state_dict') };
}

/**
 * A checkpoint read with its unknown globals as UnreadObjects (TorchLoadOptions.unknownGlobals): they may
 * stand in the keys the service leaves out (the run's argparse.Namespace, a numpy scalar, a scheduler), and
 * are refused in the model, the optimizer and the step, naming where (PICKLE_GLOBAL_REFUSED).
 */
export function refuseUnreadInCheckpoint(value: PyValue): void {
  const read = value instanceof PyDict ? (() => {
    const keys = checkpointKeys(value);
    return [keys.model, keys.optimizer, 'step'].filter((key) => value.has(key)).map((key) => [value.get(key)!, `checkpoint.${key}`] as const);
  })() : [[value, 'checkpoint'] as const];
  for (const [part, path] of read) {
    const found = findUnread(part, path);
    if (found) {
      const hint = found.type.startsWith('torch.nn.modules.')
        ? 'a whole torch.nn.Module: save model.state_dict() instead'
        : 'other keys of a checkpoint may hold any object: they are left out';
      throw new FormatError('PICKLE_GLOBAL_REFUSED', `${found.path}: pickle global ${found.type} is not allowed here (${hint})`);
    }
  }
}

export function toCheckpoint(value: PyValue, options: StateDictReadOptions = {}): Checkpoint {
  const dict = expectDict(value, 'checkpoint');
  const keys = checkpointKeys(dict);
  const step = dict.get('step');
  const checkpoint: Checkpoint = {
    model: toModelStateDict(dict.get(keys.model) ?? missingPart(dict, keys.model), options, `checkpoint.${keys.model}`),
    optimizer: toAsgdStateDict(dict.get(keys.optimizer) ?? missingPart(dict, keys.optimizer), options, `checkpoint.${keys.optimizer}`),
    // Without it (the tutorial's layout has an epoch, not a step) the load counts it from the optimizer state.
    ...(step === undefined ? {} : { step: pyIntToNumber(step, 'checkpoint.step') }),
  };
  const extra = [...dict].filter(([key]) => key !== keys.model && key !== keys.optimizer && key !== 'step');
  for (const [key] of extra) if (typeof key !== 'string') throw invalid('checkpoint', `has a non-string key ${String(key)}`);
  if (extra.length > 0) checkpoint.extra = extra as [string, PyValue][];
  return checkpoint;
}

export function fromCheckpoint(checkpoint: Checkpoint): PyDict {
  if (!Number.isSafeInteger(checkpoint.step)) throw new FormatError('INVALID_STATE_DICT', `checkpoint.step must be a whole number, got ${checkpoint.step}`);
  const dict = new PyDict([
    ['model', fromModelStateDict(checkpoint.model)],
    ['optimizer', fromAsgdStateDict(checkpoint.optimizer)],
    ['step', BigInt(checkpoint.step!)],
  ]);
  for (const [key, value] of checkpoint.extra ?? []) {
    if (dict.has(key)) throw new FormatError('INVALID_STATE_DICT', `checkpoint extra key ${key} duplicates a known key`);
    dict.set(key, value);
  }
  return dict;
}

/** The layouts a checkpoint may have, for messages. */
const CHECKPOINT_LAYOUTS = 'a checkpoint is {"model", "optimizer", "step"?}, or the tutorial\'s {"model_state_dict", "optimizer_state_dict", …}';

/**
 * A checkpoint without its model or optimizer: said with the layouts it may have and the keys it has (the
 * first 12), and, for PyTorch Lightning's {"state_dict", "optimizer_states", …}, what to send instead.
 */
export function missingCheckpointPart(keys: readonly string[]): string {
  const shown = keys.slice(0, 12).map((k) => JSON.stringify(k.length > 60 ? `${k.slice(0, 60)}…` : k)).join(', ') + (keys.length > 12 ? `, … (${keys.length} keys)` : '');
  const lightning = keys.includes('state_dict') && keys.includes('optimizer_states')
    ? '; a PyTorch Lightning checkpoint: send {"model": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"][0]}, its model\'s names being the session\'s'
    : '';
  return `is missing (${CHECKPOINT_LAYOUTS}; this one has ${keys.length === 0 ? 'no keys' : shown}${lightning})`;
}

function missingPart(dict: PyDict, key: string): never {
  throw invalid(`checkpoint.${key}`, missingCheckpointPart([...dict].map(([k]) => String(k))));
}
