// RemoteASGD trains tfjs models through a live service: in a custom loop (optimizer.minimize) and with
// model.fit. After 100 steps the model's variables equal, bit for bit, real torch.optim.ASGD applied to
// the gradients tfjs computed (captured here), and the loss fell.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { decodeSafetensors } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { hexOf, liveService, rng, runTorchReference, skipWithoutTorch, uniqueName } from './service.ts';

tf.setBackend('cpu');

function data(seed: number, n = 64) {
  const random = rng(seed);
  const xs = Array.from({ length: n * 4 }, () => random() * 2);
  const ys = Array.from({ length: n }, (_, i) => 0.7 * xs[i * 4] - 1.3 * xs[i * 4 + 1] + 0.4 * xs[i * 4 + 2] * xs[i * 4 + 3] + 0.2);
  return { x: tf.tensor2d(xs, [n, 4]), y: tf.tensor2d(ys, [n, 1]) };
}

function model(seed: number) {
  const m = tf.sequential();
  m.add(tf.layers.dense({ units: 8, activation: 'tanh', inputShape: [4], kernelInitializer: tf.initializers.glorotUniform({ seed }) }));
  m.add(tf.layers.dense({ units: 1, kernelInitializer: tf.initializers.glorotUniform({ seed: seed + 1 }) }));
  return m;
}

type Captured = Record<string, number[]>;

async function variablesOf(m: tf.LayersModel) {
  return Promise.all(m.trainableWeights.map(async (w) => ({ name: w.name.replace(/[^A-Za-z0-9._-]/g, '.'), shape: w.shape as number[], data: Array.from(await w.read().data()) })));
}

function assertEqualsTorch(initial: Awaited<ReturnType<typeof variablesOf>>, steps: Captured[], final: Awaited<ReturnType<typeof variablesOf>>, hyper: Record<string, number>) {
  assert.equal(steps.length, 100);
  const torch = runTorchReference({ params: initial, defaults: hyper, steps });
  for (const v of final) assert.deepEqual(hexOf(v.data), torch.params[v.name], `${v.name} differs from torch.optim.ASGD`);
}

test('RemoteASGD', { skip: skipWithoutTorch() }, async (t) => {
  const { client } = await liveService(t, { retryBudgetMs: 30_000 });
  const hyper = { lr: 0.05, lambd: 0.0001, alpha: 0.75, t0: 20, weight_decay: 0.001 };

  await t.test('a custom loop with optimizer.minimize: 100 steps equal torch.optim.ASGD bit for bit', async () => {
    const m = model(1);
    const { x, y } = data(2);
    const captured: Captured[] = [];
    // The gradients tfjs computed, as applyGradients receives them.
    class Capturing extends RemoteASGD {
      override applyGradients(grads: tf.NamedTensorMap | { name: string; tensor: tf.Tensor }[]) {
        const list = Array.isArray(grads) ? grads : Object.entries(grads).map(([name, tensor]) => ({ name, tensor }));
        captured.push(Object.fromEntries(list.map((g) => [g.name.replace(/[^A-Za-z0-9._-]/g, '.'), Array.from(g.tensor.dataSync())])));
        super.applyGradients(grads);
      }
    }
    const opt = new Capturing({ client, session: uniqueName('tfjs-loop'), hyperparameters: hyper });
    const initial = await variablesOf(m);
    const session = await opt.attach(m.trainableWeights);
    assert.equal(session.version, 1);
    const losses: number[] = [];
    for (let i = 0; i < 100; i++) {
      const [xb, yb] = [x.slice([(i % 4) * 16, 0], [16, 4]), y.slice([(i % 4) * 16, 0], [16, 1])];
      const loss = opt.minimize(() => tf.losses.meanSquaredError(yb, m.predict(xb) as tf.Tensor) as tf.Scalar, true)!;
      await opt.synchronize();
      losses.push(loss.dataSync()[0]);
      tf.dispose([loss, xb, yb]);
    }
    assert.equal(opt.version, 101);
    assert.equal(opt.lastStep!.step, 100);
    assertEqualsTorch(initial, captured, await variablesOf(m), hyper);
    const first = losses.slice(0, 4).reduce((a, b) => a + b) / 4;
    const last = losses.slice(-4).reduce((a, b) => a + b) / 4;
    assert.ok(last < first * 0.5, `the loss fell from ${first} to ${last}`);
  });

  await t.test('model.fit with the optimizer\'s callback: 100 steps equal torch.optim.ASGD bit for bit', async () => {
    const captured: Captured[] = [];
    // Capture what went over the wire: the safetensors gradient bodies of the step requests.
    const capturingFetch: typeof fetch = async (input, init) => {
      if (String(input).includes('/step') && init?.body instanceof Uint8Array) {
        const file = decodeSafetensors(init.body);
        captured.push(Object.fromEntries([...file.tensors].map(([name, t]) => [name, Array.from(t.data)])));
      }
      return fetch(input, init);
    };
    const { ASGDClient } = await import('../src/index.ts');
    const fitClient = new ASGDClient(client.http.baseUrl, { fetch: capturingFetch });
    const m = model(3);
    const { x, y } = data(4);
    const opt = new RemoteASGD({ client: fitClient, session: uniqueName('tfjs-fit'), hyperparameters: hyper });
    const initial = await variablesOf(m);
    await opt.attach(m.trainableWeights);
    m.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const history = await m.fit(x, y, { epochs: 25, batchSize: 16, shuffle: false, verbose: 0, callbacks: [opt.callback] });
    // Safetensors sorts tensors by name; torch's replay takes them by name.
    assertEqualsTorch(initial, captured, await variablesOf(m), hyper);
    const loss = history.history.loss as number[];
    assert.ok(loss[loss.length - 1] < loss[0] * 0.5, `the loss fell from ${loss[0]} to ${loss[loss.length - 1]}`);
    const metrics = await client.getSession(opt.session);
    assert.equal(metrics.step, 100);
  });
});
