// Bearer-token access control as a named plugin.
//
// Every route declares the access it needs in its own config (`config: ACCESS.read`, src/routes/common.ts):
// there is no table of routes here to forget a new route in. A route that declares nothing stops the app
// at start, naming the route. Routes of plugins we do not write (Swagger UI) get theirs from the context
// that registers them (`withAccess`).
import { isIP } from 'node:net';
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyPluginAsync, FastifyPluginCallback, FastifyPluginOptions, FastifyRequest } from 'fastify';
import { isLoopback, type Config } from '../config.ts';
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
    /** Set by `withAccess` on the context of a plugin whose routes cannot carry a config. */
    pluginRouteAccess?: RouteAccess;
    tokens: TokenStore;
    /** Every route with the access it requires (the auth tests walk it). */
    routeAccess: RouteAccessEntry[];
    authEnabled: boolean;
  }
}

const ROUTE_SCOPES: readonly RouteScope[] = ['public', 'read', 'step', 'admin'];

/**
 * A third-party plugin whose routes cannot carry a config, registered so that all of them need `access`
 * (fastify-plugin would merge it into the parent context: this wrapper is encapsulated on purpose).
 */
export function withAccess<Options extends FastifyPluginOptions>(
  access: RouteAccess, plugin: FastifyPluginAsync<Options> | FastifyPluginCallback<Options>,
): FastifyPluginAsync<Options> {
  return async function scoped(instance, opts) {
    instance.decorate('pluginRouteAccess', access);
    await instance.register(plugin as FastifyPluginAsync<Options>, opts);
  };
}

const BEARER = /^Bearer +([\x21-\x7e]{1,512}) *$/i;

/** Why `principal` may not use a route that needs `need` (with these path parameters): a 403, or null. */
function refusalOf(principal: Principal, need: RouteAccess, params: { name?: unknown } | null): Error | null {
  const needed = need.scope as Scope;
  if (SCOPE_RANK[principal.scope] < SCOPE_RANK[needed]) {
    return errors.forbidden(`Authorization: this route needs a token with scope ${needed}; this token has scope ${principal.scope}`, needed);
  }
  if (principal.sessions !== null) {
    if (need.allSessions) return errors.forbidden('Authorization: this route needs a token that is not limited to a list of sessions', undefined, 'this route needs a token not limited to a list of sessions');
    const name = params?.name;
    if (typeof name === 'string' && !principal.sessions.includes(name)) {
      return errors.forbidden(`Authorization: this token may not touch session ${JSON.stringify(name.slice(0, 200))}`, undefined, 'this token is limited to other sessions');
    }
  }
  return null;
}

/** HTTP authentication schemes (IANA's registry), by lower-case name: only these are named in a 401. */
const KNOWN_SCHEMES = new Map(['Basic', 'Digest', 'DPoP', 'GNAP', 'HOBA', 'Mutual', 'Negotiate', 'NTLM', 'OAuth', 'PrivateToken',
  'SCRAM-SHA-1', 'SCRAM-SHA-256', 'vapid', 'Concealed', 'Token', 'AWS4-HMAC-SHA256'].map((s) => [s.toLowerCase(), s]));

/** The authority (host and port) of an absolute-form request target; '' when it has none (then refused). */
function absoluteAuthority(target: string): string {
  try {
    return new URL(target).host;
  } catch {
    return '';
  }
}

/** The name a Host header addresses, lower case, without its port or a trailing dot ("[::1]" keeps its brackets). */
function hostName(header: string): string {
  const host = header.trim().toLowerCase();
  if (host.startsWith('[')) {
    const end = host.indexOf(']');
    return end < 0 ? host : host.slice(0, end + 1);
  }
  const colon = host.indexOf(':');
  return (colon < 0 ? host : host.slice(0, colon)).replace(/\.$/, '');
}

/** Names only this machine answers: a DNS name of a web page's own cannot be one (RFC 6761 for .localhost). */
const isLoopbackName = (name: string) => isLoopback(name) || name.endsWith('.localhost');

/** An IP address as a Host header carries it (IPv6 in brackets). */
const isAddress = (name: string) => isIP(name.startsWith('[') && name.endsWith(']') ? name.slice(1, -1) : name) !== 0;

export default fp(
  async function authPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const store = createTokenStore(fastify.db);
    // The admin token, and during a rotation the previous one (ASGD_ADMIN_TOKEN_PREVIOUS): either is the admin.
    const adminHashes = [opts.config.adminToken, opts.config.previousAdminToken].filter((t) => t !== null).map((t) => sha256(t));
    const authOn = adminHashes.length > 0;
    // Auth off is safe only because no one but this machine can reach the service: it listens on loopback.
    // A web page can still reach it, through a DNS name of the page's own that it points at 127.0.0.1 once
    // the page has loaded (DNS rebinding): the browser then sends the page's name as Host, and the page reads
    // the answers as its own origin's. So with auth off the API answers only requests addressed to a loopback
    // name (or one listed in ASGD_ALLOWED_HOSTS). A service made to listen beyond loopback without a token
    // (ASGD_ALLOW_INSECURE) is reached by the network's own names, which it cannot know: it also answers any
    // IP address (a request to an address is no page's DNS name), and other names once they are listed (found
    // by a review: a page on that network could rebind a name of its own to the service and read every session).
    const checkHost = !authOn;
    const corsOrigins = new Set(Array.isArray(opts.config.corsOrigins) ? opts.config.corsOrigins : []);
    /**
     * With auth off every request is the admin's, so a page of another origin in a browser on this machine
     * could change sessions with requests a browser sends without asking (a POST without a body: a restore, a
     * snapshot) — cross-site request forgery (a security review: a foreign page rolled a session back). A
     * write that says it comes from another origin (its Origin is not the Host it is sent to, nor one of
     * ASGD_CORS_ORIGINS) is refused; reads, the dashboard (same origin) and clients outside a browser (no
     * Origin) are not concerned.
     */
    const foreignWrite = (request: FastifyRequest): string | null => {
      if (request.method === 'GET' || request.method === 'HEAD' || request.method === 'OPTIONS') return null;
      const origin = request.headers.origin;
      if (origin === undefined || corsOrigins.has(origin)) return null;
      let authority: string;
      try {
        authority = new URL(origin).host;
      } catch {
        return origin; // "null" (a sandboxed frame, a file:// page) or garbage: no origin of this service's
      }
      return authority === (request.headers.host ?? '').toLowerCase() ? null : origin;
    };
    const addressesAllowed = !isLoopback(opts.config.host);
    const allowedHosts = new Set(opts.config.allowedHosts);
    const isAdmin = (presented: string) => {
      const hash = sha256(presented);
      return adminHashes.some((h) => sameHash(hash, h));
    };
    const table: RouteAccessEntry[] = [];
    fastify.decorate('tokens', store);
    fastify.decorate('routeAccess', table);
    fastify.decorate('authEnabled', authOn);
    fastify.decorateRequest('auth', null);

    fastify.addHook('onRoute', function declaredAccess(route) {
      const declared = route.config?.scope;
      const access: RouteAccess | undefined = declared === undefined ? this.pluginRouteAccess : { scope: declared, allSessions: route.config?.allSessions ?? false };
      const label = `${[route.method].flat().join(',')} ${route.url}`;
      if (!access) throw new Error(`route ${label}: declare the access it needs in its config (config: ACCESS.read, …; src/routes/common.ts)`);
      if (!ROUTE_SCOPES.includes(access.scope)) throw new Error(`route ${label}: config.scope must be one of ${ROUTE_SCOPES.join(', ')}`);
      route.config = { ...route.config, scope: access.scope, allSessions: access.allSessions };
      for (const method of [route.method].flat()) table.push({ method, url: route.url, ...access });
    });

    // With ASGD_RATE_LIMIT_PER_MINUTE, requests without a valid token count per client address here: they
    // are refused before the rate limiter (keyed by token) runs, so guessing tokens was unlimited, each
    // guess a database lookup. Beyond the limit in a minute, the address gets 429 without a lookup for the
    // rest of that minute; only the admin token (compared in memory) still passes from it.
    const max = opts.config.rateLimitPerMinute;
    const failures = new Map<string, { count: number; until: number }>();
    const tooManyFailures = (ip: string): void => {
      const now = Date.now();
      const seen = failures.get(ip);
      if (max && seen && now < seen.until && seen.count >= max) throw errors.rateLimited(max, Math.max(1, Math.ceil((seen.until - now) / 1000)));
    };
    const failed = (ip: string): void => {
      if (!max) return;
      const now = Date.now();
      if (failures.size >= 100_000) for (const [key, f] of failures) if (f.until <= now) failures.delete(key);
      const seen = failures.get(ip);
      if (seen && now < seen.until) seen.count += 1;
      else failures.set(ip, { count: 1, until: now + 60_000 });
    };

    let checkRateLimit: ReturnType<FastifyInstance['createRateLimit']> | undefined;

    async function authenticate(request: FastifyRequest): Promise<Principal> {
      const header = request.headers.authorization;
      if (header === undefined || header === '') throw errors.unauthorized('Authorization: this route needs a bearer token (Authorization: Bearer <token>)');
      const m = BEARER.exec(header);
      if (!m) {
        // RFC 6750 section 3: a request in another scheme (Basic, say) has no bearer token to call invalid.
        // The scheme is named only when it is one of HTTP's registered ones: a header that is a bare token
        // ("Authorization: <token>", a common mistake) would otherwise be echoed into the answer and the
        // log as a scheme's name (found by a review: 40 characters of the admin token in the log).
        const scheme = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?: |$)/.exec(header)?.[1];
        if (scheme !== undefined && scheme.toLowerCase() !== 'bearer') {
          const known = KNOWN_SCHEMES.get(scheme.toLowerCase());
          throw errors.unauthorized(known !== undefined ? `Authorization: the ${JSON.stringify(known)} scheme is not accepted; expected "Bearer <token>"`
            : 'Authorization: expected "Bearer <token>" (the header\'s value is not repeated here: it may be a token)');
        }
        throw errors.unauthorized('Authorization: expected "Bearer <token>"', true);
      }
      const presented = m[1];
      if (isAdmin(presented)) return { tokenId: 'admin', name: 'admin', scope: 'admin', sessions: null };
      const principal = await store.verify(presented);
      if (!principal) throw errors.unauthorized('Authorization: the token is unknown or revoked', true);
      return principal;
    }

    fastify.addHook('onRequest', async (request) => {
      // Every route, public ones too (/metrics names the sessions): a page reaching it by rebinding gets nothing.
      if (checkHost && request.headers.host !== undefined) {
        const allowed = (name: string) => isLoopbackName(name) || allowedHosts.has(name) || (addressesAllowed && isAddress(name));
        if (!allowed(hostName(request.headers.host))) throw errors.hostNotAllowed(request.headers.host, addressesAllowed);
        // A request line in absolute form (`GET http://name/path`, as clients send to a proxy) names its host
        // there, and that one is the request's host (RFC 9112 section 3.2.2): checked too (found by a review:
        // served whatever it named, with a loopback Host header).
        const target = request.raw.url ?? '';
        if (target !== '' && target[0] !== '/' && target !== '*') {
          const authority = absoluteAuthority(target);
          if (!allowed(hostName(authority))) throw errors.hostNotAllowed(authority, addressesAllowed);
        }
      }
      const { scope, allSessions } = request.routeOptions.config;
      if (scope === 'public' || (scope === undefined && request.is404)) return;
      const need: RouteAccess = scope === undefined ? { scope: 'admin', allSessions: true } : { scope, allSessions: allSessions ?? false };
      if (!authOn) {
        // No admin token configured: auth is off (config.ts then allows loopback only, unless told otherwise).
        const foreign = foreignWrite(request);
        if (foreign !== null) throw errors.crossOriginWrite(foreign);
        request.auth = { tokenId: 'anonymous', name: 'anonymous', scope: 'admin', sessions: null };
        return;
      }
      const header = request.headers.authorization;
      const admin = typeof header === 'string' && isAdmin(BEARER.exec(header)?.[1] ?? '');
      if (!admin) tooManyFailures(request.ip);
      let principal: Principal;
      try {
        principal = await authenticate(request);
      } catch (err) {
        failed(request.ip);
        throw err;
      }
      // Known from here on, a refusal below included: the request's log line names the token.
      request.auth = principal;
      const refusal = refusalOf(principal, need, request.params as { name?: unknown } | null);
      if (refusal === null) return;
      // A refused request counts toward its token's rate limit, as an allowed one does (the limiter's own
      // hook runs after this one, for the requests let through; found by a review: 80 refusals a minute
      // under a limit of 20, each a token lookup).
      if (max && fastify.hasDecorator('createRateLimit')) {
        checkRateLimit ??= fastify.createRateLimit();
        const limit = await checkRateLimit(request);
        if (!limit.isAllowed && limit.isExceeded) throw errors.rateLimited(max, Math.max(1, Math.ceil(limit.ttl / 1000)));
      }
      throw refusal;
    });
  },
  { name: 'auth', dependencies: ['db'] },
);
