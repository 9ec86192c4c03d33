// /v1/sessions: create, list, read, change settings, delete; and the sub-resources' plugins.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { ACCESS, ifMatchOf, jsonBody, jsonOrFile, sessionJson, setVersion } from '../common.ts';
import { mediaTypes, ROUTE_MEDIA, contentFormat } from '../media.ts';
import {
  Aggregation, errorResponses, Hyperparameters, ConditionalReadHeaders, IfMatchHeaders, NameParams, NotModified, NewSessionName, ParamGroupIn, Session, SessionSettings, TensorIn, withCode,
} from '../schemas.ts';
import { parseCreateBody } from './create.ts';
import stepRoutes from './step.ts';
import stateRoutes from './state.ts';
import snapshotRoutes from './snapshots.ts';
import metricsRoutes from './metrics.ts';
import eventsRoutes from './events.ts';
import { notModifiedAt } from './conditional.ts';
import normRoutes from './norms.ts';
import seriesRoutes, { activityJson, ListedSession } from './series.ts';
import { sessionActivity } from '../../sessions/series.ts';
import { parseAggregation } from '../../sessions/aggregation.ts';

/** The parameters a page of the session list names in all, at most (a page holds one session at least). */
export const LIST_PAGE_PARAMS = 100_000;

/** `aggregation` in a create or settings body: an object, or null for none. */
const AggregationIn = Type.Optional(Type.Union([Aggregation, Type.Null()], { description: 'Synchronous rounds (null: none); see Aggregation' }));

/** The JSON form of a create request. Tensors are checked element by element by the domain. */
const CreateBody = Type.Object({
  name: NewSessionName,
  params: Type.Array(Type.Object({
    name: withCode(Type.String({ description: 'Parameter name: 1-256 UTF-16 code units (most characters take one, an emoji two) without control characters' }), 'INVALID_TENSOR'),
    ...TensorIn.properties,
  }, { additionalProperties: false }), { minItems: 1, description: 'The parameters in the model\'s order' }),
  hyperparameters: Type.Optional(Hyperparameters),
  param_groups: Type.Optional(withCode(Type.Array(ParamGroupIn, { minItems: 1, description: 'Param groups, as in torch.optim.ASGD(param_groups)' }), 'INVALID_PARAM_GROUPS')),
  ...SessionSettings,
  aggregation: AggregationIn,
}, {
  additionalProperties: false,
  examples: [{ name: 'mnist-run-1', params: [{ name: 'w', shape: [2, 2], data: [0.1, 0.2, 0.3, 0.4] }], hyperparameters: { lr: 0.01, t0: 100 } }],
});

const CreateQuery = Type.Object({
  name: Type.Optional(NewSessionName),
  options: Type.Optional(Type.String({ maxLength: 65536, description: 'With a file body: the JSON form\'s other keys as a JSON object {"name", "hyperparameters", "param_groups", …}' })),
});

const sessionRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify, opts) => {
  const { config } = opts;

  fastify.post('/', {
    config: ACCESS.adminAllSessions,
    bodyLimit: config.bodyLimitCreate,
    schema: {
      operationId: 'createSession',
      summary: 'Create a session',
      description: 'Creates a training session from named float32 parameters and ASGD hyperparameters. The body is JSON, or a safetensors / torch.save file of the initial parameters with the other keys in ?options= and/or the safetensors metadata entry "asgd" (merged; a key in both with different values is refused).',
      tags: ['sessions'],
      consumes: mediaTypes(ROUTE_MEDIA.create.accepts),
      querystring: CreateQuery,
      body: jsonBody(CreateBody),
      response: { 201: Session, ...errorResponses(400, 401, 403, 409, 413, 415, 422) },
    },
  }, async (request, reply) => {
    const input = parseCreateBody(jsonOrFile(request.body, CreateBody), request.query, contentFormat(request), config);
    const session = await fastify.sessions.create(input);
    setVersion(reply, session.version);
    reply.header('location', `/v1/sessions/${session.name}`);
    return reply.status(201).send(sessionJson(session, null));
  });

  fastify.get('/', {
    config: ACCESS.read,
    schema: {
      operationId: 'listSessions',
      summary: 'List sessions',
      description: `Sessions by name, \`limit\` a page, fewer when their parameter lists are long: a page ends before the session that takes it past ${LIST_PAGE_PARAMS.toLocaleString('en')} parameters in all (it holds one session at least). Follow \`next\` until it is null.`,
      tags: ['sessions'],
      querystring: Type.Object({
        limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
        // A cursor is a session name: PostgreSQL refuses text with NUL in it (it was a generic 400).
        after: Type.Optional(Type.String({ maxLength: 128, pattern: '^[A-Za-z0-9._-]*$', 'x-rule': 'letters, digits, ".", "_" and "-"', description: 'Cursor: the last name of the previous page' })),
        search: Type.Optional(Type.String({ maxLength: 128, pattern: '^[A-Za-z0-9._-]*$', 'x-rule': 'letters, digits, ".", "_" and "-"', description: 'Only names that contain this text (case-insensitive)' })),
        figures: Type.Optional(Type.Boolean({ description: 'Include each session\'s `activity`: steps in the last minute and the time of the last step (an index probe a session)' })),
        storage: Type.Optional(Type.Boolean({ description: 'Include each session\'s stored bytes (one more query for the page)' })),
      }),
      response: { 200: Type.Object({ sessions: Type.Array(ListedSession), next: Type.Union([Type.String(), Type.Null()]) }, { title: 'SessionList' }), ...errorResponses(400, 401, 403) },
    },
  }, async (request) => {
    const { limit = 100, after, search, figures, storage } = request.query;
    // A token limited to a list of sessions lists only those (src/plugins/auth.ts).
    const rows = await fastify.sessions.list(after ?? null, limit + 1, request.auth?.sessions ?? null, search || null);
    // Each entry lists its parameters (and its groups, their indices): a page of sessions with 100,000
    // parameters each was hundreds of MB (found by a review). A page ends early, before the entry that takes
    // it past LIST_PAGE_PARAMS parameters in all (always one entry), and `next` goes on from there.
    let take = 0;
    for (let listed = 0; take < Math.min(limit, rows.length); take++) {
      listed += rows[take].params.length;
      if (take > 0 && listed > LIST_PAGE_PARAMS) break;
    }
    const page = rows.slice(0, take);
    const ids = page.map((s) => s.id);
    const [stored, activity, rounds] = await Promise.all([
      storage ? fastify.sessions.storageOfMany(page) : null,
      figures ? sessionActivity(fastify.db, ids) : null,
      fastify.rounds.openRounds(page),
    ]);
    return {
      sessions: page.map((s) => ({
        ...sessionJson(s, rounds.get(s.id) ?? null),
        ...(stored?.has(s.id) && { storage: stored.get(s.id) }),
        ...(activity && { activity: activityJson(activity.get(s.id)) }),
      })),
      next: rows.length > page.length ? page[page.length - 1].name : null,
    };
  });

  fastify.get('/:name', {
    config: ACCESS.read,
    schema: {
      operationId: 'getSession',
      summary: 'Read a session',
      tags: ['sessions'],
      params: NameParams,
      headers: ConditionalReadHeaders,
      response: { 200: Session, 304: NotModified, ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    const session = await fastify.sessions.get(name);
    // The ETag is the version (If-None-Match: "<version>" asks whether the state moved), but settings
    // (PATCH), the open round and the stored bytes change without a new version: no HTTP cache may keep
    // this answer and revalidate it into showing old settings (a browser would).
    reply.header('cache-control', 'no-store');
    if (notModifiedAt(request, reply, session.version)) return reply;
    setVersion(reply, session.version);
    const [round, storage] = await Promise.all([fastify.rounds.openRound(session), fastify.sessions.storage(name)]);
    return { ...sessionJson(session, round), storage };
  });

  fastify.patch('/:name', {
    config: ACCESS.admin,
    schema: {
      operationId: 'updateSession',
      summary: 'Change a session\'s settings',
      description: 'Settings do not change the state, so the version stays. `aggregation` cannot change while a round has contributions (409 ROUND_OPEN).',
      tags: ['sessions'],
      params: NameParams,
      headers: IfMatchHeaders,
      body: Type.Object({ ...SessionSettings, aggregation: AggregationIn }, { additionalProperties: false, examples: [{ snapshot_every: 100 }] }),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 409, 412) },
    },
  }, async (request, reply) => {
    const body = request.body;
    const aggregation = parseAggregation(body.aggregation);
    const session = await fastify.sessions.updateSettings(request.params.name, {
      ...(body.snapshot_every !== undefined && { snapshotEvery: body.snapshot_every }),
      ...(body.keep_snapshots !== undefined && { keepSnapshots: body.keep_snapshots }),
      ...(body.max_staleness !== undefined && { maxStaleness: body.max_staleness }),
      ...(body.keep_log_bytes !== undefined && { keepLogBytes: body.keep_log_bytes }),
      ...(body.expire_after_idle_s !== undefined && { expireAfterIdleS: body.expire_after_idle_s }),
      ...(aggregation !== undefined && { aggregation }),
    }, ifMatchOf(request));
    setVersion(reply, session.version);
    return sessionJson(session, await fastify.rounds.openRound(session));
  });

  fastify.delete('/:name', {
    config: ACCESS.admin,
    schema: {
      operationId: 'deleteSession',
      summary: 'Delete a session with its snapshots and log',
      tags: ['sessions'],
      params: NameParams,
      headers: IfMatchHeaders,
      response: { 204: Type.Null({ description: 'Deleted' }), ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    await fastify.sessions.remove(request.params.name, ifMatchOf(request));
    return reply.status(204).send(null);
  });

  fastify.post('/:name/fork', {
    config: ACCESS.adminAllSessions,
    schema: {
      operationId: 'forkSession',
      summary: 'Fork a session',
      description: 'A new session that starts from a snapshot of this one (or its current state): same parameters, optimizer state and step count, version 1.',
      tags: ['snapshots'],
      params: NameParams,
      body: Type.Object({
        name: NewSessionName,
        snapshot: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'Fork from this snapshot (default: the current state)' })),
        ...SessionSettings,
      }, { additionalProperties: false, examples: [{ name: 'mnist-run-1-lr-sweep', snapshot: 3 }] }),
      headers: IfMatchHeaders,
      response: { 201: Session, ...errorResponses(400, 401, 403, 404, 409, 412) },
    },
  }, async (request, reply) => {
    const body = request.body;
    const session = await fastify.sessions.fork(request.params.name, {
      name: body.name,
      snapshotId: body.snapshot ?? null,
      snapshotEvery: body.snapshot_every,
      keepSnapshots: body.keep_snapshots,
      maxStaleness: body.max_staleness,
      keepLogBytes: body.keep_log_bytes,
      expireAfterIdleS: body.expire_after_idle_s,
      ifMatch: ifMatchOf(request),
    });
    setVersion(reply, session.version);
    reply.header('location', `/v1/sessions/${session.name}`);
    return reply.status(201).send(sessionJson(session, null));
  });

  await fastify.register(stepRoutes, { config });
  await fastify.register(stateRoutes, { config });
  await fastify.register(snapshotRoutes, { config });
  await fastify.register(normRoutes);
  await fastify.register(seriesRoutes);
  await fastify.register(metricsRoutes);
  await fastify.register(eventsRoutes);
};

export default sessionRoutes;
