// Reading and replacing a session's state: parameters, the optimizer's state_dict, whole checkpoints.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Type, type Static } from 'typebox';
import type { Config } from '../../config.ts';
import { errors } from '../../errors.ts';
import type { ParamSpec } from '../../db/schema.ts';
import type { LoadedParams } from '../../sessions/model.ts';
import { MAX_LOADED_STEP, numelOf } from '../../sessions/spec.ts';
import { PARAMS_ONLY } from '../../sessions/load-plan.ts';
import { parseStateDict } from '../../sessions/state-dict.ts';
import { firstNonFinite, readJsonTensor } from '../../sessions/tensors.ts';
import { ACCESS, changeAnswer, changeKeyOf, ifMatchOf, ifMatchVersions, jsonBody, jsonOrFile } from '../common.ts';
import { contentFormat, mediaTypes, ROUTE_MEDIA, type WireFormat } from '../media.ts';
import { ChangeHeaders, errorResponses, GroupChanges, ConditionalReadHeaders, NameParams, NotModified, Version, withCode, SessionChange } from '../schemas.ts';
import { checkpointJsonParts, perTensorLimits, readCheckpointFile, readCheckpointJson, readNamedTensors, readStateDictBody, tiedAgainOf } from './binary.ts';
import { jsonBoundBySession, sessionBeforeBody } from './json-bound.ts';
import { answeredNotModified, checkIfMatchRead, MAX_WAIT_SECONDS, waitPastVersion } from './conditional.ts';
import { refuseLargeJson, sendView, viewFormat, viewResponse, type ViewKind, type ViewQuery } from './views.ts';

interface ReadQuery extends ViewQuery {
  version?: string;
  after_version?: number;
  wait?: number;
}

/** A GET of the state: 304 for If-None-Match at that version; for params, `after_version` + `wait` first. */
async function answerRead(fastify: FastifyInstance, kind: ViewKind, request: FastifyRequest, reply: FastifyReply, name: string, query: ReadQuery) {
  // The format comes from Accept unless ?format= names it: a cache keeps one answer per Accept (every format
  // of a version has the same ETag), on the 304s too.
  if (query.format === undefined) reply.header('vary', 'Accept');
  const version = query.version === undefined ? null : Number(query.version);
  if (query.after_version !== undefined) {
    if (version !== null) throw errors.invalidQuery('after_version', 'cannot be combined with version');
    // What the wait's end would refuse is refused before it (a review: a malformed If-Match or an Accept of
    // nothing offered waited out the wait, then answered 304, for ever).
    viewFormat(kind, request, query);
    ifMatchVersions(request);
    if (!(await waitPastVersion(fastify, request, reply, name, query.after_version, query.wait ?? 0))) return reply;
  } else if (query.wait !== undefined) {
    throw errors.invalidQuery('wait', 'needs after_version (the version you have)');
  }
  if (await answeredNotModified(fastify, request, reply, name, version)) return reply;
  // Before the state is built (an old version is replayed: seconds for a big session): a JSON answer too
  // large to give is refused first. The size from this process's copy, or for an old version from the row.
  const numel = fastify.sessions.cachedSize(name)?.numel ?? (version !== null ? (await fastify.sessions.get(name)).numel : null);
  if (numel !== null) refuseLargeJson(kind, request, query, numel);
  const view = await fastify.sessions.view(name, version);
  await checkIfMatchRead(fastify, request, name, view.version);
  return sendView(kind, request, reply, view, query);
}

const Format = (offers: readonly string[]) =>
  Type.Optional(Type.Union(offers.map((f) => Type.Literal(f)), { description: 'Instead of an Accept header' }));

/** A state_dict to load, as JSON: its structure here, its tensors and hyperparameters by the domain. */
const StateDictIn = withCode(Type.Object({
  state: Type.Record(Type.String(), Type.Unknown(), { description: 'Per-parameter state by index: {step, eta, mu, ax}' }),
  param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'The param groups, as state_dict() writes them' }),
}, { additionalProperties: false }), 'INVALID_STATE_DICT');

/**
 * A checkpoint to load, as JSON: what a torch.save file may hold, {"model", "optimizer", "step"} or the layout
 * of PyTorch's tutorial on saving a general checkpoint ({"model_state_dict", "optimizer_state_dict", "epoch",
 * "loss", …}); other keys are ignored, as in the file. Which of the two names is there: readCheckpointJson.
 */
const ModelIn = Type.Record(Type.String(), Type.Unknown(), { description: 'The model state_dict: tensors by name' });
// A malformed checkpoint is INVALID_STATE_DICT as JSON as it is as a file (README), its parts' faults too.
const CheckpointIn = withCode(Type.Object({
  model: Type.Optional(ModelIn),
  optimizer: Type.Optional(StateDictIn),
  model_state_dict: Type.Optional({ ...ModelIn, description: 'Instead of "model" (the layout of PyTorch\'s tutorial on saving a general checkpoint)' }),
  optimizer_state_dict: Type.Optional({ ...StateDictIn, description: 'Instead of "optimizer" (the tutorial\'s layout)' }),
  step: Type.Optional(Type.Integer({ minimum: 0, maximum: MAX_LOADED_STEP, description: 'The steps the session has taken (at most 2^50: the steps after it are counted exactly); absent: the most any parameter\'s state took, as a state_dict load counts it' })),
}, { additionalProperties: true, description: 'Keys other than these (the tutorial\'s "epoch", "loss") are ignored, as in a torch.save file' }), 'INVALID_STATE_DICT');

/** The parameters to load, as JSON: each a tensor {"shape", "data"} or a flat list (the session knows the shape). */
const ParamsIn = Type.Object({
  params: Type.Record(Type.String(), Type.Unknown(), { description: 'Every parameter of the session by name: a tensor {"shape", "data"} or a flat list of numbers' }),
  // What GET params answers along with the tensors, so that its body can be sent back as it is (the
  // parameters of an earlier version, another session's, or the averaged ones to evaluate with).
  session: Type.Optional(Type.String({ description: 'As GET params answers it (the session read): ignored' })),
  version: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'As GET params answers it (the version read): ignored; If-Match is the condition on the version' })),
  step: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'As GET params answers it: ignored (the session\'s step stays)' })),
  averaged: Type.Optional(Type.Boolean({ description: 'As GET params answers it (true for ASGD\'s averages ax): ignored; the tensors sent become the parameters' })),
}, { additionalProperties: false, examples: [{ params: { w: { shape: [2, 2], data: [0.5, -0.25, 0.125, 0] } } }] });

/**
 * The parameters of a PUT params body, float32 and finite. Finite as create requires it: a session never
 * holds a NaN it was given (a step refuses non-finite gradients too), so a diverged model is refused here,
 * not trained on. Names and shapes are checked against the session by the domain (sessions/load-plan.ts);
 * a JSON flat list takes the session's shape (fixed at create, so read outside the session's lock).
 */
function readParamsBody(body: Static<typeof ParamsIn> | Buffer, format: WireFormat, sessionParams: readonly ParamSpec[]): LoadedParams {
  const params: LoadedParams = new Map();
  if (Buffer.isBuffer(body)) {
    // Limits of a file of three tensors a parameter: a module's state_dict carries its buffers too (a BatchNorm
    // layer adds three for its two parameters; ResNet-18, 62 parameters and 60 buffers, was refused for its
    // zip's entries: a review).
    const { tensors, aliases } = readNamedTensors(format, body, 'params', perTensorLimits(3 * sessionParams.length), sessionParams.map((p) => p.name));
    const tiedAgain = tiedAgainOf(aliases, sessionParams.map((p) => p.name));
    for (const [name, tensor] of tensors) {
      if (tiedAgain(name)) continue;
      const bad = firstNonFinite(tensor.data);
      if (bad >= 0) throw errors.invalidTensor(`params.${name}.data[${bad}]`, 'is not finite');
      params.set(name, { shape: tensor.shape, data: tensor.data });
    }
    return params;
  }
  const shapes = new Map(sessionParams.map((p) => [p.name, p.shape]));
  for (const [name, value] of Object.entries(body.params)) {
    const shape = shapes.get(name);
    if (!shape) throw errors.unknownParameter(`params.${name}`, name, PARAMS_ONLY);
    const data = new Float32Array(numelOf(shape));
    readJsonTensor(value, `params.${name}`, shape, data, 'reject');
    params.set(name, { shape, data });
  }
  return params;
}

const stateRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify, opts) => {
  fastify.get('/:name/params', {
    config: ACCESS.read,
    schema: {
      operationId: 'getParams',
      summary: 'Read the parameters (or ASGD\'s averaged parameters)',
      description: 'JSON {name: tensor}, safetensors, or a torch.save file of the model state_dict (model.load_state_dict(torch.load(f)) works). ?averaged=true gives ax, which ASGD users evaluate with.',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({
        version: Type.Optional(Version),
        format: Format(ROUTE_MEDIA.params.offers),
        averaged: Type.Optional(Type.Boolean()),
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'Answer only with a version above this one: at once, or when one commits within `wait` seconds; else 304' })),
        wait: Type.Optional(Type.Number({ minimum: 0, maximum: MAX_WAIT_SECONDS, description: `With after_version: how long to wait for a newer version (at most ${MAX_WAIT_SECONDS} s)` })),
      }),
      headers: ConditionalReadHeaders,
      response: { ...viewResponse('params'), 304: NotModified, ...errorResponses(400, 401, 403, 404, 406, 412, 503) },
    },
  }, async (request, reply) => answerRead(fastify, 'params', request, reply, request.params.name, request.query));

  fastify.put('/:name/params', {
    // A worker's step token: a worker that clips or masks its weights after each step has to send them,
    // and such a token already moves the parameters anywhere through steps (and their lr). The optimizer
    // state and hyperparameters, which this route leaves alone, stay behind admin (PUT state_dict).
    config: ACCESS.step,
    bodyLimit: opts.config.bodyLimitCreate,
    // JSON parameters bounded by the session's size before the body is read whole and parsed (json-bound.ts).
    preParsing: jsonBoundBySession(fastify, 'a JSON PUT of the parameters', 'parameters', { what: 'a file of the parameters', hint: '; a model.state_dict() whose buffers outweigh its parameters: send dict(model.named_parameters())' }),
    schema: {
      operationId: 'loadParams',
      summary: 'Replace the parameters (the optimizer state stays)',
      description: 'What editing a model\'s weights in place does to torch.optim.ASGD: the parameters become the ones sent and the next step applies to them; ' +
        'the optimizer state (step, eta, mu, ax), the hyperparameters and the session\'s step are unchanged. Every parameter, with its shape, finite. ' +
        'JSON {"params": {name: tensor or flat list}} (the body GET params answers is taken as it is), safetensors, or a torch.save file of a model state_dict (torch.save(model.state_dict(), f): buffers are left out when every parameter is there). ' +
        'Bumps the version (written as a snapshot), unless the parameters equal the session\'s bit for bit.',
      tags: ['state'],
      params: NameParams,
      headers: ChangeHeaders,
      consumes: mediaTypes(ROUTE_MEDIA.params.accepts),
      body: jsonBody(ParamsIn),
      response: { 200: SessionChange, ...errorResponses(400, 401, 403, 404, 412, 413, 415, 422) },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const body = jsonOrFile(request.body, ParamsIn);
    const params = readParamsBody(body, contentFormat(request), (await fastify.sessions.get(name)).params);
    const result = await fastify.sessions.load(name, { params, paramsField: 'params' }, { ifMatch: ifMatchOf(request), reason: 'load_params', key: changeKeyOf(request) });
    // A new version has no open round; parameters that changed nothing leave the open round as it was.
    return changeAnswer(reply, result, fastify.rounds.openRound);
  });

  fastify.get('/:name/state_dict', {
    config: ACCESS.read,
    schema: {
      operationId: 'getStateDict',
      summary: 'Read the optimizer state_dict',
      description: 'Exactly the structure of torch.optim.ASGD.state_dict(): JSON, a torch.save file that torch.load and ASGD.load_state_dict accept, or safetensors (state tensors as state.<i>.<key>, param_groups in the metadata).',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: Type.Optional(Version), format: Format(ROUTE_MEDIA.stateDict.offers) }),
      headers: ConditionalReadHeaders,
      response: { ...viewResponse('state_dict'), 304: NotModified, ...errorResponses(400, 401, 403, 404, 406, 412) },
    },
  }, async (request, reply) => answerRead(fastify, 'state_dict', request, reply, request.params.name, request.query));

  fastify.put('/:name/state_dict', {
    config: ACCESS.admin,
    bodyLimit: opts.config.bodyLimitCreate,
    preParsing: sessionBeforeBody(fastify),
    schema: {
      operationId: 'loadStateDict',
      summary: 'Restore the optimizer state_dict',
      description: 'Optimizer.load_state_dict semantics: hyperparameters come from the loaded groups; group count and sizes must match. Parameters are not changed. The session\'s step becomes the loaded state\'s (the most steps any parameter took; 0 for an optimizer that has not stepped). JSON, a torch.save file or safetensors. Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: ChangeHeaders,
      consumes: mediaTypes(ROUTE_MEDIA.stateDict.accepts),
      body: jsonBody(StateDictIn),
      response: { 200: SessionChange, ...errorResponses(400, 401, 403, 404, 412, 413, 415, 422) },
    },
  }, async (request, reply) => {
    // A state_dict that is not there is a malformed state_dict (the code of its other structural errors).
    const body = jsonOrFile(request.body, StateDictIn, (message) => errors.invalidStateDict('body', message));
    const stateDict = Buffer.isBuffer(body) ? readStateDictBody(contentFormat(request), body, (await fastify.sessions.get(request.params.name)).params.length) : parseStateDict(body);
    const result = await fastify.sessions.load(request.params.name, { stateDict }, { ifMatch: ifMatchOf(request), reason: 'load_state_dict', key: changeKeyOf(request) });
    return changeAnswer(reply, result); // a new version: no round is open
  });

  fastify.patch('/:name/param_groups', {
    config: ACCESS.step,
    schema: {
      operationId: 'setHyperparameters',
      summary: 'Set hyperparameters of the groups without a step',
      description: 'What a scheduler (or a hand edit of param_groups) set after the last step, made the session\'s before a checkpoint or snapshot is taken: ' +
        'one object per group, in the session\'s group order, with only the keys that change (as a step\'s `param_groups`). A new version, written as a snapshot ' +
        '(reason `hyperparameters`); the optimizer state and the parameters stay as they are. Values equal to the session\'s: no new version.',
      tags: ['training'],
      params: NameParams,
      headers: ChangeHeaders,
      body: Type.Object({
        param_groups: GroupChanges('One object per session group, in the session\'s group order', { minItems: 1 }),
      }, { additionalProperties: false, examples: [{ param_groups: [{ lr: 0.005 }] }] }),
      response: { 200: SessionChange, ...errorResponses(400, 401, 403, 404, 409, 412, 422) },
    },
  }, async (request, reply) => {
    const result = await fastify.sessions.setHyperparameters(request.params.name, request.body.param_groups, ifMatchOf(request), changeKeyOf(request));
    return changeAnswer(reply, result, fastify.rounds.openRound); // values that changed nothing: a round may be open
  });

  fastify.get('/:name/checkpoint', {
    config: ACCESS.read,
    schema: {
      operationId: 'getCheckpoint',
      summary: 'Download a checkpoint',
      description: 'A torch.save file of {"model": model state_dict, "optimizer": optimizer state_dict, "step": n} (or the same as JSON).',
      tags: ['state'],
      params: NameParams,
      querystring: Type.Object({ version: Type.Optional(Version), format: Format(ROUTE_MEDIA.checkpoint.offers) }),
      headers: ConditionalReadHeaders,
      response: { ...viewResponse('checkpoint'), 304: NotModified, ...errorResponses(400, 401, 403, 404, 406, 412) },
    },
  }, async (request, reply) => answerRead(fastify, 'checkpoint', request, reply, request.params.name, request.query));

  fastify.put('/:name/checkpoint', {
    config: ACCESS.admin,
    bodyLimit: opts.config.bodyLimitCreate,
    preParsing: sessionBeforeBody(fastify),
    schema: {
      operationId: 'loadCheckpoint',
      summary: 'Upload a checkpoint',
      description: 'Replaces parameters and optimizer state from {"model", "optimizer", "step"} (a torch.save file, or JSON). Bumps the version.',
      tags: ['state'],
      params: NameParams,
      headers: ChangeHeaders,
      consumes: mediaTypes(ROUTE_MEDIA.checkpoint.accepts),
      body: jsonBody(CheckpointIn),
      response: { 200: SessionChange, ...errorResponses(400, 401, 403, 404, 412, 413, 415, 422) },
    },
  }, async (request, reply) => {
    const body = jsonOrFile(request.body, CheckpointIn, (message) => errors.invalidStateDict('body', message));
    // The session's parameter names tell a model's buffers (left out) from its parameters; a JSON body's
    // layout is checked first (a bad body is a 400 whatever the session).
    const sessionParams = async () => (await fastify.sessions.get(request.params.name)).params.map((p) => p.name);
    let checkpoint;
    if (Buffer.isBuffer(body)) checkpoint = readCheckpointFile(body, await sessionParams());
    else {
      const parts = checkpointJsonParts(body);
      checkpoint = readCheckpointJson(parts, await sessionParams());
    }
    const result = await fastify.sessions.load(request.params.name, checkpoint, { ifMatch: ifMatchOf(request), reason: 'load_checkpoint', key: changeKeyOf(request) });
    return changeAnswer(reply, result); // a new version: no round is open
  });
};

export default stateRoutes;
