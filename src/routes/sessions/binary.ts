// Content negotiation and the binary forms of the state (torch.save, safetensors).
import type { FastifyReply, FastifyRequest } from 'fastify';
import { errors } from '../../errors.ts';
import type { GradientInput } from '../../sessions/gradients.ts';
import type { LoadedStateDict, StateView } from '../../sessions/service.ts';

export type WireFormat = 'json' | 'pt' | 'safetensors';

export const BINARY_TYPES = {
  pt: ['application/octet-stream', 'application/vnd.pytorch'],
  safetensors: ['application/x-safetensors', 'application/safetensors'],
} as const;

const MIME: Record<WireFormat, string> = { json: 'application/json', pt: 'application/octet-stream', safetensors: 'application/x-safetensors' };

/** The format from ?format= or else the Accept header; JSON by default. */
export function negotiate(request: FastifyRequest, queryFormat: string | undefined, offered: WireFormat[]): WireFormat {
  if (queryFormat !== undefined) {
    if (!(offered as string[]).includes(queryFormat)) throw errors.invalidQuery('format', `must be one of ${offered.join(', ')}`);
    return queryFormat as WireFormat;
  }
  const accept = request.headers.accept;
  if (!accept) return offered[0];
  const wanted = accept.split(',').map((part) => {
    const [type, ...params] = part.trim().toLowerCase().split(';');
    const q = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    return { type: type.trim(), q: q ? Number(q.slice(2)) : 1 };
  }).filter((w) => w.q > 0).sort((a, b) => b.q - a.q);
  for (const { type } of wanted) {
    if (type === '*/*' || type === 'application/*') return offered[0];
    for (const format of offered) {
      if (type === MIME[format] || (format !== 'json' && (BINARY_TYPES[format] as readonly string[]).includes(type))) return format;
    }
  }
  throw errors.notAcceptable(accept.slice(0, 200), offered.map((f) => MIME[f]).join(', '));
}

export function contentFormat(request: FastifyRequest): WireFormat {
  const type = (request.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if ((BINARY_TYPES.safetensors as readonly string[]).includes(type)) return 'safetensors';
  if ((BINARY_TYPES.pt as readonly string[]).includes(type)) return 'pt';
  return 'json';
}

export function binaryGradients(request: FastifyRequest, body: Buffer): GradientInput {
  void body;
  throw errors.unsupportedMediaType(String(request.headers['content-type']), 'application/json');
}

export function readStateDictBody(request: FastifyRequest, body: Buffer): LoadedStateDict {
  void body;
  throw errors.unsupportedMediaType(String(request.headers['content-type']), 'application/json');
}

export function readCheckpointBody(request: FastifyRequest, body: unknown): { stateDict?: LoadedStateDict; params?: Map<string, Float32Array> } {
  void body;
  throw errors.unsupportedMediaType(String(request.headers['content-type']), 'application/json');
}

export function sendParams(reply: FastifyReply, format: WireFormat, view: StateView, averaged: boolean) {
  void view; void averaged;
  throw errors.notAcceptable(format, 'application/json');
}
export function sendStateDict(reply: FastifyReply, format: WireFormat, view: StateView) {
  void view;
  throw errors.notAcceptable(format, 'application/json');
}
export function sendCheckpoint(reply: FastifyReply, view: StateView) {
  void view;
  throw errors.notAcceptable('pt', 'application/json');
}
