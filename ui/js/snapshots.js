// A session's snapshots: a timeline over its versions and a table with downloads, pin/unpin, restore
// (after a confirmation) and fork. The admin-only actions are disabled for other tokens.
import { api, download } from './api.js';
import { confirmDialog, fmtBytes, fmtNum, h, keepFocus, localNumber, nameDialog, scrollBox } from './format.js';

/** Width of a tick on the timeline, of a group's box at least (its count fits), and the least space between two. */
const TICK_PX = 10;
const GROUP_MIN_PX = 18;
const TICK_SPACE_PX = 4;
/** A group's name and title name its first snapshots, this many, and say how many more. */
const GROUP_NAMED = 5;

/** A snapshot as a tick names it. @param {any} s */
const describe = (s) => `snapshot ${s.id}: version ${s.version}, step ${s.step}${s.pinned ? ', pinned' : ''}`;

/**
 * @param {HTMLElement} root
 * @param {string} name
 * @param {boolean} admin
 * @param {() => void} changed called after an action changed the session
 */
export function snapshotsSection(root, name, admin, changed) {
  const base = `/v1/sessions/${encodeURIComponent(name)}`;
  // One tab stop (a review: a session of 20 snapshots took 20 presses of Tab to pass): the arrow keys, Home
  // and End move along the ticks, Enter shows a tick's snapshot in the table.
  const timeline = h('div', { className: 'timeline', id: 'timeline', title: 'snapshots by version', role: 'toolbar', 'aria-label': 'Snapshots by version' });
  /** The snapshot whose tick (or group) is the timeline's tab stop: the one last focused, else the newest. @type {string | null} */
  let current = null;
  const ticks = () => /** @type {HTMLButtonElement[]} */ ([...timeline.querySelectorAll('button.tick')]);
  /** That snapshot's version: the nearest tick takes the tab stop when it is pruned. @type {number | null} */
  let currentVersion = null;
  /** What drawTimeline drew last (its ticks and tab stop), not drawn again while the same. */
  let drawnSignature = '';
  timeline.addEventListener('focusin', (e) => {
    const tick = /** @type {HTMLElement} */ (e.target).closest('button.tick');
    if (!tick) return;
    current = tick.getAttribute('data-snapshots')?.split(' ')[0] ?? null;
    currentVersion = drawn?.[0].find((s) => String(s.id) === current)?.version ?? currentVersion;
    for (const t of ticks()) t.tabIndex = t === tick ? 0 : -1;
  });
  // A click (or Enter) on a tick shows its newest snapshot's row, and the keyboard's focus goes to its first
  // button (download, restore…): a keyboard user pressed Enter on the tick to reach that snapshot (a review:
  // the focus stayed on the tick).
  timeline.addEventListener('click', (e) => {
    const tick = /** @type {HTMLElement} */ (e.target).closest('button.tick');
    const newest = tick?.getAttribute('data-snapshots')?.split(' ').at(-1);
    if (!newest) return;
    const row = document.getElementById(`snapshot-${newest}`);
    row?.scrollIntoView({ block: 'center' });
    /** @type {HTMLElement | null | undefined} */ (row?.querySelector('a[href], button:not([disabled])'))?.focus({ preventScroll: true });
  });
  timeline.addEventListener('keydown', (e) => {
    const moves = { ArrowLeft: -1, ArrowUp: -1, ArrowRight: 1, ArrowDown: 1, Home: -Infinity, End: Infinity };
    if (!(e.key in moves) || e.altKey || e.ctrlKey || e.metaKey) return;
    const all = ticks();
    const at = all.indexOf(/** @type {HTMLButtonElement} */ (document.activeElement));
    if (at < 0) return;
    e.preventDefault();
    const move = moves[/** @type {keyof typeof moves} */ (e.key)];
    const to = move === -Infinity ? 0 : move === Infinity ? all.length - 1 : Math.max(0, Math.min(all.length - 1, at + move));
    all[to].focus();
  });
  const body = h('tbody');
  const status = h('span', { className: 'muted', id: 'snapshots-status', role: 'status' });
  const disabledNote = admin ? null : 'needs an admin token';
  const take = h('button', { disabled: !admin, title: disabledNote, onclick: () => act(() => api(`${base}/snapshots`, { method: 'POST', json: { pinned: false } }), 'snapshot taken') }, 'Take snapshot');
  root.append(
    h('section', { id: 'snapshots' },
      h('h2', {}, 'Snapshots'),
      // Said, not only in the disabled buttons' titles, which a keyboard or screen reader never reaches (a review).
      h('div', { className: 'toolbar' }, take, status, admin ? null : h('span', { className: 'muted', id: 'snapshots-read-only' }, 'This token reads only: taking, pinning, restoring and forking need an admin token.')),
      timeline,
      scrollBox('Snapshots', h('table', { id: 'snapshots-table' }, h('thead', {}, h('tr', {},
        h('th', { className: 'num' }, 'id'), h('th', { className: 'num' }, 'version'), h('th', { className: 'num' }, 'step'),
        h('th', {}, 'reason'), h('th', {}, 'taken'), h('th', { className: 'num' }, 'size'), h('th', {}, 'download'), h('th', {}, 'actions'))), body))),
  );

  /**
   * Runs an action; says that it was done, or the API's error (and resolves false).
   * @param {() => Promise<unknown>} action @param {string} done @param {boolean} [changes] whether it changes this session
   * @returns {Promise<boolean>}
   */
  async function act(action, done, changes = true) {
    status.className = 'muted';
    status.textContent = '…';
    try {
      await action();
    } catch (err) {
      // A snapshot gone meanwhile (pruned by newer ones, deleted with a restore's history): the table is
      // read again, so that its row goes.
      const gone = /** @type {any} */ (err)?.code === 'SNAPSHOT_NOT_FOUND';
      const why = err instanceof Error && err.message ? err.message : String(err);
      status.textContent = gone ? `Failed: that snapshot no longer exists: the session keeps its newest snapshots (keep_snapshots) and pruned it since the table was read (the table is read again); pin a snapshot to keep it (${why})` : `Failed: ${why}`;
      status.className = 'error';
      if (gone) changed();
      return false;
    }
    status.textContent = done;
    if (changes) changed();
    return true;
  }

  /** What was last drawn, to draw the timeline again at another width. @type {[any[], number] | null} */
  let drawn = null;
  let drawnWidth = 0;
  const resized = new ResizeObserver(() => {
    if (drawn && timeline.clientWidth !== drawnWidth) drawTimeline(...drawn);
  });
  resized.observe(timeline);

  /**
   * The timeline: a tick per snapshot at its version. Ticks that would overlap (or come
   * closer than TICK_SPACE_PX): they are drawn as one group (a box from the first to the last, with their count), named
   * by its range and its first snapshots; a click shows the newest of them in the table.
   * @param {any[]} snapshots newest first @param {number} version the session's
   */
  function drawTimeline(snapshots, version) {
    drawn = [snapshots, version];
    drawnWidth = timeline.clientWidth;
    const width = drawnWidth || 800;
    const x = (/** @type {any} */ s) => (width * (version > 1 ? 1 + (98 * (s.version - 1)) / (version - 1) : 50)) / 100;
    /** @type {any[][]} */
    const groups = [];
    let right = -Infinity; // the right edge of the last group's box
    for (const s of [...snapshots].sort((a, b) => a.version - b.version || a.id - b.id)) {
      const at = x(s);
      const group = groups[groups.length - 1];
      if (group && at - TICK_PX / 2 < right + TICK_SPACE_PX) {
        group.push(s);
        right = Math.max(x(group[0]) - TICK_PX / 2 + GROUP_MIN_PX, at + TICK_PX / 2);
      } else {
        groups.push([s]);
        right = at + TICK_PX / 2;
      }
    }
    // A box's left edge (its CSS left, less the ticks' margin of TICK_PX / 2) kept within the timeline: a group
    // of the newest snapshots, at least GROUP_MIN_PX wide, stuck out of it at phone width (a review).
    const within = (/** @type {number} */ left, /** @type {number} */ w) => Math.max(TICK_PX / 2, Math.min(left, width - w + TICK_PX / 2));
    /** Each tick (or group) as drawn: its attributes and text. */
    const drawnTicks = groups.map((g) => {
      const first = g[0];
      const newest = g[g.length - 1];
      const pinned = g.filter((s) => s.pinned).length;
      if (g.length === 1) {
        const label = describe(first);
        return { ids: String(first.id), className: `tick${first.pinned ? ' pinned' : ''}`, style: `left: ${within(x(first), TICK_PX)}px`, title: label, label, text: '', versions: [first.version] };
      }
      const label = `${g.length} snapshots, versions ${first.version} to ${newest.version}${pinned ? `, ${pinned} pinned` : ''}`;
      // The first few named, and how many more (a review: a group of 50 was named by 2,000 characters).
      const named = g.slice(0, GROUP_NAMED).map(describe);
      const more = g.length > GROUP_NAMED ? ` and ${g.length - GROUP_NAMED} more` : '';
      const w = Math.max(GROUP_MIN_PX, x(newest) - x(first) + TICK_PX);
      return {
        ids: g.map((s) => s.id).join(' '),
        className: `tick group${pinned ? ' pinned' : ''}`,
        style: `left: ${within(x(first), w)}px; width: ${w}px`,
        title: `${label}:\n${named.join('\n')}${more ? `\n…${more}` : ''}`,
        label: `${label}: ${named.join('; ')}${more}`,
        text: String(g.length),
        versions: g.map((s) => s.version),
      };
    });
    // The tab stop: the tick that holds the snapshot last focused, else the one nearest to it by version (it
    // was pruned), else the newest.
    const holding = drawnTicks.findIndex((d) => current !== null && d.ids.split(' ').includes(current));
    const distance = (/** @type {{ versions: number[] }} */ d) => Math.min(...d.versions.map((v) => Math.abs(v - /** @type {number} */ (currentVersion))));
    const nearest = holding >= 0 || currentVersion === null ? holding
      : drawnTicks.reduce((best, d, i) => (best < 0 || distance(d) < distance(drawnTicks[best]) ? i : best), -1);
    const stop = nearest >= 0 ? nearest : drawnTicks.length - 1;
    // Nothing drawn changed: nothing is done (a rebuild took the focus away and gave it back, and a screen
    // reader read the tick again: 6 times in 10 s on a tick that did not change; a review).
    const signature = JSON.stringify([drawnTicks.map(({ versions: _, ...d }) => d), stop]);
    if (signature === drawnSignature) return;
    drawnSignature = signature;
    // The tick with the focus is kept (the same element, its attributes updated) when a tick holds its
    // snapshot still, so the focus stays (a review: it went to the page when a snapshot joined its group, or
    // one was pruned); the others are made again.
    const active = document.activeElement;
    const hadFocus = active instanceof HTMLButtonElement && active.parentElement === timeline;
    const keep = hadFocus && holding >= 0 ? /** @type {HTMLButtonElement} */ (active) : null;
    for (const child of [...timeline.children]) if (child !== keep) child.remove();
    const buttons = drawnTicks.map((d, i) => {
      const button = i === holding && keep ? keep : /** @type {HTMLButtonElement} */ (h('button', {}));
      // Only what differs is set on the kept one (a screen reader may say a change of the focused element).
      for (const [name, value] of [['class', d.className], ['title', d.title], ['aria-label', d.label], ['data-snapshots', d.ids], ['tabindex', i === stop ? '0' : '-1']]) {
        if (button.getAttribute(name) !== value) button.setAttribute(name, value);
      }
      button.style.cssText = d.style;
      if (button.textContent !== d.text) button.textContent = d.text;
      return button;
    });
    const at = keep ? buttons.indexOf(keep) : -1;
    for (const [i, button] of buttons.entries()) {
      if (button === keep) continue;
      if (i < at) timeline.insertBefore(button, keep);
      else timeline.append(button);
    }
    // The focus was on a tick whose snapshots are all gone: on the nearest one now.
    if (hadFocus && !keep && buttons[stop]) buttons[stop].focus({ preventScroll: true });
  }

  /** The snapshots the table shows (the rows do not depend on the session's version): not rebuilt while the same. */
  let rowsShown = '';

  /** @param {any[]} snapshots newest first @param {number} version the session's */
  function render(snapshots, version) {
    drawTimeline(snapshots, version);
    // Rebuilding unchanged rows would lose the focus and a click in progress (the button replaced between
    // mousedown and mouseup).
    const rows = JSON.stringify(snapshots);
    if (rows === rowsShown) return;
    rowsShown = rows;
    if (snapshots.length === 0) {
      keepFocus(body, 'data-snapshot', () => body.replaceChildren(h('tr', { className: 'empty' }, h('td', { colspan: '8', className: 'muted' }, 'No snapshots.'))));
      return;
    }
    keepFocus(body, 'data-snapshot', () => body.replaceChildren(...snapshots.map((s) => {
      const file = `${name}-v${s.version}`;
      // Each button names its snapshot for a screen reader ("Pin snapshot 12", not "Pin" once a row).
      const of = `snapshot ${s.id}`;
      const dl = (/** @type {string} */ path, /** @type {string} */ filename, /** @type {string} */ label) =>
        h('button', { 'aria-label': `download ${label} of ${of}`, onclick: () => download(`${base}/snapshots/${s.id}/${path}`, filename).catch((err) => { status.textContent = `Failed: ${err.message}`; status.className = 'error'; }) }, label);
      return h('tr', { id: `snapshot-${s.id}`, 'data-snapshot': s.id },
        h('td', { className: 'num' }, localNumber(String(s.id))),
        h('td', { className: 'num' }, fmtNum(s.version)), // as the cards write them (8,001; a review)
        h('td', { className: 'num' }, fmtNum(s.step)),
        h('td', {}, s.reason, ' ', s.pinned ? h('span', { className: 'badge pinned' }, 'pinned') : null),
        h('td', {}, new Date(s.created_at).toLocaleString()),
        h('td', { className: 'num' }, fmtBytes(s.byte_size)),
        h('td', {},
          dl('checkpoint?format=pt', `${file}.checkpoint.pt`, '.pt'), ' ',
          dl('state_dict?format=pt', `${file}.state_dict.pt`, 'state_dict .pt'), ' ',
          dl('params?format=safetensors', `${file}.safetensors`, 'safetensors')),
        h('td', {},
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': s.pinned ? 'unpin' : 'pin', 'aria-label': `${s.pinned ? 'Unpin' : 'Pin'} ${of}`,
            onclick: () => act(() => api(`${base}/snapshots/${s.id}`, { method: 'PATCH', json: { pinned: !s.pinned } }), s.pinned ? `unpinned ${s.id}` : `pinned ${s.id}`),
          }, s.pinned ? 'Unpin' : 'Pin'), ' ',
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': 'restore', 'aria-label': `Restore ${of}…`,
            onclick: async () => {
              if (!(await confirmDialog(`Restore ${name} to snapshot ${s.id} (version ${s.version}, step ${s.step})? The session's current state is replaced by it as a new version; workers continue from there.`))) return;
              await act(() => api(`${base}/snapshots/${s.id}/restore`, { method: 'POST' }), `restored snapshot ${s.id}`);
            },
          }, 'Restore…'), ' ',
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': 'fork', 'aria-label': `Fork ${of}…`,
            onclick: async () => {
              // Only a fork that was made opens the new session; a refused one (name taken or invalid, a token
              // without admin) says why in the dialog, which stays open for another name, and on the page.
              const target = await nameDialog(`Fork ${name} at snapshot ${s.id} (version ${s.version}, step ${s.step}) as a new session.`, forkName(name, s.version), async (target) => {
                const made = await act(() => api(`${base}/fork`, { method: 'POST', json: { name: target, snapshot: s.id } }), `forked as ${target}`, false);
                return made ? null : status.textContent;
              });
              if (target !== null) location.hash = `#/s/${encodeURIComponent(target)}`;
            },
          }, 'Fork…')),
      );
    })));
  }

  // Leaving the page: the observer lets go of the timeline (it would keep the detached section alive).
  return { render, stop: () => resized.disconnect() };
}

/**
 * The name a fork is offered: `<name>-fork-<version>`, the name cut short so that the whole stays within
 * the 128 characters a session name may have.
 * @param {string} name @param {number} version
 */
function forkName(name, version) {
  const suffix = `-fork-${version}`;
  return `${name.slice(0, 128 - suffix.length)}${suffix}`;
}
