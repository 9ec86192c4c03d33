// The dashboard's shell: who the token is, the token prompt, and the routes #/ (sessions) and
// #/s/<name> (one session). Each page returns a function that stops its timers and streams.
import { api, ApiError, backoffMs, getToken, setToken, setUnauthorizedHandler } from './api.js';
import { h, SESSION_NAME, SESSION_NAME_RULE } from './format.js';
import { lastListHash, sessionsPage } from './sessions.js';
import { sessionPage } from './session.js';

/** @typedef {{ id: string, name: string, scope: 'read' | 'step' | 'admin', sessions: string[] | null, auth: boolean }} Who */

const app = /** @type {HTMLElement} */ (document.getElementById('app'));
const crumbs = /** @type {HTMLElement} */ (document.getElementById('crumbs'));
const whoEl = /** @type {HTMLElement} */ (document.getElementById('who'));

/** @type {(() => void) | null} */
let stopPage = null;


/** Asks for a token in the dialog; resolves once one was entered. @param {string} reason */
function askToken(reason) {
  const dialog = /** @type {HTMLDialogElement} */ (document.getElementById('token-dialog'));
  const input = /** @type {HTMLInputElement} */ (document.getElementById('token-input'));
  /** @type {HTMLElement} */ (document.getElementById('token-reason')).textContent = reason;
  input.value = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      setToken(input.value.trim() || null);
      resolve(undefined);
    }, { once: true });
  });
}

/** Whether the token prompt was shown since the page last moved the focus (then it goes to the heading). */
let prompted = false;

/**
 * Who the tab's token is; asks for a token until the service accepts one. `reason` is what the prompt says
 * while no token was entered (Escape closed it): the reason it was first shown for, not a generic one (a
 * review: a revoked token's reason was lost on Escape).
 * @param {string} [reason] @returns {Promise<Who>}
 */
async function identify(reason = 'This service needs a bearer token to show its sessions.') {
  for (;;) {
    try {
      return await api('/v1/tokens/self');
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      if (getToken()) reason = `The service refused the token: ${err.message}`;
      setToken(null);
      prompted = true;
      await askToken(reason);
    }
  }
}

/** @param {Who} who */
function showWho(who) {
  whoEl.replaceChildren();
  if (!who.auth) {
    whoEl.append('auth off');
    return;
  }
  whoEl.append(
    `${who.name} · ${who.scope}${who.sessions ? ` · ${who.sessions.length} session${who.sessions.length === 1 ? '' : 's'}` : ''} `,
    h('button', { onclick: () => { setToken(null); location.reload(); } }, 'Change token'),
  );
}

/**
 * Shows the page the hash names. After a navigation (not the first load) the focus moves to the page's
 * main heading, so that a screen reader or the keyboard starts there rather than on <body>.
 * @param {Who} who @param {boolean} [navigated]
 */
function route(who, navigated = false) {
  stopPage?.();
  stopPage = null;
  app.replaceChildren();
  // Each page starts clean: what the last one marked on #app (its version, that its session was deleted)
  // is not this one's (found by a review: after one deleted session, later pages in the tab stayed green
  // while their reads failed).
  for (const key of Object.keys(app.dataset)) delete app.dataset[key];
  const m = /^#\/s\/([^/?]+)/.exec(location.hash);
  if (m) {
    /** @type {string | null} */
    let name = null;
    try {
      name = decodeURIComponent(m[1]);
    } catch {
      // A malformed escape (e.g. %E0): not a name at all.
    }
    crumbs.replaceChildren(h('a', { href: lastListHash() }, 'Sessions'), ' / ', h('b', {}, name ?? m[1]));
    if (name !== null && SESSION_NAME.test(name)) stopPage = sessionPage(app, name, who);
    else {
      // No request for a name the API refuses (".." would even resolve to another route).
      app.append(
        h('h1', { className: 'title', tabindex: '-1' }, name ?? m[1]),
        h('p', { className: 'error', id: 'bad-name' }, `This is not a session name: a name is ${SESSION_NAME_RULE}.`),
      );
    }
  } else {
    crumbs.replaceChildren(h('b', {}, 'Sessions'));
    stopPage = sessionsPage(app, who);
  }
  if (navigated) /** @type {HTMLElement | null} */ (app.querySelector('h1'))?.focus();
}

/** @type {Who | null} */
let current = null;
let asking = false;

/**
 * The service refused the token while a page was open (revoked, expired, or the service's admin token
 * changed): the page stops (no retries with a refused token) and the prompt says why; with the new token
 * the page opens again.
 * @param {string} message
 */
async function tokenRefused(message) {
  if (asking || !current?.auth) return;
  asking = true;
  stopPage?.();
  stopPage = null;
  app.replaceChildren(h('p', { className: 'error', id: 'token-refused' }, `The service refused the token: ${message}`));
  try {
    setToken(null);
    const reason = `The service refused the token: ${message}`;
    await askToken(reason);
    current = await identify(reason);
    showWho(current);
    route(current, true);
  } catch (err) {
    app.replaceChildren(h('p', { className: 'error' }, `The service could not be reached: ${err instanceof Error ? err.message : String(err)}`));
  } finally {
    asking = false;
  }
}

/**
 * Who the token is, asked again with a growing delay (1 s, 2 s, 4 s, … 30 s) while the service cannot
 * be reached or answers with an error (e.g. 503 while its database is unreachable): the page says so and
 * opens by itself once the service answers.
 * @returns {Promise<Who>}
 */
async function identifyRetrying() {
  for (let failures = 1; ; failures++) {
    try {
      return await identify();
    } catch (err) {
      const retryMs = backoffMs(failures);
      // An answer (a 503 while its database is down) is not "could not be reached".
      const answered = err instanceof ApiError;
      app.replaceChildren(h('p', { className: 'error', id: 'unreachable' },
        `${answered ? `The service answered ${err.status}` : 'The service could not be reached'}: ${err instanceof Error ? err.message : String(err)}; trying again in ${Math.round(retryMs / 1000)} s.`));
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  }
}

async function start() {
  try {
    current = await identifyRetrying();
    app.replaceChildren();
    showWho(current);
    setUnauthorizedHandler((message) => void tokenRefused(message));
    addEventListener('hashchange', () => { if (current && !asking) route(current, true); });
    // After the token prompt, the focus goes to the page's heading, not to <body> (a review).
    route(current, prompted);
  } catch (err) {
    app.replaceChildren(h('p', { className: 'error' }, `The service could not be reached: ${err instanceof Error ? err.message : String(err)}`));
  }
}

start();
