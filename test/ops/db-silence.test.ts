// PostgreSQL that stops answering without closing the connection (a network black hole, a hung server): a
// statement fails after ASGD_DB_TIMEOUT_MS of silence with a 503, the process serves again once the database
// answers, and a step whose commit went through before its answer was lost counts once when retried with its
// Idempotency-Key.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { test } from 'node:test';
import { buildTestApp, createTestDatabase, TEST_DB_KIND } from '../helper.ts';

type Mode = 'pass' | 'drop-replies' | 'black-hole';

/**
 * A TCP proxy to PostgreSQL. 'drop-replies': what the service sends reaches PostgreSQL, its answers vanish;
 * 'black-hole': nothing gets through either way. The sockets stay open (no FIN, no RST), as behind a dead
 * route; a side the service closes is closed on the other side too.
 */
async function startProxy(target: { host: string; port: number }): Promise<{ port: number; mode: Mode; server: Server }> {
  const state = { port: 0, mode: 'pass' as Mode, server: null as unknown as Server };
  const sockets = new Set<Socket>();
  state.server = createServer((client) => {
    const upstream = connect(target.port, target.host);
    sockets.add(client).add(upstream);
    client.on('data', (chunk) => {
      if (state.mode !== 'black-hole') upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (state.mode === 'pass') client.write(chunk);
    });
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('close', close).on('error', close);
    upstream.on('close', close).on('error', close);
  });
  state.server.on('close', () => {
    for (const s of sockets) s.destroy();
  });
  state.server.listen(0, '127.0.0.1');
  await once(state.server, 'listening');
  state.port = (state.server.address() as { port: number }).port;
  return state;
}

const session = {
  name: 'silent',
  params: [{ name: 'w', shape: [4], data: [0.5, -0.25, 1, 2] }],
  hyperparameters: { lr: 0.1 },
};
const stepBody = (k: number) => ({ grads: { w: [0.01 * k, -0.02, 0.03, 0.04] } });

test('a statement PostgreSQL leaves unanswered fails with 503 after ASGD_DB_TIMEOUT_MS; a retried step counts once', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const url = new URL(db.url);
  const proxy = await startProxy({ host: url.hostname, port: Number(url.port || 5432) });
  t.after(() => proxy.server.close());
  url.port = String(proxy.port);
  // The periodic probe is off: this test is about the statements of requests.
  const { app } = await buildTestApp(t, { databaseUrl: url.toString(), env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  const step = (k: number, key: string) => app.inject({ method: 'POST', url: '/v1/sessions/silent/step', headers: { 'idempotency-key': key }, payload: stepBody(k) });

  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  assert.equal((await step(1, 'k1')).json().version, 2);

  // The step reaches PostgreSQL and commits; its answer is lost on the way back.
  proxy.mode = 'drop-replies';
  let started = Date.now();
  const lost = await step(2, 'k2');
  const waited = Date.now() - started;
  assert.equal(lost.statusCode, 503, lost.body);
  assert.equal(lost.json().code, 'SERVICE_UNAVAILABLE');
  assert.match(lost.json().message, /did not answer for 1 s.*Idempotency-Key/);
  assert.ok(lost.headers['retry-after']);
  assert.ok(waited >= 900 && waited < 10_000, `answered after ${waited} ms`);

  // Nothing gets through: a read fails the same way, not for ever.
  proxy.mode = 'black-hole';
  started = Date.now();
  const read = await app.inject({ url: '/v1/sessions/silent' });
  assert.equal(read.statusCode, 503, read.body);
  assert.ok(Date.now() - started < 10_000);
  const blackHoled = await step(3, 'k3');
  assert.equal(blackHoled.statusCode, 503, blackHoled.body);

  // PostgreSQL answers again: the same process serves. The lost step was committed once: its retry gets
  // its answer; the black-holed one never reached PostgreSQL and is applied now.
  proxy.mode = 'pass';
  const retried = await step(2, 'k2');
  assert.equal(retried.statusCode, 200, retried.body);
  assert.equal(retried.json().version, 3);
  assert.equal(retried.json().replayed, true);
  const third = await step(3, 'k3');
  assert.equal(third.statusCode, 200, third.body);
  assert.equal(third.json().version, 4);
  const now = (await app.inject({ url: '/v1/sessions/silent' })).json();
  assert.equal(now.version, 4);
  assert.equal(now.step, 3);
  // The parameters are those of the three steps, each applied once: the same as a session that never lost one.
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { ...session, name: 'reference' } })).statusCode, 201);
  for (const k of [1, 2, 3]) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/reference/step', payload: stepBody(k) })).statusCode, 200);
  const params = async (name: string) => (await app.inject({ url: `/v1/sessions/${name}/params` })).json().params;
  assert.deepEqual(await params('silent'), await params('reference'));
});

test('ASGD_DB_TIMEOUT_MS=0 waits for the database; a bad value is refused naming the variable', async () => {
  const { loadConfig } = await import('../../src/config.ts');
  assert.equal(loadConfig({ ASGD_DB_TIMEOUT_MS: '0' }).dbTimeoutMs, 0);
  assert.equal(loadConfig({}).dbTimeoutMs, 30_000);
  assert.throws(() => loadConfig({ ASGD_DB_TIMEOUT_MS: '-5' }), /ASGD_DB_TIMEOUT_MS/);
  assert.throws(() => loadConfig({ ASGD_DB_TIMEOUT_MS: 'soon' }), /ASGD_DB_TIMEOUT_MS/);
});
