// One session: figures, charts of its training series over steps or time, hyperparameters per group and
// their changes, norms of the parameters and of ax, and its snapshots. Live: the events stream (or, on a
// service without it, polling with If-None-Match) triggers a refresh of what changed, with no reload.
import { api, ApiError, backoffMs, followEvents, getToken, isUnreachable, readSignal, sleep } from './api.js';
import { Chart } from './charts.js';
import { fmtAgo, fmtBytes, fmtNum, fmtWhen, h, roundCell, roundTitle, scrollBox } from './format.js';
import { changesOn, etaMu, hyperAt, lineage, MAX_POINTS, present, metricNames, RATE_LABEL, rawTailFrom, stepsLastMinute, stepsPerSecond, toPoint, withRawTail } from './series.js';
import { snapshotsSection } from './snapshots.js';
import { storedBytes } from './sessions.js';

/** How the hyperparameters changed, as the API's `reason` says. */
/** @type {Record<string, string>} */
const REASONS = { step: 'a step', load_state_dict: 'load (state_dict)', load_checkpoint: 'load (checkpoint)', hyperparameters: 'set without a step', restore: 'restore' };
const HYPER_KEYS = ['lr', 'lambd', 'alpha', 't0', 'weight_decay', 'maximize'];
/** A value for a chart: null (a gap) where there is none; a NaN or an infinity the chart draws as a gap and says (Chart.set). */
const numberOrNull = (/** @type {unknown} */ v) => (typeof v === 'number' ? v : null);

/** Parameters drawn in the norms charts (the table lists the first NORM_TABLE_ROWS). */
const NORM_CHART_PARAMS = 8;
/**
 * Rows of the norms table: a model of 20,000 named tensors made a table of 160,000 elements, rebuilt at each
 * read of the norms (every 5 s while training), and the page stopped answering (a review). GET .../norms has all.
 */
const NORM_TABLE_ROWS = 500;
/** Norms reads kept for the charts (one every 5 s while training: about 14 hours). */
const NORM_HISTORY = 10_000;
/**
 * Metric charts drawn (loss first, then by name); the others are picked one at a time. A session collects any
 * number of metric names (each step up to 32): with a chart for each, 1,600 names took the page 12 s to draw
 * and 9,600 never finished (a review).
 */
const MAX_METRIC_CHARTS = 16;
/** While steps stream in: at most one refresh per this (the first of a burst at once). */
const REFRESH_EVERY_MS = 1000;
/** The norms (the server reads every parameter) are read again at most this often. */
const NORMS_EVERY_MS = 5000;
const TICK_MS = 5000;
/**
 * At most this many steps are read one by one after a downsampled read, for the cards (rawTail); a longer
 * last minute (over ~80 steps/s) keeps its buckets and the cards say their figures are approximate.
 */
const RAW_TAIL_STEPS = 5000;

/**
 * The page's choices in the URL's hash, so that a reload, Back or a shared link shows the same charts:
 * #/s/<name>?x=time&metric=<a metric picked beyond the first MAX_METRIC_CHARTS>. Anything else is ignored.
 * @param {string} hash
 */
function sessionChoices(hash) {
  const at = hash.indexOf('?');
  const query = new URLSearchParams(at >= 0 ? hash.slice(at + 1) : '');
  return { x: /** @type {'step' | 'time'} */ (query.get('x') === 'time' ? 'time' : 'step'), metric: query.get('metric') ?? '' };
}

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
  /**
   * The steps of the newest buckets of a downsampled read (those of the last minute, or the last one), read
   * one by one: the cards' steps/s and last staleness are then the API's, not a bucket's count or mean.
   * @type {{ after: number, upTo: number, points: import('./series.js').Point[] } | null}
   */
  let rawTail = null;
  /** Which whole read of the series the raw tail being read is for: a later one's replaces it. */
  let rawTailRead = 0;
  /** @type {import('./series.js').HyperChange[]} */
  let changes = [];
  /**
   * How many changes there are (the server's count on a downsampled read, which leaves out changes between
   * the buckets' last ones; plus those read after it) and whether `changes` is downsampled.
   */
  let changesTotal = 0;
  let changesDownsampled = false;
  let hyperLoaded = false;
  /** Each group's hyperparameters at the session's first version (null: the service does not know). */
  /** @type {Record<string, any>[] | null} */
  let initialGroups = null;
  let hyperAvailable = true;
  /** Norms seen at each version since the page opened (computed on demand by the server). */
  /** @type {{ version: number, step: number, time: number, params: any[] }[]} */
  const norms = [];
  const chosen = sessionChoices(location.hash);
  /** @type {'step' | 'time'} */
  let xMode = chosen.x;
  /** The session was deleted and another of its name read in its place: nothing more is drawn (gone()). */
  let frozen = false;

  const cards = h('div', { className: 'cards', id: 'cards' });
  const live = h('span', { className: 'live', id: 'live', role: 'status' }, 'connecting…');
  /** Told when reads work again, so that the events stream stops waiting to reconnect (followEvents). */
  const streamWake = new EventTarget();
  const xToggle = /** @type {HTMLSelectElement} */ (h('select', { 'aria-label': 'x axis' }, h('option', { value: 'step' }, 'over steps'), h('option', { value: 'time' }, 'over time')));
  xToggle.value = xMode;
  /** Keeps the choices in the hash (replacing the entry: no hashchange, no new history entry). */
  function remember() {
    if (stop.signal.aborted) return;
    const query = new URLSearchParams();
    if (xMode === 'time') query.set('x', 'time');
    if (pickedMetric) query.set('metric', pickedMetric);
    const text = query.toString();
    const hash = `#/s/${encodeURIComponent(name)}${text ? `?${text}` : ''}`;
    if (location.hash !== hash) history.replaceState(history.state, '', hash);
  }
  xToggle.addEventListener('change', () => {
    if (frozen) return;
    xMode = /** @type {'step' | 'time'} */ (xToggle.value);
    remember();
    resetCharts();
    drawCharts();
  });
  const chartsEl = h('div', { className: 'charts', id: 'charts' });
  const seriesNote = h('p', { className: 'muted' });
  /** Metric names the downsampled read left out (a session that reported more than one read holds). */
  const leftOutNote = h('p', { className: 'muted', id: 'metrics-left-out' });
  /** More metric names than MAX_METRIC_CHARTS: a note and a choice of one more to chart. */
  const metricsMore = h('p', { className: 'muted', id: 'metrics-more', hidden: true });
  /** The metric picked in metricsMore ('' none). */
  let pickedMetric = chosen.metric;
  const hyperEl = h('div', { id: 'hyper' });
  const normsEl = h('div', { id: 'norms' });
  const error = h('p', { className: 'error' });
  // What a session that was read shows: hidden while a session this token may not read (or one that does
  // not exist) would show its headings over nothing.
  const content = h('div', { id: 'session-content' },
    cards,
    seriesNote,
    leftOutNote,
    metricsMore,
    // The charts' titles are h3: a heading above them for those who go by headings (h1, then h3 was a jump).
    h('h2', { className: 'visually-hidden' }, 'Charts'),
    chartsEl,
    h('section', {}, h('h2', {}, 'Hyperparameters'), hyperEl),
    h('section', {}, h('h2', {}, 'Norms'), normsEl),
  );
  // Past the charts (a tab stop each) to the snapshots and their actions in one key (a review: 15 tab stops
  // before Take snapshot). Shown when it has the focus. Its hash is not followed: the page's hash is its route.
  const skip = h('a', {
    className: 'skip', href: '#snapshots',
    onclick: (/** @type {Event} */ e) => {
      e.preventDefault();
      const heading = /** @type {HTMLElement | null} */ (root.querySelector('#snapshots h2'));
      if (!heading) return;
      heading.tabIndex = -1;
      heading.focus();
    },
  }, 'Skip to snapshots');
  root.append(
    error,
    h('div', { className: 'toolbar' }, skip, h('h1', { className: 'title', tabindex: '-1' }, name), xToggle, live),
    content,
  );
  const snapshots = snapshotsSection(content, name, admin, () => refresh(true));

  /** @type {Map<string, Chart>} */
  const charts = new Map();
  /** The charts the last drawCharts drew (one it did not: its series is not in the present history). */
  const drawnKeys = new Set();
  /** @type {number[]} the versions of the points the charts show (drawAllCharts) */
  let shownVersions = [];
  function resetCharts() {
    for (const c of charts.values()) c.destroy();
    charts.clear();
    chartsEl.replaceChildren();
  }
  /**
   * @param {import('./charts.js').ChartSpec} spec @param {any[]} data @param {[number, number] | null} [span]
   * @param {number[] | null} [versions] each point's version (Chart.set)
   */
  function chart(spec, data, span = null, versions = shownVersions) {
    drawnKeys.add(spec.key);
    let c = charts.get(spec.key);
    if (!c) {
      c = new Chart(chartsEl, { ...spec, time: xMode === 'time' });
      charts.set(spec.key, c);
    } else if (c.spec.series.length !== spec.series.length) {
      // Its lines changed (single steps read again as buckets with a min and max): drawn again in its place
      // (a review: loss went below the norms while watched), keeping the focus and the keys' point (a
      // review: a focused chart was destroyed at ~6,000 live points).
      c.respec({ ...spec, time: xMode === 'time' });
    }
    c.set(/** @type {any} */ (data), span, versions);
  }

  function drawCharts() {
    if (frozen) return;
    drawnKeys.clear();
    try {
      drawAllCharts();
    } finally {
      // A chart with nothing to draw now (e.g. after a restore to before the first step): not left showing
      // the history the session left.
      for (const [key, c] of charts) {
        if (drawnKeys.has(key)) continue;
        c.destroy();
        charts.delete(key);
      }
    }
  }

  function drawAllCharts() {
    // After a restore the series holds an abandoned history too: the charts show the present one.
    const shown = present(points, session);
    // Counted in steps: a bucket of a long session's series stands for `count` of them (a review: the note
    // counted 418 buckets for 2,500 steps).
    const kept = new Set(shown);
    const dropped = points.reduce((n, p) => (kept.has(p) ? n : n + (p.count ?? 1)), 0);
    if (points.length) {
      seriesNote.textContent = dropped ? `The session went back to an earlier step (a restore or load): ${fmtNum(dropped)} step(s) of the history it left are not drawn.` : '';
    }
    const xs = shown.map((p) => (xMode === 'time' ? p.time / 1000 : p.step));
    shownVersions = shown.map((p) => p.version);
    const buckets = shown.some((p) => p.min);
    const names = metricNames(shown);
    const charted = names.slice(0, MAX_METRIC_CHARTS);
    drawMetricsMore(names);
    if (pickedMetric && names.indexOf(pickedMetric) >= MAX_METRIC_CHARTS) charted.push(pickedMetric);
    for (const k of charted) {
      const mean = shown.map((p) => p.values?.[k] ?? null);
      if (buckets) {
        chart({ key: `metric:${k}`, title: k, note: 'mean per bucket of versions, band: min to max', series: [{ label: k, band: true }, { label: 'min' }, { label: 'max' }] },
          [xs, mean, shown.map((p) => p.min?.[k] ?? null), shown.map((p) => p.max?.[k] ?? null)]);
      } else {
        chart({ key: `metric:${k}`, title: k, series: [{ label: k }] }, [xs, mean]);
      }
    }
    if (shown.length > 0) {
      chart({ key: 'steps_per_second', title: 'steps/s at each step', note: 'over the last ~1/100 of the series (the card above counts the last minute ÷ 60)', series: [{ label: 'steps/s' }] }, [xs, stepsPerSecond(shown)]);
      chart({ key: 'staleness', title: 'staleness (versions)', series: [{ label: buckets ? 'mean' : 'staleness' }, ...(buckets ? [{ label: 'max' }] : [])] },
        [xs, shown.map((p) => p.staleness), ...(buckets ? [shown.map((p) => p.staleness_max ?? p.staleness)] : [])]);
      const groups = hyperAt(shown, changesOn(changes, shown, points, session), session?.param_groups ?? [], initialGroups);
      const nGroups = session?.param_groups.length ?? 0;
      const perGroup = (/** @type {(g: any, p: import('./series.js').Point) => number} */ f) =>
        Array.from({ length: nGroups }, (_, g) => shown.map((p, i) => (groups[i]?.[g] ? f(groups[i]?.[g], p) : null)));
      const labels = Array.from({ length: nGroups }, (_, g) => ({ label: `group ${g}` }));
      const formula = 'from the step and the group\'s hyperparameters at that step (PyTorch\'s formula)';
      chart({ key: 'eta', title: 'eta', note: formula, series: labels }, [xs, ...perGroup((g, p) => etaMu(g, p.step).eta)]);
      chart({ key: 'mu', title: 'mu', note: formula, series: labels }, [xs, ...perGroup((g, p) => etaMu(g, p.step).mu)]);
      chart({ key: 'lr', title: 'lr per group', stepped: true, series: labels }, [xs, ...perGroup((g) => g.lr)]);
    }
    if (norms.length > 0) {
      const params = norms[norms.length - 1].params.slice(0, NORM_CHART_PARAMS);
      const seen = lineage(norms);
      const nx = seen.map((n) => (xMode === 'time' ? normTime(n) / 1000 : n.step));
      const note = 'computed on demand since this page opened (at most every 5 s while steps stream in)';
      // On the steps (or times) of the charts above, not an axis of their own around a few points.
      /** @type {[number, number] | null} */
      const span = xs.length > 0 ? [xs[0], xs[xs.length - 1]] : null;
      const versions = seen.map((n) => n.version);
      chart({ key: 'norm', title: '‖param‖', note, series: params.map((p) => ({ label: p.name })) }, [nx, ...params.map((_, i) => seen.map((n) => numberOrNull(n.params[i]?.norm)))], span, versions);
      chart({ key: 'ax_norm', title: '‖ax‖ (ASGD average)', note, series: params.map((p) => ({ label: p.name })) }, [nx, ...params.map((_, i) => seen.map((n) => numberOrNull(n.params[i]?.ax_norm)))], span, versions);
    }
  }

  /** Says how many metrics are not charted, with a choice of one of them to chart; redrawn only when the names change. */
  let metricsMoreOf = '';
  /** @param {string[]} names */
  function drawMetricsMore(names) {
    const rest = names.slice(MAX_METRIC_CHARTS);
    const key = rest.join('\n');
    if (key === metricsMoreOf) return;
    metricsMoreOf = key;
    metricsMore.hidden = rest.length === 0;
    if (rest.length === 0) {
      metricsMore.replaceChildren();
      return;
    }
    const pick = /** @type {HTMLSelectElement} */ (h('select', { 'aria-label': 'chart another metric' },
      h('option', { value: '' }, 'chart one of them…'), ...rest.map((k) => h('option', { value: k }, k))));
    pick.value = rest.includes(pickedMetric) ? pickedMetric : '';
    pick.addEventListener('change', () => {
      pickedMetric = pick.value;
      remember();
      drawCharts();
      if (pickedMetric) charts.get(`metric:${pickedMetric}`)?.box.scrollIntoView({ block: 'nearest' });
    });
    metricsMore.replaceChildren(`${fmtNum(names.length)} metrics: the first ${MAX_METRIC_CHARTS} are charted (loss first, then by name), ${fmtNum(rest.length)} more `, pick);
  }

  function drawCards() {
    if (!session) return;
    // The newest buckets of a downsampled read as their steps (rawTail).
    const steps = withRawTail(points, rawTail);
    const shown = present(steps, session);
    const last = shown[shown.length - 1];
    // The same figure as the sessions list's: steps in the last minute ÷ 60.
    const rate = seriesAvailable ? stepsLastMinute(steps) : null;
    const about = 'approximate: the oldest of these steps were read as a bucket of several, some of which may be older than a minute';
    // A card's note (what ≈ means) is its tooltip and, for a screen reader, hidden text; the open round's
    // rule and contributors are shown (a review: they were only a tooltip, out of reach of keys and touch).
    const card = (/** @type {string} */ id, /** @type {string} */ label, /** @type {string} */ value, title = '', shown = false) =>
      h('div', { className: 'card', 'data-card': id, ...(title && !shown && { title }) }, h('b', {}, value), h('span', {}, label),
        title ? h('small', { className: shown ? 'detail' : 'visually-hidden' }, shown ? title : ` (${title})`) : null);
    cards.replaceChildren(...[
      card('step', 'step', fmtNum(session.step)),
      card('version', 'version', fmtNum(session.version)),
      card('rate', RATE_LABEL, rate === null ? '—' : `${rate.exact ? '' : '≈'}${fmtNum(rate.perSecond, 3)}`, rate?.exact === false ? about : ''),
      card('since', 'since last change', fmtAgo(session.updated_at)),
      card('staleness', 'staleness (last step)', last ? `${(last.count ?? 1) > 1 ? '≈' : ''}${fmtNum(last.staleness)}` : '—', (last?.count ?? 1) > 1 ? `the mean of the last ${last.count} steps (read as a bucket)` : ''),
      card('stored', 'stored', fmtBytes(storedBytes(session))),
      card('params', 'parameters', `${session.params.length} · ${fmtNum(session.numel)}`),
      // Synchronous rounds: the open one (its contributions and age; its rule and who contributed below them).
      session.aggregation ? card('round', 'open round', roundCell(session), roundTitle(session), true) : null,
    ].filter((c) => c !== null));
  }

  /**
   * The tables of the hyperparameters and the norms are drawn again as steps stream in: their scroll boxes
   * (tab stops) stay, and a table is replaced only when it changed (a review: the focus went to the page each
   * time, and a screen reader lost its place).
   */
  const hyperBox = scrollBox('Hyperparameters', h('span'));
  const hyperNote = h('p', { className: 'muted' });
  const changesBox = scrollBox('Hyperparameter changes', h('span'));
  hyperBox.hidden = true;
  changesBox.hidden = true;
  hyperEl.append(hyperBox, hyperNote, changesBox);
  const normsNote = h('p', { className: 'muted' });
  const normsBox = scrollBox('Norms', h('span'));
  const normsMore = h('p', { className: 'muted', id: 'norms-more', hidden: true });
  /** @param {HTMLElement} el @param {string} text */
  const setText = (el, text) => { if (el.textContent !== text) el.textContent = text; };
  /**
   * Puts a table in its scroll box unless the same is there, keeping how far it was scrolled.
   * @param {HTMLElement} box @param {HTMLElement | null} table
   */
  function showTable(box, table) {
    const old = box.firstElementChild;
    box.hidden = table === null;
    if (table === null) {
      if (old) box.replaceChildren();
      return;
    }
    if (old && old.outerHTML === table.outerHTML) return;
    const left = box.scrollLeft;
    box.replaceChildren(table);
    box.scrollLeft = left;
  }

  function drawHyper() {
    if (!session) return;
    const table = h('table', { id: 'hyper-current' },
      h('thead', {}, h('tr', {}, h('th', {}, 'group'), h('th', {}, 'parameters'), ...HYPER_KEYS.map((k) => h('th', { className: 'num' }, k)))),
      h('tbody', {}, ...session.param_groups.map((/** @type {any} */ g, /** @type {number} */ i) => h('tr', {},
        h('td', {}, String(i)),
        // The names of a real model's parameters are many and long: wrapped in a narrow column, cut after a few
        // lines, the whole list in the title.
        ((names) => h('td', { className: 'param-names' }, h('div', { title: names }, names)))(g.params.map((/** @type {number} */ p) => session.params[p]?.name ?? p).join(', ')),
        ...HYPER_KEYS.map((k) => h('td', { className: 'num' }, typeof g[k] === 'number' ? fmtNum(g[k], 6) : String(g[k])))))));
    // The changes of the present history (not those of a history a restore or load left), newest first.
    const ours = changesOn(changes, present(points, session), points, session);
    const abandoned = changes.length - ours.length;
    // Downsampled: the server's count. It counts the changes of an abandoned history too, and those read are
    // a sample of both histories, so the split is not known: the total is said as such (a review: 2741 and
    // 260 shown where 2501 and 500 were right).
    const count = changesDownsampled ? Math.max(ours.length, changesTotal) : ours.length;
    const split = changesDownsampled && abandoned > 0
      ? ' in all, those of a history the session left included (changes of that history are not listed)'
      : abandoned ? ` (and ${abandoned} of a history the session left, not listed)` : '';
    const recent = ours.slice(-20).reverse();
    showTable(hyperBox, table);
    setText(hyperNote, !hyperAvailable ? 'This service does not report hyperparameter changes.'
      : ours.length === 0 ? `No step has changed them${abandoned ? ` (${abandoned} change(s) of a history the session left are not listed)` : ''}.`
      : `${count} change(s)${split}${count > 20 ? '; the newest 20:' : ':'}`);
    const listed = hyperAvailable && ours.length > 0;
    showTable(changesBox, !listed ? null : h('table', { id: 'hyper-changes' },
      h('thead', {}, h('tr', {}, h('th', { className: 'num' }, 'step'), h('th', { className: 'num' }, 'version'), h('th', {}, 'when'), h('th', {}, 'by'), h('th', {}, 'groups after it'))),
      h('tbody', {}, ...recent.map((c) => h('tr', {},
        h('td', { className: 'num' }, fmtNum(c.step)), h('td', { className: 'num' }, fmtNum(c.version)),
        h('td', {}, fmtWhen(c.time)),
        h('td', { className: 'reason' }, (c.reason && REASONS[c.reason]) ?? c.reason ?? 'a step'),
        h('td', {}, c.param_groups.map((g, i) => `${i}: ${HYPER_KEYS.filter((k) => g[k] !== undefined).map((k) => `${k}=${typeof g[k] === 'number' ? fmtNum(g[k], 6) : g[k]}`).join(' ')}`).join(' | ')))))));
  }

  /** A norm or scalar for the table: NaN (a diverged run) said, not shown as missing. */
  const cell = (/** @type {number | null} */ v, digits = 4) => (typeof v === 'number' && Number.isNaN(v) ? 'NaN' : fmtNum(v, digits));

  function drawNorms() {
    const latest = norms[norms.length - 1];
    if (!latest) return;
    setText(normsNote, `Computed on demand from the state at version ${fmtNum(latest.version)} (L2 norms; not sampled at snapshots).`);
    showTable(normsBox, h('table', { id: 'norms-table' },
      h('thead', {}, h('tr', {}, ...['parameter', 'numel', '‖param‖', '‖ax‖', 'step', 'eta', 'mu'].map((t, i) => h('th', { className: i ? 'num' : '' }, t)))),
      h('tbody', {}, ...latest.params.slice(0, NORM_TABLE_ROWS).map((p) => h('tr', {},
        h('td', {}, p.name), h('td', { className: 'num' }, fmtNum(p.numel)), h('td', { className: 'num' }, cell(p.norm, 6)),
        h('td', { className: 'num' }, cell(p.ax_norm, 6)), h('td', { className: 'num' }, cell(p.step)),
        h('td', { className: 'num' }, cell(p.eta, 6)), h('td', { className: 'num' }, cell(p.mu, 6)))))));
    normsMore.hidden = latest.params.length <= NORM_TABLE_ROWS;
    setText(normsMore, normsMore.hidden ? '' : `The first ${fmtNum(NORM_TABLE_ROWS)} of ${fmtNum(latest.params.length)} parameters; GET ${base}/norms lists all.`);
    if (!normsNote.isConnected) normsEl.append(normsNote, normsBox, normsMore);
  }

  /** Whether the page has shown the session (a 404 after that: it was deleted). */
  let seen = false;
  /** Whether the hyperparameters may have changed since they were read (a step that changed them, a load or restore). */
  let hyperDue = true;
  /** The session's groups as last read, to see a change that came without a step (a load or restore). */
  let groupsSeen = '';

  /** Whether the next series read is a whole downsampled one: the first, and when the points read one by one since grew many. */
  const seriesFullDue = () => seriesVersion === 0 || points.length > 4 * MAX_POINTS;

  /** @param {boolean} full */
  async function loadSeries(full) {
    if (!seriesAvailable) return;
    try {
      // The first load asks the server to downsample; later ones read only the points after the last one read.
      if (full) {
        const answer = await api(`${base}/metrics?max_points=${MAX_POINTS}`, { signal: stop.signal });
        points = answer.points.map(toPoint);
        seriesVersion = answer.next_after_version ?? (points.length ? points[points.length - 1].version : 0);
        // A session whose steps reported more metric names than one downsampled read holds (330).
        const leftOut = typeof answer.metrics_left_out === 'number' ? answer.metrics_left_out : 0;
        leftOutNote.textContent = leftOut > 0
          ? `${fmtNum(leftOut)} more metric name(s) are not charted: the session's steps reported more than one read holds (loss first, then those the most steps reported; every step's metrics are in …/metrics?after_version=).`
          : '';
        // The cards' steps read one by one after the charts are drawn, not before (a review: up to five reads
        // in turn delayed the first drawing); until then the cards give the buckets' figures, marked ≈.
        rawTail = null;
        const read = ++rawTailRead;
        readRawTail(points).then((tail) => {
          if (read !== rawTailRead || stop.signal.aborted) return;
          rawTail = tail;
          drawCards();
        }, () => {}); // not read (the page left, the service away): the cards keep the buckets' figures
      } else {
        for (;;) {
          const answer = await api(`${base}/metrics?after_version=${seriesVersion}&limit=1000`, { signal: stop.signal });
          /** @type {import('./series.js').Point[]} */
          const fresh = answer.points.map(toPoint);
          points.push(...fresh);
          if (fresh.some((p) => p.param_groups)) hyperDue = true;
          seriesVersion = answer.next_after_version ?? seriesVersion;
          if (!answer.more) break; // a page of a session with many groups holds fewer points than asked for
        }
      }
      if (points.length === 0) seriesNote.textContent = 'No step has reported metrics yet.';
    } catch (err) {
      if (err instanceof ApiError && err.code === 'ROUTE_NOT_FOUND') {
        seriesAvailable = false;
        seriesNote.textContent = 'This service does not keep a metrics series.';
      } else throw err;
    }
  }

  /**
   * The steps of a downsampled read's newest buckets (rawTailFrom), one by one; null when there are no
   * buckets or they hold more than RAW_TAIL_STEPS steps (the last bucket alone, when it holds fewer).
   * @param {import('./series.js').Point[]} read @returns {Promise<typeof rawTail>}
   */
  async function readRawTail(read) {
    const from = rawTailFrom(read);
    if (from < 0) return null;
    const steps = (/** @type {number} */ i) => read.slice(i).reduce((n, p) => n + (p.count ?? 1), 0);
    const start = steps(from) <= RAW_TAIL_STEPS ? from : steps(read.length - 1) <= RAW_TAIL_STEPS ? read.length - 1 : -1;
    if (start < 0) return null;
    const after = (read[start].version_from ?? read[start].version) - 1;
    const upTo = read[read.length - 1].version;
    /** @type {import('./series.js').Point[]} */
    const tail = [];
    for (let at = after; ;) {
      const answer = await api(`${base}/metrics?after_version=${at}&limit=1000`, { signal: stop.signal });
      /** @type {import('./series.js').Point[]} */
      const fresh = answer.points.map(toPoint);
      tail.push(...fresh.filter((p) => p.version <= upTo));
      at = answer.next_after_version ?? at;
      if (!answer.more || at >= upTo) break;
    }
    return { after, upTo, points: tail };
  }

  /**
   * The hyperparameter changes: on a whole read (the first, and with each whole read of the series) fitted by
   * the server to the same buckets as the series' (a scheduler that set lr at each of 100,000 steps is then a
   * few thousand changes, exact at each bucket's last step, the newest 20 as they are); else those after the
   * last one read.
   * @param {boolean} full
   */
  async function loadHyper(full = false) {
    if (!hyperAvailable) return;
    hyperDue = false;
    try {
      if (full || !hyperLoaded) {
        const answer = await api(`${base}/hyperparameters?max_points=${MAX_POINTS}`, { signal: stop.signal });
        changes = answer.changes;
        changesTotal = answer.total_changes ?? changes.length;
        changesDownsampled = answer.downsampled === true;
        initialGroups = answer.initial_param_groups ?? initialGroups;
        hyperLoaded = true;
        return;
      }
      for (;;) {
        const after = changes.length ? changes[changes.length - 1].version : 0;
        const answer = await api(`${base}/hyperparameters?after_version=${after}&limit=1000`, { signal: stop.signal });
        changes.push(...answer.changes);
        changesTotal += answer.changes.length;
        initialGroups = answer.initial_param_groups ?? initialGroups;
        if (!answer.more) break;
      }
    } catch (err) {
      hyperDue = true;
      if (err instanceof ApiError && err.code === 'ROUTE_NOT_FOUND') hyperAvailable = false;
      else throw err;
    }
  }

  let normsAt = 0;
  async function loadNorms() {
    normsAt = Date.now();
    const answer = await api(`${base}/norms`, { signal: stop.signal });
    if (norms.length && norms[norms.length - 1].version === answer.version) return false;
    // A diverged run's norms and scalars come as "NaN", "Infinity" or "-Infinity": numbers here (the charts
    // leave a gap, the table shows them).
    const num = (/** @type {unknown} */ v) => (typeof v === 'string' ? Number(v) : v);
    const params = answer.params.map((/** @type {any} */ p) => ({ ...p, norm: num(p.norm), ax_norm: num(p.ax_norm), step: num(p.step), eta: num(p.eta), mu: num(p.mu) }));
    // Earlier reads keep only what the charts draw (the first NORM_CHART_PARAMS); the table shows the latest.
    const previous = norms.at(-1);
    if (previous) previous.params = previous.params.slice(0, NORM_CHART_PARAMS);
    norms.push({ ...answer, params, fetched: Date.now() });
    if (norms.length > NORM_HISTORY) norms.splice(0, norms.length - NORM_HISTORY);
    return true;
  }

  /**
   * When the state a read of the norms was computed at was made: its version's commit (the session's
   * updated_at while that version is current, else the step at that version in the series), not when the
   * page read it (a review: over time, the norms sat minutes right of the charts beside them, at the read).
   * @param {any} n
   */
  function normTime(n) {
    if (n.time !== undefined) return n.time;
    if (session && session.version === n.version) return (n.time = Date.parse(session.updated_at));
    for (let i = points.length - 1; i >= 0; i--) {
      if (points[i].version > n.version) continue;
      if (points[i].version === n.version) n.time = points[i].time;
      return points[i].time;
    }
    return n.fetched;
  }

  /** @type {any[] | null} */
  let snaps = null;
  let snapsAt = 0;
  let snapsVersion = -1;
  async function loadSnapshots() {
    snapsAt = Date.now();
    const version = session?.version ?? 0;
    const answer = await api(`${base}/snapshots`, { signal: stop.signal });
    snaps = answer.snapshots;
    snapsVersion = version;
  }

  /** The newest version the events announced (the page catches up to it). */
  let announced = 0;
  let versionChangedAt = 0;

  /**
   * Reads what changed. Always the session (its figures) and the new points of the series; the norms
   * (computed by the server over every parameter) at most every NORMS_EVERY_MS while steps stream in; the
   * hyperparameters when a step changed them or the groups changed; the snapshots on a full refresh (first
   * load, an action, a restore or load) and otherwise from the ticker.
   * @param {boolean} full
   */
  async function load(full) {
    const normsDue = full || Date.now() - normsAt >= NORMS_EVERY_MS;
    // A whole read of the series comes with a whole read of the hyperparameters: the server fits both to the
    // same buckets.
    const seriesFull = seriesAvailable && seriesFullDue();
    const hyperNow = full || hyperDue || seriesFull;
    const [current] = await Promise.all([
      api(base, { signal: stop.signal }),
      loadSeries(seriesFull),
      hyperNow ? loadHyper(seriesFull) : null,
      normsDue ? loadNorms() : null,
      full ? loadSnapshots() : null,
    ]);
    if (session && current.created_at !== session.created_at) {
      // Deleted and created again under its name while the page could not follow it (its versions go on from
      // the deleted one's): the other session's figures are not drawn as this one's, nor its points after this one's.
      gone(true);
      return;
    }
    if (session?.version !== current.version) versionChangedAt = Date.now();
    session = current;
    seen = true;
    content.hidden = false;
    const groups = JSON.stringify(current.param_groups);
    const groupsChanged = groupsSeen !== '' && groups !== groupsSeen;
    groupsSeen = groups;
    if (groupsChanged && !full) await loadHyper();
    if (snaps) snapshots.render(snaps, session.version);
    drawCards();
    drawCharts();
    if (hyperNow || groupsChanged) drawHyper();
    if (normsDue) drawNorms();
    error.textContent = '';
    readOk();
    root.dataset.version = String(session.version);
  }

  /**
   * What the events stream (or polling) last said, and whether the page's reads are failing (the service
   * answers, e.g. 503 while its database is unreachable, or cannot be reached): while they fail the
   * indicator is off with the reason, whatever the stream says, and the reads are retried with a growing
   * delay; once one succeeds the stream's state shows again.
   * @type {{ state: string, text: string }}
   */
  let streamLive = { state: 'connecting', text: 'connecting…' };
  /** @type {string | null} */
  let readTrouble = null;
  let readFailures = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let readRetry;
  /** The session was deleted while shown (gone()): nothing more is retried. */
  let deleted = false;
  /** When a read of the session last succeeded. */
  let readOkAt = Date.now();

  /** A read failed for a reason that passes (not 401/403/404): the indicator goes off and the reads are retried. @param {unknown} err */
  function readFailed(err) {
    if (stop.signal.aborted || deleted) return;
    // Reads that fail while a retry is already set are the same trouble (a hang times out every read that
    // was waiting): one failure, so the wait grows 1, 2, 4 … s with the retries that fail, not with them.
    if (readRetry !== undefined) return;
    readFailures++;
    const retryMs = backoffMs(readFailures);
    readTrouble = err instanceof ApiError ? err.message : isUnreachable(err) ? 'the service cannot be reached' : 'this page failed to draw the session';
    const state = err instanceof ApiError || !isUnreachable(err) ? 'error' : 'offline';
    showLive(state, `not live: ${readTrouble}; retrying in ${Math.round(retryMs / 1000)} s`);
    live.dataset.reads = 'failing';
    clearTimeout(readRetry);
    readRetry = setTimeout(() => { readRetry = undefined; refresh(true); }, retryMs);
  }

  /** A read succeeded: the indicator says what the stream says again. */
  function readOk() {
    readOkAt = Date.now();
    if (readTrouble === null) return;
    readTrouble = null;
    // Reads work again (the service is back): a stream waiting out its backoff reconnects now.
    streamWake.dispatchEvent(new Event('wake'));
    readFailures = 0;
    clearTimeout(readRetry);
    readRetry = undefined;
    delete live.dataset.reads;
    setLive(/** @type {any} */ (streamLive.state), streamLive.text);
  }

  /** Whether an error says that a read failed for a passing reason (the service or its database is away). @param {unknown} err */
  const passing = (err) => !(err instanceof ApiError) || (err.status !== 401 && err.status !== 403 && err.status !== 404 && err.status !== 400);

  let running = false;
  let again = false;
  let againFull = false;
  let lastStart = 0;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  /**
   * Asks for a refresh. Bursts are coalesced: at most one refresh starts per REFRESH_EVERY_MS (the first at
   * once, the next when the interval is over), one at a time, and a full one when any request asked for it.
   * Resolves when a refresh that covers this request has run.
   * @param {boolean} [full]
   */
  function refresh(full = false) {
    againFull ||= full;
    if (running) {
      again = true;
      return;
    }
    if (timer !== undefined) {
      if (!full) return;
      // An action or a restore is shown at once, not after the interval.
      clearTimeout(timer);
      timer = undefined;
    }
    const wait = lastStart + REFRESH_EVERY_MS - Date.now();
    if (wait > 0 && !full) timer = setTimeout(run, wait);
    else void run();
  }

  async function run() {
    timer = undefined;
    if (running || stop.signal.aborted) return;
    running = true;
    try {
      do {
        again = false;
        const full = againFull;
        againFull = false;
        lastStart = Date.now();
        await load(full);
        // An event announced a version this read did not see yet: read once more.
        if (session && session.version < announced) again = true;
        // Events that came while reading: one more read, no sooner than the interval.
        if (again && !stop.signal.aborted) {
          const wait = lastStart + REFRESH_EVERY_MS - Date.now();
          if (wait > 0 && !againFull) await sleep(wait, stop.signal);
        }
      } while (again && !stop.signal.aborted);
    } catch (err) {
      if (!stop.signal.aborted) failed(err);
    } finally {
      running = false;
    }
  }

  /**
   * The live indicator: green only while the page follows the session.
   * @param {'connecting' | 'live' | 'polling' | 'offline' | 'error' | 'gone' | 'missing' | 'refused' | 'forbidden'} state @param {string} text
   */
  function setLive(state, text) {
    streamLive = { state, text };
    if (readTrouble && (state === 'live' || state === 'polling' || state === 'connecting')) return;
    showLive(state, text);
  }
  /** @param {string} state @param {string} text */
  function showLive(state, text) {
    live.textContent = text;
    live.className = `live ${state === 'live' || state === 'polling' ? 'on' : state === 'connecting' ? '' : 'off'}`;
    live.dataset.state = state;
  }

  /**
   * The session was deleted while the page showed it: said, and nothing is retried.
   * @param {boolean} [replaced] another session of its name is there now
   */
  function gone(replaced = false) {
    setLive('gone', 'not live: the session was deleted');
    error.textContent = replaced ? `Session ${name} was deleted, and a new session of that name created since: reload the page to follow it.` : `Session ${name} was deleted.`;
    deleted = true;
    root.dataset.gone = 'true';
    stop.abort();
    clearInterval(ticker);
    const focused = document.activeElement;
    // Nothing to snapshot, pin, restore, fork or download any more (the charts and tables stay to be read).
    for (const button of content.querySelectorAll('button')) {
      button.disabled = true;
      button.title = 'the session was deleted';
    }
    if (!replaced) void watchForNew();
    if (replaced) {
      // The read that saw the other session had already added its points and changes: nothing is drawn again
      // (the x axis switch redrew the charts from them), what is shown stays the deleted session's.
      frozen = true;
      xToggle.disabled = true;
      xToggle.title = 'the session was deleted';
    }
    // A button disabled while it has the focus drops it to the page's body (a review: a keyboard user on Pin
    // was sent to the top): the focus goes to the message that says why, which a screen reader then reads.
    if ((focused instanceof HTMLButtonElement || focused instanceof HTMLSelectElement) && focused.disabled) {
      error.tabIndex = -1;
      error.focus({ preventScroll: false });
    }
  }

  /** Stops watchForNew when the page is left. */
  const left = new AbortController();

  /**
   * After a deletion, asks now and then (after 10 s, then slower, up to a minute) whether a session of the name was
   * created again, and says so with a link (a review: the page said "deleted" for good while a new one ran).
   */
  async function watchForNew() {
    for (let wait = 10_000; !left.signal.aborted; wait = Math.min(60_000, wait * 1.5)) {
      await sleep(wait, left.signal).catch(() => {});
      if (left.signal.aborted) return;
      try {
        /** @type {{ version: number, step: number }} */
        const again = await api(base, { signal: left.signal });
        error.textContent = `Session ${name} was deleted, and a new session of that name created since (version ${fmtNum(again.version)}, step ${fmtNum(again.step)}): `;
        error.append(h('a', { href: location.href, onclick: (/** @type {Event} */ e) => { e.preventDefault(); location.reload(); } }, 'reload the page to follow it'), '.');
        return;
      } catch {
        // still gone (404), or the service away: asked again later
      }
    }
  }

  /** @param {unknown} err */
  function failed(err) {
    // Nothing of the session to show: no empty headings under the reason.
    if (!seen && err instanceof ApiError && (err.status === 401 || err.status === 403 || (err.status === 404 && err.code !== 'ROUTE_NOT_FOUND'))) content.hidden = true;
    if (err instanceof ApiError && err.status === 404 && err.code !== 'ROUTE_NOT_FOUND') {
      if (seen) gone();
      else error.textContent = `Session ${name} does not exist.`;
    } else if (err instanceof ApiError && err.status === 401) {
      setLive('refused', 'not live: the service refused the token');
      error.textContent = `The service refused the token: ${err.message}`;
    } else if (err instanceof ApiError && err.status === 403) {
      setLive('forbidden', 'not live: this token may not read this session');
      error.textContent = err.message;
      stop.abort();
      clearInterval(ticker);
    } else {
      const why = err instanceof Error ? err.message : String(err);
      // Only a failed fetch says the service is away; anything else is this page's own fault, named as such.
      error.textContent = err instanceof ApiError ? err.message : isUnreachable(err) ? `The service cannot be reached (${why}).` : `This page could not show the session (${why}); reading it again.`;
      if (passing(err) && !(err instanceof ApiError && err.code === 'ROUTE_NOT_FOUND')) readFailed(err);
    }
  }

  /** Without an events route: ask every second whether the version moved (304 while it did not); back off while it fails. */
  async function poll() {
    setLive('polling', 'live (polling)');
    let failures = 0;
    while (!stop.signal.aborted) {
      await sleep(failures ? backoffMs(failures) : 1000, stop.signal);
      if (stop.signal.aborted) break;
      if (document.hidden || !session) continue;
      try {
        // Timed as any read: a poll that hangs would leave the page green and frozen.
        const { signal } = readSignal(stop.signal);
        const response = await fetch(base, {
          headers: { accept: 'application/json', 'if-none-match': `"${session.version}"`, ...(getToken() && { authorization: `Bearer ${getToken()}` }) },
          signal,
        });
        if (response.status === 200 || response.status === 304) {
          const changed = response.status === 200 && (await response.json()).version !== session.version;
          if (failures) setLive('polling', 'live (polling)');
          failures = 0;
          if (changed) refresh(true);
        } else {
          const body = await response.json().catch(() => null);
          failed(new ApiError(response.status, body?.code ?? 'HTTP_ERROR', body?.message ?? response.statusText));
          if (response.status === 401 || response.status === 403 || (response.status === 404 && body?.code === 'SESSION_NOT_FOUND')) return;
          failures++;
          setLive('error', `not live: ${body?.message ?? response.statusText}; retrying in ${Math.round(backoffMs(failures) / 1000)} s`);
        }
      } catch {
        if (stop.signal.aborted) break;
        failures++;
        setLive('offline', `not live: the service cannot be reached; retrying in ${Math.round(backoffMs(failures) / 1000)} s`);
      }
    }
  }

  /** Follows the events stream (or polls), telling its state. */
  async function follow() {
    let reconnecting = false;
    try {
      const how = await followEvents(name, (event, data) => {
        if (event === 'version') {
          if (typeof data?.version === 'number') announced = Math.max(announced, data.version);
          // A step adds points; a restore or load changes the state, its groups and its snapshots.
          refresh(data?.kind !== 'step');
        } else if (event === 'deleted') gone(data?.replaced === true);
      }, stop.signal, (state, detail) => {
        if (state === 'open') {
          setLive('live', 'live');
          // Back after a failure: catch up with what was missed.
          if (reconnecting) refresh(true);
          reconnecting = false;
          return;
        }
        reconnecting = true;
        const retry = detail && detail.retryMs > 0 ? `; retrying in ${Math.round(detail.retryMs / 1000)} s` : '; reconnecting…';
        // offline: the service cannot be reached, or it stopped answering (a silent stream was dropped).
        setLive(state, `not live: ${detail?.message ?? (state === 'offline' ? 'the service cannot be reached' : 'error')}${retry}`);
      }, () => session?.version ?? null, streamWake);
      if (how === 'gone') {
        if (seen) gone();
        else await missing();
      } else if (how === 'unsupported' && !stop.signal.aborted) await poll();
    } catch (err) {
      if (!stop.signal.aborted) failed(err);
    }
  }

  /** The session does not exist (yet): said, and asked again with a growing delay until it does. */
  async function missing() {
    for (let n = 1; !stop.signal.aborted; n++) {
      const retryMs = Math.min(60_000, 2000 * 2 ** (n - 1));
      setLive('missing', `not live: no session ${name}; checking again in ${Math.round(retryMs / 1000)} s`);
      error.textContent = `Session ${name} does not exist.`;
      if (!seen) content.hidden = true;
      await sleep(retryMs, stop.signal);
      if (stop.signal.aborted) return;
      try {
        // One small read to see whether it exists now; then everything.
        await api(base, { signal: stop.signal });
        lastStart = Date.now();
        await load(true);
        setLive('connecting', 'connecting…');
        await follow();
        return;
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404 && err.code !== 'ROUTE_NOT_FOUND')) {
          failed(err);
          if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return;
        }
      }
    }
  }

  (async () => {
    // The first load marks a refresh as running until it is over: not until what follows it (waiting for a
    // missing session, then following it for good) is over, or every later refresh is queued for ever.
    let absent = false;
    try {
      lastStart = Date.now();
      running = true;
      await load(true);
    } catch (err) {
      if (stop.signal.aborted) return;
      if (err instanceof ApiError && err.status === 404 && err.code !== 'ROUTE_NOT_FOUND') absent = true;
      else {
        failed(err);
        if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return;
      }
    } finally {
      running = false;
      if (again && !stop.signal.aborted) refresh(againFull);
    }
    if (absent) await missing();
    else await follow();
  })();

  // Relative figures ("12 s ago") age without events. Snapshots are written after the step that made them
  // due (off the request path): read again while the version moves (and a little after), else now and
  // then. The norms catch up with the last version once steps pause.
  let snapsReading = false;
  let normsReading = false;
  const ticker = setInterval(() => {
    drawCards();
    if (document.hidden || !session || stop.signal.aborted) return;
    const now = Date.now();
    // While reads fail, the retry (with its growing delay) reads everything again: nothing more from here.
    if (readTrouble !== null) return;
    /** A read of the ticker that fails for a passing reason turns the indicator off (the stream may stay up while the database is away). @param {unknown} err */
    const tickFailed = (err) => { if (!stop.signal.aborted && passing(err)) readFailed(err); };
    // One read of each at a time: against a service that hangs, a read started every tick piled up (six
    // waiting at once, a dashboard review) and each one's timeout counted as another failure.
    if (!snapsReading && (snapsVersion !== session.version || now - versionChangedAt < 2 * TICK_MS || now - snapsAt > 30_000)) {
      snapsReading = true;
      loadSnapshots().then(() => { if (snaps && session) snapshots.render(snaps, session.version); }, tickFailed).finally(() => { snapsReading = false; });
    }
    if (!normsReading && (norms.at(-1)?.version ?? 0) < session.version && now - normsAt >= NORMS_EVERY_MS) {
      normsReading = true;
      loadNorms().then((changed) => { if (changed) { drawNorms(); drawCharts(); } }, tickFailed).finally(() => { normsReading = false; });
    }
    // A quiet session (no events) is still read now and then: the stream stays up while the database is
    // away, and the indicator must not stay green over reads that would fail.
    // A version newer than the page shows (an event lost on the way) is caught up with from here.
    // A session with rounds is read at every tick: contributions change its open round, not its version.
    if ((now - readOkAt >= 3 * TICK_MS || session.aggregation) && !running) {
      api(base, { signal: stop.signal }).then((current) => {
        readOk();
        if (session && current.version !== session.version) refresh(true);
        // Also when aggregation was removed (a PATCH moves no version): the card goes.
        else if (session && (current.aggregation || session.aggregation)) {
          session = { ...session, round: current.round, aggregation: current.aggregation };
          drawCards();
        }
      }, tickFailed);
    }
  }, TICK_MS);

  return () => {
    stop.abort();
    left.abort();
    clearInterval(ticker);
    clearTimeout(readRetry);
    resetCharts();
    snapshots.stop();
  };
}
