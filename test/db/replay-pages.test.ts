// Catch-up reads the step log in pages sized by bytes (src/sessions/history.ts replay): a small model's
// steps since its snapshot come in one read, a big model's a few at a time (16 steps of a 1e6-parameter
// model, one of a 5e7-parameter one: a page of 16 was 3.2 GB there). Counted by PostgreSQL: each page is
// one index scan of step_log.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, randomData, TEST_DB_KIND } from '../helper.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'PostgreSQL only (the statistics counted are PostgreSQL\'s)';

test('a second process reading a small model 100 steps after its snapshot reads the log once, and serves the same state', { skip, timeout: 60_000 }, async (t) => {
  const first = await buildTestApp(t);
  const second = await buildTestApp(t, { databaseUrl: first.databaseUrl!, env: { ASGD_DB_POOL_SIZE: '1' } }); // one connection: its statistics
  const created = await first.app.inject({
    method: 'POST', url: '/v1/sessions',
    payload: { name: 'r', params: [{ name: 'w', shape: [250], data: randomData(250, 1) }], hyperparameters: { lr: 0.01, t0: 5 }, snapshot_every: 1000 },
  });
  assert.equal(created.statusCode, 201, created.body);
  for (let k = 0; k < 100; k++) {
    const res = await first.app.inject({ method: 'POST', url: '/v1/sessions/r/step', payload: { grads: { w: randomData(250, 100 + k) } } });
    assert.equal(res.statusCode, 200, res.body);
  }
  const scans = async () => {
    await second.app.db.query('SELECT pg_stat_force_next_flush()');
    const rows = await second.app.db.query<{ n: string }>("SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) AS n FROM pg_stat_user_tables WHERE relname = 'step_log'");
    return Number(rows[0].n);
  };
  const before = await scans();
  const read = await second.app.inject({ url: '/v1/sessions/r/state_dict' });
  assert.equal(read.statusCode, 200, read.body);
  const after = await scans();
  assert.equal(after - before, 1, `the 100 logged steps came in ${after - before} reads of step_log`);
  const live = await first.app.inject({ url: '/v1/sessions/r/state_dict' });
  assert.deepEqual(read.json(), live.json(), 'the state_dict rebuilt by the second process is the first one\'s');
});
