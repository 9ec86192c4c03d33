// The API as the dashboard uses it: fetch with the tab's token, errors as ApiError, and the events
// stream read through fetch (EventSource cannot send an Authorization header).

const TOKEN_KEY = 'asgd-token';

/**
 * How long the page waits before it takes silence for a failure (a hung replica or a network black hole
 * keeps the connection up and says nothing). `eventsIdleMs`: the events stream carries `: keep-alive` every
 * 15 s (KEEP_ALIVE_MS in src/routes/sessions/events.ts), so 35 s without a byte is two missed ones: the
 * stream is dropped and opened again. `readMs`: a read (GET) with no complete answer by then fails. Tests
 * shorten them by setting `window.asgdTimeouts` before the page's scripts run.
 * @type {{ eventsIdleMs: number, readMs: number }}
 */
const TIMEOUTS = { eventsIdleMs: 35_000, readMs: 30_000, .../** @type {any} */ (window).asgdTimeouts };

/**
 * The URL of an API path ("/v1/..."), relative to the page: the dashboard is served at <root>/ui/, so the
 * API is at <root>/v1/ whether <root> is the host's root or a reverse proxy's path prefix ("/asgd").
 * @param {string} path
 */
export function apiUrl(path) {
  return path.startsWith('/v1/') || path === '/v1' ? new URL(`..${path}`, document.baseURI).href : path;
}

/** A read that got no answer within TIMEOUTS.readMs. */
class TimeoutError extends Error {
  /** @param {number} ms */
  constructor(ms) {
    super(`no answer within ${ms / 1000} s`);
    this.name = 'TimeoutError';
  }
}

/**
 * The signal for a read: the caller's, and a timeout. `timedOut()` tells the timeout from the caller's abort.
 * @param {AbortSignal | null | undefined} signal @param {number} ms
 */
export function readSignal(signal, ms = TIMEOUTS.readMs) {
  const timeout = AbortSignal.timeout(ms);
  return { signal: signal ? AbortSignal.any([signal, timeout]) : timeout, timedOut: () => timeout.aborted && !signal?.aborted, ms };
}

export class ApiError extends Error {
  /** @param {number} status @param {string} code @param {string} message */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** @returns {string | null} */
export const getToken = () => sessionStorage.getItem(TOKEN_KEY);
/** @param {string | null} token */
export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** @param {Record<string, string>} [headers] */
function withAuth(headers = {}) {
  const token = getToken();
  return token ? { ...headers, authorization: `Bearer ${token}` } : headers;
}

/** Errors of fetch itself (no answer came): the service or the network is away. */
const unreachableErrors = new WeakSet();

/** Whether a read failed for want of an answer (fetch failed, or timed out), not for what came back. @param {unknown} err */
export function isUnreachable(err) {
  return err instanceof TimeoutError || (err instanceof Error && unreachableErrors.has(err));
}

/**
 * A request with the tab's token. A read (GET) that has no complete answer within TIMEOUTS.readMs fails
 * with a TimeoutError; writes are not timed (a restore may take long, and giving up would not undo it).
 * @param {string} path
 * @param {RequestInit & {json?: unknown}} [init]
 * @returns {Promise<any>} the JSON answer (null for 204/304)
 */
export async function api(path, init = {}) {
  const { json, ...rest } = init;
  /** @type {Record<string, string>} */
  const headers = { accept: 'application/json', ...(/** @type {Record<string, string>} */ (rest.headers ?? {})) };
  if (json !== undefined) headers['content-type'] = 'application/json';
  const read = (rest.method ?? 'GET').toUpperCase() === 'GET' ? readSignal(rest.signal) : null;
  /** @type {Response} */
  let response;
  let text;
  try {
    response = await fetch(apiUrl(path), { ...rest, headers: withAuth(headers), ...(json !== undefined && { body: JSON.stringify(json) }), ...(read && { signal: read.signal }) });
    text = await response.text();
  } catch (err) {
    if (read?.timedOut()) throw new TimeoutError(read.ms);
    if (err instanceof Error && err.name !== 'AbortError') unreachableErrors.add(err);
    throw err;
  }
  if (response.status === 204 || response.status === 304) return null;
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON (a proxy's page): the status says what happened
  }
  if (!response.ok) {
    const err = new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText);
    refused(err);
    throw err;
  }
  return body;
}

/** Downloads a file through fetch (so the token goes along) and hands it to the browser. */
export async function download(/** @type {string} */ path, /** @type {string} */ filename) {
  const response = await fetch(apiUrl(path), { headers: withAuth() });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText);
  }
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Called when the service refuses the tab's token (401): the shell asks for another one. */
/** @type {((message: string) => void) | null} */
let onUnauthorized = null;
/** @param {(message: string) => void} handler */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}
/** @param {ApiError} err */
function refused(err) {
  if (err.status === 401) onUnauthorized?.(err.message);
}

/**
 * @typedef {'open' | 'offline' | 'error'} StreamState  open: the stream is up; offline: the service cannot be
 *   reached (retried after `retryMs`); error: it answered with an error (retried after `retryMs`)
 */

/** The delay before the n-th retry in a row (n from 1): 1 s, 2 s, 4 s, … up to 30 s. @param {number} n */
export const backoffMs = (n) => Math.min(30_000, 1000 * 2 ** Math.max(0, n - 1));

/**
 * Follows a session's events stream; calls `onEvent(name, data)` for each event and `onState` when the
 * stream opens or fails. Reconnects after a failure with a growing delay; stops when the signal aborts.
 * Resolves 'unsupported' at once when the service has no events route, 'gone' when the session was
 * deleted (its `deleted` event, or 404 once the stream had been open) or does not exist, 'aborted' when
 * the signal aborted. Throws the ApiError of a 401/403 (the token was refused or revoked).
 * @param {string} session
 * @param {(event: string, data: any) => void} onEvent
 * @param {AbortSignal} signal
 * @param {(state: StreamState, detail?: { retryMs: number, message: string, status?: number }) => void} [onState]
 * @param {() => number | null} [since] the version the page has (sent as Last-Event-ID until an event came)
 * @param {EventTarget} [wake] a 'wake' event on it ends a wait before reconnecting (the page's reads show the
 *   service is back: the stream need not sit out the rest of its backoff), and the backoff starts again
 * @returns {Promise<'unsupported' | 'gone' | 'aborted'>}
 */
export async function followEvents(session, onEvent, signal, onState, since, wake) {
  let failures = 0;
  /** The last event's id (`<version>@<n>`: it names the session followed, so a resume of one deleted meanwhile is told so). @type {string | null} */
  let lastId = null;
  while (!signal.aborted) {
    /** @type {{ message: string, status?: number, ended?: boolean }} */
    let failure;
    // One connection: dropped by the page's signal, or after TIMEOUTS.eventsIdleMs without a byte (no
    // answer, no event, no keep-alive), as a connection that broke.
    const connection = new AbortController();
    const drop = () => connection.abort();
    signal.addEventListener('abort', drop, { once: true });
    let silent = false;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let idle;
    const heard = () => {
      clearTimeout(idle);
      idle = setTimeout(() => { silent = true; connection.abort(); }, TIMEOUTS.eventsIdleMs);
    };
    try {
      /** @type {Record<string, string>} */
      const headers = { accept: 'text/event-stream' };
      const have = since?.() ?? null;
      if (lastId !== null) headers['last-event-id'] = lastId;
      else if (have !== null && have > 0) headers['last-event-id'] = String(have);
      heard();
      const response = await fetch(apiUrl(`/v1/sessions/${encodeURIComponent(session)}/events`), { headers: withAuth(headers), signal: connection.signal });
      if (!response.ok || !response.body) {
        const body = await response.json().catch(() => null);
        if (response.status === 405 || body?.code === 'ROUTE_NOT_FOUND') return 'unsupported';
        const err = new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText);
        if (response.status === 401 || response.status === 403) {
          refused(err);
          throw err;
        }
        if (body?.code === 'SESSION_NOT_FOUND') return 'gone';
        throw err;
      }
      const openedAt = Date.now();
      onState?.('open');
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let deleted = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        heard();
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let event = 'message';
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) event = line.slice(6).trim();
            else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
            else if (line.startsWith('id:') && /^\d{1,15}(@\d{1,15})?$/.test(line.slice(3).trim())) lastId = line.slice(3).trim();
          }
          if (event === 'deleted') deleted = true;
          if (data.length) {
            try {
              onEvent(event, JSON.parse(data.join('\n')));
            } catch {
              // A malformed event is skipped; the next one carries the current version anyway.
            }
          }
        }
      }
      if (deleted) return 'gone';
      // The stream ended (the service restarts, or a revoked token's stream was closed): after a stream that
      // lasted, reconnect at once (the answer says which); streams that end at once back off.
      if (Date.now() - openedAt > 10_000) failures = 0;
      failure = { message: 'the event stream ended', ended: true };
    } catch (err) {
      if (signal.aborted) return 'aborted';
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) throw err;
      failure = err instanceof ApiError ? { message: err.message, status: err.status }
        : silent ? { message: `the service stopped answering (nothing for ${TIMEOUTS.eventsIdleMs / 1000} s)` }
        : { message: 'the service cannot be reached' };
    } finally {
      clearTimeout(idle);
      signal.removeEventListener('abort', drop);
    }
    failures++;
    const retryMs = failure.ended && failures === 1 ? 0 : backoffMs(failure.ended ? failures - 1 : failures);
    onState?.(failure.status === undefined ? 'offline' : 'error', { retryMs, message: failure.message, status: failure.status });
    if (retryMs > 0) {
      const woken = new AbortController();
      const onWake = () => woken.abort();
      wake?.addEventListener('wake', onWake, { once: true });
      await sleep(retryMs, AbortSignal.any([signal, woken.signal]));
      wake?.removeEventListener('wake', onWake);
      if (woken.signal.aborted) failures = 0;
    }
  }
  return 'aborted';
}

/** Resolves after `ms`, or at once when the signal aborts. @param {number} ms @param {AbortSignal} signal */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve(undefined);
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
