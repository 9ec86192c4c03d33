// Prometheus metrics as a named plugin: one prom-client Registry per app instance (tests build many apps
// in one process), fed by request hooks and by the session domain's hooks; served at GET /metrics.
import { statfsSync } from 'node:fs';
import { Transform } from 'node:stream';
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Config } from '../config.ts';
import { errorResponses } from '../routes/schemas.ts';
import { bodyStage } from './content-types.ts';

/** The route of the event streams, whose requests last as long as their client follows them. */
const EVENTS_ROUTE = '/v1/sessions/:name/events';

/**
 * Connections the server cut after writing an answer of its own past Fastify (a 408 of a body that did not
 * arrive in time, a 400 of bytes that are no HTTP: app.ts's clientErrorHandler), with its status: the
 * request of such a connection is counted with that status, not as closed by its client (499; a review).
 */
const cutWith = new WeakMap<object, number>();

export function noteCut(socket: object, status: number): void {
  cutWith.set(socket, status);
}

/** Sessions with series of their own in the per-session counters (steps, rounds); the rest are counted together. */
const SESSION_SERIES = 100;
/** The session label of the sessions beyond SESSION_SERIES (parentheses: no session name has them). */
const OTHER_SESSIONS = '(other)';

declare module 'fastify' {
  interface FastifyInstance {
    metrics: Registry;
  }
}

const SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export default fp(
  async function metricsPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const registry = new Registry();
    const registers = [registry];
    collectDefaultMetrics({ register: registry });

    const requests = new Counter({
      name: 'asgd_http_requests_total', help: 'HTTP requests answered, by route pattern and status', labelNames: ['method', 'route', 'status_code'], registers,
    });
    const duration = new Histogram({
      name: 'asgd_http_request_duration_seconds', help: 'Time from request to response, by route pattern', labelNames: ['method', 'route'], buckets: SECONDS_BUCKETS, registers,
    });
    const bytesIn = new Counter({ name: 'asgd_http_request_bytes_total', help: 'Request body bytes received, by route pattern', labelNames: ['route'], registers });
    const bytesOut = new Counter({ name: 'asgd_http_response_bytes_total', help: 'Response body bytes sent, by route pattern', labelNames: ['route'], registers });
    const stepSeconds = new Histogram({
      name: 'asgd_step_duration_seconds', help: 'Time to apply and commit one optimizer step, from taking the session lock', buckets: SECONDS_BUCKETS, registers,
    });
    const lockWait = new Histogram({
      name: 'asgd_step_lock_wait_seconds', help: 'Time a step waited for its session lock in this process', buckets: SECONDS_BUCKETS, registers,
    });
    const batchSize = new Histogram({
      name: 'asgd_step_batch_size', help: 'Steps committed together by one statement (group commit)', buckets: [1, 2, 4, 8, 16, 32, 64], registers,
    });
    // Connections past ASGD_MAX_CONNECTIONS are closed by Node as they come ('drop'): counted, and said in
    // the log at most every 10 s, since the replica then answers nothing to them, probes included.
    const dropped = new Counter({ name: 'asgd_connections_dropped_total', help: 'Connections closed as they came because this process held ASGD_MAX_CONNECTIONS', registers });
    let droppedSinceLine = 0;
    let lastDropLine = 0;
    fastify.server.on('drop', () => {
      dropped.inc();
      droppedSinceLine++;
      if (Date.now() - lastDropLine >= 10_000) {
        fastify.log.warn({ dropped: droppedSinceLine, maxConnections: opts.config.maxConnections }, 'connections refused: this process holds ASGD_MAX_CONNECTIONS connections');
        lastDropLine = Date.now();
        droppedSinceLine = 0;
      }
    });
    new Gauge({
      name: 'asgd_open_connections', help: 'HTTP connections this process holds open (keep-alive, event streams, requests being read)', registers,
      collect() {
        return new Promise<void>((resolve) => fastify.server.getConnections((err, count) => { if (!err) this.set(count); resolve(); }));
      },
    });
    const steps = new Counter({ name: 'asgd_steps_total', help: 'Optimizer steps committed by this process, by session (the first 100; the others as session="(other)")', labelNames: ['session'], registers });
    const snapshots = new Counter({
      // By reason only: a series per session and reason made thousands of series (3,021 of 3,827 lines after
      // 3,500 creates); a session's snapshots are listed by GET .../snapshots.
      name: 'asgd_snapshots_total', help: 'Snapshots written by this process, by reason', labelNames: ['reason'], registers,
    });
    const replayPoints = new Counter({ name: 'asgd_replay_points_total', help: 'Replay points (unlogged states that bound a takeover\'s replay) written by this process', registers });
    const replayedSteps = new Counter({
      name: 'asgd_replayed_steps_total', help: 'Logged steps this process replayed to bring a state to a version (a copy catching up, a takeover, an old version read)', registers,
    });
    const roundsCompleted = new Counter({ name: 'asgd_rounds_completed_total', help: 'Rounds (sessions with aggregation) this process stepped, by session', labelNames: ['session'], registers });
    const roundsTimedOut = new Counter({
      name: 'asgd_rounds_timed_out_total', help: 'Rounds this process stepped at their timeout with fewer than aggregation.contributions, by session', labelNames: ['session'], registers,
    });
    const roundContributions = new Histogram({
      name: 'asgd_round_contributions', help: 'Contributions a round\'s step combined', buckets: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024], registers,
    });
    const roundWait = new Histogram({
      name: 'asgd_round_wait_seconds', help: 'Time from a round\'s first contribution to its step (the database\'s clock)', buckets: [...SECONDS_BUCKETS, 120, 300, 600, 1800, 3600], registers,
    });
    new Gauge({
      name: 'asgd_db_pool_connections', help: 'Database pool connections by state (total, idle, waiting clients)', labelNames: ['state'], registers,
      collect() {
        const stats = fastify.db.poolStats();
        this.set({ state: 'total' }, stats.total);
        this.set({ state: 'idle' }, stats.idle);
        this.set({ state: 'waiting' }, stats.waiting);
      },
    });
    if (fastify.databaseHealth) {
      const health = fastify.databaseHealth;
      new Gauge({
        name: 'asgd_database_up', help: 'Whether the last database probe (every ASGD_HEALTH_CHECK_INTERVAL_MS) found it reachable and migrated (1) or not (0)', registers,
        collect() { this.set(health.up ? 1 : 0); },
      });
    }
    if (!opts.config.databaseUrl && opts.config.dataDir !== 'memory://') {
      // What the embedded database's disk guard sees (an operator's review: nothing told a low disk coming).
      const dir = opts.config.dataDir;
      new Gauge({
        name: 'asgd_data_dir_free_bytes', help: 'Embedded database: bytes free on the disk holding ASGD_DATA_DIR; writes are refused (507) below ASGD_MIN_FREE_BYTES and what they write', registers,
        collect() {
          try {
            const fs = statfsSync(dir);
            this.set(fs.bavail * fs.bsize);
          } catch {
            this.set(NaN); // not knowable now (the directory gone): not the last figure, nor 0 (a review)
          }
        },
      });
      new Gauge({ name: 'asgd_data_dir_min_free_bytes', help: 'ASGD_MIN_FREE_BYTES: the free space below which the embedded database refuses writes', registers }).set(opts.config.minFreeBytes);
    }
    new Gauge({
      name: 'asgd_http_request_body_in_flight_bytes', help: 'Request body bytes this process holds (bodies of 1 MiB or more, received or not answered yet): bounded by ASGD_BODY_IN_FLIGHT_BYTES', registers,
      collect() {
        this.set(fastify.bodiesInFlight().bodies);
      },
    });
    new Gauge({
      name: 'asgd_http_json_in_flight_bytes', help: 'JSON body bytes this process parses and holds (bodies of 1 MiB or more): bounded by ASGD_JSON_IN_FLIGHT_BYTES', registers,
      collect() {
        this.set(fastify.bodiesInFlight().json);
      },
    });
    new Gauge({
      name: 'asgd_session_cache_bytes', help: 'Bytes of decoded session state held by this process', registers,
      collect() {
        this.set(fastify.sessions.cacheStats().bytes);
      },
    });
    new Gauge({
      name: 'asgd_session_cache_sessions', help: 'Sessions whose decoded state this process holds', registers,
      collect() {
        this.set(fastify.sessions.cacheStats().sessions);
      },
    });

    // Series by session for the first SESSION_SERIES sessions this process counts; the others count under
    // session="(other)" (a name a session cannot have): thousands of sessions made thousands of series per
    // replica. A deleted session frees its place.
    const named = new Set<string>();
    const labelOf = (session: string) => {
      if (named.has(session)) return session;
      if (named.size >= SESSION_SERIES) return OTHER_SESSIONS;
      named.add(session);
      return session;
    };
    fastify.sessionHooks.stepped = (session, seconds, lockWaitSeconds) => {
      stepSeconds.observe(seconds);
      lockWait.observe(lockWaitSeconds);
      steps.inc({ session: labelOf(session) });
    };
    fastify.sessionHooks.committed = (_session, count) => batchSize.observe(count);
    fastify.roundHooks.closed = (session, contributions, waitSeconds, timedOut) => {
      roundsCompleted.inc({ session: labelOf(session) });
      if (timedOut) roundsTimedOut.inc({ session: labelOf(session) });
      roundContributions.observe(contributions);
      roundWait.observe(waitSeconds);
    };
    fastify.sessionHooks.replayPointWritten = () => replayPoints.inc();
    fastify.sessionHooks.replayed = (_session, count) => replayedSteps.inc(count);
    fastify.sessionHooks.snapshotted = (_session, reason) => snapshots.inc({ reason });
    // A deleted session's series go with it, so counters of short-lived sessions do not pile up: whoever
    // deleted it (DELETE on any replica, the CLI through it, the idle sweeper), every process hears it.
    const forget = (session: string) => {
      if (!named.delete(session)) return;
      steps.remove({ session });
      roundsCompleted.remove({ session });
      roundsTimedOut.remove({ session });
    };
    const stopListening = fastify.versions.onDeleted(forget);
    fastify.addHook('onClose', async () => { stopListening(); });

    const routeOf = (request: FastifyRequest) => (request.is404 ? 'unmatched' : (request.routeOptions.url ?? 'unmatched'));
    // A waiting read (after_version + wait) lasts as long as it waits: timed apart, or every long poll would
    // look like a slow params read to a latency alert.
    // An event stream lasts as long as its client follows it (minutes, hours): timed apart too.
    const timedAs = (request: FastifyRequest, route: string) => {
      const query = request.query as { after_version?: unknown; wait?: unknown } | undefined;
      if (query?.after_version !== undefined && Number(query?.wait ?? 0) > 0) return `${route} (waiting)`;
      return route === EVENTS_ROUTE ? `${route} (stream)` : route;
    };
    const received = new WeakMap<FastifyRequest, number>();
    /** Requests counted at their response's end (onResponse, at 'finish'): not again when their connection closes. */
    const answered = new WeakSet<FastifyRequest>();

    const declaredLength = (request: FastifyRequest) => (request.headers['transfer-encoding'] === undefined ? Number(request.headers['content-length']) : NaN);
    // A declared body counted at once: a request that no route matches is answered before the body hooks
    // run (errors.ts), its body dropped unread by Node, and its bytes still came in.
    fastify.addHook('onRequest', async (request, reply) => {
      const declared = declaredLength(request);
      if (Number.isFinite(declared)) received.set(request, declared);
      // A response the client closed before it ended (an event stream it stopped, a long poll it gave up on,
      // an upload it abandoned) never reaches onResponse: counted when its connection closes, with the status
      // it had begun to send (an event stream's 200), or 499 (nginx's "client closed request") when none was
      // sent. Event streams end that way as a rule: none were counted (an operator's review).
      reply.raw.once('close', () => {
        if (answered.has(request) || reply.raw.writableFinished) return;
        const route = routeOf(request);
        const cut = cutWith.get(request.raw.socket);
        requests.inc({ method: request.method, route, status_code: String(cut ?? (reply.raw.headersSent ? reply.raw.statusCode : 499)) });
        duration.observe({ method: request.method, route: timedAs(request, route) }, reply.elapsedTime / 1000);
      });
    });
    fastify.addHook('preParsing', async (request, _reply, payload) => {
      if (Number.isFinite(declaredLength(request))) return payload;
      // A chunked body: count the bytes as they pass (an error before, a refusal of the disk guard or a
      // hung-up client, goes on to the body's parser).
      received.set(request, 0);
      return bodyStage(payload, {
        transform(chunk: Buffer, _encoding, done) {
          received.set(request, (received.get(request) ?? 0) + chunk.length);
          done(null, chunk);
        },
      });
    });

    fastify.addHook('onSend', async (request, _reply, payload) => {
      const route = routeOf(request);
      if (typeof payload === 'string') bytesOut.inc({ route }, Buffer.byteLength(payload));
      else if (Buffer.isBuffer(payload)) bytesOut.inc({ route }, payload.length);
      else if (payload && typeof (payload as NodeJS.ReadableStream).pipe === 'function') {
        const counter = new Transform({
          transform(chunk: Buffer, _encoding, done) {
            bytesOut.inc({ route }, chunk.length);
            done(null, chunk);
          },
        });
        (payload as NodeJS.ReadableStream).on('error', (err) => counter.destroy(err));
        return (payload as NodeJS.ReadableStream).pipe(counter);
      }
      return payload;
    });

    fastify.addHook('onResponse', async (request, reply) => {
      answered.add(request);
      const route = routeOf(request);
      const bytes = received.get(request);
      if (bytes) bytesIn.inc({ route }, bytes);
      requests.inc({ method: request.method, route, status_code: String(reply.statusCode) });
      duration.observe({ method: request.method, route: timedAs(request, route) }, reply.elapsedTime / 1000);
      // Deleted here: gone from this process's series at once (the announcement follows).
      if (request.method === 'DELETE' && reply.statusCode === 204 && route === '/v1/sessions/:name') forget((request.params as { name: string }).name);
    });

    fastify.decorate('metrics', registry);
    if (opts.config.metricsRequireToken && !opts.config.adminToken) {
      fastify.log.warn('ASGD_METRICS_REQUIRE_TOKEN=true has no effect without ASGD_ADMIN_TOKEN (no tokens): /metrics is open');
    }

    fastify.get('/metrics', {
      config: opts.config.metricsRequireToken ? { scope: 'read', allSessions: true } : { scope: 'public' },
      schema: {
        operationId: 'metrics',
        summary: 'Prometheus metrics',
        description: 'Open unless ASGD_METRICS_REQUIRE_TOKEN=true with auth on (then a read token not limited to sessions, as the counters name sessions: 401 UNAUTHORIZED without one, 403 FORBIDDEN for a token limited to sessions).',
        tags: ['operations'],
        response: {
          200: { description: 'Prometheus text exposition format 0.0.4', content: { 'text/plain': { schema: { type: 'string' } } } },
          // 401/403 with ASGD_METRICS_REQUIRE_TOKEN; 403 HOST_NOT_ALLOWED with auth off (found by a review);
          // 429 for an address over ASGD_RATE_LIMIT_PER_MINUTE with failed tokens (a review).
          ...errorResponses(401, 403, 429),
        },
      },
    }, async (_request, reply) => {
      reply.header('content-type', registry.contentType);
      // prom-client writes NaN as "Nan"; the exposition format (and strict OpenMetrics parsers) say "NaN"
      // (Prometheus's own parser takes either). A sample's value ends its line: no label value is touched.
      return (await registry.metrics()).replace(/ Nan$/gm, ' NaN');
    });
  },
  { name: 'metrics', dependencies: ['db', 'sessions', 'rounds', 'notifier', 'limits'] },
);
