// Synchronous rounds (issue 13) through the client: three tfjs RemoteASGD workers, each on its own service
// process, train one model in a session with aggregation; every round's step is torch.optim.ASGD's on the
// documented mean of the three gradients, bit for bit. client.step follows a 202 pending with the same
// Idempotency-Key; a duplicate worker gets DuplicateContribution; aggregation is set by create and PATCH.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient, DuplicateContribution, RoundOpen, RoundPending } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { hexOf, liveService, rng, runTorchReference, skipWithoutTorch, uniqueName } from './service.ts';

tf.setBackend('cpu');

const ROUNDS = 10;
// Not in rank order, and 'w10' sorts between 'w1' and 'w2' in byte order: the mean adds in that order.
const WORKERS = ['w2', 'w10', 'w1'];
// One worker sends JSON, the others safetensors: one round takes both. (The service's safetensors step answer
// carries no `round` yet, so the round's record is checked on JSON answers.)
const FORMATS = ['safetensors', 'json', 'safetensors'] as const;
const hyper = { lr: 0.05, lambd: 0.0001, alpha: 0.75, t0: 4, weight_decay: 0.001 };

type Grads = Record<string, number[]>;

/**
 * The contract's mean: per parameter, the gradients in ascending byte order of the worker ids, s = g_1,
 * s = fl32(s + g_k), mean = fl32(s / n). Math.fround of a double sum or quotient of two float32 values is the
 * float32 operation's result (a double holds it exactly enough to round once), as torch's `s += g; s /= n`.
 */
function documentedMean(byWorker: Record<string, Grads>): Grads {
  const order = Object.keys(byWorker).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  const mean: Grads = {};
  for (const param of Object.keys(byWorker[order[0]])) {
    let s = Float32Array.from(byWorker[order[0]][param]);
    for (const w of order.slice(1)) s = s.map((v, i) => Math.fround(v + byWorker[w][param][i]));
    mean[param] = Array.from(s, (v) => Math.fround(v / order.length));
  }
  return mean;
}

type Sent = { key: string | null; status: number; url: string; body: string };

/** A fetch that records the step requests (JSON bodies) with their Idempotency-Key and answer status. */
function recordingFetch(log: Sent[]): typeof fetch {
  return async (input, init) => {
    const res = await fetch(input, init);
    if (String(input).includes('/step')) log.push({ key: new Headers(init?.headers).get('idempotency-key'), status: res.status, url: String(input), body: String(init?.body) });
    return res;
  };
}

async function until(condition: () => Promise<boolean> | boolean, what: string): Promise<void> {
  const deadline = Date.now() + 120_000;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('synchronous rounds through the client', { skip: skipWithoutTorch() }, async (t) => {
  const { client, urls } = await liveService({ retryBudgetMs: 30_000 }, {}, 3);

  await t.test('three tfjs workers on three processes: each round is torch\'s step on the documented mean', async () => {
    const session = uniqueName('rounds-tfjs');
    const random = rng(5);
    const xs = Array.from({ length: 48 * 4 }, () => random() * 2);
    const x = tf.tensor2d(xs, [48, 4]);
    const y = tf.tensor2d(Array.from({ length: 48 }, (_, i) => 0.7 * xs[i * 4] - 1.3 * xs[i * 4 + 1] + 0.2), [48, 1]);
    const captured: Record<string, Grads>[] = Array.from({ length: ROUNDS }, () => ({}));
    const workers = WORKERS.map((worker, rank) => {
      const m = tf.sequential();
      m.add(tf.layers.dense({ units: 3, activation: 'tanh', inputShape: [4], kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }) }));
      m.add(tf.layers.dense({ units: 1, kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }) }));
      let round = 0;
      class Capturing extends RemoteASGD {
        override applyGradients(grads: tf.NamedTensorMap | { name: string; tensor: tf.Tensor }[]) {
          const list = Array.isArray(grads) ? grads : Object.entries(grads).map(([name, tensor]) => ({ name, tensor }));
          captured[round++][worker] = Object.fromEntries(list.map((g, i) => [['w0', 'b0', 'w1', 'b1'][i], Array.from(g.tensor.dataSync())]));
          super.applyGradients(grads);
        }
      }
      const opt = new Capturing({
        client: urls[rank], session, worker, hyperparameters: hyper, sessionSettings: { aggregation: { contributions: 3 } }, maxRoundWaitMs: 300_000, format: FORMATS[rank],
      });
      return { m, opt, rank };
    });
    const initial = await Promise.all(workers[0].m.trainableWeights.map(async (w, i) => ({ name: ['w0', 'b0', 'w1', 'b1'][i], shape: w.shape as number[], data: Array.from(await w.read().data()) })));
    for (const { m, opt } of workers) await opt.attach(m.trainableWeights, ['w0', 'b0', 'w1', 'b1']); // the first creates, the others join
    assert.deepEqual(workers.map(({ opt }) => opt.aggregation?.contributions), [3, 3, 3]);

    for (let r = 0; r < ROUNDS; r++) {
      for (const { m, opt, rank } of workers) {
        const [xb, yb] = [x.slice([rank * 16, 0], [16, 4]), y.slice([rank * 16, 0], [16, 1])];
        opt.nextSamples = 16;
        opt.minimize(() => tf.losses.meanSquaredError(yb, m.predict(xb) as tf.Tensor) as tf.Scalar);
        tf.dispose([xb, yb]);
      }
      await Promise.all(workers.map(({ opt }) => opt.synchronize())); // the round steps once all three are in
    }

    const torch = runTorchReference({ params: initial, defaults: hyper, steps: captured.map(documentedMean) });
    assert.deepEqual(workers[FORMATS.indexOf('json')].opt.lastStep!.round, { version: ROUNDS, contributions: 3, samples: 48, timed_out: false });
    for (const { m, opt } of workers) {
      assert.deepEqual([opt.version, opt.lastStep!.step, opt.lastStep!.staleness], [ROUNDS + 1, ROUNDS, 0]);
      for (const [i, w] of m.trainableWeights.entries()) {
        const name = ['w0', 'b0', 'w1', 'b1'][i];
        assert.deepEqual(hexOf(await w.read().data()), torch.params[name], `${opt.worker}: ${name} differs from torch.optim.ASGD on the mean`);
      }
    }
    const info = await client.getSession(session);
    assert.deepEqual([info.step, info.version, info.round], [ROUNDS, ROUNDS + 1, null]);
    tf.dispose([x, y]);
  });

  await t.test('client.step: a 202 pending is sent again with the same key until the round steps', async () => {
    const name = uniqueName('rounds-202');
    const params = [{ name: 'w', shape: [3], data: [0.5, -0.25, 1] }];
    await client.createSession({ name, params, hyperparameters: hyper, aggregation: { contributions: 2 } });
    const log: Sent[] = [];
    const recorded = new ASGDClient(urls[1], { fetch: recordingFetch(log) });
    const ga = [0.25, 0.5, -1.5];
    const gb = [1.25, -0.75, 0.125];
    const a = recorded.step(name, { w: Float32Array.from(ga) }, { baseVersion: 1, worker: 'a', samples: 4, wait: 1, return: 'params', format: 'json' });
    await until(() => log.some((e) => e.status === 202), 'a 202 for the first contribution');
    const b = await client.step(name, { w: Float32Array.from(gb) }, { baseVersion: 1, worker: 'b', samples: 4, return: 'params' });
    const answer = await a;
    assert.ok(log.length >= 2, `requests ${JSON.stringify(log)}`);
    assert.deepEqual(log.slice(0, -1).map((e) => e.status), log.slice(0, -1).map(() => 202));
    assert.equal(log[log.length - 1].status, 200);
    assert.deepEqual(new Set(log.map((e) => e.key)), new Set([answer.idempotencyKey]), 'one key for every request');
    assert.ok(log.every((e) => new URL(e.url).searchParams.get('wait') === '1' && e.body === log[0].body), 'the same request each time');
    assert.deepEqual([JSON.parse(log[0].body).worker, JSON.parse(log[0].body).samples, JSON.parse(log[0].body).base_version], ['a', 4, 1]);
    assert.equal(answer.attempts, log.length);
    assert.deepEqual([answer.version, b.version, answer.round?.contributions, answer.round?.samples], [2, 2, 2, 8]);
    const torch = runTorchReference({ params, defaults: hyper, steps: [documentedMean({ a: { w: ga }, b: { w: gb } })] });
    assert.deepEqual(hexOf(answer.params!.w.data), torch.params.w);
    assert.deepEqual(hexOf(b.params!.w.data), torch.params.w);
  });

  await t.test('a duplicate worker gets DuplicateContribution; PATCH is refused while the round is open; maxWaitMs', async () => {
    const name = uniqueName('rounds-dup');
    await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [1, 2] }], aggregation: { contributions: 3 } });
    const first = client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'a' });
    await until(async () => (await client.getSession(name)).round?.contributions === 1, 'the first contribution in the round');
    await assert.rejects(client.step(name, { w: [9, 9] }, { baseVersion: 1, worker: 'a' }), (err: unknown) => err instanceof DuplicateContribution && err.status === 409 && /worker/.test(err.serviceMessage));
    await assert.rejects(client.patchSession(name, { aggregation: { contributions: 3 } }), RoundOpen);
    assert.deepEqual((await client.getSession(name)).round?.workers, ['a']);
    // The client gives up on c's round after the first 202; the service keeps c's contribution.
    const pending = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'c', wait: 1, maxWaitMs: 0 }).then(() => null, (e: unknown) => e);
    assert.ok(pending instanceof RoundPending, String(pending));
    assert.deepEqual((await client.getSession(name)).round?.workers, ['a', 'c']);
    const last = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'd' });
    const resumed = await client.step(name, { w: [0.5, 0.5] }, { baseVersion: 1, worker: 'c', idempotencyKey: pending.idempotencyKey });
    assert.deepEqual([(await first).round?.contributions, last.round?.contributions, resumed.round?.contributions, resumed.version], [3, 3, 3, 2]);
    assert.equal((await client.getSession(name)).step, 1, 'c counted once');
  });

  await t.test('aggregation by create and PATCH', async () => {
    const name = uniqueName('rounds-patch');
    const created = await client.createSession({ name, params: [{ name: 'w', shape: [1], data: [0] }], aggregation: { target_samples: 64 } });
    assert.equal(created.aggregation?.target_samples, 64);
    const patched = await client.patchSession(name, { aggregation: { contributions: 4, timeout_s: 30, min_contributions: 2 } });
    assert.deepEqual([patched.aggregation?.contributions, patched.aggregation?.timeout_s, patched.aggregation?.min_contributions], [4, 30, 2]);
    assert.equal((await client.patchSession(name, { aggregation: null })).aggregation, null);
  });
});
