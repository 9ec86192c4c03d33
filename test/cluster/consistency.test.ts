// Three service processes on one PostgreSQL database: concurrent clients spread over them see one
// session, and the result is the single-process result of the acknowledged steps in version order.
import assert from 'node:assert/strict';
import http from 'node:http';
import { test } from 'node:test';
import { TEST_DB_KIND } from '../helper.ts';
import { Cluster, count503, httpRequest, newStats, requestWithRetry } from '../support/cluster.ts';
import { assertSameState, assertVersionsExactlyOnce, fingerprintOn, gradientOf, replayAlone, runLoad, sessionBody } from './load.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the cluster tests need PostgreSQL';
const timeout = 240_000; // bounded even on a loaded machine: a hang fails instead of blocking the run

test('8 clients x 50 steps over 3 processes equal one process replaying the acknowledged steps in version order', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  const body = sessionBody('many', { snapshot_every: 25, keep_snapshots: 3 });
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: body })).status, 201);

  const started = Date.now();
  // Half the clients send an Idempotency-Key (a step is then a transaction under the row lock), half do not
  // (one autocommit statement): both kinds interleave on every process.
  const acks = await runLoad(cluster, stats, { session: 'many', clients: 8, steps: 50, target: (c, k) => (c + k) % 3, idempotent: (c) => c % 2 === 0 });
  const seconds = (Date.now() - started) / 1000;
  assert.equal(acks.length, 400);
  const ordered = assertVersionsExactlyOnce(acks, 2);
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/many')).body;
  assert.equal(session.step, 400);
  assert.equal(session.version, 401);
  const perProcess = [0, 1, 2].map((i) => acks.filter((a) => a.process === i).length);
  assert.ok(perProcess.every((n) => n > 50), `every process stepped: ${perProcess}`);

  const expected = await replayAlone(t, body, ordered);
  for (const i of [0, 1, 2]) assertSameState(await fingerprintOn(cluster, stats, 'many', i), expected, `process ${i}`);
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(
    `cluster/consistency: ${acks.length} steps acknowledged in ${seconds.toFixed(1)} s (${(acks.length / seconds).toFixed(0)}/s), ` +
      `per process ${perProcess.join('/')}, requests ${stats.requests}, retries ${stats.retries}, 503s ${count503(stats)}, ` +
      `connection errors ${stats.connectionErrors}`,
  );
});

test('an Idempotency-Key sent to different processes steps once and answers alike; another body with it is 422', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  assert.equal((await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: sessionBody('idem') })).status, 201);
  const step = (process: number, key: string, k: number) =>
    httpRequest(cluster.agent, cluster.processes[process].url, '/v1/sessions/idem/step', {
      method: 'POST',
      json: { grads: gradientOf(0, k) },
      headers: { 'idempotency-key': key },
    });
  const strip = (answer: Record<string, unknown>) => ({ ...answer, replayed: undefined });

  // Sequentially: the first process steps, the others find its answer.
  const first = await step(0, 'seq-key', 0);
  assert.equal(first.status, 200, first.text);
  assert.deepEqual(first.body, { session: 'idem', step: 1, version: 2, staleness: 0 });
  for (const p of [1, 2, 0]) {
    const again = await step(p, 'seq-key', 0);
    assert.equal(again.status, 200, again.text);
    assert.equal(again.body.replayed, true);
    assert.deepEqual(strip(again.body), strip(first.body), `process ${p} answers as the first`);
  }

  // Concurrently: every process at once, several times each; exactly one of them steps.
  const rounds = 5;
  let replays = 0;
  for (let round = 0; round < rounds; round++) {
    const key = `concurrent-${round}`;
    const answers = await Promise.all([0, 1, 2, 0, 1, 2].map((p) => step(p, key, round + 1)));
    for (const a of answers) assert.equal(a.status, 200, a.text);
    const fresh = answers.filter((a) => !a.body.replayed);
    assert.equal(fresh.length, 1, `one of six concurrent requests with ${key} stepped`);
    replays += answers.length - 1;
    for (const a of answers) assert.deepEqual(strip(a.body), strip(fresh[0].body));
    assert.equal(fresh[0].body.version, round + 3);
  }

  // An answer lost on the way: the client hangs up as soon as its request is out; the step lands anyway, and
  // the retry on another process finds it instead of stepping again.
  const lostKey = 'lost-answer';
  await new Promise<void>((resolve, reject) => {
    const payload = JSON.stringify({ grads: gradientOf(0, 50) });
    const req = http.request(`${cluster.processes[0].url}/v1/sessions/idem/step`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload), 'idempotency-key': lostKey },
    });
    req.on('error', () => {}); // the hang-up below
    req.on('response', () => reject(new Error('the answer arrived before the hang-up; the test needs it lost')));
    req.end(payload, () => {
      req.destroy();
      resolve();
    });
  });
  let landed = false;
  for (let i = 0; i < 100 && !landed; i++) {
    landed = (await requestWithRetry(cluster, stats, '/v1/sessions/idem', { prefer: 2 })).body.version === 3 + rounds;
    if (!landed) await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(landed, 'the step whose answer was lost was applied');
  const retried = await step(1, lostKey, 50);
  assert.equal(retried.status, 200, retried.text);
  assert.deepEqual(retried.body, { session: 'idem', step: 2 + rounds, version: 3 + rounds, staleness: 0, replayed: true });

  // The same key with another body: refused on every process, nothing moves.
  for (const p of [0, 1, 2]) {
    const other = await step(p, 'seq-key', 99);
    assert.equal(other.status, 422, other.text);
    assert.equal(other.body.code, 'IDEMPOTENCY_KEY_REUSED');
  }
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/idem')).body;
  assert.equal(session.version, 3 + rounds);
  assert.equal(session.step, 2 + rounds);
  const log = await cluster.sql<{ n: number }>('SELECT count(*)::int AS n FROM step_log');
  assert.equal(log[0].n, 2 + rounds, 'the log holds one entry per key');
  console.log(`cluster/idempotency: ${2 + rounds} steps from ${6 + rounds * 6} requests, ${4 + replays} replayed answers (one after a lost answer), 3 refused with 422`);
});
