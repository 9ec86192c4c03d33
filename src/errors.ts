// Every error the API can return, in one catalogue (after fastify's lib/errors.js).
// Clients get a stable `code`; messages name the field at fault; 5xx bodies never carry internals.

export class ApiError extends Error {
  readonly statusCode: number;
  readonly code: string;
  /** Extra fields sent with the error body (e.g. the current version on a 412). */
  readonly details?: Record<string, unknown>;
  readonly headers?: Record<string, string>;

  constructor(statusCode: number, code: string, message: string, details?: Record<string, unknown>, headers?: Record<string, string>) {
    super(message);
    this.name = 'ApiError';
    this.statusCode = statusCode;
    this.code = code;
    this.details = details;
    this.headers = headers;
  }
}

const make =
  <A extends unknown[]>(statusCode: number, code: string, message: (...args: A) => string) =>
  (...args: A) =>
    new ApiError(statusCode, code, message(...args));

export const errors = {
  // 400: the request is malformed
  badRequest: make(400, 'BAD_REQUEST', (message: string) => message),
  invalidBody: make(400, 'INVALID_BODY', (message: string) => message),
  invalidJson: make(400, 'INVALID_JSON', (message: string) => `request body is not valid JSON: ${message}`),
  invalidName: make(400, 'INVALID_NAME', (field: string) => `${field} must be 1-128 characters of A-Za-z0-9._-`),
  invalidHyperparameter: make(400, 'INVALID_HYPERPARAMETER', (field: string, message: string) => `${field}: ${message}`),
  invalidParamGroups: make(400, 'INVALID_PARAM_GROUPS', (message: string) => message),
  invalidTensor: make(400, 'INVALID_TENSOR', (field: string, message: string) => `${field}: ${message}`),
  shapeMismatch: make(400, 'SHAPE_MISMATCH', (field: string, message: string) => `${field}: ${message}`),
  unknownParameter: make(400, 'UNKNOWN_PARAMETER', (field: string, name: string) => `${field}: no parameter named ${JSON.stringify(name)} in this session`),
  emptyStep: make(400, 'EMPTY_STEP', () => 'grads: a step needs a gradient for at least one parameter'),
  stateDictMismatch: make(400, 'STATE_DICT_MISMATCH', (message: string) => message),
  invalidStateDict: make(400, 'INVALID_STATE_DICT', (field: string, message: string) => `${field}: ${message}`),
  invalidMetrics: make(400, 'INVALID_METRICS', (field: string, message: string) => `${field}: ${message}`),
  invalidQuery: make(400, 'INVALID_QUERY', (field: string, message: string) => `${field}: ${message}`),
  invalidHeader: make(400, 'INVALID_HEADER', (field: string, message: string) => `${field}: ${message}`),
  fileFormat: (code: string, message: string) => new ApiError(400, code, message),
  invalidPath: make(400, 'INVALID_PATH', (message: string) => message),
  invalidUrl: make(400, 'INVALID_URL', (message: string) => message),
  uriTooLong: make(414, 'URI_TOO_LONG', (limit: number) => `path: a path segment is longer than ${limit} characters`),
  // 401/403: access. The WWW-Authenticate challenge follows RFC 6750 section 3.
  unauthorized: (message: string, invalidToken = false) =>
    new ApiError(401, 'UNAUTHORIZED', message, undefined, {
      'www-authenticate': invalidToken ? 'Bearer realm="asgd-serve", error="invalid_token"' : 'Bearer realm="asgd-serve"',
    }),
  forbidden: (message: string, scope?: string) =>
    new ApiError(403, 'FORBIDDEN', message, undefined, {
      'www-authenticate': `Bearer realm="asgd-serve", error="insufficient_scope"${scope ? `, scope="${scope}"` : ''}`,
    }),
  // 404/405/406
  sessionNotFound: make(404, 'SESSION_NOT_FOUND', (name: string) => `session ${JSON.stringify(name)} does not exist`),
  snapshotNotFound: make(404, 'SNAPSHOT_NOT_FOUND', (id: string) => `snapshot ${id} does not exist in this session`),
  tokenNotFound: make(404, 'TOKEN_NOT_FOUND', (id: string) => `token ${id} does not exist`),
  routeNotFound: make(404, 'ROUTE_NOT_FOUND', (method: string, url: string) => `no route ${method} ${url}`),
  versionNotAvailable: make(404, 'VERSION_NOT_AVAILABLE', (version: number, oldest: number | null, newest: number) =>
    oldest === null
      ? `version: ${version} is not available (newest is ${newest})`
      : `version: ${version} is not available; versions ${oldest} to ${newest} can be read`),
  notAcceptable: make(406, 'NOT_ACCEPTABLE', (accept: string, offered: string) => `Accept: cannot answer ${accept}; this route offers ${offered}`),
  requestTimeout: make(408, 'REQUEST_TIMEOUT', () => 'the request was not received in time'),
  // 409/412/413/415/422/431
  sessionExists: make(409, 'SESSION_EXISTS', (name: string) => `name: session ${JSON.stringify(name)} already exists`),
  staleGradient: (staleness: number, maxStaleness: number, version: number) =>
    new ApiError(409, 'STALE_GRADIENT', `base_version: the gradient is ${staleness} versions old; this session accepts at most ${maxStaleness}`, { version, staleness, max_staleness: maxStaleness }),
  versionMismatch: (expected: string, version: number) =>
    new ApiError(412, 'VERSION_MISMATCH', `If-Match: expected ${expected}, the session is at version ${version}`, { version }, { etag: `"${version}"` }),
  bodyTooLarge: make(413, 'BODY_TOO_LARGE', (limit: number) => `body: larger than the limit of ${limit} bytes for this route`),
  unsupportedMediaType: make(415, 'UNSUPPORTED_MEDIA_TYPE', (type: string, accepted: string) => `Content-Type: ${type} is not accepted here; use ${accepted}`),
  headersTooLarge: make(431, 'HEADERS_TOO_LARGE', () => 'the request headers are larger than this server accepts'),
  nonFiniteGradient: make(422, 'NON_FINITE_GRADIENT', (field: string, index: number) => `${field}: element ${index} is not finite`),
  idempotencyKeyReused: make(422, 'IDEMPOTENCY_KEY_REUSED', () => 'Idempotency-Key: this key was used for a request with a different body'),
  tooLarge: make(422, 'SESSION_TOO_LARGE', (message: string) => message),
  // 429/503
  rateLimited: (limit: number, retryAfterSeconds: number) =>
    new ApiError(429, 'RATE_LIMITED', `more than ${limit} requests a minute; retry in ${retryAfterSeconds} s`, undefined, { 'retry-after': String(retryAfterSeconds) }),
  unavailable: (message: string, retryAfterSeconds = 1) =>
    new ApiError(503, 'SERVICE_UNAVAILABLE', message, undefined, { 'retry-after': String(retryAfterSeconds) }),
  tooManyWaiters: (what: string, limit: number) =>
    new ApiError(503, 'TOO_MANY_WAITERS', `${what}: this process already holds ${limit}; retry shortly or on another replica`, undefined, { 'retry-after': '1' }),
  internal: make(500, 'INTERNAL', () => 'internal error'),
} as const;
