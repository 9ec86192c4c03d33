// Scheduled snapshots across processes: three processes stepping one session write one snapshot per due
// slot of snapshot_every versions, not one per process that happens to be current (they wrote about
// twice as many before the slot claim).
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { TEST_DB_KIND } from '../helper.ts';
import { Cluster, newStats, requestWithRetry } from '../support/cluster.ts';
import { runLoad, sessionBody } from './load.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';

test('N steps over 3 processes write N / snapshot_every background snapshots, one per slot', { skip, timeout: 240_000 }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  const every = 10;
  const body = sessionBody('slots', { snapshot_every: every, keep_snapshots: 1000 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);
  // 6 clients x 40 steps, each step on another process than the last: versions 2..241
  const acks = await runLoad(cluster, stats, { session: 'slots', clients: 6, steps: 40, target: (c, k) => (c + k) % 3, idempotent: (c) => c % 2 === 0 });
  const steps = acks.length;
  assert.equal(steps, 240);

  type Listed = { version: number; reason: string };
  const auto = async () => ((await requestWithRetry(cluster, stats, '/v1/sessions/slots/snapshots')).body.snapshots as Listed[]).filter((s) => s.reason === 'auto');
  // background snapshots finish after their step's answer: wait until the count stands still
  let listed = await auto();
  for (let quiet = 0, rounds = 0; quiet < 4 && rounds < 120; rounds++) {
    await sleep(250);
    const again = await auto();
    quiet = again.length === listed.length ? quiet + 1 : 0;
    listed = again;
  }
  const versions = listed.map((s) => s.version).sort((a, b) => a - b);
  // slot k holds versions k*every+1 .. (k+1)*every; the creation snapshot (version 1) is slot 0
  const slots = versions.map((v) => Math.floor((v - 1) / every));
  assert.equal(new Set(slots).size, slots.length, `one snapshot per slot: versions ${versions}`);
  assert.equal(versions.length, steps / every, `versions ${versions}`);
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(`cluster/snapshots: ${steps} steps, snapshot_every ${every}: auto snapshots at versions ${versions.join(', ')}`);
});
