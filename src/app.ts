// The whole service as one Fastify plugin. It never listens: src/server.ts does, tests inject.
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { STATUS_CODES } from 'node:http';
import fp from 'fastify-plugin';
import { AjvCompiler } from '@fastify/ajv-compiler';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import type { Config } from './config.ts';
import { ApiError, errors } from './errors.ts';
import { FormatError } from './formats/errors.ts';
import type { Database } from './db/database.ts';
import dbPlugin from './plugins/db.ts';
import sessionsPlugin from './plugins/sessions.ts';
import notifierPlugin from './plugins/notifier.ts';
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
import { isRetryableDbError } from './sessions/service.ts';

export interface AppOptions {
  config: Config;
  /** Apply migrations at start-up. */
  migrate?: boolean;
  database?: Database;
  logger?: FastifyServerOptions['logger'];
}

/** Error body: {statusCode, code, error, message, ...details}. 5xx bodies never carry internals. */
export function toApiError(err: unknown, request?: FastifyRequest): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof FormatError) return errors.fileFormat(err.code, err.message);
  const e = err as FastifyError & { validation?: unknown; validationContext?: string };
  if (e?.validation) {
    const message = `${e.validationContext ?? 'body'}: ${e.message}`;
    if (e.validationContext === 'params') return errors.invalidPath(message);
    if (e.validationContext === 'querystring') return new ApiError(400, 'INVALID_QUERY', message);
    if (e.validationContext === 'headers') return new ApiError(400, 'INVALID_HEADER', message);
    return errors.invalidBody(message);
  }
  if (e?.code === 'ERR_STRING_TOO_LONG') return errors.badRequest('body: holds a string longer than this service reads');
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return errors.bodyTooLarge(request?.routeOptions.bodyLimit ?? 0);
    case 'FST_ERR_CTP_INVALID_TYPE':
    case 'FST_ERR_CTP_EMPTY_TYPE':
      return errors.invalidHeader('Content-Type', 'must be a media type such as application/json');
    case 'FST_ERR_HANDLER_TIMEOUT':
      return errors.unavailable('the request took too long; retry shortly');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return errors.unsupportedMediaType(
        String(e.message.split(': ').pop()).slice(0, 100),
        ((request?.routeOptions.schema as { consumes?: string[] } | undefined)?.consumes ?? ['application/json']).join(', '),
      );
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return errors.invalidJson('the body is empty');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return errors.badRequest('Content-Length: does not match the body');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return errors.invalidJson(e.message);
  }
  if (e instanceof SyntaxError || (e?.statusCode === 400 && /JSON/i.test(e.message ?? ''))) return errors.invalidJson(e.message);
  if (isRetryableDbError(err)) return errors.unavailable('the database is unreachable; retry shortly');
  // The database server answers but will not serve us (it was dropped, renamed, or our login was
  // changed): the service is unavailable, which is no fault of the request.
  if (typeof e?.code === 'string' && /^(3D000|57P04|28[0-9A-Z]{3})$/.test(e.code) && (err as { severity?: unknown }).severity !== undefined) {
    return errors.unavailable('the database is not available', 5);
  }
  // PostgreSQL class 22 (data exception: a number out of a column's range, …) means a value got past the
  // route's checks: the client's input, not the server, is at fault. The route should have named the field.
  if (typeof e?.code === 'string' && /^22[0-9A-Z]{3}$/.test(e.code) && (err as { severity?: unknown }).severity !== undefined) {
    return errors.badRequest('a value in the request is out of the range this service stores');
  }
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    // Fastify's own codes (FST_ERR_…) are not part of this API's catalogue.
    const code = typeof e.code === 'string' && !e.code.startsWith('FST_') ? e.code : 'BAD_REQUEST';
    return new ApiError(e.statusCode, code, e.message);
  }
  return errors.internal();
}

export async function app(fastify: FastifyInstance, opts: AppOptions): Promise<void> {
  const { config } = opts;

  fastify.setErrorHandler((err, request, reply) => {
    const api = toApiError(err, request);
    if (api.statusCode >= 500) request.log.error({ err }, 'request failed');
    // An error mapped from elsewhere (fastify, the database) keeps its original in the log line.
    else request.log.info({ code: api.code, statusCode: api.statusCode, ...(!(err instanceof ApiError) && { err }) }, api.message);
    if (api.headers) reply.headers(api.headers);
    return reply.status(api.statusCode).send({
      statusCode: api.statusCode,
      code: api.code,
      error: STATUS_CODES[api.statusCode] ?? 'Error',
      message: api.message,
      ...api.details,
    });
  });
  fastify.setNotFoundHandler((request, reply) => {
    const api = errors.routeNotFound(request.method, request.url.split('?')[0].slice(0, 200));
    return reply.status(404).send({ statusCode: 404, code: api.code, error: 'Not Found', message: api.message });
  });

  // Bodies are JSON or files; fastify's default text/plain parser would hand routes a string.
  fastify.removeContentTypeParser('text/plain');
  // JSON arrives as bytes and is bounded before it becomes one string: a text beyond V8's string limit
  // (~512 MiB) would otherwise throw inside the body reader and take the process down.
  const parseJson = fastify.getDefaultJsonParser('error', 'error');
  fastify.removeContentTypeParser('application/json');
  fastify.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
    const bytes = body as Buffer;
    if (bytes.length > config.bodyLimitJson) {
      done(new ApiError(413, 'BODY_TOO_LARGE', `body: a JSON body is limited to ${config.bodyLimitJson} bytes; send tensors as safetensors or a torch.save file`), undefined);
      return;
    }
    parseJson(request, bytes.toString('utf8'), done);
  });
  fastify.addHook('preParsing', async (request) => {
    // Refuse a JSON body announced as too large before reading it.
    const length = Number(request.headers['content-length']);
    const type = (request.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
    if (type === 'application/json' && length > config.bodyLimitJson) {
      throw new ApiError(413, 'BODY_TOO_LARGE', `body: a JSON body is limited to ${config.bodyLimitJson} bytes; send tensors as safetensors or a torch.save file`);
    }
  });
  // Binary bodies (torch.save files, safetensors) arrive as one Buffer, bounded by the route's bodyLimit.
  fastify.addContentTypeParser(
    ['application/octet-stream', 'application/vnd.pytorch', 'application/x-safetensors', 'application/safetensors'],
    { parseAs: 'buffer' },
    (_request, body, done) => done(null, body),
  );
  // A route accepts the media types its schema lists in `consumes` (JSON only when it lists none); the
  // parsers above are global, so without this a file sent to a JSON route would reach its handler.
  fastify.addHook('preValidation', async (request) => {
    const type = request.headers['content-type'];
    if (type === undefined || request.body === undefined) return;
    const media = type.split(';')[0].trim().toLowerCase();
    const accepted = (request.routeOptions.schema as { consumes?: string[] } | undefined)?.consumes ?? ['application/json'];
    if (!accepted.includes(media)) throw errors.unsupportedMediaType(media.slice(0, 100), accepted.join(', '));
  });

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
  await fastify.register(dbPlugin, { config, migrate: opts.migrate ?? false, database: opts.database });
  await fastify.register(sessionsPlugin, { config });
  await fastify.register(notifierPlugin);
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

const SESSION_PATH = /^\/v1\/sessions\/([A-Za-z0-9._-]{1,128})(?:[/?]|$)/;

/** Write a framework-level error (bad URL, oversized headers, timeouts) in the API's error shape. */
function errorBody(api: ApiError): string {
  return JSON.stringify({ statusCode: api.statusCode, code: api.code, error: STATUS_CODES[api.statusCode] ?? 'Error', message: api.message });
}

function clientErrorHandler(this: FastifyInstance, err: Error & { code?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const api = err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? errors.requestTimeout()
    : err.code === 'HPE_HEADER_OVERFLOW' ? errors.headersTooLarge()
    : errors.badRequest('the request is not valid HTTP/1.1');
  this.log.debug({ err, code: api.code }, 'client error');
  if (socket.writable) {
    const body = errorBody(api);
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
      void (reply as FastifyReply).code(api.statusCode).header('content-type', 'application/json').send(errorBody(api));
    },
    clientErrorHandler,
    ajv: { customOptions: { coerceTypes: 'array', removeAdditional: false, allErrors: false } },
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
  // fastify-plugin: the app's decorations (db, sessions) are visible on the instance tests hold.
  await fastify.register(fp(app, { name: 'asgd-serve' }), opts);
  return fastify;
}
