// A session's history: snapshots taken automatically and on demand; download, pin, restore.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { ACCESS, changeAnswer, changeKeyOf, ifMatchOf, snapshotJson } from '../common.ts';
import { ROUTE_MEDIA } from '../media.ts';
import { ChangeHeaders, errorResponses, IfMatchHeaders, NameParams, Snapshot, SnapshotParams, SessionChange } from '../schemas.ts';
import { sendView, viewResponse, type ViewKind, type ViewQuery } from './views.ts';

const PinBody = Type.Object({ pinned: Type.Boolean({ description: 'Retention never removes a pinned snapshot' }) }, { additionalProperties: false, examples: [{ pinned: true }] });

const OPERATION_IDS: Record<ViewKind, string> = { params: 'getSnapshotParams', state_dict: 'getSnapshotStateDict', checkpoint: 'getSnapshotCheckpoint' };
const OFFERS: Record<ViewKind, readonly string[]> = { params: ROUTE_MEDIA.params.offers, state_dict: ROUTE_MEDIA.stateDict.offers, checkpoint: ROUTE_MEDIA.checkpoint.offers };

const snapshotRoutes: FastifyPluginAsyncTypebox<{ config: Config }> = async (fastify) => {
  fastify.post('/:name/snapshots', {
    config: ACCESS.admin,
    schema: {
      operationId: 'createSnapshot',
      summary: 'Take a snapshot now',
      description: 'A snapshot of the session\'s current version. When one exists at that version already (written on schedule, by a load or a restore), ' +
        'that one is answered (pinned if asked), with its own `reason`. With If-Match, only while the session is at that version (else 412).',
      tags: ['snapshots'],
      params: NameParams,
      headers: IfMatchHeaders,
      // No body takes an unpinned snapshot: fastify validates an absent body as null.
      body: Type.Union([Type.Object({ pinned: Type.Optional(PinBody.properties.pinned) }, { additionalProperties: false }), Type.Null()], {
        description: 'Optional; no body takes an unpinned snapshot',
      }),
      response: { 201: Snapshot, ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    const snapshot = await fastify.sessions.snapshotNow(request.params.name, request.body?.pinned ?? false, ifMatchOf(request));
    return reply.status(201).send(snapshotJson(snapshot));
  });

  fastify.get('/:name/snapshots', {
    config: ACCESS.read,
    schema: {
      operationId: 'listSnapshots',
      summary: 'List snapshots, newest first',
      description: 'Only complete snapshots are listed: each is written in one transaction with a sha256 checksum.',
      tags: ['snapshots'],
      params: NameParams,
      response: { 200: Type.Object({ session: Type.String(), version: Type.Integer(), snapshots: Type.Array(Snapshot) }, { title: 'SnapshotList' }), ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request) => {
    const { session, snapshots } = await fastify.sessions.listSnapshots(request.params.name);
    return { session: session.name, version: session.version, snapshots: snapshots.map(snapshotJson) };
  });

  fastify.get('/:name/snapshots/:id', {
    config: ACCESS.read,
    schema: { operationId: 'getSnapshot', summary: 'Read a snapshot\'s metadata', tags: ['snapshots'], params: SnapshotParams, response: { 200: Snapshot, ...errorResponses(400, 401, 403, 404) } },
  }, async (request) => snapshotJson((await fastify.sessions.getSnapshot(request.params.name, Number(request.params.id))).snapshot));

  fastify.patch('/:name/snapshots/:id', {
    config: ACCESS.admin,
    schema: {
      operationId: 'pinSnapshot',
      summary: 'Pin or unpin a snapshot',
      description: 'Retention never removes a pinned snapshot.',
      tags: ['snapshots'],
      params: SnapshotParams,
      headers: IfMatchHeaders,
      body: PinBody,
      response: { 200: Snapshot, ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request) => snapshotJson(await fastify.sessions.pinSnapshot(request.params.name, Number(request.params.id), request.body.pinned, ifMatchOf(request))));

  for (const kind of ['params', 'state_dict', 'checkpoint'] as const) {
    fastify.get(`/:name/snapshots/:id/${kind}`, {
      config: ACCESS.read,
      schema: {
        operationId: OPERATION_IDS[kind],
        summary: `Download a snapshot's ${kind}`,
        tags: ['snapshots'],
        params: SnapshotParams,
        querystring: Type.Object({
          format: Type.Optional(Type.Union(OFFERS[kind].map((f) => Type.Literal(f)), { description: 'Instead of an Accept header' })),
          // The state_dict and the checkpoint hold ax already: only params has an averaged form.
          ...(kind === 'params' && { averaged: Type.Optional(Type.Boolean({ description: 'ASGD\'s averages (ax) instead of the parameters' })) }),
        }),
        response: { ...viewResponse(kind), ...errorResponses(400, 401, 403, 404, 406) },
      },
    }, async (request, reply) => {
      const view = await fastify.sessions.snapshotView(request.params.name, Number(request.params.id));
      return sendView(kind, request, reply, view, request.query as ViewQuery);
    });
  }

  fastify.post('/:name/snapshots/:id/restore', {
    config: ACCESS.admin,
    schema: {
      operationId: 'restoreSnapshot',
      summary: 'Roll the session back to a snapshot',
      description: 'The snapshot\'s parameters and optimizer state become the session\'s state, as a new version.',
      tags: ['snapshots'],
      params: SnapshotParams,
      headers: ChangeHeaders,
      response: { 200: SessionChange, ...errorResponses(400, 401, 403, 404, 412, 422) },
    },
  }, async (request, reply) => {
    const result = await fastify.sessions.restore(request.params.name, Number(request.params.id), ifMatchOf(request), changeKeyOf(request));
    return changeAnswer(reply, result); // a new version: no round is open
  });
};

export default snapshotRoutes;
