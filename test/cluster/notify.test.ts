// Waiting and conditional reads across real service processes on one PostgreSQL database: a replica sees
// another's commit through LISTEN/NOTIFY, also after PostgreSQL restarted under it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
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
  assert.equal(cluster.crashes(), 0, cluster.describe());
});

test('steps are announced (NOTIFY) only while some process waits for the session: a lease on its row, taken before the wait reads', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t, { processes: 2 });
  const [p0, p1] = cluster.processes;
  assert.equal((await httpRequest(cluster.agent, p0.url, '/v1/sessions', { method: 'POST', json: session })).status, 201);
  const client = new pg.Client({ connectionString: cluster.databaseUrl });
  client.on('error', () => {}); // the cluster drops its database at the end, this connection with it
  await client.connect();
  t.after(() => client.end().catch(() => {}));
  const heard: string[] = [];
  client.on('notification', (n) => heard.push(n.payload ?? ''));
  await client.query('LISTEN asgd_versions');
  const step = async (k: number) => {
    const res = await httpRequest(cluster.agent, p0.url, '/v1/sessions/n/step', { method: 'POST', json: { grads: { w: [k, 1, 2, 3] } } });
    assert.equal(res.status, 200, res.text);
    return res.body.version as number;
  };
  const lease = async () => (await client.query("SELECT listened_until > now() AS held FROM sessions WHERE name = 'n'")).rows[0].held as boolean | null;

  // Nobody waits: the steps commit without a NOTIFY.
  assert.equal(await step(0), 2);
  assert.equal(await step(1), 3);
  await sleep(300);
  assert.deepEqual(heard.filter((p) => p.startsWith('n:')), []);
  assert.equal(await lease(), null);

  // A waiting read on process 1 takes the lease, then reads: the next step (on process 0) is announced and answers it.
  const waiting = httpRequest(cluster.agent, p1.url, '/v1/sessions/n/params?after_version=3&wait=30');
  const deadline = Date.now() + 10_000;
  while (!(await lease())) {
    assert.ok(Date.now() < deadline, 'the waiting read took no lease');
    await sleep(20);
  }
  assert.equal(await step(2), 4);
  const answered = await waiting;
  assert.equal(answered.status, 200, answered.text);
  assert.equal(answered.body.version, 4);
  await sleep(200);
  assert.deepEqual(heard.filter((p) => p.startsWith('n:')), ['n:4:3']);

  // An event stream on process 1 sees steps on process 0 as they commit (its lease is the same row's).
  const stream = await fetch(`${p1.url}/v1/sessions/n/events`);
  assert.equal(stream.status, 200);
  const reader = stream.body!.getReader();
  const events: string[] = [];
  const collecting = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      events.push(...Buffer.from(value).toString('utf8').split('\n').filter((l) => l.startsWith('id: ')));
    }
  })().catch(() => {});
  await sleep(300);
  assert.equal(await step(3), 5);
  const seen = Date.now() + 5_000;
  while (!events.some((e) => /^id: 5@\d+$/.test(e))) { // <version>@<session row id>
    assert.ok(Date.now() < seen, `events: ${events.join(', ')}`);
    await sleep(20);
  }
  await reader.cancel();
  await collecting;
  await client.end();
  assert.equal(cluster.crashes(), 0, cluster.describe());
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
  assert.equal(cluster.crashes(), 0, cluster.describe());
});
