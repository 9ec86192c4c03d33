// A service process dies (kill -9) or is told to stop (SIGTERM) while clients step through it: no
// acknowledged step is lost, none is applied twice, and what is in the database stays whole.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { TEST_DB_KIND } from '../helper.ts';
import { Cluster, count503, httpRequest, newStats, requestWithRetry } from '../support/cluster.ts';
import {
  assertSameState, assertSnapshotsComplete, assertVersionsExactlyOnce, fingerprintOn, gradientOf, replayAlone, runLoad, sessionBody,
} from './load.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';
const timeout = 240_000; // bounded even on a loaded machine: a hang fails instead of blocking the run

test('kill -9 of a process under load: every acknowledged step is there once, snapshots are whole, the restarted process serves', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  // Frequent snapshots and a short retention: background snapshot and pruning transactions are in flight when the process dies.
  const body = sessionBody('crash', { snapshot_every: 7, keep_snapshots: 3 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);

  const victim = cluster.processes[1];
  let killed: typeof victim.exited | null = null;
  let restarted: Promise<void> | null = null;
  const acks = await runLoad(cluster, stats, {
    session: 'crash',
    clients: 8,
    steps: 30,
    target: (c, k) => (c + k) % 3,
    onAck: (_ack, acked) => {
      if (acked === 60) {
        victim.signal('SIGKILL');
        killed = victim.exited; // the exit of this child; a restart makes a new one
      }
      // Back after a while, on the same port, while the others still step.
      if (acked === 120) {
        restarted = killed!.then(() => cluster.restart(1));
        restarted.catch(() => {}); // awaited below
      }
    },
  });
  const load = structuredClone(stats);
  assert.equal((await killed!).signal, 'SIGKILL');
  await restarted;

  const ordered = assertVersionsExactlyOnce(acks, 2);
  assert.ok(load.connectionErrors > 0, 'some clients lost their connection to the killed process and retried');
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/crash')).body;
  assert.equal(session.step, 240);
  assert.equal(session.version, 241);

  const expected = await replayAlone(t, body, ordered);
  // The restarted process holds nothing in memory: it rebuilds from the newest snapshot and the log.
  for (const i of [1, 0, 2]) assertSameState(await fingerprintOn(cluster, stats, 'crash', i), expected, `process ${i}`);
  const snapshots = await assertSnapshotsComplete(cluster, stats, 'crash');

  // The restarted process steps the session on.
  const next = await httpRequest(cluster.agent, victim.url, '/v1/sessions/crash/step', { method: 'POST', json: { grads: gradientOf(99, 0) } });
  assert.equal(next.status, 200, next.text);
  assert.deepEqual(next.body, { session: 'crash', step: 241, version: 242, staleness: 0 });
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(
    `cluster/kill-9: ${acks.length} steps acknowledged, ${load.replayed} of them by an idempotent replay, retries ${load.retries}, ` +
      `connection errors ${JSON.stringify(load.connectionCodes)}, 503s ${count503(load)}, ${snapshots} snapshots verified`,
  );
});

test('kill -9 with replay points every few steps: every process, the restarted one too, serves the exact state', { skip, timeout }, async (t) => {
  // ASGD_REPLAY_BOUND_BYTES=1: the floor decides, a point every 6 steps of this model; written by whichever
  // process's batch crosses a multiple, in the background, while the others step and one dies.
  const cluster = await Cluster.start(t, { env: { ASGD_REPLAY_BOUND_BYTES: '1' } });
  const stats = newStats();
  const body = sessionBody('points', { snapshot_every: 1000 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);
  const victim = cluster.processes[2];
  let killed: typeof victim.exited | null = null;
  let restarted: Promise<void> | null = null;
  const acks = await runLoad(cluster, stats, {
    session: 'points',
    clients: 6,
    steps: 25,
    target: (c, k) => (c + k) % 3,
    onAck: (_ack, acked) => {
      if (acked === 50) {
        victim.signal('SIGKILL');
        killed = victim.exited;
      }
      if (acked === 90) {
        restarted = killed!.then(() => cluster.restart(2));
        restarted.catch(() => {});
      }
    },
  });
  await restarted;
  const ordered = assertVersionsExactlyOnce(acks, 2);
  const expected = await replayAlone(t, body, ordered);
  const sql = async (text: string) => {
    const client = new pg.Client({ connectionString: cluster.databaseUrl });
    await client.connect();
    try {
      return (await client.query(text)).rows;
    } finally {
      await client.end();
    }
  };
  const rows = await sql('SELECT version FROM replay_points');
  assert.equal(rows.length, 1, 'one point kept');
  // Written at the end of the batch that crossed a multiple of 6 (a batch may hold several steps): the
  // last multiple below the final version 151 is 150, so the point is at 150 or 151 unless that crossing's
  // write was skipped (a copy behind); it is never older than the one before.
  assert.ok(Number(rows[0].version) > 140 && Number(rows[0].version) <= 151, `point at ${rows[0].version}`);
  for (const i of [2, 0, 1]) assertSameState(await fingerprintOn(cluster, stats, 'points', i), expected, `process ${i}`);
  // A fresh process takes the session over from the point: fewer than 6 steps replayed.
  victim.signal('SIGKILL');
  await victim.exited;
  await cluster.restart(2);
  assertSameState(await fingerprintOn(cluster, stats, 'points', 2), expected, 'process 2, rebuilt from the point');
  const metrics = await httpRequest(cluster.agent, victim.url, '/metrics');
  const replayed = Number(/^asgd_replayed_steps_total (\S+)$/m.exec(metrics.text)?.[1]);
  assert.ok(replayed < 6, `the fresh process replayed ${replayed} steps`);
  // A point lost (PostgreSQL empties unlogged tables in its crash recovery): a fresh process still rebuilds it.
  await sql('TRUNCATE replay_points, replay_point_chunks');
  victim.signal('SIGKILL');
  await victim.exited;
  await cluster.restart(2);
  assertSameState(await fingerprintOn(cluster, stats, 'points', 2), expected, 'process 2, rebuilt from the snapshot');
  assert.deepEqual(stats.unexpected, []);
});

test('SIGTERM under load: in-flight steps finish, none is lost or doubled, the process exits 0', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  const body = sessionBody('term', { snapshot_every: 10 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);

  const leaving = cluster.processes[0];
  let termAt = 0;
  let answeredAfterTerm = 0;
  const acks = await runLoad(cluster, stats, {
    session: 'term',
    clients: 8,
    steps: 25,
    // Every client goes to the leaving process first, so that it has steps in flight when the signal comes.
    target: () => 0,
    onAck: (ack, acked) => {
      if (termAt && ack.process === 0) answeredAfterTerm++;
      if (acked === 40) {
        termAt = Date.now();
        leaving.signal('SIGTERM');
      }
    },
  });
  const load = structuredClone(stats); // what the clients saw while stepping (later reads retry around the stopped process)
  const exit = await leaving.exited;
  assert.deepEqual(exit, { code: 0, signal: null }, `the process exits 0 after SIGTERM:\n${leaving.log}`);

  assert.ok(answeredAfterTerm > 0, 'steps in flight on the leaving process were answered after the signal');
  const ordered = assertVersionsExactlyOnce(acks, 2);
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/term', { prefer: 1 })).body;
  assert.equal(session.step, 200);
  const expected = await replayAlone(t, body, ordered);
  for (const i of [1, 2]) assertSameState(await fingerprintOn(cluster, stats, 'term', i), expected, `process ${i}`);
  await assertSnapshotsComplete(cluster, stats, 'term');
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(
    `cluster/sigterm: ${acks.length} steps acknowledged, ${answeredAfterTerm} answered 200 by the leaving process after SIGTERM, ` +
      `${load.replayed} idempotent replays, retries ${load.retries}, connection errors ${JSON.stringify(load.connectionCodes)}, ` +
      `503s ${JSON.stringify(load.unavailable)}`,
  );
});
