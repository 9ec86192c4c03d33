// The training loop's step: parameters in the answer (JSON and safetensors), hyperparameters that travel
// with the step (bit for bit against PyTorch, also after a replay from the log), metrics and their series.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { readSafetensors, writeSafetensors, streamToBuffer } from '../../src/formats/index.ts';
import { bits, buildTestApp, randomData } from '../helper.ts';
import { hexOf, runTorchReference, skipWithoutTorch } from '../support/torch.ts';

const params = [{ name: 'w', shape: [3, 4], data: randomData(12, 1) }, { name: 'b', shape: [4], data: randomData(4, 2) }];
const grads = (k: number) => ({ w: randomData(12, 100 + k), b: randomData(4, 200 + k) });
type App = Awaited<ReturnType<typeof buildTestApp>>['app'];

async function create(app: App, name: string, extra: Record<string, unknown> = {}) {
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params, hyperparameters: { lr: 0.05, t0: 2 }, ...extra } });
  assert.equal(res.statusCode, 201, res.body);
}

const float32 = (tensor: { data: (number | string)[] }) => bits(tensor.data.map(Number));

test('return=params answers the parameters at the new version, as JSON and as safetensors', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'p');
  const first = await app.inject({ method: 'POST', url: '/v1/sessions/p/step?return=params', payload: { grads: grads(0) } });
  assert.equal(first.statusCode, 200, first.body);
  const answer = first.json();
  assert.deepEqual({ ...answer, params: undefined, param_groups: undefined }, { session: 'p', step: 1, version: 2, staleness: 0, params: undefined, param_groups: undefined });
  // With the parameters, each group's hyperparameters at their version.
  assert.deepEqual(answer.param_groups, [{ lr: 0.05, lambd: 1e-4, alpha: 0.75, t0: 2, weight_decay: 0, maximize: false }]);
  assert.equal(first.headers.etag, '"2"');
  const read = (await app.inject({ url: '/v1/sessions/p/params' })).json();
  assert.deepEqual(answer.params, read.params);

  const averaged = await app.inject({ method: 'POST', url: '/v1/sessions/p/step?return=averaged', payload: { grads: grads(1) } });
  assert.deepEqual(averaged.json().params, (await app.inject({ url: '/v1/sessions/p/params?averaged=true' })).json().params);
  const plain = await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(2) } });
  assert.equal(plain.json().params, undefined, 'return=none is the default');

  // safetensors: a step answered by a file of the parameters whose metadata says where they are.
  const st = await app.inject({
    method: 'POST', url: '/v1/sessions/p/step?return=params&base_version=3', headers: { accept: 'application/x-safetensors' }, payload: { grads: grads(3) },
  });
  assert.equal(st.statusCode, 200, st.body);
  assert.equal(st.headers['content-type'], 'application/x-safetensors');
  assert.equal(st.headers.etag, '"5"');
  const file = readSafetensors(st.rawPayload);
  assert.deepEqual(Object.fromEntries(['session', 'version', 'step', 'staleness'].map((k) => [k, file.metadata.get(k)])), { session: 'p', version: '5', step: '4', staleness: '1' });
  assert.deepEqual(JSON.parse(file.metadata.get('param_groups')!), [{ lr: 0.05, lambd: 1e-4, alpha: 0.75, t0: 2, weight_decay: 0, maximize: false }]);
  // The file's tensors are in safetensors' order (b before w); param_names says the session's (a JavaScript
  // user's review: the TypeScript client handed a step's parameters out alphabetically).
  assert.deepEqual([...file.tensors.keys()], ['b', 'w']);
  assert.deepEqual(JSON.parse(file.metadata.get('param_names')!), ['w', 'b']);
  const now = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  for (const name of ['w', 'b']) {
    const tensor = file.tensors.get(name)!;
    assert.deepEqual(tensor.shape, now[name].shape);
    assert.deepEqual(bits(tensor.data as Float32Array), float32(now[name]), name);
  }

  // A step sent as safetensors with its extras in __metadata__, answered as safetensors.
  const g = grads(4);
  const body = streamToBuffer(writeSafetensors(
    [['w', { dtype: 'float32', shape: [3, 4], data: Float32Array.from(g.w) }], ['b', { dtype: 'float32', shape: [4], data: Float32Array.from(g.b) }]],
    { param_groups: JSON.stringify([{ lr: 0.025 }]), metrics: JSON.stringify({ loss: 1.5 }), base_version: '5' },
  ));
  const binary = await app.inject({
    method: 'POST', url: '/v1/sessions/p/step?return=averaged', headers: { 'content-type': 'application/x-safetensors', accept: 'application/x-safetensors' }, payload: body,
  });
  assert.equal(binary.statusCode, 200, binary.body);
  assert.equal(readSafetensors(binary.rawPayload).metadata.get('version'), '6');
  const session = (await app.inject({ url: '/v1/sessions/p' })).json();
  assert.equal(session.param_groups[0].lr, 0.025);
  const series = (await app.inject({ url: '/v1/sessions/p/metrics?after_version=5' })).json();
  assert.deepEqual(series.points.map((p: { version: number; values: unknown }) => [p.version, p.values]), [[6, { loss: 1.5 }]]);
});

test('an Idempotency-Key retry with return=params answers the parameters of the first answer', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'i');
  const send = () => app.inject({ method: 'POST', url: '/v1/sessions/i/step?return=params', headers: { 'idempotency-key': 'k1' }, payload: { grads: grads(0) } });
  const first = await send();
  assert.equal(first.statusCode, 200, first.body);
  await app.inject({ method: 'POST', url: '/v1/sessions/i/step', payload: { grads: grads(1) } });
  const again = await send();
  assert.equal(again.json().replayed, true);
  assert.equal(again.json().version, 2);
  assert.deepEqual(again.json().params, first.json().params);
  app.sessions.dropCache(); // rebuilt from snapshot + log: the same
  assert.deepEqual((await send()).json().params, first.json().params);
  assert.notDeepEqual((await app.inject({ url: '/v1/sessions/i/params' })).json().params, first.json().params);
});

test('hyperparameters sent with each step (a scheduler) equal PyTorch bit for bit, also replayed from the log', { skip: skipWithoutTorch() }, async (t) => {
  const a = await buildTestApp(t);
  const groups = [{ params: ['w'], lr: 0.1, t0: 3 }, { params: ['b'], lr: 0.02, weight_decay: 0.01 }];
  const res = await a.app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params, param_groups: groups, snapshot_every: 4 } });
  assert.equal(res.statusCode, 201, res.body);
  const steps = 12;
  const stepHyper: ({ lr?: number; lambd?: number; alpha?: number; weight_decay?: number }[] | null)[] = [];
  const answers = new Map<number, string>();
  for (let k = 0; k < steps; k++) {
    // ExponentialLR on group 0 every step, a step change of group 1's lr and lambd at step 5, nothing sent at step 8.
    const hyper = k === 8 ? null : [{ lr: 0.1 * 0.9 ** (k + 1) }, k === 5 ? { lr: 0.005, lambd: 0.001 } : {}];
    stepHyper.push(hyper);
    const r = await a.app.inject({ method: 'POST', url: '/v1/sessions/s/step', payload: { grads: grads(k), ...(hyper && { param_groups: hyper }) } });
    assert.equal(r.statusCode, 200, r.body);
    assert.equal(r.json().version, k + 2, 'one version per step, none for the hyperparameters');
    answers.set(k + 2, (await a.app.inject({ url: '/v1/sessions/s/state_dict' })).body);
  }
  const torch = runTorchReference({
    params,
    groups: groups.map((g) => ({ ...g })),
    steps: Array.from({ length: steps }, (_, k) => grads(k)),
    step_hyper: stepHyper,
  });
  const check = async (app: App, label: string) => {
    const p = (await app.inject({ url: '/v1/sessions/s/params' })).json().params;
    for (const name of ['w', 'b']) assert.deepEqual(hexOf(p[name].data.map(Number)), torch.params[name], `${label}: ${name}`);
    const sd = (await app.inject({ url: '/v1/sessions/s/state_dict' })).json();
    for (const [i, s] of Object.entries(torch.state)) {
      assert.deepEqual(hexOf(sd.state[i].ax.data.map(Number)), s.ax, `${label}: ax ${i}`);
      assert.deepEqual(hexOf([sd.state[i].eta]), [s.eta], `${label}: eta ${i}`);
      assert.deepEqual(hexOf([sd.state[i].mu]), [s.mu], `${label}: mu ${i}`);
    }
    assert.deepEqual(sd.param_groups.map((g: { lr: number }) => g.lr), torch.param_groups.map((g) => g.lr), `${label}: the groups keep the last values`);
  };
  await check(a.app, 'live');
  const session = (await a.app.inject({ url: '/v1/sessions/s' })).json();
  assert.equal(session.param_groups[1].lambd, 0.001);
  await a.app.sessions.pendingSnapshots(); // written in the background
  assert.equal((await a.app.inject({ url: '/v1/sessions/s/snapshots' })).json().snapshots.length, 4, 'creation + every 4 steps: none for hyperparameters');

  // Without the in-memory copy: rebuilt from a snapshot and the log (another process on the same database).
  const b = a.databaseUrl ? await buildTestApp(t, { databaseUrl: a.databaseUrl }) : a;
  if (b === a) a.app.sessions.dropCache();
  await check(b.app, 'replayed');
  for (const [version, expected] of answers) {
    assert.equal((await b.app.inject({ url: `/v1/sessions/s/state_dict?version=${version}` })).body, expected, `?version=${version}`);
  }
  // The series shows each change of the groups' values.
  const series = (await b.app.inject({ url: '/v1/sessions/s/metrics' })).json();
  assert.equal(series.points.length, steps);
  assert.equal(series.points[8].param_groups, undefined);
  assert.equal(series.points[5].param_groups[1].lr, 0.005);
});

test('bad param_groups and metrics: 4xx naming the field, the session unchanged', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'bad', { param_groups: [{ params: ['w'] }, { params: ['b'] }] });
  const before = (await app.inject({ url: '/v1/sessions/bad/state_dict' })).body;
  const session = (await app.inject({ url: '/v1/sessions/bad' })).body;
  const cases: [Record<string, unknown> | string, number, string, RegExp][] = [
    [{ param_groups: [{ lr: -1 }, {}] }, 400, 'INVALID_HYPERPARAMETER', /param_groups\[0\]\.lr/],
    [{ param_groups: [{}, { lr: -0.5 }] }, 400, 'INVALID_HYPERPARAMETER', /param_groups\[1\]\.lr/],
    [{ param_groups: [{ lr: 0.1 }] }, 400, 'INVALID_PARAM_GROUPS', /param_groups: 1 groups given, the session has 2/],
    [{ param_groups: [{}, { momentum: 0.9 }] }, 400, 'INVALID_PARAM_GROUPS', /param_groups\[1\]\.momentum: unknown key \(one of lr, lambd, alpha, t0, weight_decay, maximize, foreach, differentiable, capturable\)/],
    // torch's flags, as the OpenAPI document lists them (an API review: taken, and not documented).
    [{ param_groups: [{ differentiable: true }, {}] }, 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.differentiable: differentiable=true is not supported/],
    [{ param_groups: [{}, { capturable: 'no' }] }, 400, 'INVALID_HYPERPARAMETER', /^param_groups\[1\]\.capturable/],
    [{ param_groups: [{}, { params: ['w'] }] }, 400, 'INVALID_PARAM_GROUPS', /param_groups\[1\]\.params/],
    [{ param_groups: [{ lr: 'NaN' }, {}] }, 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.lr: must be number/],
    [{ param_groups: [{ weight_decay: -1 }, {}] }, 400, 'INVALID_HYPERPARAMETER', /param_groups\[0\]\.weight_decay/],
    [{ param_groups: [{ maximize: 'yes' }, {}] }, 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.maximize: must be boolean/],
    [{ param_groups: { lr: 1 } }, 400, 'INVALID_PARAM_GROUPS', /^param_groups: must be array/],
    [{ param_groups: [{}, null] }, 400, 'INVALID_PARAM_GROUPS', /^param_groups\[1\]: must be object/],
    [{ metrics: { loss: 'low' } }, 400, 'INVALID_METRICS', /metrics.*loss/],
    [{ metrics: { 'bad\nname': 1 } }, 400, 'INVALID_METRICS', /^metrics\.bad\\nname: a metric name must be 1-128 characters, no control character/],
    [{ metrics: { '': 1 } }, 400, 'INVALID_METRICS', /^metrics\.: a metric name must be/],
    [{ metrics: { ['x'.repeat(129)]: 1 } }, 400, 'INVALID_METRICS', /^metrics\.x{129}: a metric name must be/],
    // (half a surrogate pair is refused in every JSON body before its fields are read)
    [{ metrics: { 'half\ud800': 1 } }, 400, 'INVALID_BODY', /^metrics\."half\\ud800": text with a NUL character or an unpaired/],
    [{ metrics: Object.fromEntries(Array.from({ length: 33 }, (_, i) => [`m${i}`, i])) }, 400, 'INVALID_METRICS', /metrics/],
    [{ metrics: [1, 2] }, 400, 'INVALID_METRICS', /metrics/],
    [{ metrics: { loss: 1e999 } }, 400, 'INVALID_METRICS', /metrics.*loss/],
  ];
  for (const [extra, status, code, message] of cases) {
    const payload = { grads: grads(0), ...(extra as Record<string, unknown>) };
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/bad/step', headers: { 'content-type': 'application/json' }, payload: JSON.stringify(payload) });
    assert.equal(res.statusCode, status, `${JSON.stringify(extra).slice(0, 100)} -> ${res.body}`);
    assert.equal(res.json().code, code, res.body);
    assert.match(res.json().message, message);
  }
  // In a safetensors body: NaN (Python's json.dumps writes it) and a bad group count.
  for (const [meta, code, message] of [
    [{ param_groups: '[{"lr": NaN}, {}]' }, 'INVALID_HYPERPARAMETER', /param_groups\[0\]\.lr: must be a finite number/],
    [{ metrics: '{"loss": NaN, "samples": 32}' }, 'INVALID_METRICS', /__metadata__\.metrics\.loss: /],
    [{ metrics: '{"loss": -Infinity}' }, 'INVALID_METRICS', /__metadata__\.metrics\.loss: /],
    [{ metrics: '{"loss": NaN' }, 'INVALID_BODY', /__metadata__\.metrics: is not valid JSON/],
    [{ param_groups: '[{}, {}, {}]' }, 'INVALID_PARAM_GROUPS', /param_groups: 3 groups/],
    [{ param_groups: '[{"lr": "fast"}, {}]' }, 'INVALID_HYPERPARAMETER', /param_groups\[0\]\.lr/],
    [{ metrics: '{"loss": "x"}' }, 'INVALID_METRICS', /__metadata__\.metrics\.loss/],
    [{ colour: 'red' }, 'INVALID_BODY', /__metadata__\.colour/],
  ] as const) {
    const body = streamToBuffer(writeSafetensors([['w', { dtype: 'float32', shape: [3, 4], data: Float32Array.from(grads(0).w) }]], meta));
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/bad/step', headers: { 'content-type': 'application/x-safetensors' }, payload: body });
    assert.equal(res.statusCode, 400, res.body);
    assert.equal(res.json().code, code, res.body);
    assert.match(res.json().message, message);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/bad/state_dict' })).body, before);
  assert.equal((await app.inject({ url: '/v1/sessions/bad' })).body, session);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/bad/metrics' })).json().points, []);
  // A good one goes through: the control.
  const ok = await app.inject({ method: 'POST', url: '/v1/sessions/bad/step', payload: { grads: grads(0), param_groups: [{ lr: 0.5 }, {}], metrics: { loss: 0.25, samples: 32 } } });
  assert.equal(ok.statusCode, 200, ok.body);
});

test('the metrics series pages by version and is kept when the log is pruned', async (t) => {
  const { app } = await buildTestApp(t);
  await create(app, 'm', { snapshot_every: 2, keep_snapshots: 1 });
  for (let k = 0; k < 7; k++) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/m/step', payload: { grads: grads(k), ...(k !== 3 && { metrics: { loss: 1 / (k + 1), samples: 32 } }) } });
    assert.equal(res.statusCode, 200, res.body);
    await app.sessions.pendingSnapshots();
  }
  const page1 = (await app.inject({ url: '/v1/sessions/m/metrics?limit=4' })).json();
  assert.equal(page1.session, 'm');
  assert.deepEqual(page1.points.map((p: { version: number; step: number }) => [p.version, p.step]), [[2, 1], [3, 2], [4, 3], [5, 4]]);
  assert.deepEqual(page1.points[0].values, { loss: 1, samples: 32 });
  assert.deepEqual(page1.points[3].values, {});
  assert.ok(page1.points.every((p: { time: string; staleness: number }) => !Number.isNaN(Date.parse(p.time)) && p.staleness === 0));
  const page2 = (await app.inject({ url: `/v1/sessions/m/metrics?after_version=${page1.next_after_version}` })).json();
  assert.deepEqual(page2.points.map((p: { version: number }) => p.version), [6, 7, 8]);
  assert.equal(page2.next_after_version, 8);
  const empty = (await app.inject({ url: '/v1/sessions/m/metrics?after_version=8' })).json();
  assert.deepEqual([empty.points, empty.next_after_version], [[], 8]);
  assert.equal((await app.inject({ url: '/v1/sessions/m/metrics?limit=0' })).statusCode, 400);
  assert.equal((await app.inject({ url: '/v1/sessions/nope/metrics' })).json().code, 'SESSION_NOT_FOUND');
  // The log behind the one kept snapshot is gone; the series is not.
  assert.equal((await app.inject({ url: '/v1/sessions/m/state_dict?version=2' })).statusCode, 404);
});

test('metric names as TensorBoard and Keras write them ("val/loss", spaces, non-ASCII) are taken with the step and read back, raw and downsampled', async (t) => {
  // A review: "val/loss" was refused with the step, and the worker's loop ended on the error.
  const { app } = await buildTestApp(t);
  await create(app, 'tb');
  const names = ['val/loss', 'top-1 acc', 'précision', 'loss:train', 'x'.repeat(128), '日本語'];
  for (let k = 0; k < 4; k++) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/tb/step', payload: { grads: grads(k), metrics: Object.fromEntries(names.map((n, i) => [n, k + i])) } });
    assert.equal(res.statusCode, 200, res.body);
  }
  const raw = (await app.inject({ url: '/v1/sessions/tb/metrics' })).json();
  assert.deepEqual(raw.points[3].values, Object.fromEntries(names.map((n, i) => [n, 3 + i])));
  const down = (await app.inject({ url: '/v1/sessions/tb/metrics?max_points=2' })).json();
  assert.equal(down.points.length, 2);
  assert.deepEqual(Object.keys(down.points[1].values).sort(), [...names].sort());
  assert.equal(down.points[1].values['val/loss'], 2.5, 'the mean of the bucket of steps 3 and 4');
});

test('two apps on one database alternate steps that set hyperparameters and equal one app doing them all', async (t) => {
  const a = await buildTestApp(t);
  if (!a.databaseUrl) return t.skip('needs PostgreSQL (two processes cannot share an embedded database)');
  const b = await buildTestApp(t, { databaseUrl: a.databaseUrl });
  const solo = await buildTestApp(t);
  const groups = [{ params: ['w'], lr: 0.1, t0: 2 }, { params: ['b'], lr: 0.02 }];
  for (const app of [a.app, solo.app]) {
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'two', params, param_groups: groups, snapshot_every: 5 } })).statusCode, 201);
  }
  for (let k = 0; k < 16; k++) {
    // b steps every third time: its copy is behind when it steps (the statement merges the groups in SQL,
    // the copy catches up from the log later), and each worker runs its own scheduler.
    const app = k % 3 === 0 ? b.app : a.app;
    const payload = { grads: grads(k), param_groups: [{ lr: 0.1 * 0.95 ** k }, k % 4 === 0 ? { weight_decay: k / 100, alpha: 0.5 } : {}], metrics: { loss: k } };
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/two/step?return=params', payload });
    assert.equal(res.statusCode, 200, res.body);
    const alone = await solo.app.inject({ method: 'POST', url: '/v1/sessions/two/step?return=params', payload });
    assert.deepEqual(res.json().params, alone.json().params, `step ${k}: the answered parameters`);
  }
  const expected = (await solo.app.inject({ url: '/v1/sessions/two/state_dict' })).body;
  for (const app of [a.app, b.app]) {
    assert.equal((await app.inject({ url: '/v1/sessions/two/state_dict' })).body, expected);
    // The session row's groups (merged by the statement) agree with the state's (merged by the kernel's copy).
    assert.deepEqual((await app.inject({ url: '/v1/sessions/two' })).json().param_groups, JSON.parse(expected).param_groups);
  }
});

test('a step\'s hyperparameters are checked against the session\'s groups, not against a copy another process has changed since', async (t) => {
  const a = await buildTestApp(t);
  if (!a.databaseUrl) return t.skip('needs PostgreSQL (two processes cannot share an embedded database)');
  const b = await buildTestApp(t, { databaseUrl: a.databaseUrl });
  // lr 1e30 is a valid value with lambd 0 (eta = lr), not with lambd 1e-4 (eta overflows float32).
  const created = await a.app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'moved', params, hyperparameters: { lr: 1e-6, lambd: 0, alpha: -1, t0: 1 } } });
  assert.equal(created.statusCode, 201, created.body);
  assert.equal((await b.app.inject({ method: 'POST', url: '/v1/sessions/moved/step', payload: { grads: grads(0) } })).statusCode, 200); // b's copy: lambd 0
  const patched = await a.app.inject({ method: 'PATCH', url: '/v1/sessions/moved/param_groups', payload: { param_groups: [{ lambd: 1e-4 }] } });
  assert.equal(patched.statusCode, 200, patched.body);
  const before = (await a.app.inject({ url: '/v1/sessions/moved/state_dict' })).body;

  for (const app of [b.app, a.app]) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/moved/step', payload: { grads: grads(1), param_groups: [{ lr: 1e30 }] } });
    assert.equal(res.statusCode, 400, res.body);
    assert.equal(res.json().code, 'INVALID_HYPERPARAMETER');
    assert.match(res.json().message, /^param_groups\[0\]/);
  }
  assert.equal((await a.app.inject({ url: '/v1/sessions/moved/state_dict' })).body, before, 'nothing written');
  assert.equal((await b.app.inject({ url: '/v1/sessions/moved/state_dict' })).body, before);
  // A value valid over the session's groups goes through b, on them.
  const ok = await b.app.inject({ method: 'POST', url: '/v1/sessions/moved/step', payload: { grads: grads(1), param_groups: [{ lr: 1e-5 }] } });
  assert.equal(ok.statusCode, 200, ok.body);
  const groups = (await a.app.inject({ url: '/v1/sessions/moved' })).json().param_groups[0];
  assert.deepEqual([groups.lr, groups.lambd, groups.alpha], [1e-5, 1e-4, -1]);
  assert.equal((await b.app.inject({ url: '/v1/sessions/moved/state_dict' })).body, (await a.app.inject({ url: '/v1/sessions/moved/state_dict' })).body);
});

test('a step\'s hyperparameters keep the kind of their numbers, as torch keeps group[\'t0\'] = 5 an int: in JSON and in safetensors metadata, also at an earlier version', async (t) => {
  // The step took every value for a Python float: a worker's `group['t0'] = 5` came back 5.0 in the .pt.
  const { app } = await buildTestApp(t);
  await create(app, 'kinds'); // t0: 2, an int
  const groupText = async (url: string) => /"param_groups":\[\{([^}]*)\}/.exec((await app.inject({ url })).body)![1];
  const stepped = async (payload: string | Buffer, type = 'application/json') => {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/kinds/step', headers: { 'content-type': type }, payload });
    assert.equal(res.statusCode, 200, res.body);
    return res.json().version as number;
  };
  const grad = JSON.stringify(Object.fromEntries(Object.entries(grads(0)).map(([k, data], i) => [k, { shape: params[i].shape, data }])));
  const v1 = await stepped(`{"grads": ${grad}, "param_groups": [{"t0": 5.0, "lr": 1}]}`);
  assert.match(await groupText('/v1/sessions/kinds/state_dict'), /"lr":1,.*"t0":5\.0,/);
  const body = streamToBuffer(writeSafetensors(params.map((p) => [p.name, { dtype: 'float32', shape: p.shape, data: Float32Array.from(grads(1)[p.name as 'w' | 'b']) }]), { param_groups: '[{"t0": 7, "lr": 0.5, "weight_decay": 0.0}]' }));
  await stepped(body, 'application/x-safetensors');
  assert.match(await groupText('/v1/sessions/kinds/state_dict'), /"lr":0\.5,.*"t0":7,"weight_decay":0\.0/);
  // The earlier version, rebuilt from the log: its kinds as they were.
  assert.match(await groupText(`/v1/sessions/kinds/state_dict?version=${v1}`), /"lr":1,.*"t0":5\.0,"weight_decay":0,/);
  // The key written with an escape is the same key.
  await stepped(`{"grads": ${grad}, "param\\u005fgroups": [{"t0": 11}]}`);
  assert.match(await groupText('/v1/sessions/kinds/state_dict'), /"t0":11,/);
  // A PATCH of the groups, likewise.
  const patched = await app.inject({ method: 'PATCH', url: '/v1/sessions/kinds/param_groups', headers: { 'content-type': 'application/json' }, payload: '{"param_groups": [{"t0": 9, "lr": 2.0}]}' });
  assert.equal(patched.statusCode, 200, patched.body);
  assert.match(await groupText('/v1/sessions/kinds/state_dict'), /"lr":2\.0,.*"t0":9,"weight_decay":0\.0/);
});
