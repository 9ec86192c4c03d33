// CORS as a named plugin, for browser pages on other origins that call the API (the TypeScript client in a
// browser). Off unless ASGD_CORS_ORIGINS lists origins (or is *). Requests authenticate with a bearer
// token, never a cookie, so no credentials mode is needed and `*` is safe to answer as it is: with auth on
// (config.ts refuses * without it, and auth.ts refuses other origins' writes while auth is off).
//
// Preflights (OPTIONS with Access-Control-Request-Method) from an allowed origin are answered here, before
// load shedding and auth: a browser sends them without the Authorization header. Every other answer to an
// allowed origin, errors and event streams included, carries the origin and the headers a client reads.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import type { Config } from '../config.ts';
import { errors } from '../errors.ts';

export const CORS_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'];
/** What clients send beyond the safelisted headers. */
export const CORS_ALLOWED_HEADERS = ['Authorization', 'Content-Type', 'Accept', 'If-Match', 'If-None-Match', 'Idempotency-Key', 'X-Request-Id', 'Last-Event-ID'];
/** What clients read beyond the safelisted headers (versions, retries, ids, downloads). */
export const CORS_EXPOSED_HEADERS = ['ETag', 'X-Session-Version', 'X-Session-Step', 'X-Request-Id', 'Retry-After', 'Location', 'WWW-Authenticate', 'Content-Disposition'];
/** How long a browser may reuse a preflight's answer, in seconds. */
const PREFLIGHT_MAX_AGE_S = 600;

export default fp(
  async function corsPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const origins = opts.config.corsOrigins;
    if (origins === null) return;
    const anyOrigin = origins === '*';
    const allowed = new Set(anyOrigin ? [] : origins);

    fastify.addHook('onRequest', async (request, reply) => {
      // Set on the raw response, so that answers written directly (event streams) carry them too.
      const res = reply.raw;
      // With a list, the answer depends on the Origin header: caches must key on it.
      if (!anyOrigin) res.setHeader('vary', 'Origin');
      const origin = request.headers.origin;
      if (origin === undefined) return;
      if (!anyOrigin && !allowed.has(origin)) {
        // A preflight from another origin: refused by name (it was a 405, which read as a routing problem).
        if (request.method === 'OPTIONS' && request.headers['access-control-request-method'] !== undefined) {
          throw errors.originNotAllowed(origin);
        }
        return;
      }
      res.setHeader('access-control-allow-origin', anyOrigin ? '*' : origin);
      if (request.method !== 'OPTIONS' || request.headers['access-control-request-method'] === undefined) {
        res.setHeader('access-control-expose-headers', CORS_EXPOSED_HEADERS.join(', '));
        return;
      }
      return reply.code(204).headers({
        'access-control-allow-methods': CORS_METHODS.join(', '),
        'access-control-allow-headers': CORS_ALLOWED_HEADERS.join(', '),
        'access-control-max-age': String(PREFLIGHT_MAX_AGE_S),
      }).send();
    });

    // A route that sets its own Vary (content negotiation) keeps Origin in it.
    if (!anyOrigin) {
      fastify.addHook('onSend', async (_request, reply, payload) => {
        const vary = reply.getHeader('vary');
        if (typeof vary === 'string' && !/(^|,)\s*origin\s*(,|$)/i.test(vary)) reply.header('vary', `${vary}, Origin`);
        return payload;
      });
    }
  },
  { name: 'cors' },
);
