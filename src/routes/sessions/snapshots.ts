// A session's history: snapshots taken automatically and on demand; download, pin, restore.
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { Type } from 'typebox';
import type { Config } from '../../config.ts';
import { errors } from '../../errors.ts';
import { ifMatchOf, sessionJson, setVersion, snapshotJson } from '../common.ts';
import { errorResponses, NameParams, Session, Snapshot, SnapshotParams } from '../schemas.ts';
import { checkpointFormats, readFormats, sendView } from './state.ts';

const snapshotIdOf = (request: FastifyRequest) => Number((request.params as { id: string }).id);

export default async function snapshotRoutes(fastify: FastifyInstance, _opts: { config: Config }) {
  fastify.post('/:name/snapshots', {
    schema: {
      summary: 'Take a snapshot now',
      tags: ['snapshots'],
      params: NameParams,
      body: Type.Object({ pinned: Type.Optional(Type.Boolean()) }, { additionalProperties: false, description: 'Optional; no body takes an unpinned snapshot' }),
      response: { 201: Snapshot, ...errorResponses(400, 401, 403, 404) },
    },
    // The body is optional, which a JSON Schema for the body cannot say: checked here.
    validatorCompiler: ({ httpPart }) => (httpPart === 'body' ? () => true : () => true),
  }, async (request, reply) => {
    const { name } = request.params as { name: string };
    const body = request.body as unknown;
    if (body !== undefined && body !== null && (typeof body !== 'object' || Array.isArray(body) || Object.keys(body).some((k) => k !== 'pinned'))) {
      throw errors.invalidBody('body: must be {"pinned": true|false} or empty');
    }
    const given = (body as { pinned?: unknown } | null | undefined)?.pinned;
    const pinned = given === undefined ? false : given;
    if (typeof pinned !== 'boolean') throw errors.invalidBody('pinned: must be true or false');
    const snapshot = await fastify.sessions.snapshotNow(name, pinned);
    return reply.status(201).send(snapshotJson(snapshot));
  });

  fastify.get('/:name/snapshots', {
    schema: {
      summary: 'List snapshots, newest first',
      description: 'Only complete snapshots are listed: each is written in one transaction with a sha256 checksum.',
      tags: ['snapshots'],
      params: NameParams,
      response: { 200: Type.Object({ session: Type.String(), version: Type.Integer(), snapshots: Type.Array(Snapshot) }), ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request) => {
    const { session, snapshots } = await fastify.sessions.listSnapshots((request.params as { name: string }).name);
    return { session: session.name, version: session.version, snapshots: snapshots.map(snapshotJson) };
  });

  fastify.get('/:name/snapshots/:id', {
    schema: { summary: 'Read a snapshot\'s metadata', tags: ['snapshots'], params: SnapshotParams, response: { 200: Snapshot, ...errorResponses(400, 401, 403, 404) } },
  }, async (request) => snapshotJson((await fastify.sessions.getSnapshot((request.params as { name: string }).name, snapshotIdOf(request))).snapshot));

  fastify.patch('/:name/snapshots/:id', {
    schema: {
      summary: 'Pin or unpin a snapshot',
      description: 'Retention never removes a pinned snapshot.',
      tags: ['snapshots'],
      params: SnapshotParams,
      body: Type.Object({ pinned: Type.Boolean() }, { additionalProperties: false }),
      response: { 200: Snapshot, ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request) => {
    const { pinned } = request.body as { pinned: boolean };
    return snapshotJson(await fastify.sessions.pinSnapshot((request.params as { name: string }).name, snapshotIdOf(request), pinned));
  });

  for (const kind of ['params', 'state_dict', 'checkpoint'] as const) {
    fastify.get(`/:name/snapshots/:id/${kind}`, {
      schema: {
        summary: `Download a snapshot's ${kind}`,
        tags: ['snapshots'],
        params: SnapshotParams,
        querystring: Type.Object({
          format: Type.Optional(Type.Union([Type.Literal('json'), Type.Literal('pt'), Type.Literal('safetensors')])),
          ...(kind === 'params' && { averaged: Type.Optional(Type.Boolean()) }),
        }),
        response: { ...(kind === 'checkpoint' ? checkpointFormats : readFormats), ...errorResponses(400, 401, 403, 404, 406) },
      },
    }, async (request, reply) => {
      const view = await fastify.sessions.snapshotView((request.params as { name: string }).name, snapshotIdOf(request));
      return sendView(kind, request, reply, view);
    });
  }

  fastify.post('/:name/snapshots/:id/restore', {
    schema: {
      summary: 'Roll the session back to a snapshot',
      description: 'The snapshot\'s parameters and optimizer state become the session\'s state, as a new version.',
      tags: ['snapshots'],
      params: SnapshotParams,
      headers: Type.Object({ 'if-match': Type.Optional(Type.String()) }),
      response: { 200: Session, ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    const session = await fastify.sessions.restore((request.params as { name: string }).name, snapshotIdOf(request), ifMatchOf(request));
    setVersion(reply, session.version);
    return sessionJson(session);
  });
}
