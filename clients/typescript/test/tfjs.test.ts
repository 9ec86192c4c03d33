// RemoteASGD trains tfjs models through a live service: in a custom loop (optimizer.minimize) and with
// model.fit. After 100 steps the model's variables equal, bit for bit, real torch.optim.ASGD applied to
// the gradients tfjs computed (captured here), and the loss fell.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient, decodeSafetensors } from '../src/index.ts';
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
  const { client } = await liveService({ retryBudgetMs: 30_000 });
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

  await t.test('model.fit with metrics compiled into the model: each step carries its own batch\'s loss and metrics; nextMetrics in a custom loop', async () => {
    // A review: only the loss was sent, and a tfjs user's dashboard had no accuracy chart.
    const m = model(5);
    const { x, y } = data(6);
    const opt = new RemoteASGD({ client, session: uniqueName('tfjs-fit-metrics'), hyperparameters: hyper });
    await opt.attach(m.trainableWeights);
    m.compile({ optimizer: opt, loss: 'meanSquaredError', metrics: ['mae'] });
    const seen: { loss: number; mae: number }[] = [];
    const recorder = { onBatchEnd: async (_: number, logs?: tf.Logs) => void seen.push({ loss: logs!.loss as number, mae: logs!.mae as number }) };
    await m.fit(x, y, { epochs: 2, batchSize: 16, shuffle: false, verbose: 0, callbacks: [opt.callback, recorder] });
    assert.equal(seen.length, 8);
    const series = await client.metrics(opt.session);
    assert.deepEqual(series.points.map((p) => p.values), seen, 'step k carries batch k\'s loss and mae, as model.fit logged them');
    // After the fit, a custom loop: nextMetrics goes with the next step, beside its loss; the step after carries the loss alone.
    const [xs, ys] = [x.slice(0, 16), y.slice(0, 16)];
    opt.nextMetrics = { 'val/acc': 0.5 };
    opt.minimize(() => tf.losses.meanSquaredError(ys, m.predict(xs) as tf.Tensor) as tf.Scalar);
    opt.minimize(() => tf.losses.meanSquaredError(ys, m.predict(xs) as tf.Tensor) as tf.Scalar);
    await opt.synchronize();
    const after = (await client.metrics(opt.session, { afterVersion: 9 })).points.map((p) => Object.keys(p.values).sort());
    assert.deepEqual(after, [['loss', 'val/acc'], ['loss']]);
  });

  await t.test('model.save with includeOptimizer, then tf.loadLayersModel: a RemoteASGD of the same URL, session and options', async () => {
    const session = uniqueName('tfjs_save_load'); // underscores: tfjs-layers camel-cases the strings of a config it loads
    const names = ['l1.kernel', 'l1.bias', 'l2.kernel', 'l2.bias'];
    const m = model(5);
    const opt = new RemoteASGD({ client, session, hyperparameters: { lr: 0.05, weight_decay: 0.001 }, worker: 'js_worker-1', sendLoss: true });
    await opt.attach(m.trainableWeights, names);
    m.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const { x, y } = data(6, 32);
    await m.fit(x, y, { epochs: 1, batchSize: 16, shuffle: false, verbose: 0, callbacks: [opt.callback] });
    assert.equal(opt.version, 3);
    // As a model.json file holds it: topology and training config through JSON.
    let saved: tf.io.ModelArtifacts | undefined;
    await m.save(tf.io.withSaveHandler(async (artifacts) => {
      saved = { ...artifacts, modelTopology: JSON.parse(JSON.stringify(artifacts.modelTopology)), trainingConfig: JSON.parse(JSON.stringify(artifacts.trainingConfig)) };
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
    }), { includeOptimizer: true });
    assert.equal((saved!.trainingConfig!.optimizer_config as { class_name?: string }).class_name, 'RemoteASGD');

    // The token is not in the file: it comes from RemoteASGD.clientOptions (or ASGD_TOKEN in the environment).
    const authorizations: (string | null)[] = [];
    const recordingFetch: typeof fetch = (input, init) => {
      authorizations.push(new Headers(init?.headers).get('authorization'));
      return fetch(input, init);
    };
    RemoteASGD.clientOptions = { token: 'token-from-the-loader', fetch: recordingFetch };
    let loaded: tf.LayersModel;
    try {
      loaded = await tf.loadLayersModel(tf.io.fromMemory(saved!));
    } finally {
      RemoteASGD.clientOptions = undefined;
    }
    const again = loaded.optimizer as RemoteASGD;
    assert.ok(again instanceof RemoteASGD, `the loaded optimizer is a ${again?.constructor?.name}`);
    assert.ok(again.client, 'the loaded optimizer has a client');
    assert.equal(again.client.http.baseUrl, client.http.baseUrl);
    assert.equal(again.session, session);
    assert.equal(again.worker, 'js_worker-1');
    assert.deepEqual(again.getConfig(), opt.getConfig());

    // Attached to the loaded model, it continues the session.
    const joined = await again.attach(loaded.trainableWeights, names);
    assert.equal(joined.version, 3);
    await loaded.fit(x, y, { epochs: 1, batchSize: 16, shuffle: false, verbose: 0, callbacks: [again.callback] });
    assert.equal(again.version, 5);
    assert.equal((await client.getSession(session)).step, 4);
    assert.ok(authorizations.length > 0 && authorizations.every((a) => a === 'Bearer token-from-the-loader'), `authorizations ${authorizations}`);

    // Without clientOptions, the token in the environment.
    const before = process.env.ASGD_TOKEN;
    process.env.ASGD_TOKEN = 'token-from-the-environment';
    try {
      const third = (await tf.loadLayersModel(tf.io.fromMemory(saved!))).optimizer as RemoteASGD;
      assert.equal(Reflect.get(third.client.http, 'token'), 'token-from-the-environment');
      // Client options whose token is unset (the README's `{ token: process.env.MY_ASGD_TOKEN }`): the environment's still.
      RemoteASGD.clientOptions = { token: undefined, timeoutMs: 12_345 };
      const fourth = (await tf.loadLayersModel(tf.io.fromMemory(saved!))).optimizer as RemoteASGD;
      const options = Reflect.get(fourth.client.http, 'options') as { timeoutMs?: number };
      assert.deepEqual([Reflect.get(fourth.client.http, 'token'), options.timeoutMs], ['token-from-the-environment', 12_345]);
      // Every client takes it when given no token, as the Python client does: a RemoteASGD made from a URL
      // (found by a review: the README's snippet answered 401 with ASGD_TOKEN exported) and a plain client.
      // null or '' means none.
      const fromUrl = new RemoteASGD({ client: client.http.baseUrl, session });
      assert.equal(Reflect.get(fromUrl.client.http, 'token'), 'token-from-the-environment');
      assert.equal(Reflect.get(new ASGDClient(client.http.baseUrl).http, 'token'), 'token-from-the-environment');
      assert.equal(Reflect.get(new ASGDClient(client.http.baseUrl, { token: null }).http, 'token'), null);
      assert.equal(Reflect.get(new ASGDClient(client.http.baseUrl, { token: 'mine' }).http, 'token'), 'mine');
    } finally {
      RemoteASGD.clientOptions = undefined;
      if (before === undefined) delete process.env.ASGD_TOKEN;
      else process.env.ASGD_TOKEN = before;
    }
  });

  await t.test('attach to a session of other shapes: an error naming the parameter, both shapes and the session; no variable changed', async () => {
    const session = uniqueName('tfjs-shapes');
    await client.createSession({ name: session, params: [{ name: 'a', shape: [3], data: [1, 2, 3] }, { name: 'b', shape: [5], data: [1, 2, 3, 4, 5] }] });
    const a = tf.variable(tf.tensor1d([9, 9, 9]), true, 'shapes_a');
    const b = tf.variable(tf.tensor1d([7, 7]), true, 'shapes_b');
    const opt = new RemoteASGD({ client, session });
    await assert.rejects(opt.attach([a, b], ['a', 'b']), (err: Error) => {
      assert.equal(err.name, 'VariableShapeMismatch');
      assert.match(err.message, new RegExp(`session ${session}: parameter b is \\[5\\] in the session but the variable shapes_b is \\[2\\]`));
      return true;
    });
    assert.deepEqual(Array.from(a.dataSync()), [9, 9, 9], 'a variable before the mismatched one was overwritten');
    assert.deepEqual(Array.from(b.dataSync()), [7, 7]);
    assert.equal(opt.version, -1);
    // Not attached: training says so rather than stepping some of the variables.
    assert.throws(() => opt.applyGradients([{ name: 'shapes_a', tensor: tf.ones([3]) }]), /attach/);
    // A square kernel has the same shape transposed: that cannot be caught, hence the README's note on layouts.
    tf.dispose([a, b]);
  });
});

test('attach: a create whose answer was lost (a browser\'s bare "Failed to fetch") is sent again and the session joined', async () => {
  const { client } = await liveService();
  let lost = 0;
  // The first create reaches the service and lands; its answer is lost as a browser's fetch loses one.
  const losesCreate: typeof fetch = async (input, init) => {
    const res = await fetch(input, init);
    if (init?.method === 'POST' && String(input).endsWith('/v1/sessions') && lost++ === 0) throw new TypeError('Failed to fetch');
    return res;
  };
  const m = model(11);
  const name = uniqueName('tfjs-lost-create');
  const opt = new RemoteASGD({ client: new ASGDClient(client.http.baseUrl, { fetch: losesCreate, logger: null }), session: name, hyperparameters: { lr: 0.01 } });
  const session = await opt.attach(m.trainableWeights);
  assert.equal(lost, 2, 'sent again once');
  assert.equal(session.version, 1);
  const stored = await client.params(name);
  const initial = await variablesOf(m);
  for (const v of initial) assert.deepEqual(Array.from(stored.params[v.name].data), v.data);
});
