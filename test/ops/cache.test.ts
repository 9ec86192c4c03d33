// The decoded-state cache's bounds, as an operator sees them in /metrics: bytes (counted with what each
// parameter and session costs besides its elements) and sessions (ASGD_CACHE_SESSIONS: each cached
// session holds a WebAssembly memory that reserves ~8 GiB of address space, so about 16,000 small sessions
// broke a process whose byte budget had room for millions). Evicted sessions are read and stepped as before.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp, randomData } from '../helper.ts';

async function gauge(app: FastifyInstance, metric: string): Promise<number> {
  const body = (await app.inject({ url: '/metrics' })).body;
  return Number(new RegExp(`^${metric} (\\S+)$`, 'm').exec(body)?.[1] ?? 'NaN');
}

test('ASGD_CACHE_SESSIONS bounds the sessions kept decoded; the least used go, and come back exact when used', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_CACHE_SESSIONS: '3' } });
  const names = ['s0', 's1', 's2', 's3', 's4', 's5'];
  for (const [i, name] of names.entries()) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params: [{ name: 'w', shape: [4], data: randomData(4, i) }], hyperparameters: { lr: 0.1 } } });
    assert.equal(res.statusCode, 201, res.body);
    assert.ok(await gauge(app, 'asgd_session_cache_sessions') <= 3);
  }
  assert.equal(await gauge(app, 'asgd_session_cache_sessions'), 3);
  // Each session stepped twice, round robin: every step loads a session evicted a moment ago.
  for (let k = 0; k < 2; k++) {
    for (const name of names) {
      const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: [1, -1, 0.5, 0] } } });
      assert.equal(res.statusCode, 200, res.body);
      assert.ok(await gauge(app, 'asgd_session_cache_sessions') <= 3);
    }
  }
  // The same steps on a process that kept everything: the same parameters, bit for bit.
  const { app: roomy } = await buildTestApp(t);
  for (const [i, name] of names.entries()) {
    await roomy.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params: [{ name: 'w', shape: [4], data: randomData(4, i) }], hyperparameters: { lr: 0.1 } } });
    for (let k = 0; k < 2; k++) await roomy.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: [1, -1, 0.5, 0] } } });
    const [mine, theirs] = await Promise.all([app, roomy].map((a) => a.inject({ url: `/v1/sessions/${name}/state_dict` }).then((r) => r.json())));
    assert.deepEqual(mine, theirs, name);
  }
});

test('the byte budget counts a parameter\'s and a session\'s own cost, not only the elements', async (t) => {
  const { app } = await buildTestApp(t);
  const params = Array.from({ length: 1000 }, (_, i) => ({ name: `p${i}`, shape: [1], data: [i / 1000] }));
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'wide', params } })).statusCode, 201);
  // 1000 elements x 12 bytes, 1000 parameters x 512, one session x 64 KiB (before: 12,000).
  assert.equal(await gauge(app, 'asgd_session_cache_bytes'), 1000 * 12 + 1000 * 512 + 64 * 1024);
});

test('ASGD_CACHE_SESSIONS: a whole number from 1 to 10000', async () => {
  const { loadConfig } = await import('../../src/config.ts');
  for (const bad of ['0', '10001', 'many']) assert.throws(() => loadConfig({ ASGD_CACHE_SESSIONS: bad }), /ASGD_CACHE_SESSIONS/, bad);
  assert.equal(loadConfig({ ASGD_CACHE_SESSIONS: '10000' }).cacheSessions, 10_000);
  assert.equal(loadConfig({}).cacheSessions, 4096);
});
