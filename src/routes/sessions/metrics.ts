// GET /v1/sessions/:name/metrics: the training series, one point per committed step (kept for the
// session's lifetime, unlike the step log): what the client sent as `metrics`, and the step's staleness.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ACCESS, setVersion, untilClientGone } from '../common.ts';
import { ConditionalReadHeaders, errorResponses, NameParams, NotModified } from '../schemas.ts';
import { conditional, notModifiedAt } from './conditional.ts';
import { errors } from '../../errors.ts';
import { createMetricNames, downsampledSeries, GROUP_ENTRIES_PER_ANSWER, METRIC_BYTES_PER_PAGE, METRICS_PER_READ, type SeriesPoint } from '../../sessions/series.ts';

export const MAX_METRICS_LIMIT = 10_000;
export const MAX_POINTS = 10_000;

const Figures = Type.Record(Type.String(), Type.Number());

const MetricsPoint = Type.Object({
  version: Type.Integer(),
  step: Type.Integer(),
  time: Type.String({ format: 'date-time', description: 'When the step committed' }),
  staleness: Type.Number({ description: 'The step\'s staleness (a bucket: the mean of its steps\')' }),
  values: Type.Record(Type.String(), Type.Number(), { description: 'The step\'s metrics ({} when it sent none); a bucket: the mean of each' }),
  param_groups: Type.Optional(Type.Array(Type.Record(Type.String(), Type.Unknown()), { description: 'Each group\'s hyperparameters after the step, when the step changed them' })),
  version_from: Type.Optional(Type.Integer({ description: 'A bucket (max_points): its first version; `version`, `step` and `time` are its last' })),
  count: Type.Optional(Type.Integer({ description: 'A bucket: how many steps it holds' })),
  staleness_max: Type.Optional(Type.Integer({ description: 'A bucket: the largest staleness in it' })),
  min: Type.Optional(Figures),
  max: Type.Optional(Figures),
});

function bucketJson(p: SeriesPoint) {
  return {
    version: p.version, step: p.step, time: p.time.toISOString(), staleness: p.staleness, values: p.values,
    ...(p.count !== undefined && { version_from: p.versionFrom, count: p.count, staleness_max: p.stalenessMax, min: p.min, max: p.max }),
  };
}

const metricsRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const metricNames = createMetricNames();
  fastify.get('/:name/metrics', {
    config: ACCESS.read,
    schema: {
      operationId: 'getMetrics',
      summary: 'Read the training series',
      description: 'One point per step after `after_version`, oldest first: version, step, time, staleness and the metrics the step carried. ' +
        'Poll with `after_version` = the last `next_after_version`. With `max_points`, the whole series after `after_version` in at most ' +
        'that many points: the steps themselves when there are that few, else buckets of consecutive versions with the mean, min and max ' +
        'of each metric and of the staleness (`downsampled`: true). Hyperparameter changes are not in buckets: see .../hyperparameters.',
      tags: ['training'],
      params: NameParams,
      headers: ConditionalReadHeaders,
      querystring: Type.Object({
        after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, default: 0 })),
        limit: Type.Optional(Type.Integer({
          minimum: 1, maximum: MAX_METRICS_LIMIT,
          description: `Default 1000; not with max_points. A point of a step that set hyperparameters lists every group's values: a page holds at most ${GROUP_ENTRIES_PER_ANSWER} of them over its points (a session of 1,000 groups: 100 such points a page, and the others between them; next_after_version goes on), and no more points once their metrics pass ${METRIC_BYTES_PER_PAGE / 1024 / 1024} MiB of JSON`,
        })),
        max_points: Type.Optional(Type.Integer({ minimum: 2, maximum: MAX_POINTS, description: 'Downsample the series after after_version to at most this many points' })),
      }),
      response: {
        200: Type.Object({
          session: Type.String(),
          points: Type.Array(MetricsPoint),
          next_after_version: Type.Integer({ description: 'The after_version of the next page: the last point\'s version (or the one asked for when there are none)' }),
          downsampled: Type.Optional(Type.Boolean({ description: 'With max_points: whether the points are buckets' })),
          metrics_left_out: Type.Optional(Type.Integer({
            description: `Buckets: how many of the metric names the steps read (those after after_version) reported are not in them. Buckets hold at most ${METRICS_PER_READ} names: \`loss\`, then those the most steps reported, then by name; the pages without max_points hold every step's metrics`,
          })),
          more: Type.Optional(Type.Boolean({ description: 'Without max_points: whether points may follow next_after_version (the page is full, or bounded by the groups\' values or the bytes of metrics it holds): read on while true' })),
        }),
        304: NotModified,
        ...errorResponses(400, 401, 403, 404, 412, 503),
      },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const afterVersion = request.query.after_version ?? 0;
    const maxPoints = request.query.max_points;
    if (maxPoints !== undefined) {
      if (request.query.limit !== undefined) throw errors.invalidQuery('limit', 'cannot be combined with max_points (which reads the whole series)');
      const session = await fastify.sessions.get(name);
      // Before the whole series is read: a 304 or 412 needs only the version.
      if (notModifiedAt(request, reply, session.version)) return reply;
      // A client that hangs up leaves the queue of downsampled reads (series.ts).
      const gone = untilClientGone(request, reply);
      let read;
      try {
        read = await downsampledSeries(fastify.db, metricNames, session.id, afterVersion, maxPoints, gone.signal);
      } finally {
        gone.stop();
      }
      const { points, downsampled, metricsLeftOut } = read;
      setVersion(reply, session.version);
      return {
        session: name, points: points.map(bucketJson), next_after_version: points.length ? points[points.length - 1].version : afterVersion, downsampled,
        ...(metricsLeftOut !== undefined && { metrics_left_out: metricsLeftOut }),
      };
    }
    // A 304 or 412 before the points are read, and again on the version the answer carries (the session is
    // read before its points: a point of a step that commits meanwhile may come with the version before it,
    // which a later If-None-Match of that version then reads again, rather than miss).
    if (conditional(request) && notModifiedAt(request, reply, (await fastify.sessions.get(name)).version)) return reply;
    const { session, points, more } = await fastify.sessions.history(name, afterVersion, request.query.limit ?? 1000);
    if (notModifiedAt(request, reply, session.version)) return reply;
    setVersion(reply, session.version);
    return {
      session: name,
      points: points.map((p) => ({
        version: p.version, step: p.step, time: p.createdAt.toISOString(), staleness: p.staleness, values: p.metrics ?? {},
        ...(p.hyper && { param_groups: p.hyper }),
      })),
      next_after_version: points.length ? points[points.length - 1].version : afterVersion,
      more,
    };
  });
};

export default metricsRoutes;
