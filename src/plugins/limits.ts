// Load limits as a named plugin: shed load with 503 under pressure (event loop, heap, RSS, database
// unreachable) and, when configured, limit each token (or client address) to N requests a minute.
// Body size limits are per route (config.bodyLimit*); request timeouts are the HTTP server's (buildApp).
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import underPressure from '@fastify/under-pressure';
import rateLimit from '@fastify/rate-limit';
import type { Config } from '../config.ts';
import { NotMigratedError } from '../db/database.ts';
import { describeDbFailure, refusalMessage, refusedBy } from '../db/errors.ts';
import { errors } from '../errors.ts';

const PRESSURE_RETRY_AFTER_SECONDS = 5;
/** Still answered under pressure: liveness (the process is up) and the metrics that show the pressure. */
const EXEMPT_FROM_PRESSURE = new Set(['/healthz', '/metrics']);
/** Pages that never read the database: still served while it is down (the links, the API docs, the dashboard's files). */
const needsNoDatabase = (url: string) => url === '/' || url === '/docs' || url.startsWith('/docs/') || url === '/ui' || url.startsWith('/ui/');

declare module 'fastify' {
  interface FastifyInstance {
    /** The periodic database probe's last outcome (null: probes are off, ASGD_HEALTH_CHECK_INTERVAL_MS=0). */
    databaseHealth: DatabaseHealth | null;
  }
}

export interface DatabaseHealth {
  up: boolean;
  /**
   * Why the last probe failed: the database unreachable, reachable but not migrated, or refusing this
   * service's queries (a permission, a missing schema: a PostgreSQL error that is no connection trouble).
   */
  problem: 'unreachable' | 'not-migrated' | 'refused' | null;
  /** What a 503 answer says of a refusal (refusalMessage). */
  refusal?: string;
}

/** How often a database found down is asked again (when the periodic check is less frequent). */
const RECHECK_MS = 500;

export default fp(
  async function limitsPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const { config } = opts;
    const probing = config.healthCheckIntervalMs > 0;
    const health: DatabaseHealth = { up: true, problem: null };
    fastify.decorate('databaseHealth', probing ? health : null);
    /** One probe: logged when the outcome changes (once, not at every interval), never thrown. */
    let started = 0;
    let settled = 0;
    const probe = async (): Promise<boolean> => {
      // The periodic probe and the recheck below can overlap: a slow failing probe that ends after a newer
      // one succeeded does not undo it (found by a review).
      const seq = ++started;
      let problem: DatabaseHealth['problem'] = null;
      let error: unknown = null;
      try {
        await fastify.db.ready();
      } catch (err) {
        problem = err instanceof NotMigratedError ? 'not-migrated' : refusedBy(err) !== null ? 'refused' : 'unreachable';
        error = err;
      }
      if (seq < settled) return health.up;
      settled = seq;
      if (problem !== health.problem) {
        if (problem) {
          fastify.log.error({ err: error, problem }, problem === 'not-migrated' ? 'database not migrated: answering 503 until it is'
            : problem === 'refused' ? `database refuses this service's queries: ${describeDbFailure(error)}; answering 503 until it does not`
            : 'database unreachable: answering 503 until it answers');
        }
        // Said as what changed: a database that was only not migrated was reachable all along (found by a review).
        else fastify.log.info(health.problem === 'not-migrated' ? 'database migrated: serving again'
          : health.problem === 'refused' ? 'database takes this service\'s queries again: serving again' : 'database reachable again');
      }
      Object.assign(health, { up: problem === null, problem, refusal: problem === 'refused' ? refusalMessage(error)! : undefined });
      if (problem !== null) recheckSoon();
      return problem === null;
    };
    // While the database is down, it is asked again every RECHECK_MS: the API serves again as soon as it
    // answers, not at the next periodic check (up to ASGD_HEALTH_CHECK_INTERVAL_MS later; found by an
    // operator's review). under-pressure keeps its own flag until that check: pressureHandler lets requests
    // through once this probe has seen the database answer.
    let recheck: NodeJS.Timeout | null = null;
    let closed = false;
    function recheckSoon(): void {
      if (recheck || closed || RECHECK_MS >= config.healthCheckIntervalMs) return;
      recheck = setTimeout(() => {
        void probe().finally(() => {
          recheck = null;
          if (!health.up) recheckSoon();
        });
      }, RECHECK_MS);
      recheck.unref();
    }
    fastify.addHook('onClose', async () => {
      closed = true;
      if (recheck) clearTimeout(recheck);
    });
    // RSS over ASGD_MAX_RSS_BYTES while the memory the process holds (V8's heap in use, buffers) is under
    // half of it: the rest is memory freed and kept by the allocator, which new requests reuse before the
    // process asks the system for more. Refusing then would last for good: with every request refused,
    // nothing runs that could give it back (found by a review: after a burst of uploads, RSS stayed at
    // 3.8 GB with 33 MB of heap and every request, /readyz too, was 503 for as long as it was watched).
    let liveAt = 0;
    let live = 0;
    const mostlyCached = (): boolean => {
      const now = Date.now();
      if (now - liveAt >= 250) {
        const usage = process.memoryUsage();
        live = usage.heapUsed + usage.external;
        liveAt = now;
      }
      return live < config.maxRssBytes / 2;
    };
    await fastify.register(underPressure, {
      maxEventLoopDelay: config.maxEventLoopDelayMs,
      maxHeapUsedBytes: config.maxHeapUsedBytes,
      maxRssBytes: config.maxRssBytes,
      ...(probing && { healthCheck: probe, healthCheckInterval: config.healthCheckIntervalMs }),
      pressureHandler: (request: FastifyRequest, _reply: unknown, type: string) => {
        const url = request.routeOptions.url ?? '';
        if (EXEMPT_FROM_PRESSURE.has(url)) return undefined;
        if (type === 'rssBytes' && mostlyCached()) return undefined;
        if (type === 'healthCheck' && (needsNoDatabase(url) || health.up)) return undefined;
        const why = type !== 'healthCheck' ? `the server is overloaded (${type}); retry shortly`
          : health.problem === 'not-migrated' ? (config.databaseUrl
            ? 'the database is not migrated: run `asgd-serve migrate` (or start with ASGD_MIGRATE=true)'
            // One process holds an embedded database's directory: migrate cannot run beside this server.
            : 'the embedded database is not migrated: stop this server and run `asgd-serve migrate` on its ASGD_DATA_DIR, or start it with ASGD_MIGRATE=true')
          : health.problem === 'refused' ? health.refusal!
          : 'the database is unreachable; retry shortly';
        return Promise.reject(errors.unavailable(why, PRESSURE_RETRY_AFTER_SECONDS));
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
