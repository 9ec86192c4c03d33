// RemoteASGD's stale-gradient policy (onStale, as the Python client's on_stale) and its way on after a
// RoundPending, against a live service: a worker whose gradient is refused as stale (max_staleness, or a
// round that stepped without it after timeout_s) goes on with 'pull' inside model.fit, and stops with
// 'raise'; after maxRoundWaitMs, resumeRound() and the next minimize wait for the round the worker is in.
import assert from 'node:assert/strict';
import test from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { ASGDClient, RoundPending, StaleGradient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

const NAMES = ['k', 'b'];

function model(seed: number) {
  const m = tf.sequential();
  m.add(tf.layers.dense({ units: 1, inputShape: [3], kernelInitializer: tf.initializers.glorotUniform({ seed }) }));
  return m;
}

function batches(n: number) {
  const xs = tf.tensor2d(Array.from({ length: n * 3 }, (_, i) => Math.sin(i + 1)), [n, 3]);
  const ys = tf.tensor2d(Array.from({ length: n }, (_, i) => Math.cos(i)), [n, 1]);
  return { xs, ys };
}

async function valuesOf(m: tf.LayersModel): Promise<number[][]> {
  return Promise.all(m.trainableWeights.map(async (w) => Array.from(await w.read().data())));
}

async function sessionValues(client: ASGDClient, session: string): Promise<number[][]> {
  const p = await client.params(session);
  return NAMES.map((n) => Array.from(p.params[n].data));
}

const fit = (m: tf.LayersModel, opt: RemoteASGD, n: number) => {
  const { xs, ys } = batches(n);
  return m.fit(xs, ys, { epochs: 1, batchSize: 4, shuffle: false, verbose: 0, callbacks: [opt.callback] }).finally(() => tf.dispose([xs, ys]));
};

test('RemoteASGD onStale and RoundPending', async (t) => {
  const lines: string[] = [];
  const logger = { warn: (m: string) => lines.push(`warn ${m}`), info: (m: string) => lines.push(`info ${m}`) };
  const { client, url } = await liveService({ retryBudgetMs: 30_000, logger });

  await t.test("max_staleness: with onStale 'pull' (the default) model.fit drops the stale gradient, loads the session's parameters and goes on; 'raise' ends it", async () => {
    const session = uniqueName('stale-fit');
    const [ma, mb, mc] = [model(1), model(1), model(1)];
    const a = new RemoteASGD({ client, session, hyperparameters: { lr: 0.05 }, sessionSettings: { max_staleness: 0 } });
    const b = new RemoteASGD({ client, session });
    const c = new RemoteASGD({ client, session, onStale: 'raise' });
    assert.equal(b.onStale, 'pull');
    await a.attach(ma.trainableWeights, NAMES);
    await b.attach(mb.trainableWeights, NAMES);
    await c.attach(mc.trainableWeights, NAMES);
    for (const [m, o] of [[ma, a], [mb, b], [mc, c]] as const) m.compile({ optimizer: o, loss: 'meanSquaredError' });
    await fit(ma, a, 8); // two steps: the session is at version 3, b and c still hold version 1
    assert.equal(a.version, 3);

    // b's first gradient (version 1) is refused, as staleness 2 > max_staleness 0: dropped, b loads version 3;
    // its second batch is computed at version 3 and applied. The learning rate set for the dropped step goes with the next.
    b.nextParamGroups = [{ lr: 0.02 }];
    await fit(mb, b, 8);
    assert.equal(b.staleDropped, 1);
    assert.ok(b.lastStale instanceof StaleGradient && b.lastStale.version === 3, String(b.lastStale));
    // What the user reads: a warning for the drop, naming the worker and the version loaded; created and joined as notices.
    const about = lines.filter((l) => l.includes(`session ${session}`));
    assert.deepEqual(about.filter((l) => l.startsWith('warn')).map((l) => l.replace(/\(.*?\)(?=; loaded)/, '(…)')),
      [`warn [${b.worker}] session ${session}: gradient dropped as stale (…); loaded the parameters at version 3 (1 dropped so far)`]);
    assert.deepEqual(about.filter((l) => l.startsWith('info')).map((l) => l.split(' at ')[0]),
      [`info [${a.worker}] session ${session} created`, `info [${b.worker}] session ${session} joined`, `info [${c.worker}] session ${session} joined`]);
    assert.equal(b.version, 4);
    assert.deepEqual([b.lastStep!.version, b.lastStep!.staleness], [4, 0]);
    const info = await client.getSession(session);
    assert.deepEqual([info.step, info.version, info.param_groups[0].lr], [3, 4, 0.02]);
    assert.deepEqual(await valuesOf(mb), await sessionValues(client, session), "b's variables hold the session's parameters");

    // 'raise': c's fit ends with the StaleGradient, its variables are left at version 1.
    await assert.rejects(fit(mc, c, 8), (err: unknown) => err instanceof StaleGradient && err.version === 4);
    assert.deepEqual([c.staleDropped, c.version], [0, 1]);
    assert.throws(() => new RemoteASGD({ client, session, onStale: 'apply' as 'pull' }), RangeError);
  });

  await t.test('pipelined steps: a learning rate set for a step dropped as stale goes with the step queued behind it, and never comes back after a newer one', async () => {
    // Found by a review: the dropped step's lr was given back to nextParamGroups, which the step already
    // queued behind it had read, so that one went without it; and it came back after that step's newer lr.
    for (const [i, newer] of [undefined, 0.03].entries()) {
      const session = uniqueName('lr-drop');
      const w = tf.variable(tf.tensor([1, 2, 3, 4]), true, `lr-drop-w${i}`);
      const opt = new RemoteASGD({ client, session, hyperparameters: { lr: 0.1 }, sessionSettings: { max_staleness: 0 } });
      await opt.attach([w], ['w']);
      const g = tf.tensor([1, 1, 1, 1]);
      opt.applyGradients({ [w.name]: g }); // P, at version 1
      opt.nextParamGroups = [{ lr: 0.02 }];
      opt.applyGradients({ [w.name]: g }); // A, at version 1: stale once P lands (max_staleness 0)
      while (opt.version === 1) await new Promise((r) => setImmediate(r));
      if (newer !== undefined) opt.nextParamGroups = [{ lr: newer }];
      opt.applyGradients({ [w.name]: g }); // B, at version 2: queued behind A
      await opt.synchronize();
      assert.equal(opt.staleDropped, 1);
      opt.applyGradients({ [w.name]: g }); // C: sets nothing
      await opt.synchronize();
      const changes = (await client.hyperparameterChanges(session)).changes.map((c) => [c.version, c.param_groups[0].lr]);
      // B carries A's 0.02 (or its own newer 0.03); C changes nothing.
      assert.deepEqual(changes, [[3, newer ?? 0.02]], JSON.stringify(changes));
      assert.equal((await client.getSession(session)).param_groups[0].lr, newer ?? 0.02);
      tf.dispose([w, g]);
    }
  });

  await t.test('a step refused for its hyperparameters (a negative lr) is thrown by synchronize(); the steps after it do not send that value again', async () => {
    const session = uniqueName('bad-lr');
    const w = tf.variable(tf.tensor([1, 2, 3, 4]), true, 'bad-lr-w');
    const opt = new RemoteASGD({ client, session, hyperparameters: { lr: 0.1 } });
    await opt.attach([w], ['w']);
    const g = tf.tensor([1, 1, 1, 1]);
    opt.nextParamGroups = [{ lr: -1 }];
    opt.applyGradients({ [w.name]: g });
    await assert.rejects(opt.synchronize(), (err: unknown) => err instanceof Error && /lr/.test(err.message));
    opt.applyGradients({ [w.name]: g });
    await opt.synchronize(); // before the fix: refused again, for the -1 it carried
    const info = await client.getSession(session);
    assert.deepEqual([info.version, info.param_groups[0].lr], [2, 0.1]);
    tf.dispose([w, g]);
  });

  await t.test('workers started at once with the same arguments: one creates the session, the others join it; none fails', async () => {
    const session = uniqueName('together');
    const workers = [0, 1, 2, 3].map(() => new RemoteASGD({ client, session, hyperparameters: { lr: 0.05 } }));
    const models = workers.map(() => model(3));
    await Promise.all(workers.map((w, i) => w.attach(models[i].trainableWeights, NAMES)));
    const about = lines.filter((l) => l.includes(`session ${session} `));
    assert.equal(about.filter((l) => / created at /.test(l)).length, 1, about.join('\n'));
    assert.equal(about.filter((l) => / joined at /.test(l)).length, 3, about.join('\n'));
    for (const m of models) assert.deepEqual(await valuesOf(m), await sessionValues(client, session));
  });

  await t.test('a retry says so: a 503 answered once is retried with a warning naming the request and the budget left', async () => {
    const seen: string[] = [];
    let refuse = 1;
    const flaky: typeof fetch = async (input, init) => {
      if (String(input).includes('/step') && refuse-- > 0) return new Response('{"code":"SERVICE_UNAVAILABLE"}', { status: 503, statusText: 'Service Unavailable', headers: { 'retry-after': '0' } });
      return fetch(input, init);
    };
    const flakyClient = new ASGDClient(url, { fetch: flaky, retryBudgetMs: 30_000, logger: { warn: (m) => seen.push(m) } });
    const session = uniqueName('retry-log');
    await flakyClient.createSession({ name: session, params: [{ name: 'w', shape: [2], data: [1, 2] }] });
    const r = await flakyClient.step(session, { w: Float32Array.of(0.5, 0.5) });
    assert.equal(r.attempts, 2);
    assert.equal(seen.length, 1, seen.join('\n'));
    assert.match(seen[0], new RegExp(`^POST ${url}/v1/sessions/${session}/step.*: 503 Service Unavailable; retry 1 \\(\\d+ s of the retry budget left\\)$`));
    const silent = new ASGDClient(url, { logger: null });
    assert.equal(silent.http.logger, null);
  });

  await t.test("a worker late for a round that stepped after timeout_s: 'pull' drops its contribution and it joins the next round inside model.fit", async () => {
    const session = uniqueName('stale-round');
    const [m0, m1] = [model(2), model(2)];
    const w0 = new RemoteASGD({ client, session, worker: 'w0', sessionSettings: { aggregation: { contributions: 2, timeout_s: 1, min_contributions: 1 } } });
    const w1 = new RemoteASGD({ client, session, worker: 'w1' });
    await w0.attach(m0.trainableWeights, NAMES);
    await w1.attach(m1.trainableWeights, NAMES);
    m1.compile({ optimizer: w1, loss: 'meanSquaredError' });
    // w0 alone: the round at version 1 steps after timeout_s with one contribution.
    const { xs, ys } = batches(4);
    w0.minimize(() => tf.losses.meanSquaredError(ys, m0.predict(xs) as tf.Tensor) as tf.Scalar);
    await w0.synchronize();
    tf.dispose([xs, ys]);
    assert.deepEqual([w0.version, w0.lastStep!.round?.timed_out, w0.lastStep!.round?.contributions], [2, true, 1]);

    // w1 (at version 1) fits two batches: the first is late (STALE_GRADIENT), the second joins round 2.
    await fit(m1, w1, 8);
    assert.equal(w1.staleDropped, 1);
    assert.equal(w1.version, 3);
    assert.deepEqual([w1.lastStep!.round?.version, w1.lastStep!.round?.contributions], [2, 1]);
    assert.deepEqual([(await client.getSession(session)).step], [2]);
    assert.deepEqual(await valuesOf(m1), await sessionValues(client, session));
  });

  await t.test('after RoundPending: resumeRound() waits for the same round; the next minimize waits for it instead of contributing twice', async () => {
    const session = uniqueName('round-pending');
    const m = model(3);
    const opt = new RemoteASGD({ client, session, worker: 'w0', roundWaitSeconds: 1, maxRoundWaitMs: 0, sessionSettings: { aggregation: { contributions: 2 } } });
    await opt.attach(m.trainableWeights, NAMES);
    const { xs, ys } = batches(4);
    const loss = () => tf.losses.meanSquaredError(ys, m.predict(xs) as tf.Tensor) as tf.Scalar;
    /** The other worker's contribution to the round at `version`. */
    const other = (version: number) => client.step(session, { k: [0.5, -0.25, 1], b: [0.125] }, { baseVersion: version, worker: 'w1' });

    opt.minimize(loss);
    await assert.rejects(opt.synchronize(), RoundPending);
    assert.equal(opt.roundPending, true);
    assert.deepEqual((await client.getSession(session)).round?.workers, ['w0'], 'the contribution stays in the round');
    const resumed = opt.resumeRound({ maxWaitMs: 60_000 });
    await new Promise((r) => setTimeout(r, 300));
    await other(1);
    assert.equal(await resumed, 2);
    assert.equal(opt.roundPending, false);
    assert.equal(opt.lastStep!.round?.contributions, 2);
    assert.deepEqual(await valuesOf(m), await sessionValues(client, session));

    // Round 2: RoundPending again; then minimize once more (its gradient is of version 2 as well): it is not
    // sent as a second contribution (DuplicateContribution), it waits for round 2.
    opt.minimize(loss);
    await assert.rejects(opt.synchronize(), RoundPending);
    opt.minimize(loss);
    const waiting = opt.synchronize().then(() => null, (e: unknown) => e);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual((await client.getSession(session)).round?.workers, ['w0']);
    await other(2);
    // Answered once the round steps, or (on a slow machine, past maxRoundWaitMs 0 after one 1 s wait) RoundPending again.
    const outcome = await waiting;
    if (outcome instanceof RoundPending) await opt.resumeRound();
    else assert.equal(outcome, null, 'no DuplicateContribution');
    assert.deepEqual([opt.version, opt.roundPending, opt.lastStep!.round?.contributions], [3, false, 2]);
    const info = await client.getSession(session);
    assert.deepEqual([info.step, info.version, info.round], [2, 3, null]);
    assert.deepEqual(await valuesOf(m), await sessionValues(client, session));
    tf.dispose([xs, ys]);
  });
});
