// The dashboard's reads of a session's history (step_history): the steps that changed hyperparameters,
// and the activity figures the sessions list adds with ?figures=true.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ACCESS, setVersion } from '../common.ts';
import { ConditionalReadHeaders, errorResponses, NameParams, NotModified, Session } from '../schemas.ts';
import { notModifiedAt } from './conditional.ts';
import { downsampledHyperChanges, entriesWithin, GROUP_ENTRIES_PER_ANSWER, hyperChanges, initialHyperparameters, NEWEST_CHANGES_KEPT, type Activity } from '../../sessions/series.ts';
import { errors } from '../../errors.ts';
import { MAX_POINTS } from './metrics.ts';

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
      description: 'Oldest first, after `after_version`: each step that set a group\'s hyperparameters (a scheduler), and each load (state_dict, checkpoint), restore or PATCH that changed them, with every group\'s values after it; and every group\'s values at the session\'s first version, in force until the first change. ' +
        'With `max_points`, the whole history after `after_version` in one answer: every change when there are at most that many, else (`downsampled`: true) ' +
        `the changes fitted to the buckets of .../metrics?max_points= with the same after_version: in each bucket its last change made by a step and its last other change, and the newest ${NEWEST_CHANGES_KEPT} changes; ` +
        'the values in force at each bucket\'s last step are then exactly those of the whole history. `total_changes` counts them all.',
      tags: ['training'],
      params: NameParams,
      headers: ConditionalReadHeaders,
      querystring: Type.Object({
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, default: 0 })),
        limit: Type.Optional(Type.Integer({
          minimum: 1, maximum: MAX_CHANGES_LIMIT,
          description: `Default 1000; not with max_points. A change lists every group's values: a page holds at most ${GROUP_ENTRIES_PER_ANSWER} of them (a session of 1,000 groups: 100 changes a page; next_after_version goes on), and with max_points the buckets are widened to fit as many`,
        })),
        max_points: Type.Optional(Type.Integer({ minimum: 2, maximum: MAX_POINTS, description: 'Read the whole history after after_version, downsampled to the buckets of .../metrics?max_points= when longer' })),
      }),
      response: {
        200: Type.Object({
          session: Type.String(),
          changes: Type.Array(Type.Object({
            version: Type.Integer(),
            step: Type.Integer(),
            time: Type.String({ format: 'date-time' }),
            reason: Type.String({ description: '"step" (a step set them: a scheduler), or the change that is not a step: hyperparameters (PATCH …/param_groups), load_state_dict, load_checkpoint, restore' }),
            param_groups: Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'Each group\'s hyperparameters after the change' }),
          })),
          next_after_version: Type.Integer(),
          downsampled: Type.Optional(Type.Boolean({ description: 'With max_points: whether changes were left out (see the description)' })),
          more: Type.Optional(Type.Boolean({ description: 'Without max_points: whether changes may follow next_after_version (the page is full, or bounded by the groups\' values it holds): read on while true' })),
          total_changes: Type.Optional(Type.Integer({ description: 'With max_points: how many changes there are after after_version, those left out included' })),
          initial_param_groups: Type.Union([Type.Array(Type.Record(Type.String(), Type.Unknown())), Type.Null()], {
            description: 'Each group\'s hyperparameters at the session\'s first version (created or forked); null: not known (a session made before this was kept, whose first snapshot is gone)',
          }),
        }),
        304: NotModified,
        ...errorResponses(400, 401, 403, 404, 412),
      },
    },
  }, async (request, reply) => {
    const afterVersion = request.query.after_version ?? 0;
    const maxPoints = request.query.max_points;
    if (maxPoints !== undefined && request.query.limit !== undefined) throw errors.invalidQuery('limit', 'cannot be combined with max_points (which reads the whole history)');
    const session = await fastify.sessions.get(request.params.name);
    // Before the changes are read: a 304 or 412 needs only the version (the session is read first, so the
    // changes of a step that commits meanwhile may come with the version before it, not be missed).
    if (notModifiedAt(request, reply, session.version)) return reply;
    const pageSize = entriesWithin(request.query.limit ?? 1000, session.groups.length);
    const [read, initial] = await Promise.all([
      maxPoints !== undefined
        ? downsampledHyperChanges(fastify.db, session.id, afterVersion, maxPoints, session.groups.length)
        : hyperChanges(fastify.db, session.id, afterVersion, pageSize).then((changes) => ({ changes, total: undefined, downsampled: undefined })),
      initialHyperparameters(fastify.db, session.id),
    ]);
    const { changes } = read;
    setVersion(reply, session.version);
    return {
      session: session.name,
      changes: changes.map((c) => ({ version: c.version, step: c.step, time: c.time.toISOString(), reason: c.reason, param_groups: c.paramGroups })),
      next_after_version: changes.length ? changes[changes.length - 1].version : afterVersion,
      ...(read.downsampled === undefined ? { more: changes.length === pageSize } : { downsampled: read.downsampled, total_changes: read.total }),
      initial_param_groups: initial,
    };
  });
};

export default seriesRoutes;
