// A restore or a state load replaces the session's state: a gradient computed before it (its base_version
// older than that version) is of parameters the session's history no longer holds. Applied, a worker's
// gradient from a diverged model would land on the state rolled back to get away from it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, randomData } from '../helper.ts';

const params = [{ name: 'w', shape: [3, 4], data: randomData(12, 1) }, { name: 'b', shape: [4], data: randomData(4, 2) }];
const grads = (k: number) => ({ w: randomData(12, 100 + k), b: randomData(4, 200 + k) });

test('a gradient computed before a restore or a state load is refused as stale (409 STALE_GRADIENT naming the replacing version); after a PUT params it is not', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'r', params } })).statusCode, 201);
  const step = (base: number | null, k: number) =>
    app.inject({ method: 'POST', url: `/v1/sessions/r/step${base === null ? '' : `?base_version=${base}`}`, payload: { grads: grads(k) } });
  const session = async () => (await app.inject({ url: '/v1/sessions/r' })).json() as { version: number; step: number };
  const paramsNow = async () => (await app.inject({ url: '/v1/sessions/r/params' })).json().params;

  for (let k = 1; k <= 2; k++) assert.equal((await step(k, k)).statusCode, 200);
  const snapshot = (await app.inject({ method: 'POST', url: '/v1/sessions/r/snapshots', payload: {} })).json();
  assert.equal((await step(3, 3)).statusCode, 200);
  assert.equal((await step(4, 4)).statusCode, 200);
  const before = await session(); // version 5
  const restored = await app.inject({ method: 'POST', url: `/v1/sessions/r/snapshots/${snapshot.id}/restore` });
  assert.equal(restored.statusCode, 200);
  const replacedAt = restored.json().version;
  assert.equal(replacedAt, before.version + 1);
  const atRestore = await paramsNow();

  // A worker that computed its gradient on the version before the restore (and one further back).
  for (const base of [before.version, 3, 1]) {
    const stale = await step(base, 10 + base);
    assert.equal(stale.statusCode, 409, stale.body);
    const body = stale.json();
    assert.equal(body.code, 'STALE_GRADIENT');
    assert.match(body.message, new RegExp(`^base_version: the gradient was computed at version ${base}, before the session's state was replaced at version ${replacedAt} \\(a restore`));
    assert.equal(body.version, replacedAt);
    assert.equal(body.replaced_at, replacedAt);
    assert.equal(body.max_staleness, null);
  }
  // Nothing of them was applied.
  assert.deepEqual(await session().then((s) => s.version), replacedAt);
  assert.deepEqual(await paramsNow(), atRestore);
  // Computed on the restored state, or sent without a base_version: applied.
  assert.equal((await step(replacedAt, 20)).statusCode, 200);
  assert.equal((await step(null, 21)).statusCode, 200);
  const v = (await session()).version;
  assert.equal(v, replacedAt + 2);

  // A state_dict load replaces the state too.
  const sd = (await app.inject({ url: '/v1/sessions/r/state_dict' })).json();
  const loaded = await app.inject({ method: 'PUT', url: '/v1/sessions/r/state_dict', payload: sd });
  assert.equal(loaded.statusCode, 200, loaded.body);
  const loadedAt = loaded.json().version;
  assert.equal(loadedAt, v + 1);
  const afterLoad = await step(v, 30);
  assert.equal(afterLoad.statusCode, 409);
  assert.equal(afterLoad.json().replaced_at, loadedAt);
  assert.equal((await step(loadedAt, 31)).statusCode, 200);

  // PUT params (a worker's edit: a clamp, a mask) keeps the history: gradients from before it still go in.
  const edited = Object.fromEntries(Object.entries(await paramsNow()).map(([name, t]) => [name, { ...(t as object), data: (t as { data: number[] }).data.map((x) => Math.max(-0.1, Math.min(0.1, x))) }]));
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/r/params', payload: { params: edited } });
  assert.equal(put.statusCode, 200, put.body);
  const editedAt = put.json().version;
  assert.equal((await step(editedAt - 1, 40)).statusCode, 200);

  // The refusal holds across a batch of steps committed together: the one from before the restore is
  // refused, the one after it applied, whatever their order in the batch.
  const again = (await app.inject({ method: 'POST', url: `/v1/sessions/r/snapshots/${snapshot.id}/restore` })).json().version;
  const [old, fresh] = await Promise.all([step(again - 1, 50), step(again, 51)]);
  assert.deepEqual([old.statusCode, fresh.statusCode], [409, 200], `${old.body} ${fresh.body}`);
  assert.equal((await session()).version, again + 1);
});
