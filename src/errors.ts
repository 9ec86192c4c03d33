// Every error the API can return, in one catalogue (after fastify's lib/errors.js): the table CODES lists
// each code a client can receive with its status and meaning (the file-format codes of src/formats
// included), the factories below are the only way to build one, and the OpenAPI document lists the codes
// of each status from this table. Messages name the field at fault; 5xx bodies never carry internals.
import { FORMAT_ERROR_CODES, type FormatErrorCode } from './formats/errors.ts';

/** The codes of the API's own errors: status and meaning. Codes are stable API. */
const API_CODES = {
  /** Requests: framing, validation */
  BAD_REQUEST: [400, 'The request is malformed in a way no more specific code covers'],
  INVALID_BODY: [400, 'The body does not have the documented structure; the message names the field'],
  INVALID_JSON: [400, 'The body is not valid JSON'],
  INVALID_PATH: [400, 'A path parameter (session name, snapshot id, token id) is malformed'],
  INVALID_QUERY: [400, 'A query parameter is malformed or out of range'],
  INVALID_HEADER: [400, 'A request header is malformed (If-Match, Idempotency-Key, Content-Type, …)'],
  INVALID_URL: [400, 'The URL cannot be decoded'],
  URI_TOO_LONG: [414, 'A path segment is longer than the server reads'],
  REQUEST_TIMEOUT: [408, 'The request was not received in time'],
  HEADERS_TOO_LARGE: [431, 'The request headers are larger than the server accepts'],
  BODY_TOO_LARGE: [413, 'The body is larger than this route (or a JSON body) accepts'],
  UNSUPPORTED_MEDIA_TYPE: [415, 'The Content-Type is not one this route accepts'],
  NOT_ACCEPTABLE: [406, 'No format this route offers is acceptable (Accept, ?format=, or JSON too large)'],
  ROUTE_NOT_FOUND: [404, 'No such route'],
  METHOD_NOT_ALLOWED: [405, 'The path exists but not with this method; Allow lists the methods it has'],
  /** Sessions, tensors, hyperparameters */
  INVALID_NAME: [400, 'A session name is not 1-128 characters of A-Za-z0-9._-, or is "." or ".."'],
  INVALID_HYPERPARAMETER: [400, 'A hyperparameter is out of range or of the wrong type (as torch.optim.ASGD checks)'],
  INVALID_PARAM_GROUPS: [400, 'param_groups do not partition the parameters'],
  INVALID_TENSOR: [400, 'A tensor is malformed: shape, dtype, values, name'],
  SHAPE_MISMATCH: [400, 'A tensor does not have its parameter\'s shape'],
  UNKNOWN_PARAMETER: [400, 'A tensor names no parameter of this session'],
  EMPTY_STEP: [400, 'A step without any gradient'],
  STATE_DICT_MISMATCH: [400, 'A state_dict does not fit this session (group count, sizes)'],
  /** Also raised by src/formats for a state_dict or checkpoint file: one code for JSON and files. */
  INVALID_STATE_DICT: [400, 'A state_dict or checkpoint (JSON or file) is malformed; the message names the field'],
  INVALID_METRICS: [400, 'A step\'s metrics are malformed: at most 32 finite numbers, named by 1-128 characters without control characters'],
  SESSION_NOT_FOUND: [404, 'No session of this name'],
  SNAPSHOT_NOT_FOUND: [404, 'No snapshot of this id in this session'],
  VERSION_NOT_AVAILABLE: [404, 'The version asked for is older than the oldest snapshot or newer than the session'],
  SESSION_EXISTS: [409, 'A session of this name exists'],
  BASE_VERSION_AHEAD: [409, 'The step\'s base_version is above the session\'s version: its database was restored from an older backup (or the session was created again under a name deleted more than 30 days before: a name\'s versions go on within 30 days); the body carries the current version'],
  STALE_GRADIENT: [409, 'The gradient is older than max_staleness allows, or was computed before a restore or state load replaced the session\'s state (in a session with aggregation: older than the open round); the body carries the current version'],
  ROUND_OPEN: [409, 'A round of contributions is open: aggregation cannot change until it steps'],
  DUPLICATE_CONTRIBUTION: [409, 'This worker has already contributed to the open round'],
  ROUND_CONFLICT: [409, 'The contribution\'s param_groups differ from those of the open round\'s other contributions'],
  VERSION_MISMATCH: [412, 'If-Match does not match the session\'s version; the body carries the current version'],
  NON_FINITE_GRADIENT: [422, 'A gradient holds NaN or an infinity'],
  IDEMPOTENCY_KEY_REUSED: [422, 'An Idempotency-Key was used before for a different request'],
  SESSION_TOO_LARGE: [422, 'The session would hold more elements than the service allows'],
  INSUFFICIENT_STORAGE: [507, 'The database\'s disk has too little free space for this write (the embedded database: ASGD_MIN_FREE_BYTES); reads go on'],
  /** Access */
  UNAUTHORIZED: [401, 'No bearer token, or an unknown or revoked one (WWW-Authenticate: Bearer)'],
  FORBIDDEN: [403, 'The token\'s scope or session list does not allow this'],
  HOST_NOT_ALLOWED: [403, 'Auth is off and the request\'s Host is not a loopback name (nor in ASGD_ALLOWED_HOSTS): refused, so that a web page cannot reach the service through a DNS name of its own (DNS rebinding)'],
  TOKEN_NOT_FOUND: [404, 'No token of this id'],
  /** Load and availability */
  RATE_LIMITED: [429, 'Too many requests for this token; see Retry-After'],
  TOO_MANY_STREAMS: [429, 'This token holds as many event streams (or waiting reads) on this process as one token may; close one first'],
  SERVICE_UNAVAILABLE: [503, 'Overloaded, shutting down, or the database is unreachable; see Retry-After'],
  TOO_MANY_WAITERS: [503, 'This process holds as many waiting reads or event streams as it allows; retry shortly or on another replica'],
  SNAPSHOT_UNAVAILABLE: [503, 'A snapshot changed while it was read (another process pruned it); retry'],
  INTERNAL: [500, 'An unexpected failure; the log has the details'],
} as const satisfies Record<string, readonly [number, string]>;

export type ErrorCode = keyof typeof API_CODES | FormatErrorCode;

/**
 * Every code a client can receive: status and meaning. File-format codes (src/formats/errors.ts) are 400s;
 * one the API also raises for JSON bodies (INVALID_STATE_DICT) is listed once, with the API's meaning.
 */
export const CODES: Readonly<Record<ErrorCode, { status: number; meaning: string }>> = Object.freeze({
  ...Object.fromEntries(Object.entries(API_CODES).map(([code, [status, meaning]]) => [code, { status, meaning }])),
  ...Object.fromEntries(Object.entries(FORMAT_ERROR_CODES).filter(([code]) => !(code in API_CODES))
    .map(([code, meaning]) => [code, { status: 400, meaning: `File format: ${meaning}` }])),
} as Record<ErrorCode, { status: number; meaning: string }>);

/** The codes a response of this status can carry, in catalogue order. */
export const codesOfStatus = (status: number): ErrorCode[] => (Object.keys(CODES) as ErrorCode[]).filter((code) => CODES[code].status === status);

/**
 * A client's value for an error message: its JSON, cut at `max` characters. A value too deeply nested to
 * write (JSON.stringify overflows the stack) is described instead: the message must not fail.
 */
export function quoteValue(value: unknown, max = 200): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch {
    return Array.isArray(value) ? 'a nested list' : 'a nested object';
  }
  if (text === undefined) return typeof value;
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/**
 * A request header's text as it was sent. Node reads header bytes as latin1; a value that is valid UTF-8
 * (what clients send) is decoded as such, so a message shows "é" rather than "Ã©". Other bytes stay as read.
 */
export function headerText(value: string | readonly string[] | undefined): string {
  if (value === undefined) return '';
  const text = typeof value === 'string' ? value : value.join(', ');
  if (!/[\x80-\xff]/.test(text)) return text;
  const bytes = Buffer.from(text, 'latin1');
  const decoded = bytes.toString('utf8');
  return Buffer.from(decoded, 'utf8').equals(bytes) ? decoded : text;
}

export class ApiError extends Error {
  readonly statusCode: number;
  readonly code: ErrorCode;
  /** Extra fields sent with the error body (e.g. the current version on a 412). */
  readonly details?: Record<string, unknown>;
  readonly headers?: Record<string, string>;

  /** Only the catalogue below constructs these. */
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>, headers?: Record<string, string>) {
    super(message);
    this.name = 'ApiError';
    this.statusCode = CODES[code].status;
    this.code = code;
    this.details = details;
    this.headers = headers;
  }
}

const make =
  <A extends unknown[]>(code: ErrorCode, message: (...args: A) => string) =>
  (...args: A) =>
    new ApiError(code, message(...args));

/** The part of a request a schema checked: its code, so a bad name is INVALID_PATH on every route. */
const PART_CODES = { params: 'INVALID_PATH', querystring: 'INVALID_QUERY', headers: 'INVALID_HEADER', body: 'INVALID_BODY' } as const;
export type RequestPart = keyof typeof PART_CODES;

/**
 * For a name no parameter has: the prefix a wrapper puts before a model's own names, said with what to send
 * (a review: a DistributedDataParallel checkpoint was refused naming "module.0.weight" and nothing else).
 */
function wrapperHint(name: string): string {
  const wrapper = name.startsWith('module.') ? { prefix: 'module.', what: 'a DistributedDataParallel or DataParallel model', inner: 'model.module' }
    : name.startsWith('_orig_mod.') ? { prefix: '_orig_mod.', what: 'a torch.compile()d model', inner: 'model._orig_mod' }
    : null;
  return wrapper === null ? '' : ` (names that begin with "${wrapper.prefix}" are ${wrapper.what}'s: use the names of ${wrapper.inner} (${wrapper.inner}.state_dict(), ${wrapper.inner}.named_parameters()), or take "${wrapper.prefix}" off each name)`;
}

export const errors = {
  // 400: the request is malformed
  badRequest: make('BAD_REQUEST', (message: string) => message),
  invalidBody: make('INVALID_BODY', (message: string) => message),
  /**
   * An error about an option of a file create, named where the option was given: `prefix` before its field;
   * a generic code (INVALID_QUERY, INVALID_BODY) becomes that part's, a specific one (INVALID_HYPERPARAMETER) stays.
   */
  givenIn: (err: ApiError, prefix: string, part: 'querystring' | 'body') =>
    new ApiError(err.code === 'INVALID_QUERY' || err.code === 'INVALID_BODY' ? PART_CODES[part] : err.code, `${prefix}.${err.message}`, err.details, err.headers),
  /** A schema check failed (AJV): the code of the part, the field first in the message. */
  invalidPart: (part: RequestPart, field: string, message: string) => new ApiError(PART_CODES[part], `${field}: ${message}`),
  /** A schema check failed where the schema names a more specific code (`x-error-code`). */
  invalidField: (code: ErrorCode, field: string, message: string) => new ApiError(code, `${field}: ${message}`),
  invalidJson: make('INVALID_JSON', (message: string) => `request body is not valid JSON: ${message}`),
  invalidName: make('INVALID_NAME', (field: string) => `${field} must be 1-128 characters of A-Za-z0-9._-, not "." or ".."`),
  invalidHyperparameter: make('INVALID_HYPERPARAMETER', (field: string, message: string) => `${field}: ${message}`),
  invalidParamGroups: make('INVALID_PARAM_GROUPS', (message: string) => message),
  invalidTensor: make('INVALID_TENSOR', (field: string, message: string) => `${field}: ${message}`),
  shapeMismatch: make('SHAPE_MISMATCH', (field: string, message: string) => `${field}: ${message}`),
  unknownParameter: make('UNKNOWN_PARAMETER', (field: string, name: string, more?: string) => `${field}: no parameter named ${JSON.stringify(name)} in this session${more ? `; ${more}` : ''}${wrapperHint(name)}`),
  emptyStep: make('EMPTY_STEP', () => 'grads: a step needs a gradient for at least one parameter'),
  stateDictMismatch: make('STATE_DICT_MISMATCH', (message: string) => message),
  invalidStateDict: make('INVALID_STATE_DICT', (field: string, message: string) => `${field}: ${message}`),
  invalidMetrics: make('INVALID_METRICS', (field: string, message: string) => `${field}: ${message}`),
  invalidQuery: make('INVALID_QUERY', (field: string, message: string) => `${field}: ${message}`),
  invalidHeader: make('INVALID_HEADER', (field: string, message: string) => `${field}: ${message}`),
  /** A file that src/formats refused: its code is one of FORMAT_ERROR_CODES. */
  fileFormat: (code: FormatErrorCode, message: string) => new ApiError(code, message),
  invalidUrl: make('INVALID_URL', (message: string) => message),
  uriTooLong: make('URI_TOO_LONG', (limit: number) => `path: a path segment is longer than ${limit} characters`),
  // 401/403: access. The WWW-Authenticate challenge follows RFC 6750 section 3.
  unauthorized: (message: string, invalidToken = false) =>
    new ApiError('UNAUTHORIZED', message, undefined, {
      'www-authenticate': invalidToken ? 'Bearer realm="asgd-serve", error="invalid_token"' : 'Bearer realm="asgd-serve"',
    }),
  /**
   * `scope`: the scope the token lacks; a token of that scope refused for its list of sessions is told so in
   * `description` instead (RFC 6750's error_description: no quote or backslash), not asked for a scope it
   * has (a review: an admin token limited to sessions was told scope="admin").
   */
  forbidden: (message: string, scope?: string, description?: string) =>
    new ApiError('FORBIDDEN', message, undefined, {
      'www-authenticate': `Bearer realm="asgd-serve", error="insufficient_scope"${scope ? `, scope="${scope}"` : ''}${description ? `, error_description="${description}"` : ''}`,
    }),
  /** A cross-origin request from an origin not allowed: no Bearer challenge, no token would help (found by a review). */
  crossOriginWrite: make('FORBIDDEN', (origin: string) => `Origin: ${JSON.stringify(origin.slice(0, 200))} is another origin than this service's; with auth off (no ASGD_ADMIN_TOKEN) every request may change every session, so a write from a web page of another origin is refused (list the page's origin in ASGD_CORS_ORIGINS, or set ASGD_ADMIN_TOKEN)`),
  originNotAllowed: make('FORBIDDEN', (origin: string) => `Origin: ${JSON.stringify(origin.slice(0, 200))} is not one of the origins allowed to call this API (ASGD_CORS_ORIGINS)`),
  hostNotAllowed: make('HOST_NOT_ALLOWED', (host: string, addresses = false) => addresses
    ? `Host: ${quoteValue(headerText(host).slice(0, 300))} is a name not listed in ASGD_ALLOWED_HOSTS; with auth off (no ASGD_ADMIN_TOKEN) this service answers only requests addressed to an IP address, a loopback name or a name listed there, so that a web page cannot reach it through a DNS name of its own (DNS rebinding)`
    : `Host: ${quoteValue(headerText(host).slice(0, 300))} is not a loopback name; with auth off (no ASGD_ADMIN_TOKEN) this service answers only requests addressed to localhost, 127.0.0.1 or [::1] (or a name in ASGD_ALLOWED_HOSTS), so that a web page cannot reach it through a DNS name of its own (DNS rebinding)`),
  // 404/405/406
  sessionNotFound: make('SESSION_NOT_FOUND', (name: string) => `session ${JSON.stringify(name)} does not exist`),
  snapshotNotFound: make('SNAPSHOT_NOT_FOUND', (id: string) => `snapshot ${id} does not exist in this session`),
  tokenNotFound: make('TOKEN_NOT_FOUND', (id: string) => `token ${id} does not exist`),
  routeNotFound: make('ROUTE_NOT_FOUND', (method: string, url: string) => `no route ${method} ${url}`),
  methodNotAllowed: make('METHOD_NOT_ALLOWED', (method: string, url: string, allowed: readonly string[]) => `${url} has no ${method}; it allows ${allowed.join(', ')}`),
  versionNotAvailable: make('VERSION_NOT_AVAILABLE', (version: number, oldest: number | null, newest: number) =>
    version > newest
      ? `version: ${version} is not available: the session is at version ${newest}`
      : oldest === null
      ? `version: ${version} is not available (newest is ${newest})`
      : `version: ${version} is not available (no snapshot at or below it with the log after it is kept); the session is at version ${newest}, its oldest snapshot at ${oldest}`),
  notAcceptable: make('NOT_ACCEPTABLE', (accept: string, offered: string) => `Accept: cannot answer ${accept}; this route offers ${offered}`),
  requestTimeout: make('REQUEST_TIMEOUT', () => 'the request was not received in time'),
  // 409/412/413/415/422/431
  sessionExists: make('SESSION_EXISTS', (name: string) => `name: session ${JSON.stringify(name)} already exists`),
  staleGradient: (staleness: number, maxStaleness: number, version: number) =>
    new ApiError('STALE_GRADIENT', `base_version: the gradient is ${staleness} versions old; this session accepts at most ${maxStaleness}`, { version, staleness, max_staleness: maxStaleness }),
  gradientOfReplacedState: (baseVersion: number, historyFrom: number, version: number, maxStaleness: number | null) =>
    new ApiError('STALE_GRADIENT', `base_version: the gradient was computed at version ${baseVersion}, before the session's state was replaced at version ${historyFrom} (a restore, a state_dict or checkpoint load, or the session deleted and created again under its name): those parameters are no longer in its history, so the gradient is dropped; load the parameters and go on from them`, {
      version, staleness: version - baseVersion, max_staleness: maxStaleness, replaced_at: historyFrom,
    }),
  baseVersionAhead: (field: string, baseVersion: number, version: number) =>
    new ApiError('BASE_VERSION_AHEAD', `${field}: ${baseVersion} is newer than the session's version ${version}`, { version }),
  staleContribution: (baseVersion: number, version: number) =>
    new ApiError('STALE_GRADIENT', `base_version: the gradient was computed at version ${baseVersion}; rounds take gradients of the current version ${version}`, {
      version, staleness: version - baseVersion, max_staleness: 0,
    }),
  roundOpen: (field: string, version: number, contributions: number, instead = '') =>
    new ApiError('ROUND_OPEN', `${field}: the round at version ${version} has ${contributions} contribution(s); change it once no round is open${instead}`, { version }),
  duplicateContribution: (worker: string, version: number) =>
    new ApiError('DUPLICATE_CONTRIBUTION', `worker: ${JSON.stringify(worker)} has already contributed to the round at version ${version}`, { version }),
  roundConflict: make('ROUND_CONFLICT', (version: number) => `param_groups: differ from those of the other contributions to the round at version ${version} (a round applies one set)`),
  /** expected: the version If-Match named, or -1 for tags that name none (weak, or not a version). */
  versionMismatch: (expected: number, version: number) =>
    new ApiError('VERSION_MISMATCH', `If-Match: expected ${expected < 0 ? 'a tag that is none of this session\'s versions (they are compared strongly: "<version>")' : `"${expected}"`}, the session is at version ${version}`, { version }, { etag: `"${version}"` }),
  /** If-Match on a read of an older version (?version=): the tags name another; the body carries the session's version. */
  readVersionMismatch: (expected: number, read: number, version: number) =>
    new ApiError('VERSION_MISMATCH', `If-Match: ${expected < 0 ? 'its tags name none of this session\'s versions (they are compared strongly: "<version>")' : `expected "${expected}"`}, the version read is ${read} (the session is at version ${version})`, { version }, { etag: `"${version}"` }),
  bodyTooLarge: make('BODY_TOO_LARGE', (limit: number, variable: string) => `body: larger than the limit of ${limit} bytes for this route (${variable})`),
  bodyTooLargeToHold: make('BODY_TOO_LARGE', (bytes: number) => `body: ${bytes} bytes is more than this process can allocate to hold it; lower the ASGD_BODY_LIMIT_* setting that let it through, or send less`),
  jsonBodyTooLarge: make('BODY_TOO_LARGE', (limit: number) => `body: a JSON body is limited to ${limit} bytes; send tensors as safetensors or a torch.save file`),
  jsonTensorsTooLarge: make('BODY_TOO_LARGE', (what: string, tensors: string, limit: number, numel: number) =>
    `body: ${what} of this session (${numel} elements) takes at most ${limit} bytes; send its ${tensors} as safetensors or a torch.save file if they need more`),
  fileTensorsTooLarge: make('BODY_TOO_LARGE', (what: string, limit: number, numel: number, params: number, hint: string) =>
    `body: ${what} of this session (${numel} elements in ${params} parameter${params === 1 ? '' : 's'}) takes at most ${limit} bytes (8 an element and 4 KiB a parameter, and 1 MiB)${hint}`),
  unsupportedMediaType: make('UNSUPPORTED_MEDIA_TYPE', (type: string, accepted: string) => `Content-Type: ${type} is not accepted here; use ${accepted}`),
  unsupportedContentEncoding: make('UNSUPPORTED_MEDIA_TYPE', (coding: string) => `Content-Encoding: ${coding} is not accepted; send the body uncompressed`),
  headersTooLarge: make('HEADERS_TOO_LARGE', () => 'the request headers are larger than this server accepts'),
  nonFiniteGradient: make('NON_FINITE_GRADIENT', (field: string, index: number, overflows = false) => `${field}: element ${index} ${overflows ? 'overflows float32 (a gradient is float32: it would be infinite)' : 'is not finite'}`),
  idempotencyKeyReused: make('IDEMPOTENCY_KEY_REUSED', () => 'Idempotency-Key: this key was used for another request (another body, route or target)'),
  tooLarge: make('SESSION_TOO_LARGE', (message: string) => message),
  // 429/503
  rateLimited: (limit: number, retryAfterSeconds: number) =>
    new ApiError('RATE_LIMITED', `more than ${limit} requests a minute; retry in ${retryAfterSeconds} s`, undefined, { 'retry-after': String(retryAfterSeconds) }),
  insufficientStorage: (what: string, short: { free: number; needed: number; dir: string }, measure = 'ASGD_MIN_FREE_BYTES and twice the body') =>
    new ApiError('INSUFFICIENT_STORAGE', `${what}: the disk of the embedded database (ASGD_DATA_DIR ${short.dir}) has ${short.free} bytes free, below the ${short.needed} this write needs (${measure}); free space or grow the volume`, undefined, { 'retry-after': '60' }),
  diskFull: () =>
    new ApiError('INSUFFICIENT_STORAGE', 'the database\'s disk is full (SQLSTATE 53100): nothing of this request was committed; free space or grow the volume, then send it again', undefined, { 'retry-after': '60' }),
  unavailable: (message: string, retryAfterSeconds = 1) =>
    new ApiError('SERVICE_UNAVAILABLE', message, undefined, { 'retry-after': String(retryAfterSeconds) }),
  tooManyStreams: (limit: number, what = 'event streams', share = 'a tenth') =>
    new ApiError('TOO_MANY_STREAMS', `${what}: this token already holds ${limit} on this process (${share} of what the process holds); close one first`, undefined, { 'retry-after': '5' }),
  tooManyWaiters: (what: string, limit: number) =>
    new ApiError('TOO_MANY_WAITERS', `${what}: this process already holds ${limit}; retry shortly or on another replica`, undefined, { 'retry-after': '1' }),
  snapshotUnavailable: (id: number) =>
    new ApiError('SNAPSHOT_UNAVAILABLE', `snapshot ${id} changed while it was read; try again`, undefined, { 'retry-after': '1' }),
  internal: make('INTERNAL', () => 'internal error'),
} as const;
