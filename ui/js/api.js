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
  if (!response.ok) throw new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText);
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

/**
 * Follows a session's events stream; calls `onEvent(name, data)` for each event. Reconnects after an
 * error; stops when the signal aborts. Resolves false at once when the service has no events route.
 * @param {string} session
 * @param {(event: string, data: any) => void} onEvent
 * @param {AbortSignal} signal
 * @param {() => void} [onOpen]
 * @returns {Promise<boolean>}
 */
export async function followEvents(session, onEvent, signal, onOpen) {
  while (!signal.aborted) {
    try {
      const response = await fetch(`/v1/sessions/${encodeURIComponent(session)}/events`, { headers: withAuth({ accept: 'text/event-stream' }), signal });
      if (response.status === 404 || response.status === 405) {
        const body = await response.json().catch(() => null);
        if (body?.code === 'ROUTE_NOT_FOUND' || response.status === 405) return false;
      }
      if (!response.ok || !response.body) throw new ApiError(response.status, 'HTTP_ERROR', response.statusText);
      onOpen?.();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
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
          }
          if (data.length) {
            try {
              onEvent(event, JSON.parse(data.join('\n')));
            } catch {
              // A malformed event is skipped; the next one carries the current version anyway.
            }
          }
        }
      }
    } catch (err) {
      if (signal.aborted) return true;
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) throw err;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return true;
}
