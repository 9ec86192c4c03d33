// The dashboard in a real browser (Debian's headless Chromium), for what a reviewer found: a refused fork
// navigates nowhere, axis labels that tell ticks apart, the charts after a restore, cheap live updates, a
// live indicator that tells the truth, the page at phone width, no favicon 404, the empty row's colspan.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type { Browser, Page } from 'playwright-core';
import { buildTestApp } from '../helper.ts';
import { chromiumMissing, launch, listen, liveState, newPage, recordRequests, screenshot } from './browser.ts';

const ADMIN = 'admin-token-for-the-dashboard-ui-tests';
const skip = chromiumMissing() ?? false;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A client of the API over HTTP, as a training script would be; `expect` is the status it must answer. */
function client(base: string, token: string | null) {
  return async (method: string, path: string, body?: unknown, expect?: number): Promise<any> => {
    const response = await fetch(base + path, {
      method,
      headers: { ...(token && { authorization: `Bearer ${token}` }), ...(body !== undefined && { 'content-type': 'application/json' }) },
      ...(body !== undefined && { body: JSON.stringify(body) }),
    });
    const text = await response.text();
    if (expect !== undefined) assert.equal(response.status, expect, `${method} ${path}: ${text}`);
    else assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
}
type Client = ReturnType<typeof client>;

const PARAMS = [{ name: 'w', shape: [2, 2], data: [0.1, 0.2, 0.3, 0.4] }, { name: 'b', shape: [2], data: [0, 0] }];
const GRAD = { w: [0.5, -0.25, 0.125, 1], b: [0.1, -0.2] };

async function setup(t: TestContext, opts: { auth?: boolean } = {}) {
  const { app } = await buildTestApp(t, opts.auth ? { env: { ASGD_ADMIN_TOKEN: ADMIN } } : {});
  const base = await listen(app);
  const api = client(base, opts.auth ? ADMIN : null);
  const browser = await launch(t);
  const log: string[] = [];
  t.after(() => { if (log.length) console.log(log.join('\n')); });
  return { app, base, api, browser, log };
}

/** The data a chart holds: [xs, ...series], as uPlot has it. */
function chartData(page: Page, key: string): Promise<(number | null)[][] | null> {
  return page.evaluate((k) => {
    const chart = (window as any).asgdCharts?.[k];
    return chart ? chart.data.map((s: ArrayLike<number | null>) => Array.from(s)) : null;
  }, key);
}

async function openSession(browser: Browser, base: string, name: string, log: string[]): Promise<Page> {
  const page = await newPage(browser, log);
  await page.goto(`${base}/ui/#/s/${name}`);
  return page;
}

test('fork: a dialog asks for the name (offered: <name>-fork-<version>); a refusal is shown in it and it stays open for another name; Cancel and Escape fork nothing', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'src', params: PARAMS });
  await api('POST', '/v1/sessions', { name: 'taken', params: PARAMS });
  await api('POST', '/v1/sessions/src/step', { grads: GRAD, metrics: { loss: 1 } });
  const { snapshots } = await api('GET', '/v1/sessions/src/snapshots');
  const snap = snapshots[0];
  const page = await openSession(browser, base, 'src', log);
  const forks = recordRequests(page);
  const forkButton = `tr[data-snapshot="${snap.id}"] button[data-action=fork]`;
  await page.waitForSelector(forkButton);
  const sessionNames = async () => (await api('GET', '/v1/sessions')).sessions.map((s: any) => s.name).sort();
  const before = await sessionNames();

  // Cancel, then Escape: the dialog closes, nothing is sent, the page stays.
  for (const close of [() => page.click('#fork-cancel'), () => page.keyboard.press('Escape')]) {
    await page.click(forkButton);
    await page.waitForSelector('#fork-dialog[open]');
    assert.equal(await page.inputValue('#fork-name'), `src-fork-${snap.version}`, 'the name offered');
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'fork-name', 'the name field has the focus');
    await close();
    await page.waitForSelector('#fork-dialog[open]', { state: 'detached' });
  }
  // A name the API would refuse is refused in the dialog without a request.
  await page.click(forkButton);
  await page.waitForSelector('#fork-dialog[open]');
  await page.fill('#fork-name', 'bad name!');
  await page.click('#fork-ok');
  await page.waitForFunction(() => /Not a session name/.test(document.getElementById('fork-error')?.textContent ?? ''));
  assert.equal(await page.getAttribute('#fork-name', 'aria-invalid'), 'true');
  assert.ok(await page.isVisible('#fork-dialog[open]'));
  assert.deepEqual(forks.filter((r) => r.endsWith('/fork')), [], 'no fork request for an invalid name, nor for Cancel and Escape');

  // A name taken: the API's message in the dialog (and on the page), the dialog open, the page on the session.
  const refusal = await api('POST', '/v1/sessions/src/fork', { name: 'taken', snapshot: snap.id }, 409);
  await page.fill('#fork-name', 'taken');
  await page.click('#fork-ok');
  await page.waitForFunction((m) => document.getElementById('fork-error')?.textContent?.includes(m), refusal.message, { timeout: 5000 });
  assert.ok(await page.isVisible('#fork-dialog[open]'), 'the dialog stays open for another name');
  assert.match(await page.textContent('#snapshots .error') ?? '', new RegExp(refusal.message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  assert.equal(await page.evaluate(() => location.hash), '#/s/src');
  assert.deepEqual(await sessionNames(), before, 'no session made by the refused fork, Cancel or Escape');

  // Another name in the same dialog: made, and the new session opens.
  await page.fill('#fork-name', 'made');
  await page.press('#fork-name', 'Enter');
  await page.waitForFunction(() => location.hash === '#/s/made');
  await page.waitForSelector('#fork-dialog[open]', { state: 'detached' });
  assert.equal((await api('GET', '/v1/sessions/made')).step, snap.step);

  // The name offered for a fork of a session with a 128-character name fits in 128 characters: accepted as
  // offered, it is made (it was <name>-fork-<version>, 135 characters, and refused).
  const long = 'l'.repeat(128);
  await api('POST', '/v1/sessions', { name: long, params: PARAMS });
  const longSnap = (await api('GET', `/v1/sessions/${long}/snapshots`)).snapshots[0];
  const longPage = await openSession(browser, base, long, log);
  await longPage.waitForSelector(`tr[data-snapshot="${longSnap.id}"] button[data-action=fork]`);
  await longPage.click(`tr[data-snapshot="${longSnap.id}"] button[data-action=fork]`);
  await longPage.waitForSelector('#fork-dialog[open]');
  assert.equal(await longPage.inputValue('#fork-name'), `${'l'.repeat(121)}-fork-1`);
  await longPage.click('#fork-ok');
  await longPage.waitForFunction((name) => location.hash === `#/s/${name}`, `${'l'.repeat(121)}-fork-1`, { timeout: 5000 });
  assert.deepEqual(log.filter((l) => l.startsWith('pageerror')), []);
});

test('the value axis labels every tick differently when the values span a small range', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'flat', params: PARAMS });
  for (const loss of [0.05, 0.049998, 0.049996, 0.049994, 0.049995, 0.05]) await api('POST', '/v1/sessions/flat/step', { grads: GRAD, metrics: { loss, big: 1e7 + loss * 1e6 } });
  const page = await openSession(browser, base, 'flat', log);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 6);
  // The labels uPlot drew on the y axis of each chart.
  const labels = (key: string) => page.evaluate((k) => (window as any).asgdCharts[k].axes[1]._values as string[], key);
  for (const key of ['metric:loss', 'metric:big']) {
    const shown = await labels(key);
    assert.ok(shown.length >= 2, `${key}: ${JSON.stringify(shown)}`);
    assert.equal(new Set(shown).size, shown.length, `${key}: distinct ticks read the same: ${JSON.stringify(shown)}`);
  }
  const loss = await labels('metric:loss');
  assert.ok(loss.some((l) => /^0\.0499/.test(l)) && loss.every((l) => l.length <= 8), JSON.stringify(loss));
  // Large values in exponent form.
  assert.ok((await labels('metric:big')).every((l) => /^1\.\d+e7$/.test(l)), JSON.stringify(await labels('metric:big')));
});

test('nearly flat series are drawn: eta at a small lr (1e-12 a step), float32 jitter around 1, all zeros', { skip }, async (t) => {
  // Found by a dashboard review: uPlot rounds its range to 9 decimals, and such charts had a range of no
  // width, no line and no axis (the eta chart of every session with lr <= 1e-4, for thousands of steps).
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'calm', params: PARAMS, hyperparameters: { lr: 1e-4, t0: 1 } });
  const jitter = [0.9999999403953552, 1, 0.9999999403953552, 1, 1, 0.9999999403953552];
  for (const j of jitter) await api('POST', '/v1/sessions/calm/step', { grads: GRAD, metrics: { jitter: j, zero: 0 } });
  const page = await openSession(browser, base, 'calm', log);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:jitter']?.data[0].length === 6 && (window as any).asgdCharts?.eta);
  const drawn = (key: string) => page.evaluate((k) => {
    const u = (window as any).asgdCharts[k];
    return {
      min: u.scales.y.min as number, max: u.scales.y.max as number, height: u.over.clientHeight as number,
      values: Array.from(u.data[1] as ArrayLike<number>),
      ys: Array.from(u.data[1] as ArrayLike<number>, (v) => u.valToPos(v, 'y') as number),
      labels: u.axes[1]._values as string[],
    };
  }, key);
  for (const key of ['eta', 'metric:jitter', 'metric:zero']) {
    const c = await drawn(key);
    assert.ok(Number.isFinite(c.min) && Number.isFinite(c.max) && c.max > c.min, `${key}: y range ${c.min} .. ${c.max}`);
    assert.ok(c.ys.every((y) => Number.isFinite(y) && y >= 0 && y <= c.height), `${key}: points at ${JSON.stringify(c.ys)} in ${c.height} px`);
    assert.ok(c.labels.length >= 2 && new Set(c.labels).size === c.labels.length, `${key}: ticks ${JSON.stringify(c.labels)}`);
    // Different values are drawn at different heights, the bigger higher.
    for (let i = 1; i < c.values.length; i++) {
      if (c.values[i] !== c.values[i - 1]) assert.equal(Math.sign(c.ys[i - 1] - c.ys[i]), Math.sign(c.values[i] - c.values[i - 1]), `${key} at ${i}: ${JSON.stringify(c.values)} drawn at ${JSON.stringify(c.ys)}`);
    }
  }
  const eta = await drawn('eta');
  assert.ok(new Set(eta.values).size > 1 && eta.max - eta.min < 1e-9, `eta moves by less than 1e-9: ${JSON.stringify(eta.values)}`);
  assert.deepEqual([(await drawn('metric:zero')).min, (await drawn('metric:zero')).max], [0, 1]);
  // The legend and the descriptions say a value near the largest double as it is, not Infinity.
  const near = await page.evaluate(async () => (await import('/ui/js/format.js' as string)).fmtNum(-1.7976931348623157e308));
  assert.equal(near, '-1.798e+308');
});

test('a metric whose range overflows a double (±1.7e308) is drawn: a finite y range that holds every point, ticks labelled with the values', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'huge', params: PARAMS });
  const losses = [1.7e308, -1.7e308, 1.7e308, -1.7e308, 1, 0];
  for (const loss of losses) await api('POST', '/v1/sessions/huge/step', { grads: GRAD, metrics: { loss, small: loss === 1 ? 2 : 1 } });
  const page = await openSession(browser, base, 'huge', log);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 6);
  const drawn = (key: string) => page.evaluate((k) => {
    const u = (window as any).asgdCharts[k];
    const height = u.over.clientHeight;
    return {
      min: u.scales.y.min as number | null, max: u.scales.y.max as number | null, height,
      // Where each point is drawn, in CSS pixels from the top of the plot.
      ys: Array.from(u.data[1] as ArrayLike<number>, (v) => u.valToPos(v, 'y') as number),
      labels: u.axes[1]._values as string[],
      legend: [...u.root.querySelectorAll('.u-legend .u-value')].map((el: Element) => el.textContent),
    };
  }, key);
  const loss = await drawn('metric:loss');
  assert.ok(Number.isFinite(loss.min) && Number.isFinite(loss.max) && loss.max! > loss.min!, `y range ${loss.min} .. ${loss.max}`);
  assert.ok(loss.ys.every((y) => Number.isFinite(y) && y >= 0 && y <= loss.height), `points at ${JSON.stringify(loss.ys)} in a plot ${loss.height} px high`);
  // 1.7e308 on top, -1.7e308 at the bottom, 1 and 0 in the middle.
  assert.ok(loss.ys[0] < loss.ys[4] && loss.ys[4] < loss.ys[1], JSON.stringify(loss.ys));
  assert.ok(Math.abs(loss.ys[4] - loss.height / 2) < loss.height / 4, JSON.stringify(loss.ys));
  // The ticks say the values (about ±1e308), not the scaled ones the chart draws.
  assert.ok(loss.labels.length >= 2 && loss.labels.every((l) => /^-?\d(\.\d+)?e30[78]$|^0$/.test(l)), JSON.stringify(loss.labels));
  assert.ok(loss.labels.some((l) => /^1(\.\d+)?e308$/.test(l)), JSON.stringify(loss.labels));
  // Over the first point the legend says its value.
  await page.hover('[data-chart="metric:loss"] .u-over', { position: { x: 2, y: 10 } });
  assert.deepEqual((await drawn('metric:loss')).legend, ['1', '1.7e+308']);
  // A chart of ordinary values is drawn as before: uPlot's own range.
  const small = await drawn('metric:small');
  assert.ok(Math.abs(small.min! - 0.9) < 1e-9 && Math.abs(small.max! - 2.1) < 1e-9, `${small.min} .. ${small.max}`);
  // The range function alone.
  const unit = await page.evaluate(async () => {
    const { drawScale, valueRange } = await import('/ui/js/charts.js' as string);
    const scale = drawScale([[1, 2], [1.7e308, -1.7e308]]);
    return { scale, range: valueRange(-1.7e308 * scale, 1.7e308 * scale, scale), plain: drawScale([[1, 2], [1e300, -1e300]]), empty: valueRange(null, null, 1) };
  });
  assert.equal(unit.scale, 1 / 8);
  assert.equal(unit.plain, 1);
  assert.deepEqual(unit.empty, [null, null]);
  assert.ok(unit.range.every(Number.isFinite) && Number.isFinite(unit.range[1] - unit.range[0]) && unit.range[0] * 8 >= -Number.MAX_VALUE, JSON.stringify(unit.range));
  await screenshot(page, 'session-huge-metric', 480);
});

/** Steps `from`..`to` with a loss that tells the branch apart. */
async function steps(api: Client, name: string, from: number, to: number, loss: (step: number) => number) {
  for (let s = from; s <= to; s++) await api('POST', `/v1/sessions/${name}/step`, { grads: GRAD, metrics: { loss: loss(s) } });
}

function assertLineage(data: (number | null)[][] | null, last: number, loss: (step: number) => number, what: string) {
  assert.ok(data, what);
  const [xs, ys] = data;
  assert.deepEqual(xs, Array.from({ length: last }, (_, i) => i + 1), `${what}: the steps of the present history, once each`);
  assert.deepEqual(ys, xs.map((s) => loss(s as number)), `${what}: the losses of the present history`);
}

test('after a restore the charts show the session\'s present history: steps strictly increasing, no negative steps/s', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'rb', params: PARAMS });
  const first = (s: number) => 10 + s; // the history the restore leaves
  const second = (s: number) => s / 100; // the one after it
  const loss = (s: number) => (s <= 20 ? first(s) : second(s));
  await steps(api, 'rb', 1, 20, first);
  const snap = await api('POST', '/v1/sessions/rb/snapshots', { pinned: true });
  await steps(api, 'rb', 21, 40, first);
  const page = await openSession(browser, base, 'rb', log);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 40);

  // Restored to step 20 while the page is open, then 10 more steps: seen live.
  await api('POST', `/v1/sessions/rb/snapshots/${snap.id}/restore`);
  await steps(api, 'rb', 21, 30, second);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].at(-1) === 30 && (window as any).asgdCharts['metric:loss'].data[1].at(-1) === 0.3, undefined, { timeout: 10_000 });
  assertLineage(await chartData(page, 'metric:loss'), 30, loss, 'live');
  const rate = (await chartData(page, 'steps_per_second'))![1];
  assert.ok(rate.every((r) => r == null || r >= 0), `steps/s ${JSON.stringify(rate)}`);
  assert.match(await page.textContent('#app') ?? '', /went back to an earlier step/);

  // 10 more: step 40 again, on the new history; and the page opened afresh shows the same.
  await steps(api, 'rb', 31, 40, second);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[1].at(-1) === 0.4, undefined, { timeout: 10_000 });
  assertLineage(await chartData(page, 'metric:loss'), 40, loss, 'live, back at step 40');
  const fresh = await openSession(browser, base, 'rb', log);
  await fresh.waitForFunction(() => ((window as any).asgdCharts?.['metric:loss']?.data[0].length ?? 0) > 0);
  assertLineage(await chartData(fresh, 'metric:loss'), 40, loss, 'opened after');
  for (const key of ['steps_per_second', 'staleness', 'lr', 'eta', 'mu']) {
    const xs = (await chartData(fresh, key))![0] as number[];
    assert.ok(xs.every((x, i) => i === 0 || x > xs[i - 1]), `${key}: x strictly increasing`);
  }
  assert.ok((await chartData(fresh, 'steps_per_second'))![1].every((r) => r == null || r >= 0));
  await screenshot(fresh, 'session-after-restore-lineage');
});

test('live updates are cheap: a burst of steps costs about one refresh a second, the expensive reads less, and the newest version still shows', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'burst', params: PARAMS, hyperparameters: { lr: 0.1 } });
  await steps(api, 'burst', 1, 3, (s) => 1 / s);
  const page = await openSession(browser, base, 'burst', log);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 3);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  const requests = recordRequests(page);

  const started = Date.now();
  const N = 40;
  for (let s = 4; s < 4 + N; s++) {
    await api('POST', '/v1/sessions/burst/step', { grads: GRAD, metrics: { loss: 1 / s }, ...(s === 20 && { param_groups: [{ lr: 0.05 }] }) });
    await sleep(60);
  }
  const { version } = await api('GET', '/v1/sessions/burst');
  const sent = Date.now();
  await page.waitForFunction((v) => Number(document.querySelector('#app')?.getAttribute('data-version')) === v && document.querySelector('[data-card=step] b')?.textContent === '43', version, { timeout: 5000 });
  const lagMs = Date.now() - sent;
  const seconds = (Date.now() - started) / 1000;
  console.log(`${N} steps over ${seconds.toFixed(1)} s: ${requests.length} requests; the last version showed ${lagMs} ms after it was made`);
  assert.ok(lagMs < 2000, `the newest version took ${lagMs} ms to show`);
  const count = (re: RegExp) => requests.filter((r) => re.test(r)).length;
  const sessionReads = count(/^\/v1\/sessions\/burst$/);
  assert.ok(sessionReads <= Math.ceil(seconds) + 2, `${sessionReads} refreshes in ${seconds.toFixed(1)} s: ${requests.join(' ')}`);
  // Only the new points of the series, never the whole of it again.
  const metrics = requests.filter((r) => r.startsWith('/v1/sessions/burst/metrics'));
  assert.ok(metrics.length >= 1 && metrics.every((r) => /after_version=[1-9]/.test(r) && !/max_points/.test(r)), metrics.join(' '));
  assert.ok(count(/\/norms/) <= Math.ceil(seconds / 5) + 1, `norms read ${count(/\/norms/)} times`);
  assert.ok(count(/\/snapshots/) <= Math.ceil(seconds / 5) + 1, `snapshots read ${count(/\/snapshots/)} times`);
  // The hyperparameters only for the step that changed them.
  assert.ok(count(/\/hyperparameters/) >= 1 && count(/\/hyperparameters/) <= 2, `hyperparameters read ${count(/\/hyperparameters/)} times`);
  assert.ok(requests.length <= 2.5 * seconds + 8, `${requests.length} requests: ${requests.join(' ')}`);
  // And what is shown is complete: every step, the lr change at step 20.
  const loss = await chartData(page, 'metric:loss');
  assert.deepEqual(loss?.[0], Array.from({ length: 3 + N }, (_, i) => i + 1));
  assert.equal((await chartData(page, 'lr'))?.[1].at(-1), 0.05);
  assert.match(await page.textContent('#hyper-changes') ?? '', /lr=0\.05/);
  // Once the steps stop, the norms catch up with the last version.
  await page.waitForFunction((v) => (document.querySelector('#norms')?.textContent ?? '').includes(`version ${v}`), version, { timeout: 12_000 });
});

test('live indicator: the session deleted while viewed says so and stops asking; a missing session is asked for with a growing delay', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'doomed', params: PARAMS });
  await steps(api, 'doomed', 1, 2, (s) => s);
  const page = await openSession(browser, base, 'doomed', log);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  const requests = recordRequests(page);
  await api('DELETE', '/v1/sessions/doomed');
  await page.waitForFunction(() => /deleted/.test(document.querySelector('#app')?.textContent ?? ''), undefined, { timeout: 5000 });
  await page.waitForFunction(() => !document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 3000 });
  assert.match((await liveState(page)).text, /deleted/);
  // Its actions are disabled (found by a review: Take snapshot, Pin, Restore, Fork and the downloads stayed enabled).
  const enabled = await page.$$eval('#session-content button', (els) => els.filter((e) => !(e as HTMLButtonElement).disabled).map((e) => e.textContent));
  assert.deepEqual(enabled, []);
  assert.ok((await page.$$('#session-content button')).length > 0, 'the page had buttons to disable');
  const after = requests.length;
  await sleep(3500);
  assert.deepEqual(requests.slice(after), [], 'nothing is asked for a deleted session');
  // A session created again under the name is noticed (asked after 10 s, then less often), with a link to
  // follow it (a review: the page said "deleted" for good while a new session of the name trained).
  await api('POST', '/v1/sessions', { name: 'doomed', params: PARAMS });
  await page.waitForFunction(() => /^Session doomed was deleted, and a new session of that name created since \(version 4, step 0\): reload the page to follow it\.$/.test(document.querySelector('#app p.error')?.textContent ?? ''), undefined, { timeout: 30_000 });
  assert.equal(await page.getAttribute('#app p.error a', 'href'), await page.evaluate(() => location.href));

  const missing = await newPage(browser, log);
  const asked = recordRequests(missing);
  await missing.goto(`${base}/ui/#/s/not-yet`);
  await missing.waitForFunction(() => /does not exist/.test(document.querySelector('#app')?.textContent ?? ''));
  assert.equal(await missing.isVisible('#session-content'), false, 'no headings over a session that does not exist');
  const before = asked.length;
  await sleep(4500);
  const state = await liveState(missing);
  assert.equal(state.green, false, state.text);
  assert.match(state.text, /no session|not live/);
  // Asked again after 2 s, then after 4 s more: not every second.
  const tries = asked.slice(before);
  assert.ok(tries.length <= 2, `${tries.length} requests in 4.5 s: ${tries.join(' ')}`);
  // Once it exists, the page shows it and goes live.
  await api('POST', '/v1/sessions', { name: 'not-yet', params: PARAMS });
  await missing.waitForFunction(() => document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 10_000 });
  assert.equal(await missing.textContent('[data-card=step] b'), '0');
  assert.ok(await missing.isVisible('#snapshots-table'), 'shown once it exists');
  // And it keeps following it: the steps after the first pick-up show up (the page once froze after one).
  await steps(api, 'not-yet', 1, 3, (s) => s);
  await missing.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '3', undefined, { timeout: 10_000 });
  await steps(api, 'not-yet', 4, 6, (s) => s);
  await missing.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '6', undefined, { timeout: 10_000 });
});

test('a session this token may not read: the page says why under the name, with no headings over nothing; a session that does not exist yet likewise until it does', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t, { auth: true });
  await api('POST', '/v1/sessions', { name: 'theirs', params: PARAMS });
  await api('POST', '/v1/sessions', { name: 'mine', params: PARAMS });
  const { token } = await api('POST', '/v1/tokens', { name: 'limited', scope: 'read', sessions: ['mine'] });
  const page = await newPage(browser, log);
  await page.goto(`${base}/ui/#/s/theirs`);
  await page.waitForSelector('#token-dialog[open]');
  await page.fill('#token-input', token);
  await page.click('#token-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('live')?.dataset.state === 'forbidden', undefined, { timeout: 5000 });
  const refusal = await fetch(`${base}/v1/sessions/theirs`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(refusal.status, 403);
  assert.match(await page.textContent('#app .error') ?? '', new RegExp(((await refusal.json()) as any).message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  assert.equal(await page.textContent('#app h1'), 'theirs');
  const visibleHeadings = () => page.$$eval('#app h2, #app h3', (hs) => hs.filter((el) => (el as HTMLElement).offsetParent !== null).map((el) => el.textContent));
  assert.deepEqual(await visibleHeadings(), [], 'no section headings over nothing');
  assert.equal(await page.isVisible('#snapshots-table'), false);
  // The session it may read shows whole.
  await page.goto(`${base}/ui/#/s/mine`);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 5000 });
  assert.ok((await visibleHeadings()).includes('Snapshots'));
  assert.ok(await page.isVisible('#snapshots-table'));
  assert.deepEqual(log.filter((l) => l.startsWith('pageerror')), []);
});

test('live indicator: a revoked token brings the token prompt with the reason; no green light', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t, { auth: true });
  await api('POST', '/v1/sessions', { name: 'watched', params: PARAMS });
  await steps(api, 'watched', 1, 2, (s) => s);
  const { token, id } = await api('POST', '/v1/tokens', { name: 'viewer', scope: 'read' });
  const page = await newPage(browser, log);
  await page.goto(`${base}/ui/#/s/watched`);
  await page.waitForSelector('#token-dialog[open]');
  await page.fill('#token-input', token);
  await page.click('#token-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  // The focus is on the page's heading after the prompt, not on <body> (a review).
  assert.equal(await page.evaluate(() => document.activeElement?.tagName), 'H1');
  await api('DELETE', `/v1/tokens/${id}`);
  await page.waitForSelector('#token-dialog[open]', { timeout: 8000 });
  assert.match(await page.textContent('#token-reason') ?? '', /refused/);
  assert.equal((await liveState(page)).green, false);
  // Escape: the prompt comes again, still saying why (it said the generic reason: a review).
  await page.keyboard.press('Escape');
  await page.waitForSelector('#token-dialog[open]', { timeout: 5000 });
  assert.match(await page.textContent('#token-reason') ?? '', /refused/);
  // With a good token the page is back.
  await page.fill('#token-input', ADMIN);
  await page.click('#token-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 5000 });
  assert.equal(await page.textContent('[data-card=step] b'), '2');
  assert.equal(await page.evaluate(() => document.activeElement?.tagName), 'H1');
});

test('live indicator: the service stopped turns it off and the page retries with a growing delay', { skip }, async (t) => {
  const { app, base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'alone', params: PARAMS });
  const page = await openSession(browser, base, 'alone', log);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  let failed = 0;
  page.on('requestfailed', (r) => { if (r.url().includes('/events')) failed++; });
  await app.close();
  await page.waitForFunction(() => !document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 5000 });
  // A reconnect that comes while the service closes gets its 503 (kept-alive connections stay open 100 ms
  // for requests already on their way), one after it finds nothing listening.
  assert.match((await liveState(page)).text, /cannot be reached|the server is shutting down/);
  await page.waitForFunction(() => /cannot be reached/.test(document.getElementById('live')?.textContent ?? ''), undefined, { timeout: 5000 });
  const at = failed;
  await sleep(6000);
  // 1 s, 2 s, 4 s…: at most three tries in six seconds, not six.
  assert.ok(failed - at <= 3, `${failed - at} tries in 6 s`);
  assert.equal((await liveState(page)).green, false);
});

test('at phone width (375 px) neither the list nor a session page scrolls sideways; the tables scroll in their box', { skip }, async (t) => {
  const { base, api, browser } = await setup(t);
  const long = 'a-rather-long-session-name-for-a-phone-screen';
  await api('POST', '/v1/sessions', { name: long, params: PARAMS, snapshot_every: 2 });
  await api('POST', '/v1/sessions', { name: 'other', params: PARAMS });
  for (let s = 1; s <= 4; s++) await api('POST', `/v1/sessions/${long}/step`, { grads: GRAD, metrics: { loss: 1 / s }, ...(s === 2 && { param_groups: [{ lr: 0.001 }] }) });
  const context = await browser.newContext({ viewport: { width: 375, height: 800 } });
  const page = await context.newPage();
  const width = () => page.evaluate(() => document.documentElement.scrollWidth);

  await page.goto(`${base}/ui/`);
  await page.waitForSelector(`tr[data-session="${long}"]`);
  assert.ok(await width() <= 375, `the list is ${await width()} px wide`);
  await screenshot(page, 'phone-sessions');

  await page.goto(`${base}/ui/#/s/${long}`);
  await page.waitForSelector('#hyper-changes');
  await page.waitForSelector('tr[data-snapshot]');
  await page.waitForSelector('#norms-table');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 4);
  assert.ok(await width() <= 375, `the session page is ${await width()} px wide`);
  // The wide table scrolls inside its own box.
  const box = await page.$eval('#snapshots-table', (table) => {
    const parent = table.parentElement!;
    return { overflow: getComputedStyle(parent).overflowX, scrolls: parent.scrollWidth > parent.clientWidth };
  });
  assert.deepEqual(box, { overflow: 'auto', scrolls: true });
  // Every box that scrolls is a named tab stop, and the keyboard scrolls it (a review: axe's
  // scrollable-region-focusable at 375 px).
  const boxes = await page.$$eval('.scroll', (els) => els.filter((el) => el.scrollWidth > el.clientWidth).map((el) => [el.getAttribute('aria-label'), (el as HTMLElement).tabIndex]));
  assert.ok(boxes.length >= 2, JSON.stringify(boxes));
  for (const [label, tabIndex] of boxes) assert.ok(label && tabIndex === 0, JSON.stringify(boxes));
  await page.focus('.scroll[aria-label=Snapshots]');
  for (let i = 0; i < 5; i++) await page.keyboard.press('ArrowRight');
  // (Scrolling by key is animated: scrollLeft moves after the presses.)
  await page.waitForFunction(() => document.querySelector('.scroll[aria-label=Snapshots]')!.scrollLeft > 0, undefined, { timeout: 5000 });
  const header = await page.$eval('header', (el) => el.getBoundingClientRect().width);
  assert.equal(Math.round(header), 375, 'the header spans the width');
  await screenshot(page, 'phone-session');
});

test('no console error on opening the list (a favicon); the empty row spans the table\'s columns', { skip }, async (t) => {
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'one', params: PARAMS });
  const page = await newPage(browser, log);
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="one"]');
  await sleep(500);
  assert.deepEqual(log.filter((l) => l.startsWith('console.error') || l.startsWith('pageerror')), []);
  await page.fill('input[type=search]', 'zzz');
  await page.waitForSelector('#sessions tbody tr.empty, #sessions tbody td[colspan]');
  const { colspan, columns } = await page.$eval('#sessions', (table) => ({
    colspan: Number(table.querySelector('tbody td[colspan]')!.getAttribute('colspan')),
    columns: [...table.querySelectorAll('thead th')].filter((th) => getComputedStyle(th).display !== 'none').length,
  }));
  assert.equal(colspan, columns);
  assert.match(await page.textContent('#sessions tbody') ?? '', /No session name contains "zzz"/);
});

test('for a screen reader: the token field has a name, each snapshot row\'s buttons name their snapshot, no heading level is skipped', { skip }, async (t) => {
  // Found by a dashboard review: "Pin" ten times over, a field with a placeholder only, h1 then h3.
  const { base, api, browser, log } = await setup(t);
  await api('POST', '/v1/sessions', { name: 'a11y', params: PARAMS });
  await api('POST', '/v1/sessions/a11y/step', { grads: GRAD, metrics: { loss: 1 } });
  await api('POST', '/v1/sessions/a11y/snapshots', {});
  const page = await openSession(browser, base, 'a11y', log);
  await page.waitForSelector('[data-snapshot] [data-action="restore"]');
  await page.waitForFunction(() => document.querySelectorAll('[data-snapshot]').length === 2);
  const names = await page.$$eval('[data-snapshot] button', (buttons) => buttons.map((b) => b.getAttribute('aria-label') ?? b.textContent ?? ''));
  assert.equal(new Set(names).size, names.length, `every button has a name of its own: ${JSON.stringify(names)}`);
  const ids = await page.$$eval('[data-snapshot]', (rows) => rows.map((r) => r.getAttribute('data-snapshot')));
  for (const id of ids) for (const what of ['Pin', 'Restore', 'Fork', 'download .pt']) assert.ok(names.some((n) => n.startsWith(what) && n.includes(`snapshot ${id}`)), `${what} of snapshot ${id}: ${JSON.stringify(names)}`);
  const levels = await page.$$eval('h1, h2, h3, h4', (hs) => hs.filter((h) => !h.closest('dialog')).map((h) => Number(h.tagName[1])));
  for (let i = 1; i < levels.length; i++) assert.ok(levels[i] <= levels[i - 1] + 1, `headings ${JSON.stringify(levels)}`);
  assert.equal(await page.getAttribute('#token-input', 'aria-label'), 'Bearer token');
  // Every dialog is named (a review: the token prompt and the restore confirmation had no accessible name).
  for (const id of ['token-dialog', 'fork-dialog', 'confirm-dialog']) assert.ok(await page.getAttribute(`#${id}`, 'aria-labelledby'), id);
});
