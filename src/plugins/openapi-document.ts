// Post-processing of the generated OpenAPI document, so that it says once what routes share and is valid
// OpenAPI 3.0 (which predates JSON Schema's const, null type and patternProperties):
// - schemas with a `title` become components.schemas.<title>, referenced by $ref;
// - every error response is components.responses.Error<status>, whose schema lists the codes that status
//   can carry (from the catalogue in src/errors.ts);
// - JSON Schema forms 3.0 lacks are rewritten (const -> enum, {anyOf: [X, null]} -> X nullable,
//   patternProperties -> additionalProperties, examples -> example).
import { STATUS_CODES } from 'node:http';
import { CODES, codesOfStatus } from '../errors.ts';

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => v !== null && typeof v === 'object' && !Array.isArray(v);

/** JSON Schema (TypeBox output) as OpenAPI 3.0 schema; titled schemas collected into `components`. */
function toOpenApiSchema(schema: unknown, components: Json): unknown {
  if (Array.isArray(schema)) return schema.map((s) => toOpenApiSchema(s, components));
  if (!isObject(schema)) return schema;
  let s: Json = { ...schema };
  if ('const' in s) {
    s.enum = [s.const];
    delete s.const;
  }
  if (Array.isArray(s.anyOf)) {
    const others = (s.anyOf as Json[]).filter((b) => !(isObject(b) && b.type === 'null'));
    if (others.length < s.anyOf.length) {
      const { anyOf: _drop, ...rest } = s;
      s = others.length === 1 ? { ...others[0], ...rest, nullable: true } : { ...rest, anyOf: others, nullable: true };
    }
    // A union of literals is an enum.
    if (Array.isArray(s.anyOf) && s.anyOf.every((b) => isObject(b) && 'const' in b && b.type === (s.anyOf as Json[])[0].type)) {
      const branches = s.anyOf as Json[];
      const { anyOf: _drop, ...rest } = s;
      s = { type: branches[0].type, enum: branches.map((b) => b.const), ...rest };
    }
  }
  // JSON Schema's numeric exclusive bounds are OpenAPI 3.0's boolean flags on minimum/maximum.
  for (const [exclusive, bound] of [['exclusiveMinimum', 'minimum'], ['exclusiveMaximum', 'maximum']] as const) {
    if (typeof s[exclusive] === 'number') {
      s[bound] = s[exclusive];
      s[exclusive] = true;
    }
  }
  if (isObject(s.patternProperties)) {
    const values = Object.values(s.patternProperties);
    if (values.length === 1) s.additionalProperties = values[0];
    delete s.patternProperties;
  }
  if (Array.isArray(s.examples)) {
    if (s.examples.length > 0 && s.example === undefined) s.example = s.examples[0];
    delete s.examples;
  }
  for (const [key, value] of Object.entries(s)) {
    if (key === 'properties' && isObject(value)) {
      s[key] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toOpenApiSchema(v, components)]));
    } else if (['items', 'additionalProperties', 'anyOf', 'allOf', 'oneOf', 'not'].includes(key)) {
      s[key] = toOpenApiSchema(value, components);
    }
  }
  const title = typeof s.title === 'string' ? s.title : null;
  if (title === null) return s;
  const existing = components[title];
  if (existing !== undefined && JSON.stringify(existing) !== JSON.stringify(s)) {
    throw new Error(`OpenAPI: two different schemas are titled ${title}; give one another title`);
  }
  components[title] = s;
  return { $ref: `#/components/schemas/${title}` };
}

/** The error response of a status: the codes it can carry, with their meanings. */
function errorResponse(status: number): Json {
  const codes = codesOfStatus(status);
  return {
    description: `${STATUS_CODES[status] ?? 'Error'}. The \`code\` is one of:\n\n${codes.map((c) => `- \`${c}\`: ${CODES[c].meaning}`).join('\n')}`,
    content: { 'application/json': { schema: { $ref: `#/components/schemas/Error${status}` } } },
  };
}

/** Fields some errors add to the body, by status. */
const ERROR_DETAILS: Record<number, Json> = {
  409: {
    version: { type: 'integer', description: 'STALE_GRADIENT, BASE_VERSION_AHEAD, ROUND_OPEN, DUPLICATE_CONTRIBUTION: the session\'s current version (pull the parameters at it)' },
    staleness: { type: 'integer', description: 'STALE_GRADIENT: how many versions the gradient\'s base_version is behind' },
    max_staleness: { type: 'integer', nullable: true, description: 'STALE_GRADIENT: the session\'s bound (null: none; a gradient of a replaced state is refused whatever the bound)' },
    replaced_at: { type: 'integer', description: 'STALE_GRADIENT of a gradient computed before the session\'s state was replaced (a restore, a load): the version at which it was' },
  },
  412: { version: { type: 'integer', description: 'The session\'s current version (as its ETag)' } },
};

function errorSchema(status: number): Json {
  const codes = codesOfStatus(status);
  return {
    type: 'object',
    description: `An error of status ${status}: a stable code and a message that names the field at fault (first, as "field: …", where one field is)`,
    required: ['statusCode', 'code', 'error', 'message'],
    properties: {
      statusCode: { type: 'integer', enum: [status] },
      code: { type: 'string', enum: codes },
      error: { type: 'string', example: STATUS_CODES[status] },
      message: { type: 'string' },
      ...ERROR_DETAILS[status],
    },
    additionalProperties: true,
    example: { statusCode: status, code: codes[0], error: STATUS_CODES[status], message: CODES[codes[0]].meaning },
  };
}

const METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'];

/** The response headers the service sends, as components.headers. */
const HEADERS: Record<string, Json> = {
  'X-Request-Id': { description: 'The request\'s id, as in the service\'s log lines: the X-Request-Id the client sent when it is one (1-128 characters, no spaces), else a new UUID', schema: { type: 'string' } },
  ETag: { description: 'The version of the state this answer shows (or the session is at), quoted: `"7"`. Send it as If-Match to change only that version, as If-None-Match to read only a newer one', schema: { type: 'string', example: '"7"' } },
  'X-Session-Version': { description: 'The same version, unquoted', schema: { type: 'integer', minimum: 0 } },
  'X-Session-Step': { description: 'The optimizer step count of the state answered', schema: { type: 'integer', minimum: 0 } },
  Location: { description: 'The new session\'s URL', schema: { type: 'string', example: '/v1/sessions/run-1' } },
  'Cache-Control': { description: 'no-store on every answer with an ETag (a session made again under a name deleted over 30 days before counts its versions from 1 again, and settings change without a new version) and on a new token\'s secret; no-cache for an event stream', schema: { type: 'string' } },
  'Content-Disposition': { description: 'On a file answer (torch.save, safetensors): `attachment; filename="<session>-v<version>[-checkpoint|-optimizer].<pt|safetensors>"` (`-checkpoint` for a checkpoint, `-optimizer` for a state_dict, nothing more for the parameters)', schema: { type: 'string' } },
  'Retry-After': { description: 'Seconds to wait before trying again', schema: { type: 'integer', minimum: 0 } },
  'WWW-Authenticate': { description: 'Bearer realm="asgd-serve"; with error="invalid_token" when a bearer token was given and is unknown, revoked or malformed (401), error="insufficient_scope" and the scope needed (403; a token refused for its list of sessions gets error_description instead of a scope)', schema: { type: 'string' } },
};
const VERSIONED = ['ETag', 'X-Session-Version', 'Cache-Control'];
const STATE_FILE = [...VERSIONED, 'X-Session-Step', 'Content-Disposition'];
/** The headers of each operation's answers, by status (X-Request-Id goes on every answer). Tested against the answers in test/openapi.test.ts. */
export const SUCCESS_HEADERS: Record<string, Record<string, string[]>> = {
  createToken: { 201: ['Cache-Control'] },
  createSession: { 201: [...VERSIONED, 'Location'] },
  getSession: { 200: VERSIONED, 304: VERSIONED },
  updateSession: { 200: VERSIONED },
  forkSession: { 201: [...VERSIONED, 'Location'] },
  step: { 200: [...VERSIONED, 'X-Session-Step', 'Content-Disposition'] },
  getParams: { 200: STATE_FILE, 304: VERSIONED },
  getStateDict: { 200: STATE_FILE, 304: VERSIONED },
  getCheckpoint: { 200: STATE_FILE, 304: VERSIONED },
  loadParams: { 200: VERSIONED },
  loadStateDict: { 200: VERSIONED },
  loadCheckpoint: { 200: VERSIONED },
  setHyperparameters: { 200: VERSIONED },
  getSnapshotParams: { 200: STATE_FILE },
  getSnapshotStateDict: { 200: STATE_FILE },
  getSnapshotCheckpoint: { 200: STATE_FILE },
  restoreSnapshot: { 200: VERSIONED },
  getNorms: { 200: VERSIONED, 304: VERSIONED },
  getHyperparameterChanges: { 200: VERSIONED, 304: VERSIONED },
  getMetrics: { 200: VERSIONED, 304: VERSIONED },
  getEvents: { 200: ['Cache-Control'] },
};
/** Headers of the error answers, by status. */
export const ERROR_HEADERS: Record<number, string[]> = { 401: ['WWW-Authenticate'], 403: ['WWW-Authenticate'], 412: ['ETag'], 429: ['Retry-After'], 503: ['Retry-After'] };
/** Where a header is sent only in some cases, when. */
export const CONDITIONAL_HEADERS: Record<string, string> = {
  'Content-Disposition': 'file answers (torch.save, safetensors) only',
  'WWW-Authenticate': 'on 403, when the token\'s scope is too low',
};

const headerRefs = (names: readonly string[]): Json =>
  Object.fromEntries(['X-Request-Id', ...names].map((n) => [n, { $ref: `#/components/headers/${n.replace(/-/g, '')}` }]));

/** Statuses any operation may answer beyond those it lists, in the `default` response. */
const OTHER_STATUSES = [405, 406, 408, 414, 431, 500, 507];

export function finishDocument(doc: Json): Json {
  const schemas: Json = {};
  const responses: Json = {};
  const errorStatuses = new Set<number>();
  const paths = doc.paths as Record<string, Record<string, Json>>;
  for (const item of Object.values(paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!METHODS.includes(method)) continue;
      for (const p of (op.parameters ?? []) as Json[]) if (p.schema) p.schema = toOpenApiSchema(p.schema, schemas);
      const body = op.requestBody as Json | undefined;
      if (body) {
        for (const media of Object.values(body.content as Record<string, Json>)) {
          media.schema = toOpenApiSchema(media.schema, schemas);
          // An optional body ({anyOf: [X, null]}): the body may be left out, not sent as null.
          if (isObject(media.schema) && media.schema.nullable === true) {
            delete media.schema.nullable;
            body.required = false;
          }
        }
      }
      const out = op.responses as Record<string, Json>;
      for (const [status, response] of Object.entries(out)) {
        if (Number(status) >= 400) {
          errorStatuses.add(Number(status));
          out[status] = { $ref: `#/components/responses/Error${status}` };
          continue;
        }
        for (const media of Object.values((response.content ?? {}) as Record<string, Json>)) media.schema = toOpenApiSchema(media.schema, schemas);
        if (response.description === 'Default Response') response.description = STATUS_CODES[Number(status)] ?? 'Success';
        response.headers = headerRefs(SUCCESS_HEADERS[op.operationId as string]?.[status] ?? []);
      }
      out.default = { $ref: '#/components/responses/ErrorOther' };
    }
  }
  for (const status of [...errorStatuses].sort()) {
    schemas[`Error${status}`] = errorSchema(status);
    responses[`Error${status}`] = { ...errorResponse(status), headers: headerRefs(ERROR_HEADERS[status] ?? []) };
  }
  const otherCodes = OTHER_STATUSES.flatMap(codesOfStatus);
  schemas.ErrorOther = {
    type: 'object',
    description: 'An error of a status the operation does not list',
    required: ['statusCode', 'code', 'error', 'message'],
    properties: {
      statusCode: { type: 'integer', enum: OTHER_STATUSES },
      code: { type: 'string', enum: otherCodes },
      error: { type: 'string' },
      message: { type: 'string' },
    },
    additionalProperties: true,
    example: { statusCode: 405, code: 'METHOD_NOT_ALLOWED', error: 'Method Not Allowed', message: '/v1/sessions has no DELETE; it allows GET, HEAD, POST' },
  };
  responses.ErrorOther = {
    description: 'A status the operation does not list: 405 (a method the path does not have; Allow lists those it has), 406 (an Accept that excludes JSON, to an operation that answers only JSON), 408 (the request was not received in time), ' +
      '414 (a path segment over 512 characters), 431 (request line and headers over 256 KiB), 500 (an unexpected failure; the log has the details), ' +
      '507 (a write on the embedded database, whose disk is nearly full: ASGD_MIN_FREE_BYTES; or on a database whose disk is full). The `code` is one of:\n\n' +
      otherCodes.map((c) => `- \`${c}\`: ${CODES[c].meaning}`).join('\n'),
    headers: headerRefs([]),
    content: { 'application/json': { schema: { $ref: '#/components/schemas/ErrorOther' } } },
  };
  const components = (doc.components ?? {}) as Json;
  const headers = Object.fromEntries(Object.entries(HEADERS).map(([name, h]) => [name.replace(/-/g, ''), CONDITIONAL_HEADERS[name] ? { ...h, description: `${h.description}. Sent on ${CONDITIONAL_HEADERS[name]}` } : h]));
  doc.components = { ...components, schemas: Object.fromEntries(Object.entries(schemas).sort(([a], [b]) => a.localeCompare(b))), responses, headers };
  return doc;
}
