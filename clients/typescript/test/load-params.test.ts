// loadParams: PUT params through the client; the weights change, the optimizer state does not.
import assert from 'node:assert/strict';
import test from 'node:test';
import { ASGDClient, ShapeMismatch, UnknownParameter, VersionMismatch } from '../src/index.ts';
import { liveService, uniqueName } from './service.ts';

test('loadParams replaces the weights and keeps the optimizer state', async () => {
  const { client } = await liveService({ retryBudgetMs: 10_000 });
  const name = uniqueName('load-params');
  await client.createSession({ name, params: [{ name: 'w', shape: [2, 2], data: [0.1, 0.2, 0.3, 0.4] }, { name: 'b', shape: [2], data: [0, 0.5] }], hyperparameters: { lr: 0.1, t0: 1 } });
  await client.step(name, { w: [0.5, -0.5, 0.25, 1], b: [0.1, 0.2] });
  const stateBefore = await client.stateDict(name);

  // Clipped weights: a tensor and a flat list (the session's shape), as safetensors.
  const clipped = await client.loadParams(name, { w: { shape: [2, 2], data: Float32Array.from([0.05, 0.05, 0.05, -0.05]) }, b: [0, 0.05] }, { ifMatch: 2 });
  assert.equal(clipped.version, 3);
  assert.equal(clipped.step, 1);
  const read = await client.params(name, { format: 'json' });
  assert.deepEqual(Array.from(read!.params.w.data), Array.from(Float32Array.from([0.05, 0.05, 0.05, -0.05])));
  assert.deepEqual(read!.params.w.shape, [2, 2]);
  assert.deepEqual(Array.from(read!.params.b.data), [0, Math.fround(0.05)]);
  assert.deepEqual(await client.stateDict(name), stateBefore);

  const json = await client.loadParams(name, { w: [1, 2, 3, 4], b: [5, 6] }, { format: 'json' });
  assert.equal(json.version, 4);
  assert.deepEqual(Array.from((await client.params(name))!.params.b.data), [5, 6]);

  await assert.rejects(client.loadParams(name, { w: [1, 2, 3, 4], b: [5, 6] }, { ifMatch: 2 }), VersionMismatch);
  await assert.rejects(client.loadParams(name, { w: [1, 2, 3, 4], b: [5, 6], c: { shape: [1], data: [0] } }), UnknownParameter);
  assert.equal((await client.getSession(name)).version, 4);
});

test('a session made again by another client with other shapes of the same sizes: flat data takes the new shapes (read again on SHAPE_MISMATCH), steps and loadParams go on', async () => {
  const { client, url } = await liveService({ retryBudgetMs: 10_000 });
  const other = new ASGDClient(url, { retryBudgetMs: 10_000 });
  const name = uniqueName('reshaped');
  await client.createSession({ name, params: [{ name: 'w', shape: [2, 2], data: [1, 2, 3, 4] }], hyperparameters: { lr: 0.5 } });
  assert.equal((await client.step(name, { w: [0, 0, 0, 0] })).version, 2); // the client now knows w as [2, 2]
  await other.deleteSession(name);
  await other.createSession({ name, params: [{ name: 'w', shape: [4], data: [1, 2, 3, 4] }], hyperparameters: { lr: 0.5 } });
  const stepped = await client.step(name, { w: Float32Array.from([2, 2, 2, 2]) });
  assert.equal(stepped.version, 4, 'the new session goes on from the deleted one\'s version 2');
  const read = await other.params(name, { format: 'json' });
  assert.deepEqual(read!.params.w.shape, [4]);
  assert.notDeepEqual(Array.from(read!.params.w.data), [1, 2, 3, 4]);

  await other.deleteSession(name);
  await other.createSession({ name, params: [{ name: 'w', shape: [1, 4], data: [1, 2, 3, 4] }] });
  const loaded = await client.loadParams(name, { w: [9, 8, 7, 6] }, { format: 'json' });
  assert.equal(loaded.version, 6);
  assert.deepEqual((await other.params(name, { format: 'json' }))!.params.w, { shape: [1, 4], data: Float32Array.from([9, 8, 7, 6]) });

  // A gradient of the wrong shape given with its shape is refused as it was (one request, nothing read again).
  await assert.rejects(client.step(name, { w: { shape: [4], data: [1, 1, 1, 1] } }), ShapeMismatch);
  assert.equal((await other.getSession(name)).version, 6);
});

test('several steps in flight when the session was made again with other shapes: each is sent again with the new shapes', async () => {
  const { client, url } = await liveService({ retryBudgetMs: 10_000 });
  const other = new ASGDClient(url, { retryBudgetMs: 10_000 });
  const name = uniqueName('reshaped-many');
  await client.createSession({ name, params: [{ name: 'w', shape: [2, 2], data: [1, 2, 3, 4] }] });
  await client.step(name, { w: [0, 0, 0, 0] });
  await other.deleteSession(name);
  await other.createSession({ name, params: [{ name: 'w', shape: [4], data: [1, 2, 3, 4] }] });
  const answers = await Promise.all([1, 2, 3, 4].map(() => client.step(name, { w: [1, 1, 1, 1] })));
  assert.deepEqual(answers.map((a) => a.version).sort(), [4, 5, 6, 7]); // created at 3, after the deleted one's 2
  assert.equal((await other.getSession(name)).step, 4);
});
