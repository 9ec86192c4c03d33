// Content negotiation and the binary forms of the state: torch.save files and safetensors.
// Downloads stream the tensors from the state copy (no second copy); uploads are one bounded Buffer
// whose tensors are read in place where aligned.
import { Readable } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { errors } from '../../errors.ts';
import {
  fromAsgdStateDict, fromCheckpoint, fromModelStateDict, readSafetensors, readTorchSave, toAsgdStateDict, toCheckpoint, toModelStateDict,
  writeSafetensors, writeTorchSave, type ByteStream, type Float32Tensor, type Tensor,
} from '../../formats/index.ts';
import type { BinaryGradient, GradientInput } from '../../sessions/gradients.ts';
import type { LoadedStateDict, StateView } from '../../sessions/service.ts';
import { asgdFromView, loadedFromAsgd, paramTensor, parseStateDict, readTensorField } from '../../sessions/state-dict.ts';

export type WireFormat = 'json' | 'pt' | 'safetensors';

export const BINARY_TYPES = {
  pt: ['application/octet-stream', 'application/vnd.pytorch'],
  safetensors: ['application/x-safetensors', 'application/safetensors'],
} as const;

const MIME: Record<WireFormat, string> = { json: 'application/json', pt: 'application/octet-stream', safetensors: 'application/x-safetensors' };

/** The format from ?format= or else the Accept header; the route's first offer by default. */
export function negotiate(request: FastifyRequest, queryFormat: string | undefined, offered: WireFormat[]): WireFormat {
  if (queryFormat !== undefined) {
    if (!(offered as string[]).includes(queryFormat)) throw errors.invalidQuery('format', `must be one of ${offered.join(', ')}`);
    return queryFormat as WireFormat;
  }
  const accept = request.headers.accept;
  if (!accept) return offered[0];
  const wanted = accept.split(',').slice(0, 32).map((part) => {
    const [type, ...params] = part.trim().toLowerCase().split(';');
    const q = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    const quality = q ? Number(q.slice(2)) : 1;
    return { type: type.trim(), q: Number.isFinite(quality) ? quality : 0 };
  }).filter((w) => w.q > 0).sort((a, b) => b.q - a.q);
  for (const { type } of wanted) {
    if (type === '*/*' || type === 'application/*') return offered[0];
    for (const format of offered) {
      if (type === MIME[format] || (format !== 'json' && (BINARY_TYPES[format] as readonly string[]).includes(type))) return format;
    }
  }
  throw errors.notAcceptable(accept.slice(0, 200), offered.map((f) => MIME[f]).join(', '));
}

/** The wire format of a request body, from its Content-Type. */
export function contentFormat(request: FastifyRequest): WireFormat {
  const type = (request.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if ((BINARY_TYPES.safetensors as readonly string[]).includes(type)) return 'safetensors';
  if ((BINARY_TYPES.pt as readonly string[]).includes(type)) return 'pt';
  return 'json';
}

function float32Of(tensor: Tensor, field: string): Float32Tensor {
  if (tensor.dtype !== 'float32') throw errors.invalidTensor(field, `dtype ${tensor.dtype} is not supported; sessions hold float32 tensors`);
  return tensor;
}

/** Named float32 tensors from a safetensors file or a torch.save'd dict of tensors (a model state_dict). */
export function readNamedTensors(request: FastifyRequest, body: Buffer, field: string): { tensors: Map<string, Float32Tensor>; metadata: Map<string, string> } {
  const format = contentFormat(request);
  const out = new Map<string, Float32Tensor>();
  if (format === 'safetensors') {
    const file = readSafetensors(body, { dtypes: 'all' });
    for (const [name, tensor] of file.tensors) out.set(name, float32Of(tensor, `${field}.${name}`));
    return { tensors: out, metadata: file.metadata };
  }
  const model = toModelStateDict(readTorchSave(body), {}, field);
  for (const [name, tensor] of model.tensors) out.set(name, float32Of(tensor, `${field}.${name}`));
  return { tensors: out, metadata: new Map() };
}

/**
 * Gradients from a safetensors file or a torch.save'd dict: float32, or float16/bfloat16 kept as their
 * bits (widened exactly, and logged as received, by sessions/gradients.ts). Other dtypes are refused.
 */
export function binaryGradients(request: FastifyRequest, body: Buffer): { input: GradientInput; metadata: Map<string, string> } {
  const file = contentFormat(request) === 'safetensors'
    ? readSafetensors(body, { dtypes: 'all' })
    : { tensors: toModelStateDict(readTorchSave(body), {}, 'grads').tensors, metadata: new Map<string, string>() };
  const source = file.tensors;
  const tensors = new Map<string, BinaryGradient>();
  for (const [name, tensor] of source) {
    if (tensor.dtype === 'float16' || tensor.dtype === 'bfloat16') tensors.set(name, { shape: tensor.shape, dtype: tensor.dtype, data: tensor.data });
    else if (tensor.dtype === 'float32') tensors.set(name, tensor);
    else throw errors.invalidTensor(`grads.${name}`, `dtype ${tensor.dtype} is not supported; gradients are float32, float16 or bfloat16`);
  }
  return { input: { format: 'tensors', tensors }, metadata: file.metadata };
}

/** A state_dict from a torch.save file or safetensors (state.<i>.<key> tensors, param_groups in the metadata). */
export function readStateDictBody(request: FastifyRequest, body: Buffer): LoadedStateDict {
  if (contentFormat(request) === 'safetensors') {
    const file = readSafetensors(body, { dtypes: 'all' });
    const groups = file.metadata.get('param_groups');
    if (groups === undefined) throw errors.invalidStateDict('__metadata__.param_groups', 'is missing (a JSON list of the param groups)');
    let paramGroups: unknown;
    try {
      paramGroups = JSON.parse(groups);
    } catch {
      throw errors.invalidStateDict('__metadata__.param_groups', 'is not valid JSON');
    }
    const state: Record<string, Record<string, unknown>> = {};
    for (const [name, tensor] of file.tensors) {
      const m = /^state\.(\d{1,9})\.(step|eta|mu|ax)$/.exec(name);
      if (!m) throw errors.invalidStateDict(name, 'tensor names must be state.<index>.<step|eta|mu|ax>');
      (state[m[1]] ??= {})[m[2]] = { shape: tensor.shape, data: float32Of(tensor, name).data };
    }
    return parseStateDict({ state, param_groups: paramGroups });
  }
  return loadedFromAsgd(toAsgdStateDict(readTorchSave(body), { toFloat32: true }));
}

export interface CheckpointInput {
  stateDict: LoadedStateDict;
  params: Map<string, { shape: number[] | null; data: Float32Array }>;
  step: number;
}

/** {"model", "optimizer", "step"}: a torch.save file, or the same structure as JSON. */
export function readCheckpointBody(request: FastifyRequest, body: unknown): CheckpointInput {
  if (Buffer.isBuffer(body)) {
    if (contentFormat(request) !== 'pt') throw errors.unsupportedMediaType(String(request.headers['content-type']), 'application/octet-stream (a torch.save file) or application/json');
    const checkpoint = toCheckpoint(readTorchSave(body), { toFloat32: true });
    const params: CheckpointInput['params'] = new Map();
    for (const [name, tensor] of checkpoint.model.tensors) params.set(name, { shape: tensor.shape, data: float32Of(tensor, `model.${name}`).data });
    return { stateDict: loadedFromAsgd(checkpoint.optimizer), params, step: checkpoint.step };
  }
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw errors.invalidBody('body: must be {"model", "optimizer", "step"}');
  const b = body as Record<string, unknown>;
  for (const key of Object.keys(b)) if (!['model', 'optimizer', 'step'].includes(key)) throw errors.invalidBody(`${key}: unknown key`);
  if (typeof b.step !== 'number' || !Number.isSafeInteger(b.step) || b.step < 0) throw errors.invalidBody('step: must be a whole number >= 0');
  if (b.model === null || typeof b.model !== 'object' || Array.isArray(b.model)) throw errors.invalidBody('model: must be an object of tensors by name');
  const params: CheckpointInput['params'] = new Map();
  for (const [name, value] of Object.entries(b.model as Record<string, unknown>)) {
    // Shapes are checked against the session by the domain.
    const tensor = readTensorField(value, `model.${name}`);
    params.set(name, { shape: tensor.shape, data: tensor.data });
  }
  return { stateDict: parseStateDict(b.optimizer), params, step: b.step };
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
    const metadata = { format: 'pt', session: view.session, version: String(view.version), step: String(view.step), averaged: String(averaged) };
    return sendStream(reply, writeSafetensors(namedParams(view, averaged), metadata), MIME.safetensors, `${base}.safetensors`);
  }
  const model = fromModelStateDict({ tensors: new Map(namedParams(view, averaged)) });
  return sendStream(reply, writeTorchSave(model, { archiveName: base }), MIME.pt, `${base}.pt`);
}

export function sendStateDict(reply: FastifyReply, format: WireFormat, view: StateView) {
  const base = `${view.session}-v${view.version}-optimizer`;
  const sd = asgdFromView(view);
  if (format === 'safetensors') {
    const tensors: [string, Tensor][] = [];
    for (const [i, s] of sd.state) {
      tensors.push([`state.${i}.step`, { dtype: 'float32', shape: [], data: Float32Array.of(s.step) }]);
      tensors.push([`state.${i}.eta`, { dtype: 'float32', shape: [], data: Float32Array.of(s.eta) }]);
      tensors.push([`state.${i}.mu`, { dtype: 'float32', shape: [], data: Float32Array.of(s.mu) }]);
      tensors.push([`state.${i}.ax`, s.ax]);
    }
    const groups = view.groups.map((g) => ({
      lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weight_decay, foreach: null, maximize: g.maximize,
      differentiable: false, capturable: false, ...g.extra, params: g.params,
    }));
    const metadata = { param_groups: JSON.stringify(groups), session: view.session, version: String(view.version), step: String(view.step) };
    return sendStream(reply, writeSafetensors(tensors, metadata), MIME.safetensors, `${base}.safetensors`);
  }
  return sendStream(reply, writeTorchSave(fromAsgdStateDict(sd), { archiveName: base }), MIME.pt, `${base}.pt`);
}

export function sendCheckpoint(reply: FastifyReply, view: StateView) {
  const base = `${view.session}-v${view.version}-checkpoint`;
  const checkpoint = fromCheckpoint({ model: { tensors: new Map(namedParams(view, false)) }, optimizer: asgdFromView(view), step: view.step });
  return sendStream(reply, writeTorchSave(checkpoint, { archiveName: base }), MIME.pt, `${base}.pt`);
}
