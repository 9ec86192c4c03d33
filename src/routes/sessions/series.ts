// The dashboard's reads of a session's history (step_history): the steps that changed hyperparameters,
// and the activity figures the sessions list adds with ?figures=true.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ACCESS, setVersion } from '../common.ts';
import { errorResponses, NameParams, Session } from '../schemas.ts';
import { hyperChanges, type Activity } from '../../sessions/series.ts';

export const MAX_CHANGES_LIMIT = 10_000;

export const SessionActivity = Type.Object({
  steps_last_minute: Type.Integer(),
  steps_per_second: Type.Number({ description: 'steps_last_minute / 60' }),
  last_step_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: 'null: never stepped' }),
});

export const ListedSession = Type.Object({ ...Session.properties, activity: Type.Optional(SessionActivity) });

export function activityJson(a: Activity | undefined) {
  const steps = a?.stepsLastMinute ?? 0;
  return { steps_last_minute: steps, steps_per_second: steps / 60, last_step_at: a?.lastStepAt?.toISOString() ?? null };
}

const seriesRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.get('/:name/hyperparameters', {
    config: ACCESS.read,
    schema: {
      operationId: 'getHyperparameterChanges',
      summary: 'The steps that changed hyperparameters',
      description: 'Oldest first, after `after_version`: each step that set a group\'s hyperparameters (a scheduler), with every group\'s values after it.',
      tags: ['training'],
      params: NameParams,
      querystring: Type.Object({
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, default: 0 })),
        limit: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_CHANGES_LIMIT, default: 1000 })),
      }),
      response: {
        200: Type.Object({
          session: Type.String(),
          changes: Type.Array(Type.Object({
            version: Type.Integer(),
            step: Type.Integer(),
            time: Type.String({ format: 'date-time' }),
            param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'Each group\'s hyperparameters after the step' }),
          })),
          next_after_version: Type.Integer(),
        }),
        ...errorResponses(400, 401, 403, 404),
      },
    },
  }, async (request, reply) => {
    const afterVersion = request.query.after_version ?? 0;
    const session = await fastify.sessions.get(request.params.name);
    const changes = await hyperChanges(fastify.db, session.id, afterVersion, request.query.limit ?? 1000);
    setVersion(reply, session.version);
    return {
      session: session.name,
      changes: changes.map((c) => ({ version: c.version, step: c.step, time: c.time.toISOString(), param_groups: c.paramGroups })),
      next_after_version: changes.length ? changes[changes.length - 1].version : afterVersion,
    };
  });
};

export default seriesRoutes;
