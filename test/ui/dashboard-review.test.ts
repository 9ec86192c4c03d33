// The dashboard in a real browser (Debian's headless Chromium), for a reviewer's rough edges: one
// definition of steps/s in the list and on a session's page, the list's search and page kept across Back,
// the focus on the page's heading after a navigation, names for the timeline's ticks and the charts, and
// snapshots close together on the timeline told apart.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type { Page } from 'playwright-core';
import { chromiumMissing, openDashboard, screenshot } from './browser.ts';

const skip = chromiumMissing() ?? false;

const PARAMS = [{ name: 'w', shape: [2, 2], data: [0.1, 0.2, 0.3, 0.4] }, { name: 'b', shape: [2], data: [0, 0] }];
const GRAD = { w: [0.5, -0.25, 0.125, 1], b: [0.1, -0.2] };


/** What has the focus: its tag and text. */
const focused = (page: Page) => page.evaluate(() => ({ tag: document.activeElement?.tagName ?? '', text: document.activeElement?.textContent ?? '' }));

test('steps/s: the sessions list and the session page show the same figure (steps in the last minute ÷ 60), labelled the same', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'rate', params: PARAMS });
  // 30 steps within a second or two: over their span that is ~20 steps/s; over the minute, 0.5.
  for (let s = 1; s <= 30; s++) await api('POST', '/v1/sessions/rate/step', { grads: GRAD, metrics: { loss: 1 / s } });
  const { sessions } = await api('GET', '/v1/sessions?figures=true');
  assert.equal(sessions[0].activity.steps_last_minute, 30);

  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="rate"]');
  const { listLabel, listValue } = await page.$eval('#sessions', (table) => {
    const heads = [...table.querySelectorAll('thead th')].map((th) => th.textContent ?? '');
    const column = heads.findIndex((text) => text.startsWith('steps/s'));
    return { listLabel: heads[column], listValue: table.querySelectorAll('tr[data-session="rate"] td')[column]?.textContent ?? '' };
  });
  assert.equal(listValue, '0.5');

  await page.click('tr[data-session="rate"] a');
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '30');
  const card = await page.$eval('[data-card=rate]', (el) => ({ value: el.querySelector('b')?.textContent ?? '', label: el.querySelector('span')?.textContent ?? '' }));
  assert.equal(card.value, listValue, 'the card and the list give the same steps/s');
  assert.equal(card.label, listLabel, 'and call it the same');
  assert.match(card.label, /last min/);
});

/** 60 sessions run-000… and one "other"; the list searched for "run-" and on its page 2 (run-050…run-059). */
async function searchedPage2(t: TestContext) {
  const ctx = await openDashboard(t);
  const { base, api, page } = ctx;
  const names = Array.from({ length: 60 }, (_, i) => `run-${String(i).padStart(3, '0')}`);
  for (const name of [...names, 'other']) await api('POST', '/v1/sessions', { name, params: PARAMS });
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="other"]');
  await page.fill('input[type=search]', 'run-');
  await page.waitForFunction(() => !document.querySelector('tr[data-session="other"]') && document.querySelector('tr[data-session="run-000"]'));
  await page.click('button:has-text("Next")');
  await page.waitForSelector('tr[data-session="run-050"]');
  assert.equal(await page.locator('#sessions tbody tr').count(), 10);
  return ctx;
}

/** The list shows page 2 of the search "run-". */
async function assertSearchedPage2(page: Page) {
  await page.waitForSelector('tr[data-session="run-050"]', { timeout: 5000 });
  assert.equal(await page.inputValue('input[type=search]'), 'run-');
  assert.match(await page.textContent('.pager') ?? '', /page 2/);
  assert.equal(await page.locator('#sessions tbody tr').count(), 10);
  assert.ok(!(await page.$('tr[data-session="other"]')));
}

test('Back from a session brings the list\'s search and page back (they are in the URL)', { skip }, async (t) => {
  const { page } = await searchedPage2(t);
  await page.click('a[href="#/s/run-055"]');
  await page.waitForFunction(() => document.querySelector('#app h1')?.textContent === 'run-055');
  await page.goBack();
  await assertSearchedPage2(page);

  // The "Sessions" link of a session page leads back to them too.
  await page.click('a[href="#/s/run-052"]');
  await page.waitForFunction(() => document.querySelector('#app h1')?.textContent === 'run-052');
  await page.click('#crumbs a');
  await assertSearchedPage2(page);

  // Previous still works on the page brought back: page 1 of the search.
  await page.click('button:has-text("Previous")');
  await page.waitForSelector('tr[data-session="run-000"]');
  assert.match(await page.textContent('.pager') ?? '', /page 1/);
  assert.ok(!(await page.$('tr[data-session="other"]')));
  // A reload keeps the search.
  await page.reload();
  await page.waitForSelector('tr[data-session="run-000"]');
  assert.equal(await page.inputValue('input[type=search]'), 'run-');
  assert.ok(!(await page.$('tr[data-session="other"]')));
});

test('after a navigation the focus is on the page\'s heading, not on <body>: opening a session (keyboard or click) and going back', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'alpha', params: PARAMS });
  await api('POST', '/v1/sessions', { name: 'beta', params: PARAMS });
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="beta"]');
  // Opened with the keyboard.
  await page.focus('a[href="#/s/alpha"]');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.querySelector('#app h1')?.textContent === 'alpha');
  assert.deepEqual(await focused(page), { tag: 'H1', text: 'alpha' });
  // Back to the list.
  await page.goBack();
  await page.waitForSelector('tr[data-session="beta"]');
  assert.deepEqual(await focused(page), { tag: 'H1', text: 'Sessions' });
  // Opened with a click; back through the "Sessions" link.
  await page.click('a[href="#/s/beta"]');
  await page.waitForFunction(() => document.querySelector('#app h1')?.textContent === 'beta');
  assert.deepEqual(await focused(page), { tag: 'H1', text: 'beta' });
  // The heading takes the focus from script only (it is no tab stop).
  assert.equal(await page.getAttribute('#app h1', 'tabindex'), '-1');
  await page.click('#crumbs a');
  await page.waitForSelector('tr[data-session="beta"]');
  assert.deepEqual(await focused(page), { tag: 'H1', text: 'Sessions' });
});

test('paging with the keyboard: Next to the last page hands the focus to Previous, Previous to the first hands it to Next (not to <body>)', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  for (let i = 0; i < 51; i++) await api('POST', '/v1/sessions', { name: `k-${String(i).padStart(2, '0')}`, params: PARAMS });
  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="k-00"]');
  await page.focus('button:has-text("Next")');
  await page.keyboard.press('Enter');
  await page.waitForSelector('tr[data-session="k-50"]');
  await page.waitForFunction(() => (document.querySelector('.pager button:nth-child(2)') as HTMLButtonElement).disabled, null, { timeout: 5000 }); // Next, on the last page
  assert.deepEqual(await focused(page), { tag: 'BUTTON', text: '← Previous' });
  await page.keyboard.press('Enter');
  await page.waitForSelector('tr[data-session="k-00"]');
  await page.waitForFunction(() => document.activeElement?.textContent === 'Next →', null, { timeout: 5000 });
  assert.deepEqual(await focused(page), { tag: 'BUTTON', text: 'Next →' });
});

test('the timeline\'s ticks and the charts have accessible names', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'named', params: PARAMS, snapshot_every: 1_000_000 });
  const losses = [2, 1.5, 1.25, 0.875];
  for (const [i, loss] of losses.entries()) {
    await api('POST', '/v1/sessions/named/step', { grads: GRAD, metrics: { loss } });
    if (i === 1) await api('POST', '/v1/sessions/named/snapshots', { pinned: true });
  }
  const { snapshots } = await api('GET', '/v1/sessions/named/snapshots');
  const pinned = snapshots.find((s: any) => s.pinned);
  assert.ok(pinned);

  await page.goto(`${base}/ui/#/s/named`);
  await page.waitForFunction((n) => document.querySelectorAll('#timeline .tick').length === n, snapshots.length);
  // Each tick is a button named by its snapshot (not only by a title).
  const tick = page.getByRole('button', { name: `snapshot ${pinned.id}: version ${pinned.version}, step ${pinned.step}, pinned` });
  assert.equal(await tick.count(), 1);
  assert.equal(await tick.getAttribute('aria-label'), `snapshot ${pinned.id}: version ${pinned.version}, step ${pinned.step}, pinned`);
  // The timeline is one tab stop (the newest snapshot's tick), and the arrow keys, Home and End move along it
  // (a review: one tab stop per snapshot).
  const stops = () => page.$$eval('#timeline .tick', (els) => els.map((el) => [el.getAttribute('data-snapshots'), (el as HTMLElement).tabIndex]));
  const ids = snapshots.map((s: any) => s.id).sort((a: number, b: number) => a - b).map(String);
  assert.ok(ids.length >= 2, `${ids}`);
  assert.deepEqual(await stops(), ids.map((id: string, i: number) => [id, i === ids.length - 1 ? 0 : -1]));
  assert.equal(await page.getAttribute('#timeline', 'role'), 'toolbar');
  await page.focus('#timeline .tick[tabindex="0"]');
  await page.keyboard.press('Home');
  assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('data-snapshots')), ids[0]);
  await page.keyboard.press('ArrowRight');
  assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('data-snapshots')), ids[1]);
  assert.deepEqual(await stops(), ids.map((id: string, i: number) => [id, i === 1 ? 0 : -1]), 'the tab stop follows the keys');
  await page.keyboard.press('End');
  assert.equal(await page.evaluate(() => document.activeElement?.getAttribute('data-snapshots')), ids[ids.length - 1]);
  // Enter on a tick takes the keyboard to its row (a review: the row scrolled into view, the focus stayed).
  await tick.focus();
  await page.keyboard.press('Enter');
  await page.waitForFunction((id) => document.activeElement?.closest('tr')?.id === `snapshot-${id}`, pinned.id, { timeout: 5000 });

  // Each chart is a tab stop named by its title and its latest values: a slider (a screen reader in browse
  // mode passes it the arrow keys, and says its value) over the steps of its points.
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 4);
  const loss = page.locator('[data-chart="metric:loss"] [role=slider]');
  assert.equal(await loss.getAttribute('aria-roledescription'), 'chart');
  assert.match(await loss.getAttribute('aria-label') ?? '', /^loss chart, 4 points; latest at step 4: loss 0\.875$/);
  assert.equal(await page.getByRole('slider', { name: /^loss chart/ }).count(), 1);
  // Its title stays a heading, outside the slider (whose children are presentational).
  assert.equal(await page.getByRole('heading', { name: 'loss', exact: true }).count(), 1);
  const charts = await page.$$eval('[data-chart]', (els) => els.map((el) => {
    const plot = el.querySelector('.plot') as HTMLElement;
    return { key: (el as HTMLElement).dataset.chart, role: plot.getAttribute('role'), label: plot.getAttribute('aria-label') ?? '', tab: plot.tabIndex, min: plot.getAttribute('aria-valuemin'), max: plot.getAttribute('aria-valuemax') };
  }));
  assert.ok(charts.length >= 6, JSON.stringify(charts));
  for (const c of charts) {
    assert.equal(c.role, 'slider', `${c.key}`);
    assert.equal(c.tab, 0, `${c.key} is a tab stop`);
    assert.match(c.label, /chart, \d+ points?; latest at step \d+: /, `${c.key}: ${c.label}`);
    if (c.key === 'metric:loss' || c.key === 'staleness') assert.deepEqual([c.min, c.max], ['1', '4'], `${c.key}: over its steps`);
  }
  assert.equal(await page.locator('[data-chart] [aria-live]').count(), 0, 'no live region besides the slider\'s value');
  // Its points are read with the keys (a review: the values were for a mouse only): End the last, Left the
  // one before, Home the first; the legend shows the point; Escape leaves it.
  const said = async () => [await loss.getAttribute('aria-valuenow'), await loss.getAttribute('aria-valuetext')];
  const legend = () => page.locator('[data-chart="metric:loss"] .u-legend .u-series').nth(1).locator('.u-value').textContent();
  await loss.focus();
  assert.deepEqual(await said(), ['4', 'no point chosen']);
  // The slider holds the plot and its legend, so its focus ring goes round them (a review: uPlot was mounted
  // beside an empty slider, 0 px tall, whose ring was a line under the title).
  const ring = await loss.evaluate((el) => ({ box: el.getBoundingClientRect().height, canvas: el.querySelector('canvas')?.getBoundingClientRect().height ?? 0 }));
  assert.ok(ring.canvas >= 150 && ring.box >= ring.canvas, JSON.stringify(ring));
  await page.keyboard.press('End');
  assert.deepEqual(await said(), ['4', 'last point, at step 4: loss 0.875']);
  await page.keyboard.press('ArrowLeft');
  assert.deepEqual(await said(), ['3', 'at step 3: loss 1.25']);
  await page.waitForFunction(() => document.querySelector('[data-chart="metric:loss"] .u-legend .u-series:nth-child(2) .u-value')?.textContent === '1.25', undefined, { timeout: 5000 });
  await page.keyboard.press('Home');
  assert.deepEqual(await said(), ['1', 'first point, at step 1: loss 2']);
  assert.equal(await legend(), '2');
  await page.keyboard.press('Escape');
  assert.deepEqual(await said(), ['4', 'no point chosen']);
  // The legend is blank again, as when a mouse leaves the plot.
  await page.waitForFunction(() => document.querySelector('[data-chart="metric:loss"] .u-legend .u-series:nth-child(2) .u-value')?.textContent === '--', undefined, { timeout: 5000 });
});

test('snapshots close together on the timeline are told apart: no two ticks overlap, every snapshot is in one, and a group is named by its range and first five', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'dense', params: PARAMS, snapshot_every: 1_000_000, keep_snapshots: 100 });
  // 400 versions; a snapshot midway and at each of the last 10 (one pinned): ~3 px apart at this width.
  for (let s = 1; s <= 400; s++) {
    await api('POST', '/v1/sessions/dense/step', { grads: GRAD });
    if (s === 200 || s > 390) await api('POST', '/v1/sessions/dense/snapshots', { pinned: s === 395 });
  }
  const { snapshots } = await api('GET', '/v1/sessions/dense/snapshots');
  const early = snapshots.filter((s: any) => s.version < 390).length; // the session's first one, and the one midway
  assert.equal(snapshots.length - early, 10);

  await page.goto(`${base}/ui/#/s/dense`);
  await page.waitForSelector('#timeline .tick');
  await page.waitForSelector('tr[data-snapshot]');
  const ticks = await page.$$eval('#timeline .tick', (els) => els.map((el) => {
    const box = el.getBoundingClientRect();
    return { left: box.left, right: box.right, label: el.getAttribute('aria-label') ?? '', title: el.getAttribute('title') ?? '', text: el.textContent ?? '', ids: (el.getAttribute('data-snapshots') ?? '').split(' ') };
  }));
  const sorted = [...ticks].sort((a, b) => a.left - b.left);
  for (let i = 1; i < sorted.length; i++) {
    assert.ok(sorted[i].left >= sorted[i - 1].right + 2, `ticks overlap: ${JSON.stringify(sorted[i - 1])} and ${JSON.stringify(sorted[i])}`);
  }
  // The early ones stand alone; the last ten are one group that says how many, its range, and names the first
  // five and how many more (a review: a group of 50 was named by ~2,000 characters, all of them).
  assert.equal(ticks.length, early + 1, JSON.stringify(ticks));
  const group = sorted[sorted.length - 1];
  assert.equal(group.text, '10');
  const last = snapshots.filter((s: any) => s.version >= 390).sort((a: any, b: any) => a.version - b.version);
  const named = last.slice(0, 5).map((s: any) => `snapshot ${s.id}: version ${s.version}, step ${s.step}${s.pinned ? ', pinned' : ''}`);
  assert.equal(group.label, `10 snapshots, versions ${last[0].version} to ${last[9].version}, 1 pinned: ${named.join('; ')} and 5 more`);
  assert.equal(group.title, `10 snapshots, versions ${last[0].version} to ${last[9].version}, 1 pinned:\n${named.join('\n')}\n… and 5 more`);
  for (const s of snapshots) {
    const holding = ticks.filter((tick) => tick.ids.includes(String(s.id)));
    assert.equal(holding.length, 1, `snapshot ${s.id} is in one tick`);
  }
  // A click on the group shows its newest snapshot in the table.
  const newest = snapshots.reduce((a: any, b: any) => (b.version > a.version ? b : a));
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.click('#timeline .tick.group');
  await page.waitForFunction((id) => {
    const box = document.getElementById(`snapshot-${id}`)?.getBoundingClientRect();
    return box && box.top >= 0 && box.bottom <= innerHeight;
  }, newest.id);
  await screenshot(page, 'session-dense-timeline');

  // At phone width the group of the newest ones, at the right end, stays inside the timeline (it stuck out by 7 px).
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(() => {
    const line = document.getElementById('timeline')?.getBoundingClientRect();
    return line && line.width < 400;
  });
  await page.waitForTimeout(300); // the timeline is drawn again for its new width
  const { line, boxes } = await page.evaluate(() => ({
    line: document.getElementById('timeline')!.getBoundingClientRect().toJSON(),
    boxes: [...document.querySelectorAll('#timeline .tick')].map((el) => el.getBoundingClientRect().toJSON()),
  }));
  for (const box of boxes) assert.ok(box.left >= line.left && box.right <= line.right, `a tick ${JSON.stringify(box)} outside the timeline ${JSON.stringify(line)}`);
});

test('a metric reported at one step only is drawn (a dot) and its chart says 1 point at that step; the norms charts span the other charts\' steps', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'once', params: PARAMS });
  for (let s = 1; s <= 60; s++) await api('POST', '/v1/sessions/once/step', { grads: GRAD, metrics: s === 30 ? { loss: 1, val_loss: 0.5 } : { loss: 1 } });
  await page.goto(`${base}/ui/#/s/once`);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:val_loss'] && (window as any).asgdCharts?.norm);
  const label = await page.getAttribute('[data-chart="metric:val_loss"] .plot', 'aria-label');
  assert.equal(label, 'val_loss chart, 1 point; latest at step 30: val_loss 0.5');
  assert.match(await page.getAttribute('[data-chart="metric:loss"] .plot', 'aria-label') ?? '', /^loss chart, 60 points; latest at step 60: /);
  // The dot: pixels of the line's colour (#2f6fde) where step 30, 0.5 is drawn; none before the fix.
  const dot = await page.evaluate(() => {
    const u = (window as any).asgdCharts['metric:val_loss'];
    const cx = Math.round(u.valToPos(30, 'x', true));
    const cy = Math.round(u.valToPos(0.5, 'y', true));
    const { data } = u.ctx.getImageData(cx - 3, cy - 3, 7, 7);
    let blue = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 100 && data[i + 2] > data[i] + 100) blue++;
    return blue;
  });
  assert.ok(dot > 4, `${dot} pixels of the line's colour at the point`);
  // The norms (read once, at step 60) on the same steps as the other charts, not an axis of their own.
  const axes = await page.evaluate(() => Object.fromEntries(['norm', 'ax_norm', 'staleness'].map((k) => {
    const x = (window as any).asgdCharts[k].scales.x;
    return [k, [x.min, x.max]];
  })));
  assert.deepEqual(axes.staleness, [1, 60]);
  assert.deepEqual(axes.norm, axes.staleness);
  assert.deepEqual(axes.ax_norm, axes.staleness);
  // Redrawn with the same data (a quiet session read again), the axis stays: it went [1, 60], [0, 120], ...
  // every other redraw (uPlot applies its own range of x after setData returns).
  const redrawn = await page.evaluate(async () => {
    const charts = './js/charts.js'; // the page's own module, as the page loads it
    const { Chart } = await import(charts);
    const box = document.createElement('div');
    box.style.width = '600px';
    document.body.append(box);
    const axesSeen: number[][] = [];
    for (const [data, span] of [[[[60], [1.5]], [1, 60]], [[[30], [0.5]], null], [[[0], [0.5]], null]] as const) {
      const chart = new Chart(box, { key: `redrawn-${axesSeen.length}`, title: 'redrawn', series: [{ label: 'v' }] });
      for (let i = 0; i < 4; i++) {
        chart.set(data as any, span as any);
        await new Promise((resolve) => requestAnimationFrame(() => resolve(null)));
        axesSeen.push([chart.plot!.scales.x.min!, chart.plot!.scales.x.max!]);
      }
      chart.destroy();
    }
    box.remove();
    return axesSeen;
  });
  // One point at step 0 (a session that has not stepped) on [0, 1], not an axis of negative steps (a review).
  assert.deepEqual(redrawn, [[1, 60], [1, 60], [1, 60], [1, 60], [29, 31], [29, 31], [29, 31], [29, 31], [0, 1], [0, 1], [0, 1], [0, 1]]);
});

test('metric names that are Object.prototype members ("constructor", "toString") chart with gaps where a step lacks them; the page draws everything', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'proto', params: PARAMS });
  await api('POST', '/v1/sessions/proto/step', { grads: GRAD, metrics: { constructor: 1, toString: 2 } });
  await api('POST', '/v1/sessions/proto/step', { grads: GRAD, metrics: { loss: 0.5 } });
  await page.goto(`${base}/ui/#/s/proto`);
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness?.data[0].length === 2);
  const data = await page.evaluate(() => Object.fromEntries(['metric:constructor', 'metric:toString', 'metric:loss']
    .map((k) => [k, (window as any).asgdCharts[k]?.data[1]])));
  // A step without the metric: no value there (undefined: joined across, not a gap as a value not finite is).
  assert.deepEqual(data, { 'metric:constructor': [1, undefined], 'metric:toString': [2, undefined], 'metric:loss': [undefined, 0.5] });
  assert.deepEqual(await page.$$eval('.error', (els) => els.map((el) => el.textContent ?? '').filter(Boolean)), [], 'no error shown');
});

test('a scheduler that set lr at each of 30,000 steps: the page reads the changes once, fitted to the series\' buckets, and charts lr exactly at each point', { skip }, async (t) => {
  const { app, base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'sched', params: PARAMS, param_groups: [{ params: ['w'] }, { params: ['b'], lr: 0.5 }] });
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'sched'");
  const steps = 30_000;
  // The history as 30,000 steps would leave it (stepping that often would time the step, not the page).
  const group = (lr: string) => `jsonb_build_object('lr', ${lr}, 'lambd', 0.0001, 'alpha', 0.75, 't0', 1000000.0, 'weight_decay', 0, 'maximize', false)`;
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics, hyper)
     SELECT $1, i + 1, i, 0, now() - make_interval(secs => ($2 - i) * 0.01), jsonb_build_object('loss', 1.0 / i),
            jsonb_build_array(${group('0.01::float8 / i')}, ${group('0.5::float8 / i')})
     FROM generate_series(1, $2) AS i`,
    [id, steps],
  );
  const reads: string[] = [];
  page.on('request', (r) => { if (r.url().includes('/hyperparameters')) reads.push(r.url()); });
  await page.goto(`${base}/ui/#/s/sched`);
  await page.waitForFunction(() => (window as any).asgdCharts?.lr?.data[0].length > 100);
  const [xs, lr0, lr1] = await page.evaluate(() => (window as any).asgdCharts.lr.data as number[][]);
  assert.ok(xs.length <= 1500, `${xs.length} points`);
  // Each point is a bucket's last step: the lr charted there is the one that step set.
  xs.forEach((step, i) => {
    assert.equal(lr0[i], 0.01 / step, `group 0 at step ${step}`);
    assert.equal(lr1[i], 0.5 / step, `group 1 at step ${step}`);
  });
  assert.equal(reads.length, 1, reads.join('\n'));
  assert.match(reads[0], /max_points=/);
  await page.waitForSelector('#hyper-changes');
  assert.match(await page.textContent('#hyper') ?? await page.content(), /30000 change\(s\); the newest 20:/);
  const newest = await page.$$eval('#hyper-changes tbody tr', (trs) => trs.map((tr) => tr.querySelector('td')?.textContent));
  // Written as the cards write numbers (the page's locale: en-US here).
  assert.deepEqual(newest, Array.from({ length: 20 }, (_, k) => (steps - k).toLocaleString('en-US')));
});

test('Restore on a snapshot pruned since the table was read: the page says so and reads the table again, the row goes', { skip }, async (t) => {
  // Found by a review: the 404 was shown as a bare "Failed: …" and the stale row stayed clickable.
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'pruned', params: PARAMS, snapshot_every: 1_000_000, keep_snapshots: 1 });
  await api('POST', '/v1/sessions/pruned/step', { grads: GRAD });
  const [first] = (await api('GET', '/v1/sessions/pruned/snapshots')).snapshots;
  await page.goto(`${base}/ui/#/s/pruned`);
  await page.waitForSelector(`tr[data-snapshot="${first.id}"]`);
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '1');
  // A manual snapshot moves no version (no event): the page still lists the one it prunes.
  await api('POST', '/v1/sessions/pruned/snapshots', {});
  const { snapshots } = await api('GET', '/v1/sessions/pruned/snapshots');
  assert.ok(!snapshots.some((s: any) => s.id === first.id), JSON.stringify(snapshots));
  assert.ok(await page.$(`tr[data-snapshot="${first.id}"]`), 'the page still shows it');
  await page.click(`tr[data-snapshot="${first.id}"] button[data-action=restore]`);
  await page.waitForSelector('#confirm-dialog[open]');
  await page.click('#confirm-ok');
  await page.waitForFunction(() => /no longer exists: .*pin a snapshot to keep it/.test(document.getElementById('snapshots-status')?.textContent ?? ''));
  await page.waitForFunction((id) => !document.querySelector(`tr[data-snapshot="${id}"]`), first.id);
  await page.waitForSelector(`tr[data-snapshot="${snapshots[0].id}"]`);
  assert.equal((await api('GET', '/v1/sessions/pruned')).version, 2, 'nothing was restored');
});

test('a metric with a 128-character name: its chart\'s title and legend stay inside the card', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  const metric = `m${'x'.repeat(127)}`;
  await api('POST', '/v1/sessions', { name: 'longmetric', params: PARAMS });
  for (let s = 1; s <= 3; s++) await api('POST', '/v1/sessions/longmetric/step', { grads: GRAD, metrics: { [metric]: s / 2 } });
  await page.goto(`${base}/ui/#/s/longmetric`);
  await page.waitForSelector('.chart h3');
  await page.waitForFunction((m) => [...document.querySelectorAll('.chart h3')].some((h) => h.textContent?.includes(m)), metric);
  const boxes = await page.$$eval('.chart', (charts, m) => charts.filter((c) => c.querySelector('h3')?.textContent?.includes(m)).map((c) => {
    const card = c.getBoundingClientRect();
    const inner = [...c.querySelectorAll('h3, .u-legend')].map((el) => el.getBoundingClientRect());
    return { card: { left: card.left, right: card.right }, inner: inner.map((b) => ({ left: b.left, right: b.right })) };
  }), metric);
  assert.ok(boxes.length >= 1);
  for (const { card, inner } of boxes) {
    for (const b of inner) assert.ok(b.right <= card.right + 1 && b.left >= card.left - 1, `inside the card: ${JSON.stringify({ card, b })}`);
  }
  // The legend's label is cut short, the whole name its title, and the value stays on its line (a review:
  // the wrapped name made a block with its value on a line of its own).
  const legend = await page.$$eval('.chart .u-legend .u-series', (rows, m) => rows.filter((r) => r.querySelector('.u-label')?.textContent === m).map((r) => {
    const label = r.querySelector('.u-label')!;
    const value = r.querySelector('.u-value')!;
    const [l, v] = [label.getBoundingClientRect(), value.getBoundingClientRect()];
    return { title: label.getAttribute('title'), labelHeight: l.height, sameLine: Math.abs(l.top - v.top) < 6 || Math.abs(l.bottom - v.bottom) < 6, cut: label.scrollWidth > label.clientWidth };
  }), metric);
  assert.ok(legend.length >= 1, 'the metric is in a legend');
  for (const row of legend) {
    assert.equal(row.title, metric);
    assert.ok(row.cut, 'cut with an ellipsis');
    assert.ok(row.sameLine, `the value beside its label: ${JSON.stringify(row)}`);
    assert.ok(row.labelHeight < 30, `one line: ${JSON.stringify(row)}`);
  }
  await screenshot(page, 'session-long-metric-name');
});

test('a later page whose sessions were deleted meanwhile says so, not "no session name contains"', { skip }, async (t) => {
  // Found by a dashboard review: page 2 emptied by deletions read as if no session matched at all.
  const { api, page } = await searchedPage2(t);
  for (let i = 50; i < 60; i++) await api('DELETE', `/v1/sessions/run-0${i}`);
  await page.waitForSelector('#sessions tr.empty', { timeout: 10_000 });
  assert.match(await page.textContent('#sessions tr.empty') ?? '', /^No more sessions on this page \(deleted meanwhile\?\): Previous goes back\.$/);
  await page.click('button:has-text("Previous")');
  await page.waitForSelector('tr[data-session="run-000"]');
});

/**
 * A session of `steps` steps as a long run leaves its history (stepping that often would time the steps, not
 * the page): all an hour ago but the last `recent`, within the last minute; the staleness of step i is i % 7.
 */
async function longSession(app: any, api: (method: string, path: string, body?: unknown) => Promise<any>, name: string, steps: number, recent: number) {
  await api('POST', '/v1/sessions', { name, params: PARAMS });
  const [{ id }] = await app.db.query("SELECT id::float8 AS id FROM sessions WHERE name = $1", [name]);
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics)
     SELECT $1, i + 1, i, i % 7, CASE WHEN i > $2 - $3 THEN now() - make_interval(secs => 40 - ($2 - i)) ELSE now() - interval '1 hour' - make_interval(secs => ($2 - i) * 0.01) END,
            jsonb_build_object('loss', 1.0 / i)
     FROM generate_series(1, $2) AS i`,
    [id, steps, recent],
  );
}

test('a long session read in buckets: the card\'s steps/s is the API\'s (steps in the last minute ÷ 60, not the last bucket\'s count) and its staleness the last step\'s', { skip }, async (t) => {
  const { app, base, api, page } = await openDashboard(t);
  // 30,000 steps: buckets of 20; the last holds 10 steps an hour old and the 10 of the last minute.
  await longSession(app, api, 'long', 30_000, 10);
  const { sessions } = await api('GET', '/v1/sessions?figures=true');
  assert.equal(sessions[0].activity.steps_last_minute, 10);
  const { points } = await api('GET', '/v1/sessions/long/metrics?max_points=1500');
  assert.equal(points.at(-1).count, 20, 'the last bucket straddles the minute');

  await page.goto(`${base}/ui/`);
  await page.waitForSelector('tr[data-session="long"]');
  const listValue = await page.$eval('#sessions', (table) => {
    const column = [...table.querySelectorAll('thead th')].findIndex((th) => th.textContent?.startsWith('steps/s'));
    return table.querySelectorAll('tr[data-session="long"] td')[column]?.textContent ?? '';
  });
  assert.equal(listValue, '0.167');
  await page.click('tr[data-session="long"] a');
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness?.data[0].length > 1000);
  // Exact once the last buckets' steps are read one by one, after the charts (≈, the buckets' figure, until then).
  await page.waitForFunction(() => !/^(—|≈)/.test(document.querySelector('[data-card=rate] b')?.textContent ?? '—'));
  const card = (id: string) => page.$eval(`[data-card=${id}] b`, (el) => el.textContent ?? '');
  assert.equal(await card('rate'), listValue, 'the card and the list give the same steps/s');
  assert.equal(await card('staleness'), String(30_000 % 7), 'the last step\'s staleness, not its bucket\'s mean');
  // The charts keep the buckets.
  assert.equal(await page.evaluate(() => (window as any).asgdCharts.staleness.data[0].at(-1)), 30_000);
});

test('over time, a line breaks across an idle quarter hour (not drawn as a steady trend); over steps it joins every point', { skip }, async (t) => {
  const { app, base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'idle', params: PARAMS });
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'idle'");
  // 20 steps a second apart 20 minutes ago, then 20 a second apart in the last minute; loss 1 at each.
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics)
     SELECT $1, i + 1, i, 0, now() - make_interval(secs => CASE WHEN i <= 20 THEN 1200 - i ELSE 41 - (i - 20) END), '{"loss": 1}'::jsonb
     FROM generate_series(1, 40) AS i`,
    [id],
  );
  await page.goto(`${base}/ui/#/s/idle`);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 40);
  await page.selectOption('select[aria-label="x axis"]', 'time');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.scales.x.time);
  // Pixels of the line's colour (#2f6fde) at loss 1, at an x: mid-way through the idle time, and within each burst.
  const blueAt = (at: 'idle' | 'first' | 'last') => page.evaluate((where) => {
    const u = (window as any).asgdCharts['metric:loss'];
    const xs = u.data[0].filter((_: number, i: number) => u.data[1][i] != null);
    const x = where === 'idle' ? (xs[19] + xs[20]) / 2 : where === 'first' ? (xs[5] + xs[6]) / 2 : (xs[30] + xs[31]) / 2;
    const cx = Math.round(u.valToPos(x, 'x', true));
    const cy = Math.round(u.valToPos(1, 'y', true));
    const { data } = u.ctx.getImageData(cx - 3, cy - 3, 7, 7);
    let blue = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 100 && data[i + 2] > data[i] + 100) blue++;
    return blue;
  }, at);
  assert.ok(await blueAt('first') > 4, 'the first burst is a line');
  assert.ok(await blueAt('last') > 4, 'the last burst is a line');
  assert.equal(await blueAt('idle'), 0, 'no line across the idle time');
  assert.match(await page.getAttribute('[data-chart="metric:loss"] .plot', 'aria-label') ?? '', /^loss chart, 40 points; /);
  // Over steps, unchanged: one line from step 1 to 40.
  await page.selectOption('select[aria-label="x axis"]', 'step');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss'] && !(window as any).asgdCharts['metric:loss'].scales.x.time);
  const joined = await page.evaluate(() => {
    const u = (window as any).asgdCharts['metric:loss'];
    const { data } = u.ctx.getImageData(Math.round(u.valToPos(20.5, 'x', true)) - 3, Math.round(u.valToPos(1, 'y', true)) - 3, 7, 7);
    let blue = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 100 && data[i + 2] > data[i] + 100) blue++;
    return blue;
  });
  assert.ok(joined > 4, 'over steps the line joins steps 20 and 21');
});

test('over time, a long session\'s buckets followed by live single steps stay one line (idle time is told per version); a value that is not finite breaks a line over steps too, a missing one does not', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'lines', params: PARAMS });
  await api('POST', '/v1/sessions/lines/step', { grads: GRAD });
  await page.goto(`${base}/ui/#/s/lines`);
  await page.waitForFunction(() => (window as any).asgdCharts?.staleness);
  const seen = await page.evaluate(async () => {
    const charts = './js/charts.js'; // the page's own module, as the page loads it
    const { breakIdle, Chart, lone } = await import(charts);
    // As a 100k-step session's chart holds them: 1,000 buckets of 100 versions 2 minutes apart (read whole),
    // then 1,500 single steps 1.2 s apart (live updates): 1.2 s a version throughout; then 20 idle minutes.
    const xs: number[] = [];
    const versions: number[] = [];
    let time = 0;
    let version = 0;
    const add = (dt: number, dv: number) => { time += dt; version += dv; xs.push(time); versions.push(version); };
    for (let i = 0; i < 1000; i++) add(120, 100);
    for (let i = 0; i < 1500; i++) add(1.2, 1);
    add(1200, 1);
    for (let i = 0; i < 9; i++) add(1.2, 1);
    const ys = xs.map(() => 1);
    const breaks = (d: unknown[][]) => d[1].filter((y) => y === null).length;
    // Eight workers stepping at once, once a second: a second between bursts of 2 ms is no idle time.
    const bx: number[] = [];
    const bv: number[] = [];
    for (let burst = 0; burst < 100; burst++) for (let w = 0; w < 8; w++) { bx.push(burst + w * 0.002); bv.push(burst * 8 + w + 1); }
    const bursts = breaks(breakIdle([bx, bx.map(() => 1)], bv));
    const box = document.createElement('div');
    box.style.width = '600px';
    document.body.append(box);
    const chart = new Chart(box, { key: 'lines-test', title: 'v', series: [{ label: 'v' }] });
    chart.set([[1, 2, 3, 4, 5], [1, NaN, 3, null, 5]]);
    const drawn = Array.from(chart.plot!.data[1] as unknown[], (v) => (v === undefined ? 'undefined' : v));
    // The points no segment reaches get a dot: alone, or between a gap and a gap or an end (the newest step after idle time).
    const dots = [lone([1, 2, null, 3]), lone([1, undefined, 2]), lone([null, 5, undefined, null]), lone([7]), lone([1, 2, 3])];
    const out = { perVersion: breaks(breakIdle([xs, ys], versions)), perPoint: breaks(breakIdle([xs, ys])), bursts, dots, drawn, spanGaps: chart.plot!.series[1].spanGaps, remark: chart.remark.textContent };
    chart.destroy();
    box.remove();
    return out;
  });
  assert.equal(seen.perVersion, 1, 'one break: the idle 20 minutes, none between the buckets');
  assert.ok(seen.perPoint > 900, `told by the interval between points, every bucket is cut off (${seen.perPoint} breaks)`);
  assert.equal(seen.bursts, 0, 'bursts a second apart are one line');
  assert.deepEqual(seen.dots, [[3], null, [1], [0], null]);
  assert.deepEqual(seen.drawn, [1, null, 3, 'undefined', 5], 'NaN a gap (null), a missing value joined (undefined)');
  assert.equal(seen.spanGaps, false);
  assert.equal(seen.remark, 'not finite at step 2: v NaN');
});

test('a norm that is Infinity: its chart says "not finite at step 4", in a note and in its name, not "no data yet"', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  // w overflows float32 at the first step (3e38 + 3e38); b stays finite.
  await api('POST', '/v1/sessions', { name: 'inf', params: [{ name: 'w', shape: [2], data: [3e38, 1] }], hyperparameters: { lr: 1 } });
  for (let s = 1; s <= 4; s++) await api('POST', '/v1/sessions/inf/step', { grads: { w: [-3e38, 1] } });
  const norms = await api('GET', '/v1/sessions/inf/norms');
  assert.equal(norms.params[0].norm, 'Infinity');
  await page.goto(`${base}/ui/#/s/inf`);
  await page.waitForFunction(() => (window as any).asgdCharts?.norm);
  assert.equal(await page.getAttribute('[data-chart="norm"] .plot', 'aria-label'), '‖param‖ chart: not finite at step 4: w Infinity');
  assert.equal(await page.textContent('[data-chart="norm"] .remark:not([hidden])'), 'not finite at step 4: w Infinity');
  // A chart whose values are all finite says nothing of the kind.
  assert.equal(await page.isHidden('[data-chart="staleness"] .remark'), true);
});

test('hyperparameter changes of a long session that went back, read downsampled: the page says the exact total, not a wrong split', { skip }, async (t) => {
  const { app, base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'back', params: PARAMS });
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'back'");
  // Steps 1..3000 that each set lr, then (after a restore to step 2500) steps 2501..3000 again: 3,000 changes
  // of the present history and 500 of the one it left; 3,500 in all, more than a read of 1,500 points holds.
  const group = "jsonb_build_array(jsonb_build_object('lr', 1.0 / i, 'lambd', 0.0001, 'alpha', 0.75, 't0', 1000000.0, 'weight_decay', 0, 'maximize', false))";
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics, hyper)
     SELECT $1, i + 1, CASE WHEN i <= 3000 THEN i ELSE i - 500 END, 0, now() - interval '1 hour' + make_interval(secs => i * 0.01), '{"loss": 1}'::jsonb, ${group}
     FROM generate_series(1, 3500) AS i`,
    [id],
  );
  const read = await api('GET', '/v1/sessions/back/hyperparameters?max_points=1500');
  assert.equal(read.downsampled, true);
  assert.equal(read.total_changes, 3500);
  await page.goto(`${base}/ui/#/s/back`);
  await page.waitForSelector('#hyper-changes');
  const said = await page.$eval('#hyper p.muted', (el) => el.textContent ?? '');
  assert.equal(said, '3500 change(s) in all, those of a history the session left included (changes of that history are not listed); the newest 20:');
  // The newest 20 listed are the present history's.
  const newest = await page.$$eval('#hyper-changes tbody tr', (trs) => trs.map((tr) => tr.querySelector('td')?.textContent));
  assert.deepEqual(newest, Array.from({ length: 20 }, (_, k) => (3000 - k).toLocaleString('en-US')));
});

test('over time, the norms charts put a read at the time its version was made, beside the charts of its steps (not when the page read it)', { skip }, async (t) => {
  const { base, api, page } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'normtime', params: PARAMS });
  await api('POST', '/v1/sessions/normtime/step', { grads: GRAD, metrics: { loss: 1 } });
  await new Promise((resolve) => setTimeout(resolve, 3000)); // the page reads the norms 3 s after the step
  await page.goto(`${base}/ui/#/s/normtime`);
  await page.waitForFunction(() => (window as any).asgdCharts?.norm && (window as any).asgdCharts?.['metric:loss']);
  await page.selectOption('select[aria-label="x axis"]', 'time');
  await page.waitForFunction(() => (window as any).asgdCharts?.norm?.scales.x.time && (window as any).asgdCharts?.['metric:loss']?.scales.x.time);
  const [normAt, lossAt] = await page.evaluate(() => ['norm', 'metric:loss'].map((key) => (window as any).asgdCharts[key].data[0].at(-1) as number));
  assert.ok(Math.abs(normAt - lossAt) < 1, `the norms at ${normAt}, the step's loss at ${lossAt}: ${normAt - lossAt} s apart`);
});

test('numbers and dates in the browser\'s conventions everywhere: a German browser reads 1.000.000 and 0,5 in the tables, 0,5 in the legends, and its own times on the time axis', { skip }, async (t) => {
  // A review: the tables wrote t0=1,000 (US style, which a German reads as 1.0) while the legends wrote
  // 0,19, and the time axis wrote US dates.
  const { app, base, api, browser, log } = await openDashboard(t);
  await api('POST', '/v1/sessions', { name: 'de', params: PARAMS, hyperparameters: { lr: 0.5, t0: 1_000_000 } });
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'de'");
  // Steps over the last three hours: ticks an hour or so apart.
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics)
     SELECT $1, i + 1, i, 0, now() - make_interval(secs => (30 - i) * 360), jsonb_build_object('loss', 0.5)
     FROM generate_series(1, 30) AS i`,
    [id],
  );
  const context = await browser.newContext({ locale: 'de-DE', timezoneId: 'Europe/Berlin' });
  const page = await context.newPage();
  page.on('pageerror', (err) => log.push(`pageerror: ${err.message}`));
  await page.goto(`${base}/ui/#/s/de`);
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 30);
  const table = await page.textContent('#hyper') ?? '';
  assert.match(table, /1\.000\.000/, table);
  assert.match(table, /0,5/, table);
  assert.doesNotMatch(table, /1,000,000|0\.5\b/, table);
  // The legend of the loss chart at its last point.
  const legend = await page.evaluate(() => {
    const u = (window as any).asgdCharts['metric:loss'];
    u.setCursor({ left: u.valToPos(u.data[0].at(-1), 'x'), top: 10 });
    return [...u.root.querySelectorAll('.u-legend .u-value')].map((el: Element) => el.textContent).join(' ');
  });
  assert.match(legend, /0,5/, legend);
  await page.selectOption('select[aria-label="x axis"]', 'time');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.scales.x.time);
  const ticks = await page.evaluate(() => (window as any).asgdCharts['metric:loss'].axes[0]._values as string[]);
  assert.ok(ticks.length >= 2 && ticks.every((v) => /^\d\d:\d\d$/.test(v)), `the time axis: ${JSON.stringify(ticks)} (24-hour German times)`);
  await context.close();

  // Arabic (Egypt): the locale's own digits everywhere, decimals and tables' columns too (a second review:
  // ١٬٧٠٣ beside 28٫4 in Latin digits, and the versions of the snapshots table in Latin digits).
  const arabic = await browser.newContext({ locale: 'ar-EG' });
  const ar = await arabic.newPage();
  await ar.goto(`${base}/ui/#/s/de`);
  await ar.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[0].length === 30);
  await ar.waitForSelector('tr[data-snapshot]');
  const texts = await ar.evaluate(() => [document.getElementById('hyper')?.textContent ?? '', document.getElementById('snapshots-table')?.textContent ?? '']);
  assert.match(texts[0], /٠٫٥/, texts[0]);
  for (const text of texts) assert.doesNotMatch(text.replace(/[A-Za-z_]\w*\d\w*/g, ''), /\d/, `Latin digits in ${text}`);
  await arabic.close();
});
