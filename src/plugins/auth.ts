// Bearer-token access control as a named plugin.
//
// Every route carries its required scope in its route config (`config: { scope, allSessions }`). Routes
// that do not set one get it from `accessFor` below when they are added, so a new route is never open
// by accident: GET is read, POST .../step is step, everything else under /v1 is admin, and any path this
// table does not know needs an unrestricted admin token.
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Config } from '../config.ts';
import { errors } from '../errors.ts';
import { createTokenStore, SCOPE_RANK, sameHash, sha256, type Principal, type Scope, type TokenStore } from '../auth/tokens.ts';

export type RouteScope = 'public' | Scope;

export interface RouteAccess {
  scope: RouteScope;
  /** The route creates sessions or manages tokens: a token limited to some sessions may not use it. */
  allSessions: boolean;
}

export interface RouteAccessEntry extends RouteAccess {
  method: string;
  url: string;
}

declare module 'fastify' {
  interface FastifyContextConfig {
    scope?: RouteScope;
    allSessions?: boolean;
  }
  interface FastifyRequest {
    /** The checked token of this request; null on public routes. */
    auth: Principal | null;
  }
  interface FastifyInstance {
    tokens: TokenStore;
    /** Every route with the access it requires (the auth tests walk it). */
    routeAccess: RouteAccessEntry[];
    authEnabled: boolean;
  }
}

const PUBLIC: RouteAccess = { scope: 'public', allSessions: false };
const ROUTE_SCOPES: readonly RouteScope[] = ['public', 'read', 'step', 'admin'];
const rank = (a: RouteAccess) => (a.scope === 'public' ? 0 : SCOPE_RANK[a.scope]) * 2 + (a.allSessions ? 1 : 0);

/** The access a route needs when its config does not say. */
export function accessFor(method: string, url: string): RouteAccess {
  const path = url.length > 1 ? url.replace(/\/+$/, '') : url;
  if (path === '/healthz' || path === '/readyz' || path === '/docs' || path.startsWith('/docs/') || path === '/ui' || path.startsWith('/ui/')) return PUBLIC;
  if (path === '/v1/tokens' || path.startsWith('/v1/tokens/')) return { scope: 'admin', allSessions: true };
  if (path === '/v1/sessions' || path.startsWith('/v1/sessions/')) {
    if (method === 'GET' || method === 'HEAD') return { scope: 'read', allSessions: false };
    if (method === 'POST' && (path === '/v1/sessions' || path === '/v1/sessions/:name/fork')) return { scope: 'admin', allSessions: true };
    if (method === 'POST' && path === '/v1/sessions/:name/step') return { scope: 'step', allSessions: false };
    return { scope: 'admin', allSessions: false };
  }
  return { scope: 'admin', allSessions: true };
}

const BEARER = /^Bearer +([\x21-\x7e]{1,512}) *$/i;

export default fp(
  async function authPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const store = createTokenStore(fastify.db);
    const adminHash = opts.config.adminToken ? sha256(opts.config.adminToken) : null;
    const table: RouteAccessEntry[] = [];
    fastify.decorate('tokens', store);
    fastify.decorate('routeAccess', table);
    fastify.decorate('authEnabled', adminHash !== null);
    fastify.decorateRequest('auth', null);

    fastify.addHook('onRoute', (route) => {
      const explicit = route.config?.scope;
      let access: RouteAccess;
      if (explicit !== undefined) {
        if (!ROUTE_SCOPES.includes(explicit)) throw new Error(`route ${route.url}: config.scope must be one of ${ROUTE_SCOPES.join(', ')}`);
        access = { scope: explicit, allSessions: route.config?.allSessions ?? false };
      } else {
        // A route for several methods needs what its strictest method needs.
        access = [route.method].flat().map((m) => accessFor(m, route.url)).reduce((a, b) => (rank(b) > rank(a) ? b : a));
      }
      route.config = { ...route.config, scope: access.scope, allSessions: access.allSessions };
      for (const method of [route.method].flat()) table.push({ method, url: route.url, ...access });
    });

    async function authenticate(request: FastifyRequest): Promise<Principal> {
      const header = request.headers.authorization;
      if (header === undefined || header === '') throw errors.unauthorized('Authorization: this route needs a bearer token (Authorization: Bearer <token>)');
      const m = BEARER.exec(header);
      if (!m) throw errors.unauthorized('Authorization: expected "Bearer <token>"', true);
      const presented = m[1];
      if (adminHash && sameHash(sha256(presented), adminHash)) return { tokenId: 'admin', name: 'admin', scope: 'admin', sessions: null };
      const principal = await store.verify(presented);
      if (!principal) throw errors.unauthorized('Authorization: the token is unknown or revoked', true);
      return principal;
    }

    fastify.addHook('onRequest', async (request) => {
      const { scope, allSessions } = request.routeOptions.config;
      if (scope === 'public' || (scope === undefined && request.is404)) return;
      const need: RouteAccess = scope === undefined ? { scope: 'admin', allSessions: true } : { scope, allSessions: allSessions ?? false };
      if (!adminHash) {
        // No admin token configured: auth is off (config.ts then allows loopback only, unless told otherwise).
        request.auth = { tokenId: 'anonymous', name: 'anonymous', scope: 'admin', sessions: null };
        return;
      }
      const principal = await authenticate(request);
      const needed = need.scope as Scope;
      if (SCOPE_RANK[principal.scope] < SCOPE_RANK[needed]) {
        throw errors.forbidden(`this route needs a token with scope ${needed}; this token has scope ${principal.scope}`, needed);
      }
      if (principal.sessions !== null) {
        if (need.allSessions) throw errors.forbidden('this route needs a token that is not limited to a list of sessions', needed);
        const name = (request.params as { name?: unknown } | null)?.name;
        if (typeof name === 'string' && !principal.sessions.includes(name)) {
          throw errors.forbidden(`this token may not touch session ${JSON.stringify(name.slice(0, 200))}`, needed);
        }
      }
      request.auth = principal;
    });
  },
  { name: 'auth', dependencies: ['db'] },
);
