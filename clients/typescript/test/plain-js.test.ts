// What plain JavaScript (no type checker) and a page that is not a secure context meet: gradients in forms
// the types forbid get an error that says what to pass; a NaN metric is named before anything is sent; and
// without crypto.randomUUID (plain http from another host than localhost) steps still get their keys.
// Found by a review of the client as a TensorFlow.js user.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

test('without crypto.randomUUID (an insecure context) RemoteASGD is built and steps carry random UUID keys', async (t) => {
  const { url } = await liveService();
  const keys: string[] = [];
  const recording: typeof fetch = (input, init) => {
    const key = new Headers(init?.headers).get('idempotency-key');
    if (key) keys.push(key);
    return fetch(input, init);
  };
  const client = new ASGDClient(url, { fetch: recording, logger: null });
  const proto = Object.getPrototypeOf(crypto);
  const saved = Object.getOwnPropertyDescriptor(proto, 'randomUUID')!;
  delete proto.randomUUID;
  t.after(() => Object.defineProperty(proto, 'randomUUID', saved));
  assert.equal(typeof crypto.randomUUID, 'undefined');
  const name = uniqueName('insecure');
  const w = tf.variable(tf.tensor1d([1, 2]), true, 'w-insecure');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  assert.match(opt.worker, /^js-[0-9a-f]{12}$/);
  await opt.attach([w], ['w']);
  for (let i = 0; i < 3; i++) {
    opt.minimize(() => w.square().sum() as tf.Scalar, false, [w]);
    await opt.synchronize();
  }
  assert.equal((await client.getSession(name)).step, 3);
  await client.step(name, { w: [0.5, 0.5] });
  assert.equal(keys.length, 4);
  for (const key of keys) assert.match(key, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(new Set(keys).size, 4);
  w.dispose();
});

test('gradients and tensors in forms the types forbid: an error that names the field and what to pass; a NaN metric is named', async () => {
  const { client } = await liveService();
  const name = uniqueName('plain-js');
  await client.createSession({ name, params: [{ name: 'w', shape: [2, 2], data: [1, 2, 3, 4] }] });
  const x = tf.ones([2, 2]);
  const cases: [() => Promise<unknown>, RegExp][] = [
    [() => client.step(name, { w: x } as never), /^grads\.w: expected a Float32Array, a number\[\] or \{shape, data\}, got a tf\.Tensor: pass \{shape: t\.shape, data: t\.dataSync\(\)\}$/],
    [() => client.step(name, { w: x } as never, { format: 'json' }), /^grads\.w: .* got a tf\.Tensor/],
    [() => client.step(name, { w: new Float64Array(4) } as never), /^grads\.w: .* got a Float64Array: pass Float32Array\.from\(it\)$/],
    [() => client.step(name, { w: null } as never), /^grads\.w: .* got null$/],
    [() => client.step(name, { w: x.arraySync() } as never), /^grads\.w: a nested array \(as tensor\.arraySync\(\) gives\): pass the values flat/],
    [() => client.step(name, { w: { shape: [2, 2], data: [[1, 2], [3, 4]] } } as never), /^grads\.w: a nested array/],
    [() => client.createSessionFromTensors(uniqueName('flat'), { a: [1, 2] } as never), /^a: expected \{shape, data\} .* got flat data: give its shape/],
    [() => client.step(name, { w: [1, 2, 3, 4] }, { metrics: { loss: NaN } }), /^metrics\.loss: must be a finite number, got NaN$/],
    [() => client.step(name, { w: [1, 2, 3, 4] }, { metrics: { loss: '0.5' } } as never), /^metrics\.loss: must be a finite number, got string$/],
  ];
  for (const [call, message] of cases) await assert.rejects(call(), (err: Error) => err instanceof TypeError && message.test(err.message), String(message));
  const session = await client.getSession(name);
  assert.equal(session.version, 1, 'nothing was sent');
  x.dispose();
});

test('a loop that never waits for its steps (trainOnBatch alone) is warned about once; model.fit with the callback is not', async () => {
  const { url } = await liveService();
  const run = async (how: 'trainOnBatch' | 'fit') => {
    const warnings: string[] = [];
    const client = new ASGDClient(url, { logger: { warn: (m: string) => warnings.push(m), info: () => {} } });
    const model = tf.sequential({ layers: [tf.layers.dense({ units: 1, inputShape: [2] })] });
    const opt = new RemoteASGD({ client, session: uniqueName(`behind-${how}`), hyperparameters: { lr: 0.01 } });
    await opt.attach(model.trainableWeights);
    model.compile({ optimizer: opt, loss: 'meanSquaredError' });
    const xs = tf.tensor2d([[1, 2], [3, 4]]);
    const ys = tf.tensor2d([[1], [2]]);
    if (how === 'fit') await model.fit(xs, ys, { epochs: 4, batchSize: 2, verbose: 0, callbacks: [opt.callback] });
    else for (let i = 0; i < 4; i++) await model.trainOnBatch(xs, ys);
    await opt.synchronize();
    tf.dispose([xs, ys]);
    model.dispose();
    return warnings.filter((w) => /still in flight/.test(w));
  };
  const behind = await run('trainOnBatch');
  assert.equal(behind.length, 1, behind.join('\n'));
  assert.match(behind[0], /await optimizer\.synchronize\(\) after each minimize or trainOnBatch/);
  assert.deepEqual(await run('fit'), []);
});
