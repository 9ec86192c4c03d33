// Liveness and readiness for orchestrators and load balancers. Both are open (no token).
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { NotMigratedError } from '../../db/database.ts';
import { errors } from '../../errors.ts';
import { errorResponses } from '../schemas.ts';
import { refusalMessage } from '../../db/errors.ts';

const READY_TIMEOUT_MS = 2_000;

const healthRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.get('/healthz', {
    config: { scope: 'public' },
    schema: {
      operationId: 'liveness',
      summary: 'Liveness: the process is up',
      description: 'Answers without touching the database, so a database outage does not get replicas restarted.',
      tags: ['operations'],
      // 403 HOST_NOT_ALLOWED: with auth off, a Host that is not a loopback name (every route; found by a review).
      response: { 200: Type.Object({ status: Type.Literal('ok') }), ...errorResponses(403) },
    },
  }, async () => ({ status: 'ok' as const }));

  fastify.get('/readyz', {
    config: { scope: 'public' },
    schema: {
      operationId: 'readiness',
      summary: 'Readiness: the database is reachable and migrated',
      description: '503 while the database is unreachable, its migrations are not applied, or the process is shutting down.',
      tags: ['operations'],
      response: { 200: Type.Object({ status: Type.Literal('ready') }), ...errorResponses(403, 503) },
    },
  }, async (request) => {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        fastify.db.ready(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer within ${READY_TIMEOUT_MS} ms`)), READY_TIMEOUT_MS);
        }),
      ]);
    } catch (err) {
      request.log.warn({ err }, 'not ready');
      throw errors.unavailable(err instanceof NotMigratedError ? err.message : refusalMessage(err) ?? 'the database is not ready', 5);
    } finally {
      clearTimeout(timer);
    }
    return { status: 'ready' as const };
  });
};

export default healthRoutes;
