// RemoteASGD.attach as a user meets it: a big model's session created as safetensors (JSON has a limit
// that steps of that model do not), a session deleted and created again (or a database restored) joined
// at its own lower version, and a schedule that sets the same lr every batch records no change.
// Found by a review of the JavaScript client.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { BaseVersionAhead, StaleGradient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

const bitsOf = (data: ArrayLike<number>) => Array.from(new Uint32Array(Float32Array.from(data).buffer));

test('attach creates a missing session as safetensors: a model whose JSON would pass the service\'s JSON limit, bit for bit', async () => {
  // The service's JSON limit at 1 MiB: 300,000 parameters are ~3-6 MB as JSON, 1.2 MB as safetensors.
  const { client } = await liveService({}, { ASGD_BODY_LIMIT_JSON: String(1024 * 1024) });
  const big = tf.variable(tf.randomNormal([300, 1000], 0, 0.1, 'float32', 3), true, 'big');
  const small = tf.variable(tf.tensor1d([-0, 1e-45, 3.4e38]), true, 'small'); // -0, a subnormal, near the largest
  const name = uniqueName('tfjs-big');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.01 }, sessionSettings: { snapshot_every: 7 } });
  const session = await opt.attach([big, small]);
  assert.equal(session.version, 1);
  assert.deepEqual(session.params.map((p) => p.name), ['big', 'small'], 'in the variables\' order');
  assert.equal(session.snapshot_every, 7);
  assert.equal(session.param_groups[0].lr, 0.01);
  const stored = await client.params(name, { format: 'safetensors' });
  assert.deepEqual(bitsOf(stored.params.big.data), bitsOf(await big.data()));
  assert.deepEqual(bitsOf(stored.params.small.data), bitsOf(await small.data()));
});

test('attach keeps the variables\' order for integer-like parameter names', async () => {
  const { client } = await liveService();
  const name = uniqueName('tfjs-order');
  const a = tf.variable(tf.tensor1d([1, 2]), true, 'a');
  const b = tf.variable(tf.tensor1d([3]), true, 'b');
  const session = await new RemoteASGD({ client, session: name }).attach([a, b], ['10', '2']);
  assert.deepEqual(session.params.map((p) => p.name), ['10', '2']);
  assert.deepEqual(Array.from((await client.params(name)).params['10'].data), [1, 2]);
});

test('attach to a session deleted and created again takes its parameters at its version (the name\'s versions go on), and training goes on', async () => {
  const { client } = await liveService({ logger: null });
  const name = uniqueName('tfjs-again');
  const w = tf.variable(tf.zeros([2]), true, 'w-again');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  await opt.attach([w], ['w']);
  const loss = () => w.sub(tf.tensor1d([1, 1])).square().sum() as tf.Scalar;
  for (let i = 0; i < 5; i++) {
    opt.minimize(loss, false, [w]);
    await opt.synchronize();
  }
  assert.equal(opt.version, 6);
  await client.deleteSession(name);
  await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [42, 43] }], hyperparameters: { lr: 0.1 } });
  const session = await opt.attach([w], ['w']);
  assert.equal(session.version, 7);
  assert.equal(opt.version, 7);
  assert.deepEqual(Array.from(await w.data()), [42, 43], 'the new session\'s parameters are in the variable');
  opt.minimize(loss, false, [w]);
  await opt.synchronize();
  assert.equal(opt.version, 8);
  const stored = await client.params(name);
  assert.deepEqual(bitsOf(stored.params.w.data), bitsOf(await w.data()));
  assert.ok(Math.abs(stored.params.w.data[0] - 42) > 1, 'stepped from 42');

  // pull() likewise, after the session was replaced under a running optimizer.
  await client.deleteSession(name);
  await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [7, 8] }] });
  assert.equal(await opt.pull(), 9);
  assert.deepEqual(Array.from(await w.data()), [7, 8]);
});

test('a step to a session replaced under a running optimizer drops its gradient, takes the new session\'s parameters and training goes on; onStale raise throws StaleGradient, or BaseVersionAhead after a restored database', async () => {
  const warnings: string[] = [];
  const { client } = await liveService({ logger: { warn: (m: string) => warnings.push(m), info: () => {} } });
  const name = uniqueName('tfjs-replaced');
  const w = tf.variable(tf.zeros([2]), true, 'w-replaced');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.1 } });
  await opt.attach([w], ['w']);
  const loss = () => w.sub(tf.tensor1d([1, 1])).square().sum() as tf.Scalar;
  for (let i = 0; i < 5; i++) opt.minimize(loss, false, [w]);
  await opt.synchronize();
  assert.equal(opt.version, 6);
  await client.deleteSession(name);
  // Created again: it continues the name's versions (7), and a gradient of the deleted one's is of replaced state.
  await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [42, 43] }], hyperparameters: { lr: 0.1 } });

  opt.minimize(loss, false, [w]); // computed at version 6 of the old session: dropped
  await opt.synchronize();
  assert.equal(opt.version, 7, 'the new session\'s version');
  assert.deepEqual(Array.from(await w.data()), [42, 43], 'its parameters are in the variable');
  assert.ok(warnings.some((m) => m.includes(`session ${name}: gradient dropped as stale`) && m.includes('replaced at version 7')), warnings.join('\n'));
  for (let i = 0; i < 3; i++) opt.minimize(loss, false, [w]);
  await opt.synchronize();
  assert.equal(opt.version, 10);
  const stored = await client.params(name);
  assert.equal(stored.version, 10);
  assert.deepEqual(bitsOf(stored.params.w.data), bitsOf(await w.data()));
  assert.ok(stored.params.w.data[0] < 42, 'stepped from 42');

  const strict = new RemoteASGD({ client, session: name, onStale: 'raise' });
  await strict.attach([w], ['w']);
  await client.deleteSession(name);
  await client.createSession({ name, params: [{ name: 'w', shape: [2], data: [7, 8] }] });
  strict.minimize(loss, false, [w]);
  await assert.rejects(strict.synchronize(), (err: unknown) => err instanceof StaleGradient && err.status === 409 && err.version === 11
    && (err.body as { replaced_at?: number }).replaced_at === 11);
  // A database restored from an older backup: the session is below the version the optimizer holds.
  const restored = new RemoteASGD({ client, session: name, onStale: 'raise' });
  await restored.attach([w], ['w']);
  restored.version = 60;
  restored.minimize(loss, false, [w]);
  await assert.rejects(restored.synchronize(), (err: unknown) => err instanceof BaseVersionAhead && err.status === 409 && err.version === 11
    && err.serviceMessage === "base_version: 60 is newer than the session's version 11");
});

test('nextParamGroups: only values that differ from the session\'s are sent; a schedule that repeats its lr records one change', async () => {
  const { client } = await liveService();
  const name = uniqueName('tfjs-sched');
  const w = tf.variable(tf.zeros([2]), true, 'w-sched');
  const opt = new RemoteASGD({ client, session: name, hyperparameters: { lr: 0.05 } });
  await opt.attach([w], ['w']);
  const loss = () => w.sub(tf.tensor1d([1, 1])).square().sum() as tf.Scalar;
  const lrs = [0.05, 0.05, 0.05, 0.02, 0.02, 0.02, 0.05];
  for (const lr of lrs) {
    opt.nextParamGroups = [{ lr, alpha: 0.75 }]; // alpha: the session's value all along
    opt.minimize(loss, false, [w]);
    await opt.synchronize();
    assert.equal(opt.lastStep?.param_groups?.[0].lr, lr);
  }
  const changes = (await client.http.json<{ changes: { version: number; param_groups: { lr: number }[] }[] }>({ method: 'GET', path: `/v1/sessions/${name}/hyperparameters` })).value.changes;
  assert.deepEqual(changes.map((c) => [c.version, c.param_groups[0].lr]), [[5, 0.02], [8, 0.05]]);
});
