// A Python worker (torch autograd, plain HTTP) and a JavaScript worker (tfjs through RemoteASGD) step one
// session alternately. The result equals torch.optim.ASGD replaying both workers' gradients in the order
// of the versions the service gave them, bit for bit, in the service and in the tfjs model.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import test from 'node:test';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { RemoteASGD } from '../src/tfjs.ts';
import { hexOf, liveService, rng, runTorchReference, skipWithoutTorch, TORCH_PYTHON, uniqueName } from './service.ts';

tf.setBackend('cpu');

test('a Python worker and a JavaScript worker step one session alternately', { skip: skipWithoutTorch() }, async (t) => {
  const { client, url } = await liveService();
  const session = uniqueName('two-workers');
  const hyper = { lr: 0.05, t0: 10 };

  const m = tf.sequential();
  m.add(tf.layers.dense({ units: 1, inputShape: [4], kernelInitializer: tf.initializers.glorotUniform({ seed: 5 }) }));
  const initial = await Promise.all(m.trainableWeights.map(async (w, i) => ({ name: ['w', 'b'][i], shape: w.shape as number[], data: Array.from(await w.read().data()) })));
  const paramOf = new Map(m.trainableWeights.map((w, i) => [(w.read() as tf.Variable).name, ['w', 'b'][i]]));
  const steps: { version: number; grads: Record<string, number[]> }[] = [];
  class Recording extends RemoteASGD {
    override applyGradients(grads: tf.NamedTensorMap | { name: string; tensor: tf.Tensor }[]) {
      const list = Array.isArray(grads) ? grads : Object.entries(grads).map(([name, tensor]) => ({ name, tensor }));
      steps.push({ version: -1, grads: Object.fromEntries(list.map((g) => [paramOf.get(g.name)!, Array.from(g.tensor.dataSync())])) });
      super.applyGradients(grads);
    }
  }
  const opt = new Recording({ client, session, hyperparameters: hyper });
  await opt.attach(m.trainableWeights, ['w', 'b']);

  const python = spawn(TORCH_PYTHON, [fileURLToPath(new URL('./python-worker.py', import.meta.url)), url, session, '3'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  python.stderr.on('data', (c) => (stderr += c));
  t.after(() => python.kill());
  const lines = createInterface({ input: python.stdout })[Symbol.asyncIterator]();
  const pythonStep = async () => {
    python.stdin.write('step\n');
    const next = await lines.next();
    assert.ok(!next.done, `the Python worker ended: ${stderr}`);
    steps.push(JSON.parse(next.value));
  };

  const random = rng(9);
  const xs = tf.tensor2d(Array.from({ length: 32 * 4 }, () => random() * 2), [32, 4]);
  const ys = tf.matMul(xs, tf.tensor2d([[0.7], [-1.3], [0.4], [0.1]])).add(0.2);
  for (let i = 0; i < 20; i++) {
    await opt.pull(); // the Python worker's step
    opt.minimize(() => tf.losses.meanSquaredError(ys, m.predict(xs) as tf.Tensor) as tf.Scalar);
    await opt.synchronize();
    steps[steps.length - 1].version = opt.lastStep!.version;
    assert.equal(opt.lastStep!.staleness, 0);
    await pythonStep();
  }
  assert.equal(steps.length, 40);
  const ordered = [...steps].sort((a, b) => a.version - b.version);
  assert.deepEqual(ordered.map((s) => s.version), Array.from({ length: 40 }, (_, i) => i + 2));
  const torch = runTorchReference({ params: initial, defaults: hyper, steps: ordered.map((s) => s.grads) });
  const served = await client.params(session);
  assert.deepEqual(hexOf(served.params.w.data), torch.params.w);
  assert.deepEqual(hexOf(served.params.b.data), torch.params.b);
  await opt.pull();
  assert.deepEqual(hexOf(await m.trainableWeights[0].read().data()), torch.params.w, 'the tfjs model holds the same parameters');
  const history = await client.metrics(session);
  assert.equal(history.points.length, 40);
  assert.ok(history.points.every((p) => typeof p.values.loss === 'number'), 'both workers sent their loss');
});
