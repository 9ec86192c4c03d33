import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, onDatabase, randomData, TEST_DB_KIND } from '../helper.ts';

const params = [{ name: 'w', shape: [33], data: randomData(33, 31) }, { name: 'b', shape: [2, 3], data: randomData(6, 32) }];
const grads = (k: number) => ({ w: randomData(33, 700 + k), b: randomData(6, 800 + k) });

async function stepN(app: Awaited<ReturnType<typeof buildTestApp>>['app'], name: string, from: number, to: number) {
  for (let k = from; k < to; k++) {
    const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: grads(k) } });
    assert.equal(res.statusCode, 200, res.body);
  }
}

test('state at old versions is rebuilt from snapshots and the log, bit for bit', async (t) => {
  const { app } = await buildTestApp(t);
  await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'h', params, hyperparameters: { t0: 2 }, snapshot_every: 4 } });
  const answers = new Map<number, string>();
  for (let k = 0; k < 11; k++) {
    await stepN(app, 'h', k, k + 1);
    await app.sessions.pendingSnapshots();
    const sd = await app.inject({ url: '/v1/sessions/h/state_dict' });
    const p = await app.inject({ url: '/v1/sessions/h/params' });
    answers.set(Number(sd.headers['x-session-version']), sd.body + p.json().params.w.data.join());
  }
  const snaps = (await app.inject({ url: '/v1/sessions/h/snapshots' })).json().snapshots;
  assert.deepEqual(snaps.map((s: { version: number }) => s.version), [9, 5, 1], 'auto snapshots every 4 steps plus the one at creation');
  assert.ok(snaps.every((s: { checksum: string }) => /^sha256:[0-9a-f]{64}$/.test(s.checksum)));
  app.sessions.dropCache(); // as a process that never held it: rebuild from snapshot + log
  for (const [version, expected] of answers) {
    const sd = await app.inject({ url: `/v1/sessions/h/state_dict?version=${version}` });
    const p = await app.inject({ url: `/v1/sessions/h/params?version=${version}` });
    assert.equal(sd.statusCode, 200, sd.body);
    assert.equal(sd.body + p.json().params.w.data.join(), expected, `version ${version}`);
  }
  const missing = await app.inject({ url: '/v1/sessions/h/state_dict?version=99' });
  assert.equal(missing.statusCode, 404);
  assert.equal(missing.json().code, 'VERSION_NOT_AVAILABLE');
  // Ahead of the session, not pruned: said so (it spoke of snapshots at or below it; found by a review).
  assert.match(missing.json().message, /^version: 99 is not available: the session is at version \d+$/);
});

test('manual snapshots, pinning, retention, restore and fork', async (t) => {
  const { app } = await buildTestApp(t);
  await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'r', params, snapshot_every: 1000, keep_snapshots: 2 } });
  await stepN(app, 'r', 0, 3);
  const pinned = await app.inject({ method: 'POST', url: '/v1/sessions/r/snapshots', payload: { pinned: true } });
  assert.equal(pinned.statusCode, 201, pinned.body);
  assert.equal(pinned.json().version, 4);
  assert.equal(pinned.json().pinned, true);
  const atPin = (await app.inject({ url: '/v1/sessions/r/state_dict' })).body;
  const paramsAtPin = (await app.inject({ url: '/v1/sessions/r/params' })).body;
  for (let k = 3; k < 9; k += 2) {
    await stepN(app, 'r', k, k + 2);
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/r/snapshots' })).statusCode, 201);
  }
  // keep_snapshots=2: the newest two and the pinned one survive; the creation snapshot is gone.
  const list = (await app.inject({ url: '/v1/sessions/r/snapshots' })).json().snapshots;
  assert.deepEqual(list.map((s: { version: number; pinned: boolean }) => [s.version, s.pinned]), [[10, false], [8, false], [4, true]]);
  // The pinned snapshot's files are still downloadable.
  const dl = await app.inject({ url: `/v1/sessions/r/snapshots/${pinned.json().id}/state_dict` });
  assert.equal(dl.body, atPin);
  // Roll back to it: a new version with the old state.
  const restored = await app.inject({ method: 'POST', url: `/v1/sessions/r/snapshots/${pinned.json().id}/restore` });
  assert.equal(restored.statusCode, 200, restored.body);
  assert.equal(restored.json().version, 11);
  assert.equal(restored.json().step, 3);
  assert.equal((await app.inject({ url: '/v1/sessions/r/state_dict' })).body, atPin);
  assert.equal((await app.inject({ url: '/v1/sessions/r/params' })).json().params.w.data.join(), JSON.parse(paramsAtPin).params.w.data.join());
  // Fork from the pinned snapshot; both step on identically.
  const fork = await app.inject({ method: 'POST', url: '/v1/sessions/r/fork', payload: { name: 'r2', snapshot: pinned.json().id } });
  assert.equal(fork.statusCode, 201, fork.body);
  assert.equal(fork.json().version, 1);
  assert.equal(fork.json().step, 3);
  await stepN(app, 'r', 100, 103);
  await stepN(app, 'r2', 100, 103);
  assert.equal((await app.inject({ url: '/v1/sessions/r2/state_dict' })).body, (await app.inject({ url: '/v1/sessions/r/state_dict' })).body);
  // Unpin; errors.
  assert.equal((await app.inject({ method: 'PATCH', url: `/v1/sessions/r/snapshots/${pinned.json().id}`, payload: { pinned: false } })).json().pinned, false);
  assert.equal((await app.inject({ url: '/v1/sessions/r/snapshots/999999' })).json().code, 'SNAPSHOT_NOT_FOUND');
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/r/snapshots/999999/restore' })).statusCode, 404);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/r/fork', payload: { name: 'r2' } })).json().code, 'SESSION_EXISTS');
  assert.equal((await app.inject({ url: '/v1/sessions/r/snapshots/abc' })).statusCode, 400);
});

test('two processes on one database step one session alternately and equal one process', async (t) => {
  const a = await buildTestApp(t);
  if (!a.databaseUrl) return t.skip('needs PostgreSQL (several processes cannot share an embedded database)');
  const b = await buildTestApp(t, { databaseUrl: a.databaseUrl });
  const solo = await buildTestApp(t);
  for (const app of [a.app, solo.app]) {
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'm', params, hyperparameters: { t0: 3 }, snapshot_every: 5 } })).statusCode, 201);
  }
  for (let k = 0; k < 24; k++) {
    const app = k % 3 === 0 ? b.app : a.app; // b falls behind by two steps each time: it catches up from the log
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/m/step', payload: { grads: grads(k) } });
    assert.equal(res.statusCode, 200, res.body);
    assert.equal(res.json().version, k + 2);
    await stepN(solo.app, 'm', k, k + 1);
  }
  const expected = (await solo.app.inject({ url: '/v1/sessions/m/state_dict' })).body;
  assert.equal((await a.app.inject({ url: '/v1/sessions/m/state_dict' })).body, expected);
  assert.equal((await b.app.inject({ url: '/v1/sessions/m/state_dict' })).body, expected);
  const pa = (await a.app.inject({ url: '/v1/sessions/m/params' })).json();
  const ps = (await solo.app.inject({ url: '/v1/sessions/m/params' })).json();
  assert.deepEqual(pa.params, ps.params);
});

test('a manual snapshot of a copy rebuilt after a settings change, then another change, is written (was 503 until the next step)', async (t) => {
  // Found by a review: a copy rebuilt after a PATCH of the session's settings was stamped with that
  // change's stamp; the next PATCH moved the row's stamp, and the snapshot's check that the copy is of the
  // database's history failed three times: 503 with Retry-After, on every retry, until a step.
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params } })).statusCode, 201);
  await stepN(app, 's', 0, 1);
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/s', payload: { max_staleness: 5 } })).statusCode, 200);
  app.sessions.dropCache(); // as another process, or this one restarted
  const params2 = await app.inject({ url: '/v1/sessions/s/params' }); // the copy is rebuilt now
  assert.equal(params2.statusCode, 200);
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/s', payload: { max_staleness: 6 } })).statusCode, 200);
  const snap = await app.inject({ method: 'POST', url: '/v1/sessions/s/snapshots' });
  assert.equal(snap.statusCode, 201, snap.body);
  assert.equal(snap.json().version, 2);
  const state = await app.inject({ url: `/v1/sessions/s/snapshots/${snap.json().id}/params` });
  assert.deepEqual(state.json().params, params2.json().params, 'the snapshot holds the state');
});

test('a read of an older version, rebuilt, does not hold the session\'s steps back', {
  skip: TEST_DB_KIND !== 'postgres' && 'a second connection holds the rebuild: PostgreSQL only',
}, async (t) => {
  // A security review: ?version= reads rebuilt the state under the session's lock, one after another, and
  // thirty of them held a step of a big session for 10 s (a read-scope token could stall training). Here
  // the rebuild is held on a table lock taken by another connection; a step must be answered meanwhile.
  const { app, databaseUrl } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'o', params, snapshot_every: 1000 } })).statusCode, 201);
  await stepN(app, 'o', 0, 4); // versions 2..5
  const expected = (await app.inject({ url: '/v1/sessions/o/params?version=3' })).json();
  app.sessions.dropCache();
  await stepN(app, 'o', 4, 5); // a current copy again (version 6)
  await onDatabase(databaseUrl!, async (other) => {
    await other.query('BEGIN');
    await other.query('LOCK TABLE snapshot_chunks IN ACCESS EXCLUSIVE MODE');
    const reading = app.inject({ url: '/v1/sessions/o/params?version=3' });
    for (let i = 0; ; i++) {
      const [{ n }] = (await other.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")).rows;
      if (n > 0) break;
      assert.ok(i < 400, 'the rebuild did not reach the snapshot');
      await new Promise((r) => setTimeout(r, 25));
    }
    let bound: NodeJS.Timeout | undefined;
    const stepped = await Promise.race([
      app.inject({ method: 'POST', url: '/v1/sessions/o/step', payload: { grads: grads(5) } }).then((r) => r.statusCode),
      new Promise<string>((resolve) => (bound = setTimeout(() => resolve('still waiting after 20 s'), 20_000))),
    ]);
    clearTimeout(bound);
    await other.query('COMMIT');
    assert.equal(stepped, 200, 'the step was answered while the older version was being rebuilt');
    const read = await reading;
    assert.equal(read.statusCode, 200, read.body);
    assert.deepEqual(read.json(), expected);
  });
  assert.equal((await app.inject({ url: '/v1/sessions/o' })).json().version, 7);
});
