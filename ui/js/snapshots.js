// A session's snapshots: a timeline over its versions and a table with downloads, pin/unpin, restore
// (after a confirmation) and fork. The admin-only actions are disabled for other tokens.
import { api, download } from './api.js';
import { confirmDialog, fmtBytes, h } from './format.js';

/**
 * @param {HTMLElement} root
 * @param {string} name
 * @param {boolean} admin
 * @param {() => void} changed called after an action changed the session
 */
export function snapshotsSection(root, name, admin, changed) {
  const base = `/v1/sessions/${encodeURIComponent(name)}`;
  const timeline = h('div', { className: 'timeline', id: 'timeline', title: 'snapshots by version' });
  const body = h('tbody');
  const status = h('span', { className: 'muted', id: 'snapshots-status', role: 'status' });
  const disabledNote = admin ? null : 'needs an admin token';
  const take = h('button', { disabled: !admin, title: disabledNote, onclick: () => act(() => api(`${base}/snapshots`, { method: 'POST', json: { pinned: false } }), 'snapshot taken') }, 'Take snapshot');
  root.append(
    h('section', { id: 'snapshots' },
      h('h2', {}, 'Snapshots'),
      h('div', { className: 'toolbar' }, take, status),
      timeline,
      h('div', { className: 'scroll' }, h('table', { id: 'snapshots-table' }, h('thead', {}, h('tr', {},
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
      status.textContent = `Failed: ${err instanceof Error && err.message ? err.message : String(err)}`;
      status.className = 'error';
      return false;
    }
    status.textContent = done;
    if (changes) changed();
    return true;
  }

  /** @param {any[]} snapshots newest first @param {number} version the session's */
  function render(snapshots, version) {
    timeline.replaceChildren(...snapshots.map((s) => h('button', {
      className: `tick${s.pinned ? ' pinned' : ''}`,
      style: `left: ${version > 1 ? 1 + (98 * (s.version - 1)) / (version - 1) : 50}%`,
      title: `snapshot ${s.id}: version ${s.version}, step ${s.step}${s.pinned ? ', pinned' : ''}`,
      onclick: () => document.getElementById(`snapshot-${s.id}`)?.scrollIntoView({ block: 'center' }),
    })));
    if (snapshots.length === 0) {
      body.replaceChildren(h('tr', { className: 'empty' }, h('td', { colspan: '8', className: 'muted' }, 'No snapshots.')));
      return;
    }
    body.replaceChildren(...snapshots.map((s) => {
      const file = `${name}-v${s.version}`;
      const dl = (/** @type {string} */ path, /** @type {string} */ filename, /** @type {string} */ label) =>
        h('button', { onclick: () => download(`${base}/snapshots/${s.id}/${path}`, filename).catch((err) => { status.textContent = `Failed: ${err.message}`; status.className = 'error'; }) }, label);
      return h('tr', { id: `snapshot-${s.id}`, 'data-snapshot': s.id },
        h('td', { className: 'num' }, String(s.id)),
        h('td', { className: 'num' }, String(s.version)),
        h('td', { className: 'num' }, String(s.step)),
        h('td', {}, s.reason, ' ', s.pinned ? h('span', { className: 'badge pinned' }, 'pinned') : null),
        h('td', {}, new Date(s.created_at).toLocaleString()),
        h('td', { className: 'num' }, fmtBytes(s.byte_size)),
        h('td', {},
          dl('checkpoint?format=pt', `${file}.checkpoint.pt`, '.pt'), ' ',
          dl('state_dict?format=pt', `${file}.state_dict.pt`, 'state_dict .pt'), ' ',
          dl('params?format=safetensors', `${file}.safetensors`, 'safetensors')),
        h('td', {},
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': s.pinned ? 'unpin' : 'pin',
            onclick: () => act(() => api(`${base}/snapshots/${s.id}`, { method: 'PATCH', json: { pinned: !s.pinned } }), s.pinned ? `unpinned ${s.id}` : `pinned ${s.id}`),
          }, s.pinned ? 'Unpin' : 'Pin'), ' ',
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': 'restore',
            onclick: async () => {
              if (!(await confirmDialog(`Restore ${name} to snapshot ${s.id} (version ${s.version}, step ${s.step})? The session's current state is replaced by it as a new version; workers continue from there.`))) return;
              await act(() => api(`${base}/snapshots/${s.id}/restore`, { method: 'POST' }), `restored snapshot ${s.id}`);
            },
          }, 'Restore…'), ' ',
          h('button', {
            disabled: !admin, title: disabledNote, 'data-action': 'fork',
            onclick: async () => {
              const target = prompt(`Fork ${name} at snapshot ${s.id} as a new session named:`, `${name}-fork-${s.version}`);
              if (!target) return;
              // Only a fork that was made opens the new session; a refused one (name taken or invalid, a token
              // without admin) says why and the page stays.
              if (await act(() => api(`${base}/fork`, { method: 'POST', json: { name: target, snapshot: s.id } }), `forked as ${target}`, false)) {
                location.hash = `#/s/${encodeURIComponent(target)}`;
              }
            },
          }, 'Fork…')),
      );
    }));
  }

  return { render };
}
