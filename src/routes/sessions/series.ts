// The dashboard's reads of a session's history (step_history): the steps that changed hyperparameters,
// and the activity figures the sessions list adds with ?figures=true.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ACCESS, setVersion } from '../common.ts';
import { errorResponses, NameParams, Session } from '../schemas.ts';
import { hyperChanges, initialHyperparameters, type Activity } from '../../sessions/series.ts';

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
      summary: 'The versions that changed hyperparameters',
      description: 'Oldest first, after `after_version`: each step that set a group\'s hyperparameters (a scheduler), and each load (state_dict, checkpoint) or restore that changed them, with every group\'s values after it; and every group\'s values at the session\'s first version, in force until the first change.',
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
            reason: Type.String({ description: '"step" (a step set them: a scheduler), or the change that is not a step: load_state_dict, load_checkpoint, restore' }),
            param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'Each group\'s hyperparameters after the change' }),
          })),
          next_after_version: Type.Integer(),
          initial_param_groups: Type.Union([Type.Array(Type.Record(Type.String(), Type.Unknown())), Type.Null()], {
            description: 'Each group\'s hyperparameters at the session\'s first version (created or forked); null: not known (a session made before this was kept, whose first snapshot is gone)',
          }),
        }),
        ...errorResponses(400, 401, 403, 404),
      },
    },
  }, async (request, reply) => {
    const afterVersion = request.query.after_version ?? 0;
    const session = await fastify.sessions.get(request.params.name);
    const [changes, initial] = await Promise.all([
      hyperChanges(fastify.db, session.id, afterVersion, request.query.limit ?? 1000), initialHyperparameters(fastify.db, session.id),
    ]);
    setVersion(reply, session.version);
    return {
      session: session.name,
      changes: changes.map((c) => ({ version: c.version, step: c.step, time: c.time.toISOString(), reason: c.reason, param_groups: c.paramGroups })),
      next_after_version: changes.length ? changes[changes.length - 1].version : afterVersion,
      initial_param_groups: initial,
    };
  });
};

export default seriesRoutes;
