// The API as the dashboard uses it: fetch with the tab's token, errors as ApiError, and the events
// stream read through fetch (EventSource cannot send an Authorization header).

const TOKEN_KEY = 'asgd-token';

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

/**
 * @param {string} path
 * @param {RequestInit & {json?: unknown}} [init]
 * @returns {Promise<any>} the JSON answer (null for 204/304)
 */
export async function api(path, init = {}) {
  const { json, ...rest } = init;
  /** @type {Record<string, string>} */
  const headers = { accept: 'application/json', ...(/** @type {Record<string, string>} */ (rest.headers ?? {})) };
  if (json !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(path, { ...rest, headers: withAuth(headers), ...(json !== undefined && { body: JSON.stringify(json) }) });
  if (response.status === 204 || response.status === 304) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const err = new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText);
    refused(err);
    throw err;
  }
  return body;
}

/** Downloads a file through fetch (so the token goes along) and hands it to the browser. */
export async function download(/** @type {string} */ path, /** @type {string} */ filename) {
  const response = await fetch(path, { headers: withAuth() });
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
 * @returns {Promise<'unsupported' | 'gone' | 'aborted'>}
 */
export async function followEvents(session, onEvent, signal, onState, since) {
  let failures = 0;
  /** @type {number | null} */
  let lastVersion = null;
  while (!signal.aborted) {
    /** @type {{ message: string, status?: number, ended?: boolean }} */
    let failure;
    try {
      /** @type {Record<string, string>} */
      const headers = { accept: 'text/event-stream' };
      const have = lastVersion ?? since?.() ?? null;
      if (have !== null && have > 0) headers['last-event-id'] = String(have);
      const response = await fetch(`/v1/sessions/${encodeURIComponent(session)}/events`, { headers: withAuth(headers), signal });
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
            else if (line.startsWith('id:') && /^\d+$/.test(line.slice(3).trim())) lastVersion = Number(line.slice(3).trim());
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
      failure = err instanceof ApiError ? { message: err.message, status: err.status } : { message: 'the service cannot be reached' };
    }
    failures++;
    const retryMs = failure.ended && failures === 1 ? 0 : backoffMs(failure.ended ? failures - 1 : failures);
    onState?.(failure.status === undefined ? 'offline' : 'error', { retryMs, message: failure.message, status: failure.status });
    if (retryMs > 0) await sleep(retryMs, signal);
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
