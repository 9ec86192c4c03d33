// The API routes the dashboard reads, and its files: norms on demand, the token's own scope, searching the
// sessions list, and /ui served compressed, cached and public.
import assert from 'node:assert/strict';
import { gunzipSync, brotliDecompressSync } from 'node:zlib';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp } from '../helper.ts';

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
  // Before any step: ax is zeros (PyTorch's initial state), ‖w‖ = ‖(3, 4, 0, 0)‖ = 5.
  assert.deepEqual(res.json(), {
    session: 'n1', version: 1, step: 0,
    params: [
      { name: 'w', numel: 4, norm: 5, ax_norm: 0, step: null, eta: null, mu: null },
      { name: 'b', numel: 1, norm: 2, ax_norm: 0, step: null, eta: null, mu: null },
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
  assert.equal((await app.inject({ url: '/v1/sessions/nope/norms' })).json().code, 'SESSION_NOT_FOUND');
  assert.equal((await app.inject({ url: '/v1/sessions/bad%20name/norms' })).statusCode, 400);
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
  assert.equal((await app.inject({ url: '/ui' })).headers.location, '/ui/');
  const index = await app.inject({ url: '/ui/' });
  assert.equal(index.statusCode, 200);
  assert.match(index.headers['content-type'] as string, /^text\/html/);
  assert.match(index.body, /"uplot": "\/ui\/vendor\/uPlot\.esm\.js"/);
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
