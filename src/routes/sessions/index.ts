// /v1/sessions: create, list, read, change settings, delete; and the sub-resources' plugins.
import type { FastifyInstance } from 'fastify';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { sessionJson, setVersion, ifMatchOf, optionalWhole, SETTING_LIMITS } from '../common.ts';
import { errorResponses, Hyperparameters, NameParams, NotModified, Session } from '../schemas.ts';
import { noneMatch, sendNotModified } from './conditional.ts';
import { parseCreateBody } from './create.ts';
import { BINARY_TYPES } from './binary.ts';
import stepRoutes from './step.ts';
import stateRoutes from './state.ts';
import snapshotRoutes from './snapshots.ts';
import normRoutes from './norms.ts';
import seriesRoutes, { activityJson, ListedSession } from './series.ts';
import { sessionActivity } from '../../sessions/series.ts';

/** keep_log_bytes and expire_after_idle_s: on create, PATCH and fork; null turns each off. */
const STORAGE_SETTINGS = {
  keep_log_bytes: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_log_bytes }), Type.Null()], {
    description: 'Byte bound on the step log: a snapshot is taken and older log dropped to stay under it (null: no bound)',
  })),
  expire_after_idle_s: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.expire_after_idle_s }), Type.Null()], {
    description: 'Delete the session after this many seconds without a step or a write; reads do not count (null: never)',
  })),
};
import metricsRoutes from './metrics.ts';
import eventsRoutes from './events.ts';

export default async function sessionRoutes(fastify: FastifyInstance, opts: { config: Config }) {
  const { config } = opts;

  fastify.post('/', {
    bodyLimit: config.bodyLimitCreate,
    schema: {
      summary: 'Create a session',
      description: 'Creates a training session from named float32 parameters and ASGD hyperparameters. The body is JSON, or a torch.save / safetensors file (see the README).',
      tags: ['sessions'],
      consumes: ['application/json', ...BINARY_TYPES.safetensors, ...BINARY_TYPES.pt],
      body: Type.Object({
        name: Type.String(),
        params: Type.Array(Type.Object({ name: Type.String(), shape: Type.Array(Type.Integer()), data: Type.Array(Type.Number()) })),
        hyperparameters: Type.Optional(Hyperparameters),
        param_groups: Type.Optional(Type.Array(Type.Object({ params: Type.Array(Type.String()) }, { additionalProperties: true }))),
        snapshot_every: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.snapshot_every })),
        keep_snapshots: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_snapshots })),
        max_staleness: Type.Optional(Type.Union([Type.Integer({ minimum: 0, maximum: SETTING_LIMITS.max_staleness }), Type.Null()])),
        ...STORAGE_SETTINGS,
      }, {
        examples: [{ name: 'mnist-run-1', params: [{ name: 'w', shape: [2, 2], data: [0.1, 0.2, 0.3, 0.4] }], hyperparameters: { lr: 0.01, t0: 100 } }],
      }),
      response: { 201: Session, ...errorResponses(400, 401, 403, 409, 413, 415) },
    },
    // The body is validated by the domain (it may hold millions of numbers); the schema above documents it.
    validatorCompiler: () => () => true,
  }, async (request, reply) => {
    const input = await parseCreateBody(request, config);
    const session = await fastify.sessions.create(input);
    setVersion(reply, session.version);
    reply.header('location', `/v1/sessions/${session.name}`);
    return reply.status(201).send(sessionJson(session));
  });

  fastify.get('/', {
    schema: {
      summary: 'List sessions',
      tags: ['sessions'],
      querystring: Type.Object({
        limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
        after: Type.Optional(Type.String({ maxLength: 128, description: 'Cursor: the last name of the previous page' })),
        search: Type.Optional(Type.String({ maxLength: 128, pattern: '^[A-Za-z0-9._-]*$', description: 'Only names that contain this text (case-insensitive)' })),
        figures: Type.Optional(Type.Boolean({ description: 'Include each session\'s `activity`: steps in the last minute and the time of the last step (an index probe a session)' })),
        storage: Type.Optional(Type.Boolean({ description: 'Include each session\'s stored bytes (one more query for the page)' })),
      }),
      response: { 200: Type.Object({ sessions: Type.Array(ListedSession), next: Type.Union([Type.String(), Type.Null()]) }), ...errorResponses(400, 401, 403) },
    },
  }, async (request) => {
    const { limit = 100, after, search, figures, storage } = request.query as { limit?: number; after?: string; search?: string; figures?: boolean; storage?: boolean };
    // A token limited to a list of sessions lists only those (src/plugins/auth.ts).
    const rows = await fastify.sessions.list(after ?? null, limit + 1, request.auth?.sessions ?? null, search || null);
    const page = rows.slice(0, limit);
    const ids = page.map((s) => s.id);
    const [stored, activity] = await Promise.all([
      storage ? fastify.sessions.storageOfMany(page) : null,
      figures ? sessionActivity(fastify.db, ids) : null,
    ]);
    return {
      sessions: page.map((s) => ({
        ...sessionJson(s),
        ...(stored?.has(s.id) && { storage: stored.get(s.id) }),
        ...(activity && { activity: activityJson(activity.get(s.id)) }),
      })),
      next: rows.length > limit ? page[page.length - 1].name : null,
    };
  });

  fastify.get('/:name', {
    schema: {
      summary: 'Read a session',
      tags: ['sessions'],
      params: NameParams,
      headers: Type.Object({ 'if-none-match': Type.Optional(Type.String({ description: '"<version>": 304 while the session is at that version' })) }),
      response: { 200: Session, 304: NotModified, ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request, reply) => {
    const { name } = request.params as { name: string };
    const session = await fastify.sessions.get(name);
    if (noneMatch(request, session.version)) return sendNotModified(reply, session.version);
    setVersion(reply, session.version);
    return { ...sessionJson(session), storage: await fastify.sessions.storage(name) };
  });

  fastify.patch('/:name', {
    schema: {
      summary: 'Change a session\'s settings',
      description: 'Settings do not change the state, so the version stays.',
      tags: ['sessions'],
      params: NameParams,
      body: Type.Object({
        snapshot_every: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.snapshot_every })),
        keep_snapshots: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_snapshots })),
        max_staleness: Type.Optional(Type.Union([Type.Integer({ minimum: 0, maximum: SETTING_LIMITS.max_staleness }), Type.Null()])),
        ...STORAGE_SETTINGS,
      }, { additionalProperties: false }),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request, reply) => {
    const body = request.body as {
      snapshot_every?: number; keep_snapshots?: number; max_staleness?: number | null; keep_log_bytes?: number | null; expire_after_idle_s?: number | null;
    };
    const session = await fastify.sessions.updateSettings((request.params as { name: string }).name, {
      ...(body.snapshot_every !== undefined && { snapshotEvery: body.snapshot_every }),
      ...(body.keep_snapshots !== undefined && { keepSnapshots: body.keep_snapshots }),
      ...(body.max_staleness !== undefined && { maxStaleness: body.max_staleness }),
      ...(body.keep_log_bytes !== undefined && { keepLogBytes: body.keep_log_bytes }),
      ...(body.expire_after_idle_s !== undefined && { expireAfterIdleS: body.expire_after_idle_s }),
    });
    setVersion(reply, session.version);
    return sessionJson(session);
  });

  fastify.delete('/:name', {
    schema: {
      summary: 'Delete a session with its snapshots and log',
      tags: ['sessions'],
      params: NameParams,
      response: { 204: Type.Null(), ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    await fastify.sessions.remove((request.params as { name: string }).name, ifMatchOf(request));
    return reply.status(204).send();
  });

  fastify.post('/:name/fork', {
    schema: {
      summary: 'Fork a session',
      description: 'A new session that starts from a snapshot of this one (or its current state): same parameters, optimizer state and step count, version 1.',
      tags: ['snapshots'],
      params: NameParams,
      body: Type.Object({
        name: Type.String({ pattern: '^[A-Za-z0-9._-]{1,128}$' }),
        snapshot: Type.Optional(Type.Integer({ minimum: 1 })),
        snapshot_every: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.snapshot_every })),
        keep_snapshots: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_snapshots })),
        max_staleness: Type.Optional(Type.Union([Type.Integer({ minimum: 0, maximum: SETTING_LIMITS.max_staleness }), Type.Null()])),
        ...STORAGE_SETTINGS,
      }, { additionalProperties: false }),
      response: { 201: Session, ...errorResponses(400, 401, 403, 404, 409) },
    },
  }, async (request, reply) => {
    const body = request.body as {
      name: string; snapshot?: number; snapshot_every?: number; keep_snapshots?: number; max_staleness?: number | null;
      keep_log_bytes?: number | null; expire_after_idle_s?: number | null;
    };
    const session = await fastify.sessions.fork((request.params as { name: string }).name, {
      name: body.name,
      snapshotId: optionalWhole(body.snapshot, 'snapshot', 1),
      snapshotEvery: body.snapshot_every,
      keepSnapshots: body.keep_snapshots,
      maxStaleness: body.max_staleness,
      keepLogBytes: body.keep_log_bytes,
      expireAfterIdleS: body.expire_after_idle_s,
    });
    setVersion(reply, session.version);
    reply.header('location', `/v1/sessions/${session.name}`);
    return reply.status(201).send(sessionJson(session));
  });

  await fastify.register(stepRoutes, { config });
  await fastify.register(stateRoutes, { config });
  await fastify.register(snapshotRoutes, { config });
  await fastify.register(normRoutes);
  await fastify.register(seriesRoutes);
  await fastify.register(metricsRoutes);
  await fastify.register(eventsRoutes);
}
