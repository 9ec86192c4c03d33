// Snapshots, roll back, fork, retention and pinning when every operation may land on another process:
// the result is what one process doing the same operations holds, bit for bit.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp, TEST_DB_KIND } from '../helper.ts';
import { Cluster, httpRequest, newStats, requestWithRetry, type ClientStats } from '../support/cluster.ts';
import { assertSameState, assertVersionsExactlyOnce, fingerprintInProcess, fingerprintOn, gradientOf, runLoad, sessionBody } from './load.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';
const timeout = 240_000; // bounded even on a loaded machine: a hang fails instead of blocking the run

/** Sends the same request to one process of the cluster and to the single process; both must answer `status`. */
function twin(cluster: Cluster, solo: FastifyInstance) {
  return async (process: number, method: string, path: string, json: unknown, status: number) => {
    const res = await httpRequest(cluster.agent, cluster.processes[process].url, path, { method, json });
    assert.equal(res.status, status, `process ${process}: ${method} ${path}: ${res.text}`);
    const alone = await solo.inject({ method: method as 'GET', url: path, ...(json !== undefined && { payload: json as object }) });
    assert.equal(alone.statusCode, status, `single process: ${method} ${path}: ${alone.body}`);
    return { cluster: res.body, solo: alone.json() };
  };
}

async function assertSame(cluster: Cluster, stats: ClientStats, solo: FastifyInstance, session: string, processes: number[], what: string) {
  const expected = await fingerprintInProcess(solo, session);
  for (const i of processes) assertSameState(await fingerprintOn(cluster, stats, session, i), expected, `${what}, process ${i}`);
}

test('roll back, fork, retention and pinning across processes equal one process doing the same', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const { app: solo } = await buildTestApp(t);
  const stats = newStats();
  const both = twin(cluster, solo);
  const body = sessionBody('hist', { snapshot_every: 4, keep_snapshots: 3 });
  await both(0, 'POST', '/v1/sessions', body, 201);
  const stateDictAt = new Map<number, unknown>(); // of 'hist', as the single process has it after each step
  const step = async (session: string, process: number, k: number, version: number) => {
    const { cluster: answer } = await both(process, 'POST', `/v1/sessions/${session}/step`, { grads: gradientOf(7, k) }, 200);
    assert.equal(answer.version, version);
    if (session === 'hist') stateDictAt.set(version, (await solo.inject({ url: '/v1/sessions/hist/state_dict' })).json());
  };

  for (let k = 0; k < 10; k++) await step('hist', k % 3, k, k + 2);
  // Pin the state at version 11 on process 1.
  const pin = await both(1, 'POST', '/v1/sessions/hist/snapshots', { pinned: true }, 201);
  assert.equal(pin.cluster.version, 11);
  assert.equal(pin.cluster.pinned, true);
  const pinned = { cluster: pin.cluster.id as number, solo: pin.solo.id as number };
  const atPin = await fingerprintInProcess(solo, 'hist');
  const pinnedStateDict = JSON.stringify(atPin.stateDict);

  // 20 more steps over all processes: automatic snapshots every 4 versions (counted by each process from the
  // snapshot it last wrote or loaded), each pruning to the newest 3 and the pinned one.
  for (let k = 10; k < 30; k++) await step('hist', k % 3, k, k + 2);
  await assertSame(cluster, stats, solo, 'hist', [0, 1, 2], 'after 30 steps');
  // Retention holds after every snapshot transaction, whichever process wrote it: the pinned one and the newest three.
  // (Which versions get automatic snapshots depends on the processes' caches, so only the shape is fixed.)
  const listed = async (i: number) =>
    (await requestWithRetry(cluster, stats, '/v1/sessions/hist/snapshots', { prefer: i })).body.snapshots as { id: number; version: number; pinned: boolean }[];
  let list = await listed(0);
  for (let i = 1; i < 50; i++) {
    // Background snapshots are off the request path: wait until the list stops changing.
    await new Promise((resolve) => setTimeout(resolve, 200));
    const again = await listed(i);
    if (JSON.stringify(again) === JSON.stringify(list)) break;
    list = again;
  }
  assert.deepEqual(list.map((s) => s.pinned), [false, false, false, true], JSON.stringify(list));
  assert.equal(list[3].id, pinned.cluster);
  assert.ok(list[2].version > 11, JSON.stringify(list));
  const oldestKept = list[2].version;
  for (const i of [0, 1, 2]) {
    const dl = await httpRequest(cluster.agent, cluster.processes[i].url, `/v1/sessions/hist/snapshots/${pinned.cluster}/state_dict`);
    assert.equal(dl.status, 200, dl.text);
    assert.equal(JSON.stringify(dl.body), pinnedStateDict, `process ${i} serves the pinned snapshot as it was`);
  }
  // Every version in the retained window reads the same on every process (rebuilt from a snapshot and the log);
  // a version behind it is gone.
  let readOld = 0;
  for (let version = oldestKept; version <= 31; version++) {
    const i = version % 3;
    const res = await httpRequest(cluster.agent, cluster.processes[i].url, `/v1/sessions/hist/state_dict?version=${version}`);
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.body, stateDictAt.get(version), `version ${version} on process ${i}`);
    readOld++;
  }
  const behind = await httpRequest(cluster.agent, cluster.processes[1].url, `/v1/sessions/hist/state_dict?version=${oldestKept - 1}`);
  assert.equal(behind.status, 404, behind.text);
  assert.equal(behind.body.code, 'VERSION_NOT_AVAILABLE');

  // Roll back on process 0; process 1, whose memory holds the state before the restore, steps on from the restored state.
  const restore = await httpRequest(cluster.agent, cluster.processes[0].url, `/v1/sessions/hist/snapshots/${pinned.cluster}/restore`, { method: 'POST' });
  assert.equal(restore.status, 200, restore.text);
  assert.equal(restore.body.version, 32);
  assert.equal(restore.body.step, 10);
  const soloRestore = await solo.inject({ method: 'POST', url: `/v1/sessions/hist/snapshots/${pinned.solo}/restore` });
  assert.equal(soloRestore.statusCode, 200, soloRestore.body);
  await assertSame(cluster, stats, solo, 'hist', [2], 'right after the restore');
  await step('hist', 1, 100, 33);
  await step('hist', 2, 101, 34);
  await assertSame(cluster, stats, solo, 'hist', [0, 1, 2], 'stepping on after the restore');

  // Fork from the pinned snapshot on process 2; the fork steps on processes 0 and 1.
  const fork = await httpRequest(cluster.agent, cluster.processes[2].url, '/v1/sessions/hist/fork', { method: 'POST', json: { name: 'hist-fork', snapshot: pinned.cluster } });
  assert.equal(fork.status, 201, fork.text);
  assert.equal(fork.body.step, 10);
  const soloFork = await solo.inject({ method: 'POST', url: '/v1/sessions/hist/fork', payload: { name: 'hist-fork', snapshot: pinned.solo } });
  assert.equal(soloFork.statusCode, 201, soloFork.body);
  for (let k = 0; k < 6; k++) await step('hist-fork', k % 2, 200 + k, k + 2);
  await assertSame(cluster, stats, solo, 'hist-fork', [2, 0, 1], 'the fork');

  // Unpinned on one process, pruned by the next snapshot on another.
  const unpin = await httpRequest(cluster.agent, cluster.processes[0].url, `/v1/sessions/hist/snapshots/${pinned.cluster}`, { method: 'PATCH', json: { pinned: false } });
  assert.equal(unpin.body.pinned, false);
  assert.equal((await httpRequest(cluster.agent, cluster.processes[1].url, '/v1/sessions/hist/snapshots', { method: 'POST', json: {} })).status, 201);
  const after = (await httpRequest(cluster.agent, cluster.processes[2].url, '/v1/sessions/hist/snapshots')).body.snapshots as { id: number }[];
  assert.ok(!after.some((s) => s.id === pinned.cluster), 'the unpinned snapshot is gone');
  assert.equal(after.length, 3);
  const gone = await httpRequest(cluster.agent, cluster.processes[0].url, `/v1/sessions/hist/snapshots/${pinned.cluster}/state_dict`);
  assert.equal(gone.status, 404);
  assert.equal(gone.body.code, 'SNAPSHOT_NOT_FOUND');
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(`cluster/history: 38 steps, pin, restore and fork over 3 processes equal one process; ${readOld} old versions read back alike`);
});

test('copies left behind while other processes snapshot and prune: plain steps and reads never fail, reads answer the version they name', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  // A snapshot after every step and only the newest kept: the log and the snapshots behind a copy move all the
  // time. Two processes step without Idempotency-Keys (one attempt each: any error fails), so each one's copy
  // falls behind the other's steps and is rebuilt outside the row lock; a third process only reads.
  const body = sessionBody('ret', { snapshot_every: 1, keep_snapshots: 1 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);

  const reads = new Map<number, string>(); // version -> state_dict as process 2 answered it
  const statuses: Record<string, number> = {};
  let stepping = true;
  const reader = async () => {
    while (stepping) {
      const res = await httpRequest(cluster.agent, cluster.processes[2].url, '/v1/sessions/ret/state_dict');
      const key = res.status === 200 ? '200' : `${res.status} ${res.body?.code}`;
      statuses[key] = (statuses[key] ?? 0) + 1;
      if (res.status === 200) reads.set(Number(res.headers['x-session-version']), res.text);
    }
  };
  const readers = [reader(), reader()];
  const acks = await runLoad(cluster, stats, { session: 'ret', clients: 2, steps: 50, target: (c) => c, idempotent: false }).finally(() => {
    stepping = false;
  });
  await Promise.all(readers);
  const ordered = assertVersionsExactlyOnce(acks, 2);

  // Every read equals the single-process state at the version it was answered for.
  const { app: solo } = await buildTestApp(t);
  assert.equal((await solo.inject({ method: 'POST', url: '/v1/sessions', payload: body })).statusCode, 201);
  let compared = 0;
  for (const ack of ordered) {
    assert.equal((await solo.inject({ method: 'POST', url: '/v1/sessions/ret/step', payload: { grads: ack.grads } })).statusCode, 200);
    const read = reads.get(ack.version);
    if (read === undefined) continue;
    assert.equal(read, (await solo.inject({ url: '/v1/sessions/ret/state_dict' })).body, `the read of version ${ack.version}`);
    compared++;
  }
  console.log(`cluster/retention-reads: ${acks.length} plain steps on two processes, reads on the third: ${JSON.stringify(statuses)}, ${compared} versions compared`);
  assert.deepEqual(Object.keys(statuses), ['200'], `every read answers 200: ${JSON.stringify(statuses)}`);
  assert.ok(compared > 5, `enough reads landed: ${compared}`);
  assert.equal(cluster.crashes(), 0);
});
