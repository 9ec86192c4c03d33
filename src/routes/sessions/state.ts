// Reading and replacing a session's state: parameters, the optimizer's state_dict, whole checkpoints.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { parseStateDict } from '../../sessions/state-dict.ts';
import { ifMatchOf, jsonBody, jsonOrFile, sessionJson, setVersion } from '../common.ts';
import { contentFormat, mediaTypes, ROUTE_MEDIA } from '../media.ts';
import { errorResponses, IfMatchHeaders, NameParams, Session, Version, withCode } from '../schemas.ts';
import { readCheckpointFile, readCheckpointJson, readStateDictBody } from './binary.ts';
import { sendView, viewResponse } from './views.ts';

const Format = (offers: readonly string[]) =>
  Type.Optional(Type.Union(offers.map((f) => Type.Literal(f)), { description: 'Instead of an Accept header' }));

/** A state_dict to load, as JSON: its structure here, its tensors and hyperparameters by the domain. */
const StateDictIn = withCode(Type.Object({
  state: Type.Record(Type.String(), Type.Unknown(), { description: 'Per-parameter state by index: {step, eta, mu, ax}' }),
  param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'The param groups, as state_dict() writes them' }),
}, { additionalProperties: false }), 'INVALID_STATE_DICT');

const CheckpointIn = Type.Object({
  model: Type.Record(Type.String(), Type.Unknown(), { description: 'The model state_dict: tensors by name' }),
  optimizer: StateDictIn,
  step: Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER }),
}, { additionalProperties: false });

const stateRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify, opts) => {
  fastify.get('/:name/params', {
    schema: {
      operationId: 'getParams',
      summary: 'Read the parameters (or ASGD\'s averaged parameters)',
      description: 'JSON {name: tensor}, safetensors, or a torch.save file of the model state_dict (model.load_state_dict(torch.load(f)) works). ?averaged=true gives ax, which ASGD users evaluate with.',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: Type.Optional(Version), format: Format(ROUTE_MEDIA.params.offers), averaged: Type.Optional(Type.Boolean()) }),
      response: { ...viewResponse('params'), ...errorResponses(400, 401, 403, 404, 406) },
    },
  }, async (request, reply) => {
    const view = await fastify.sessions.view(request.params.name, request.query.version === undefined ? null : Number(request.query.version));
    return sendView('params', request, reply, view, request.query);
  });

  fastify.get('/:name/state_dict', {
    schema: {
      operationId: 'getStateDict',
      summary: 'Read the optimizer state_dict',
      description: 'Exactly the structure of torch.optim.ASGD.state_dict(): JSON, a torch.save file that torch.load and ASGD.load_state_dict accept, or safetensors (state tensors as state.<i>.<key>, param_groups in the metadata).',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: Type.Optional(Version), format: Format(ROUTE_MEDIA.stateDict.offers) }),
      response: { ...viewResponse('state_dict'), ...errorResponses(400, 401, 403, 404, 406) },
    },
  }, async (request, reply) => {
    const view = await fastify.sessions.view(request.params.name, request.query.version === undefined ? null : Number(request.query.version));
    return sendView('state_dict', request, reply, view, request.query);
  });

  fastify.put('/:name/state_dict', {
    bodyLimit: opts.config.bodyLimitCreate,
    schema: {
      operationId: 'loadStateDict',
      summary: 'Restore the optimizer state_dict',
      description: 'Optimizer.load_state_dict semantics: hyperparameters come from the loaded groups; group count and sizes must match. Parameters are not changed. JSON, a torch.save file or safetensors. Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: IfMatchHeaders,
      consumes: mediaTypes(ROUTE_MEDIA.stateDict.accepts),
      body: jsonBody(StateDictIn),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 412, 413, 415) },
    },
  }, async (request, reply) => {
    const body = jsonOrFile(request.body, StateDictIn);
    const stateDict = Buffer.isBuffer(body) ? readStateDictBody(contentFormat(request), body) : parseStateDict(body);
    const session = await fastify.sessions.load(request.params.name, { stateDict }, { ifMatch: ifMatchOf(request), reason: 'load_state_dict' });
    setVersion(reply, session.version);
    return sessionJson(session);
  });

  fastify.get('/:name/checkpoint', {
    schema: {
      operationId: 'getCheckpoint',
      summary: 'Download a checkpoint',
      description: 'A torch.save file of {"model": model state_dict, "optimizer": optimizer state_dict, "step": n} (or the same as JSON).',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: Type.Optional(Version), format: Format(ROUTE_MEDIA.checkpoint.offers) }),
      response: { ...viewResponse('checkpoint'), ...errorResponses(400, 401, 403, 404, 406) },
    },
  }, async (request, reply) => {
    const view = await fastify.sessions.view(request.params.name, request.query.version === undefined ? null : Number(request.query.version));
    return sendView('checkpoint', request, reply, view, request.query);
  });

  fastify.put('/:name/checkpoint', {
    bodyLimit: opts.config.bodyLimitCreate,
    schema: {
      operationId: 'loadCheckpoint',
      summary: 'Upload a checkpoint',
      description: 'Replaces parameters and optimizer state from {"model", "optimizer", "step"} (a torch.save file, or JSON). Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: IfMatchHeaders,
      consumes: mediaTypes(ROUTE_MEDIA.checkpoint.accepts),
      body: jsonBody(CheckpointIn),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 412, 413, 415) },
    },
  }, async (request, reply) => {
    const body = jsonOrFile(request.body, CheckpointIn);
    const checkpoint = Buffer.isBuffer(body) ? readCheckpointFile(body) : readCheckpointJson(body);
    const session = await fastify.sessions.load(request.params.name, checkpoint, { ifMatch: ifMatchOf(request), reason: 'load_checkpoint' });
    setVersion(reply, session.version);
    return sessionJson(session);
  });
};

export default stateRoutes;
