// How every failure becomes the API's error body {statusCode, code, error, message, ...details}: errors of
// the catalogue as they are, file-format errors with their code, schema (AJV) failures with the code of the
// request part (or the field's own `x-error-code`), fastify's and the database's errors by their code.
import { STATUS_CODES } from 'node:http';
import fp from 'fastify-plugin';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, FastifySchemaValidationError } from 'fastify';
import { ApiError, CODES, errors, headerText, type ErrorCode, type RequestPart } from '../errors.ts';
import { FormatError } from '../formats/errors.ts';
import { DatabaseSilentError, QUERY_CANCELED } from '../db/database.ts';
import { classifyDbError, refusalMessage } from '../db/errors.ts';

/** The error body of a catalogue error. */
export function errorBody(api: ApiError): Record<string, unknown> {
  return { statusCode: api.statusCode, code: api.code, error: STATUS_CODES[api.statusCode] ?? 'Error', message: api.message, ...api.details };
}

/** The keyword a schema uses to give its field a more specific code than the request part's. */
export const ERROR_CODE_KEYWORD = 'x-error-code';

/** The keyword a string schema with a `pattern` uses to say in words what the pattern allows. */
export const RULE_KEYWORD = 'x-rule';

type SchemaNode = {
  properties?: Record<string, SchemaNode>; items?: SchemaNode; additionalProperties?: SchemaNode | boolean; anyOf?: SchemaNode[];
  [ERROR_CODE_KEYWORD]?: string; [RULE_KEYWORD]?: string;
};

/** The deepest `x-error-code` on the way from a schema's root to the field at `path`, and the field's `x-rule`. */
function codeAlong(schema: SchemaNode | undefined, path: string[]): { code: ErrorCode | null; rule: string | null } {
  let code: ErrorCode | null = null;
  let rule: string | null = null;
  let node = schema;
  for (let i = 0; node; i++) {
    const own = node[ERROR_CODE_KEYWORD];
    if (typeof own === 'string' && own in CODES) code = own as ErrorCode;
    if (i === path.length) {
      rule = typeof node[RULE_KEYWORD] === 'string' ? node[RULE_KEYWORD] : null;
      break;
    }
    const key = path[i];
    const branches = node.anyOf ?? [node];
    node = branches.map((b) => b.properties?.[key] ?? (/^\d+$/.test(key) ? b.items : undefined) ?? (typeof b.additionalProperties === 'object' ? b.additionalProperties : undefined)).find((n) => n !== undefined);
  }
  return { code, rule };
}

function partSchema(request: FastifyRequest, part: RequestPart): SchemaNode | undefined {
  const schema = request.routeOptions.schema as Record<string, unknown> | undefined;
  const s = schema?.[part] as (SchemaNode & { content?: Record<string, { schema: SchemaNode }> }) | undefined;
  if (part === 'body' && s?.content) return s.content[request.mediaType ?? '']?.schema;
  return s;
}

/** A failed schema check as a catalogue error whose message starts with the field (`params[0].name: …`). */
function validationError(request: FastifyRequest, part: RequestPart, failures: FastifySchemaValidationError[]): ApiError {
  const first = failures[0];
  const path = (first.instancePath ?? '').split('/').slice(1).map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
  const params = (first.params ?? {}) as Record<string, unknown>;
  let message = first.message ?? 'is not valid';
  if (first.keyword === 'required') {
    path.push(String(params.missingProperty));
    message = 'is missing';
  } else if (first.keyword === 'additionalProperties') {
    path.push(String(params.additionalProperty));
    message = 'unknown key';
  } else if (first.keyword === 'const' || first.keyword === 'enum') {
    // A union of literals fails once per literal: name them all.
    const allowed = failures.filter((f) => f.instancePath === first.instancePath && (f.keyword === 'const' || f.keyword === 'enum'))
      .flatMap((f) => (f.params as { allowedValue?: unknown; allowedValues?: unknown[] }).allowedValues ?? [(f.params as { allowedValue?: unknown }).allowedValue]);
    message = `must be one of ${allowed.map((v) => JSON.stringify(v)).join(', ')}`;
  }
  // A JSON number beyond float64 (1e400) reads as an infinity: "must be number" would call the number sent
  // something else.
  if (first.keyword === 'type' && part === 'body') {
    const value = path.reduce<unknown>((at, key) => (at !== null && typeof at === 'object' ? (at as Record<string, unknown>)[key] : undefined), request.body);
    if (typeof value === 'number' && !Number.isFinite(value)) message = 'must be a finite number (this one is beyond float64\'s range, about 1.8e308)';
  }
  let field = path.reduce((at, key) => (/^\d+$/.test(key) ? `${at}[${key}]` : at ? `${at}.${key}` : key), '') || 'body';
  // A header as the API writes it elsewhere (If-Match, Idempotency-Key), not as Node lowercases it.
  if (part === 'headers') field = field.replace(/(^|-)([a-z])/g, (_m, dash: string, letter: string) => dash + letter.toUpperCase());
  const { code, rule } = codeAlong(partSchema(request, part), path);
  // A pattern's failure in words where the schema gives them, not as the regular expression.
  if (first.keyword === 'pattern' && rule) message = `must be ${rule}`;
  return code ? errors.invalidField(code, field, message) : errors.invalidPart(part, field, message);
}

const PARTS: Record<string, RequestPart> = { params: 'params', querystring: 'querystring', headers: 'headers', body: 'body' };

/** The variable that sets a route's body limit (src/config.ts), for the 413's message. */
function bodyLimitVariable(request: FastifyRequest): string {
  const url = request.routeOptions.url ?? '';
  if (url.endsWith('/step')) return 'ASGD_BODY_LIMIT_STEP';
  if (url === '/v1/sessions' || /\/(params|state_dict|checkpoint)$/.test(url)) return 'ASGD_BODY_LIMIT_CREATE';
  return 'ASGD_BODY_LIMIT_DEFAULT';
}

/** Any error thrown while serving a request, as a catalogue error. */
export function toApiError(err: unknown, request: FastifyRequest): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof FormatError) return errors.fileFormat(err.code, err.message);
  const e = err as FastifyError & { validation?: FastifySchemaValidationError[]; validationContext?: string };
  if (Array.isArray(e?.validation) && e.validation.length > 0) return validationError(request, PARTS[e.validationContext ?? 'body'] ?? 'body', e.validation);
  if (e?.code === 'ERR_STRING_TOO_LONG') return errors.badRequest('body: holds a string longer than this service reads');
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return errors.bodyTooLarge(request.routeOptions.bodyLimit ?? 0, bodyLimitVariable(request));
    case 'FST_ERR_CTP_INVALID_TYPE':
    case 'FST_ERR_CTP_EMPTY_TYPE':
      return errors.invalidHeader('Content-Type', 'must be a media type such as application/json');
    case 'FST_ERR_HANDLER_TIMEOUT':
      return errors.unavailable('the request took too long; retry shortly');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return unsupportedMediaType(request);
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return errors.invalidJson('the body is empty');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return errors.badRequest('Content-Length: does not match the body');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return errors.invalidJson(e.message);
  }
  if (e instanceof SyntaxError || (e?.statusCode === 400 && /JSON/i.test(e.message ?? ''))) return errors.invalidJson(e.message);
  // The client hung up while its body was being read (Node's "aborted", code ECONNRESET): nobody is left to
  // answer, and it is not the database's ECONNRESET (a 503 and an error line in the operator's log).
  // (readableAborted: destroyed before its end. `destroyed` alone is true of every request read in full.)
  if (e?.code === 'ECONNRESET' && request.raw.readableAborted) {
    return errors.badRequest('the client closed the connection before its body arrived in full');
  }
  if (err instanceof DatabaseSilentError) {
    // A commit may have been on its way: the outcome is unknown, and a retry with the same key tells.
    return errors.unavailable(`${err.message}; retry shortly (a step retried with the same Idempotency-Key counts once)`);
  }
  if (e?.code === QUERY_CANCELED && (err as { severity?: unknown }).severity !== undefined) {
    // Ours after ASGD_DB_TIMEOUT_MS of silence (db/silence.ts), or statement_timeout, or an operator's: the
    // statement was aborted, so none of it was committed.
    return errors.unavailable('PostgreSQL cancelled the statement: it had no answer within ASGD_DB_TIMEOUT_MS (waiting for a lock another connection holds?), or statement_timeout or an operator cancelled it; nothing of it was committed; retry shortly');
  }
  switch (classifyDbError(err)) {
    case 'retryable':
      if (/timeout exceeded when trying to connect/i.test(e?.message ?? '') && request.server.db?.poolStats().idle === 0) {
        // pg-pool's wait for a free connection ran out: the database may be fine and merely busy.
        const { total } = request.server.db.poolStats();
        return errors.unavailable(`all ${total} database connections of this process are busy (ASGD_DB_POOL_SIZE) or the database does not answer new ones; retry shortly`);
      }
      // Out of disk (PostgreSQL's, or the embedded database's past its guard): waiting does not help.
      if (e?.code === '53100') return errors.diskFull();
      if (e?.code === '53300') {
        return errors.unavailable('PostgreSQL has no connection slot for this process (max_connections, or a CONNECTION LIMIT; each replica holds up to ASGD_DB_POOL_SIZE + 2); retry shortly');
      }
      if (typeof e?.code === 'string' && /^(53|57P0)/.test(e.code)) return errors.unavailable(`the database cannot serve this now (SQLSTATE ${e.code}); retry shortly`);
      return errors.unavailable('the database is unreachable; retry shortly');
    case 'unavailable': {
      // The database server answers but will not serve us: no fault of the request.
      return errors.unavailable(refusalMessage(err) ?? 'the database is not available', 5);
    }
    case 'bad-value':
      // A value got past the route's checks: the client's input is at fault. The route should have named the field.
      return errors.badRequest('a value in the request is out of the range this service stores');
  }
  // Anything else at 4xx (a plugin's own error): fastify's codes are not part of this API's catalogue.
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) return errors.badRequest(e.message);
  return errors.internal();
}

/** 415 naming the type that was sent and the types the route accepts. */
export function unsupportedMediaType(request: FastifyRequest): ApiError {
  const header = headerText(request.headers['content-type']).trim();
  // The media type as sent (parameters dropped), or the whole header when it has none (";;;").
  const sent = (header.split(';')[0].trim() || header || '(none)').slice(0, 100);
  return errors.unsupportedMediaType(sent, acceptedTypes(request).join(', '));
}

/** The media types a route accepts: its schema's `consumes`, else JSON. */
export const acceptedTypes = (request: FastifyRequest): string[] =>
  (request.routeOptions.schema as { consumes?: string[] } | undefined)?.consumes ?? ['application/json'];

/** The decimal text of a query parameter whose schema is a number (before AJV coerces the text). */
const DECIMAL = { integer: /^-?[0-9]{1,16}(\.0{1,20})?$/, number: /^-?[0-9]{1,16}(\.[0-9]{1,20})?$/ } as const;

/**
 * A query parameter is one the route reads, given once (unless its schema is a list), and one typed integer or number is written in decimal. AJV's coercion takes whatever
 * JavaScript's Number() reads: "Infinity" passed every bound (a round contribution with ?wait=Infinity spun
 * on a 1 ms timer), and "1e400", "0x10" and " 5" were numbers too. A whole number may end in ".0", as
 * Python's str() of a float writes it (AJV took "30.0" for 30 before, and still does).
 */
export function checkQueryText(request: FastifyRequest): void {
  const declared = (request.routeOptions.schema?.querystring as { properties?: Record<string, { type?: unknown }> } | undefined)?.properties;
  // An API route without a query schema reads no query (?all=true on GET /v1/tokens looked as if it worked).
  const properties = declared ?? (request.routeOptions.url?.startsWith('/v1/') ? {} : undefined);
  if (!properties) return;
  for (const [key, value] of Object.entries((request.query ?? {}) as Record<string, unknown>)) {
    // A misspelt parameter (?base_versoin=3) was dropped without a word, and the step went without the
    // check it asked for. The route's schema lists what it reads.
    if (!Object.hasOwn(properties, key)) {
      const known = Object.keys(properties);
      throw errors.invalidQuery(key.slice(0, 100), `is not a parameter of this route${known.length ? ` (it reads ${known.join(', ')})` : ' (it reads none)'}`);
    }
    const type = properties[key]?.type;
    // ?limit=1&limit=2 arrives as a list, which AJV then called 'must be integer' (or took the first of).
    if (Array.isArray(value) && properties[key] !== undefined && type !== 'array') throw errors.invalidQuery(key, 'is given more than once');
    if (type !== 'integer' && type !== 'number') continue;
    if (typeof value === 'string' && !DECIMAL[type].test(value)) {
      if (/^-?[0-9]{17,}(\.[0-9]*)?$/.test(value)) throw errors.invalidQuery(key, `is too large (at most ${Number.MAX_SAFE_INTEGER})`);
      throw errors.invalidQuery(key, type === 'integer' ? 'must be a whole number written in decimal' : 'must be a decimal number');
    }
  }
}

export default fp(
  async function errorsPlugin(fastify: FastifyInstance) {
    // A callback hook: an async one costs a promise and a microtask on every request. Before the body: a
    // request refused on its request line is refused before a 100 Continue and the upload (a review: a
    // misspelt ?base_versoin= was told after 1 MB had been sent).
    fastify.addHook('preParsing', (request, _reply, payload, done) => {
      try {
        checkQueryText(request);
      } catch (err) {
        return done(err as Error, payload);
      }
      done(null, payload);
    });
    fastify.setErrorHandler((err, request, reply) => {
      const api = toApiError(err, request);
      // A 503 is a state of the database or the process, said once by the health probe, and a 507 one of the
      // embedded database's disk: one line without a stack per request; a 500 is a bug, with its stack.
      if (api.statusCode === 503 || api.statusCode === 507) request.log.warn({ code: api.code, statusCode: api.statusCode, cause: (err as Error)?.message }, api.message);
      else if (api.statusCode >= 500) request.log.error({ err }, 'request failed');
      // An error mapped from elsewhere (fastify, the database) keeps its original in the log line.
      else request.log.info({ code: api.code, statusCode: api.statusCode, ...(!(err instanceof ApiError) && { err }) }, api.message);
      if (api.headers) reply.headers(api.headers);
      return reply.status(api.statusCode).send(errorBody(api));
    });
    // A path that exists with other methods answers 405 with Allow (RFC 9110), not 404: every route's
    // path as a pattern, recorded as the routes are added (this plugin is registered before them).
    const paths = new Map<string, { pattern: RegExp; methods: Set<string> }>();
    fastify.addHook('onRoute', (route) => {
      if (route.url === '*' || route.url === '/*') return; // a catch-all would make every path a known one
      let entry = paths.get(route.url);
      if (!entry) {
        const source = route.url.split('/').map((part) => (part === '*' ? '.*' : part.startsWith(':') ? '[^/]+' : part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'))).join('/');
        paths.set(route.url, (entry = { pattern: new RegExp(`^${source}$`), methods: new Set() }));
      }
      for (const method of [route.method].flat()) entry.methods.add(method);
    });
    const notFound = (request: FastifyRequest, reply: FastifyReply) => {
      const path = request.url.split('?')[0];
      const allowed = new Set<string>();
      for (const { pattern, methods } of paths.values()) if (pattern.test(path)) for (const m of methods) allowed.add(m);
      if (allowed.size > 0 && !allowed.has(request.method)) {
        const methods = [...allowed].sort();
        const api = errors.methodNotAllowed(request.method, path.slice(0, 200), methods);
        request.log.info({ code: api.code, statusCode: api.statusCode }, api.message);
        return reply.status(api.statusCode).header('allow', methods.join(', ')).send(errorBody(api));
      }
      const api = errors.routeNotFound(request.method, path.slice(0, 200));
      request.log.info({ code: api.code, statusCode: api.statusCode }, api.message);
      return reply.status(api.statusCode).send(errorBody(api));
    };
    // Said before the body is read: a body's type or size is no business of a route that does not exist
    // (an operator's review: a safetensors body to a wrong method got 415, a large JSON one 413, and only a
    // JSON body the 405 with Allow).
    fastify.addHook('preParsing', async (request, reply) => {
      if (request.is404) return notFound(request, reply);
    });
    fastify.setNotFoundHandler(notFound);
  },
  { name: 'errors' },
);
