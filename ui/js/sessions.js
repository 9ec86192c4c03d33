// The sessions page: one row per session with its progress, paged by name (the API's cursor) and
// filtered on the server by a search text, so thousands of sessions stay one small request away.
import { api } from './api.js';
import { fmtAgo, fmtBytes, fmtNum, h, keepFocus, roundCell, scrollBox } from './format.js';
import { RATE_LABEL } from './series.js';

const PAGE = 50;
/** What the API takes as a search: letters, digits, ".", "_" and "-", at most 128 (src/routes/sessions/index.ts). */
const SEARCHABLE = /^[A-Za-z0-9._-]{0,128}$/;

/** Stored bytes of a session, when the service reports them. @param {any} s @returns {number | null} */
export const storedBytes = (s) => s.storage?.total_bytes ?? null;

/** The list's hash as last shown (its search and page), for the way back from a session. */
let listHash = '#/';
export const lastListHash = () => listHash;

/**
 * The list's state in the URL's hash, so that Back (and a bookmark) brings the same search and page:
 * #/?q=<search>&after=<cursor of this page>&prev=<cursor of page 2>&prev=<page 3>… (page 1 has none).
 * @param {string} hash
 */
function parseListHash(hash) {
  const at = hash.indexOf('?');
  const query = new URLSearchParams(at >= 0 ? hash.slice(at + 1) : '');
  const after = query.get('after') || null;
  return {
    search: (query.get('q') ?? '').trim(),
    after,
    /** @type {(string | null)[]} */
    cursors: after ? [null, ...query.getAll('prev')] : [],
  };
}

/** @param {string} search @param {string | null} after @param {(string | null)[]} cursors */
function toListHash(search, after, cursors) {
  const query = new URLSearchParams();
  if (search) query.set('q', search);
  if (after) {
    query.set('after', after);
    for (const c of cursors.slice(1)) if (c) query.append('prev', c);
  }
  const text = query.toString();
  return text ? `#/?${text}` : '#/';
}

/** @param {HTMLElement} root @param {import('./main.js').Who} who */
export function sessionsPage(root, who) {
  const initial = parseListHash(location.hash);
  let search = initial.search;
  /** @type {(string | null)[]} cursors of the pages before this one */
  const cursors = initial.cursors;
  /** @type {string | null} */
  let after = initial.after;
  listHash = toListHash(search, after, cursors);
  /** @type {string | null} */
  let next = null;
  let stopped = false;

  const input = /** @type {HTMLInputElement} */ (h('input', { type: 'search', placeholder: 'Search sessions by name', 'aria-label': 'Search sessions' }));
  input.value = search;
  /** Keeps the search and page in the hash (replacing the entry: no hashchange, no new history entry). */
  function remember() {
    listHash = toListHash(search, after, cursors);
    if (location.hash !== listHash && !stopped) history.replaceState(history.state, '', listHash);
  }
  // A status (a screen reader says its changes: a review found the list's errors silent). Its waits are said
  // in coarse steps (5, 15, 30, 60 s, then each minute), not every refresh.
  const status = h('span', { className: 'muted', role: 'status' });
  const body = h('tbody');
  const openRoundHead = h('th', { className: 'num', hidden: true }, 'open round');
  const table = h('table', { id: 'sessions' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'name'), h('th', { className: 'num' }, 'step'), h('th', { className: 'num' }, 'version'),
      h('th', { className: 'num', title: 'the steps made in the last minute, divided by 60' }, RATE_LABEL), h('th', { className: 'num' }, 'since last step'),
      h('th', { className: 'num' }, 'stored'), openRoundHead, h('th', { className: 'num' }, 'parameters'))),
    body);
  const prev = /** @type {HTMLButtonElement} */ (h('button', { onclick: () => { after = cursors.pop() ?? null; remember(); load(); } }, '← Previous'));
  const nextButton = /** @type {HTMLButtonElement} */ (h('button', { onclick: () => { cursors.push(after); after = next; remember(); load(); } }, 'Next →'));
  const pageInfo = h('span', { className: 'muted' });
  root.append(
    h('div', { className: 'toolbar' }, h('h1', { className: 'title', tabindex: '-1' }, 'Sessions'), input, status),
    scrollBox('Sessions', table),
    h('div', { className: 'pager' }, prev, nextButton, pageInfo),
  );
  if (who.sessions) root.append(h('p', { className: 'muted' }, `This token sees only its ${who.sessions.length} session(s).`));

  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let debounce;
  input.addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      search = input.value.trim();
      cursors.length = 0;
      after = null;
      remember();
      load();
    }, 250);
  });

  let loading = 0;
  /** The list read in flight (a refresh waits for it rather than pile up behind a service that hangs). @type {{ ticket: number, started: number } | null} */
  let inFlight = null;
  async function load() {
    const ticket = ++loading;
    // A search no name can contain is answered here, with no request (the API would refuse it, again at
    // every refresh, while the table kept the previous results).
    if (!SEARCHABLE.test(search)) {
      next = null;
      render([], `No session name contains "${search}": names are made of letters, digits, ".", "_" and "-".`);
      status.textContent = '';
      return;
    }
    const query = new URLSearchParams({ limit: String(PAGE), figures: 'true', storage: 'true' });
    if (after) query.set('after', after);
    if (search) query.set('search', search);
    inFlight = { ticket, started: Date.now() };
    try {
      const page = await api(`/v1/sessions?${query}`);
      if (ticket !== loading || stopped) return;
      next = page.next;
      render(page.sessions);
      status.textContent = '';
    } catch (err) {
      const text = `Could not list sessions: ${err instanceof Error ? err.message : err}`;
      if (ticket === loading && status.textContent !== text) status.textContent = text;
    } finally {
      if (inFlight?.ticket === ticket) inFlight = null;
    }
  }

  /** Every few seconds: a new read, or while one is still out, how long the service has kept it waiting. */
  function refresh() {
    if (document.hidden) return;
    if (!inFlight) {
      load();
      return;
    }
    const seconds = (Date.now() - inFlight.started) / 1000;
    const waited = seconds >= 60 ? 60 * Math.floor(seconds / 60) : [30, 15, 5].find((s) => seconds >= s);
    const text = `The service has not answered for ${waited} s; the figures below are from before.`;
    if (waited !== undefined && status.textContent !== text) status.textContent = text;
  }

  /** @param {any[]} sessions @param {string} [why] what the empty state says instead of the usual */
  function render(sessions, why) {
    // Sessions with synchronous rounds (aggregation) show their open round: contributions so far of those
    // it waits for, and how long it has been open.
    const rounds = sessions.some((s) => s.aggregation);
    openRoundHead.hidden = !rounds;
    keepFocus(body, 'data-session', () => body.replaceChildren(...sessions.map((s) => h('tr', { 'data-session': s.name },
      h('td', { className: 'name' }, h('a', { href: `#/s/${encodeURIComponent(s.name)}`, title: s.name }, s.name)),
      h('td', { className: 'num' }, fmtNum(s.step)),
      h('td', { className: 'num' }, fmtNum(s.version)),
      h('td', { className: 'num' }, s.activity ? fmtNum(s.activity.steps_per_second, 3) : '—'),
      h('td', { className: 'num' }, fmtAgo(s.activity?.last_step_at ?? null)),
      h('td', { className: 'num' }, fmtBytes(storedBytes(s))),
      rounds ? h('td', { className: 'num', 'data-round': s.round ? String(s.round.contributions) : '' }, roundCell(s)) : null,
      h('td', { className: 'num' }, `${s.params.length} · ${fmtNum(s.numel)}`),
    ))));
    // The empty state spans every column shown (the open-round column only when a session has rounds).
    const columns = [...table.querySelectorAll('thead th')].filter((th) => !(/** @type {HTMLElement} */ (th)).hidden).length;
    // A later page emptied meanwhile (its sessions deleted) says so: the sessions before it are still there.
    const empty = cursors.length > 0 ? 'No more sessions on this page (deleted meanwhile?): Previous goes back.'
      : search ? `No session name contains "${search}".` : 'No sessions yet.';
    if (sessions.length === 0) body.append(h('tr', { className: 'empty' }, h('td', { colspan: String(columns), className: 'muted' }, why ?? empty)));
    // A button that goes disabled while it has focus drops it to the page's body (a keyboard user pressing
    // Next to the last page started again from the top): the other one takes it, else the heading.
    const focused = document.activeElement;
    prev.disabled = cursors.length === 0;
    nextButton.disabled = next === null;
    if ((focused === prev || focused === nextButton) && /** @type {HTMLButtonElement} */ (focused).disabled) {
      const other = focused === prev ? nextButton : prev;
      if (!other.disabled) other.focus();
      else /** @type {HTMLElement | null} */ (root.querySelector('h1.title'))?.focus();
    }
    pageInfo.textContent = `page ${cursors.length + 1}`;
  }

  load();
  // The list follows training: refreshed every few seconds (one small request).
  const timer = setInterval(refresh, 3000);
  return () => {
    stopped = true;
    clearInterval(timer);
    clearTimeout(debounce);
  };
}
