// /v1/tokens: create (the secret is shown once), list, revoke. Unrestricted admin tokens only.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { errors } from '../../errors.ts';
import { SCOPES, tokenJson } from '../../auth/tokens.ts';
import { errorResponses, SessionName } from '../schemas.ts';

const ScopeSchema = Type.Union([Type.Literal(SCOPES[0]), Type.Literal(SCOPES[1]), Type.Literal(SCOPES[2])], {
  description: 'read: GET routes of sessions; step: read, POST .../step, and what a worker does besides stepping (PUT .../params, a clamp or mask of its weights; PATCH .../param_groups, a scheduler\'s values); admin: everything (x-scope of each operation says its own)',
});

const TokenInfo = Type.Object({
  id: Type.String(),
  name: Type.String(),
  scope: ScopeSchema,
  sessions: Type.Union([Type.Array(Type.String()), Type.Null()], { description: 'null: every session' }),
  created_at: Type.String({ format: 'date-time' }),
  revoked_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
}, { title: 'TokenInfo' });

const TokenParams = Type.Object({ id: Type.String({ pattern: '^[0-9a-f]{16}$', 'x-rule': 'a token id: 16 hexadecimal digits', description: 'Token id (the part after asgd_)' }) });

const access = { scope: 'admin', allSessions: true } as const;

const tokenRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.post('/', {
    config: access,
    schema: {
      operationId: 'createToken',
      summary: 'Create an API token',
      description: 'Answers the token once, as `asgd_<id>_<secret>`; only its sha256 is stored. A token limited to a list of sessions can only touch those (and cannot create sessions).',
      tags: ['tokens'],
      body: Type.Object({
        name: Type.String({ minLength: 1, maxLength: 128, pattern: '^[^\\u0000-\\u001f\\u007f]+$', 'x-rule': 'text without control characters', description: 'What the token is for' }),
        scope: ScopeSchema,
        sessions: Type.Optional(Type.Union([Type.Array(SessionName, { minItems: 1, maxItems: 1000, uniqueItems: true }), Type.Null()])),
      }, { additionalProperties: false, examples: [{ name: 'trainer-7', scope: 'step', sessions: ['mnist-run-1'] }] }),
      response: {
        201: Type.Object({ ...TokenInfo.properties, token: Type.String({ description: 'The secret: shown only in this answer' }) }),
        ...errorResponses(400, 401, 403, 413, 415),
      },
    },
  }, async (request, reply) => {
    const { body } = request;
    const { row, token } = await fastify.tokens.create({ name: body.name, scope: body.scope, sessions: body.sessions ?? null });
    request.log.info({ tokenId: row.id, scope: row.scope }, 'token created');
    reply.header('cache-control', 'no-store');
    return reply.status(201).send({ ...tokenJson(row), token });
  });

  fastify.get('/', {
    config: access,
    schema: {
      operationId: 'listTokens',
      summary: 'List API tokens (never their secrets)',
      tags: ['tokens'],
      response: { 200: Type.Object({ tokens: Type.Array(TokenInfo) }), ...errorResponses(401, 403) },
    },
  }, async () => ({ tokens: (await fastify.tokens.list()).map(tokenJson) }));

  // What the presented token may do, so that a client (the dashboard) can offer only that. Any token may
  // ask about itself; with auth off the answer is the anonymous admin every request runs as.
  fastify.get('/self', {
    config: { scope: 'read', allSessions: false },
    schema: {
      operationId: 'getOwnToken',
      summary: 'The token of this request: its scope and session list',
      tags: ['tokens'],
      response: {
        200: Type.Object({
          id: Type.String({ description: '"admin" for ASGD_ADMIN_TOKEN, "anonymous" when auth is off' }),
          name: Type.String(),
          scope: ScopeSchema,
          sessions: Type.Union([Type.Array(Type.String()), Type.Null()], { description: 'null: every session' }),
          auth: Type.Boolean({ description: 'false when the service runs without auth (no ASGD_ADMIN_TOKEN)' }),
        }),
        ...errorResponses(401),
      },
    },
  }, async (request) => {
    const who = request.auth ?? { tokenId: 'anonymous', name: 'anonymous', scope: 'admin' as const, sessions: null };
    return { id: who.tokenId, name: who.name, scope: who.scope, sessions: who.sessions, auth: fastify.authEnabled };
  });

  fastify.delete('/:id', {
    config: access,
    schema: {
      operationId: 'revokeToken',
      summary: 'Revoke an API token',
      description: 'The token stops working at once on every replica (each request checks the database). Revoking twice is not an error.',
      tags: ['tokens'],
      params: TokenParams,
      response: { 204: Type.Null({ description: 'Revoked' }), ...errorResponses(400, 401, 403, 404) },
    },
  }, async (request, reply) => {
    const { id } = request.params;
    const row = await fastify.tokens.revoke(id);
    if (!row) throw errors.tokenNotFound(id);
    request.log.info({ tokenId: id }, 'token revoked');
    return reply.status(204).send(null);
  });
};

export default tokenRoutes;
