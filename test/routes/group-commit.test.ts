// Group commit: steps that wait in one process are committed as one statement, each answered with its own
// version after the commit, the kernel applying them in version order. What a user sees: every step has its
// version and the parameters of that version, the state is that of the same steps one at a time (also when
// rebuilt from the log), refused steps are refused alone, a key's retry gets its first answer, and /metrics
// counts fewer commits than steps.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bits, buildTestApp, randomData, TEST_DB_KIND } from '../helper.ts';

type App = Awaited<ReturnType<typeof buildTestApp>>['app'];

const params = [{ name: 'w', shape: [5, 3], data: randomData(15, 1) }, { name: 'b', shape: [3], data: randomData(3, 2) }];
const grads = (k: number) => ({ w: randomData(15, 100 + k), b: randomData(3, 200 + k) });

async function create(app: App, name: string, extra: Record<string, unknown> = {}) {
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params, hyperparameters: { lr: 0.05, t0: 3, weight_decay: 0.01 }, ...extra } });
  assert.equal(res.statusCode, 201, res.body);
}

const paramBits = (body: { params: Record<string, { data: number[] }> }) => Object.fromEntries(Object.entries(body.params).map(([k, v]) => [k, bits(v.data)]));

function sample(text: string, name: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ').pop()) : 0;
}

test('concurrent steps commit in batches: each answered with its own version and parameters, equal to the same steps one at a time', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'g');
  const N = 24;
  const answers = await Promise.all(Array.from({ length: N }, (_, k) => app.inject({
    method: 'POST', url: '/v1/sessions/g/step?return=params',
    headers: k % 2 ? { 'idempotency-key': `key-${k}` } : {},
    payload: { grads: grads(k), metrics: { k } },
  })));
  for (const a of answers) assert.equal(a.statusCode, 200, a.body);
  const versions = answers.map((a) => a.json().version as number);
  assert.deepEqual([...versions].sort((a, b) => a - b), Array.from({ length: N }, (_, i) => i + 2), 'one version each, no gap');
  const commits = sample((await app.inject({ url: '/metrics' })).body, 'asgd_step_batch_size_count');
  const stepped = sample((await app.inject({ url: '/metrics' })).body, 'asgd_step_batch_size_sum');
  assert.equal(stepped, N);
  // PGlite answers in-process, often before the next request is parsed: batches form there under load only.
  if (TEST_DB_KIND === 'postgres') assert.ok(commits < N, `${commits} commits for ${N} steps: no batch formed`);

  // The same gradients one at a time, in the order of the versions they got, on a second session.
  await create(app, 'one');
  const byVersion = answers.map((a, k) => ({ k, version: a.json().version as number, body: a.json() })).sort((a, b) => a.version - b.version);
  for (const { k, version, body } of byVersion) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/one/step?return=params', payload: { grads: grads(k) } });
    assert.equal(res.json().version, version);
    assert.deepEqual(paramBits(body), paramBits(res.json()), `parameters answered at version ${version}`);
  }
  // The series has each step's own metrics at its version; the state rebuilt from the log is the same.
  const series = (await app.inject({ url: '/v1/sessions/g/metrics?limit=100' })).json().points as { version: number; values: { k: number } }[];
  assert.deepEqual(series.map((p) => [p.version, p.values.k]), byVersion.map((b) => [b.version, b.k]));
  const live = (await app.inject({ url: '/v1/sessions/g/state_dict' })).json();
  app.sessions.dropCache();
  assert.deepEqual((await app.inject({ url: '/v1/sessions/g/state_dict' })).json(), live);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/one/state_dict' })).json().state, live.state);
});

test('in a batch, a refused step is refused alone: stale gradients get 409, a bad gradient 400, the others commit', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 's', { max_staleness: 0 });
  const bad = { w: randomData(15, 7), b: [1, Number.NaN, 2].map(String) };
  const answers = await Promise.all(Array.from({ length: 12 }, (_, k) => app.inject({
    method: 'POST', url: '/v1/sessions/s/step',
    payload: k === 5 ? { grads: bad, base_version: 1 } : { grads: grads(k), base_version: 1 },
  })));
  const codes = answers.map((a) => a.statusCode);
  assert.equal(codes[5], 400, answers[5].body);
  // base_version 1 with max_staleness 0: exactly one step can be applied at version 1.
  assert.equal(codes.filter((c) => c === 200).length, 1, codes.join(','));
  for (const a of answers.filter((x, k) => k !== 5 && x.statusCode !== 200)) {
    assert.equal(a.statusCode, 409, a.body);
    assert.equal(a.json().code, 'STALE_GRADIENT');
  }
  const session = (await app.inject({ url: '/v1/sessions/s' })).json();
  assert.equal(session.version, 2);
  assert.equal(session.step, 1);
});

test('a retry of a key in flight gets the first answer, in the same batch or a later one, and costs no version', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'k');
  const send = (key: string, k: number) => app.inject({
    method: 'POST', url: '/v1/sessions/k/step?return=params', headers: { 'idempotency-key': key }, payload: { grads: grads(k) },
  });
  const answers = await Promise.all([send('a', 0), send('b', 1), send('a', 0), send('c', 2), send('a', 0), send('b', 1)]);
  for (const a of answers) assert.equal(a.statusCode, 200, a.body);
  const [a1, b1, a2, c1, a3, b2] = answers.map((a) => a.json());
  for (const again of [a2, a3]) {
    assert.equal(again.version, a1.version);
    assert.deepEqual(paramBits(again), paramBits(a1));
  }
  assert.equal(b2.version, b1.version);
  assert.equal(answers.map((a) => a.json()).filter((x) => x.replayed).length, 3);
  assert.deepEqual(new Set([a1.version, b1.version, c1.version]), new Set([2, 3, 4]));
  // The same key with another body is refused.
  const reused = await send('a', 9);
  assert.equal(reused.statusCode, 422, reused.body);
  assert.equal(reused.json().code, 'IDEMPOTENCY_KEY_REUSED');
  assert.equal((await app.inject({ url: '/v1/sessions/k' })).json().step, 3);
});

test('steps queued together on the service commit as one batch, in queue order, on either database', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'q');
  const answers = await Promise.all(Array.from({ length: 10 }, (_, k) =>
    app.sessions.step('q', { format: 'json', grads: grads(k) }, k === 3 ? { idempotencyKey: 'x', requestHash: 'h' } : {})));
  assert.deepEqual(answers.map((a) => a.version), Array.from({ length: 10 }, (_, k) => k + 2));
  const text = (await app.inject({ url: '/metrics' })).body;
  assert.equal(sample(text, 'asgd_step_batch_size_count'), 1);
  assert.equal(sample(text, 'asgd_step_batch_size_sum'), 10);
  await create(app, 'one');
  for (let k = 0; k < 10; k++) await app.inject({ method: 'POST', url: '/v1/sessions/one/step', payload: { grads: grads(k) } });
  const batched = (await app.inject({ url: '/v1/sessions/q/state_dict' })).json();
  assert.deepEqual(batched.state, (await app.inject({ url: '/v1/sessions/one/state_dict' })).json().state);
  app.sessions.dropCache();
  assert.deepEqual((await app.inject({ url: '/v1/sessions/q/state_dict' })).json(), batched);
});

test('a batch holds about 64 MiB of gradients: the steps beyond wait for the next batch, in order', async (t) => {
  const { app } = await buildTestApp(t);
  const n = 2 * 1024 * 1024; // 8 MiB a step: 8 steps fill a batch
  await app.sessions.create({
    name: 'big', params: [{ name: 'w', shape: [n] }], data: [new Float32Array(n).fill(0.5)],
    groups: [{ params: [0], lr: 0.01, lambd: 1e-4, alpha: 0.75, t0: 1e6, weight_decay: 0, maximize: false }],
    snapshotEvery: 1000, keepSnapshots: 2, maxStaleness: null, keepLogBytes: null, expireAfterIdleS: null, aggregation: null,
  });
  // JSON gradients: their size is known only once decoded, so the bound is applied as they are packed.
  const grad = (k: number) => ({ w: Array.from({ length: n }, (_, i) => ((i % 7) - 3) * 0.001 * (k + 1)) });
  const answers = await Promise.all(Array.from({ length: 10 }, (_, k) => app.sessions.step('big', { format: 'json', grads: grad(k) })));
  assert.deepEqual(answers.map((a) => a.version), Array.from({ length: 10 }, (_, k) => k + 2));
  const text = (await app.inject({ url: '/metrics' })).body;
  assert.equal(sample(text, 'asgd_step_batch_size_sum'), 10);
  assert.equal(sample(text, 'asgd_step_batch_size_count'), 2, 'a batch of 8, then one of 2');
  // The same as one at a time: the state rebuilt from the log equals the live one.
  const live = (await app.inject({ url: '/v1/sessions/big/params?format=safetensors', headers: { accept: 'application/x-safetensors' } })).rawPayload;
  app.sessions.dropCache();
  assert.ok(live.equals((await app.inject({ url: '/v1/sessions/big/params?format=safetensors', headers: { accept: 'application/x-safetensors' } })).rawPayload));
});
