// How long a round contribution waits, against a live service: `maxWaitMs` (and tfjs's `maxRoundWaitMs`)
// bounds the hold the request asks for, not only the re-POSTs after it (the service's own hold is 60 s when
// `?wait=` is not given); a hold longer than the client's `timeoutMs` is not taken for a dead connection;
// and a connection lost during a hold is still retried (the retry budget starts after the hold).
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient, RoundPending } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

type Sent = { url: string; key: string | null; outcome: string };

/** A fetch that records each step request (its URL, Idempotency-Key and status, or "lost"). */
function recording(log: Sent[], lose?: (attempt: number) => number | null): typeof fetch {
  let steps = 0;
  return async (input, init) => {
    if (!String(input).includes('/step')) return fetch(input, init);
    const sent: Sent = { url: String(input), key: new Headers(init?.headers).get('idempotency-key'), outcome: '' };
    log.push(sent);
    // A connection cut `after` ms into the request (a proxy or a replica going away): the request has reached
    // the service, its answer is lost.
    const after = lose?.(++steps) ?? null;
    if (after === null) {
      const res = await fetch(input, init);
      sent.outcome = String(res.status);
      return res;
    }
    const cut = new AbortController();
    const timer = setTimeout(() => cut.abort(), after);
    try {
      await fetch(input, { ...init, signal: init?.signal ? AbortSignal.any([init.signal, cut.signal]) : cut.signal });
    } catch {
      // the cut
    } finally {
      clearTimeout(timer);
    }
    sent.outcome = 'lost';
    throw new TypeError('fetch failed', { cause: Object.assign(new Error('other side closed'), { code: 'UND_ERR_SOCKET' }) });
  };
}

const waitOf = (url: string) => new URL(url).searchParams.get('wait');

test('round contributions: maxWaitMs, timeoutMs and the retry budget against the hold', async (t) => {
  const { url, client: admin } = await liveService();
  const create = async (prefix: string) => {
    const name = uniqueName(prefix);
    await admin.createSession({ name, params: [{ name: 'w', shape: [2], data: [1, 2] }], aggregation: { contributions: 2 } });
    return name;
  };

  await t.test('maxWaitMs alone asks the service for a hold no longer than it (the default hold is 60 s)', async () => {
    const name = await create('wait-max');
    const log: Sent[] = [];
    const client = new ASGDClient(url, { fetch: recording(log), logger: null });
    const started = Date.now();
    const err = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'a', maxWaitMs: 1500 }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof RoundPending, String(err));
    // The hold asked for is what maxWaitMs has left, in milliseconds: 1.5 s, not rounded up to 2 (found by a review).
    assert.deepEqual(log.map((s) => s.outcome), ['202']);
    const asked = Number(waitOf(log[0].url));
    assert.ok(asked > 1.3 && asked <= 1.5, `asked for ${asked} s`);
    assert.ok(Date.now() - started < 30_000, `RoundPending after ${Date.now() - started} ms, not after the service's 60 s hold`);
    assert.deepEqual((await admin.getSession(name)).round?.workers, ['a'], 'the contribution stays in its round');
    // A wait given and shorter than maxWaitMs is sent as given; the rest of maxWaitMs caps the re-POSTs.
    const again = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'a', idempotencyKey: (err as RoundPending).idempotencyKey, wait: 1, maxWaitMs: 2500 })
      .then(() => null, (e: unknown) => e);
    assert.ok(again instanceof RoundPending, String(again));
    const resent = log.slice(1).map((s) => Number(waitOf(s.url)));
    assert.ok(resent.length >= 2 && resent.slice(0, -1).every((w) => w === 1) && resent.at(-1)! <= 1, `re-POSTs until maxWaitMs, each asking for 1 s, the last for what is left: ${resent}`);
    assert.ok(resent.reduce((a, b) => a + b, 0) <= 2.5, `the holds asked for add up to no more than maxWaitMs: ${resent}`);
    assert.deepEqual((await admin.getSession(name)).round?.workers, ['a'], 'counted once');
  });

  await t.test('tfjs: maxRoundWaitMs alone gives up after about that long', async () => {
    const name = await create('wait-tfjs');
    const log: Sent[] = [];
    const client = new ASGDClient(url, { fetch: recording(log), logger: null });
    const w = tf.variable(tf.tensor1d([1, 2]), true, 'w');
    const opt = new RemoteASGD({ client, session: name, worker: 'solo', maxRoundWaitMs: 1000 });
    await opt.attach([w]);
    const started = Date.now();
    opt.minimize(() => w.square().sum() as tf.Scalar);
    await assert.rejects(opt.synchronize(), RoundPending);
    assert.ok(Date.now() - started < 30_000, `RoundPending after ${Date.now() - started} ms`);
    assert.deepEqual(log.map((s) => waitOf(s.url)), ['1']);
    w.dispose();
  });

  await t.test('a hold longer than timeoutMs ends in its 202, not in a timeout', async () => {
    const name = await create('wait-timeout');
    const log: Sent[] = [];
    const client = new ASGDClient(url, { fetch: recording(log), logger: null, timeoutMs: 1000, retryBudgetMs: 1000 });
    const err = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'a', wait: 2, maxWaitMs: 2000 }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof RoundPending, String(err));
    assert.deepEqual(log.map((s) => s.outcome), ['202']);
  });

  await t.test('tfjs: rounds set on a session while a worker trains make its steps contributions (no 400 for a missing worker)', async () => {
    const name = uniqueName('wait-later');
    await admin.createSession({ name, params: [{ name: 'w', shape: [2], data: [1, 2] }] });
    const log: Sent[] = [];
    const client = new ASGDClient(url, { fetch: recording(log), logger: null });
    const w = tf.variable(tf.tensor1d([1, 2]), true, 'w');
    const opt = new RemoteASGD({ client, session: name, create: 'never' });
    await opt.attach([w]);
    opt.minimize(() => w.square().sum() as tf.Scalar);
    await opt.synchronize();
    await admin.patchSession(name, { aggregation: { contributions: 1 } });
    opt.minimize(() => w.square().sum() as tf.Scalar);
    await opt.synchronize();
    const after = await admin.getSession(name);
    assert.deepEqual([after.version, after.step], [3, 2]);
    assert.deepEqual(log.map((s) => s.outcome), ['200', '200']);
    assert.ok(log.every((s) => new URL(s.url).searchParams.get('worker')), 'every step names its worker');
    assert.deepEqual(Array.from(w.dataSync()), Array.from((await admin.params(name)).params.w.data));
    w.dispose();
  });

  await t.test('a connection lost late in a hold is retried with the same key, however short the budget', async () => {
    const name = await create('wait-lost');
    const log: Sent[] = [];
    const client = new ASGDClient(url, { fetch: recording(log, (n) => (n === 1 ? 1500 : null)), logger: null, retryBudgetMs: 500 });
    const err = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'a', wait: 3, maxWaitMs: 3000 }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof RoundPending, String(err));
    assert.deepEqual(log.map((s) => [waitOf(s.url), s.outcome]), [['3', 'lost'], ['3', '202']]);
    assert.equal(log[0].key, log[1].key);
    assert.deepEqual((await admin.getSession(name)).round?.workers, ['a'], 'counted once');
  });
});

test('tfjs: after model.fit threw RoundPending, a custom loop\'s minimize goes out at once and resumeRound() returns once the round steps', async () => {
  // Found by a review: tfjs does not call onTrainEnd when fit throws, so the optimizer still took itself to
  // be in the fit: the next minimize's step waited for batch logs that never came, and resumeRound(), which
  // waits for that step first, never returned.
  const { client } = await liveService({ logger: null });
  const name = uniqueName('fit-threw');
  await client.createSession({ name, params: [{ name: 'k', shape: [2, 1], data: [0.5, -0.5] }, { name: 'b', shape: [1], data: [0] }], aggregation: { contributions: 2 } });
  const model = tf.sequential();
  model.add(tf.layers.dense({ units: 1, inputShape: [2] }));
  const opt = new RemoteASGD({ client, session: name, create: 'never', worker: 'js', maxRoundWaitMs: 1000 });
  await opt.attach(model.trainableWeights, ['k', 'b']);
  model.compile({ optimizer: opt, loss: 'meanSquaredError' });
  const xs = tf.tensor2d([1, 2, 3, 4], [2, 2]);
  const ys = tf.tensor2d([1, 0], [2, 1]);
  await assert.rejects(model.fit(xs, ys, { epochs: 1, batchSize: 2, verbose: 0, callbacks: [opt.callback] }), RoundPending);
  assert.equal(opt.roundPending, true);

  const within = <T>(p: Promise<T>, ms: number, what: string) => Promise.race([p, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms))]);
  const mse = () => tf.losses.meanSquaredError(ys, model.predict(xs) as tf.Tensor) as tf.Scalar;
  // The README's way on: minimize (this worker is in the open round already: it waits for it), resumeRound.
  opt.minimize(mse);
  const other = client.step(name, { k: [0.25, 0.25], b: [0.5] }, { baseVersion: 1, worker: 'other' });
  assert.equal(await within(opt.resumeRound({ maxWaitMs: 20_000 }), 15_000, 'resumeRound'), 2);
  assert.equal((await other).version, 2);

  // A custom loop's step is not held back for batch logs: it reaches its round without synchronize().
  opt.minimize(mse);
  const joined = (async () => {
    for (;;) {
      if ((await client.getSession(name)).round?.workers?.includes('js')) return true;
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  assert.equal(await within(joined, 5_000, 'the step after the fit'), true);
  await client.step(name, { k: [0.25, 0.25], b: [0.5] }, { baseVersion: 2, worker: 'other' });
  await opt.synchronize();
  assert.equal(opt.version, 3);
  tf.dispose([xs, ys]);
});
