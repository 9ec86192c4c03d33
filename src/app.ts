// The whole service as one Fastify plugin. It never listens: src/server.ts does, tests inject.
import fp from 'fastify-plugin';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyServerOptions } from 'fastify';
import type { Config } from './config.ts';
import { ApiError, errors } from './errors.ts';
import { FormatError } from './formats/errors.ts';
import type { Database } from './db/database.ts';
import dbPlugin from './plugins/db.ts';
import sessionsPlugin from './plugins/sessions.ts';
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
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof FormatError) return errors.fileFormat(err.code, err.message);
  const e = err as FastifyError & { validation?: unknown; validationContext?: string };
  if (e?.validation) return errors.invalidBody(`${e.validationContext ?? 'body'}: ${e.message}`);
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return errors.bodyTooLarge(Number((e as unknown as { limit?: number }).limit ?? 0) || 0);
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return errors.unsupportedMediaType(String(e.message.split(': ').pop()), 'application/json');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return errors.invalidJson('the body is empty');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return errors.badRequest('Content-Length: does not match the body');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return errors.invalidJson(e.message);
  }
  if (e instanceof SyntaxError || (e?.statusCode === 400 && /JSON/i.test(e.message ?? ''))) return errors.invalidJson(e.message);
  if (isRetryableDbError(err)) return errors.unavailable('the database is unreachable; retry shortly');
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    return new ApiError(e.statusCode, typeof e.code === 'string' ? e.code : 'BAD_REQUEST', e.message);
  }
  return errors.internal();
}

export async function app(fastify: FastifyInstance, opts: AppOptions): Promise<void> {
  const { config } = opts;

  fastify.setErrorHandler((err, request, reply) => {
    const api = toApiError(err);
    if (api.statusCode >= 500) request.log.error({ err }, 'request failed');
    else request.log.info({ code: api.code, statusCode: api.statusCode }, api.message);
    if (api.headers) reply.headers(api.headers);
    return reply.status(api.statusCode).send({
      statusCode: api.statusCode,
      code: api.code,
      error: api.statusCode >= 500 ? 'Internal Server Error' : api.code,
      message: api.message,
      ...api.details,
    });
  });
  fastify.setNotFoundHandler((request, reply) => {
    const api = errors.routeNotFound(request.method, request.url.split('?')[0].slice(0, 200));
    return reply.status(404).send({ statusCode: 404, code: api.code, error: 'Not Found', message: api.message });
  });

  // Binary bodies (torch.save files, safetensors) arrive as one Buffer, bounded by the route's bodyLimit.
  fastify.addContentTypeParser(
    ['application/octet-stream', 'application/vnd.pytorch', 'application/x-safetensors', 'application/safetensors'],
    { parseAs: 'buffer' },
    (_request, body, done) => done(null, body),
  );

  await fastify.register(dbPlugin, { config, migrate: opts.migrate ?? false, database: opts.database });
  await fastify.register(sessionsPlugin, { config });
  await fastify.register(sessionRoutes, { prefix: '/v1/sessions', config });
}

/** Builds the app (not listening). */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const fastify = Fastify({
    logger: opts.logger ?? { level: opts.config.logLevel },
    bodyLimit: opts.config.bodyLimitDefault,
    requestTimeout: opts.config.requestTimeoutMs,
    genReqId: () => crypto.randomUUID(),
    ajv: { customOptions: { coerceTypes: 'array', removeAdditional: false, allErrors: false } },
    return503OnClosing: true,
  });
  // fastify-plugin: the app's decorations (db, sessions) are visible on the instance tests hold.
  await fastify.register(fp(app, { name: 'asgd-serve' }), opts);
  return fastify;
}
