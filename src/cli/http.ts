// The operator CLI's HTTP client: global fetch against a running service, every failure turned into a
// CliError with a message for a person and an exit code for a script (documented in the README).
import { printable } from './output.ts';

export const EXIT = { ok: 0, server: 1, usage: 2, notFound: 3, auth: 4, unreachable: 5 } as const;

export class CliError extends Error {
  readonly exitCode: number;
  /** A mistake in the command line (not the service's 400): the usage is shown after the message. */
  readonly showUsage: boolean;
  constructor(exitCode: number, message: string, showUsage = false) {
    super(message);
    this.exitCode = exitCode;
    this.showUsage = showUsage;
  }
}

export const usageError = (message: string) => new CliError(EXIT.usage, message, /^(unknown option|sessions: |tokens: )/.test(message));

/** An answer that is JSON but not of the shape the service sends (exit 5, as an answer that is not JSON). */
export const notOurs = (what: string) => new CliError(EXIT.unreachable, `the answer to ${what} is not what an asgd-serve sends: is --url (or ASGD_URL) an asgd-serve of this version?`);

/** Seconds a request that is not a download may take before the service counts as unreachable. */
const REQUEST_TIMEOUT_MS = 60_000;
/** The most a JSON answer (a page of 1000 sessions with their storage is ~1 MB) or an error body is read. */
const ANSWER_LIMIT_BYTES = 64 * 1024 * 1024;
const ERROR_LIMIT_BYTES = 1024 * 1024;
/** How long an error body is waited for (a download's answer has no time limit; its error body has one). */
const ERROR_BODY_TIMEOUT_MS = 10_000;

/**
 * An answer's body as text, at most `limit` bytes (else null, the rest left unread), within `timeoutMs`
 * when given (else null): a server that sends gigabytes, or trickles, cannot hold the CLI.
 */
async function boundedText(res: Response, limit: number, timeoutMs?: number): Promise<string | null> {
  if (!res.body) return '';
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  let timer: NodeJS.Timeout | undefined;
  const expired = timeoutMs === undefined ? null : new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), timeoutMs)));
  try {
    for (;;) {
      const next = expired ? await Promise.race([reader.read(), expired]) : await reader.read();
      if (next === null) return null;
      if (next.done) break;
      size += next.value.length;
      if (size > limit) return null;
      chunks.push(next.value);
    }
  } finally {
    clearTimeout(timer);
    reader.cancel().catch(() => {});
  }
  return Buffer.concat(chunks).toString('utf8');
}

export interface ApiClient {
  readonly url: string;
  /** A JSON request; resolves to the parsed answer (null for 204). `headers`: If-Match, say. */
  json<T = unknown>(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<T>;
  /** A file sent as the body, in its media type (uploads: no time limit, as downloads); resolves to the parsed JSON answer. */
  upload<T = unknown>(method: string, path: string, file: { body: Uint8Array<ArrayBuffer>; type: string }, headers?: Record<string, string>): Promise<T>;
  /** A streamed GET (downloads): the response once its status is OK. */
  stream(path: string): Promise<Response>;
}

/** What the status of an error answer means to a script. */
function exitCodeOf(status: number): number {
  if (status === 401 || status === 403) return EXIT.auth;
  if (status === 404) return EXIT.notFound;
  if (status === 400) return EXIT.usage;
  return EXIT.server;
}

async function failure(res: Response, token: string | null): Promise<CliError> {
  let code = '';
  let message = '';
  const text = (await boundedText(res, ERROR_LIMIT_BYTES, ERROR_BODY_TIMEOUT_MS).catch(() => '')) ?? '';
  try {
    const body = JSON.parse(text) as { code?: unknown; message?: unknown };
    if (typeof body.code === 'string') code = printable(body.code);
    if (typeof body.message === 'string') message = printable(body.message);
  } catch {
    // not one of the service's error bodies (a proxy's page, say): say so with the status alone
  }
  if (res.status === 401) {
    message = token ? `the token was refused (${message || 'unauthorized'})` : 'the service needs a token: pass --token or set ASGD_TOKEN';
  }
  const detail = message || printable(`HTTP ${res.status} ${res.statusText}`.trim());
  // A 404 without one of the service's error codes is some other server's (or a proxy's) "no such page":
  // to a script that is "not an asgd-serve", not "no such session".
  if (res.status === 404 && !code) return new CliError(EXIT.unreachable, `${res.url || 'the service'} answered ${detail} without an asgd-serve error code: is it an asgd-serve? (--url or ASGD_URL)`);
  return new CliError(exitCodeOf(res.status), code ? `${detail} (${code})` : detail);
}

function unreachable(url: string, err: unknown): CliError {
  const cause = (err as { cause?: { code?: string; message?: string } })?.cause;
  const why = (err as Error)?.name === 'TimeoutError' ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : cause?.code ?? cause?.message ?? (err as Error)?.message ?? String(err);
  return new CliError(EXIT.unreachable, `cannot reach ${url} (${why}): is the service running there? (--url or ASGD_URL)`);
}

export function createClient(baseUrl: string, token: string | null): ApiClient {
  let base: URL;
  try {
    base = new URL(baseUrl);
    if (base.protocol !== 'http:' && base.protocol !== 'https:') throw new Error('not http');
  } catch {
    throw usageError(`--url: ${JSON.stringify(baseUrl)} is not an http:// or https:// URL`);
  }
  // The service's root (a proxy's path prefix kept); the API's /v1, given as part of it, is not doubled.
  const root = base.href.replace(/\/+$/, '').replace(/\/v1$/, '');
  const headers = (extra: Record<string, string> = {}) => ({ ...(token ? { authorization: `Bearer ${token}` } : {}), ...extra });

  async function send(method: string, path: string, init: RequestInit & { timeout?: boolean }): Promise<Response> {
    try {
      return await fetch(`${root}${path}`, { method, ...init, signal: init.timeout === false ? undefined : AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
    } catch (err) {
      throw unreachable(root, err);
    }
  }

  /** The JSON answer of a request that is not a download (null for 204). */
  async function answer<T>(res: Response, method: string, path: string): Promise<T> {
    if (!res.ok) throw await failure(res, token);
    if (res.status === 204) return null as T;
    const text = await boundedText(res, ANSWER_LIMIT_BYTES);
    if (text === null) throw new CliError(EXIT.unreachable, `${root} answered ${method} ${path} with more than ${ANSWER_LIMIT_BYTES / 1024 / 1024} MiB of JSON: is it an asgd-serve?`);
    try {
      return JSON.parse(text) as T;
    } catch {
      throw new CliError(EXIT.unreachable, `${root} answered ${method} ${path} with something other than JSON: is it an asgd-serve?`);
    }
  }

  return {
    url: root,
    async json<T>(method: string, path: string, body?: unknown, extra: Record<string, string> = {}): Promise<T> {
      const res = await send(method, path, {
        headers: headers({ accept: 'application/json', ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...extra }),
        body: body !== undefined ? JSON.stringify(body) : undefined,
      });
      return answer<T>(res, method, path);
    },
    async upload<T>(method: string, path: string, file: { body: Uint8Array<ArrayBuffer>; type: string }, extra: Record<string, string> = {}): Promise<T> {
      const res = await send(method, path, { headers: headers({ accept: 'application/json', 'content-type': file.type, ...extra }), body: file.body, timeout: false });
      return answer<T>(res, method, path);
    },
    async stream(path: string): Promise<Response> {
      const res = await send('GET', path, { headers: headers(), timeout: false });
      if (!res.ok) throw await failure(res, token);
      return res;
    },
  };
}
