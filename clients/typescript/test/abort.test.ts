// An AbortSignal ends a call at once: a waiting read, a step's retries against a service that is down, and
// a RemoteASGD's training (its step in flight, the steps after it). Found by a review of the client: only
// events() took a signal, so a page or a service that wanted to stop waited out a call (up to 300 s).
import assert from 'node:assert/strict';
import { createServer, type Socket } from 'node:net';
import { once } from 'node:events';
import test, { type TestContext } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient, ConnectionFailed, ServiceUnavailable } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

/** A service that accepts connections and answers nothing (a stalled process, a black-holing proxy): its URL. */
async function stalledService(t: TestContext): Promise<string> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
  }).listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return `http://127.0.0.1:${(server.address() as { port: number }).port}`;
}

/** A port nothing listens on: every connection is refused. */
async function refusingPort(): Promise<number> {
  const probe = createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const { port } = probe.address() as { port: number };
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

test('a waiting read ends when its signal is aborted, with the signal\'s reason', async () => {
  const { client } = await liveService();
  const name = uniqueName('abort-wait');
  await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  const controller = new AbortController();
  const began = Date.now();
  setTimeout(() => controller.abort(), 200);
  await assert.rejects(client.waitForParams(name, 1, 30, { signal: controller.signal }), (err: Error) => err.name === 'AbortError');
  assert.ok(Date.now() - began < 5_000, `ended at once (${Date.now() - began} ms)`);
  // An aborted signal given to a read: nothing is sent.
  await assert.rejects(client.params(name, { signal: AbortSignal.abort(new Error('stopped')) }), /stopped/);
});

test('a step retrying against a service that is down ends when its signal is aborted', async () => {
  // A port with nothing listening: refused connections, retried for the whole budget (60 s) without a signal.
  const probe = createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const { port } = probe.address() as { port: number };
  probe.close();
  const client = new ASGDClient(`http://127.0.0.1:${port}`, { logger: null });
  const began = Date.now();
  await assert.rejects(client.step('s', { w: { shape: [1], data: [1] } }, { signal: AbortSignal.timeout(500) }), (err: Error) => err.name === 'TimeoutError');
  assert.ok(Date.now() - began < 5_000, `ended at once (${Date.now() - began} ms)`);
});

test('RemoteASGD with a signal: once aborted, synchronize() throws its reason and no further step is sent', async () => {
  const { client } = await liveService();
  const name = uniqueName('abort-fit');
  const controller = new AbortController();
  const w = tf.variable(tf.zeros([2]), true, 'w-abort');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 }, signal: controller.signal });
  await opt.attach([w], ['w']);
  const loss = () => w.sub(tf.tensor1d([1, 1])).square().sum() as tf.Scalar;
  for (let i = 0; i < 3; i++) {
    opt.minimize(loss, false, [w]);
    await opt.synchronize();
  }
  assert.equal(opt.version, 4);
  controller.abort(new Error('training stopped by the user'));
  opt.minimize(loss, false, [w]);
  opt.minimize(loss, false, [w]);
  await assert.rejects(opt.synchronize(), /training stopped by the user/);
  assert.equal((await client.getSession(name)).version, 4, 'nothing sent after the abort');
  assert.ok(!('signal' in (opt.getConfig() as object)), 'not in the saved config');
});

test('events() ends when its signal is aborted while it waits out a Retry-After (found by a review: 31 s)', async () => {
  // A replica that is rate-limiting or has lost its database: 503 with Retry-After: 30, retried for 60 s.
  const busy: typeof fetch = async () => new Response(JSON.stringify({ code: 'DATABASE_UNAVAILABLE', message: 'the database cannot be reached' }), {
    status: 503, headers: { 'content-type': 'application/json', 'retry-after': '30' },
  });
  const client = new ASGDClient('http://127.0.0.1:9', { fetch: busy, logger: null });
  const controller = new AbortController();
  const began = Date.now();
  setTimeout(() => controller.abort(), 300);
  const seen = [];
  for await (const event of client.events('s', { signal: controller.signal })) seen.push(event);
  assert.deepEqual(seen, []);
  assert.ok(Date.now() - began < 5_000, `ended at once (${Date.now() - began} ms)`);
  // A call given the signal ends with its reason.
  const stopped = new AbortController();
  setTimeout(() => stopped.abort(new Error('stopped')), 300);
  await assert.rejects(client.params('s', { signal: stopped.signal }), /stopped/);
  assert.ok(Date.now() - began < 10_000, `ended at once (${Date.now() - began} ms)`);
});

test('a step or a load of flat arrays ends with its signal and keeps to its budget, the read of the shapes before it included', async (t) => {
  // Found by a review: flat gradients first read the session for their shapes, and that read had neither the
  // signal nor the step's budget: a step given AbortSignal.timeout(700) against a stalled service ran 72 s and
  // threw ConnectionFailed naming a GET the caller never made. (A short timeoutMs and budget on the client
  // bound that failure here: it would be ConnectionFailed after them, not the signal's reason at 700 ms.)
  const stalled = new ASGDClient(await stalledService(t), { logger: null, timeoutMs: 3_000, retryBudgetMs: 3_000 });
  for (const [what, call] of [
    ['step', (signal: AbortSignal) => stalled.step('s', { w: new Float32Array([1, 1]) }, { signal })],
    ['loadParams', (signal: AbortSignal) => stalled.loadParams('s', { w: new Float32Array([1, 1]) }, { signal })],
  ] as const) {
    const began = Date.now();
    await assert.rejects(call(AbortSignal.timeout(700)), (err: Error) => err.name === 'TimeoutError', what);
    assert.ok(Date.now() - began < 2_500, `${what} ended with its signal (${Date.now() - began} ms)`);
  }
  // The budget: refused connections on a client of the default 60 s budget, the call given 1 s for everything.
  const refused = new ASGDClient(`http://127.0.0.1:${await refusingPort()}`, { logger: null });
  for (const [what, call] of [
    ['step', () => refused.step('s', { w: new Float32Array([1, 1]) }, { retryBudgetMs: 1_000 })],
    ['loadParams', () => refused.loadParams('s', { w: new Float32Array([1, 1]) }, { retryBudgetMs: 1_000 })],
  ] as const) {
    const began = Date.now();
    await assert.rejects(call(), ConnectionFailed, what);
    assert.ok(Date.now() - began < 5_000, `${what} kept to its 1 s budget (${Date.now() - began} ms)`);
  }
});

/**
 * A fetch that stalls the requests `stall` picks (they never answer, as a stalled service; only their signal
 * ends them), calling `stalled` for each, and passes the others on.
 */
function stalling(stall: (method: string, url: string) => boolean, stalled: () => void): typeof fetch {
  return (input, init) => {
    if (!stall(init?.method ?? 'GET', String(input))) return fetch(input, init);
    stalled();
    return new Promise<Response>((_, reject) => {
      const signal = init?.signal;
      if (signal?.aborted) return reject(signal.reason);
      signal?.addEventListener('abort', () => reject(signal.reason), { once: true });
    });
  };
}

test('RemoteASGD\'s own requests end with its signal: the read after a stale drop, the PUT of edited variables, pull()', async (t) => {
  // Found by a review: only the step took the signal; an abort waited out these (up to timeoutMs each, and
  // retried). A short timeoutMs and budget make the unfixed failure a ConnectionFailed instead of the reason.
  const { client: admin, url } = await liveService({ logger: null });
  let stall: (method: string, url: string) => boolean = () => false;
  let stalled = () => {};
  const client = new ASGDClient(url, { logger: null, timeoutMs: 3_000, retryBudgetMs: 3_000, fetch: stalling((m, u) => stall(m, u), () => stalled()) });
  const target = tf.tensor1d([1, 1]);
  const cases: [string, (opt: RemoteASGD, w: tf.Variable, name: string) => Promise<unknown>, (method: string, url: string) => boolean][] = [
    ['the read after a stale drop', async (opt, w, name) => {
      await admin.step(name, { w: [0.5, 0.5] }); // another worker: this gradient is one version old (max_staleness 0)
      opt.minimize(() => w.sub(target).square().sum() as tf.Scalar, false, [w]);
      return opt.synchronize();
    }, (m, u) => m === 'GET' && u.includes('/params')],
    ['the PUT of edited variables', async (opt, w) => {
      w.assign(tf.tensor1d([3, 4]));
      opt.minimize(() => w.sub(target).square().sum() as tf.Scalar, false, [w]);
      return opt.synchronize();
    }, (m, u) => m === 'PUT' && u.includes('/params')],
    ['pull()', (opt) => opt.pull(), (m, u) => m === 'GET' && u.includes('/params')],
  ];
  for (const [what, run, stalls] of cases) {
    await t.test(what, async () => {
      stall = () => false; // a case that failed may have left its own
      const name = uniqueName('abort-own');
      const controller = new AbortController();
      const w = tf.variable(tf.zeros([2]), true, `w-${name}`);
      const opt = new RemoteASGD({ client, session: name, signal: controller.signal, sessionSettings: { max_staleness: 0 } });
      await opt.attach([w], ['w']);
      stall = stalls;
      let abortedAt = 0;
      // Aborted once the request in question hangs (the step before it has been answered).
      stalled = () => setTimeout(() => {
        abortedAt = Date.now();
        controller.abort(new Error('training stopped by the user'));
      }, 100);
      await assert.rejects(run(opt, w, name), /training stopped by the user/, what);
      assert.ok(abortedAt > 0, `${what}: the request stalled`);
      assert.ok(Date.now() - abortedAt < 1_500, `${what}: ended with the signal (${Date.now() - abortedAt} ms after it)`);
      stall = () => false;
      w.dispose();
    });
  }
  target.dispose();
});

test('RemoteASGD\'s retryBudgetMs bounds its own requests too (the read after a stale drop)', async () => {
  const { client: admin, url } = await liveService({ logger: null });
  let busy = false;
  // The read after the drop is answered 503 (a replica that lost its database), retried within the budget.
  const client = new ASGDClient(url, {
    logger: null,
    fetch: async (input, init) => busy && (init?.method ?? 'GET') === 'GET' && String(input).includes('/params')
      ? new Response(JSON.stringify({ code: 'SERVICE_UNAVAILABLE', message: 'the database cannot be reached' }), { status: 503, headers: { 'content-type': 'application/json' } })
      : fetch(input, init),
  });
  const name = uniqueName('budget-own');
  const w = tf.variable(tf.zeros([2]), true, `w-${name}`);
  const opt = new RemoteASGD({ client, session: name, retryBudgetMs: 1_000, sessionSettings: { max_staleness: 0 } });
  await opt.attach([w], ['w']);
  await admin.step(name, { w: [0.5, 0.5] });
  busy = true;
  const began = Date.now();
  opt.minimize(() => w.square().sum() as tf.Scalar, false, [w]);
  await assert.rejects(opt.synchronize(), ServiceUnavailable);
  assert.ok(Date.now() - began < 5_000, `kept to the optimizer's 1 s budget, not the client's 60 s (${Date.now() - began} ms)`);
  assert.equal(opt.staleDropped, 0, 'the drop did not complete');
  w.dispose();
});
