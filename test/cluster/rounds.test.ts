// Synchronous rounds (issue 13) across three service processes on one PostgreSQL database: three workers,
// each on its own process, contribute deterministic gradients (some parameters missing from some
// contributions, one round in which nobody sends `b`); the session's parameters, ax and state_dict must
// equal real torch (torch.optim.ASGD, 1.13) stepped with the documented mean of the same gradients, bit for
// bit, and every round must step exactly once, also when a process is killed (kill -9) in the middle.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { randomData, TEST_DB_KIND } from '../helper.ts';
import { Cluster, count503, newStats, requestWithRetry, type ClientStats } from '../support/cluster.ts';
import { hexOf, runTorchReference, skipWithoutTorch, type TorchResult } from '../support/torch.ts';

const skip = TEST_DB_KIND !== 'postgres' ? 'the cluster tests need PostgreSQL' : skipWithoutTorch();
const timeout = 300_000;

/** Arrival does not matter; byte order does: w0 < wB < wa (a locale's collation would put wa before wB). */
const WORKERS = ['wB', 'w0', 'wa'];
const BYTE_ORDER = [...WORKERS].sort();
const SHAPES: Record<string, number[]> = { w: [4, 6], b: [6], s: [3] };
const HYPERPARAMETERS = { lr: 0.05, lambd: 1e-3, alpha: 0.75, t0: 10, weight_decay: 0.01 };

type Grads = Record<string, number[] | null>;

function sessionBody(name: string) {
  return {
    name,
    params: Object.entries(SHAPES).map(([p, shape], i) => ({ name: p, shape, data: randomData(shape.reduce((a, b) => a * b, 1), 1 + i) })),
    hyperparameters: HYPERPARAMETERS,
    aggregation: { contributions: 3 },
  };
}

/**
 * A worker's gradient in round r. Some contributions lack `w` or `b`; in round 13 nobody sends `b` (so the
 * round's step skips it). `s` is always sent, and its first three elements cancel pairwise across the
 * three workers: their float32 sums depend on the order of the additions, so a wrong order shows.
 */
function gradientOf(round: number, worker: string): Grads {
  const w = WORKERS.indexOf(worker);
  const grads: Grads = {};
  Object.entries(SHAPES).forEach(([p, shape], i) => {
    const missing = p !== 's' && ((round + 3 * w + i) % 7 === 0 || (p === 'b' && round === 13));
    grads[p] = missing ? null : randomData(shape.reduce((a, b) => a * b, 1), 1000 + round * 100 + w * 10 + i, 0.5);
  });
  const rank = BYTE_ORDER.indexOf(worker);
  const cancelling = [[1, 1e8, -1e8], [1e8, 1, -1e8], [1e8, -1e8, 1]];
  for (let k = 0; k < 3; k++) grads.s![k] = cancelling[k][rank];
  return grads;
}

interface WorkerOptions {
  /** ?wait= seconds (default 20). */
  wait?: number;
  /** Awaited before the worker sends its contribution to `round`. */
  beforeRound?: (round: number) => Promise<void> | undefined;
}

/** One worker's loop: contribute at the version it holds, follow 202 by re-POSTing with the same key, go on at v+1. */
async function runWorker(cluster: Cluster, stats: ClientStats, session: string, worker: string, rounds: number, opts: WorkerOptions = {}) {
  const index = WORKERS.indexOf(worker);
  let version = 1;
  let pending = 0;
  let params: unknown = null;
  for (let round = 0; round < rounds; round++) {
    await opts.beforeRound?.(round);
    const json = { grads: gradientOf(round, worker), base_version: version, worker };
    for (;;) {
      const res = await requestWithRetry(cluster, stats, `/v1/sessions/${session}/step?wait=${opts.wait ?? 20}&return=params`, {
        method: 'POST', json, headers: { 'idempotency-key': `${session}-${worker}-${round}` }, prefer: index, deadlineMs: 120_000,
      });
      if (res.status === 202) {
        pending++;
        assert.equal(res.body.round.version, version, `${worker}: a 202 names the round it waits in`);
        continue;
      }
      assert.equal(res.status, 200, res.text);
      const { params: answered, param_groups: groups, ...answer } = res.body;
      if (answer.replayed) stats.replayed++;
      // With the parameters, the groups' hyperparameters (the session's, unchanged here).
      assert.equal(groups.length, 1);
      assert.equal(groups[0].lr, HYPERPARAMETERS.lr, `${worker}, round ${round}: param_groups`);
      assert.deepEqual({ ...answer, replayed: undefined }, {
        session, step: round + 1, version: version + 1, staleness: 0, round: { version, contributions: 3, samples: null, timed_out: false }, replayed: undefined,
      }, `${worker}, round ${round}`);
      version = answer.version;
      params = answered;
      break;
    }
  }
  return { version, pending, params };
}

function reference(rounds: number): TorchResult {
  const body = sessionBody('reference');
  return runTorchReference({
    params: body.params,
    defaults: HYPERPARAMETERS,
    steps: Array.from({ length: rounds }, (_, round) => BYTE_ORDER.map((worker) => gradientOf(round, worker))),
  });
}

/** Parameters, ax and the state_dict as `index` serves them, against torch's, bit for bit. */
async function assertTorchState(cluster: Cluster, stats: ClientStats, session: string, index: number, ref: TorchResult) {
  const get = async (path: string) => (await requestWithRetry(cluster, stats, `/v1/sessions/${session}/${path}`, { prefer: index, only: true })).body;
  const params = (await get('params')).params;
  const averaged = (await get('params?averaged=true')).params;
  const sd = await get('state_dict');
  for (const name of Object.keys(SHAPES)) {
    assert.deepEqual(hexOf(params[name].data), ref.params[name], `process ${index}: ${name}`);
    assert.deepEqual(hexOf(averaged[name].data), ref.averaged[name], `process ${index}: ax of ${name}`);
  }
  assert.deepEqual(Object.keys(sd.state).sort(), Object.keys(ref.state).sort());
  for (const [k, s] of Object.entries(ref.state)) {
    const mine = sd.state[k];
    assert.deepEqual([hexOf([mine.step])[0], hexOf([mine.eta])[0], hexOf([mine.mu])[0]], [s.step, s.eta, s.mu], `process ${index}: state ${k}`);
    assert.deepEqual(hexOf(mine.ax.data), s.ax, `process ${index}: state ${k} ax`);
  }
}

/** Every round stepped once, with all three contributions, and nothing is left behind. */
async function assertRoundsOnce(cluster: Cluster, session: string, rounds: number) {
  const history = await cluster.sql<{ version: string; step: string; round: { contributions: number; timed_out: boolean } }>(
    'SELECT h.version, h.step, h.round FROM step_history h JOIN sessions s ON s.id = h.session_id WHERE s.name = $1 ORDER BY h.version',
    [session],
  );
  assert.deepEqual(history.map((h) => [Number(h.version), Number(h.step), h.round.contributions, h.round.timed_out]), Array.from({ length: rounds }, (_, r) => [r + 2, r + 1, 3, false]));
  const log = await cluster.sql<{ n: string }>('SELECT count(*) AS n FROM step_log l JOIN sessions s ON s.id = l.session_id WHERE s.name = $1 AND l.version > 1', [session]);
  assert.ok(Number(log[0].n) <= rounds);
  assert.deepEqual(await cluster.sql('SELECT worker FROM round_contributions'), [], 'no contribution is left');
}

test('three workers on three processes, 50 rounds: parameters, ax and state_dict equal torch with the documented mean, bit for bit', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  const rounds = 50;
  const created = await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: sessionBody('rounds') });
  assert.equal(created.status, 201, created.text);
  const ref = reference(rounds);
  const results = await Promise.all(WORKERS.map((worker) => runWorker(cluster, stats, 'rounds', worker, rounds)));
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/rounds')).body;
  assert.deepEqual([session.step, session.version, session.round], [rounds, rounds + 1, null]);
  for (const i of [0, 1, 2]) await assertTorchState(cluster, stats, 'rounds', i, ref);
  // Every worker was answered the same parameters for the last round.
  assert.deepEqual(results[1].params, results[0].params);
  assert.deepEqual(results[2].params, results[0].params);
  await assertRoundsOnce(cluster, 'rounds', rounds);
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(`cluster/rounds: ${rounds} rounds of 3 workers on 3 processes, ${results.reduce((a, r) => a + r.pending, 0)} answers 202, ${stats.requests} requests`);
});

test('kill -9 of a process in the middle of rounds: retried contributions are answered once each, every round steps once, the state equals torch', { skip, timeout }, async (t) => {
  const cluster = await Cluster.start(t);
  const stats = newStats();
  const rounds = 30;
  const created = await requestWithRetry(cluster, stats, '/v1/sessions', { method: 'POST', json: sessionBody('crash-rounds') });
  assert.equal(created.status, 201, created.text);
  const ref = reference(rounds);
  // w0 contributes through process 1. In round 10 the others wait until w0's contribution is stored and
  // waiting there, then process 1 is killed: w0's retry (same Idempotency-Key) goes to another process,
  // which finds the stored contribution and waits on; with ?wait=1 and the others held 1.5 s more, it is
  // answered 202 first and re-POSTs. Then the others contribute and the round steps.
  const victim = cluster.processes[1];
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const killer = (async () => {
    const deadline = Date.now() + 60_000;
    while ((await cluster.sql("SELECT 1 FROM round_contributions WHERE worker = 'w0' AND version = 11")).length === 0) {
      assert.ok(Date.now() < deadline, 'w0 contributed to round 10');
      await new Promise((r) => setTimeout(r, 10));
    }
    victim.signal('SIGKILL');
    const exit = await victim.exited;
    await new Promise((r) => setTimeout(r, 1500));
    release();
    return exit;
  })();
  const results = await Promise.all(WORKERS.map((worker) => runWorker(cluster, stats, 'crash-rounds', worker, rounds, {
    wait: 1,
    beforeRound: (round) => (round === 10 && worker !== 'w0' ? gate : undefined),
  })));
  assert.equal((await killer).signal, 'SIGKILL');
  assert.ok(stats.connectionErrors > 0, 'the worker of the killed process lost its connection and retried elsewhere');
  assert.ok(results[1].pending > 0, 'w0 waited on another process (202) for the round its stored contribution is in');
  assert.ok(stats.replayed > 0, 'w0 was answered for the contribution the killed process had stored');
  const session = (await requestWithRetry(cluster, stats, '/v1/sessions/crash-rounds')).body;
  assert.deepEqual([session.step, session.version, session.round], [rounds, rounds + 1, null]);
  for (const r of results) assert.equal(r.version, rounds + 1);
  await assertRoundsOnce(cluster, 'crash-rounds', rounds);
  for (const i of [0, 2]) await assertTorchState(cluster, stats, 'crash-rounds', i, ref);
  // Back on its port, the killed process rebuilds the state from the database alone.
  await cluster.restart(1);
  await assertTorchState(cluster, stats, 'crash-rounds', 1, ref);
  assert.deepEqual(stats.unexpected, []);
  assert.equal(cluster.crashes(), 0);
  console.log(
    `cluster/rounds kill -9: ${rounds} rounds, retries ${stats.retries}, connection errors ${JSON.stringify(stats.connectionCodes)}, 503s ${count503(stats)}, ` +
      `${stats.replayed} answers replayed from an Idempotency-Key, ${results.reduce((a, r) => a + r.pending, 0)} answers 202`,
  );
});
