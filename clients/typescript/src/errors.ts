// Errors as classes, one per stable error code of the service (src/errors.ts there), so that callers can
// `catch (e) { if (e instanceof StaleGradient) ... }`. Every service error keeps the request and the answer.
import type { RoundStatus } from './types.ts';

/** Base class of everything this client throws. */
export class ASGDError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

export interface ErrorBody {
  statusCode?: number;
  code?: string;
  error?: string;
  message?: string;
  [key: string]: unknown;
}

/** The service answered with an error status: `status`, the stable `code`, its `message`, the whole `body`. */
export class ServiceError extends ASGDError {
  readonly status: number;
  readonly code: string;
  readonly serviceMessage: string;
  readonly body: ErrorBody | string;
  readonly method: string;
  readonly url: string;
  readonly headers: Headers;

  constructor(status: number, code: string, message: string, request: { method: string; url: string; body: ErrorBody | string; headers: Headers }) {
    super(`${request.method} ${request.url} -> ${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.serviceMessage = message;
    this.body = request.body;
    this.method = request.method;
    this.url = request.url;
    this.headers = request.headers;
  }

  /** The session's current version when the answer told it (412 VERSION_MISMATCH, 409 STALE_GRADIENT). */
  get version(): number | undefined {
    const v = typeof this.body === 'object' ? this.body.version : undefined;
    return typeof v === 'number' ? v : undefined;
  }
}

/** 400: the request is malformed; `code` says how (INVALID_BODY, SHAPE_MISMATCH, UNKNOWN_PARAMETER, ...). */
export class BadRequest extends ServiceError {}
export class InvalidHyperparameter extends BadRequest {}
export class ShapeMismatch extends BadRequest {}
export class UnknownParameter extends BadRequest {}
export class InvalidTensor extends BadRequest {}
/** 401 UNAUTHORIZED: no token, or not a valid one. */
export class Unauthorized extends ServiceError {}
/** 403 FORBIDDEN: the token's scope or session list does not cover this request. */
export class Forbidden extends ServiceError {}
/** 404: the thing named does not exist. */
export class NotFound extends ServiceError {}
export class SessionNotFound extends NotFound {}
export class SnapshotNotFound extends NotFound {}
export class TokenNotFound extends NotFound {}
export class VersionNotAvailable extends NotFound {}
/** 406 NOT_ACCEPTABLE: the route cannot answer in the format asked for. */
export class NotAcceptable extends ServiceError {}
/** 409 SESSION_EXISTS. */
export class SessionExists extends ServiceError {}
/** 409 STALE_GRADIENT: older than the session's max_staleness (in a session with aggregation: its round has stepped); `version` is the current version. */
export class StaleGradient extends ServiceError {}
/**
 * 409 BASE_VERSION_AHEAD: the step's base_version is above the session's version (its database was restored
 * from an older backup; a session deleted and created again continues the name's versions, and a gradient of
 * the deleted one's is a StaleGradient with replaced_at); `version` is the session's version.
 */
export class BaseVersionAhead extends ServiceError {}
/** 409 DUPLICATE_CONTRIBUTION: this worker already contributed to the open round (with another Idempotency-Key). */
export class DuplicateContribution extends ServiceError {}
/** 409 ROUND_CONFLICT: the contribution's param_groups differ from those already in the round. */
export class RoundConflict extends ServiceError {}
/** 409 ROUND_OPEN: aggregation cannot change while a round has contributions. */
export class RoundOpen extends ServiceError {}
/** 412 VERSION_MISMATCH: If-Match did not match; `version` is the current version. */
export class VersionMismatch extends ServiceError {}
/** 413 BODY_TOO_LARGE. */
export class BodyTooLarge extends ServiceError {}
/** 415 UNSUPPORTED_MEDIA_TYPE. */
export class UnsupportedMediaType extends ServiceError {}
/** 422 NON_FINITE_GRADIENT: a gradient holds NaN or an infinity; nothing was applied. */
export class NonFiniteGradient extends ServiceError {}
/** 422 IDEMPOTENCY_KEY_REUSED: the key was used for a different request body. */
export class IdempotencyKeyReused extends ServiceError {}
/** 422 SESSION_TOO_LARGE. */
export class SessionTooLarge extends ServiceError {}
/** 429 RATE_LIMITED, still answered when the retry budget ran out. */
export class RateLimited extends ServiceError {}
/** 503 (or 502/504), still answered when the retry budget ran out. */
export class ServiceUnavailable extends ServiceError {}

/** The service could not be reached, or the answer was lost, within the retries that were safe to make. */
export class ConnectionFailed extends ASGDError {
  readonly method: string;
  readonly url: string;
  readonly attempts: number;
  /** The system's code from the causes (ECONNREFUSED, ENOTFOUND, ECONNRESET, ...), else 'CONNECTION_FAILED'. */
  readonly code: string;

  constructor(method: string, url: string, attempts: number, cause: unknown, hint?: string) {
    super(`${method} ${url}: ${describeCause(cause)}${hint ? ` (${hint})` : ''} (after ${attempts} attempt(s))`, { cause });
    this.method = method;
    this.url = url;
    this.attempts = attempts;
    this.code = systemCode(cause) ?? 'CONNECTION_FAILED';
  }
}

/** The first string `code` along an error's causes (and an AggregateError's errors), or undefined. */
function systemCode(error: unknown, depth = 0): string | undefined {
  if (error === null || typeof error !== 'object' || depth > 8) return undefined;
  const { code, cause, errors } = error as { code?: unknown; cause?: unknown; errors?: unknown };
  if (typeof code === 'string' && code !== '') return code;
  for (const inner of [cause, ...(Array.isArray(errors) ? errors : [])]) {
    const found = systemCode(inner, depth + 1);
    if (found) return found;
  }
  return undefined;
}

/**
 * A contribution's round had not stepped within the step's `maxWaitMs` (the client's limit; the service keeps
 * the contribution). Sending the same step again with `idempotencyKey` waits on without contributing twice.
 */
export class RoundPending extends ASGDError {
  readonly session: string;
  /** The open round as the service last described it: {version, contributions, samples, workers, age_s}. */
  readonly round: RoundStatus;
  readonly idempotencyKey: string | undefined;
  readonly waitedMs: number;

  constructor(session: string, round: RoundStatus, idempotencyKey: string | undefined, waitedMs: number) {
    super(`session ${session}: the round had not stepped after ${Math.round(waitedMs / 1000)} s (${JSON.stringify(round)}); send the step again with idempotencyKey ${idempotencyKey} to keep waiting`);
    this.session = session;
    this.round = round;
    this.idempotencyKey = idempotencyKey;
    this.waitedMs = waitedMs;
  }
}

/** An answer the client cannot read (not the JSON or safetensors the route promises). */
export class ProtocolError extends ASGDError {}

/**
 * Why a request failed, from the error and its causes: Node's fetch throws "fetch failed" whose cause says
 * why ("connect ECONNREFUSED 127.0.0.1:8080", "getaddrinfo ENOTFOUND host", an AggregateError of each
 * address tried), and a code ("ECONNREFUSED") that is named when the messages do not already say it.
 */
export function describeCause(cause: unknown): string {
  const parts: string[] = [];
  const codes: string[] = [];
  const seen = new Set<unknown>();
  const visit = (err: unknown, depth: number): void => {
    if (err == null || seen.has(err) || depth > 5) return;
    seen.add(err);
    if (typeof err !== 'object') {
      parts.push(String(err));
      return;
    }
    const { message, code, errors, cause: inner } = err as { message?: unknown; code?: unknown; errors?: unknown; cause?: unknown };
    if (typeof message === 'string' && message && !parts.includes(message)) parts.push(message);
    if (typeof code === 'string' && !codes.includes(code)) codes.push(code);
    if (Array.isArray(errors)) for (const e of errors.slice(0, 4)) visit(e, depth + 1);
    visit(inner, depth + 1);
  };
  visit(cause, 0);
  const text = parts.join(': ') || 'unknown error';
  const unnamed = codes.filter((c) => !text.includes(c));
  return unnamed.length ? `${text} (${unnamed.join(', ')})` : text;
}

type ServiceErrorClass = new (...args: ConstructorParameters<typeof ServiceError>) => ServiceError;

const BY_CODE: Record<string, ServiceErrorClass> = {
  INVALID_HYPERPARAMETER: InvalidHyperparameter,
  SHAPE_MISMATCH: ShapeMismatch,
  UNKNOWN_PARAMETER: UnknownParameter,
  INVALID_TENSOR: InvalidTensor,
  UNAUTHORIZED: Unauthorized,
  FORBIDDEN: Forbidden,
  SESSION_NOT_FOUND: SessionNotFound,
  SNAPSHOT_NOT_FOUND: SnapshotNotFound,
  TOKEN_NOT_FOUND: TokenNotFound,
  VERSION_NOT_AVAILABLE: VersionNotAvailable,
  NOT_ACCEPTABLE: NotAcceptable,
  SESSION_EXISTS: SessionExists,
  STALE_GRADIENT: StaleGradient,
  BASE_VERSION_AHEAD: BaseVersionAhead,
  DUPLICATE_CONTRIBUTION: DuplicateContribution,
  ROUND_CONFLICT: RoundConflict,
  ROUND_OPEN: RoundOpen,
  VERSION_MISMATCH: VersionMismatch,
  BODY_TOO_LARGE: BodyTooLarge,
  UNSUPPORTED_MEDIA_TYPE: UnsupportedMediaType,
  NON_FINITE_GRADIENT: NonFiniteGradient,
  IDEMPOTENCY_KEY_REUSED: IdempotencyKeyReused,
  SESSION_TOO_LARGE: SessionTooLarge,
  RATE_LIMITED: RateLimited,
  SERVICE_UNAVAILABLE: ServiceUnavailable,
};

const BY_STATUS: Record<number, ServiceErrorClass> = {
  400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 406: NotAcceptable, 412: VersionMismatch,
  413: BodyTooLarge, 415: UnsupportedMediaType, 429: RateLimited, 502: ServiceUnavailable, 503: ServiceUnavailable, 504: ServiceUnavailable,
};

/** The class for an answer: by its code first (codes are stable), else by its status. */
export function errorClass(status: number, code: string): ServiceErrorClass {
  return BY_CODE[code] ?? BY_STATUS[status] ?? ServiceError;
}
