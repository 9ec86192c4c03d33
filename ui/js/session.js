// One session: figures, charts of its training series over steps or time, hyperparameters per group and
// their changes, norms of the parameters and of ax, and its snapshots. Live: the events stream (or, on a
// service without it, polling with If-None-Match) triggers a refresh of what changed, with no reload.
import { api, ApiError, followEvents, getToken } from './api.js';
import { Chart } from './charts.js';
import { fmtAgo, fmtBytes, fmtNum, h } from './format.js';
import { etaMu, hyperAt, MAX_POINTS, metricNames, stepsPerSecond, toPoint } from './series.js';
import { snapshotsSection } from './snapshots.js';
import { storedBytes } from './sessions.js';

const HYPER_KEYS = ['lr', 'lambd', 'alpha', 't0', 'weight_decay', 'maximize'];
/** A value for a chart: null (a gap) where it is not a finite number. */
const finite = (/** @type {unknown} */ v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

/** Parameters drawn in the norms charts (the table lists all). */
const NORM_CHART_PARAMS = 8;

/** @param {HTMLElement} root @param {string} name @param {import('./main.js').Who} who */
export function sessionPage(root, name, who) {
  const base = `/v1/sessions/${encodeURIComponent(name)}`;
  const admin = who.scope === 'admin';
  const stop = new AbortController();

  /** @type {any} */
  let session = null;
  /** @type {import('./series.js').Point[]} */
  let points = [];
  let seriesVersion = 0;
  let seriesAvailable = true;
  /** @type {import('./series.js').HyperChange[]} */
  let changes = [];
  /** Each group's hyperparameters at the session's first version (null: the service does not know). */
  /** @type {Record<string, any>[] | null} */
  let initialGroups = null;
  let hyperAvailable = true;
  /** Norms seen at each version since the page opened (computed on demand by the server). */
  /** @type {{ version: number, step: number, time: number, params: any[] }[]} */
  const norms = [];
  /** @type {'step' | 'time'} */
  let xMode = 'step';

  const cards = h('div', { className: 'cards', id: 'cards' });
  const live = h('span', { className: 'live', id: 'live' }, 'connecting…');
  const xToggle = /** @type {HTMLSelectElement} */ (h('select', { 'aria-label': 'x axis' }, h('option', { value: 'step' }, 'over steps'), h('option', { value: 'time' }, 'over time')));
  xToggle.addEventListener('change', () => {
    xMode = /** @type {'step' | 'time'} */ (xToggle.value);
    resetCharts();
    drawCharts();
  });
  const chartsEl = h('div', { className: 'charts', id: 'charts' });
  const seriesNote = h('p', { className: 'muted' });
  const hyperEl = h('div', { id: 'hyper' });
  const normsEl = h('div', { id: 'norms' });
  const error = h('p', { className: 'error' });
  root.append(
    error,
    h('div', { className: 'toolbar' }, h('h1', { style: 'font-size:18px;margin:0;flex:1' }, name), xToggle, live),
    cards,
    seriesNote,
    chartsEl,
    h('section', {}, h('h2', {}, 'Hyperparameters'), hyperEl),
    h('section', {}, h('h2', {}, 'Norms'), normsEl),
  );
  const snapshots = snapshotsSection(root, name, admin, () => refresh());

  /** @type {Map<string, Chart>} */
  const charts = new Map();
  function resetCharts() {
    for (const c of charts.values()) c.destroy();
    charts.clear();
    chartsEl.replaceChildren();
  }
  /** @param {import('./charts.js').ChartSpec} spec @param {any[]} data */
  function chart(spec, data) {
    let c = charts.get(spec.key);
    if (!c || c.spec.series.length !== spec.series.length) {
      c?.destroy();
      c = new Chart(chartsEl, { ...spec, time: xMode === 'time' });
      charts.set(spec.key, c);
    }
    c.set(/** @type {any} */ (data));
  }

  function drawCharts() {
    const xs = points.map((p) => (xMode === 'time' ? p.time / 1000 : p.step));
    const buckets = points.some((p) => p.min);
    for (const k of metricNames(points)) {
      const mean = points.map((p) => p.values?.[k] ?? null);
      if (buckets) {
        chart({ key: `metric:${k}`, title: k, note: 'mean per bucket of versions, band: min to max', series: [{ label: k, band: true }, { label: 'min' }, { label: 'max' }] },
          [xs, mean, points.map((p) => p.min?.[k] ?? null), points.map((p) => p.max?.[k] ?? null)]);
      } else {
        chart({ key: `metric:${k}`, title: k, series: [{ label: k }] }, [xs, mean]);
      }
    }
    if (points.length > 0) {
      chart({ key: 'steps_per_second', title: 'steps/s', series: [{ label: 'steps/s' }] }, [xs, stepsPerSecond(points)]);
      chart({ key: 'staleness', title: 'staleness (versions)', series: [{ label: buckets ? 'mean' : 'staleness' }, ...(buckets ? [{ label: 'max' }] : [])] },
        [xs, points.map((p) => p.staleness), ...(buckets ? [points.map((p) => p.staleness_max ?? p.staleness)] : [])]);
      const groups = hyperAt(points, changes, session?.param_groups ?? [], initialGroups);
      const nGroups = session?.param_groups.length ?? 0;
      const perGroup = (/** @type {(g: any, p: import('./series.js').Point) => number} */ f) =>
        Array.from({ length: nGroups }, (_, g) => points.map((p, i) => (groups[i]?.[g] ? f(groups[i]?.[g], p) : null)));
      const labels = Array.from({ length: nGroups }, (_, g) => ({ label: `group ${g}` }));
      const formula = 'from the step and the group\'s hyperparameters at that step (PyTorch\'s formula)';
      chart({ key: 'eta', title: 'eta', note: formula, series: labels }, [xs, ...perGroup((g, p) => etaMu(g, p.step).eta)]);
      chart({ key: 'mu', title: 'mu', note: formula, series: labels }, [xs, ...perGroup((g, p) => etaMu(g, p.step).mu)]);
      chart({ key: 'lr', title: 'lr per group', stepped: true, series: labels }, [xs, ...perGroup((g) => g.lr)]);
    }
    if (norms.length > 0) {
      const shown = norms[norms.length - 1].params.slice(0, NORM_CHART_PARAMS);
      const nx = norms.map((n) => (xMode === 'time' ? n.time / 1000 : n.step));
      const note = 'computed on demand at each version seen since this page opened';
      chart({ key: 'norm', title: '‖param‖', note, series: shown.map((p) => ({ label: p.name })) }, [nx, ...shown.map((_, i) => norms.map((n) => finite(n.params[i]?.norm)))]);
      chart({ key: 'ax_norm', title: '‖ax‖ (ASGD average)', note, series: shown.map((p) => ({ label: p.name })) }, [nx, ...shown.map((_, i) => norms.map((n) => finite(n.params[i]?.ax_norm)))]);
    }
  }

  function drawCards() {
    if (!session) return;
    const last = points[points.length - 1];
    const minuteAgo = Date.now() - 60_000;
    const recent = points.filter((p) => p.time >= minuteAgo);
    const rate = recent.length > 1 ? (recent[recent.length - 1].step - recent[0].step) / ((recent[recent.length - 1].time - recent[0].time) / 1000) : null;
    const card = (/** @type {string} */ id, /** @type {string} */ label, /** @type {string} */ value) => h('div', { className: 'card', 'data-card': id }, h('b', {}, value), h('span', {}, label));
    cards.replaceChildren(
      card('step', 'step', fmtNum(session.step)),
      card('version', 'version', fmtNum(session.version)),
      card('rate', 'steps/s (last minute)', rate === null ? '—' : fmtNum(rate, 3)),
      card('since', 'since last change', fmtAgo(session.updated_at)),
      card('staleness', 'staleness (last step)', last ? fmtNum(last.staleness) : '—'),
      card('stored', 'stored', fmtBytes(storedBytes(session))),
      card('params', 'parameters', `${session.params.length} · ${fmtNum(session.numel)}`),
    );
  }

  function drawHyper() {
    if (!session) return;
    const table = h('table', { id: 'hyper-current' },
      h('thead', {}, h('tr', {}, h('th', {}, 'group'), h('th', {}, 'parameters'), ...HYPER_KEYS.map((k) => h('th', { className: 'num' }, k)))),
      h('tbody', {}, ...session.param_groups.map((/** @type {any} */ g, /** @type {number} */ i) => h('tr', {},
        h('td', {}, String(i)),
        h('td', {}, g.params.map((/** @type {number} */ p) => session.params[p]?.name ?? p).join(', ')),
        ...HYPER_KEYS.map((k) => h('td', { className: 'num' }, typeof g[k] === 'number' ? fmtNum(g[k], 6) : String(g[k])))))));
    const recent = changes.slice(-20).reverse();
    hyperEl.replaceChildren(
      table,
      !hyperAvailable ? h('p', { className: 'muted' }, 'This service does not report hyperparameter changes.')
        : changes.length === 0 ? h('p', { className: 'muted' }, 'No step has changed them.')
        : h('div', {},
          h('p', { className: 'muted' }, `${changes.length} step(s) changed them${changes.length > 20 ? '; the newest 20:' : ':'}`),
          h('table', { id: 'hyper-changes' },
            h('thead', {}, h('tr', {}, h('th', { className: 'num' }, 'step'), h('th', { className: 'num' }, 'version'), h('th', {}, 'when'), h('th', {}, 'groups after the step'))),
            h('tbody', {}, ...recent.map((c) => h('tr', {},
              h('td', { className: 'num' }, String(c.step)), h('td', { className: 'num' }, String(c.version)),
              h('td', {}, new Date(c.time).toLocaleTimeString()),
              h('td', {}, c.param_groups.map((g, i) => `${i}: ${HYPER_KEYS.filter((k) => g[k] !== undefined).map((k) => `${k}=${typeof g[k] === 'number' ? fmtNum(g[k], 6) : g[k]}`).join(' ')}`).join(' | ')))))),
        ),
    );
  }

  /** A norm or scalar for the table: NaN (a diverged run) said, not shown as missing. */
  const cell = (/** @type {number | null} */ v, digits = 4) => (typeof v === 'number' && Number.isNaN(v) ? 'NaN' : fmtNum(v, digits));

  function drawNorms() {
    const latest = norms[norms.length - 1];
    if (!latest) return;
    normsEl.replaceChildren(
      h('p', { className: 'muted' }, `Computed on demand from the state at version ${fmtNum(latest.version)} (L2 norms; not sampled at snapshots).`),
      h('table', { id: 'norms-table' },
        h('thead', {}, h('tr', {}, ...['parameter', 'numel', '‖param‖', '‖ax‖', 'step', 'eta', 'mu'].map((t, i) => h('th', { className: i ? 'num' : '' }, t)))),
        h('tbody', {}, ...latest.params.map((p) => h('tr', {},
          h('td', {}, p.name), h('td', { className: 'num' }, fmtNum(p.numel)), h('td', { className: 'num' }, cell(p.norm, 6)),
          h('td', { className: 'num' }, cell(p.ax_norm, 6)), h('td', { className: 'num' }, cell(p.step)),
          h('td', { className: 'num' }, cell(p.eta, 6)), h('td', { className: 'num' }, cell(p.mu, 6)))))),
    );
  }

  async function loadSeries() {
    if (!seriesAvailable) return;
    try {
      // The first load asks the server to downsample; later ones append the new points as they are.
      const full = seriesVersion === 0 || points.length > 4 * MAX_POINTS;
      if (full) {
        const answer = await api(`${base}/metrics?max_points=${MAX_POINTS}`, { signal: stop.signal });
        points = answer.points.map(toPoint);
      } else {
        for (;;) {
          const answer = await api(`${base}/metrics?after_version=${seriesVersion}&limit=1000`, { signal: stop.signal });
          points.push(...answer.points.map(toPoint));
          seriesVersion = answer.next_after_version ?? seriesVersion;
          if (answer.points.length < 1000) break;
        }
      }
      if (full) seriesVersion = points.length ? points[points.length - 1].version : 0;
      seriesNote.textContent = points.length === 0 ? 'No step has reported metrics yet.' : '';
    } catch (err) {
      if (err instanceof ApiError && err.code === 'ROUTE_NOT_FOUND') {
        seriesAvailable = false;
        seriesNote.textContent = 'This service does not keep a metrics series.';
      } else throw err;
    }
  }

  async function loadHyper() {
    if (!hyperAvailable) return;
    try {
      const after = changes.length ? changes[changes.length - 1].version : 0;
      const answer = await api(`${base}/hyperparameters?after_version=${after}&limit=1000`, { signal: stop.signal });
      changes.push(...answer.changes);
      initialGroups = answer.initial_param_groups ?? initialGroups;
    } catch (err) {
      if (err instanceof ApiError && err.code === 'ROUTE_NOT_FOUND') hyperAvailable = false;
      else throw err;
    }
  }

  async function loadNorms() {
    const answer = await api(`${base}/norms`, { signal: stop.signal });
    if (norms.length && norms[norms.length - 1].version === answer.version) return;
    // A diverged run's norms and scalars come as "NaN", "Infinity" or "-Infinity": numbers here (the charts
    // leave a gap, the table shows them).
    const num = (/** @type {unknown} */ v) => (typeof v === 'string' ? Number(v) : v);
    const params = answer.params.map((/** @type {any} */ p) => ({ ...p, norm: num(p.norm), ax_norm: num(p.ax_norm), step: num(p.step), eta: num(p.eta), mu: num(p.mu) }));
    norms.push({ ...answer, params, time: Date.now() });
  }

  let running = false;
  let again = false;
  /** Reloads what a new version changes; one at a time, coalescing requests that arrive meanwhile. */
  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        // All at once: the page is as slow as the slowest read, not their sum.
        const [current, snaps] = await Promise.all([
          api(base, { signal: stop.signal }), api(`${base}/snapshots`, { signal: stop.signal }), loadSeries(), loadHyper(), loadNorms(),
        ]);
        session = current;
        snapshots.render(snaps.snapshots, session.version);
        drawCards();
        drawCharts();
        drawHyper();
        drawNorms();
        error.textContent = '';
        root.dataset.version = String(session.version);
      } while (again && !stop.signal.aborted);
    } catch (err) {
      if (!stop.signal.aborted) error.textContent = err instanceof ApiError && err.status === 404 ? `Session ${name} does not exist.` : `${err instanceof Error ? err.message : err}`;
    } finally {
      running = false;
    }
  }

  /** Without an events route: ask every second whether the version moved (304 while it did not). */
  async function poll() {
    live.textContent = 'live (polling)';
    live.className = 'live on';
    while (!stop.signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      if (document.hidden || !session) continue;
      try {
        const response = await fetch(base, {
          headers: { accept: 'application/json', 'if-none-match': `"${session.version}"`, ...(getToken() && { authorization: `Bearer ${getToken()}` }) },
          signal: stop.signal,
        });
        if (response.status === 200 && (await response.json()).version !== session.version) await refresh();
      } catch {
        // The next round tries again.
      }
    }
  }

  refresh().then(async () => {
    const streamed = await followEvents(name, (event) => {
      if (event === 'version') refresh();
    }, stop.signal, () => {
      live.textContent = 'live';
      live.className = 'live on';
    }).catch(() => false);
    if (!streamed && !stop.signal.aborted) await poll();
  });
  // Relative figures ("12 s ago") age without events; snapshots are written after the step that made them
  // due (off the request path), so the list is read again now and then.
  const ticker = setInterval(() => {
    drawCards();
    if (!document.hidden && session) api(`${base}/snapshots`, { signal: stop.signal }).then((a) => snapshots.render(a.snapshots, session.version), () => {});
  }, 5000);

  return () => {
    stop.abort();
    clearInterval(ticker);
    resetCharts();
  };
}
