// The API routes the dashboard reads, and its files: norms on demand, the token's own scope, searching the
// sessions list, and /ui served compressed, cached and public.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { gunzipSync, brotliDecompressSync } from 'node:zlib';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp } from '../helper.ts';
import { createMetricNames, FIGURES_PER_READ } from '../../src/sessions/series.ts';

const ADMIN = 'admin-token-for-dashboard-route-tests';
const auth = { authorization: `Bearer ${ADMIN}` };

async function create(app: FastifyInstance, name: string, headers: Record<string, string> = {}) {
  const res = await app.inject({
    method: 'POST', url: '/v1/sessions', headers,
    payload: { name, params: [{ name: 'w', shape: [2, 2], data: [3, 4, 0, 0] }, { name: 'b', shape: [1], data: [-2] }], hyperparameters: { lr: 0.5, t0: 0 } },
  });
  assert.equal(res.statusCode, 201, res.body);
}

test('norms: L2 norms of the parameters and of ax at the current version, with step, eta and mu', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'n1');
  let res = await app.inject({ url: '/v1/sessions/n1/norms' });
  assert.equal(res.statusCode, 200, res.body);
  // Before any step: no state, and each parameter averages to itself (as params?averaged=true reads it,
  // not the zeros of ax that PyTorch creates at the first step): ‖w‖ = ‖(3, 4, 0, 0)‖ = 5.
  assert.deepEqual(res.json(), {
    session: 'n1', version: 1, step: 0,
    params: [
      { name: 'w', numel: 4, norm: 5, ax_norm: 5, step: null, eta: null, mu: null },
      { name: 'b', numel: 1, norm: 2, ax_norm: 2, step: null, eta: null, mu: null },
    ],
  });
  assert.equal(res.headers.etag, '"1"');
  res = await app.inject({ method: 'POST', url: '/v1/sessions/n1/step', payload: { grads: { w: [1, 1, 1, 1] } } });
  assert.equal(res.statusCode, 200, res.body);
  const norms = (await app.inject({ url: '/v1/sessions/n1/norms' })).json();
  const params = (await app.inject({ url: '/v1/sessions/n1/params' })).json().params;
  const averaged = (await app.inject({ url: '/v1/sessions/n1/params?averaged=true' })).json().params;
  const l2 = (data: number[]) => Math.sqrt(data.reduce((s, x) => s + x * x, 0));
  assert.equal(norms.version, 2);
  assert.equal(norms.params[0].norm, l2(params.w.data));
  assert.equal(norms.params[0].ax_norm, l2(averaged.w.data));
  assert.notEqual(norms.params[0].ax_norm, 0);
  assert.equal(norms.params[0].step, 1);
  // b had no gradient: no state yet, as in PyTorch.
  assert.equal(norms.params[1].step, null);
  assert.equal(norms.params[1].norm, 2);
  assert.equal(norms.params[1].ax_norm, l2(averaged.b.data), 'as the averaged read');
  assert.equal((await app.inject({ url: '/v1/sessions/nope/norms' })).json().code, 'SESSION_NOT_FOUND');
  assert.equal((await app.inject({ url: '/v1/sessions/bad%20name/norms' })).statusCode, 400);
});

test('norms of a diverged session: non-finite norms come as "NaN" / "Infinity", not a 500', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'diverged');
  // An lr whose eta float32 cannot hold is refused (it would be Infinity at once); lr = 1e30 keeps eta finite
  // (about 3e10) and the parameters grow a million-fold a step until they overflow, as in PyTorch.
  const huge = await app.inject({ method: 'POST', url: '/v1/sessions/diverged/step', payload: { grads: { w: [0.1, 0.1, 0.1, 0.1] }, param_groups: [{ lr: 1e308 }] } });
  assert.equal(huge.statusCode, 400, huge.body);
  assert.match(huge.json().message, /^param_groups\[0\]\.lr: .* too large for float32/);
  let w: Record<string, unknown> = {};
  for (let k = 0; k < 12; k++) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/diverged/step', payload: { grads: { w: [0.1, 0.1, 0.1, 0.1] }, ...(k === 0 && { param_groups: [{ lr: 1e30 }] }) } });
    assert.equal(res.statusCode, 200, res.body);
    const norms = await app.inject({ url: '/v1/sessions/diverged/norms' });
    assert.equal(norms.statusCode, 200, norms.body);
    w = norms.json().params[0];
    if (typeof w.norm === 'string') break;
  }
  const sd = (await app.inject({ url: '/v1/sessions/diverged/state_dict' })).json();
  const asJson = (x: unknown) => (typeof x === 'number' && !Number.isFinite(x) ? String(x) : x);
  assert.equal(w.eta, asJson(sd.state['0'].eta));
  assert.equal(w.mu, asJson(sd.state['0'].mu));
  for (const key of ['norm', 'ax_norm']) assert.ok(typeof w[key] === 'number' || ['NaN', 'Infinity'].includes(w[key] as string), `${key} ${w[key]}`);
  assert.ok(['NaN', 'Infinity'].includes(w.norm as string), JSON.stringify(w));
  const norms = (await app.inject({ url: '/v1/sessions/diverged/norms' })).json();
  assert.equal(norms.params[1].norm, 2); // b untouched
});

test('tokens/self: the scope and sessions of the presented token; auth off says so', async (t) => {
  const off = await buildTestApp(t);
  assert.deepEqual((await off.app.inject({ url: '/v1/tokens/self' })).json(), { id: 'anonymous', name: 'anonymous', scope: 'admin', sessions: null, auth: false });
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  assert.equal((await app.inject({ url: '/v1/tokens/self' })).json().code, 'UNAUTHORIZED');
  assert.deepEqual((await app.inject({ url: '/v1/tokens/self', headers: auth })).json(), { id: 'admin', name: 'admin', scope: 'admin', sessions: null, auth: true });
  const made = await app.inject({ method: 'POST', url: '/v1/tokens', headers: auth, payload: { name: 'viewer', scope: 'read', sessions: ['a'] } });
  const { token, id } = made.json();
  assert.deepEqual((await app.inject({ url: '/v1/tokens/self', headers: { authorization: `Bearer ${token}` } })).json(), { id, name: 'viewer', scope: 'read', sessions: ['a'], auth: true });
});

test('sessions list: search by part of the name (case-insensitive, literal), paged; bad search text is a 400', async (t) => {
  const { app } = await buildTestApp(t);
  for (const name of ['alpha-1', 'ALPHA-2', 'beta', 'gamma_alpha', 'a.b']) await create(app, name);
  const names = async (query: string) => (await app.inject({ url: `/v1/sessions?${query}` })).json();
  assert.deepEqual((await names('search=alpha')).sessions.map((s: { name: string }) => s.name), ['ALPHA-2', 'alpha-1', 'gamma_alpha']);
  const page = await names('search=alpha&limit=2');
  assert.equal(page.next, 'alpha-1');
  assert.deepEqual((await names(`search=alpha&limit=2&after=${page.next}`)).sessions.map((s: { name: string }) => s.name), ['gamma_alpha']);
  // "." and "_" are matched literally (no LIKE wildcards).
  assert.deepEqual((await names('search=.')).sessions.map((s: { name: string }) => s.name), ['a.b']);
  assert.deepEqual((await names('search=_')).sessions.map((s: { name: string }) => s.name), ['gamma_alpha']);
  assert.equal((await names('search=')).sessions.length, 5);
  for (const bad of ['search=a%25', 'search=' + 'x'.repeat(129), 'figures=maybe']) {
    const res = await app.inject({ url: `/v1/sessions?${bad}` });
    assert.equal(res.statusCode, 400, bad);
    assert.equal(res.json().code, 'INVALID_QUERY');
    assert.match(res.json().message, /search|figures/);
  }
});

test('/ui: the dashboard\'s files, public with auth on, compressed, revalidated by ETag; the chart library from npm', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  assert.equal((await app.inject({ url: '/ui' })).headers.location, 'ui/', 'relative: under a proxy\'s path prefix too');
  const index = await app.inject({ url: '/ui/' });
  assert.equal(index.statusCode, 200);
  assert.match(index.headers['content-type'] as string, /^text\/html/);
  assert.match(index.body, /"uplot": "\.\/vendor\/uPlot\.esm\.js"/); // relative to the page, <root>/ui/
  // Nothing is loaded from elsewhere.
  assert.doesNotMatch(index.body, /https?:\/\//);

  const plain = await app.inject({ url: '/ui/vendor/uPlot.esm.js' });
  assert.equal(plain.headers['content-encoding'], undefined);
  assert.equal(plain.body, readFileSync('node_modules/uplot/dist/uPlot.esm.js', 'utf8'));
  const gz = await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'accept-encoding': 'gzip, deflate' } });
  assert.equal(gz.headers['content-encoding'], 'gzip');
  assert.equal(gunzipSync(gz.rawPayload).toString(), plain.body);
  const br = await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'accept-encoding': 'gzip, br' } });
  assert.equal(br.headers['content-encoding'], 'br');
  assert.equal(brotliDecompressSync(br.rawPayload).toString(), plain.body);
  assert.ok(br.rawPayload.length < plain.rawPayload.length / 2);
  assert.equal(br.headers.vary, 'accept-encoding');

  const again = await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'if-none-match': plain.headers.etag as string } });
  assert.equal(again.statusCode, 304);
  assert.equal(again.body, '');
  // If-None-Match compares weakly, takes a list and "*" (RFC 9110); Accept-Encoding's q=0 refuses a coding.
  const etag = plain.headers.etag as string;
  assert.match(etag, /^W\/"[A-Za-z0-9_-]{22}"$/, 'weak: one tag for the file in every content coding');
  for (const tag of [etag.slice(2), `"other", ${etag}`, '*']) assert.equal((await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'if-none-match': tag } })).statusCode, 304, tag);
  assert.equal((await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'if-none-match': '"other"' } })).statusCode, 200);
  for (const [accept, coding] of [['br;q=0, gzip;q=0', undefined], ['br;q=0, gzip', 'gzip'], ['*', 'br'], ['*;q=0', undefined], ['gzip;q=0.5, br;q=0', 'gzip'], ['identity', undefined]] as const) {
    assert.equal((await app.inject({ url: '/ui/vendor/uPlot.esm.js', headers: { 'accept-encoding': accept } })).headers['content-encoding'], coding, accept);
  }
  // The dashboard, the links page and /docs may not be framed by any page (clickjacking of Restore, Fork,
  // Pin); the dashboard runs only its own files, its one inline script (the import map) by its hash.
  const page = await app.inject({ url: '/ui/' });
  const csp = String(page.headers['content-security-policy']);
  assert.match(csp, /frame-ancestors 'none'/);
  assert.match(csp, /default-src 'none'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  const importMap = /<script type="importmap">([\s\S]*?)<\/script>/.exec(page.body)![1];
  assert.ok(csp.includes(`'sha256-${createHash('sha256').update(importMap).digest('base64')}'`), csp);
  assert.equal(page.headers['x-frame-options'], 'DENY');
  assert.match(String((await app.inject({ url: '/ui/js/main.js' })).headers['content-security-policy']), /frame-ancestors 'none'/);
  const docs = await app.inject({ url: '/docs/static/index.html' });
  assert.match(String(docs.headers['content-security-policy']), /frame-ancestors 'none'/);
  assert.doesNotMatch(String(docs.headers['content-security-policy']), /upgrade-insecure-requests/, 'the service is plain http on loopback');
  assert.match(String((await app.inject({ url: '/', headers: { accept: 'text/html' } })).headers['content-security-policy']), /frame-ancestors 'none'/);
  const js = await app.inject({ url: '/ui/js/main.js' });
  assert.match(js.headers['content-type'] as string, /^text\/javascript/);
  for (const missing of ['/ui/nope.js', '/ui/tsconfig.json', '/ui/../package.json', '/ui/js/../../src/app.ts']) {
    const res = await app.inject({ url: missing });
    assert.equal(res.statusCode, 404, missing);
    assert.equal(res.json().code, 'ROUTE_NOT_FOUND');
  }
  // The data behind the page still needs a token.
  assert.equal((await app.inject({ url: '/v1/sessions' })).statusCode, 401);
});

async function stepWith(app: FastifyInstance, name: string, body: Record<string, unknown>) {
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: [1, 1, 1, 1] }, ...body } });
  assert.equal(res.statusCode, 200, res.body);
}

test('metrics ?max_points: the steps themselves when few, else buckets whose min/max/mean are those of their steps', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'm1');
  const losses = [5, 3, 4, 1, 2, 0.5, 0.75, 0.25, 1.5, 0.125];
  for (const [i, loss] of losses.entries()) await stepWith(app, 'm1', { metrics: { loss, ...(i % 2 === 0 && { even: i }) } });
  const raw = (await app.inject({ url: '/v1/sessions/m1/metrics?max_points=10' })).json();
  assert.equal(raw.downsampled, false);
  assert.deepEqual(raw.points.map((p: { values: { loss: number } }) => p.values.loss), losses);
  assert.equal(raw.next_after_version, 11);

  const res = await app.inject({ url: '/v1/sessions/m1/metrics?max_points=4' });
  assert.equal(res.statusCode, 200, res.body);
  const { points, downsampled, next_after_version: next } = res.json();
  assert.equal(downsampled, true);
  assert.equal(next, 11);
  // Versions 2..11 in buckets of ceil(10 / 4) = 3 versions: 2-4, 5-7, 8-10, 11.
  assert.deepEqual(points.map((p: Record<string, unknown>) => [p.version_from, p.version, p.step, p.count]), [[2, 4, 3, 3], [5, 7, 6, 3], [8, 10, 9, 3], [11, 11, 10, 1]]);
  assert.deepEqual(points[0].min, { loss: 3, even: 0 });
  assert.deepEqual(points[0].max, { loss: 5, even: 2 });
  assert.deepEqual(points[0].values, { loss: 4, even: 1 });
  assert.deepEqual(points[1], { ...points[1], min: { loss: 0.5, even: 4 }, max: { loss: 2, even: 4 }, values: { loss: (1 + 2 + 0.5) / 3, even: 4 } });
  assert.deepEqual(points[3].values, { loss: 0.125 }, 'a bucket without "even" has no figure for it');
  assert.equal(points[0].staleness, 0);
  assert.equal(points[0].staleness_max, 0);
  // after_version: the series after it, downsampled on its own.
  const tail = (await app.inject({ url: '/v1/sessions/m1/metrics?max_points=2&after_version=7' })).json();
  assert.deepEqual(tail.points.map((p: Record<string, unknown>) => [p.version_from, p.version]), [[8, 9], [10, 11]]);
  const third = (await app.inject({ url: '/v1/sessions/m1/metrics?max_points=3&after_version=7' })).json();
  assert.deepEqual(third.points.map((p: Record<string, unknown>) => [p.version_from, p.version]), [[8, 9], [10, 11]]);

  for (const [query, field] of [['max_points=1', 'max_points'], ['max_points=10001', 'max_points'], ['max_points=x', 'max_points'], ['max_points=5&limit=5', 'limit']]) {
    const bad = await app.inject({ url: `/v1/sessions/m1/metrics?${query}` });
    assert.equal(bad.statusCode, 400, query);
    assert.equal(bad.json().code, 'INVALID_QUERY');
    assert.match(bad.json().message, new RegExp(field), query);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/none/metrics?max_points=5' })).json().code, 'SESSION_NOT_FOUND');

  // A session whose steps never reported metrics (the dashboard asks for max_points=1500): buckets of counts
  // and staleness (the statement once named a parameter it did not use: 503 "the database is unreachable").
  await create(app, 'plain');
  for (let i = 0; i < 5; i++) await stepWith(app, 'plain', {});
  const plain = await app.inject({ url: '/v1/sessions/plain/metrics?max_points=2' });
  assert.equal(plain.statusCode, 200, plain.body);
  assert.deepEqual(plain.json().points.map((p: Record<string, unknown>) => [p.version_from, p.version, p.count, p.values]), [[2, 4, 3, {}], [5, 6, 2, {}]]);
});

test('a bucket spanning a restore says the step and time of its last version; the dashboard then keeps an lr set by the first step after the restore', async (t) => {
  // A browser review: a bucket holding the abandoned history's last steps and the first step after the
  // restore said the abandoned steps' largest step; the page dropped it as abandoned and with it the lr the
  // first new step set, and drew the old lr over the whole new history.
  const { app } = await buildTestApp(t);
  await create(app, 'rs');
  for (let s = 1; s <= 20; s++) await stepWith(app, 'rs', { metrics: { loss: 10 + s } });
  const snap = await app.inject({ method: 'POST', url: '/v1/sessions/rs/snapshots', payload: { pinned: true } });
  assert.equal(snap.statusCode, 201, snap.body);
  for (let s = 21; s <= 40; s++) await stepWith(app, 'rs', { metrics: { loss: 10 + s } });
  const restore = await app.inject({ method: 'POST', url: `/v1/sessions/rs/snapshots/${snap.json().id}/restore` });
  assert.equal(restore.statusCode, 200, restore.body);
  await stepWith(app, 'rs', { metrics: { loss: 0.21 }, param_groups: [{ lr: 0.2 }] });
  for (let s = 22; s <= 30; s++) await stepWith(app, 'rs', { metrics: { loss: s / 100 } });
  // Versions 2..41 (steps 1..40), 42 the restore (no step), 43..52 (steps 21..30): buckets of 6 versions
  // from 2 (51 versions in 10 points, one left for the version without a step); the one of versions 38..43
  // holds steps 37..40 and then step 21: it is split into its two runs, so that no point mixes the
  // abandoned steps' loss with the new one's (a second browser review).
  const raw = (await app.inject({ url: '/v1/sessions/rs/metrics?limit=1000' })).json().points as { version: number; step: number; time: string }[];
  const res = await app.inject({ url: '/v1/sessions/rs/metrics?max_points=10' });
  assert.equal(res.statusCode, 200, res.body);
  const { points, downsampled } = res.json();
  assert.equal(downsampled, true);
  assert.ok(points.length <= 10, `${points.length} points`);
  const split = points.filter((p: { version_from: number; version: number }) => p.version_from >= 38 && p.version <= 43);
  assert.deepEqual(split.map((p: Record<string, unknown>) => [p.version_from, p.version, p.step, p.count, p.values, p.min, p.max]), [
    [38, 41, 40, 4, { loss: (47 + 48 + 49 + 50) / 4 }, { loss: 47 }, { loss: 50 }],
    [43, 43, 21, 1, { loss: 0.21 }, { loss: 0.21 }, { loss: 0.21 }],
  ]);
  for (const p of points) {
    const last = raw.find((r) => r.version === p.version)!;
    assert.deepEqual([p.step, p.time], [last.step, last.time], `the bucket of versions ${p.version_from}..${p.version}: its last version's step and time`);
  }
  // The page's own functions (plain JS, typechecked with ui/tsconfig.json, not this project's).
  const { lineage, changesOn, hyperAt, toPoint } = await import('../../ui/js/series.js' as string);
  const session = (await app.inject({ url: '/v1/sessions/rs' })).json();
  const hyper = (await app.inject({ url: '/v1/sessions/rs/hyperparameters?max_points=10' })).json();
  const shown = lineage(points.map(toPoint));
  assert.ok(shown.every((p: { step: number }, i: number) => i === 0 || p.step > shown[i - 1].step), 'steps strictly increase');
  assert.equal(shown.at(-1).step, 30);
  const groups = hyperAt(shown, changesOn(hyper.changes, shown, points, session), session.param_groups, hyper.initial_param_groups);
  assert.equal(groups.at(-1)[0].lr, 0.2, 'the lr in force at the last point');
  assert.equal(groups[0][0].lr, 0.5, 'and before the restore, the first');
});

test('a page of the series holds at most 8 MiB of metrics: steps of 32 names of 128 characters come in several pages, every point once', async (t) => {
  // A review: 10,000 such steps were one 27 MB answer. The history is written with one INSERT (as the
  // dashboard benchmark does); 3,000 steps of ~5.2 KB of metrics each: ~15 MiB.
  const { app } = await buildTestApp(t);
  await create(app, 'wide');
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'wide'");
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, metrics)
     SELECT $1, i + 1, i, 0, (SELECT jsonb_object_agg(lpad(k::text, 3, '0') || repeat('é', 125), i * 100 + k) FROM generate_series(0, 31) AS k)
     FROM generate_series(1, 3000) AS i`,
    [id],
  );
  let after = 0;
  const pages: number[] = [];
  const seen: number[] = [];
  for (;;) {
    const res = await app.inject({ url: `/v1/sessions/wide/metrics?limit=10000&after_version=${after}` });
    assert.equal(res.statusCode, 200);
    const page = res.json();
    const bytes = page.points.reduce((n: number, p: { values: object }) => n + Buffer.byteLength(JSON.stringify(p.values)), 0);
    assert.ok(bytes < 8 * 1024 * 1024 + 10_000, `a page of ${bytes} bytes of metrics`);
    pages.push(page.points.length);
    seen.push(...page.points.map((p: { step: number; values: Record<string, number> }) => p.values[`031${'é'.repeat(125)}`] - 31 === p.step * 100 ? p.step : -1));
    after = page.next_after_version;
    if (!page.more) break;
  }
  assert.ok(pages.length >= 2 && pages[0] < 3000, `pages of ${pages.join(', ')} points`);
  assert.deepEqual(seen, Array.from({ length: 3000 }, (_, i) => i + 1));
});

test('metrics ?max_points: a read of many buckets holds fewer names (at most FIGURES_PER_READ figures), the others counted as left out', async (t) => {
  // Found by a hostile review: 330 names in 10,000 buckets were 16.5 million values in one answer, and eight
  // such reads at once ran a replica out of heap.
  const { app } = await buildTestApp(t);
  await create(app, 'wide');
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'wide'");
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, created_at, metrics)
     SELECT $1, i + 1, i, 0, now(), (SELECT jsonb_object_agg('n' || lpad(k::text, 3, '0'), k) FROM generate_series(0, 119) k) || jsonb_build_object('loss', i)
     FROM generate_series(1, 10001) AS i`,
    [id],
  );
  const res = await app.inject({ url: '/v1/sessions/wide/metrics?max_points=10000' });
  assert.equal(res.statusCode, 200, res.body);
  const { points, metrics_left_out: leftOut } = res.json();
  assert.equal(points.length, 5001, 'buckets of 2 versions');
  const names = Object.keys(points[0].values).sort();
  assert.equal(names.length, Math.floor(FIGURES_PER_READ / 5001));
  assert.equal(leftOut, 121 - names.length);
  assert.ok(names.includes('loss'));
  assert.deepEqual(names.filter((n) => n !== 'loss'), Array.from({ length: names.length - 1 }, (_, k) => `n${String(k).padStart(3, '0')}`));
  assert.deepEqual([points[0].values.loss, points[0].values.n005, points[0].min.loss, points[0].max.loss], [1.5, 5, 1, 2]);
  // The dashboard's reads (1,500 buckets) hold every name of these (at most 330).
  const page = (await app.inject({ url: '/v1/sessions/wide/metrics?max_points=1500' })).json();
  assert.equal(Object.keys(page.points[0].values).length, 121);
  assert.equal(page.metrics_left_out, undefined);
});

test('metrics ?max_points: hundreds of metric names over a session\'s life, and huge finite values, are still a series', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'many');
  // 20 steps, each with 32 names of its own: 640 names (three figures each would pass PostgreSQL's 1664 columns in one scan)
  for (let s = 0; s < 20; s++) {
    await stepWith(app, 'many', { metrics: Object.fromEntries(Array.from({ length: 32 }, (_, k) => [`m${s}_${k}`, s * 100 + k])) });
  }
  // Two more steps report m19_0..m19_9 again, and "loss".
  for (let s = 0; s < 2; s++) await stepWith(app, 'many', { metrics: { loss: 1, ...Object.fromEntries(Array.from({ length: 10 }, (_, k) => [`m19_${k}`, 1])) } });
  const res = await app.inject({ url: '/v1/sessions/many/metrics?max_points=2' });
  assert.equal(res.statusCode, 200, res.body);
  const { points, metrics_left_out: leftOut } = res.json();
  assert.deepEqual(points.map((p: Record<string, unknown>) => [p.version_from, p.version, p.count]), [[2, 12, 11], [13, 23, 11]]);
  // One read holds 330 names (a review: a read scanned the history once per 330 names, and a session's names
  // had no bound): loss, the 10 reported thrice, then the first by name.
  const names = new Set([...Object.keys(points[0].values), ...Object.keys(points[1].values)]);
  assert.equal(names.size, 330);
  assert.equal(leftOut, 641 - 330);
  assert.ok(names.has('loss') && Array.from({ length: 10 }, (_, k) => `m19_${k}`).every((n) => names.has(n)), [...names].join());
  const byName = Array.from({ length: 640 }, (_, i) => `m${Math.floor(i / 32)}_${i % 32}`).filter((n) => !/^m19_\d$/.test(n)).sort();
  assert.deepEqual([...names].filter((n) => n !== 'loss' && !/^m19_\d$/.test(n)).sort(), byName.slice(0, 319));
  assert.deepEqual([points[0].values.m0_0, points[0].values.m10_0, points[1].values.m19_9], [0, 1000, (1909 + 1 + 1) / 3]);
  // A cache that holds fewer names than the session has chooses them in SQL: the same names.
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'many'");
  const small = await createMetricNames(5)(app.db, id, 23);
  assert.deepEqual(small, { names: [...names].sort(), total: 641 });
  // Without max_points, every step's metrics.
  const raw = (await app.inject({ url: '/v1/sessions/many/metrics' })).json();
  assert.equal(new Set(raw.points.flatMap((p: { values: object }) => Object.keys(p.values))).size, 641);
  // A read after a version: the names of its steps (a review: the names were chosen over the whole
  // history, and the newest steps' one name was left out).
  for (let s = 0; s < 3; s++) await stepWith(app, 'many', { metrics: { zz_new: s } });
  const newest = (await app.inject({ url: '/v1/sessions/many/metrics?max_points=2&after_version=23' })).json();
  assert.deepEqual(newest.points.map((p: { values: object }) => p.values), [{ zz_new: 0.5 }, { zz_new: 2 }]);
  assert.equal(newest.metrics_left_out, undefined);

  // finite values whose sum overflows a double: their mean is finite
  await create(app, 'huge');
  for (const loss of [1.7e308, 1.7e308, 1.7e308, -1.7e308]) await stepWith(app, 'huge', { metrics: { loss } });
  const huge = await app.inject({ url: '/v1/sessions/huge/metrics?max_points=2' });
  assert.equal(huge.statusCode, 200, huge.body);
  assert.deepEqual(huge.json().points.map((p: { values: { loss: number }; min: { loss: number }; max: { loss: number } }) => [p.values.loss, p.min.loss, p.max.loss]),
    [[1.7e308, 1.7e308, 1.7e308], [0, -1.7e308, 1.7e308]]);
  // The largest double, five times a bucket: the mean is it, not one ulp below its own min (a review).
  await create(app, 'max');
  for (let i = 0; i < 10; i++) await stepWith(app, 'max', { metrics: { loss: Number.MAX_VALUE } });
  const max = (await app.inject({ url: '/v1/sessions/max/metrics?max_points=2' })).json();
  for (const p of max.points) assert.deepEqual([p.values.loss, p.min.loss, p.max.loss], [Number.MAX_VALUE, Number.MAX_VALUE, Number.MAX_VALUE]);

  // The smallest doubles (subnormal) beside large and ordinary ones: each bucket's mean as IEEE arithmetic has it
  // (the read used to fail with a 400 for good once a step reported 5e-324: a quotient PostgreSQL took for an underflow).
  await create(app, 'tiny');
  for (const loss of [5e-324, 5e-324, 5e-324, 1e-310, 1e308, 5e-324, 2.5, -1]) await stepWith(app, 'tiny', { metrics: { loss } });
  const tiny = await app.inject({ url: '/v1/sessions/tiny/metrics?max_points=4' });
  assert.equal(tiny.statusCode, 200, tiny.body);
  assert.deepEqual(tiny.json().points.map((p: { values: { loss: number }; min: { loss: number }; max: { loss: number } }) => [p.values.loss, p.min.loss, p.max.loss]),
    [[5e-324, 5e-324, 5e-324], [(5e-324 + 1e-310) / 2, 5e-324, 1e-310], [1e308 / 2 + 5e-324 / 2, 5e-324, 1e308], [0.75, -1, 2.5]]);
});

test('hyperparameters: the steps that changed them, with every group after; paged by version', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'h1');
  await stepWith(app, 'h1', {});
  await stepWith(app, 'h1', { param_groups: [{ lr: 0.25 }] });
  await stepWith(app, 'h1', {});
  await stepWith(app, 'h1', { param_groups: [{ lr: 0.125, weight_decay: 0.5 }] });
  const res = await app.inject({ url: '/v1/sessions/h1/hyperparameters' });
  assert.equal(res.statusCode, 200, res.body);
  const { changes, next_after_version: next } = res.json();
  assert.deepEqual(changes.map((c: { version: number; step: number; reason: string }) => [c.version, c.step, c.reason]), [[3, 2, 'step'], [5, 4, 'step']]);
  assert.equal(changes[0].param_groups[0].lr, 0.25);
  assert.equal(changes[1].param_groups[0].lr, 0.125);
  assert.equal(changes[1].param_groups[0].weight_decay, 0.5);
  assert.equal(changes[1].param_groups[0].t0, 0, 'the values the step left alone are there too');
  assert.equal(next, 5);
  // What was in force before the first change: the groups the session was created with.
  const created = { lr: 0.5, lambd: 1e-4, alpha: 0.75, t0: 0, weight_decay: 0, maximize: false };
  assert.deepEqual(res.json().initial_param_groups, [created]);
  const page = (await app.inject({ url: '/v1/sessions/h1/hyperparameters?after_version=3&limit=1' })).json();
  assert.deepEqual(page.changes.map((c: { version: number }) => c.version), [5]);
  assert.deepEqual(page.initial_param_groups, [created], 'on every page');
  // Kept for the session's lifetime: not read from the version-1 snapshot, which retention drops.
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/h1', payload: { snapshot_every: 1, keep_snapshots: 1 } })).statusCode, 200);
  await stepWith(app, 'h1', {});
  await stepWith(app, 'h1', {});
  await app.sessions.pendingSnapshots();
  const kept = (await app.inject({ url: '/v1/sessions/h1/snapshots' })).json().snapshots.map((s: { version: number }) => s.version);
  assert.ok(kept.length === 1 && kept[0] > 1, `the first snapshot is gone: ${kept}`);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/h1/hyperparameters' })).json().initial_param_groups, [created]);
  // A fork starts with the groups it was forked with.
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/h1/fork', payload: { name: 'h2' } })).statusCode, 201);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/h2/hyperparameters' })).json().initial_param_groups, [{ ...created, lr: 0.125, weight_decay: 0.5 }]);
  // A load that changes them is a change too (the steps after it ran with its values); one that keeps
  // them, and a restore to the same values, are not. A restore to other values is.
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/h1', payload: { keep_snapshots: 10 } })).statusCode, 200);
  const sd = (await app.inject({ url: '/v1/sessions/h1/state_dict' })).json();
  const withLr = (lr: number) => ({ ...sd, param_groups: [{ ...sd.param_groups[0], lr }] });
  assert.equal((await app.inject({ method: 'PUT', url: '/v1/sessions/h1/state_dict', payload: withLr(0.125) })).statusCode, 200); // the same values
  assert.equal((await app.inject({ method: 'PUT', url: '/v1/sessions/h1/state_dict', payload: withLr(0.75) })).statusCode, 200);
  await stepWith(app, 'h1', {});
  const snapshot = (await app.inject({ url: '/v1/sessions/h1/snapshots' })).json().snapshots.find((s: { version: number }) => s.version === 8);
  assert.ok(snapshot, 'the snapshot of version 8 (lr 0.125)');
  assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/h1/snapshots/${snapshot.id}/restore` })).statusCode, 200);
  const all = (await app.inject({ url: '/v1/sessions/h1/hyperparameters' })).json().changes;
  assert.deepEqual(all.map((c: { version: number; step: number; reason: string; param_groups: { lr: number }[] }) => [c.version, c.step, c.reason, c.param_groups[0].lr]),
    [[3, 2, 'step', 0.25], [5, 4, 'step', 0.125], [9, 6, 'load_state_dict', 0.75], [11, 6, 'restore', 0.125]]);
  for (const query of ['limit=0', 'limit=10001', 'after_version=-1']) {
    const bad = await app.inject({ url: `/v1/sessions/h1/hyperparameters?${query}` });
    assert.equal(bad.statusCode, 400, query);
    assert.equal(bad.json().code, 'INVALID_QUERY');
  }
});

test('a session of 5,000 groups: pages of its hyperparameter changes and of its series hold at most 100,000 groups\' values, next_after_version going on; downsampled ones fit too', async (t) => {
  // A review: 120 changes of a session of 20,000 groups made a 212 MB answer, built on the event loop, and
  // every request of the process waited 36 s behind it.
  const { app } = await buildTestApp(t);
  const groups = 5000;
  const created = await app.inject({
    method: 'POST', url: '/v1/sessions',
    payload: { name: 'wide', params: Array.from({ length: groups }, (_, i) => ({ name: `p${i}`, shape: [1], data: [i] })), param_groups: Array.from({ length: groups }, (_, i) => ({ params: [`p${i}`] })) },
  });
  assert.equal(created.statusCode, 201, created.body);
  const id = (await app.db.query<{ id: number }>("SELECT id FROM sessions WHERE name = 'wide'"))[0].id;
  // 30 steps that set group 0's lr, and one that set nothing between each two (written as the step statement writes them).
  await app.db.query(
    `INSERT INTO step_history (session_id, version, step, staleness, metrics, hyper)
     SELECT $1, v, v - 1, 0, jsonb_build_object('loss', v), CASE WHEN v % 2 = 0 THEN (
       SELECT jsonb_agg(jsonb_build_object('lr', CASE WHEN g = 0 THEN v ELSE 0.01 END, 'lambd', 0.0001, 'alpha', 0.75, 't0', 1000000, 'weight_decay', 0, 'maximize', false) ORDER BY g)
       FROM generate_series(0, ${groups - 1}) g) END
     FROM generate_series(2, 61) v`,
    [id],
  );
  await app.db.query("UPDATE sessions SET version = 61, step = 60 WHERE name = 'wide'");
  const page = (await app.inject({ url: '/v1/sessions/wide/hyperparameters?limit=1000' })).json();
  assert.equal(page.changes.length, 20, '100,000 / 5,000 changes');
  assert.deepEqual([page.changes[0].version, page.next_after_version, page.more], [2, 40, true]);
  const rest = (await app.inject({ url: '/v1/sessions/wide/hyperparameters?limit=1000&after_version=40' })).json();
  assert.deepEqual(rest.changes.map((c: { version: number }) => c.version), [42, 44, 46, 48, 50, 52, 54, 56, 58, 60]);
  assert.equal(rest.more, false);
  const series = (await app.inject({ url: '/v1/sessions/wide/metrics?limit=1000' })).json();
  assert.equal(series.points.filter((p: { param_groups?: unknown }) => p.param_groups).length, 20);
  assert.deepEqual([series.points.length, series.next_after_version, series.more], [40, 41, true], 'the steps between them come too, up to the next that set hyperparameters');
  const following = (await app.inject({ url: '/v1/sessions/wide/metrics?limit=1000&after_version=41' })).json();
  assert.deepEqual([following.points[0].version, following.points.length, following.more], [42, 20, false]);
  assert.equal((await app.inject({ url: '/v1/sessions/wide/metrics?limit=20&after_version=41' })).json().more, true, 'a full page: there may be more');
  // Downsampled: widened buckets and fewer of the newest kept, within the same bound; the count is of them all.
  const down = (await app.inject({ url: '/v1/sessions/wide/hyperparameters?max_points=1500' })).json();
  assert.equal(down.total_changes, 30);
  assert.equal(down.downsampled, true);
  assert.ok(down.changes.length * groups <= 100_000, `${down.changes.length} changes`);
  assert.equal(down.changes[down.changes.length - 1].version, 60, 'the newest is kept');

  // 30,000 groups: two buckets, each with its last step and its last other change, were four changes,
  // 120,000 values (a review: 40,000 groups made 160,000); the newest three are kept.
  const many = 30_000;
  const big = await app.inject({
    method: 'POST', url: '/v1/sessions',
    payload: { name: 'wider', params: Array.from({ length: many }, (_, i) => ({ name: `p${i}`, shape: [1], data: [i] })), param_groups: Array.from({ length: many }, (_, i) => ({ params: [`p${i}`] })) },
  });
  assert.equal(big.statusCode, 201, big.body);
  const bigId = (await app.db.query<{ id: number }>("SELECT id FROM sessions WHERE name = 'wider'"))[0].id;
  const hyper = (v: number) => `(SELECT jsonb_agg(jsonb_build_object('lr', CASE WHEN g = 0 THEN ${v} ELSE 0.01 END, 'lambd', 0.0001, 'alpha', 0.75, 't0', 1000000, 'weight_decay', 0, 'maximize', false) ORDER BY g) FROM generate_series(0, ${many - 1}) g)`;
  await app.db.query(`INSERT INTO step_history (session_id, version, step, staleness, hyper) SELECT $1, v, v - 1, 0, CASE WHEN v IN (3, 5, 8, 10) THEN ${hyper(7)} END FROM generate_series(2, 11) v WHERE v NOT IN (4, 9)`, [bigId]);
  for (const v of [4, 9]) await app.db.query(`INSERT INTO group_changes (session_id, version, step, reason, hyper) VALUES ($1, $2, $3, 'restore', ${hyper(v)})`, [bigId, v, v - 1]);
  await app.db.query("UPDATE sessions SET version = 11, step = 10 WHERE name = 'wider'");
  const bounded = await app.inject({ url: '/v1/sessions/wider/hyperparameters?max_points=1500' });
  assert.equal(bounded.statusCode, 200);
  const fitted = bounded.json();
  assert.deepEqual([fitted.total_changes, fitted.downsampled], [6, true]);
  assert.deepEqual(fitted.changes.map((c: { version: number }) => c.version), [5, 9, 10], 'the newest three, which fit');
});

test('sessions list ?figures=true&storage=true: steps in the last minute, the last step, stored bytes', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'busy');
  await create(app, 'idle');
  for (let i = 0; i < 3; i++) await stepWith(app, 'busy', {});
  const plain = (await app.inject({ url: '/v1/sessions' })).json().sessions;
  assert.equal(plain[0].activity, undefined);
  const listed = (await app.inject({ url: '/v1/sessions?figures=true&storage=true' })).json().sessions;
  const [busy, idle] = listed;
  assert.equal(busy.name, 'busy');
  assert.equal(busy.activity.steps_last_minute, 3);
  assert.equal(busy.activity.steps_per_second, 3 / 60);
  assert.ok(Date.now() - Date.parse(busy.activity.last_step_at) < 60_000);
  assert.deepEqual(idle.activity, { steps_last_minute: 0, steps_per_second: 0, last_step_at: null });
  // The same figures as GET session reports.
  assert.deepEqual(busy.storage, (await app.inject({ url: '/v1/sessions/busy' })).json().storage);
  assert.ok(busy.storage.total_bytes > idle.storage.total_bytes);
});

test('every answer says nosniff: the API\'s JSON, its errors (which echo what the caller sent) and its files', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'sniff');
  const answers = await Promise.all([
    app.inject({ method: 'GET', url: '/v1/sessions/sniff' }),
    app.inject({ method: 'GET', url: '/v1/sessions/%3Cscript%3E' }),
    app.inject({ method: 'GET', url: '/v1/sessions/sniff/state_dict?format=pt' }),
    app.inject({ method: 'POST', url: '/v1/sessions/sniff/step', payload: '<html>' , headers: { 'content-type': 'application/json' } }),
    app.inject({ method: 'GET', url: '/healthz' }),
    app.inject({ method: 'GET', url: '/v1/sessions/%ZZ' }),
    app.inject({ method: 'GET', url: `/v1/sessions/${'a'.repeat(5000)}` }),
  ]);
  assert.deepEqual(answers.map((a) => a.statusCode), [200, 400, 200, 400, 200, 400, 414]);
  for (const a of answers) assert.equal(a.headers['x-content-type-options'], 'nosniff', `${a.statusCode} ${a.body.slice(0, 60)}`);
});
