// Answers that carry a session's state (parameters, state_dict, checkpoint) at one version, in the format
// the client asked for: shared by the current state's routes and the snapshots' routes.
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { TSchema } from 'typebox';
import { errors } from '../../errors.ts';
import type { StateView } from '../../sessions/model.ts';
import { paramsJson, stateDictJson } from '../../sessions/state-dict.ts';
import { setVersion } from '../common.ts';
import { MEDIA, negotiate, ROUTE_MEDIA, type WireFormat } from '../media.ts';
import { Binary, Checkpoint, Params, StateDict } from '../schemas.ts';
import { sendCheckpoint, sendParams, sendStateDict } from './binary.ts';

/** Largest tensor payload answered as JSON (numbers); bigger sessions use safetensors or torch.save. */
export const MAX_JSON_ELEMENTS = 16 * 1024 * 1024;

export type ViewKind = 'params' | 'state_dict' | 'checkpoint';

const KINDS: Record<ViewKind, { offers: readonly WireFormat[]; json: TSchema; what: string }> = {
  params: { offers: ROUTE_MEDIA.params.offers, json: Params, what: 'The parameters' },
  state_dict: { offers: ROUTE_MEDIA.stateDict.offers, json: StateDict, what: 'The optimizer state_dict' },
  checkpoint: { offers: ROUTE_MEDIA.checkpoint.offers, json: Checkpoint, what: 'The checkpoint {"model", "optimizer", "step"}' },
};

const BINARY_DESCRIPTION: Record<WireFormat, string> = { json: 'JSON', pt: 'a torch.save file', safetensors: 'safetensors' };

/** The 200 response of a state download: one entry per media type of each format it offers. */
export function viewResponse(kind: ViewKind) {
  const { offers, json, what } = KINDS[kind];
  return {
    200: {
      description: `${what}, as ${offers.map((f) => `${BINARY_DESCRIPTION[f]} (${MEDIA[f][0]})`).join(', ')}`,
      content: Object.fromEntries(offers.map((f) => [MEDIA[f][0], { schema: f === 'json' ? json : Binary }])),
    },
  };
}

/** The query parameters of a download: the format instead of an Accept header, and for params `averaged`. */
export interface ViewQuery {
  format?: string;
  averaged?: boolean;
}

/**
 * Refuses (406) a JSON answer of a session of `numel` elements too large for JSON. Called with the session's
 * size before its state is built, too: a read that will be refused costs no replay and no memory.
 */
export function refuseLargeJson(kind: ViewKind, request: FastifyRequest, query: ViewQuery, numel: number): void {
  if (numel * (kind === 'params' ? 1 : 2) <= MAX_JSON_ELEMENTS) return;
  if (negotiate(request, query.format, KINDS[kind].offers) !== 'json') return;
  // A JSON text of this many numbers nears V8's string limit and is slow for both sides.
  throw errors.notAcceptable('application/json', `the binary formats for a session of ${numel} elements (?format=${kind === 'checkpoint' ? 'pt' : 'safetensors'}); JSON answers hold at most ${MAX_JSON_ELEMENTS} numbers`);
}

/** The format of a download (406 NOT_ACCEPTABLE when none offered fits Accept or ?format=), said before any wait or read. */
export const viewFormat = (kind: ViewKind, request: FastifyRequest, query: ViewQuery): WireFormat => negotiate(request, query.format, KINDS[kind].offers);

export function sendView(kind: ViewKind, request: FastifyRequest, reply: FastifyReply, view: StateView, query: ViewQuery) {
  refuseLargeJson(kind, request, query, view.layout.numel);
  const format = negotiate(request, query.format, KINDS[kind].offers);
  if (query.format === undefined) reply.header('vary', 'Accept'); // a cache keeps one answer per Accept (snapshots' downloads too)
  setVersion(reply, view.version);
  reply.header('x-session-step', String(view.step));
  const averaged = query.averaged ?? false;
  if (format === 'json') {
    // Serialized here, not by the response schema: fast-json-stringify is slower than JSON.stringify on
    // millions of numbers, and the schema is there to document the answer.
    const body = kind === 'params' ? { session: view.session, version: view.version, step: view.step, averaged, params: paramsJson(view, averaged) }
      : kind === 'state_dict' ? stateDictJson(view)
      : { model: paramsJson(view, false), optimizer: stateDictJson(view), step: view.step };
    return reply.type('application/json; charset=utf-8').send(JSON.stringify(body));
  }
  if (kind === 'params') return sendParams(reply, format, view, averaged);
  if (kind === 'state_dict') return sendStateDict(reply, format, view);
  return sendCheckpoint(reply, view);
}
