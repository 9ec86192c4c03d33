// Load limits as a named plugin: shed load with 503 under pressure (event loop, heap, RSS, database
// unreachable) and, when configured, limit each token (or client address) to N requests a minute.
// Body size limits are per route (config.bodyLimit*); request timeouts are the HTTP server's (buildApp).
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import underPressure from '@fastify/under-pressure';
import rateLimit from '@fastify/rate-limit';
import type { Config } from '../config.ts';
import { errors } from '../errors.ts';

const PRESSURE_RETRY_AFTER_SECONDS = 5;
/** Still answered under pressure: liveness (the process is up) and the metrics that show the pressure. */
const EXEMPT_FROM_PRESSURE = new Set(['/healthz', '/metrics']);

export default fp(
  async function limitsPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const { config } = opts;
    await fastify.register(underPressure, {
      maxEventLoopDelay: config.maxEventLoopDelayMs,
      maxHeapUsedBytes: config.maxHeapUsedBytes,
      maxRssBytes: config.maxRssBytes,
      ...(config.healthCheckIntervalMs > 0 && {
        healthCheck: async () => {
          await fastify.db.ready();
          return true;
        },
        healthCheckInterval: config.healthCheckIntervalMs,
      }),
      pressureHandler: (request: FastifyRequest, _reply: unknown, type: string) => {
        if (request.routeOptions.url && EXEMPT_FROM_PRESSURE.has(request.routeOptions.url)) return undefined;
        const why = type === 'healthCheck' ? 'the database is unreachable' : `the server is overloaded (${type})`;
        return Promise.reject(errors.unavailable(`${why}; retry shortly`, PRESSURE_RETRY_AFTER_SECONDS));
      },
    });

    if (config.rateLimitPerMinute) {
      const max = config.rateLimitPerMinute;
      // Its hooks are route-level, so they run after the auth plugin's instance-level onRequest: the key is the token.
      await fastify.register(rateLimit, {
        global: true,
        max,
        timeWindow: 60_000,
        keyGenerator: (request: FastifyRequest) =>
          request.auth && request.auth.tokenId !== 'anonymous' ? `token:${request.auth.tokenId}` : `ip:${request.ip}`,
        allowList: (request: FastifyRequest) => request.routeOptions.config.scope === 'public',
        errorResponseBuilder: (_request: FastifyRequest, context: { ttl: number }) => errors.rateLimited(max, Math.max(1, Math.ceil(context.ttl / 1000))),
      });
    }
  },
  { name: 'limits', dependencies: ['db'] },
);
