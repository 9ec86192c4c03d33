// The whole service as one Fastify plugin. It never listens: src/server.ts does, tests inject.
import { createRequire } from 'node:module';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import fp from 'fastify-plugin';
import { AjvCompiler } from '@fastify/ajv-compiler';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyServerOptions } from 'fastify';
import type { Config } from './config.ts';
import { errors, quoteValue, type ApiError } from './errors.ts';
import type { Database } from './db/database.ts';
import errorsPlugin, { ERROR_CODE_KEYWORD, errorBody } from './plugins/errors.ts';
import { SESSION_NAME_SOURCE } from './sessions/spec.ts';
import contentTypesPlugin from './plugins/content-types.ts';
import corsPlugin from './plugins/cors.ts';
import dbPlugin from './plugins/db.ts';
import sessionsPlugin from './plugins/sessions.ts';
import notifierPlugin from './plugins/notifier.ts';
import roundsPlugin from './plugins/rounds.ts';
import limitsPlugin from './plugins/limits.ts';
import authPlugin from './plugins/auth.ts';
import swaggerPlugin from './plugins/swagger.ts';
import uiPlugin from './plugins/ui.ts';
import metricsPlugin from './plugins/metrics.ts';
import storagePlugin from './plugins/storage.ts';
import { RequestLogController, requestId } from './request-log.ts';
import healthRoutes from './routes/health/index.ts';
import rootRoutes from './routes/root/index.ts';
import tokenRoutes from './routes/tokens/index.ts';
import sessionRoutes from './routes/sessions/index.ts';

export interface AppOptions {
  config: Config;
  /** Apply migrations at start-up. */
  migrate?: boolean;
  database?: Database;
  logger?: FastifyServerOptions['logger'];
}

export async function app(fastify: FastifyInstance, opts: AppOptions): Promise<void> {
  const { config } = opts;

  // Every response says which request it was (the same id is on every log line of the request). Once the
  // app is closing (SIGTERM), requests that still arrive on open connections are turned away with a code,
  // so that clients and load balancers retry elsewhere; the ones in flight finish.
  let closing = false;
  fastify.addHook('preClose', async () => {
    closing = true;
  });
  fastify.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
    if (closing) {
      reply.header('connection', 'close');
      throw errors.unavailable('the server is shutting down; retry on another replica', 1);
    }
  });

  // Order matters: the limits' onRequest hook sheds load before auth touches the database; auth's onRoute
  // hook must see every route, and swagger's collector every route after it.
  await fastify.register(errorsPlugin);
  // Before load shedding, the database's health gate and auth: a browser's preflight carries no token.
  await fastify.register(corsPlugin, { config });
  await fastify.register(contentTypesPlugin, { config });
  await fastify.register(dbPlugin, { config, migrate: opts.migrate ?? false, database: opts.database });
  await fastify.register(sessionsPlugin, { config });
  await fastify.register(notifierPlugin);
  await fastify.register(roundsPlugin);
  await fastify.register(limitsPlugin, { config });
  await fastify.register(authPlugin, { config });
  await fastify.register(swaggerPlugin);
  await fastify.register(metricsPlugin, { config });
  await fastify.register(storagePlugin, { config });
  await fastify.register(uiPlugin);
  await fastify.register(healthRoutes);
  await fastify.register(rootRoutes);
  await fastify.register(tokenRoutes, { prefix: '/v1/tokens' });
  await fastify.register(sessionRoutes, { prefix: '/v1/sessions', config });
}

/** Never logged: credentials (tokens travel in the Authorization header). Tensors are never logged at all. */
export const REDACTED_PATHS = ['req.headers.authorization', 'req.headers.cookie', 'headers.authorization', 'authorization', 'token'];

/** pino options for the service: level from config, credentials redacted, pretty only on a terminal. */
export function loggerOptions(config: Config, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    level: config.logLevel,
    // pino-pretty is a dev dependency: a production image run with a terminal (docker run -t) logs JSON.
    ...(process.stdout.isTTY && hasPinoPretty() && { transport: { target: 'pino-pretty' } }),
    ...extra,
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
  };
}

function hasPinoPretty(): boolean {
  try {
    createRequire(import.meta.url).resolve('pino-pretty');
    return true;
  } catch {
    return false;
  }
}

const SESSION_PATH = new RegExp(`^/v1/sessions/(${SESSION_NAME_SOURCE})(?:[/?]|$)`);

/** A framework-level error (bad URL, oversized headers, timeouts) in the API's error shape. */
const errorText = (api: ApiError): string => JSON.stringify(errorBody(api));

function clientErrorHandler(this: FastifyInstance, err: Error & { code?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const api = err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? errors.requestTimeout()
    : err.code === 'HPE_HEADER_OVERFLOW' ? errors.headersTooLarge()
    : errors.badRequest('the request is not valid HTTP/1.1');
  this.log.debug({ err, code: api.code }, 'client error');
  if (socket.writable) {
    const body = errorText(api);
    socket.write(`HTTP/1.1 ${api.statusCode} ${api.code}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n${body}`);
  }
  socket.destroy(err);
}

const MAX_PARAM_LENGTH = 512;
const validatorFactory = AjvCompiler();

/** Builds the app (not listening). */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const { config } = opts;
  // A logger given as options still gets the redaction; `false` and ready-made pino instances pass through.
  const logger = opts.logger === undefined ? loggerOptions(config)
    : opts.logger && typeof opts.logger === 'object' && !('child' in opts.logger) ? { ...opts.logger, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } }
    : opts.logger;
  const fastify = Fastify({
    logger,
    bodyLimit: config.bodyLimitDefault,
    requestTimeout: config.requestTimeoutMs,
    // Node 20 only enforces the request timeout when the server is constructed with it (fastify sets it
    // afterwards), and checks it on an interval (30 s by default): keep that a fraction of the timeout.
    http: {
      requestTimeout: config.requestTimeoutMs,
      ...(config.requestTimeoutMs > 0 && { headersTimeout: Math.min(60_000, config.requestTimeoutMs) }),
      connectionsCheckingInterval: Math.min(30_000, Math.max(100, Math.floor((config.requestTimeoutMs || 120_000) / 4))),
    },
    // A hop count is valid at runtime (fastify's trust-proxy); the typings only list the other forms.
    trustProxy: config.trustProxy as Exclude<Config['trustProxy'], number>,
    genReqId: requestId,
    // Request lines at a level per route (ASGD_LOG_REQUESTS).
    logController: new RequestLogController(config.logRequests),
    // Lines about a session's routes carry its name (set before the first line of the request is written).
    childLoggerFactory: (parent, bindings, childOpts, rawReq) => {
      const session = SESSION_PATH.exec(rawReq.url ?? '')?.[1];
      return parent.child(session ? { ...bindings, session } : bindings, childOpts);
    },
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    frameworkErrors: (err, _request, reply) => {
      const api = err.code === 'FST_ERR_MAX_PARAM_LENGTH' ? errors.uriTooLong(MAX_PARAM_LENGTH) : errors.invalidUrl('path: is not a valid URL (bad percent-encoding)');
      void (reply as FastifyReply).code(api.statusCode).header('content-type', 'application/json').send(errorText(api));
    },
    clientErrorHandler,
    // `x-error-code` is an annotation: a field's own error code (src/plugins/errors.ts).
    ajv: { customOptions: { coerceTypes: 'array', removeAdditional: false, allErrors: false, keywords: [ERROR_CODE_KEYWORD] } },
    // Query strings, path parameters and headers are text and are coerced to their schema's types; JSON
    // bodies have types of their own, so {"name": true} is a 400, not a session called "true".
    schemaController: {
      compilersFactory: {
        buildValidator: (externalSchemas, ajvOptions) => {
          const options = ajvOptions as { customOptions: Record<string, unknown> };
          const coercing = validatorFactory(externalSchemas, options);
          const strict = validatorFactory(externalSchemas, { ...options, customOptions: { ...options.customOptions, coerceTypes: false } });
          return (route) => (route.httpPart === 'body' ? strict(route) : coercing(route));
        },
      },
    },
    // Requests during shutdown get a 503 with a code from the app's onRequest hook instead of fastify's bare one.
    return503OnClosing: false,
    // Opening the embedded database (PGlite compiles PostgreSQL to WebAssembly) and migrating it can take
    // well over fastify's default 10 s on a busy machine.
    pluginTimeout: 120_000,
  });
  // An Expect other than 100-continue: Node answers a bare 417 unless someone listens for it.
  fastify.server.on('checkExpectation', (request: IncomingMessage, response: ServerResponse) => {
    const body = errorText(errors.invalidHeader('Expect', `${quoteValue(request.headers.expect)} is not supported (only 100-continue)`));
    response.writeHead(400, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), connection: 'close' });
    response.end(body);
  });
  // fastify-plugin: the app's decorations (db, sessions) are visible on the instance tests hold.
  await fastify.register(fp(app, { name: 'asgd-serve' }), opts);
  return fastify;
}
