// Variables edited outside RemoteASGD (v.assign, model.setWeights, a clamp) are what the next step applies
// to, as torch.optim.ASGD steps edited weights: the optimizer sends them (PUT params) before the step.
// Found by a review of the JavaScript client: the edit was overwritten by the next answer, and the gradient
// (computed on the edited values) was applied to the old ones.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { StaleGradient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

const bitsOf = (data: ArrayLike<number>) => Array.from(new Uint32Array(Float32Array.from(data).buffer));
const target = tf.tensor1d([0.25, -1.5, 3]);

test('an edited variable is sent before the next step, which applies to it: equal bit for bit to the same edit and steps made by hand', async () => {
  const { client } = await liveService({ logger: null });
  const name = uniqueName('tfjs-edit');
  const ref = uniqueName('tfjs-edit-ref');
  const start = [1, 2, 3];
  const v = tf.variable(tf.tensor1d(start), true, 'v-edit');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1, t0: 1, weight_decay: 0.01 } });
  await opt.attach([v], ['v']);
  await client.createSession({ name: ref, params: [{ name: 'v', shape: [3], data: start }], hyperparameters: { lr: 0.1, t0: 1, weight_decay: 0.01 } });
  const loss = () => v.sub(target).square().sum() as tf.Scalar;
  const gradAt = (values: number[]) => Array.from(tf.tensor1d(values).sub(target).mul(2).dataSync());

  opt.minimize(loss, false, [v]);
  await opt.synchronize();
  await client.step(ref, { v: gradAt(start) });
  assert.deepEqual(bitsOf(await v.data()), bitsOf((await client.params(ref)).params.v.data));

  // Edited in place: the next gradient is computed on the edit and applied to it.
  const edit = [0, -0.5, 7];
  v.assign(tf.tensor1d(edit));
  opt.minimize(loss, false, [v]);
  await opt.synchronize();
  await client.loadParams(ref, { v: edit });
  await client.step(ref, { v: gradAt(edit) });
  const expected = await client.params(ref);
  assert.deepEqual(bitsOf(await v.data()), bitsOf(expected.params.v.data), 'the step applied to the edited values');
  const stored = await client.params(name);
  assert.deepEqual(bitsOf(stored.params.v.data), bitsOf(expected.params.v.data));
  assert.equal(stored.version, 4, 'create, step, the edit, step');
  assert.equal(opt.version, 4);
  // The optimizer state went on as one run (the edit leaves step, eta, mu and ax to the session).
  assert.deepEqual((await client.stateDict(name)).state, (await client.stateDict(ref)).state);

  // Nothing edited: nothing more is sent than the step.
  opt.minimize(loss, false, [v]);
  await opt.synchronize();
  assert.equal((await client.params(name)).version, 5);
});

test('an element edited while its step is in flight keeps its value over that step\'s answer and is sent with the next step', async () => {
  const { client } = await liveService({ logger: null });
  const name = uniqueName('tfjs-edit-flight');
  const v = tf.variable(tf.tensor1d([1, 2, 3]), true, 'v-flight');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  await opt.attach([v], ['v']);
  const loss = () => v.sub(target).square().sum() as tf.Scalar;
  opt.minimize(loss, false, [v]); // sent; its answer is written at synchronize()
  v.assign(tf.tensor1d([9, 2, 3])); // element 0 edited meanwhile
  await opt.synchronize();
  const answered = (await client.params(name)).params.v.data;
  const now = Array.from(await v.data());
  assert.equal(now[0], 9, 'the edited element keeps its value');
  assert.deepEqual(bitsOf(now.slice(1)), bitsOf(Array.from(answered).slice(1)), 'the others take the step\'s result');
  opt.minimize(loss, false, [v]);
  await opt.synchronize();
  const stored = await client.params(name);
  assert.equal(stored.version, 4, 'step, the edit, step');
  assert.deepEqual(bitsOf(await v.data()), bitsOf(stored.params.v.data));
  assert.ok(Math.abs(stored.params.v.data[0] - 9) < 2, `stepped from 9: ${stored.params.v.data[0]}`);
});

test('an edit made while other workers stepped the session replaces only the elements it changed (412, then sent at the newer version)', async () => {
  const { client } = await liveService({ logger: null });
  const name = uniqueName('tfjs-edit-412');
  const ref = uniqueName('tfjs-edit-412-ref');
  const v = tf.variable(tf.tensor1d([1, 2, 3]), true, 'v-412');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  await opt.attach([v], ['v']);
  await client.createSession({ name: ref, params: [{ name: 'v', shape: [3], data: [1, 2, 3] }], hyperparameters: { lr: 0.1 } });
  const other = [0.5, -0.25, 1];
  await client.step(name, { v: other }); // another worker: version 2, which this optimizer has not seen
  await client.step(ref, { v: other });
  const stepped = (await client.params(ref)).params.v.data;
  v.assign(tf.tensor1d([5, 2, 3]));
  const loss = () => v.sub(target).square().sum() as tf.Scalar;
  opt.minimize(loss, false, [v]); // its gradient is computed on [5, 2, 3]
  await opt.synchronize();
  await client.loadParams(ref, { v: [5, stepped[1], stepped[2]] });
  await client.step(ref, { v: Array.from(tf.tensor1d([5, 2, 3]).sub(target).mul(2).dataSync()) });
  const expected = await client.params(ref);
  const stored = await client.params(name);
  assert.equal(stored.version, 4, 'the other step, the edit, this step');
  assert.deepEqual(bitsOf(stored.params.v.data), bitsOf(expected.params.v.data));
  assert.deepEqual(bitsOf(await v.data()), bitsOf(expected.params.v.data));
});

test('a gradient computed before other workers stepped keeps its base_version after an edit is sent: max_staleness still refuses it', async () => {
  // Found by a review: the step took the version the edit made, and a stale gradient went in as fresh.
  const { client } = await liveService({ logger: null });
  const name = uniqueName('tfjs-edit-stale');
  const v = tf.variable(tf.tensor1d([1, 2, 3]), true, 'v-edit-stale');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 }, sessionSettings: { max_staleness: 0 }, onStale: 'raise' });
  await opt.attach([v], ['v']);
  const loss = () => v.sub(target).square().sum() as tf.Scalar;
  // Alone, an edit and a step at the version the edit made: fresh, applied.
  v.assign(tf.tensor1d([1, 2, 2.5]));
  opt.minimize(loss, false, [v]);
  await opt.synchronize();
  assert.equal((await client.params(name)).version, 3, 'the edit, then the step');
  // Another worker steps first: this gradient is one version old, edit or not.
  await client.step(name, { v: [0.5, 0.5, 0.5] });
  v.assign(tf.tensor1d([1, 2, 2]));
  opt.minimize(loss, false, [v]);
  await assert.rejects(opt.synchronize(), StaleGradient);
});

test('an edit merged with other workers\' steps (412) is said as such, not as an edit made while a step was in flight', async () => {
  // Found by a review: the merge logged "v changed while a step was in flight" when no step was.
  const said: string[] = [];
  const { client } = await liveService({ logger: { warn: (m) => said.push(m), info: (m) => said.push(m) } });
  const name = uniqueName('tfjs-edit-said');
  const v = tf.variable(tf.tensor1d([1, 2, 3]), true, 'v-said');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  await opt.attach([v], ['v']);
  await client.step(name, { v: [0.5, -0.25, 1] }); // another worker: version 2
  v.assign(tf.tensor1d([5, 2, 3]));
  opt.minimize(() => v.sub(target).square().sum() as tf.Scalar, false, [v]);
  await opt.synchronize();
  const merged = said.filter((m) => m.includes('v changed'));
  assert.equal(merged.length, 1, said.join('\n'));
  assert.doesNotMatch(merged[0], /while a step was in flight/);
  assert.match(merged[0], /v changed outside the optimizer while other workers stepped the session \(version 1 to 2\)/);
  assert.ok(said.some((m) => /parameters changed outside the optimizer \(v\); sent the variables' values \(version 3\)/.test(m)), said.join('\n'));
});
