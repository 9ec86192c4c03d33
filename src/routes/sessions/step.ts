// POST /v1/sessions/:name/step: one optimizer step, acknowledged after it committed. The step may carry
// the groups' hyperparameters for it (a scheduler's values) and training metrics, and may answer with the
// new parameters, so that a training loop needs one request per step.
import { createHash, type Hash } from 'node:crypto';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { errors } from '../../errors.ts';
import { streamToBuffer, writeSafetensors, type Float32Tensor } from '../../formats/index.ts';
import { requestLogLevel } from '../../request-log.ts';
import type { GradientInput } from '../../sessions/gradients.ts';
import type { GroupSpec } from '../../db/schema.ts';
import type { BaseVersionFrom, StateView, StepAnswer as StepAnswerValue } from '../../sessions/model.ts';
import { MAX_SAMPLES } from '../../sessions/aggregation.ts';
import { DEFAULT_WAIT_SECONDS } from '../../sessions/rounds.ts';
import { NAME_PATTERN, SESSION_NAME_RULE, SESSION_NAME_SOURCE } from '../../sessions/spec.ts';
import { canonicalJson, holdsNegativeZero, type Layout } from '../../sessions/state.ts';
import { paramTensor, paramsJson } from '../../sessions/state-dict.ts';
import { metadataJson, parseMetrics } from '../../sessions/step-input.ts';
import { ACCESS, checkTokenStillActive, idempotencyKeyOf, ifMatchOf, jsonBody, jsonOrFile, setVersion } from '../common.ts';
import { contentFormat, MEDIA, mediaTypes, negotiate, ROUTE_MEDIA, type WireFormat } from '../media.ts';
import { Binary, errorResponses, GroupChanges, NameParams, RoundStatus, StepAnswer, StepHeaders, Tensor, withCode } from '../schemas.ts';
import { readGradients } from './binary.ts';
import { jsonBoundBySession } from './json-bound.ts';
import { MAX_JSON_ELEMENTS } from './views.ts';

/** A safetensors step header longer than this is bounded by the session's parameters even when they must be read from the database. */
const HEADER_LOOKUP_BYTES = 64 * 1024;


const Worker = Type.String({ pattern: `^${SESSION_NAME_SOURCE}$`, 'x-rule': SESSION_NAME_RULE, description: 'The sending worker, like a session name. In a session with aggregation the contributor (required there); otherwise it tells which steps come from one worker: group commit never holds a step back for the next one of the same worker (a pipelined loop sends it before it reads the answer)', examples: ['w0'] });
const Samples = Type.Integer({ minimum: 1, maximum: MAX_SAMPLES, description: 'In a session with aggregation: samples behind this gradient (counts toward target_samples)' });
export const MAX_WAIT_SECONDS = 3600;

/** The JSON form of a step. Gradients are read element by element by the domain. */
const StepBody = Type.Object({
  grads: Type.Record(Type.String(), Type.Unknown(), { description: 'Parameter name -> tensor {"shape", "data"} or a flat list of numbers' }),
  base_version: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'The version the gradient was computed from (versions start at 1)' })),
  param_groups: Type.Optional(GroupChanges(
    'One object per session group, in the session\'s group order: what a scheduler sets before optimizer.step(). Kept with the step (replays stay exact); no extra version.',
  )),
  // INVALID_METRICS, as the same fault in a safetensors body's __metadata__ and a bad metric name.
  metrics: Type.Optional(withCode(Type.Record(Type.String(), Type.Number(), {
    maxProperties: 32,
    description: 'Training metrics of this step, e.g. {"loss": 0.41, "samples": 32}: at most 32 finite numbers, each name 1-128 characters without control characters ("val/loss" is one). GET .../metrics returns the series.',
  }), 'INVALID_METRICS')),
  worker: Type.Optional(Worker),
  samples: Type.Optional(Samples),
}, { additionalProperties: false, examples: [{ grads: { w: { shape: [2, 2], data: [0.01, -0.02, 0.03, 0.0] } }, param_groups: [{ lr: 0.05 }], metrics: { loss: 0.41 } }] });

const StepQuery = Type.Object({
  base_version: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'The version the gradient was computed from (versions start at 1)' })),
  return: Type.Optional(Type.Union([Type.Literal('none'), Type.Literal('params'), Type.Literal('averaged')], {
    description: 'Answer with the parameters (or ASGD\'s averaged parameters) at the answered version too: one round trip per training step',
  })),
  worker: Type.Optional(Worker),
  samples: Type.Optional(Samples),
  wait: Type.Optional(Type.Number({
    minimum: 0, maximum: MAX_WAIT_SECONDS,
    description: `In a session with aggregation: seconds to wait for the round to step (default ${DEFAULT_WAIT_SECONDS}; fractions of a second too, 0: answer at once); then 202 and the client re-POSTs with the same Idempotency-Key`,
  })),
});

const RoundPending = Type.Object({
  pending: Type.Literal(true),
  round: RoundStatus,
}, { title: 'RoundPending', description: 'The contribution is stored; its round has not stepped within `wait`. Re-POST the same request with the same Idempotency-Key to wait on.' });

/** A worker id from the safetensors metadata: the string itself, or (like the other keys) JSON of it. */
function metadataWorker(metadata: ReadonlyMap<string, string>): string | null {
  const raw = metadata.get('worker');
  if (raw === undefined) return null;
  const value = raw.startsWith('"') ? metadataJson(metadata, 'worker') : raw;
  if (typeof value !== 'string' || !NAME_PATTERN.test(value)) throw errors.invalidBody(`__metadata__.worker: must be ${SESSION_NAME_RULE}`);
  return value;
}

/** A field a step may carry in its query and in its body (or __metadata__): given in both, the two agree. */
function agreed<T extends string | number>(field: string, fromQuery: T | null, fromBody: T | null | undefined): T | null {
  if (fromBody === undefined || fromBody === null) return fromQuery;
  if (fromQuery !== null && fromQuery !== fromBody) {
    throw errors.invalidBody(`${field}: ${JSON.stringify(fromQuery)} in the query and ${JSON.stringify(fromBody)} in the body; give it once, or the same in both`);
  }
  return fromBody;
}

/** `__metadata__.base_version`: a version (JSON number, or a string of digits as torch's metadata holds only strings). */
function metadataBaseVersion(metadata: ReadonlyMap<string, string>): number | null {
  const value = metadataJson(metadata, 'base_version');
  if (value === undefined || value === null || value === '') return null;
  const n = typeof value === 'string' && /^\d{1,16}$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 1) throw errors.invalidBody('__metadata__.base_version: must be a whole number >= 1 (a version)');
  return n;
}

function metadataSamples(metadata: ReadonlyMap<string, string>): number | null {
  const value = metadataJson(metadata, 'samples');
  if (value === undefined) return null;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1 || value > MAX_SAMPLES) throw errors.invalidBody(`__metadata__.samples: must be a whole number from 1 to ${MAX_SAMPLES}`);
  return value;
}

const StepAnswerWithParams = Type.Object({
  ...StepAnswer.properties,
  params: Type.Optional(Type.Record(Type.String(), Tensor, { description: 'With ?return=params|averaged: the parameters at `version` (at `params_version` when that is given)' })),
  param_groups: Type.Optional(Type.Array(Type.Object({
    lr: Type.Number(), lambd: Type.Number(), alpha: Type.Number(), t0: Type.Number(), weight_decay: Type.Number(), maximize: Type.Boolean(),
  }), { description: 'With ?return=params|averaged: each group\'s hyperparameters at the version of `params` (a worker that does not run the schedule learns the lr another worker set)' })),
  params_version: Type.Optional(Type.Integer({
    description: 'Only when the step\'s version is no longer kept when it is answered (a replayed answer, or the log pruned by another replica meanwhile): the session version of `params`, the current one',
  })),
}, { title: 'StepAnswer', description: 'A committed step (with the parameters at its version when asked)' });

type ReturnKind = 'none' | 'params' | 'averaged';

/** The encoded parameters of a step's answer, made from the state while the session is locked. */
type Encoded = { format: 'json'; params: Record<string, unknown>; version: number; groups: GroupHyper[] } | { format: 'safetensors'; body: Buffer };

type GroupHyper = Pick<GroupSpec, 'lr' | 'lambd' | 'alpha' | 't0' | 'weight_decay' | 'maximize'>;

/**
 * The groups' hyperparameters at the answered version: a worker that does not run the schedule (another
 * worker's scheduler sets the lr) learns the session's values with its parameters, so its param_groups and
 * state_dict() say what the session steps with.
 */
const groupHyper = (groups: readonly GroupSpec[]): GroupHyper[] =>
  groups.map((g) => ({ lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weight_decay, maximize: g.maximize }));

function encodeParams(view: StateView, answer: StepAnswerValue, averaged: boolean, format: 'json' | 'safetensors'): Encoded {
  if (format === 'json') return { format, params: paramsJson(view, averaged), version: view.version, groups: groupHyper(view.groups) };
  const tensors = view.params.map((p, i): [string, Float32Tensor] => [p.name, { dtype: 'float32', shape: [...p.shape], data: paramTensor(view, i, averaged) }]);
  // param_names: the session's (the model's) order, as GET .../params?format=safetensors says it: the file's
  // tensors are in safetensors' order (by dtype, then name), and the TypeScript client handed them out in that
  // one (a JavaScript user's review: weights of one shape swapped in setWeights).
  const metadata = {
    format: 'pt', session: view.session, version: String(answer.version), step: String(answer.step), staleness: String(answer.staleness), averaged: String(averaged),
    param_names: JSON.stringify(view.params.map((p) => p.name)),
    param_groups: JSON.stringify(groupHyper(view.groups)),
    ...(view.version !== answer.version && { params_version: String(view.version) }),
    ...(answer.replayed && { replayed: 'true' }),
    ...(answer.round && { round: JSON.stringify(answer.round) }),
  };
  return { format, body: streamToBuffer(writeSafetensors(tensors, metadata)) }; // the one copy
}

const stepRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify, opts) => {
  // A successful step's 'stepped' line goes at the level of the step's request lines.
  const steppedLevel = requestLogLevel(opts.config.logRequests, '/v1/sessions/:name/step', 200);
  /**
   * The step's gradients, a safetensors header bounded by the session's parameter count and refused at its
   * first name that is not a parameter, before the rest is checked: parsing a header costs the event loop
   * time in proportion to its size (a 29 MB one, about 2 s). The names come from this process's copy, or,
   * for a header above HEADER_LOOKUP_BYTES without one, from the database. A refusal made with a copy's names
   * stands only if the session was not created again under this name since (then its own names decide).
   */
  async function readStepGradients(name: string, format: WireFormat, body: Buffer): Promise<ReturnType<typeof readGradients>> {
    const large = format === 'safetensors' && body.length >= 8 && body.readBigUInt64LE(0) > BigInt(HEADER_LOOKUP_BYTES);
    const known = await fastify.sessions.parameterNames(name, large);
    if (!known) return readGradients(format, body);
    try {
      return readGradients(format, body, known.names);
    } catch (err) {
      if (!known.cached) throw err;
      const session = await fastify.sessions.get(name); // gone: SESSION_NOT_FOUND
      if (session.id === known.id) throw err;
      return readGradients(format, body, new Map(session.params.map((p, i) => [p.name, i])));
    }
  }

  fastify.post('/:name/step', {
    // A worker named in the query keeps its steps' arrival order (src/sessions/arrival-order.ts).
    config: { ...ACCESS.step, workerOrder: true },
    bodyLimit: opts.config.bodyLimitStep,
    // A JSON step is bounded by the session's size before the body is read whole and parsed (json-bound.ts).
    preParsing: jsonBoundBySession(fastify, 'a JSON step', 'gradients', { what: 'a file of gradients', hint: '' }),
    schema: {
      operationId: 'step',
      summary: 'Apply one optimizer step',
      description:
        'Applies exactly the step torch.optim.ASGD would apply for these gradients and answers once it is committed. ' +
        'Body: JSON {"grads": {name: tensor or flat list}, "base_version"?, "param_groups"?, "metrics"?} or a safetensors / torch.save file of gradients ' +
        '(F32, or F16/BF16 widened exactly to float32 and logged as received; base_version in the query or, like param_groups and metrics, as JSON in the safetensors __metadata__). ' +
        'A parameter without a gradient is skipped, as in PyTorch. ?return=params|averaged answers with the parameters at the new version ' +
        '(as JSON, or as a safetensors file with Accept: application/x-safetensors whose __metadata__ holds session, version, step, staleness, and param_names (the session\'s order), round and param_groups as JSON), with each group\'s hyperparameters at that version (`param_groups`). ' +
        'A retry (same Idempotency-Key) gets the first answer, replayed. When the answer\'s version is no longer kept (a replayed one; or another replica loaded or restored a state and pruned the log between this step\'s commit and its answer), the parameters are the current ones, their version in params_version. ' +
        'In a session with `aggregation` the request is a contribution to the open round: base_version and worker (body, query or __metadata__) are required, ' +
        'samples optional; it is answered once the round\'s step committed (the answer\'s `round`), or 202 after ?wait= seconds (re-POST with the same Idempotency-Key).',
      tags: ['training'],
      consumes: mediaTypes(ROUTE_MEDIA.step.accepts),
      params: NameParams,
      querystring: StepQuery,
      headers: StepHeaders,
      body: jsonBody(StepBody),
      response: {
        200: {
          description: 'The step is committed',
          content: {
            'application/json': { schema: StepAnswerWithParams },
            // Unsafe<Buffer>: the answer is the file's bytes (the type provider then types reply.send).
            [MEDIA.safetensors[0]]: { schema: Type.Unsafe<Buffer>(Binary) },
          },
        },
        202: { description: 'A contribution stored; its round has not stepped yet', content: { 'application/json': { schema: RoundPending } } },
        ...errorResponses(400, 401, 403, 404, 406, 409, 412, 413, 415, 422, 503),
      },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const body = jsonOrFile(request.body, StepBody);
    let baseVersion = request.query.base_version ?? null;
    let baseVersionFrom: BaseVersionFrom = 'query';
    let worker = request.query.worker ?? null;
    let samples = request.query.samples ?? null;
    const returning: ReturnKind = request.query.return ?? 'none';
    // Without ?return the answer is JSON only: an Accept that excludes it is a 406 before anything is applied,
    // as with ?return (a step with Accept: text/html was applied and answered in JSON; hostile review).
    const answerFormat = negotiate(request, undefined, returning === 'none' ? ['json'] : ['json', 'safetensors']);
    // The request's hash is only kept with an Idempotency-Key; hashing 4 MB of gradients costs ~3.5 ms.
    const idempotencyKey = idempotencyKeyOf(request);
    const hash = idempotencyKey ? createHash('sha256') : null;
    let input: GradientInput;
    let paramGroups: unknown;
    let metrics: Record<string, number> | null;
    let olderHashes: (() => string[]) | undefined;
    if (Buffer.isBuffer(body)) {
      const format = contentFormat(request);
      const read = await readStepGradients(name, format, body); // float32, or F16/BF16 widened exactly and logged as received
      const { metadata } = read;
      input = read.input;
      if (format === 'safetensors') {
        for (const key of metadata.keys()) {
          if (!['param_groups', 'metrics', 'base_version', 'worker', 'samples', 'format'].includes(key)) {
            throw errors.invalidBody(`__metadata__.${key}: unknown key (param_groups, metrics, base_version, worker, samples)`);
          }
        }
        worker = agreed('worker', worker, metadataWorker(metadata));
        samples = agreed('samples', samples, metadataSamples(metadata));
        paramGroups = metadataJson(metadata, 'param_groups', true);
        metrics = parseMetrics(metadataJson(metadata, 'metrics'), '__metadata__.metrics');
        baseVersion = agreed('base_version', baseVersion, metadataBaseVersion(metadata));
      } else {
        metrics = null;
      }
      hash?.update(body);
      if (request.query.base_version === undefined && baseVersion !== null) baseVersionFrom = '__metadata__';
    } else {
      baseVersion = agreed('base_version', baseVersion, body.base_version);
      if (request.query.base_version === undefined && baseVersion !== null) baseVersionFrom = 'body';
      worker = agreed('worker', worker, body.worker);
      samples = agreed('samples', samples, body.samples);
      input = { format: 'json', grads: body.grads };
      paramGroups = body.param_groups;
      metrics = parseMetrics(body.metrics);
      if (hash) {
        // The request, not its spelling: keys in any order, and base_version, worker and samples wherever they
        // came (hashed below as read), so that a retry serialized anew gets the first answer.
        const { base_version: _b, worker: _w, samples: _s, ...rest } = body as Record<string, unknown>;
        let text: string;
        try {
          text = canonicalJson(rest, true);
        } catch {
          // Only nesting deep enough to exhaust the stack fails here; the gradient would be refused anyway.
          throw errors.invalidBody('grads: nested too deeply');
        }
        hash.update(text);
        // The hash of the releases before 12-03 (the body as parsed, in its key order): its recorded answers
        // still answer a retry after an upgrade (an upgrade review: every JSON step's retry was 422
        // IDEMPOTENCY_KEY_REUSED). Not for a body holding -0: that form writes it as 0, so it would match the
        // answer recorded for the same step with 0, another request (a review of this fix); the 12-03 form
        // (sorted keys, -0 as 0) is this one for every other body. Taken once, and only when a recorded hash
        // differs from this one.
        let older: string[] | undefined;
        olderHashes = () => (older ??= holdsNegativeZero(rest) ? [] : [withReadFields(createHash('sha256').update(JSON.stringify(body))).digest('hex')]);
      }
    }
    const withReadFields = (h: Hash): Hash => {
      if (baseVersion !== null) h.update(`base:${baseVersion}`);
      if (worker !== null) h.update(`worker:${worker}`);
      if (samples !== null) h.update(`samples:${samples}`);
      return h;
    };
    if (hash) withReadFields(hash);
    let encoded: Encoded | null = null;
    // A contribution may wait for its round: a client that goes away ends the wait.
    const arrived = Date.now();
    const gone = new AbortController();
    const onClose = () => {
      if (!reply.raw.writableFinished) gone.abort();
    };
    reply.raw.once('close', onClose);
    // The worker's earlier steps join the session's queue first; this one joins it in the call below (its
    // first part runs at once), and the worker's next step may follow.
    const place = request.workerPlace;
    if (place) await place.turn();
    const stepping = fastify.rounds.step(name, input, {
      ifMatch: ifMatchOf(request),
      idempotencyKey,
      client: worker ?? request.raw.socket,
      requestHash: hash?.digest('hex'),
      olderRequestHashes: olderHashes,
      baseVersion,
      baseVersionFrom,
      paramGroups,
      metrics,
      worker,
      samples,
      waitSeconds: request.query.wait ?? DEFAULT_WAIT_SECONDS,
      signal: gone.signal,
      ...(returning !== 'none' && {
        // Refused before the step is written: an error after the commit would invite a retry that steps twice.
        beforeWrite: (layout: Layout) => {
          if (answerFormat === 'json' && layout.numel > MAX_JSON_ELEMENTS) {
            throw errors.notAcceptable('application/json', `application/x-safetensors for a session of ${layout.numel} elements (JSON answers hold at most ${MAX_JSON_ELEMENTS} numbers)`);
          }
        },
        encodeAt: (view: StateView, stepped: StepAnswerValue) => (encoded = encodeParams(view, stepped, returning === 'averaged', answerFormat as 'json' | 'safetensors')),
      }),
    });
    place?.leave();
    const outcome = await stepping.finally(() => reply.raw.removeListener('close', onClose));
    // A contribution may be held for its round up to ?wait= seconds (an hour at most): a stored token revoked
    // meanwhile gets no parameters, as a waiting read's does (found by a review). What it sent was taken.
    // Only a round's answers: a plain step is answered with what it committed (an error after the commit would
    // invite a retry that steps twice, were the lookup to fail).
    if (outcome.status === 202 || outcome.answer.round !== undefined) {
      await checkTokenStillActive(fastify, request, arrived, 'this request waited; what it sent was taken, the answer is withheld');
    }
    if (outcome.status === 202) {
      request.log.info({ round: outcome.round.version, contributions: outcome.round.contributions }, 'contribution pending');
      if (fastify.versions.stats().closed) reply.header('connection', 'close'); // shutting down: re-POST elsewhere
      return reply.code(202).type('application/json').send({ pending: true as const, round: outcome.round });
    }
    const { answer } = outcome;
    // The request's logger names the session. At info only with ASGD_LOG_REQUESTS=all: a training loop steps
    // many times a second, and step_history and /metrics keep count anyway.
    // A retry answered with the first answer says so: counting 'stepped' lines must not count it twice.
    request.log[steppedLevel]({ step: answer.step, version: answer.version }, answer.replayed ? 'replayed' : 'stepped');
    setVersion(reply, answer.version);
    reply.header('x-session-step', String(answer.step));
    const result = encoded as Encoded | null;
    if (result?.format === 'safetensors') {
      reply.header('content-disposition', `attachment; filename="${name}-v${answer.version}.safetensors"`);
      return reply.type(MEDIA.safetensors[0]).send(result.body);
    }
    reply.type('application/json');
    // Tensors as plain JSON.stringify: the schema's serializer would check every number against a union.
    if (result?.format === 'json') {
      return reply.serializer(JSON.stringify).send({
        ...answer, ...(result.version !== answer.version && { params_version: result.version }), params: result.params as never, param_groups: result.groups,
      });
    }
    return answer;
  });
};

export default stepRoutes;
