// One HTTP exchange with the service, with the retries that are safe: after a 429/502/503/504 answer
// (the service changed nothing), after a refused connection (nothing was sent), and after a lost answer
// only for reads and for requests that carry an Idempotency-Key (the service answers a repeat as it
// answered the first and does not apply it twice). All retries of one call share one time budget.
import { ConnectionFailed, errorClass, type ErrorBody, ProtocolError } from './errors.ts';

export interface TransportOptions {
  /**
   * Bearer token (the admin token or one from POST /v1/tokens). Absent or undefined: `ASGD_TOKEN` from the
   * environment (Node), as the Python client does, else none; null or '': none.
   */
  token?: string | null | undefined;
  /** Total time one call may spend retrying, in milliseconds (default 60 000; 0: no retries). */
  retryBudgetMs?: number;
  /** A fetch to use instead of the global one (tests, proxies). */
  fetch?: typeof fetch;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
  /** One attempt's limit in milliseconds (default 300 000, the service's own request timeout); then it counts as a lost answer. */
  timeoutMs?: number;
  /**
   * Where the client says what a user should know without anything failing: each retry, a gradient dropped
   * as stale, a session created or joined. Default `consoleLogger` (warnings to console.warn, as Python's
   * logging shows warnings unconfigured; info not shown); null: silent.
   */
  logger?: ClientLogger | null;
}

/** Receives the client's warnings (retries, stale drops) and, when it has `info`, its notices (session created or joined). */
export interface ClientLogger {
  warn(message: string): void;
  info?(message: string): void;
}

/** The default logger: warnings to console.warn, prefixed "asgd-client:"; notices not shown. */
export const consoleLogger: ClientLogger = { warn: (message) => console.warn(`asgd-client: ${message}`) };

export interface Exchange {
  method: string;
  path: string;
  query?: Record<string, string | number | boolean | undefined>;
  headers?: Record<string, string | undefined>;
  /** A JSON value, or bytes sent with `contentType`. */
  json?: unknown;
  bytes?: Uint8Array;
  contentType?: string;
  accept?: string;
  /** Statuses returned as answers rather than thrown (304 for conditional and waiting reads). */
  allow?: number[];
  /** May the request be sent again after its answer was lost? (reads, or a write with an Idempotency-Key) */
  repeatable?: boolean;
  /** Per-call override of the retry budget. */
  retryBudgetMs?: number;
  /**
   * How long the service may hold this request before it answers, as asked (a round's `?wait=`): each
   * attempt's timeout is `timeoutMs` on top of it, and the retry budget starts once it has passed, so a
   * connection lost late in a hold is still retried.
   */
  holdMs?: number;
  /**
   * Ends the call (and its retries and waits) when aborted: it rejects with the signal's reason (an
   * AbortError DOMException unless given). A write whose request went out may have been applied (a step:
   * send it again with the same Idempotency-Key to know; it is applied once).
   */
  signal?: AbortSignal;
}

export interface Answer {
  status: number;
  headers: Headers;
  bytes: Uint8Array;
  /** Attempts it took (1 without retries). */
  attempts: number;
}

const RETRY_STATUS = new Set([429, 502, 503, 504]);
/** Waits `ms`, or rejects with `signal`'s reason once it is aborted. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * How long to wait before retrying a 429/502/503/504: its Retry-After, else the back-off. A Retry-After
 * past the retry budget ends the retries at once (a request sent before it is sure to be refused).
 */
/** Retry-After in seconds or as an HTTP-date (RFC 9110 10.2.3; a proxy may send the date), else the back-off. */
function retryWait(res: Response, pause: number): number {
  const header = res.headers.get('retry-after')?.trim();
  if (!header) return pause;
  const after = /^\d+(\.\d+)?$/.test(header) ? Number(header) * 1000 : Date.parse(header) - Date.now();
  return Number.isFinite(after) && after > 0 ? after : pause;
}

/**
 * A browser's fetch says only "Failed to fetch" (a TypeError without a cause) for a refused connection, a
 * lost answer and a CORS refusal alike: the error then says what to check when the service is on another
 * origin than the page.
 */
function browserHint(url: string, err: unknown): string | undefined {
  const origin = (globalThis as { location?: { origin?: string } }).location?.origin;
  if (!origin || origin === 'null' || !(err instanceof TypeError) || err.cause !== undefined) return undefined;
  let target: string;
  try {
    target = new URL(url).origin;
  } catch {
    return undefined;
  }
  if (target === origin) return undefined;
  return `a network error, or the service at ${target} refused this page's origin ${origin}: is it in the service's ASGD_CORS_ORIGINS? (the browser's console says which)`;
}

/** Was the request certainly never received? (then any method may be sent again) */
function neverSent(err: unknown): boolean {
  const code = (err as { cause?: { code?: string } })?.cause?.code;
  return code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EAI_AGAIN';
}

/**
 * Failures that no retry can mend (Node's fetch: a URL it cannot send to, a port fetch refuses): thrown at
 * once rather than retried for the whole budget.
 */
function permanent(err: unknown): boolean {
  const cause = (err as { cause?: { code?: string; message?: string } })?.cause;
  return cause?.code === 'ERR_INVALID_URL' || cause?.message === 'unknown scheme' || cause?.message === 'bad port';
}

const EXPECTED_URL = 'an http:// or https:// URL such as http://host:port (e.g. http://127.0.0.1:8080)';

/**
 * The base URL, checked: an absolute http(s) URL without credentials, query or fragment (a path prefix is
 * fine), or in a browser a path on the page's own origin ("/asgd"). Anything else is a TypeError at once,
 * naming the URL and what is expected, rather than a minute of retries of a request that cannot be sent.
 */
export function checkBaseUrl(baseUrl: string): string {
  const shown = JSON.stringify(baseUrl);
  if (typeof baseUrl !== 'string') throw new TypeError(`ASGDClient: the base URL must be a string, ${EXPECTED_URL}; got ${String(baseUrl)}`);
  const trimmed = baseUrl.replace(/\/+$/, '');
  // "localhost:8080" parses as the scheme "localhost:", and "127.0.0.1:8080" not at all: both are a host and a port.
  const hostPort = /^[A-Za-z0-9.-]+:\d+(\/|$)/.test(baseUrl) || /^\[[0-9A-Fa-f:.]+\]:\d+(\/|$)/.test(baseUrl);
  if (hostPort) throw new TypeError(`ASGDClient: the base URL ${shown} has no scheme; expected ${EXPECTED_URL}: did you mean "http://${trimmed}"?`);
  const page = (globalThis as { location?: { href?: string } }).location?.href;
  let url: URL;
  try {
    url = baseUrl.startsWith('/') && !baseUrl.startsWith('//') && page ? new URL(baseUrl, page) : new URL(baseUrl);
  } catch {
    throw new TypeError(`ASGDClient: the base URL ${shown} is not a URL; expected ${EXPECTED_URL}`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new TypeError(`ASGDClient: the base URL ${shown} has the scheme "${url.protocol.slice(0, -1)}"; expected ${EXPECTED_URL}`);
  }
  if (url.username || url.password) throw new TypeError(`ASGDClient: the base URL ${shown} holds credentials, which fetch refuses; pass a token in the options instead (expected ${EXPECTED_URL})`);
  if (url.search || url.hash) throw new TypeError(`ASGDClient: the base URL ${shown} has a query or fragment; expected ${EXPECTED_URL}, optionally with a path prefix`);
  return trimmed;
}

/** What a failed attempt was, for a retry's warning: the status and the service's code, or the connection error. */
function failureOf(what: Response | unknown): string {
  if (what instanceof Response) return `${what.status}${what.statusText ? ` ${what.statusText}` : ''}`;
  const cause = (what as { cause?: { code?: string; message?: string } })?.cause;
  return cause?.code ?? cause?.message ?? (what as Error)?.message ?? String(what);
}

/** ASGD_TOKEN from the environment (Node; a browser has none), or undefined. */
const environmentToken = (): string | undefined => (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.ASGD_TOKEN || undefined;

export class Transport {
  readonly baseUrl: string;
  /** The options' logger (consoleLogger unless given; null: silent). */
  readonly logger: ClientLogger | null;
  private readonly options: TransportOptions;
  /** The token sent (options.token, else ASGD_TOKEN from the environment), or null. */
  private readonly token: string | null;

  constructor(baseUrl: string, options: TransportOptions = {}) {
    this.baseUrl = checkBaseUrl(baseUrl);
    this.token = (options.token === undefined ? environmentToken() : options.token) || null;
    this.options = options;
    this.logger = options.logger === undefined ? consoleLogger : options.logger;
  }

  /** The retry budget of a call that does not name its own (the options' retryBudgetMs, default 60 000 ms). */
  get retryBudgetMs(): number {
    return this.options.retryBudgetMs ?? 60_000;
  }

  /** Says a retry is coming: Python's line ("POST url: 503; retry 2 (58 s of the retry budget left)"). */
  private retrying(method: string, url: string, what: Response | unknown, attempt: number, deadline: number): void {
    const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
    this.logger?.warn(`${method} ${url}: ${failureOf(what)}; retry ${attempt} (${left} s of the retry budget left)`);
  }

  url(path: string, query?: Exchange['query']): string {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) params.set(k, String(v));
    const qs = params.toString();
    return `${this.baseUrl}${path}${qs ? `?${qs}` : ''}`;
  }

  async send(x: Exchange): Promise<Answer> {
    const url = this.url(x.path, x.query);
    const headers = this.headersOf(x);
    let body: Uint8Array | string | undefined;
    if (x.json !== undefined) {
      body = JSON.stringify(x.json);
      headers['content-type'] = 'application/json';
    } else if (x.bytes) {
      body = x.bytes;
      headers['content-type'] = x.contentType ?? 'application/octet-stream';
    }
    const doFetch = this.options.fetch ?? fetch;
    const budget = x.retryBudgetMs ?? this.retryBudgetMs;
    const hold = Math.max(0, x.holdMs ?? 0);
    let deadline = Date.now() + budget;
    let pause = 100;
    const caller = x.signal;
    for (let attempt = 1; ; attempt++) {
      caller?.throwIfAborted();
      let res: Response;
      const timeout = AbortSignal.timeout((this.options.timeoutMs ?? 300_000) + hold);
      const began = Date.now();
      // A request the service may hold (a round's contribution): the budget counts from the end of the hold
      // it had, so a connection lost late in a hold is still retried; one refused at once held nothing, and
      // adds nothing (found by a review: a step naming its worker retried a server that was down for 61 s
      // on a 2 s budget).
      const held = () => {
        if (hold > 0) deadline += Math.min(Date.now() - began, hold);
      };
      try {
        res = await doFetch(url, { method: x.method, headers, body: body as BodyInit | undefined, signal: caller ? AbortSignal.any([caller, timeout]) : timeout });
      } catch (err) {
        if (caller?.aborted) throw caller.reason;
        held();
        if (!permanent(err) && (x.repeatable || neverSent(err)) && Date.now() + pause < deadline) {
          this.retrying(x.method, url, err, attempt, deadline);
          await sleep(pause, caller);
          pause = Math.min(pause * 2, 2_000);
          continue;
        }
        throw new ConnectionFailed(x.method, url, attempt, err, browserHint(url, err));
      }
      let bytes: Uint8Array;
      try {
        bytes = new Uint8Array(await res.arrayBuffer());
      } catch (err) {
        if (caller?.aborted) throw caller.reason;
        held();
        // The connection broke during the answer: the request may have been applied.
        if (x.repeatable && Date.now() + pause < deadline) {
          this.retrying(x.method, url, err, attempt, deadline);
          await sleep(pause, caller);
          pause = Math.min(pause * 2, 2_000);
          continue;
        }
        throw new ConnectionFailed(x.method, url, attempt, err, browserHint(url, err));
      }
      if ((res.status >= 200 && res.status < 300) || x.allow?.includes(res.status)) return { status: res.status, headers: res.headers, bytes, attempts: attempt };
      if (RETRY_STATUS.has(res.status)) {
        held();
        const wait = retryWait(res, pause);
        if (Date.now() + wait < deadline) {
          this.retrying(x.method, url, res, attempt, deadline);
          await sleep(wait, caller);
          pause = Math.min(pause * 2, 2_000);
          continue;
        }
      }
      throw this.error(x.method, url, res, bytes);
    }
  }

  /**
   * Opens a streamed answer (server-sent events): the Response once its status is 2xx, its body unread.
   * Retries as send() does before the stream starts (a refused connection, 429/502/503/504; reads only).
   * An attempt whose headers do not come within `headersTimeoutMs` (a hung server keeps the connection up
   * and says nothing) is abandoned and counts as a lost answer.
   */
  async open(x: Exchange, signal?: AbortSignal, headersTimeoutMs = this.options.timeoutMs ?? 300_000): Promise<Response> {
    const url = this.url(x.path, x.query);
    const headers = this.headersOf(x);
    const doFetch = this.options.fetch ?? fetch;
    const deadline = Date.now() + (x.retryBudgetMs ?? this.retryBudgetMs);
    let pause = 100;
    for (let attempt = 1; ; attempt++) {
      let res: Response;
      // Not AbortSignal.timeout: this signal also governs the body, which is read long after the headers.
      const silent = new AbortController();
      const timer = Number.isFinite(headersTimeoutMs)
        ? setTimeout(() => silent.abort(new DOMException(`no answer within ${headersTimeoutMs} ms`, 'TimeoutError')), headersTimeoutMs)
        : undefined;
      try {
        res = await doFetch(url, { method: x.method, headers, signal: signal ? AbortSignal.any([signal, silent.signal]) : silent.signal });
      } catch (err) {
        if (signal?.aborted) throw err;
        if (!permanent(err) && Date.now() + pause < deadline) {
          this.retrying(x.method, url, err, attempt, deadline);
          await sleep(pause, signal); // an abort ends the wait, and the call, at once
          pause = Math.min(pause * 2, 2_000);
          continue;
        }
        throw new ConnectionFailed(x.method, url, attempt, err, browserHint(url, err));
      } finally {
        clearTimeout(timer);
      }
      if (res.status >= 200 && res.status < 300) return res;
      const bytes = new Uint8Array(await res.arrayBuffer());
      if (RETRY_STATUS.has(res.status)) {
        const wait = retryWait(res, pause);
        if (Date.now() + wait < deadline) {
          this.retrying(x.method, url, res, attempt, deadline);
          await sleep(wait, signal);
          pause = Math.min(pause * 2, 2_000);
          continue;
        }
      }
      throw this.error(x.method, url, res, bytes);
    }
  }

  /** The request's headers: the client's own, the token, the exchange's, its Accept. */
  private headersOf(x: Exchange): Record<string, string> {
    const headers: Record<string, string> = { ...this.options.headers };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    for (const [k, v] of Object.entries(x.headers ?? {})) if (v !== undefined) headers[k] = v;
    if (x.accept) headers.accept = x.accept;
    return headers;
  }

  async json<T>(x: Exchange): Promise<{ value: T; answer: Answer }> {
    const answer = await this.send({ accept: 'application/json', ...x });
    return { value: parseJson<T>(answer, x.method, x.path), answer };
  }

  private error(method: string, url: string, res: Response, bytes: Uint8Array) {
    const text = new TextDecoder().decode(bytes);
    let body: ErrorBody | string = text;
    try {
      body = JSON.parse(text) as ErrorBody;
    } catch {
      // not JSON (a proxy's page): keep the text
    }
    const code = typeof body === 'object' && typeof body.code === 'string' ? body.code : `HTTP_${res.status}`;
    const message = typeof body === 'object' && typeof body.message === 'string' ? body.message : text.slice(0, 500);
    const Class = errorClass(res.status, code);
    return new Class(res.status, code, message, { method, url, body, headers: res.headers });
  }
}

export function parseJson<T>(answer: Answer, method: string, path: string): T {
  const text = new TextDecoder().decode(answer.bytes);
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new ProtocolError(`${method} ${path}: the answer (${answer.status}, ${answer.headers.get('content-type')}) is not JSON: ${text.slice(0, 200)}`);
  }
}

/** A new Idempotency-Key (Web Crypto: in Node and every browser). */
/**
 * A random UUID (version 4). `crypto.randomUUID` exists only in secure contexts (https, localhost): a page
 * served over plain http from another host (`http://devbox:3000`) has `crypto.getRandomValues` alone.
 */
export function randomUuid(): string {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; // version 4
  b[8] = (b[8] & 0x3f) | 0x80; // the RFC 9562 variant
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export const newIdempotencyKey = (): string => randomUuid();
