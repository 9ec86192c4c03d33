// Line charts with uPlot (from its npm package, served by the service). Every chart registers itself in
// window.asgdCharts under its key, so tests and the curious can read the data a chart holds.
import uPlot from 'uplot';

const PALETTE = ['#2f6fde', '#d9534f', '#25a25a', '#e39b1b', '#8e44ad', '#16a2b8', '#6b7585', '#c0398b'];

/** @type {Record<string, uPlot>} */
const registry = {};
const STEP_INCREMENTS = Array.from({ length: 15 }, (_, e) => [1, 2, 5].map((m) => m * 10 ** e)).flat();
/** @type {any} */ (window).asgdCharts = registry;

/**
 * @typedef {{ label: string, band?: boolean }} SeriesSpec  band: the next two series are this one's min and max
 * @typedef {{ key: string, title: string, note?: string, series: SeriesSpec[], time?: boolean, log?: boolean, stepped?: boolean }} ChartSpec
 */

export class Chart {
  /** @param {HTMLElement} parent @param {ChartSpec} spec */
  constructor(parent, spec) {
    this.spec = spec;
    this.box = document.createElement('div');
    this.box.className = 'chart';
    this.box.dataset.chart = spec.key;
    const title = document.createElement('h3');
    title.textContent = spec.title;
    this.box.append(title);
    if (spec.note) {
      const note = document.createElement('p');
      note.className = 'note';
      note.textContent = spec.note;
      this.box.append(note);
    }
    parent.append(this.box);
    /** @type {uPlot | null} */
    this.plot = null;
    /** @type {uPlot.AlignedData} */
    this.data = [[], ...spec.series.map(() => [])];
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(this.box);
  }

  size() {
    return { width: Math.max(300, this.box.clientWidth - 10), height: 200 };
  }

  /** @param {uPlot.AlignedData} data */
  set(data) {
    this.data = data;
    if (this.plot) {
      this.plot.setData(data);
      return;
    }
    /** @type {uPlot.Series[]} */
    const series = [{ label: this.spec.time ? 'time' : 'step' }];
    /** @type {uPlot.Band[]} */
    const bands = [];
    let colour = 0;
    this.spec.series.forEach((s, i) => {
      const stroke = PALETTE[colour % PALETTE.length];
      const isBand = i > 0 && this.spec.series[i - 1].band;
      const isBandMax = i > 1 && this.spec.series[i - 2].band;
      if (isBand || isBandMax) {
        const base = PALETTE[(colour - 1) % PALETTE.length];
        series.push({ label: s.label, stroke: `${base}40`, width: 1, show: true });
        if (isBandMax) bands.push({ series: [i + 1, i], fill: `${base}1a` });
        return;
      }
      colour++;
      series.push({ label: s.label, stroke, width: 1.5, spanGaps: true, ...(this.spec.stepped && { paths: uPlot.paths.stepped?.({ align: 1 }) }) });
    });
    this.plot = new uPlot({
      ...this.size(),
      series,
      bands,
      scales: { x: { time: !!this.spec.time }, y: this.spec.log ? { distr: 3 } : {} },
      // Steps are whole numbers: no tick at step 2.5. Values get the digits their spacing needs.
      axes: [
        this.spec.time ? {} : { incrs: STEP_INCREMENTS },
        { size: 64, values: (_u, splits) => splits.map((v) => (v === 0 ? '0' : String(Number(v.toPrecision(3))))) },
      ],
      legend: { live: true },
    }, data, this.box);
    registry[this.spec.key] = this.plot;
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
    if (registry[this.spec.key] === this.plot) delete registry[this.spec.key];
  }
}
