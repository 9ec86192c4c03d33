// Synchronous rounds (issue 13) through the HTTP API of one process: contributions, the 202 of a round that
// has not stepped, the answers once it has, timeouts, target_samples, and every bad contribution refused
// with the open round unchanged. The combined step is checked against a plain session stepped with the
// documented mean (computed here in float32); test/cluster/rounds.test.ts checks it against real torch.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { readSafetensors, streamToBuffer, writeSafetensors, type Tensor } from '../../src/formats/index.ts';
import { buildTestApp, randomData } from '../helper.ts';

type Grads = Record<string, number[] | null>;

const SHAPES: Record<string, number[]> = { w: [3, 4], b: [4] };

function sessionBody(name: string, aggregation: Record<string, unknown> | null) {
  return {
    name,
    params: [
      { name: 'w', shape: SHAPES.w, data: randomData(12, 1) },
      { name: 'b', shape: SHAPES.b, data: randomData(4, 2) },
    ],
    hyperparameters: { lr: 0.05, t0: 1, weight_decay: 0.01 },
    ...(aggregation && { aggregation }),
  };
}

const gradsOf = (seed: number): Grads => ({ w: randomData(12, 100 + seed), b: randomData(4, 200 + seed) });

/** The documented mean: the contributions that carry a parameter, in worker order, summed in float32, one division. */
function meanOf(contributions: Grads[]): Grads {
  const out: Grads = {};
  for (const name of Object.keys(SHAPES)) {
    const carriers = contributions.map((c) => c[name]).filter((g): g is number[] => Array.isArray(g));
    if (carriers.length === 0) continue;
    const s = Float32Array.from(carriers[0]);
    for (const g of carriers.slice(1)) for (let k = 0; k < s.length; k++) s[k] += g[k];
    if (carriers.length > 1) for (let k = 0; k < s.length; k++) s[k] /= carriers.length;
    out[name] = Array.from(s);
  }
  return out;
}

interface Contribution {
  worker?: string;
  grads: Grads;
  base?: number | null;
  key?: string;
  wait?: number;
  samples?: number;
  query?: string;
  extra?: Record<string, unknown>;
}

function contribute(app: FastifyInstance, name: string, c: Contribution) {
  const payload = { grads: c.grads, ...(c.base !== null && { base_version: c.base ?? 1 }), ...(c.worker !== undefined && { worker: c.worker }), ...(c.samples !== undefined && { samples: c.samples }), ...c.extra };
  const query = [`wait=${c.wait ?? 30}`, c.query].filter(Boolean).join('&');
  return app.inject({ method: 'POST', url: `/v1/sessions/${name}/step?${query}`, headers: c.key ? { 'idempotency-key': c.key } : {}, payload });
}

async function session(app: FastifyInstance, name: string) {
  const res = await app.inject({ url: `/v1/sessions/${name}` });
  assert.equal(res.statusCode, 200, res.body);
  return res.json();
}

/** The state a plain session reaches with these (mean) gradients, to compare with the session of rounds. */
async function assertSameState(app: FastifyInstance, name: string, steps: Grads[], message: string) {
  const ref = `${name}-reference`;
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody(ref, null) });
  assert.equal(created.statusCode, 201, created.body);
  for (const grads of steps) assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/${ref}/step`, payload: { grads } })).statusCode, 200);
  for (const part of ['params', 'params?averaged=true', 'state_dict']) {
    const mine = (await app.inject({ url: `/v1/sessions/${name}/${part}` })).json();
    const theirs = (await app.inject({ url: `/v1/sessions/${ref}/${part}` })).json();
    assert.deepEqual(mine.params ?? mine, theirs.params ?? theirs, `${message}: ${part}`);
  }
}

test('three contributions make one step, the mean in worker order; 202 and the open round meanwhile; keyed re-POSTs answered once', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('r', { contributions: 3 }) });
  assert.equal(created.statusCode, 201, created.body);
  assert.deepEqual([created.json().aggregation, created.json().round], [{ contributions: 3 }, null]);

  // Arrival order wb, wA, w_0; byte order wA < w_0 < wb (a locale's collation would differ). In b[0..2] two
  // of the three values cancel: the float32 sum depends on which pair is added first, so the order shows.
  const grads = { wb: gradsOf(1), wA: gradsOf(2), w_0: gradsOf(3) };
  [grads.wA.b![0], grads.w_0.b![0], grads.wb.b![0]] = [1, 1e8, -1e8]; // wA + w_0 first: 0; w_0 + wb first: 1
  [grads.wA.b![1], grads.w_0.b![1], grads.wb.b![1]] = [1e8, 1, -1e8]; // wA + wb first: 1
  [grads.wA.b![2], grads.w_0.b![2], grads.wb.b![2]] = [1e8, -1e8, 1]; // only wA + w_0 first: 1
  const first = await contribute(app, 'r', { worker: 'wb', grads: grads.wb, key: 'kb', wait: 1 });
  assert.equal(first.statusCode, 202, first.body);
  assert.equal(first.json().pending, true);
  assert.deepEqual({ ...first.json().round, age_s: 0 }, { version: 1, contributions: 1, samples: null, workers: ['wb'], age_s: 0 });
  const second = await contribute(app, 'r', { worker: 'wA', grads: grads.wA, key: 'ka', wait: 1, samples: 5 });
  assert.equal(second.statusCode, 202, second.body);
  assert.deepEqual(second.json().round.workers, ['wA', 'wb']);

  const open = await session(app, 'r');
  assert.deepEqual([open.version, open.step], [1, 0]);
  assert.deepEqual({ ...open.round, age_s: 0 }, { version: 1, contributions: 2, samples: 5, workers: ['wA', 'wb'], age_s: 0 });
  assert.ok(open.round.age_s >= 0);
  const listed = (await app.inject({ url: '/v1/sessions' })).json().sessions.find((s: { name: string }) => s.name === 'r');
  assert.deepEqual(listed.round.workers, ['wA', 'wb']);

  const third = await contribute(app, 'r', { worker: 'w_0', grads: grads.w_0, key: 'k0', query: 'return=params' });
  assert.equal(third.statusCode, 200, third.body);
  const answer = { session: 'r', step: 1, version: 2, staleness: 0, round: { version: 1, contributions: 3, samples: 5, timed_out: false } };
  const { params, param_groups: groups, ...rest } = third.json();
  assert.deepEqual(rest, answer);
  assert.equal(groups.length, 1, 'with the parameters, the groups\' hyperparameters');
  assert.equal(third.headers.etag, '"2"');
  // The re-POSTs of the pending ones: the round's answer, once.
  for (const [worker, key] of [['wb', 'kb'], ['wA', 'ka']] as const) {
    const again = await contribute(app, 'r', { worker, grads: grads[worker], key, ...(worker === 'wA' && { samples: 5 }) });
    assert.equal(again.statusCode, 200, again.body);
    assert.deepEqual(again.json(), { ...answer, replayed: true });
  }
  const after = await session(app, 'r');
  assert.deepEqual([after.version, after.step, after.round], [2, 1, null]);
  assert.deepEqual(params, (await app.inject({ url: '/v1/sessions/r/params' })).json().params);

  const mean = meanOf([grads.wA, grads.w_0, grads.wb]);
  assert.deepEqual(mean.b!.slice(0, 3), [0, 0, Math.fround(1 / 3)]);
  await assertSameState(app, 'r', [mean], 'one round');
  const metrics = (await app.inject({ url: '/metrics' })).body;
  assert.match(metrics, /asgd_rounds_completed_total\{session="r"\} 1/);
  assert.match(metrics, /asgd_round_contributions_sum 3/);
  assert.match(metrics, /asgd_round_wait_seconds_count 1/);
  assert.doesNotMatch(metrics, /asgd_rounds_timed_out_total\{session="r"\}/);
});

test('concurrent contributions wait for the round and are answered together: a missing parameter, a float16 contribution in safetensors', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('c', { contributions: 3 }) })).statusCode, 201);
  // w2 sends float16 values (exact in float32) as safetensors with worker and base_version in __metadata__.
  const half = { w: randomData(12, 7).map((x) => Math.round(x * 64) / 64), b: randomData(4, 8).map((x) => Math.round(x * 64) / 64) };
  const toHalf = (x: number) => {
    // Exact for these values (multiples of 1/64 in [-0.5, 0.5]): sign, exponent, 10-bit mantissa.
    const f = new Float32Array([x]);
    const u = new Uint32Array(f.buffer)[0];
    if ((u & 0x7fffffff) === 0) return (u >>> 16) & 0x8000;
    const exp = ((u >>> 23) & 0xff) - 127 + 15;
    return ((u >>> 16) & 0x8000) | (exp << 10) | ((u >>> 13) & 0x3ff);
  };
  const tensors: [string, Tensor][] = Object.entries(half).map(([name, data]) => [name, { dtype: 'float16', shape: SHAPES[name], data: Uint16Array.from(data, toHalf) } as unknown as Tensor]);
  const body = streamToBuffer(writeSafetensors(tensors, { worker: 'w2', base_version: '1' }));
  const grads = { w0: gradsOf(1), w1: { w: null, b: randomData(4, 9) } };
  const answers = await Promise.all([
    contribute(app, 'c', { worker: 'w1', grads: grads.w1, key: 'k1' }),
    app.inject({
      method: 'POST', url: '/v1/sessions/c/step?wait=30&return=params', payload: body,
      headers: { 'content-type': 'application/x-safetensors', accept: 'application/x-safetensors', 'idempotency-key': 'k2' },
    }),
    contribute(app, 'c', { worker: 'w0', grads: grads.w0, key: 'k0' }),
  ]);
  // The safetensors answer: the new parameters, the round in its metadata.
  const file = readSafetensors(answers[1].rawPayload);
  assert.deepEqual([file.metadata.get('version'), JSON.parse(file.metadata.get('round')!)], ['2', { version: 1, contributions: 3, samples: null, timed_out: false }]);
  answers.splice(1, 1);
  for (const res of answers) {
    assert.equal(res.statusCode, 200, res.body);
    assert.deepEqual(res.json(), { session: 'c', step: 1, version: 2, staleness: 0, round: { version: 1, contributions: 3, samples: null, timed_out: false } });
  }
  await assertSameState(app, 'c', [meanOf([grads.w0, grads.w1, half])], 'float16 and a missing parameter');
});

test('timeout_s: a round with one worker missing steps with the others\' mean; the late worker is stale', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('late', { contributions: 3, timeout_s: 1, min_contributions: 2 }) });
  assert.equal(created.statusCode, 201, created.body);
  const grads = { a: gradsOf(1), b: gradsOf(2), c: gradsOf(3) };
  const answers = await Promise.all([
    contribute(app, 'late', { worker: 'a', grads: grads.a, key: 'ka' }),
    contribute(app, 'late', { worker: 'b', grads: grads.b, key: 'kb' }),
  ]);
  for (const res of answers) {
    assert.equal(res.statusCode, 200, res.body);
    assert.deepEqual(res.json().round, { version: 1, contributions: 2, samples: null, timed_out: true });
  }
  const late = await contribute(app, 'late', { worker: 'c', grads: grads.c, key: 'kc' });
  assert.equal(late.statusCode, 409, late.body);
  assert.equal(late.json().code, 'STALE_GRADIENT');
  assert.match(late.json().message, /^base_version: /);
  assert.equal(late.json().version, 2);
  assert.equal(late.json().replaced_at, undefined, 'late, not of a replaced state');
  await assertSameState(app, 'late', [meanOf([grads.a, grads.b])], 'two of three');
  assert.match((await app.inject({ url: '/metrics' })).body, /asgd_rounds_timed_out_total\{session="late"\} 1/);
});

test('below min_contributions a round keeps waiting after its timeout (202), and steps when the next worker arrives', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('min', { contributions: 4, timeout_s: 1, min_contributions: 3 }) });
  assert.equal(created.statusCode, 201, created.body);
  const grads = { a: gradsOf(1), b: gradsOf(2), c: gradsOf(3) };
  // Two contributions wait two seconds, past the timeout: too few to step.
  const waiting = await Promise.all([
    contribute(app, 'min', { worker: 'a', grads: grads.a, key: 'ka', wait: 2 }),
    contribute(app, 'min', { worker: 'b', grads: grads.b, key: 'kb', wait: 2 }),
  ]);
  for (const res of waiting) {
    assert.equal(res.statusCode, 202, res.body);
    assert.equal(res.json().round.contributions, 2);
  }
  assert.deepEqual((await session(app, 'min')).round.workers, ['a', 'b']);
  const third = await contribute(app, 'min', { worker: 'c', grads: grads.c, key: 'kc' });
  assert.equal(third.statusCode, 200, third.body);
  assert.deepEqual(third.json().round, { version: 1, contributions: 3, samples: null, timed_out: true });
  for (const [worker, key] of [['a', 'ka'], ['b', 'kb']] as const) {
    const again = await contribute(app, 'min', { worker, grads: grads[worker], key, wait: 2 });
    assert.equal(again.statusCode, 200, again.body);
    assert.deepEqual(again.json(), { ...third.json<object>(), replayed: true });
  }
  await assertSameState(app, 'min', [meanOf([grads.a, grads.b, grads.c])], 'three of four');
});

test('target_samples closes a round; each contribution must say its samples', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('ts', { contributions: 8, target_samples: 100 }) });
  assert.equal(created.statusCode, 201, created.body);
  const grads = [gradsOf(1), gradsOf(2), gradsOf(3)];
  const missing = await contribute(app, 'ts', { worker: 'x', grads: grads[0] });
  assert.equal(missing.statusCode, 400);
  assert.deepEqual([missing.json().code, missing.json().message.split(':')[0]], ['INVALID_BODY', 'samples']);
  assert.equal((await contribute(app, 'ts', { worker: 'w0', grads: grads[0], samples: 30, wait: 1, key: 'k0' })).statusCode, 202);
  assert.equal((await contribute(app, 'ts', { worker: 'w1', grads: grads[1], samples: 30, wait: 1, key: 'k1' })).statusCode, 202);
  assert.equal((await session(app, 'ts')).round.samples, 60);
  // In the query, as a file-bodied step would send it.
  const last = await contribute(app, 'ts', { grads: grads[2], query: 'worker=w2&samples=50' });
  assert.equal(last.statusCode, 200, last.body);
  assert.deepEqual(last.json().round, { version: 1, contributions: 3, samples: 110, timed_out: false });
  await assertSameState(app, 'ts', [meanOf(grads)], 'target_samples');
});

test('a round holds at most 1024 contributions: a target_samples round not reached steps at the 1024th, with the mean of them all (read a page at a time)', async (t) => {
  // A hostile review: a round with target_samples alone took 1,500 contributions and read all their
  // gradients at once when it stepped (319 MB to 1.2 GB); nothing capped them.
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('full', { target_samples: 1_000_000 }) });
  assert.equal(created.statusCode, 201, created.body);
  const grads = Array.from({ length: 1024 }, (_, i) => gradsOf(1000 + i));
  // Worker ids whose byte order is not their sending order.
  const worker = (i: number) => `w${String((i * 617) % 1024).padStart(4, '0')}`;
  for (let i = 0; i < 1023; i++) {
    const res = await contribute(app, 'full', { worker: worker(i), grads: grads[i], samples: 1, wait: 0 });
    assert.equal(res.statusCode, 202, res.body);
  }
  assert.equal((await session(app, 'full')).round.contributions, 1023);
  const last = await contribute(app, 'full', { worker: worker(1023), grads: grads[1023], samples: 1, wait: 0 });
  assert.equal(last.statusCode, 200, last.body);
  assert.deepEqual(last.json().round, { version: 1, contributions: 1024, samples: 1024, timed_out: false });
  const inWorkerOrder = grads.map((g, i) => ({ g, w: worker(i) })).sort((a, b) => (a.w < b.w ? -1 : 1)).map(({ g }) => g);
  await assertSameState(app, 'full', [meanOf(inWorkerOrder)], 'a full round');
});

test('one worker owns the schedule: a contribution without param_groups takes the round\'s, whichever comes first; two that differ conflict', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('owner', { contributions: 2 }) })).statusCode, 201);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('owner-ref', null) })).statusCode, 201);
  const rounds = [
    { lr: 0.02, first: 'a', grads: { a: gradsOf(1), b: gradsOf(2) } }, // the owner (a) sends first
    { lr: 0.005, first: 'b', grads: { a: gradsOf(3), b: gradsOf(4) } }, // the others' come first
  ];
  for (const [r, round] of rounds.entries()) {
    const base = r + 1;
    const owner = () => contribute(app, 'owner', { worker: 'a', grads: round.grads.a, base, extra: { param_groups: [{ lr: round.lr }] } });
    const other = () => contribute(app, 'owner', { worker: 'b', grads: round.grads.b, base });
    const answers = round.first === 'a' ? await Promise.all([owner(), other()]) : await Promise.all([other(), owner()]);
    for (const res of answers) assert.equal(res.statusCode, 200, res.body);
    const ref = await app.inject({ method: 'POST', url: '/v1/sessions/owner-ref/step', payload: { grads: meanOf([round.grads.a, round.grads.b]), param_groups: [{ lr: round.lr }] } });
    assert.equal(ref.statusCode, 200, ref.body);
    assert.equal((await session(app, 'owner')).param_groups[0].lr, round.lr, `round ${base}: the owner's lr`);
  }
  for (const part of ['params', 'params?averaged=true', 'state_dict']) {
    assert.deepEqual((await app.inject({ url: `/v1/sessions/owner/${part}` })).json(), { ...(await app.inject({ url: `/v1/sessions/owner-ref/${part}` })).json(), ...(part.startsWith('params') ? { session: 'owner' } : {}) }, part);
  }
  // Two contributions that both set the lr, differently: the second is refused, the round keeps the first.
  assert.equal((await contribute(app, 'owner', { worker: 'a', grads: gradsOf(5), base: 3, wait: 1, extra: { param_groups: [{ lr: 0.1 }] } })).statusCode, 202);
  const conflict = await contribute(app, 'owner', { worker: 'b', grads: gradsOf(6), base: 3, wait: 1, extra: { param_groups: [{ lr: 0.2 }] } });
  assert.equal(conflict.statusCode, 409, conflict.body);
  assert.equal(conflict.json().code, 'ROUND_CONFLICT');
  assert.equal((await session(app, 'owner')).round.contributions, 1);
});

test('contributions setting the same value, one as an int and one as a float (a JS and a Python worker), agree', async (t) => {
  // Found by a review: once a step's int literals were kept, t0 5 and 5.0 conflicted (409 ROUND_CONFLICT).
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('kinds', { contributions: 2 }) })).statusCode, 201);
  const raw = (worker: string, t0: string, k: number) => app.inject({
    method: 'POST', url: '/v1/sessions/kinds/step?wait=30', headers: { 'content-type': 'application/json' },
    payload: `{"grads": ${JSON.stringify(gradsOf(k))}, "base_version": 1, "worker": "${worker}", "param_groups": [{"t0": ${t0}}]}`,
  });
  const answers = await Promise.all([raw('a', '5', 1), raw('b', '5.0', 2)]);
  for (const res of answers) assert.equal(res.statusCode, 200, res.body);
  assert.equal((await session(app, 'kinds')).param_groups[0].t0, 5);
});

test('bad contributions and settings: 4xx naming the field, and the open round is unchanged', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('bad', { contributions: 3 }) })).statusCode, 201);
  const good = gradsOf(1);
  // w1 sets the lr for its round: another contribution setting a different one conflicts.
  assert.equal((await contribute(app, 'bad', { worker: 'w1', grads: good, key: 'k1', wait: 1, extra: { param_groups: [{ lr: 0.25 }] } })).statusCode, 202);
  const before = await session(app, 'bad');
  const paramsBefore = (await app.inject({ url: '/v1/sessions/bad/params' })).body;
  const nan = { ...good, b: [1, 2, 'NaN', 4] } as unknown as Grads;
  const metadataFile = (metadata: Record<string, string>) =>
    streamToBuffer(writeSafetensors([['b', { dtype: 'float32', shape: [4], data: Float32Array.from(good.b!) }]], metadata));
  const cases: [string, () => ReturnType<typeof contribute>, number, string, RegExp][] = [
    ['wrong shape', () => contribute(app, 'bad', { worker: 'w2', grads: { ...good, w: good.w!.slice(1) } }), 400, 'SHAPE_MISMATCH', /^grads\.w: /],
    ['NaN', () => contribute(app, 'bad', { worker: 'w2', grads: nan }), 422, 'NON_FINITE_GRADIENT', /^grads\.b: element 2/],
    ['unknown parameter', () => contribute(app, 'bad', { worker: 'w2', grads: { ...good, nope: [1] } }), 400, 'UNKNOWN_PARAMETER', /^grads\.nope: /],
    ['missing base_version', () => contribute(app, 'bad', { worker: 'w2', grads: good, base: null }), 400, 'INVALID_BODY', /^base_version: is required/],
    ['missing worker', () => contribute(app, 'bad', { grads: good }), 400, 'INVALID_BODY', /^worker: is required/],
    ['bad worker id', () => contribute(app, 'bad', { worker: 'a b', grads: good }), 400, 'INVALID_BODY', /^worker: /],
    ['bad worker id in the query', () => contribute(app, 'bad', { grads: good, query: `worker=${'x'.repeat(129)}` }), 400, 'INVALID_QUERY', /^worker: /],
    ['bad worker id in __metadata__', () => app.inject({ method: 'POST', url: '/v1/sessions/bad/step', headers: { 'content-type': 'application/x-safetensors' }, payload: metadataFile({ worker: 'ü', base_version: '1' }) }),
      400, 'INVALID_BODY', /^__metadata__\.worker: /],
    ['bad samples', () => contribute(app, 'bad', { worker: 'w2', grads: good, samples: 0 }), 400, 'INVALID_BODY', /^samples: /],
    ['bad wait', () => contribute(app, 'bad', { worker: 'w2', grads: good, query: 'wait=3601' }), 400, 'INVALID_QUERY', /^wait: /],
    ['duplicate worker', () => contribute(app, 'bad', { worker: 'w1', grads: gradsOf(2) }), 409, 'DUPLICATE_CONTRIBUTION', /^worker: "w1" has already contributed/],
    ['duplicate worker, another key', () => contribute(app, 'bad', { worker: 'w1', grads: good, key: 'other' }), 409, 'DUPLICATE_CONTRIBUTION', /^worker: /],
    ['base_version 0 (versions start at 1)', () => contribute(app, 'bad', { worker: 'w2', grads: good, base: 0 }), 400, 'INVALID_BODY', /^base_version: must be >= 1/],
    ['future base_version', () => contribute(app, 'bad', { worker: 'w2', grads: good, base: 5 }), 409, 'BASE_VERSION_AHEAD', /^base_version: 5 is newer than the session's version 1$/],
    ['param_groups conflict', () => contribute(app, 'bad', { worker: 'w2', grads: good, extra: { param_groups: [{ lr: 0.5 }] } }), 409, 'ROUND_CONFLICT', /^param_groups: /],
    ['bad param_groups', () => contribute(app, 'bad', { worker: 'w2', grads: good, extra: { param_groups: [{ lr: -1 }] } }), 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.lr: /],
    ['a key reused for another body', () => contribute(app, 'bad', { worker: 'w1', grads: gradsOf(3), key: 'k1' }), 422, 'IDEMPOTENCY_KEY_REUSED', /^Idempotency-Key: /],
    ['a key reused by another worker', () => contribute(app, 'bad', { worker: 'w2', grads: good, key: 'k1' }), 422, 'IDEMPOTENCY_KEY_REUSED', /^Idempotency-Key: /],
    ['If-Match', () => app.inject({ method: 'POST', url: '/v1/sessions/bad/step', headers: { 'if-match': '"7"' }, payload: { grads: good, base_version: 1, worker: 'w2' } }), 412, 'VERSION_MISMATCH', /^If-Match: /],
    ['PATCH aggregation while open', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 2 } } }), 409, 'ROUND_OPEN', /^aggregation: the round at version 1 has 1 contribution/],
    ['PATCH aggregation: null while open', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: null } }), 409, 'ROUND_OPEN', /^aggregation: /],
    ['PATCH min_contributions without timeout_s', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 3, min_contributions: 2 } } }), 400, 'INVALID_BODY', /^aggregation\.min_contributions: /],
    ['PATCH min_contributions above K', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 3, timeout_s: 5, min_contributions: 4 } } }), 400, 'INVALID_BODY', /^aggregation\.min_contributions: /],
    ['PATCH contributions 0', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 0 } } }), 400, 'INVALID_BODY', /^aggregation\.contributions: /],
    ['PATCH timeout_s 0', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 2, timeout_s: 0 } } }), 400, 'INVALID_BODY', /^aggregation\.timeout_s: must be > 0/],
    ['PATCH timeout_s -1', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 2, timeout_s: -1 } } }), 400, 'INVALID_BODY', /^aggregation\.timeout_s: must be > 0/],
    ['PATCH neither K nor target', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { timeout_s: 5 } } }), 400, 'INVALID_BODY', /^aggregation: needs contributions or target_samples/],
    ['PATCH unknown key', () => app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { aggregation: { contributions: 2, k: 1 } } }), 400, 'INVALID_BODY', /^aggregation\.k: /],
    ['create with a bad aggregation', () => app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('bad-2', { contributions: 2000 }) }), 400, 'INVALID_BODY', /^aggregation\.contributions: /],
  ];
  for (const [what, send, status, code, message] of cases) {
    const res = await send();
    assert.equal(res.statusCode, status, `${what}: ${res.body}`);
    assert.equal(res.json().code, code, what);
    assert.match(res.json().message, message, what);
    const now = await session(app, 'bad');
    assert.deepEqual({ ...now.round, age_s: 0 }, { ...before.round, age_s: 0 }, `${what}: the open round is unchanged`);
    assert.deepEqual([now.version, now.step, now.aggregation], [before.version, before.step, before.aggregation], what);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/bad/params' })).body, paramsBefore);
  // Other settings may change while a round is open.
  const patched = await app.inject({ method: 'PATCH', url: '/v1/sessions/bad', payload: { snapshot_every: 50 } });
  assert.equal(patched.statusCode, 200, patched.body);
  assert.deepEqual(patched.json().round.workers, ['w1']);
  // param_groups of the same effect as the round's (w1's lr 0.25) are no conflict.
  const same = await contribute(app, 'bad', { worker: 'w2', grads: gradsOf(4), extra: { param_groups: [{ lr: 0.25 }] }, wait: 1 });
  assert.equal(same.statusCode, 202, same.body);
});

test('a load voids the open round: its contributions are stale; aggregation: null makes steps plain again', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('v', { contributions: 2 }) })).statusCode, 201);
  const grads = gradsOf(1);
  assert.equal((await contribute(app, 'v', { worker: 'w1', grads, key: 'k1', wait: 1 })).statusCode, 202);
  const sd = (await app.inject({ url: '/v1/sessions/v/state_dict' })).json();
  const loaded = await app.inject({ method: 'PUT', url: '/v1/sessions/v/state_dict', payload: sd });
  assert.equal(loaded.statusCode, 200, loaded.body);
  assert.deepEqual([loaded.json().version, loaded.json().round], [2, null]);
  assert.equal((await session(app, 'v')).round, null);
  const again = await contribute(app, 'v', { worker: 'w1', grads, key: 'k1', wait: 1 });
  assert.equal(again.statusCode, 409, again.body);
  assert.equal(again.json().code, 'STALE_GRADIENT');
  // As a plain step's: of a state replaced at version 2 (a review: a worker could not tell it from being late).
  assert.equal(again.json().replaced_at, 2);
  assert.match(again.json().message, /before the session's state was replaced at version 2/);
  // No round open: aggregation may go; a step is a step again (worker and samples validated, then ignored).
  const plain = await app.inject({ method: 'PATCH', url: '/v1/sessions/v', payload: { aggregation: null } });
  assert.deepEqual([plain.statusCode, plain.json().aggregation], [200, null]);
  const stepped = await contribute(app, 'v', { worker: 'w1', grads, base: 2, samples: 3 });
  assert.equal(stepped.statusCode, 200, stepped.body);
  assert.deepEqual(stepped.json(), { session: 'v', step: 1, version: 3, staleness: 0 });
  const back = await app.inject({ method: 'PATCH', url: '/v1/sessions/v', payload: { aggregation: { contributions: 2 } } });
  assert.deepEqual(back.json().aggregation, { contributions: 2 });
  const contribution = await contribute(app, 'v', { worker: 'w1', grads, base: 3, wait: 1 });
  assert.equal(contribution.statusCode, 202, contribution.body);
});

test('a round\'s metrics are the mean of its contributions\', finite even when their sum is not', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('big', { contributions: 2 }) })).statusCode, 201);
  const first = contribute(app, 'big', { worker: 'a', grads: gradsOf(1), extra: { metrics: { loss: 1.7e308, acc: 0.5 } } });
  const second = await contribute(app, 'big', { worker: 'b', grads: gradsOf(2), extra: { metrics: { loss: 1.7e308, acc: 0.25 } } });
  assert.equal(second.statusCode, 200, second.body);
  assert.equal((await first).statusCode, 200);
  const series = (await app.inject({ url: '/v1/sessions/big/metrics' })).json();
  assert.deepEqual(series.points.map((p: { values: unknown }) => p.values), [{ loss: 1.7e308, acc: 0.375 }]);

  // At most 32 names, as a step carries (a hostile review: 3 workers of 32 names each stored 96): those the
  // most contributions reported, then in worker order.
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('wide', { contributions: 3 }) })).statusCode, 201);
  const own = (w: string) => Object.fromEntries(Array.from({ length: 31 }, (_, k) => [`${w}${String(k).padStart(2, '0')}`, k]));
  const waiting = ['a', 'b'].map((w) => contribute(app, 'wide', { worker: w, grads: gradsOf(3), extra: { metrics: { loss: 1, ...own(w) } } }));
  const third = await contribute(app, 'wide', { worker: 'c', grads: gradsOf(4), extra: { metrics: { loss: 4, ...own('c') } } });
  assert.equal(third.statusCode, 200, third.body);
  for (const w of waiting) assert.equal((await w).statusCode, 200);
  const wide = (await app.inject({ url: '/v1/sessions/wide/metrics' })).json().points[0].values;
  assert.deepEqual(Object.keys(wide).sort(), ['loss', ...Object.keys(own('a'))].sort());
  assert.equal(wide.loss, 2);
});

test('PUT params that change nothing during a round: the answer shows the round still open, its contributions kept', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('same', { contributions: 2 }) });
  assert.equal(created.statusCode, 201, created.body);
  const pending = await app.inject({ method: 'POST', url: '/v1/sessions/same/step?wait=1', payload: { grads: gradsOf(0), worker: 'w0', base_version: 1 } });
  assert.equal(pending.statusCode, 202, pending.body);
  const params = (await app.inject({ url: '/v1/sessions/same/params' })).json().params;
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/same/params', payload: { params } });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal(put.json().version, 1);
  assert.equal(put.json().round.contributions, 1, JSON.stringify(put.json().round));
  const done = await app.inject({ method: 'POST', url: '/v1/sessions/same/step?wait=5', payload: { grads: gradsOf(1), worker: 'w1', base_version: 1 } });
  assert.equal(done.statusCode, 200, done.body);
  assert.equal(done.json().round.contributions, 2, 'the first contribution was not voided');
});

test('a round voided by PUT params, then aggregation removed: its contributions are dropped with the PATCH (they stayed for good); a retry of one is a plain step at its base_version', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('voided', { contributions: 2 }) });
  assert.equal(created.statusCode, 201, created.body);
  const first = () => app.inject({ method: 'POST', url: '/v1/sessions/voided/step?wait=0', headers: { 'idempotency-key': 'vp1-a' }, payload: { grads: gradsOf(0), worker: 'a', base_version: 1 } });
  assert.equal((await first()).statusCode, 202);
  const params = (await app.inject({ url: '/v1/sessions/voided/params' })).json().params;
  params.w.data[0] += 1;
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/voided/params', payload: { params } });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal(put.json().version, 2);
  const [{ id }] = await app.db.query<{ id: number }>("SELECT id::float8 AS id FROM sessions WHERE name = 'voided'");
  const stored = async () => (await app.db.query<{ n: number }>('SELECT count(*)::int AS n FROM round_contributions WHERE session_id = $1', [id]))[0].n;
  assert.equal(await stored(), 1, 'kept until the next contribution or a PATCH of aggregation');
  const patch = await app.inject({ method: 'PATCH', url: '/v1/sessions/voided', payload: { aggregation: null } });
  assert.equal(patch.statusCode, 200, patch.body);
  assert.equal(await stored(), 0);
  // The session steps each gradient as it comes now: the retry is one, computed at version 1 (staleness 1).
  const retried = await first();
  assert.equal(retried.statusCode, 200, retried.body);
  assert.deepEqual([retried.json().version, retried.json().staleness], [3, 1]);
});

test('a contribution whose wait ends as its round steps gets the round\'s answer, not a 202 of an empty round', async (t) => {
  // Found by a review: the wait over, the contribution found its round open, and then read the round's
  // tally after another worker's contribution had stepped it: a 202 with `contributions: 0`.
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: sessionBody('late', { contributions: 2 }) });
  assert.equal(created.statusCode, 201, created.body);
  const db = app.db;
  const query = db.query.bind(db);
  const late: { stepped?: Awaited<ReturnType<typeof contribute>> } = {};
  db.query = (async (text: string, params?: unknown[], opts?: { name?: string }) => {
    if (opts?.name === 'round_read' && !late.stepped) {
      // The second worker's contribution steps the round between the first one's two reads.
      late.stepped = await contribute(app, 'late', { worker: 'w1', grads: gradsOf(1) });
    }
    return query(text, params, opts as never);
  }) as typeof db.query;
  const first = await contribute(app, 'late', { worker: 'w0', grads: gradsOf(0), wait: 1 });
  const { stepped } = late;
  assert.ok(stepped, `the round stepped in that moment: ${first.statusCode} ${first.body}`);
  assert.equal(stepped.statusCode, 200, stepped.body);
  assert.equal(first.statusCode, 200, first.body);
  assert.deepEqual(first.json(), { session: 'late', step: 1, version: 2, staleness: 0, round: { version: 1, contributions: 2, samples: null, timed_out: false } });
  assert.deepEqual(first.json(), stepped.json());
});
