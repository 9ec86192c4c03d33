// POST /v1/sessions/:name/step: one optimizer step, acknowledged after its transaction committed.
import { createHash } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { errors } from '../../errors.ts';
import type { GradientInput } from '../../sessions/gradients.ts';
import { idempotencyKeyOf, ifMatchOf, optionalWhole, setVersion } from '../common.ts';
import { errorResponses, NameParams, StepAnswer } from '../schemas.ts';
import { BINARY_TYPES, binaryGradients } from './binary.ts';

export default async function stepRoutes(fastify: FastifyInstance, opts: { config: Config }) {
  fastify.post('/:name/step', {
    bodyLimit: opts.config.bodyLimitStep,
    schema: {
      summary: 'Apply one optimizer step',
      description:
        'Applies exactly the step torch.optim.ASGD would apply for these gradients and answers once it is committed. ' +
        'Body: JSON {"grads": {name: tensor or flat list}, "base_version"?} or a safetensors file of gradients ' +
        '(Content-Type application/x-safetensors; base_version then in the query). A parameter without a gradient is skipped, as in PyTorch.',
      tags: ['training'],
      consumes: ['application/json', ...BINARY_TYPES.safetensors, ...BINARY_TYPES.pt],
      params: NameParams,
      querystring: Type.Object({ base_version: Type.Optional(Type.String({ pattern: '^[0-9]{1,15}$', description: 'The version the gradient was computed from' })) }),
      headers: Type.Object({
        'if-match': Type.Optional(Type.String({ description: 'Apply only at this version' })),
        'idempotency-key': Type.Optional(Type.String({ description: 'A retry with the same key returns the first answer and does not step twice' })),
      }),
      body: Type.Object({
        grads: Type.Record(Type.String(), Type.Unknown(), { description: 'Parameter name -> tensor {"shape", "data"} or a flat list' }),
        base_version: Type.Optional(Type.Integer({ minimum: 0 })),
      }, { examples: [{ grads: { w: { shape: [2, 2], data: [0.01, -0.02, 0.03, 0.0] } } }] }),
      response: { 200: StepAnswer, ...errorResponses(400, 401, 403, 404, 409, 412, 413, 415, 422, 503) },
    },
    validatorCompiler: ({ httpPart }) => (httpPart === 'body' ? () => true : () => true),
  }, async (request, reply) => {
    const { name } = request.params as { name: string };
    const body = request.body as unknown;
    let input: GradientInput;
    let baseVersion = optionalWhole((request.query as { base_version?: string }).base_version, 'base_version');
    // The request's hash is only kept with an Idempotency-Key; hashing 4 MB of gradients costs ~3.5 ms.
    const idempotencyKey = idempotencyKeyOf(request);
    const hash = idempotencyKey ? createHash('sha256') : null;
    if (Buffer.isBuffer(body)) {
      input = binaryGradients(request, body);
      hash?.update(body);
    } else {
      if (body === null || typeof body !== 'object' || Array.isArray(body)) throw errors.invalidBody('body: must be a JSON object {"grads": {...}}');
      const b = body as Record<string, unknown>;
      for (const key of Object.keys(b)) if (key !== 'grads' && key !== 'base_version') throw errors.invalidBody(`${key}: unknown key`);
      if (b.grads === undefined) throw errors.invalidBody('grads: is missing');
      const bodyBase = optionalWhole(b.base_version, 'base_version');
      if (bodyBase !== null) baseVersion = bodyBase;
      input = { format: 'json', grads: b.grads };
      hash?.update(JSON.stringify(body));
    }
    if (baseVersion !== null) hash?.update(`base:${baseVersion}`);
    const answer = await fastify.sessions.step(name, input, {
      ifMatch: ifMatchOf(request),
      idempotencyKey,
      requestHash: hash?.digest('hex'),
      baseVersion,
    });
    request.log.info({ step: answer.step, version: answer.version }, 'stepped'); // the request's logger names the session
    setVersion(reply, answer.version);
    return answer;
  });
}
