// POST /v1/sessions/:name/step: one optimizer step, acknowledged after its transaction committed.
import { createHash } from 'node:crypto';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import type { GradientInput } from '../../sessions/gradients.ts';
import { idempotencyKeyOf, ifMatchOf, jsonBody, jsonOrFile, optionalWhole, setVersion } from '../common.ts';
import { contentFormat, mediaTypes, ROUTE_MEDIA } from '../media.ts';
import { BaseVersion, errorResponses, NameParams, StepAnswer, StepHeaders } from '../schemas.ts';
import { binaryGradients } from './binary.ts';

/** The JSON form of a step. Gradients are read element by element by the domain. */
const StepBody = Type.Object({
  grads: Type.Record(Type.String(), Type.Unknown(), { description: 'Parameter name -> tensor {"shape", "data"} or a flat list of numbers' }),
  // Checked by code as the query's base_version is (INVALID_QUERY): it may come from either place.
  base_version: Type.Optional(Type.Unknown({ description: 'The version the gradient was computed from (a whole number)' })),
}, { additionalProperties: false, examples: [{ grads: { w: { shape: [2, 2], data: [0.01, -0.02, 0.03, 0.0] } }, base_version: 42 }] });

const stepRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify, opts) => {
  fastify.post('/:name/step', {
    bodyLimit: opts.config.bodyLimitStep,
    schema: {
      operationId: 'step',
      summary: 'Apply one optimizer step',
      description:
        'Applies exactly the step torch.optim.ASGD would apply for these gradients and answers once it is committed. ' +
        'Body: JSON {"grads": {name: tensor or flat list}, "base_version"?} or a safetensors / torch.save file of gradients ' +
        '(base_version then in the query). A parameter without a gradient is skipped, as in PyTorch.',
      tags: ['training'],
      consumes: mediaTypes(ROUTE_MEDIA.step.accepts),
      params: NameParams,
      querystring: Type.Object({ base_version: Type.Optional(BaseVersion) }),
      headers: StepHeaders,
      body: jsonBody(StepBody),
      response: { 200: StepAnswer, ...errorResponses(400, 401, 403, 404, 409, 412, 413, 415, 422, 503) },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const body = jsonOrFile(request.body, StepBody);
    let input: GradientInput;
    let baseVersion = optionalWhole(request.query.base_version, 'base_version');
    // The request's hash is only kept with an Idempotency-Key; hashing 4 MB of gradients costs ~3.5 ms.
    const idempotencyKey = idempotencyKeyOf(request);
    const hash = idempotencyKey ? createHash('sha256') : null;
    if (Buffer.isBuffer(body)) {
      input = binaryGradients(contentFormat(request), body);
      hash?.update(body);
    } else {
      const bodyBase = optionalWhole(body.base_version, 'base_version');
      if (bodyBase !== null) baseVersion = bodyBase;
      input = { format: 'json', grads: body.grads };
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
};

export default stepRoutes;
