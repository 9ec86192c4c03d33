// GET /v1/sessions/:name/metrics: the training series, one point per committed step (kept for the
// session's lifetime, unlike the step log): what the client sent as `metrics`, and the step's staleness.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { setVersion } from '../common.ts';
import { errorResponses, NameParams } from '../schemas.ts';

export const MAX_METRICS_LIMIT = 10_000;

const MetricsPoint = Type.Object({
  version: Type.Integer(),
  step: Type.Integer(),
  time: Type.String({ format: 'date-time', description: 'When the step committed' }),
  staleness: Type.Integer(),
  values: Type.Record(Type.String(), Type.Number(), { description: 'The step\'s metrics ({} when it sent none)' }),
  param_groups: Type.Optional(Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'Each group\'s hyperparameters after the step, when the step changed them' })),
});

const metricsRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.get('/:name/metrics', {
    schema: {
      operationId: 'getMetrics',
      summary: 'Read the training series',
      description: 'One point per step after `after_version`, oldest first: version, step, time, staleness and the metrics the step carried. ' +
        'Poll with `after_version` = the last `next_after_version`.',
      tags: ['training'],
      params: NameParams,
      querystring: Type.Object({
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, default: 0 })),
        limit: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_METRICS_LIMIT, default: 1000 })),
      }),
      response: {
        200: Type.Object({
          session: Type.String(),
          points: Type.Array(MetricsPoint),
          next_after_version: Type.Integer({ description: 'The after_version of the next page: the last point\'s version (or the one asked for when there are none)' }),
        }),
        ...errorResponses(400, 401, 403, 404),
      },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const afterVersion = request.query.after_version ?? 0;
    const { session, points } = await fastify.sessions.history(name, afterVersion, request.query.limit ?? 1000);
    setVersion(reply, session.version);
    return {
      session: name,
      points: points.map((p) => ({
        version: p.version, step: p.step, time: p.createdAt.toISOString(), staleness: p.staleness, values: p.metrics ?? {},
        ...(p.hyper && { param_groups: p.hyper }),
      })),
      next_after_version: points.length ? points[points.length - 1].version : afterVersion,
    };
  });
};

export default metricsRoutes;
