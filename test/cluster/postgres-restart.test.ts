// PostgreSQL goes away under load and comes back. The test runs its own PostgreSQL server (initdb in a
// temporary directory) so that stopping it disturbs nothing else on the machine.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { TEST_DB_KIND } from '../helper.ts';
import { Cluster, PrivatePostgres, count503, httpRequest, newStats, requestWithRetry } from '../support/cluster.ts';
import {
  assertSameState, assertSnapshotsComplete, assertVersionsExactlyOnce, fingerprintOn, gradientOf, replayAlone, runLoad, sessionBody,
} from './load.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';
const timeout = 240_000; // bounded even on a loaded machine: a hang fails instead of blocking the run

test('a PostgreSQL restart under load: only retryable errors, no wrong answer, then the same invariants and the processes serve again', { skip, timeout }, async (t) => {
  const server = await PrivatePostgres.create(t);
  if (typeof server === 'string') {
    if (process.env.CI) throw new Error(`CI must run the PostgreSQL restart test: ${server}`);
    return t.skip(server);
  }
  const cluster = await Cluster.start(t, { postgres: server });
  const stats = newStats();
  const body = sessionBody('pgr', { snapshot_every: 10, keep_snapshots: 3 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);

  let outage: Promise<void> | null = null;
  let downMs = 0;
  let ackedDuringOutage = 0;
  let down = false;
  const acks = await runLoad(cluster, stats, {
    session: 'pgr',
    clients: 6,
    steps: 40,
    pauseMs: 5,
    target: (c, k) => (c + k) % 3,
    deadlineMs: 90_000,
    onAck: (_ack, acked) => {
      if (down) ackedDuringOutage++;
      if (acked === 60) {
        outage = (async () => {
          const began = Date.now();
          down = true;
          await server.stop();
          await new Promise((resolve) => setTimeout(resolve, 1_500)); // clients meet a refused database for a while
          await server.start();
          down = false;
          downMs = Date.now() - began;
        })();
        outage.catch(() => {}); // awaited below; a failing load must not leave it unhandled
      }
    },
  });
  await outage;

  // Clients saw only 503s that carry a code, and connection errors; never a 4xx, a 500 or a wrong 200.
  assert.deepEqual(stats.unexpected, []);
  assert.equal(stats.unavailable['(none)'], undefined, `every 503 has a code: ${JSON.stringify(stats.unavailable)}`);
  assert.ok(count503(stats) > 0, 'the outage was seen by the clients');
  assert.equal(cluster.crashes(), 0, `no process died:\n${cluster.processes.map((p) => p.log).join('\n')}`);

  const ordered = assertVersionsExactlyOnce(acks, 2);
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/pgr')).body;
  assert.equal(session.step, 240);
  const expected = await replayAlone(t, body, ordered);
  for (const i of [0, 1, 2]) assertSameState(await fingerprintOn(cluster, stats, 'pgr', i), expected, `process ${i}`);
  const snapshots = await assertSnapshotsComplete(cluster, stats, 'pgr');

  // Each process serves again without a restart: a step on each, answered by that process.
  for (const [i, p] of cluster.processes.entries()) {
    const res = await httpRequest(cluster.agent, p.url, '/v1/sessions/pgr/step', { method: 'POST', json: { grads: gradientOf(50, i) } });
    assert.equal(res.status, 200, `process ${i}: ${res.text}`);
    assert.equal(res.body.version, 242 + i);
  }
  console.log(
    `cluster/postgres-restart: database away ${downMs} ms, ${acks.length} steps acknowledged (${ackedDuringOutage} while it was away), ` +
      `503s ${JSON.stringify(stats.unavailable)}, connection errors ${JSON.stringify(stats.connectionCodes)}, retries ${stats.retries}, ` +
      `${stats.replayed} idempotent replays, ${snapshots} snapshots verified`,
  );
});

test('a connection lost after the kernel ran: a retryable 503, and the process drops its copy instead of serving a step that never committed', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t, { processes: 2 });
  const stats = newStats();
  const body = sessionBody('lost', { snapshot_every: 1000 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);
  const [a, b] = cluster.processes;
  const committed: { grads: unknown }[] = [];
  const step = async (p: typeof a, grads: ReturnType<typeof gradientOf>, key?: string) => {
    const res = await httpRequest(cluster.agent, p.url, '/v1/sessions/lost/step', { method: 'POST', json: { grads }, ...(key && { headers: { 'idempotency-key': key } }) });
    if (res.status === 200) committed.push({ grads });
    return res;
  };
  for (let k = 0; k < 5; k++) assert.equal((await step(a, gradientOf(3, k))).status, 200);

  // A keyed step is a transaction: lock, log, kernel, version, saved answer, commit. Hold the answers' table so
  // that the step stops at its last statement, after the kernel ran on process a's copy, and end its connection there.
  const admin = new pg.Client({ connectionString: cluster.databaseUrl });
  admin.on('error', () => {}); // the database is dropped WITH (FORCE) when the test ends
  await admin.connect();
  t.after(() => admin.end().catch(() => {}));
  await admin.query('BEGIN');
  await admin.query('LOCK TABLE idempotency_keys IN EXCLUSIVE MODE');
  const doomed = step(a, gradientOf(3, 5), 'doomed');
  let terminated = 0;
  for (let i = 0; i < 200 && terminated === 0; i++) {
    const rows = await admin.query(
      // (pg_stat_activity may still show BEGIN: the wait is in the parse of the prepared INSERT.)
      `SELECT pg_terminate_backend(pid) AS ok FROM pg_locks
        WHERE relation = 'idempotency_keys'::regclass AND NOT granted AND pid <> pg_backend_pid()`,
    );
    terminated = rows.rowCount ?? 0;
    if (!terminated) await new Promise((resolve) => setTimeout(resolve, 25));
  }
  await admin.query('ROLLBACK');
  await admin.end();
  assert.equal(terminated, 1, 'the step was caught waiting on its last statement');
  const lost = await doomed;
  assert.equal(lost.status, 503, lost.text);
  assert.equal(lost.body.code, 'SERVICE_UNAVAILABLE');

  // Another gradient takes that version on process b. Had process a kept its copy (one step ahead, at the
  // same version number), it would now answer a state that holds the lost gradient instead of this one.
  const other = await step(b, gradientOf(3, 6));
  assert.equal(other.status, 200, other.text);
  assert.equal(other.body.version, 7);
  const expected = await replayAlone(t, body, committed);
  for (const i of [0, 1]) assertSameState(await fingerprintOn(cluster, stats, 'lost', i), expected, `process ${i}`);

  // The retry of the lost step (same key) steps once, now, on the process whose connection died.
  const retried = await step(a, gradientOf(3, 5), 'doomed');
  assert.equal(retried.status, 200, retried.text);
  assert.deepEqual(retried.body, { session: 'lost', step: 7, version: 8, staleness: 0 });
  assert.equal((await step(a, gradientOf(3, 5), 'doomed')).body.replayed, true);
  committed.pop(); // the replayed answer is not a new step
  assertSameState(await fingerprintOn(cluster, stats, 'lost', 1), await replayAlone(t, body, committed), 'process 1 after the retry');
  assert.equal(cluster.crashes(), 0);
  console.log('cluster/connection-lost: a keyed step whose connection ended after the kernel ran answered 503; no process served it');
});
