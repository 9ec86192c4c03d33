// The dashboard in a real browser (Debian's headless Chromium) for sessions with many metric names or many
// parameters (a review: 1,600 metric names took the page 12 s to draw, 9,600 never finished; a model of
// 20,000 named tensors rebuilt a table of 160,000 elements at every read of the norms): the page charts the
// first metrics and lets one more be picked, and lists the first parameters' norms with a pointer to all.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { chromiumMissing, openDashboard } from './browser.ts';

const skip = chromiumMissing() ?? false;


const charted = (page: import('playwright-core').Page) => page.$$eval('[data-chart^="metric:"]', (els) => els.map((el) => (el as HTMLElement).dataset.chart));

test('40 metric names: 16 charts (loss first, then by name), a note with the count, and any other picked from a list is charted', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'wide', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  const names = Array.from({ length: 39 }, (_, i) => `m${String(i).padStart(2, '0')}`);
  // Two steps of 20 names each (a step carries at most 32), loss in the second.
  await api('POST', '/v1/sessions/wide/step', { grads: { w: [0.1, 0.2] }, metrics: Object.fromEntries(names.slice(0, 20).map((k, i) => [k, i])) });
  await api('POST', '/v1/sessions/wide/step', { grads: { w: [0.1, 0.2] }, metrics: { loss: 0.5, ...Object.fromEntries(names.slice(20).map((k, i) => [k, 100 + i])) } });
  await page.goto(`${base}/ui/#/s/wide`);
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness?.data[0].length === 2);
  assert.deepEqual(await charted(page), ['metric:loss', ...names.slice(0, 15).map((k) => `metric:${k}`)]);
  const note = await page.$eval('#metrics-more', (el) => ({ hidden: (el as HTMLElement).hidden, text: el.textContent ?? '' }));
  assert.equal(note.hidden, false);
  assert.match(note.text, /^40 metrics: the first 16 are charted .* 24 more/);
  const options = await page.$$eval('#metrics-more select option', (els) => els.map((el) => (el as HTMLOptionElement).value));
  assert.deepEqual(options, ['', ...names.slice(15)]);
  await page.selectOption('#metrics-more select', 'm30');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m30']);
  assert.deepEqual(await page.evaluate(() => (window as any).asgdCharts['metric:m30'].data[1]), [undefined, 110]);
  assert.equal((await charted(page)).length, 17);
  // Another pick replaces it.
  await page.selectOption('#metrics-more select', 'm38');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m38'] && !(window as any).asgdCharts['metric:m30']);
  assert.deepEqual(await page.evaluate(() => (window as any).asgdCharts['metric:m38'].data[1]), [undefined, 118]);
  assert.deepEqual(await page.$$eval('.error', (els) => els.map((el) => el.textContent ?? '').filter(Boolean)), [], 'no error shown');
});

test('the x axis and a metric picked beyond the first 16 are kept in the URL: a reload or a shared link shows the same charts', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'kept', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  const names = Array.from({ length: 20 }, (_, i) => `m${String(i).padStart(2, '0')}`);
  await api('POST', '/v1/sessions/kept/step', { grads: { w: [0.1, 0.2] }, metrics: Object.fromEntries(names.map((k, i) => [k, i])) });
  await page.goto(`${base}/ui/#/s/kept`);
  await page.waitForSelector('#metrics-more select');
  await page.selectOption('#metrics-more select', 'm18');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m18']);
  await page.selectOption('select[aria-label="x axis"]', 'time');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m18']?.scales.x.time);
  const hash = await page.evaluate(() => location.hash);
  assert.equal(hash, '#/s/kept?x=time&metric=m18');
  // No new history entry per choice: Back leaves the page for the one before.
  assert.equal(await page.evaluate(() => history.length), 2);
  await page.reload();
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m18']?.scales.x.time);
  assert.equal(await page.$eval('select[aria-label="x axis"]', (el) => (el as HTMLSelectElement).value), 'time');
  assert.equal(await page.$eval('#metrics-more select', (el) => (el as HTMLSelectElement).value), 'm18');
  // Back to the defaults: the hash is the bare page's again.
  await page.selectOption('select[aria-label="x axis"]', 'step');
  await page.selectOption('#metrics-more select', '');
  await page.waitForFunction(() => location.hash === '#/s/kept');
  // A hand-written hash with a metric the session does not have, or an unknown x, changes nothing.
  await page.goto(`${base}/ui/#/s/kept?x=sideways&metric=nope`);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:m00']);
  assert.equal(await page.$eval('select[aria-label="x axis"]', (el) => (el as HTMLSelectElement).value), 'step');
  assert.equal(await page.$eval('#metrics-more select', (el) => (el as HTMLSelectElement).value), '');
  assert.equal((await charted(page)).length, 16);
  assert.deepEqual(await page.$$eval('.error', (els) => els.map((el) => el.textContent ?? '').filter(Boolean)), [], 'no error shown');
});

test('a session with 16 metric names or fewer has no note', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'few', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  await api('POST', '/v1/sessions/few/step', { grads: { w: [0.1, 0.2] }, metrics: Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, i])) });
  await page.goto(`${base}/ui/#/s/few`);
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness?.data[0].length === 1);
  assert.equal((await charted(page)).length, 16);
  assert.equal(await page.$eval('#metrics-more', (el) => (el as HTMLElement).hidden), true);
});

test('600 parameters: the norms table lists the first 500 and says where all are; the norms charts draw the first 8 at each read', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  const params = Array.from({ length: 600 }, (_, i) => ({ name: `p${String(i).padStart(3, '0')}`, shape: [1], data: [i + 1] }));
  await api('POST', '/v1/sessions', { name: 'many', params });
  await page.goto(`${base}/ui/#/s/many`);
  await page.waitForSelector('#norms-table');
  assert.equal(await page.$$eval('#norms-table tbody tr', (rows) => rows.length), 500);
  assert.equal(await page.$eval('#norms-table tbody tr:last-child td', (td) => td.textContent), 'p499');
  assert.equal(await page.$eval('#norms-more', (el) => el.textContent), 'The first 500 of 600 parameters; GET /v1/sessions/many/norms lists all.');
  // A step; the next read of the norms (at most every 5 s) charts both reads for the first 8 parameters.
  await api('POST', '/v1/sessions/many/step', { grads: Object.fromEntries(params.map((p) => [p.name, [1]])) });
  await page.waitForFunction(() => (window as any).asgdCharts?.norm?.data[0].length === 2, undefined, { timeout: 15_000 });
  const norm = await page.evaluate(() => (window as any).asgdCharts.norm.data as number[][]);
  assert.equal(norm.length, 1 + 8);
  // |p_i| before the step, then after one step of lr 0.01 (lambd 1e-4: p(1 - 1e-6) - 0.01), in float32.
  const after = (x: number) => Math.fround(Math.fround(x * Math.fround(1 - 1e-6)) - 0.01);
  for (let i = 0; i < 8; i++) {
    assert.equal(norm[1 + i][0], i + 1);
    assert.ok(Math.abs(norm[1 + i][1] - after(i + 1)) < 1e-5, `p${i}: ${norm[1 + i][1]}`);
  }
  assert.equal(await page.$$eval('#norms-table tbody tr', (rows) => rows.length), 500);
});

test('at phone width, 32 metrics of 128-character names: the page does not scroll sideways (the pick of a metric fits)', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await page.setViewportSize({ width: 390, height: 844 });
  await api('POST', '/v1/sessions', { name: 'longnames', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  const names = Array.from({ length: 32 }, (_, i) => `m${String(i).padStart(2, '0')}${'x'.repeat(125)}`);
  assert.equal(names[0].length, 128);
  await api('POST', '/v1/sessions/longnames/step', { grads: { w: [0.1, 0.2] }, metrics: Object.fromEntries(names.map((k, i) => [k, i])) });
  await page.goto(`${base}/ui/#/s/longnames`);
  await page.waitForSelector('#metrics-more select');
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness);
  const { scrollWidth, width, select } = await page.evaluate(() => ({
    scrollWidth: document.scrollingElement!.scrollWidth,
    width: window.innerWidth,
    select: document.querySelector('#metrics-more select')!.getBoundingClientRect().right,
  }));
  assert.ok(scrollWidth <= width, `the page is ${scrollWidth} px wide in a viewport of ${width}`);
  assert.ok(select <= width, `the select ends at ${select} px`);
});

test('a long session whose steps reported 400 metric names: the downsampled charts hold 330 (loss first) and the page says how many are left out', { skip }, async (t) => {
  // A hostile review: each 330 names cost a scan of the whole history; one downsampled read holds 330 now,
  // and metrics_left_out counts the others. The history is written with one INSERT: 2,000 steps, each
  // reporting loss and one of 399 other names.
  const { app, base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'manynames', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'manynames'");
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, metrics)
     SELECT $1, i + 1, i, 0, jsonb_build_object('loss', 1.0 / i, 'n' || lpad((i % 399)::text, 3, '0'), i) FROM generate_series(1, 2000) AS i`,
    [id],
  );
  await page.goto(`${base}/ui/#/s/manynames`);
  await page.waitForFunction(() => ((window as any).asgdCharts?.['metric:loss']?.data[0].length ?? 0) > 0);
  assert.equal(await page.textContent('#metrics-left-out'), '70 more metric name(s) are not charted: the session\'s steps reported more than one read holds (loss first, then those the most steps reported; every step\'s metrics are in …/metrics?after_version=).');
  assert.match(await page.$eval('#metrics-more', (el) => el.textContent ?? ''), /^330 metrics: /);
});
