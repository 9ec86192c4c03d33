// Replay points (src/sessions/replay-points.ts): every few steps the state goes to an unlogged table, so
// that a process taking a session over (its owner crashed: no shutdown snapshot) replays a bounded stretch
// of the log instead of everything since the last snapshot. What a user sees: the same exact state, read
// with fewer steps replayed (asgd_replayed_steps_total); a point that is damaged or gone (PostgreSQL empties
// unlogged tables after its own crash) costs a longer replay, never a wrong answer.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp, randomData, TEST_DB_KIND } from '../helper.ts';
import { replayPointInterval } from '../../src/sessions/replay-points.ts';

const multi = TEST_DB_KIND !== 'postgres' && 'two processes on one database: PostgreSQL only';

const N = 4000;
const PARAMS = [{ name: 'w', shape: [N - 3], data: randomData(N - 3, 1) }, { name: 'b', shape: [3], data: randomData(3, 2) }];
/** ASGD_REPLAY_BOUND_BYTES of 1: the floor of four states' worth of log decides, 7 steps at this size. */
const SMALL_BOUND = { ASGD_REPLAY_BOUND_BYTES: '1' };
const INTERVAL = replayPointInterval({ numel: N, params: PARAMS }, 1)!;

/** Averaging from step 3 (t0), so that ax and the params differ. */
async function create(app: FastifyInstance, name = 's', hyperparameters: Record<string, number> = { lr: 0.01, lambd: 1e-3, t0: 3, weight_decay: 0.01 }) {
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params: PARAMS, hyperparameters, snapshot_every: 1000 } });
  assert.equal(res.statusCode, 201, res.body);
}

async function steps(app: FastifyInstance, from: number, to: number, name = 's') {
  for (let k = from; k < to; k++) {
    const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: randomData(N - 3, 100 + k), b: randomData(3, 900 + k) } } });
    assert.equal(res.statusCode, 200, res.body);
  }
  await app.sessions.pendingSnapshots();
}

/** The optimizer's state_dict and the params, as JSON. */
const stateDict = async (app: FastifyInstance, name = 's') => {
  const [optimizer, params] = await Promise.all(['state_dict', 'params'].map((what) => app.inject({ url: `/v1/sessions/${name}/${what}` })));
  assert.equal(optimizer.statusCode, 200, optimizer.body);
  assert.equal(params.statusCode, 200, params.body);
  return { state_dict: optimizer.json(), params: params.json().params };
};

async function counter(app: FastifyInstance, metric: string): Promise<number> {
  const body = (await app.inject({ url: '/metrics' })).body;
  return Number(new RegExp(`^${metric} (\\S+)$`, 'm').exec(body)?.[1] ?? 'NaN');
}

const points = async (app: FastifyInstance) =>
  (await app.db.query<{ version: number }>('SELECT version::float8 AS version FROM replay_points ORDER BY version')).map((r) => r.version);

/** A second process on the first one's database, reading as a takeover would (nothing cached). */
const second = (t: TestContext, databaseUrl: string, env: Record<string, string> = {}) => buildTestApp(t, { databaseUrl, env }).then((a) => a.app);

test('the interval: four states\' worth of log at least, the bound when more; 16 steps at 1e6 parameters by default', () => {
  assert.equal(INTERVAL, 7);
  assert.equal(replayPointInterval({ numel: 1e6, params: [1] }, 64 * 1024 * 1024), 16);
  assert.equal(replayPointInterval({ numel: 5e7, params: [1] }, 64 * 1024 * 1024), 7); // 32 bytes a parameter over ~4 a step
  assert.equal(replayPointInterval({ numel: 1e6, params: [1] }, 0), null);
});

test('a takeover starts from the replay point: the owner\'s exact state, fewer steps replayed than the interval', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app);
  await steps(owner.app, 0, 23); // versions 2..24; points written at 7, 14, 21: the newest kept
  assert.deepEqual(await points(owner.app), [21]);
  const storage = (await owner.app.inject({ url: '/v1/sessions/s' })).json().storage;
  assert.ok(storage.replay_point_bytes >= N * 8, `replay_point_bytes ${storage.replay_point_bytes}`);
  assert.equal(storage.total_bytes, storage.log_bytes + storage.snapshot_bytes + storage.replay_point_bytes + storage.other_bytes);

  const taker = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(taker), await stateDict(owner.app));
  assert.equal(await counter(taker, 'asgd_replayed_steps_total'), 3, 'replayed from version 21 to 24');

  // Without replay points the same takeover replays all 23 steps since the creation snapshot.
  const plain = await buildTestApp(t, { env: { ASGD_REPLAY_BOUND_BYTES: '0' } });
  await create(plain.app);
  await steps(plain.app, 0, 23);
  assert.deepEqual(await points(plain.app), []);
  const plainTaker = await second(t, plain.databaseUrl!);
  assert.deepEqual(await stateDict(plainTaker), await stateDict(owner.app), 'the same state either way');
  assert.equal(await counter(plainTaker, 'asgd_replayed_steps_total'), 23);
});

test('a replay point that fails its checksum, or is gone as after a crash of PostgreSQL, is passed over for the snapshot', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app);
  await steps(owner.app, 0, 16); // point at 14, version 17
  assert.deepEqual(await points(owner.app), [14]);
  const expected = await stateDict(owner.app);

  await owner.app.db.query("UPDATE replay_point_chunks SET data = overlay(data placing '\\x00000000'::bytea from 5)");
  const afterDamage = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(afterDamage), expected);
  assert.equal(await counter(afterDamage, 'asgd_replayed_steps_total'), 16, 'replayed from the creation snapshot');

  // A chunk longer than the point says (it used to spin the reading process forever).
  await owner.app.db.query("UPDATE replay_point_chunks SET data = data || '\\x01020304'::bytea");
  const afterLonger = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(afterLonger), expected);
  assert.equal(await counter(afterLonger, 'asgd_replayed_steps_total'), 16);

  await owner.app.db.query('TRUNCATE replay_points, replay_point_chunks');
  const afterCrash = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(afterCrash), expected);
  assert.equal(await counter(afterCrash, 'asgd_replayed_steps_total'), 16);
  // The next crossing writes a new point.
  await steps(owner.app, 16, 20); // versions 18..21
  assert.deepEqual(await points(owner.app), [21]);
});

test('a snapshot supersedes the replay point; a restore is read as restored, not from an older point', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app);
  await steps(owner.app, 0, 9); // point at 7, version 10
  assert.deepEqual(await points(owner.app), [7]);
  const snap = await owner.app.inject({ method: 'POST', url: '/v1/sessions/s/snapshots', payload: {} });
  assert.equal(snap.statusCode, 201, snap.body);
  assert.deepEqual(await points(owner.app), [], 'the snapshot at 10 supersedes the point at 7');

  await steps(owner.app, 9, 14); // versions 11..15, point at 14
  assert.deepEqual(await points(owner.app), [14]);
  const first = (await owner.app.inject({ url: '/v1/sessions/s/snapshots' })).json().snapshots.find((s: { version: number }) => s.version === 1);
  const restored = await owner.app.inject({ method: 'POST', url: `/v1/sessions/s/snapshots/${first.id}/restore` });
  assert.equal(restored.statusCode, 200, restored.body);
  const taker = await second(t, owner.databaseUrl!);
  const read = await stateDict(taker);
  assert.deepEqual(read, await stateDict(owner.app));
  assert.deepEqual(read.params.w.data.slice(0, 5), PARAMS[0].data.slice(0, 5).map((x) => Math.fround(x)), 'the creation state, restored');
});

test('a copy far behind catches up from the replay point, not through every step since it last read', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app);
  const reader = await second(t, owner.databaseUrl!, SMALL_BOUND);
  await stateDict(reader); // its copy at version 1
  await steps(owner.app, 0, 30); // versions 2..31, point at 28
  assert.equal(await counter(reader, 'asgd_replayed_steps_total'), 0);
  assert.deepEqual(await stateDict(reader), await stateDict(owner.app));
  assert.equal(await counter(reader, 'asgd_replayed_steps_total'), 3, 'from the point at 28 to 31, not 30 steps from its copy');
  // A copy a few steps behind (fewer than the interval) replays them from itself.
  await steps(owner.app, 30, 33);
  assert.deepEqual(await stateDict(reader), await stateDict(owner.app));
  assert.equal(await counter(reader, 'asgd_replayed_steps_total'), 6);
});

test('one process: replay points are written and a rebuilt state is exact (either database)', { timeout: 60_000 }, async (t) => {
  const { app } = await buildTestApp(t, { env: SMALL_BOUND });
  await create(app);
  await steps(app, 0, 10); // version 11, point at 7
  assert.deepEqual(await points(app), [7]);
  assert.equal(await counter(app, 'asgd_replay_points_total'), 1);
  const live = await stateDict(app);
  app.sessions.dropCache();
  assert.deepEqual(await stateDict(app), live);
  assert.equal(await counter(app, 'asgd_replayed_steps_total'), 4);
  // Deleting the session takes its point along.
  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/s' })).statusCode, 204);
  assert.deepEqual(await points(app), []);
  assert.equal((await app.db.query<{ n: number }>('SELECT count(*)::int AS n FROM replay_point_chunks'))[0].n, 0);
});

test('before averaging starts (t0) a point holds the params alone, half the bytes, and ax is rebuilt from them', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app, 'early', { lr: 0.01, t0: 8 }); // ax is a copy of the params until a few steps after step 8
  await steps(owner.app, 0, 7, 'early'); // versions 2..8, point at 7 (step 6): ax equals the params
  const rows = async () => owner.app.db.query<{ version: number; byte_size: number; ax_from_params: boolean }>(
    'SELECT version::float8 AS version, byte_size::float8 AS byte_size, ax_from_params FROM replay_points');
  assert.deepEqual(await rows(), [{ version: 7, byte_size: N * 4, ax_from_params: true }]);
  const taker = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(taker, 'early'), await stateDict(owner.app, 'early'));
  assert.equal(await counter(taker, 'asgd_replayed_steps_total'), 1);
  await steps(owner.app, 7, 17, 'early'); // versions 9..18, point at 14 (step 13): averaging has begun
  assert.deepEqual(await rows(), [{ version: 14, byte_size: N * 8, ax_from_params: false }]);
  const later = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(later, 'early'), await stateDict(owner.app, 'early'));
  assert.equal(await counter(later, 'asgd_replayed_steps_total'), 4);
});

test('a state over ASGD_SNAPSHOT_COPY_LIMIT_BYTES is written to its point in place, its steps waiting: still exact', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: { ...SMALL_BOUND, ASGD_SNAPSHOT_COPY_LIMIT_BYTES: '1' } });
  await create(owner.app);
  // Concurrent steps: the point's job and the steps queue on the session's lock in this process.
  await Promise.all([0, 1, 2, 3].map((c) => steps(owner.app, c * 4, c * 4 + 4)));
  // In place, the point is of the state when its job gets the lock: the crossing of 14, or a step after it.
  const [at] = await points(owner.app);
  assert.ok(at >= 14 && at <= 17, `point at ${at}`);
  const taker = await second(t, owner.databaseUrl!);
  assert.deepEqual(await stateDict(taker), await stateDict(owner.app));
  assert.equal(await counter(taker, 'asgd_replayed_steps_total'), 17 - at);
});

test('a replay point or snapshot being written does not hold the session\'s steps up (its foreign key\'s lock is not theirs)', { skip: multi, timeout: 60_000 }, async (t) => {
  const owner = await buildTestApp(t, { env: SMALL_BOUND });
  await create(owner.app);
  const pg = (await import('pg')).default;
  const writer = new pg.Client({ connectionString: owner.databaseUrl! });
  await writer.connect();
  // What a point's (or a background snapshot's) transaction holds while its chunks go in: a row referencing the session.
  await writer.query('BEGIN');
  await writer.query(`INSERT INTO replay_points (session_id, version, step, groups, scalars, byte_size, chunk_count, checksum, ax_from_params)
    SELECT id, 1000, 1000, '[]', '[]', 0, 0, '', true FROM sessions WHERE name = 's'`);
  await writer.query(`INSERT INTO snapshots (session_id, version, step, reason, groups, scalars, byte_size, chunk_count, checksum)
    SELECT id, 1000, 1000, 'auto', '[]', '[]', 0, 0, '' FROM sessions WHERE name = 's'`);
  const stepped = steps(owner.app, 0, 3).then(() => 'stepped');
  const held = new Promise((resolve) => setTimeout(resolve, 10_000, 'held up')).then(String);
  try {
    assert.equal(await Promise.race([stepped, held]), 'stepped', 'three steps went through while the transaction stayed open');
  } finally {
    await writer.query('ROLLBACK');
    await writer.end();
  }
  assert.equal((await owner.app.inject({ url: '/v1/sessions/s' })).json().version, 4);
});
