// Waiting and conditional reads across real service processes on one PostgreSQL database: a replica sees
// another's commit through LISTEN/NOTIFY, also after PostgreSQL restarted under it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TEST_DB_KIND } from '../helper.ts';
import { Cluster, httpRequest, PrivatePostgres } from '../support/cluster.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';
const timeout = 240_000;
const session = { name: 'n', params: [{ name: 'w', shape: [4], data: [0.1, 0.2, 0.3, 0.4] }] };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Process 1 waits for a version above `after`; process 0 steps; how long after the step's answer process 1 answered. */
async function seenAfter(cluster: Cluster, after: number, k: number): Promise<number> {
  const [p0, p1] = cluster.processes;
  const waiting = httpRequest(cluster.agent, p1.url, `/v1/sessions/n/params?after_version=${after}&wait=30`).then((res) => ({ res, at: Date.now() }));
  await sleep(300); // the read is waiting on process 1
  const stepped = await httpRequest(cluster.agent, p0.url, '/v1/sessions/n/step', { method: 'POST', json: { grads: { w: [k, 1, 2, 3] } } });
  const committedAt = Date.now();
  assert.equal(stepped.status, 200, stepped.text);
  const { res, at } = await waiting;
  assert.equal(res.status, 200, res.text);
  assert.equal(res.body.version, stepped.body.version);
  return at - committedAt;
}

test('a waiting read on one process answers within ~100 ms of a step committed on another; If-None-Match sees it too', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t, { processes: 2 });
  const [p0, p1] = cluster.processes;
  assert.equal((await httpRequest(cluster.agent, p0.url, '/v1/sessions', { method: 'POST', json: session })).status, 201);
  const delays: number[] = [];
  for (let k = 0; k < 5; k++) delays.push(await seenAfter(cluster, k + 1, k));
  delays.sort((a, b) => a - b);
  console.log(`cluster/notify: another process's commit seen after ${delays.join(', ')} ms (median ${delays[2]})`);
  assert.ok(delays[2] < 200, `median ${delays[2]} ms`);
  // 304 on process 1 only while it is the version process 0 made.
  const tag = `"${6}"`;
  assert.equal((await httpRequest(cluster.agent, p1.url, '/v1/sessions/n/params', { headers: { 'if-none-match': tag } })).status, 304);
  await httpRequest(cluster.agent, p0.url, '/v1/sessions/n/step', { method: 'POST', json: { grads: { w: [1, 1, 1, 1] } } });
  assert.equal((await httpRequest(cluster.agent, p1.url, '/v1/sessions/n/params', { headers: { 'if-none-match': tag } })).status, 200);
  assert.equal(cluster.crashes(), 0);
});

test('the listener reconnects after PostgreSQL restarts', { skip, timeout }, async (t) => {
  const postgres = await PrivatePostgres.create(t);
  if (typeof postgres === 'string') return t.skip(postgres);
  const cluster = await Cluster.start(t, { processes: 2, postgres });
  assert.equal((await httpRequest(cluster.agent, cluster.processes[0].url, '/v1/sessions', { method: 'POST', json: session })).status, 201);
  await postgres.stop();
  await postgres.start();
  // The pools reconnect on their next query; the listeners on their own (backoff at most 2 s).
  const deadline = Date.now() + 30_000;
  for (;;) {
    const res = await httpRequest(cluster.agent, cluster.processes[0].url, '/v1/sessions/n').catch(() => null);
    if (res?.status === 200) break;
    if (Date.now() > deadline) throw new Error('the service did not come back after the restart');
    await sleep(200);
  }
  await sleep(3_000);
  const ms = await seenAfter(cluster, 1, 0);
  assert.ok(ms < 1000, `seen ${ms} ms after the commit`);
  assert.equal(cluster.crashes(), 0);
});
