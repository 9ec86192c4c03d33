// The embedded database has no autovacuum: the service vacuums it (src/db/vacuum.ts), so that a session's
// bounds (keep_snapshots, the log behind them) bound the data directory too (an operator's review: 40 MB to
// 1.5 GB in 3,000 steps of a session that kept 3 MB).
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/app.ts';
import { randomData, testConfig } from '../helper.ts';
import { waitFor } from './processes.ts';

/** Bytes of the files under `dir` (the tables, not the WAL). */
function bytesUnder(dir: string): number {
  let total = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    total += entry.isDirectory() ? bytesUnder(path) : statSync(path).size;
  }
  return total;
}

const N = 50_000; // a 200 KB gradient a step

async function steps(app: FastifyInstance, from: number, count: number): Promise<void> {
  for (let k = from; k < from + count; k++) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/v/step', payload: { grads: { w: randomData(N, 100 + k) } } });
    assert.equal(res.statusCode, 200, res.body);
  }
}

async function lastVacuum(app: FastifyInstance): Promise<number> {
  const [row] = await app.db.query<{ at: number | null }>("SELECT extract(epoch FROM last_vacuum)::float8 AS at FROM pg_stat_all_tables WHERE relname = 'step_log'");
  return row?.at ?? 0;
}

/** The last checkpoint's WAL position (it moves with each checkpoint). */
async function lastCheckpoint(app: FastifyInstance): Promise<string> {
  const [row] = await app.db.query<{ lsn: string }>('SELECT checkpoint_lsn::text AS lsn FROM pg_control_checkpoint()');
  return row.lsn;
}

/** Both done since: a vacuum of step_log and a checkpoint. */
async function upkeepSince(app: FastifyInstance, vacuum: number, checkpoint: string): Promise<boolean> {
  return (await lastVacuum(app)) > vacuum && (await lastCheckpoint(app)) !== checkpoint;
}

test('an embedded database stays within its sessions\' bounds: the rows pruned behind each snapshot are vacuumed and their space used again, and its WAL is checkpointed', { timeout: 240_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-vacuum-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const app = await buildApp({ config: testConfig({ ASGD_DATA_DIR: dir, ASGD_VACUUM_INTERVAL_MS: '300' }), migrate: true, logger: false });
  t.after(() => app.close());
  await app.ready();
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'v', params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], snapshot_every: 10, keep_snapshots: 2 } });
  assert.equal(created.statusCode, 201, created.body);

  await steps(app, 0, 120);
  const [v1, c1] = [await lastVacuum(app), await lastCheckpoint(app)];
  await waitFor('a vacuum of step_log and a checkpoint', () => upkeepSince(app, v1, c1), 30_000);
  const before = { tables: bytesUnder(join(dir, 'base')), wal: bytesUnder(join(dir, 'pg_wal')) };
  // 240 more steps write 48 MB of gradients and 24 snapshots of 400 KB; the session keeps about 20 steps.
  await steps(app, 120, 240);
  const [v2, c2] = [await lastVacuum(app), await lastCheckpoint(app)];
  await waitFor('another vacuum of step_log and checkpoint', () => upkeepSince(app, v2, c2), 30_000);
  const after = { tables: bytesUnder(join(dir, 'base')), wal: bytesUnder(join(dir, 'pg_wal')) };
  const storage = (await app.inject({ url: '/v1/sessions/v' })).json().storage;
  assert.ok(storage.total_bytes < 10e6, JSON.stringify(storage));
  const mb = (n: number) => (n / 1e6).toFixed(1);
  assert.ok(after.tables - before.tables < 12e6, `the tables grew ${mb(after.tables - before.tables)} MB over 240 steps (from ${mb(before.tables)} MB), the session keeping ${mb(storage.total_bytes)} MB`);
  // The WAL is checkpointed too (PGlite has no checkpointer: it kept every segment, a review): its segments
  // are used again, 16 MB each.
  assert.ok(after.wal - before.wal <= 32 * 1024 * 1024, `the WAL grew ${mb(after.wal - before.wal)} MB over 240 steps (from ${mb(before.wal)} MB)`);
});
