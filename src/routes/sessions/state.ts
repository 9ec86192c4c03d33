// Reading and replacing a session's state: parameters, the optimizer's state_dict, whole checkpoints.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { errors } from '../../errors.ts';
import { parseStateDict, paramsJson, stateDictJson } from '../../sessions/state-dict.ts';
import type { StateView } from '../../sessions/service.ts';
import { booleanQuery, ifMatchOf, optionalWhole, sessionJson, setVersion } from '../common.ts';
import { errorResponses, NameParams, NotModified, Session } from '../schemas.ts';
import { negotiate, sendParams, sendStateDict, sendCheckpoint, readStateDictBody, readCheckpointBody, BINARY_TYPES } from './binary.ts';
import { answeredNotModified, MAX_WAIT_SECONDS, waitPastVersion } from './conditional.ts';

/** Largest tensor payload answered as JSON (numbers); bigger sessions use safetensors or torch.save. */
export const MAX_JSON_ELEMENTS = 16 * 1024 * 1024;

const ReadQuery = Type.Object({
  version: Type.Optional(Type.String({ pattern: '^[0-9]{1,15}$', description: 'Read the state at this version (rebuilt from a snapshot and the step log)' })),
  format: Type.Optional(Type.Union([Type.Literal('json'), Type.Literal('pt'), Type.Literal('safetensors')], { description: 'Instead of an Accept header' })),
});

export const readFormats = {
  200: {
    description: 'The state, as JSON, a torch.save file (application/octet-stream) or safetensors (application/x-safetensors)',
    content: {
      'application/json': { schema: Type.Object({}, { additionalProperties: true }) },
      'application/octet-stream': { schema: Type.String({ format: 'binary' }) },
      'application/x-safetensors': { schema: Type.String({ format: 'binary' }) },
    },
  },
};

/** A checkpoint is a torch.save file or JSON (safetensors cannot hold its nested structure). */
export const checkpointFormats = {
  200: {
    description: 'The checkpoint, as a torch.save file (application/octet-stream) or JSON',
    content: {
      'application/octet-stream': readFormats[200].content['application/octet-stream'],
      'application/json': readFormats[200].content['application/json'],
    },
  },
};

export async function viewFor(fastify: FastifyInstance, request: FastifyRequest): Promise<StateView> {
  const { name } = request.params as { name: string };
  const version = optionalWhole((request.query as { version?: string }).version, 'version', 1);
  return fastify.sessions.view(name, version);
}

/** A GET of the state: 304 for If-None-Match at that version; for params, `after_version` + `wait` first. */
async function answerRead(fastify: FastifyInstance, kind: 'params' | 'state_dict' | 'checkpoint', request: FastifyRequest, reply: FastifyReply) {
  const { name } = request.params as { name: string };
  const query = request.query as { version?: string; after_version?: number; wait?: number };
  const version = optionalWhole(query.version, 'version', 1);
  if (query.after_version !== undefined) {
    if (version !== null) throw errors.invalidQuery('after_version', 'cannot be combined with version');
    if (!(await waitPastVersion(fastify, request, reply, name, query.after_version, query.wait ?? 0))) return reply;
  } else if (query.wait !== undefined) {
    throw errors.invalidQuery('wait', 'needs after_version (the version you have)');
  }
  if (await answeredNotModified(fastify, request, reply, name, version)) return reply;
  return sendView(kind, request, reply, await fastify.sessions.view(name, version));
}

export function sendView(kind: 'params' | 'state_dict' | 'checkpoint', request: FastifyRequest, reply: FastifyReply, view: StateView) {
  const query = request.query as { format?: string; averaged?: string };
  const format = negotiate(request, query.format, kind === 'checkpoint' ? ['pt', 'json'] : ['json', 'pt', 'safetensors']);
  if (format === 'json' && view.layout.numel * (kind === 'params' ? 1 : 2) > MAX_JSON_ELEMENTS) {
    // A JSON text of this many numbers nears V8's string limit and is slow for both sides.
    throw errors.notAcceptable('application/json', `the binary formats for a session of ${view.layout.numel} elements (?format=${kind === 'checkpoint' ? 'pt' : 'safetensors'}); JSON answers hold at most ${MAX_JSON_ELEMENTS} numbers`);
  }
  setVersion(reply, view.version);
  reply.header('x-session-step', String(view.step));
  if (kind === 'params') {
    const averaged = booleanQuery(query.averaged, 'averaged');
    if (format === 'json') return reply.send({ session: view.session, version: view.version, step: view.step, averaged, params: paramsJson(view, averaged) });
    return sendParams(reply, format, view, averaged);
  }
  if (kind === 'state_dict') {
    if (format === 'json') return reply.send(stateDictJson(view));
    return sendStateDict(reply, format, view);
  }
  if (format === 'json') {
    return reply.send({ model: paramsJson(view, false), optimizer: stateDictJson(view), step: view.step });
  }
  return sendCheckpoint(reply, view);
}

export default async function stateRoutes(fastify: FastifyInstance, opts: { config: Config }) {
  fastify.get('/:name/params', {
    schema: {
      summary: 'Read the parameters (or ASGD\'s averaged parameters)',
      description: 'JSON {name: tensor}, safetensors, or a torch.save file of the model state_dict (model.load_state_dict(torch.load(f)) works). ?averaged=true gives ax, which ASGD users evaluate with.',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({
        ...ReadQuery.properties,
        averaged: Type.Optional(Type.Boolean()),
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'Answer only with a version above this one: at once, or when one commits within `wait` seconds; else 304' })),
        wait: Type.Optional(Type.Number({ minimum: 0, maximum: MAX_WAIT_SECONDS, description: `With after_version: how long to wait for a newer version (at most ${MAX_WAIT_SECONDS} s)` })),
      }),
      headers: Type.Object({ 'if-none-match': Type.Optional(Type.String({ description: '"<version>": 304 while the parameters are at that version' })) }),
      response: { ...readFormats, 304: NotModified, ...errorResponses(400, 401, 403, 404, 406, 503) },
    },
  }, async (request, reply) => answerRead(fastify, 'params', request, reply));

  fastify.get('/:name/state_dict', {
    schema: {
      summary: 'Read the optimizer state_dict',
      description: 'Exactly the structure of torch.optim.ASGD.state_dict(): JSON, a torch.save file that torch.load and ASGD.load_state_dict accept, or safetensors (state tensors as state.<i>.<key>, param_groups in the metadata).',
      tags: ['state'],
      params: NameParams,
      querystring: ReadQuery,
      headers: Type.Object({ 'if-none-match': Type.Optional(Type.String({ description: '"<version>": 304 while the state is at that version' })) }),
      response: { ...readFormats, 304: NotModified, ...errorResponses(400, 401, 403, 404, 406) },
    },
  }, async (request, reply) => answerRead(fastify, 'state_dict', request, reply));

  fastify.put('/:name/state_dict', {
    bodyLimit: opts.config.bodyLimitCreate,
    schema: {
      summary: 'Restore the optimizer state_dict',
      description: 'Optimizer.load_state_dict semantics: hyperparameters come from the loaded groups; group count and sizes must match. Parameters are not changed. JSON, a torch.save file or safetensors. Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: Type.Object({ 'if-match': Type.Optional(Type.String()) }),
      consumes: ['application/json', ...BINARY_TYPES.pt, ...BINARY_TYPES.safetensors],
      body: Type.Object({ state: Type.Record(Type.String(), Type.Unknown()), param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown())) }),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 412, 413, 415) },
    },
    validatorCompiler: () => () => true,
  }, async (request, reply) => {
    const { name } = request.params as { name: string };
    const stateDict = Buffer.isBuffer(request.body) ? readStateDictBody(request, request.body) : parseStateDict(request.body);
    const session = await fastify.sessions.load(name, { stateDict }, { ifMatch: ifMatchOf(request), reason: 'load_state_dict' });
    setVersion(reply, session.version);
    return sessionJson(session);
  });

  fastify.get('/:name/checkpoint', {
    schema: {
      summary: 'Download a checkpoint',
      description: 'A torch.save file of {"model": model state_dict, "optimizer": optimizer state_dict, "step": n} (or the same as JSON).',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: ReadQuery.properties.version, format: Type.Optional(Type.Union([Type.Literal('json'), Type.Literal('pt')])) }),
      headers: Type.Object({ 'if-none-match': Type.Optional(Type.String({ description: '"<version>": 304 while the state is at that version' })) }),
      response: { ...checkpointFormats, 304: NotModified, ...errorResponses(400, 401, 403, 404, 406) },
    },
  }, async (request, reply) => answerRead(fastify, 'checkpoint', request, reply));

  fastify.put('/:name/checkpoint', {
    bodyLimit: opts.config.bodyLimitCreate,
    schema: {
      summary: 'Upload a checkpoint',
      description: 'Replaces parameters and optimizer state from {"model", "optimizer", "step"} (a torch.save file, or JSON). Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: Type.Object({ 'if-match': Type.Optional(Type.String()) }),
      consumes: ['application/json', ...BINARY_TYPES.pt],
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 412, 413, 415) },
    },
  }, async (request, reply) => {
    const { name } = request.params as { name: string };
    const checkpoint = readCheckpointBody(request, request.body);
    const session = await fastify.sessions.load(name, checkpoint, { ifMatch: ifMatchOf(request), reason: 'load_checkpoint' });
    setVersion(reply, session.version);
    return sessionJson(session);
  });

  void BINARY_TYPES;
}
