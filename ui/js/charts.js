// Line charts with uPlot (from its npm package, served by the service). Every chart registers itself in
// window.asgdCharts under its key, so tests and the curious can read the data a chart holds (as drawn: the
// values times drawScale, which is 1 unless one of them passes ±2.2e307).
import uPlot from 'uplot';
import { fmtNum, localNumber, timeLabels } from './format.js';

const PALETTE = ['#2f6fde', '#d9534f', '#25a25a', '#e39b1b', '#8e44ad', '#16a2b8', '#6b7585', '#c0398b'];

/** @type {Record<string, uPlot>} */
const registry = {};
const STEP_INCREMENTS = Array.from({ length: 15 }, (_, e) => [1, 2, 5].map((m) => m * 10 ** e)).flat();
/** @type {any} */ (window).asgdCharts = registry;

/**
 * Ticks of a value axis: uPlot's own (1, 2, 2.5, 5 × 10^e, e from -32 to 31, the same numbers, so its table
 * of decimals applies), continued up to the largest double: without them huge values get no ticks.
 */
const VALUE_INCREMENTS = Array.from({ length: 309 + 32 }, (_, i) => i - 32)
  .flatMap((e) => [1, 2, 2.5, 5].map((m) => Number(`${m}e${e}`)))
  .filter(Number.isFinite);

/** Values beyond this magnitude are drawn scaled by DRAW_SCALE. */
const HUGE = Number.MAX_VALUE / 8;
const DRAW_SCALE = 1 / 8;

/**
 * The factor a chart's values are drawn at: 1, or 1/8 when one of them is beyond ±MAX_VALUE/8 (about
 * 2.2e307). uPlot's range and ticks take max - min, which overflows a double for values of ±1.7e308: the
 * scale became null and no point was drawn. A power of two: the scaling is exact, and the axis labels and
 * the legend multiply it back.
 * @param {uPlot.AlignedData} data
 */
export function drawScale(data) {
  for (let s = 1; s < data.length; s++) for (const v of data[s]) if (typeof v === 'number' && Math.abs(v) > HUGE) return DRAW_SCALE;
  return 1;
}

/**
 * The value axis's range for the drawn (scaled) values: uPlot's own (10% padding, rounded to its ticks),
 * kept within what the labels can multiply back to a finite number. uPlot rounds its range to 9 decimals,
 * so values that differ by less (eta at a small lr moves by 1e-12 a step; float32 jitter around 1) got a
 * range of no width, and the chart no line and no axis: they get 10% of their spread on either side
 * (10% of their size when they are all equal; 0..1 when they are all 0).
 * @param {number | null} min @param {number | null} max @param {number} scale the chart's drawScale
 * @returns {uPlot.Range.MinMax}
 */
export function valueRange(min, max, scale) {
  if (min == null || max == null) return [null, null];
  const limit = Number.MAX_VALUE * scale;
  let [lo, hi] = uPlot.rangeNum(min, max, 0.1, true);
  const size = Math.max(Math.abs(min), Math.abs(max));
  if (lo == null || hi == null || !(hi > lo) || lo > min || hi < max || size < 1e-6 || hi - lo > 1e6 * size) {
    const spread = max - min;
    const pad = spread > 0 ? spread / 10 : size / 10;
    [lo, hi] = size === 0 ? [0, 1] : [min - pad, max + pad];
  }
  return [Math.max(lo, -limit), Math.min(hi, limit)];
}

/**
 * The ticks of a value axis: the multiples of `incr` within the range, each one k × incr for a whole k.
 * uPlot's own steps from tick to tick and rounds each sum with a repair for float noise that takes a run of
 * six 9s for noise: near 1 with ticks 2e-8 apart (float32 jitter) it left one tick of four.
 * @param {uPlot} _u @param {number} _axis @param {number} min @param {number} max @param {number} incr
 * @returns {number[]}
 */
export function valueSplits(_u, _axis, min, max, incr) {
  if (!(incr > 0) || !Number.isFinite(min) || !Number.isFinite(max)) return [];
  const splits = [];
  // A hair of slack at both ends: min / incr of a tick that is at the end (0.3 / 0.1) may be 2.9999999999999996.
  const slack = incr * 1e-9;
  for (let k = Math.ceil((min - slack) / incr); k * incr <= max + slack && splits.length < 1000; k++) splits.push(k * incr || 0);
  return splits;
}

/**
 * @typedef {{ label: string, band?: boolean }} SeriesSpec  band: the next two series are this one's min and max
 * @typedef {{ key: string, title: string, note?: string, series: SeriesSpec[], time?: boolean, log?: boolean, stepped?: boolean }} ChartSpec
 */

/**
 * Labels for the ticks of a value axis: as many digits as the spacing of the ticks needs (so that distinct
 * ticks read differently: 0.049994, 0.049996, … not 0.05 four times), in exponent form (1.5e6, 2.5e-5) when
 * the values are large or small.
 * @param {number[]} splits @param {number} [incr] the spacing of the ticks
 * @returns {string[]}
 */
export function tickLabels(splits, incr) {
  const values = splits.filter((v) => Number.isFinite(v));
  if (values.length === 0) return splits.map(String);
  let step = incr !== undefined && Number.isFinite(incr) && incr > 0 ? incr : Infinity;
  if (step === Infinity) for (let i = 1; i < values.length; i++) { const d = Math.abs(values[i] - values[i - 1]); if (d > 0) step = Math.min(step, d); }
  if (step === Infinity) step = Math.abs(values[0]) || 1;
  // Decimal places the spacing needs (negative: that many whole-number places are zeros): 0.002 → 3, 0.0025 → 4, 500 → -2.
  let places = -Math.floor(Math.log10(step) + 1e-9);
  while (places < 20 && Math.abs(step * 10 ** places - Math.round(step * 10 ** places)) > 1e-6 * step * 10 ** places) places++;
  const magnitude = Math.max(...values.map(Math.abs));
  const exponent = magnitude > 0 ? Math.floor(Math.log10(magnitude) + 1e-12) : 0;
  const compact = magnitude >= 1e6 || (magnitude > 0 && magnitude < 1e-3);
  return splits.map((v) => {
    if (!Number.isFinite(v)) return String(v);
    if (Math.abs(v) < step * 1e-6) return '0';
    if (compact) return localNumber(v.toExponential(Math.min(20, Math.max(0, exponent + places))).replace('e+', 'e'));
    return localNumber(v.toFixed(Math.min(20, Math.max(0, places))));
  });
}

/** The axis' tick length and the gap to its labels (uPlot's defaults: 10 and 5 px). */
const AXIS_TICK_GAP = 15;
/** uPlot's default axis font. */
const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif, "Apple Color Emoji", "Segoe UI Emoji", "Segoe UI Symbol", "Noto Color Emoji"';
/** @type {CanvasRenderingContext2D | null} */
let measure = null;
/** The width of an axis label as drawn, in CSS pixels. @param {uPlot} _u @param {string} text */
function labelWidth(_u, text) {
  measure ??= document.createElement('canvas').getContext('2d');
  if (!measure) return 8 * text.length;
  measure.font = AXIS_FONT;
  return measure.measureText(text).width;
}

/**
 * The indexes of a line's values that no segment reaches, as a list (for a series' points.filter): its only
 * value (a metric reported once, an eval at one step), and a value between gaps (null: a value not finite,
 * idle time over time) or a gap and an end, such as the newest step after an idle hour (a review: it was not
 * drawn). undefined (a missing value) is joined across, so it does not isolate one. null when there are
 * none (uPlot's own choice of dots).
 * @param {ArrayLike<number | null | undefined>} ys
 * @returns {number[] | null}
 */
export function lone(ys) {
  /** @type {number[]} */
  const out = [];
  let before = null; // the value (or gap) before j, skipping missing values: null for a gap or the start
  for (let j = 0; j < ys.length; j++) {
    const y = ys[j];
    if (y === undefined) continue;
    if (y !== null) {
      let k = j + 1;
      while (k < ys.length && ys[k] === undefined) k++;
      if (before === null && (k >= ys.length || ys[k] === null)) out.push(j);
    }
    before = y;
  }
  return out.length ? out : null;
}

/** Time a version took between points this many times its usual (median) one, and at least IDLE_MIN_S, is idle time. */
const IDLE_FACTOR = 10;
/**
 * Idle time is at least a minute: workers that step in bursts (eight at once, once a second) have a median
 * interval of milliseconds, and each second between bursts was taken for idle time (a review: the lines
 * vanished into specks).
 */
const IDLE_MIN_S = 60;

/**
 * The data of a chart over time as drawn: a line breaks across idle time (a quarter hour without steps is
 * not a steady trend; a review), by a row of nulls between the two points, uPlot's gap. What is usual is the
 * time a version takes, not the interval between points: a long session's chart holds buckets of a hundred
 * versions (read whole) followed by single steps (live updates), and the median interval of those became a
 * single step's, which broke the line between every two buckets (a review). Without `versions`, the
 * interval between points.
 * @param {uPlot.AlignedData} data @param {ArrayLike<number> | null} [versions] each point's version
 * @returns {uPlot.AlignedData}
 */
export function breakIdle(data, versions = null) {
  const xs = data[0];
  const per = (/** @type {number} */ i) => (xs[i] - xs[i - 1]) / (versions ? Math.max(1, versions[i] - versions[i - 1]) : 1);
  const rates = [];
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[i - 1]) rates.push(per(i));
  rates.sort((x, y) => x - y);
  const usual = rates[(rates.length - 1) >> 1] ?? Infinity;
  /** @type {(number | null | undefined)[][]} */
  const out = data.map(() => []);
  for (let i = 0; i < xs.length; i++) {
    if (i > 0 && xs[i] - xs[i - 1] >= IDLE_MIN_S && per(i) > IDLE_FACTOR * usual) {
      out[0].push((xs[i - 1] + xs[i]) / 2);
      for (let s = 1; s < data.length; s++) out[s].push(null);
    }
    out[0].push(xs[i]);
    for (let s = 1; s < data.length; s++) out[s].push(data[s][i]);
  }
  return /** @type {uPlot.AlignedData} */ (out);
}

export class Chart {
  /** @param {HTMLElement} parent @param {ChartSpec} spec */
  constructor(parent, spec) {
    this.spec = spec;
    this.box = document.createElement('div');
    this.box.className = 'chart';
    this.box.dataset.chart = spec.key;
    this.title = document.createElement('h3');
    /** What the chart draws (a bucket's mean and band), when its spec says. */
    this.note = document.createElement('p');
    this.note.className = 'note';
    /** Says where a line's values are not finite (drawn as gaps): notFinite. */
    this.remark = document.createElement('p');
    this.remark.className = 'note remark';
    this.remark.hidden = true;
    // A canvas says nothing to a screen reader: the plot is a tab stop named by the chart's title and latest
    // values, whose points the arrow keys read one by one (Home and End the first and last, Escape leaves the
    // point; a review: a chart was only for a mouse). A slider, not a group: a screen reader in browse mode
    // (NVDA, JAWS) passes the arrow keys to a slider, and says its value (the point: aria-valuetext) itself,
    // with no live region (a review). Its children are presentational, so the title (a heading) and the
    // notes stay outside it.
    this.plotBox = document.createElement('div');
    this.plotBox.className = 'plot';
    this.plotBox.setAttribute('role', 'slider');
    this.plotBox.setAttribute('aria-roledescription', 'chart');
    this.plotBox.setAttribute('aria-keyshortcuts', 'ArrowLeft ArrowRight Home End Escape');
    this.plotBox.tabIndex = 0;
    this.plotBox.addEventListener('keydown', (e) => this.key(e));
    // What changed while it had the focus (its name, its range) is applied when it loses it: a screen reader
    // speaks each change of the focused element's name (a review: every second while steps stream in).
    this.plotBox.addEventListener('blur', () => {
      this.leavePoint();
      this.syncName();
      this.syncValue();
    });
    this.box.append(this.title, this.note, this.remark, this.plotBox);
    this.showSpec();
    parent.append(this.box);
    /** The point the keys are at (an index into this.data), or -1. */
    this.point = -1;
    /** The keys' point as said, without "first point" or "last point" (set: said again only when it changed). */
    this.pointSaid = '';
    /** The chart in words (describe): its name, applied while it does not have the focus. */
    this.summary = `${spec.title}: no data yet`;
    /** @type {uPlot | null} */
    this.plot = null;
    /** @type {uPlot.AlignedData} */
    this.data = [[], ...spec.series.map(() => [])];
    /** The factor the values are drawn at (drawScale). */
    this.scale = 1;
    /** @type {[number, number] | null} the steps (or times) the x axis spans at least: the other charts' (set). */
    this.span = null;
    this.syncName();
    this.syncValue();
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(this.box);
  }

  /** Whether the keys' element has the focus. */
  focused() {
    return document.activeElement === this.plotBox;
  }

  /** The title and note of this.spec. */
  showSpec() {
    this.title.textContent = this.spec.title;
    this.note.textContent = this.spec.note ?? '';
    this.note.hidden = !this.spec.note;
  }

  /**
   * Draws the chart as another spec says (its lines changed: single steps read again as buckets with a min and
   * max) in the same place: the plot is made again, the element with the focus stays, and so do the keys'
   * point (by its step; set) and the legend's place (a review: a focused chart was destroyed, the focus lost).
   * @param {ChartSpec} spec
   */
  respec(spec) {
    if (this.plot && registry[this.spec.key] === this.plot) delete registry[this.spec.key];
    this.plot?.destroy();
    this.plot = null;
    this.spec = spec;
    this.showSpec();
  }

  /** Sets an attribute of the keys' element when it differs (a screen reader may say any change). @param {string} name @param {string} value */
  attr(name, value) {
    if (this.plotBox.getAttribute(name) !== value) this.plotBox.setAttribute(name, value);
  }

  /** The name: the summary, unless the chart has the focus (then on blur). */
  syncName() {
    if (!this.focused()) this.attr('aria-label', this.summary);
  }

  /**
   * The slider's value: over the steps (or times, in seconds) of its points, now at the keys' point (else the
   * last one), said as the point is (valuetext).
   */
  syncValue() {
    const points = this.points();
    const xs = this.data[0] ?? [];
    if (points.length === 0) {
      for (const [name, value] of [['aria-valuemin', '0'], ['aria-valuemax', '0'], ['aria-valuenow', '0'], ['aria-valuetext', 'no data yet']]) this.attr(name, value);
      return;
    }
    const at = this.point >= 0 ? this.point : points[points.length - 1];
    this.attr('aria-valuemin', String(xs[points[0]]));
    this.attr('aria-valuemax', String(xs[points[points.length - 1]]));
    this.attr('aria-valuenow', String(xs[at]));
    this.attr('aria-valuetext', this.point >= 0 ? `${this.where(this.point, points)}${this.pointSaid}` : 'no point chosen');
  }

  size() {
    return { width: Math.max(160, this.box.clientWidth - 10), height: 200 };
  }

  /**
   * @param {uPlot.AlignedData} data
   * @param {[number, number] | null} [span] the steps (or times) the x axis spans at least: a chart of a few
   *   points read now and then (the norms) is drawn on the same axis as the charts beside it
   * @param {ArrayLike<number> | null} [versions] each point's version: over time, idle time is told by the
   *   time a version took (breakIdle)
   */
  set(data, span = null, versions = null) {
    // A value missing at a point (null: a metric some steps do not report, a group not there) is joined
    // across (undefined, which uPlot joins); NaN and infinities (a diverged run's norms) are gaps (null),
    // and said: a chart of nothing but Infinity was empty and named "no data yet", and a line drawn on
    // across a step that diverged hid it (reviews). Over time a line also breaks across idle time (breakIdle).
    const odd = this.notFinite(data);
    data = [data[0], ...data.slice(1).map((ys) => Array.from(ys, (v) => (v == null ? undefined : typeof v === 'number' && !Number.isFinite(v) ? null : v)))];
    this.remark.textContent = odd;
    this.remark.hidden = !odd;
    // The keys' point stays at its step (or time) while new points arrive; read again as buckets, it is the
    // bucket that holds that step (the first point at or after it); it goes when no point is left there (a
    // restore to before it).
    const keptX = this.point >= 0 ? this.data[0][this.point] : undefined;
    this.data = data;
    this.span = span;
    if (keptX !== undefined) {
      const kept = this.points().find((j) => data[0][j] >= keptX) ?? -1;
      if (kept < 0) {
        this.leavePoint();
        this.syncValue();
      } else {
        this.point = kept;
        // Said again (aria-valuetext) only when what is said of it changed (its values: now a bucket's).
        const said = this.pointText(kept);
        if (said !== this.pointSaid) {
          this.pointSaid = said;
          this.syncValue();
        }
      }
    }
    this.summary = this.describe(data, odd);
    // While the chart has the focus its name and range stay as they are (a screen reader would speak each
    // change, every second while steps stream in): applied on blur, the range on a key too.
    this.syncName();
    if (!this.focused()) this.syncValue();
    this.scale = drawScale(data);
    const scale = this.scale;
    const lines = this.spec.time ? breakIdle(data, versions) : data;
    /** @type {uPlot.AlignedData} */
    const drawn = scale === 1 ? lines : [lines[0], ...lines.slice(1).map((ys) => Array.from(ys, (v) => (typeof v === 'number' ? v * scale : v)))];
    if (this.plot) {
      this.plot.setData(drawn);
      this.fitX();
      // Where the point is drawn now (uPlot commits the new scales in a microtask).
      if (this.point >= 0) requestAnimationFrame(() => this.placeCursor());
      return;
    }
    /**
     * The legend shows the values, not the drawn ones; as uPlot writes them, except huge ones in exponent
     * form (uPlot would write 1.7e308 with all its 309 digits).
     * @type {uPlot.Series.Value}
     */
    const value = (_u, v, _si, di) => {
      if (di == null) return '--';
      if (v == null) return '';
      const x = v / this.scale;
      return Math.abs(x) >= 1e15 ? fmtNum(x) : uPlot.fmtNum(x);
    };
    /** @type {uPlot.Series[]} */
    const series = [this.spec.time
      ? { label: 'time', value: (_u, v) => (v == null ? '--' : new Date(v * 1000).toLocaleString()) }
      : { label: 'step' }];
    /** @type {uPlot.Band[]} */
    const bands = [];
    let colour = 0;
    this.spec.series.forEach((s, i) => {
      const stroke = PALETTE[colour % PALETTE.length];
      const isBand = i > 0 && this.spec.series[i - 1].band;
      const isBandMax = i > 1 && this.spec.series[i - 2].band;
      if (isBand || isBandMax) {
        const base = PALETTE[(colour - 1) % PALETTE.length];
        series.push({ label: s.label, stroke: `${base}40`, width: 1, show: true, value });
        if (isBandMax) bands.push({ series: [i + 1, i], fill: `${base}1a` });
        return;
      }
      colour++;
      series.push({
        // Gaps at nulls only (set): a value not finite, idle time over time; missing values are joined.
        label: s.label, stroke, width: 1.5, spanGaps: false, value, ...(this.spec.stepped && { paths: uPlot.paths.stepped?.({ align: 1 }) }),
        // A line that has one value (a metric reported once, an eval at one step): no segment to draw, so a
        // dot; uPlot's own dots come only where points are sparse on the axis (a review: an empty chart).
        points: { filter: (/** @type {uPlot} */ u, /** @type {number} */ si) => lone(u.data[si]) },
      });
    });
    this.plot = new uPlot({
      ...this.size(),
      series,
      bands,
      // The x axis: fitX.
      scales: { x: { time: !!this.spec.time }, y: this.spec.log ? { distr: 3 } : { range: (_u, min, max) => valueRange(min, max, this.scale) } },
      // Steps are whole numbers: no tick at step 2.5. Values get the digits their spacing needs, and the
      // labels say the values, not the drawn ones.
      axes: [
        // Ticks of steps at least their widest label apart (a review: 100,000120,000140,000 at six digits).
        this.spec.time ? { space: 60, values: (_u, splits, _axis, _space, incr) => timeLabels(splits, incr) } : { incrs: STEP_INCREMENTS, space: (u, _axis, min, max) => Math.max(50, labelWidth(u, fmtNum(Math.max(Math.abs(min), Math.abs(max)))) + 24) },
        {
          // Wide enough for the widest label as drawn (measured in the axis' font), besides the tick and gap.
          size: (u, values) => Math.max(50, Math.ceil(Math.max(0, ...(values ?? []).map((v) => labelWidth(u, String(v))))) + AXIS_TICK_GAP + 8),
          ...(!this.spec.log && { incrs: VALUE_INCREMENTS, splits: valueSplits }),
          values: (_u, splits, _axis, _space, incr) => tickLabels(splits.map((v) => v / this.scale), incr / this.scale),
        },
      ],
      legend: { live: true },
    }, drawn, this.plotBox);
    registry[this.spec.key] = this.plot;
    if (this.point >= 0) requestAnimationFrame(() => this.placeCursor());
    // A label cut short in the legend (app.css) has its whole name as a tooltip.
    this.plot.root.querySelectorAll('.u-legend .u-series').forEach((row, i) => {
      const label = row.querySelector('.u-label');
      const name = series[i]?.label;
      if (label && typeof name === 'string') label.setAttribute('title', name);
    });
    this.fitX();
  }

  /**
   * The x axis: from the first point to the last, and over `span` (set) too: the norms charts, read now and
   * then, on the steps of the charts beside them. One point alone gets a step (or a minute) either side:
   * uPlot drew it mid-way on an axis from 0 to twice its step, as if the series went on (a review: the norms
   * charts' axis ran to twice the session's step). uPlot ranges the x axis from the data only (a range
   * function of the x scale is not asked once there are points), so it is set after each setData.
   */
  fitX() {
    const xs = this.data[0];
    if (!this.plot || !xs || xs.length === 0) return;
    let lo = xs[0];
    let hi = xs[xs.length - 1];
    if (this.span) {
      lo = Math.min(lo, this.span[0]);
      hi = Math.max(hi, this.span[1]);
    }
    if (lo === hi) {
      const pad = this.spec.time ? 60 : 1;
      // Steps start at 0: a session's one point at step 0 gets [0, 1], not an axis of negative steps (a review).
      lo = this.spec.time ? lo - pad : Math.max(0, lo - pad);
      hi += pad;
    }
    // Always set: setData's own range of x is applied after this returns (uPlot commits in a microtask), so
    // its scale still holds the range set before, and skipping an equal one let uPlot's win every other
    // redraw (a review: the norms charts' axis went [1, 60], [0, 120], [1, 60], ... on redraws of the same data).
    this.plot.setScale('x', { min: lo, max: hi });
  }

  /** The indexes of this.data's points where a line has a value (a step some metric of the chart reported). */
  points() {
    const lines = this.lines();
    const out = [];
    for (let j = 0; j < (this.data[0]?.length ?? 0); j++) if (lines.some((i) => this.data[i + 1]?.[j] !== undefined)) out.push(j);
    return out;
  }

  /**
   * The keys of a focused chart: Left and Right to the point before or after, Home and End to the first or
   * last; Escape leaves it. The point is shown (uPlot's cursor and legend) and said (the slider's value).
   * @param {KeyboardEvent} e
   */
  key(e) {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key === 'Escape') {
      if (this.point < 0) return;
      this.leavePoint();
      this.syncValue();
      e.preventDefault();
      return;
    }
    const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };
    if (!(e.key in moves)) return;
    e.preventDefault();
    const points = this.points();
    if (points.length === 0) {
      this.syncValue();
      return;
    }
    const move = moves[/** @type {keyof typeof moves} */ (e.key)];
    let at = points.indexOf(this.point);
    if (move === -Infinity) at = 0;
    else if (move === Infinity || at < 0) at = points.length - 1;
    else at = Math.max(0, Math.min(points.length - 1, at + move));
    this.showPoint(points[at]);
  }

  /**
   * Where a point is among the chart's points, as said before it: "only point, ", "first point, ", "last
   * point, " or ''. Asked at each key: points that came since make the last point one before the last.
   * @param {number} j @param {number[]} points this.points()
   */
  where(j, points) {
    if (points.length === 1) return 'only point, ';
    return j === points[0] ? 'first point, ' : j === points[points.length - 1] ? 'last point, ' : '';
  }

  /**
   * A point in words: "at step 3: loss 1.25"; a bucket of a downsampled read (its band's min and max) says
   * the steps it holds, from after the point before it: "steps 1 to 67: loss mean 0.9675, min 0.9372, max
   * 0.999" (a review: its mean was given as the value at its last step); the first one "up to step 67".
   * @param {number} j an index into this.data
   */
  pointText(j) {
    const lines = this.lines();
    const bucket = lines.some((i) => this.spec.series[i].band && typeof this.data[i + 2]?.[j] === 'number');
    const said = lines.map((i) => {
      const v = this.data[i + 1]?.[j];
      if (v === undefined) return null;
      const min = this.spec.series[i].band ? this.data[i + 2]?.[j] : undefined;
      const value = v === null ? 'not finite' : fmtNum(v);
      if (typeof min !== 'number') return `${this.spec.series[i].label} ${value}`;
      return `${this.spec.series[i].label} mean ${value}, min ${fmtNum(min)}, max ${fmtNum(/** @type {number} */ (this.data[i + 3]?.[j]))}`;
    }).filter((t) => t !== null);
    const x = this.data[0][j];
    return `${bucket ? this.bucketAt(j) : this.at(x)}: ${said.join(', ')}`;
  }

  /** Where the bucket at index j lies: "steps 1 to 67", or "up to step 67" for the first. @param {number} j */
  bucketAt(j) {
    const x = this.data[0][j];
    const before = j > 0 ? this.data[0][j - 1] : undefined;
    if (this.spec.time) {
      const time = (/** @type {number} */ t) => new Date(t * 1000).toLocaleTimeString();
      return before === undefined ? `up to ${time(x)}` : `after ${time(before)} up to ${time(x)}`;
    }
    if (before === undefined) return `up to step ${fmtNum(x)}`;
    return before + 1 >= x ? `at step ${fmtNum(x)}` : `steps ${fmtNum(before + 1)} to ${fmtNum(x)}`;
  }

  /** Shows and says the point at index j of this.data. @param {number} j */
  showPoint(j) {
    this.point = j;
    this.pointSaid = this.pointText(j);
    this.syncValue();
    this.placeCursor();
  }

  /** uPlot's cursor (and so its legend) at the keys' point. */
  placeCursor() {
    const u = this.plot;
    const j = this.point;
    if (!u || j < 0) return;
    const x = this.data[0][j];
    const first = this.lines().map((i) => this.data[i + 1]?.[j]).find((v) => typeof v === 'number');
    const top = typeof first === 'number' ? u.valToPos(first * this.scale, 'y') : u.over.clientHeight / 2;
    u.setCursor({ left: u.valToPos(x, 'x'), top: Number.isFinite(top) ? top : u.over.clientHeight / 2 });
  }

  /**
   * The keys leave their point: the cursor goes, and the legend is blank ("--"), as when a mouse leaves the
   * plot. The slider's value is synced by the caller (a key, blur).
   */
  leavePoint() {
    if (this.point < 0) return;
    this.point = -1;
    this.pointSaid = '';
    this.plot?.setCursor({ left: -10, top: -10 });
  }

  /** The indices (in spec.series) of the lines, not of a band's min and max. */
  lines() {
    return this.spec.series.map((_, i) => i).filter((i) => !((i > 0 && this.spec.series[i - 1].band) || (i > 1 && this.spec.series[i - 2].band)));
  }

  /** Where it is drawn (step N, or a time of day). @param {number} x */
  at(x) {
    return this.spec.time ? `at ${new Date(x * 1000).toLocaleTimeString()}` : `at step ${fmtNum(x)}`;
  }

  /**
   * The lines' values that are not finite, each line's latest, e.g. "not finite at step 4: w Infinity";
   * '' when there are none.
   * @param {uPlot.AlignedData} data
   */
  notFinite(data) {
    /** @type {Map<number, string[]>} */
    const byX = new Map();
    for (const i of this.lines()) {
      const ys = data[i + 1] ?? [];
      for (let j = ys.length - 1; j >= 0; j--) {
        const v = ys[j];
        if (typeof v !== 'number' || Number.isFinite(v)) continue;
        const x = data[0][j];
        byX.set(x, [...(byX.get(x) ?? []), `${this.spec.series[i].label} ${v}`]);
        break;
      }
    }
    return [...byX].sort((a, b) => b[0] - a[0]).map(([x, said]) => `not finite ${this.at(x)}: ${said.join(', ')}`).join('; ');
  }

  /**
   * The chart in words: its title, how many points, and the latest value of each line (not of a band's
   * min and max) at the latest step or time, e.g. "loss chart, 5 points; at step 5: loss 0.625"; and
   * where values are not finite (`odd`).
   * @param {uPlot.AlignedData} data @param {string} [odd] notFinite's
   */
  describe(data, odd = '') {
    const xs = data[0];
    if (odd && !xs.some((_, j) => this.lines().some((i) => data[i + 1]?.[j] != null))) return `${this.spec.title} chart: ${odd}`;
    const said = this.describeFinite(data);
    return odd ? `${said}; ${odd}` : said;
  }

  /** @param {uPlot.AlignedData} data */
  describeFinite(data) {
    const xs = data[0];
    if (!xs || xs.length === 0) return `${this.spec.title}: no data yet`;
    const lines = this.lines();
    // The points are the steps where a line has a value (a metric reported at some steps only has a point at those).
    let points = 0;
    let last = -1;
    for (let j = 0; j < xs.length; j++) {
      if (lines.some((i) => data[i + 1]?.[j] != null)) {
        points++;
        last = j;
      }
    }
    if (points === 0) return `${this.spec.title}: no data yet`;
    const at = this.at(xs[last]);
    const latest = lines.map((i) => {
      const ys = data[i + 1] ?? [];
      let v = null;
      for (let j = ys.length - 1; j >= 0 && v === null; j--) v = ys[j] ?? null;
      return `${this.spec.series[i].label} ${v === null ? 'none' : fmtNum(v)}`;
    });
    return `${this.spec.title} chart, ${fmtNum(points)} point${points === 1 ? '' : 's'}; latest ${at}: ${latest.join(', ')}`;
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
    if (registry[this.spec.key] === this.plot) delete registry[this.spec.key];
    this.box.remove();
  }
}
