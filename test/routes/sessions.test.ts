import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, onDatabase, randomData, TEST_DB_KIND } from '../helper.ts';
import { RETIRE_NAMES_SQL } from '../../src/sessions/repository.ts';
import { LIST_PAGE_PARAMS } from '../../src/routes/sessions/index.ts';
import { hexOf, runTorchReference, skipWithoutTorch } from '../support/torch.ts';

const twoParams = (name = 'run-1') => ({
  name,
  params: [
    { name: 'w', shape: [3, 7], data: randomData(21, 1) },
    { name: 'b', shape: [7], data: randomData(7, 2) },
  ],
});

test('create, read, list and delete sessions', async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { ...twoParams('a-1'), hyperparameters: { lr: 0.05, t0: 3 } } });
  assert.equal(created.statusCode, 201, created.body);
  assert.equal(created.headers.etag, '"1"');
  const body = created.json();
  assert.equal(body.version, 1);
  assert.equal(body.step, 0);
  assert.deepEqual(body.params, [{ name: 'w', shape: [3, 7], numel: 21 }, { name: 'b', shape: [7], numel: 7 }]);
  assert.deepEqual(body.param_groups, [{ lr: 0.05, lambd: 1e-4, alpha: 0.75, t0: 3, weight_decay: 0, foreach: null, maximize: false, differentiable: false, capturable: false, params: [0, 1] }]);

  const again = await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('a-1') });
  assert.equal(again.statusCode, 409);
  assert.equal(again.json().code, 'SESSION_EXISTS');

  for (const n of ['a-2', 'a-3', 'b-1']) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams(n) })).statusCode, 201);
  const page1 = (await app.inject({ url: '/v1/sessions?limit=3' })).json();
  assert.deepEqual(page1.sessions.map((s: { name: string }) => s.name), ['a-1', 'a-2', 'a-3']);
  assert.equal(page1.next, 'a-3');
  const page2 = (await app.inject({ url: `/v1/sessions?limit=3&after=${page1.next}` })).json();
  assert.deepEqual(page2.sessions.map((s: { name: string }) => s.name), ['b-1']);
  assert.equal(page2.next, null);

  const got = await app.inject({ url: '/v1/sessions/a-1' });
  assert.equal(got.statusCode, 200);
  assert.equal(got.json().name, 'a-1');
  const params = (await app.inject({ url: '/v1/sessions/a-1/params' })).json();
  assert.deepEqual(hexOf(params.params.w.data), hexOf(twoParams().params[0].data));

  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/a-1' })).statusCode, 204);
  const gone = await app.inject({ url: '/v1/sessions/a-1' });
  assert.equal(gone.statusCode, 404);
  assert.equal(gone.json().code, 'SESSION_NOT_FOUND');
});

test('a session created under the name of a deleted (or expired) one continues its versions: a gradient or a tag of the deleted one is not taken for the new one\'s', async (t) => {
  // A review: a running worker's gradient at the deleted session's version 6 was applied to the new session,
  // then at version 9, as a step 4 versions stale.
  const { app } = await buildTestApp(t);
  const grads = { w: randomData(21, 3), b: randomData(7, 4) };
  const step = (query = '') => app.inject({ method: 'POST', url: `/v1/sessions/n/step${query}`, payload: { grads } });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('n') })).statusCode, 201);
  for (let k = 0; k < 5; k++) assert.equal((await step()).statusCode, 200);
  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/n' })).statusCode, 204);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('n') });
  assert.equal(created.statusCode, 201, created.body);
  assert.deepEqual([created.json().version, created.json().step, created.headers.etag], [7, 0, '"7"']);
  for (let k = 0; k < 3; k++) assert.equal((await step()).json().version, 8 + k);
  const before = (await app.inject({ url: '/v1/sessions/n/state_dict' })).body;
  // The deleted session's gradient (computed at its version 6): of parameters not in the new one's history.
  const old = await step('?base_version=6');
  assert.equal(old.statusCode, 409, old.body);
  assert.equal(old.json().code, 'STALE_GRADIENT');
  assert.equal(old.json().replaced_at, 7);
  assert.match(old.json().message, /^base_version: the gradient was computed at version 6, before the session's state was replaced at version 7 \(.*the session deleted and created again under its name\)/);
  assert.equal((await app.inject({ url: '/v1/sessions/n/state_dict' })).body, before, 'unchanged');
  // Its own versions are steps as any: one at 7 (its creation) is one version stale.
  assert.equal((await step('?base_version=7')).json().staleness, 3);
  // A tag of the deleted session's version 6 names no version of this one.
  assert.equal((await app.inject({ url: '/v1/sessions/n/params', headers: { 'if-match': '"6"' } })).statusCode, 412);
  // Expired (the idle-session sweep) likewise.
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/n', payload: { expire_after_idle_s: 1 } })).statusCode, 200);
  await new Promise((r) => setTimeout(r, 1100));
  assert.deepEqual(await app.sessions.sweepExpired(), ['n']);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('n') })).json().version, 12);
  // A name is remembered for 30 days after its session went; then a session made under it counts from 1.
  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/n' })).statusCode, 204);
  await app.db.query("UPDATE retired_names SET retired_at = now() - interval '31 days' WHERE name = 'n'");
  assert.deepEqual(await app.sessions.sweepExpired(), []);
  assert.deepEqual(await app.db.query("SELECT name FROM retired_names WHERE name = 'n'"), []);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('n') })).json().version, 1);
});

test('a create that waited for a delete of the same name (another process\'s, committing meanwhile) continues the deleted session\'s versions', {
  skip: TEST_DB_KIND !== 'postgres' && 'two connections: PostgreSQL only',
}, async (t) => {
  // A read-through: the create's statement had read retired_names before the delete committed, and the
  // new session started at version 1, where the deleted one's gradients are of versions 1 and up.
  const { app, databaseUrl } = await buildTestApp(t);
  const grads = { w: randomData(21, 3), b: randomData(7, 4) };
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('r') })).statusCode, 201);
  for (let k = 0; k < 2; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/r/step', payload: { grads } })).statusCode, 200);
  await onDatabase(databaseUrl!, async (other) => {
    // Another process's DELETE (its statement as the service writes it), not yet committed.
    await other.query('BEGIN');
    await other.query(`WITH gone AS (DELETE FROM sessions WHERE name = 'r' RETURNING id, name, version), retired AS (${RETIRE_NAMES_SQL}) SELECT id FROM gone`);
    const creating = app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('r') });
    // The create waits on the name's unique index for the delete to end.
    for (let i = 0; ; i++) {
      const [{ n }] = (await other.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")).rows;
      if (n > 0) break;
      assert.ok(i < 200, 'the create did not wait for the delete');
      await new Promise((r) => setTimeout(r, 25));
    }
    await other.query('COMMIT');
    const created = await creating;
    assert.equal(created.statusCode, 201, created.body);
    assert.deepEqual([created.json().version, created.headers.etag], [4, '"4"']);
  });
  // The deleted session's gradient of version 2 is refused as of replaced state.
  const old = await app.inject({ method: 'POST', url: '/v1/sessions/r/step?base_version=2', payload: { grads } });
  assert.equal(old.statusCode, 409, old.body);
  assert.equal(old.json().replaced_at, 4);
  assert.equal((await app.inject({ url: '/v1/sessions/r' })).json().version, 4);
});

test('create rejects bad input with a code that names the field', async (t) => {
  const { app } = await buildTestApp(t);
  const cases: [unknown, number, string, RegExp][] = [
    [{ ...twoParams('bad name!') }, 400, 'INVALID_NAME', /name/],
    [{ ...twoParams(), hyperparameters: { lr: -1 } }, 400, 'INVALID_HYPERPARAMETER', /hyperparameters\.lr: Invalid learning rate: -1/],
    [{ ...twoParams(), hyperparameters: { weight_decay: -0.1 } }, 400, 'INVALID_HYPERPARAMETER', /weight_decay/],
    [{ ...twoParams(), hyperparameters: { weight_decay: 1e308 } }, 400, 'INVALID_HYPERPARAMETER', /^hyperparameters\.weight_decay: 1e\+308 is too large for float32/],
    [{ ...twoParams(), hyperparameters: { lambd: 1e308 } }, 400, 'INVALID_HYPERPARAMETER', /^hyperparameters\.lambd: .* decay factor 1 - lambd \* eta at the first step is too large for float32/],
    [{ ...twoParams(), hyperparameters: { lambd: -1 } }, 400, 'INVALID_HYPERPARAMETER', /lambd/],
    [{ ...twoParams(), hyperparameters: { lambd: 1e300, lr: 1, alpha: 2 } }, 400, 'INVALID_HYPERPARAMETER', /^hyperparameters\.alpha: with lr 1, lambd 1e\+300 and alpha 2, .* overflows at step 1 /],
    [{ ...twoParams(), hyperparameters: { lambd: -1e-3 } }, 400, 'INVALID_HYPERPARAMETER', /^hyperparameters\.lambd: must not be negative \(-0\.001\)/],
    // A negative alpha is torch's too (eta grows with the step), until the power underflows: lr / 0.0.
    [{ ...twoParams(), hyperparameters: { alpha: -1e300 } }, 400, 'INVALID_HYPERPARAMETER', /^hyperparameters\.alpha: with lr 0\.01, lambd 0\.0001 and alpha -1e\+300, .* divides by zero \(the power underflows to 0\) at step 1 \(torch raises ZeroDivisionError/],
    [{ ...twoParams(), hyperparameters: { lr: 'fast' } }, 400, 'INVALID_HYPERPARAMETER', /lr/],
    [{ ...twoParams(), param_groups: [{ params: ['w'], lr: -2 }, { params: ['b'] }] }, 400, 'INVALID_HYPERPARAMETER', /param_groups\[0\]\.lr/],
    [{ ...twoParams(), param_groups: [{ params: ['w'] }] }, 400, 'INVALID_PARAM_GROUPS', /"b" is in no group/],
    [{ ...twoParams(), param_groups: [{ params: ['w', 'b'] }, { params: ['b'] }] }, 400, 'INVALID_PARAM_GROUPS', /more than one parameter group/],
    [{ name: 'x', params: [{ name: 'w', shape: [2], data: [1, 2, 3] }] }, 400, 'SHAPE_MISMATCH', /params\[0\]/],
    [{ name: 'x', params: [{ name: 'w', shape: [-2], data: [] }] }, 400, 'INVALID_TENSOR', /params\[0\]\.shape\[0\]/],
    [{ name: 'x', params: [{ name: 'w', shape: [2], data: [1, 'two'] }] }, 400, 'INVALID_TENSOR', /params\[0\]\.data\[1\]/],
    [{ name: 'x', params: [{ name: 'w', shape: [1], data: ['NaN'] }] }, 400, 'INVALID_TENSOR', /params\[0\]\.data\[0\]/],
    [{ name: 'x', params: [] }, 400, 'INVALID_BODY', /params/],
    [{ name: 'x', params: [{ name: 'w', shape: [1e6, 1e6], data: [] }] }, 400, 'INVALID_TENSOR', /shape/],
    [{ name: 'x', params: [{ name: 'w', shape: [1], data: [1] }, { name: 'w', shape: [1], data: [1] }] }, 400, 'INVALID_BODY', /appears twice/],
    [{ name: 'x', params: [{ name: 'w', shape: [1], data: [1] }], extra: 1 }, 400, 'INVALID_BODY', /extra/],
    [{ ...twoParams(), hyperparameters: { foreach: 1 } }, 400, 'INVALID_HYPERPARAMETER', /foreach/],
    [{ ...twoParams(), hyperparameters: { differentiable: true } }, 400, 'INVALID_HYPERPARAMETER', /differentiable/],
  ];
  for (const [payload, status, code, message] of cases) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: payload as object });
    assert.equal(res.statusCode, status, `${JSON.stringify(payload).slice(0, 100)} -> ${res.body}`);
    assert.equal(res.json().code, code, res.body);
    assert.match(res.json().message, message);
  }
  const notJson = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: '{"name": ' });
  assert.equal(notJson.statusCode, 400);
  assert.equal(notJson.json().code, 'INVALID_JSON');
  const list = (await app.inject({ url: '/v1/sessions' })).json();
  assert.equal(list.sessions.length, 0, 'no failed create left anything behind');
});

test('"." and ".." are no session names: URLs resolve them away, so every place that takes a name refuses them', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('src') })).statusCode, 201);
  for (const name of ['.', '..']) {
    const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams(name) });
    assert.equal(created.statusCode, 400, created.body);
    assert.equal(created.json().code, 'INVALID_NAME');
    assert.match(created.json().message, /^name: /);
    const forked = await app.inject({ method: 'POST', url: '/v1/sessions/src/fork', payload: { name } });
    assert.equal(forked.json().code, 'INVALID_NAME', forked.body);
    const token = await app.inject({ method: 'POST', url: '/v1/tokens', payload: { name: 'viewer', scope: 'read', sessions: [name] } });
    assert.equal(token.json().code, 'INVALID_BODY', token.body);
    assert.match(token.json().message, /sessions/);
    // Metric names are JSON keys, never part of a URL: "." and ".." are names like any.
    const step = await app.inject({ method: 'POST', url: '/v1/sessions/src/step', payload: { grads: { b: randomData(7, 3) }, metrics: { [name]: 1 } } });
    assert.equal(step.statusCode, 200, step.body);
  }
  // Names that merely hold dots are fine.
  for (const name of ['...', '.a', 'a.', 'v1.2']) {
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams(name) })).statusCode, 201, name);
    assert.equal((await app.inject({ url: `/v1/sessions/${name}` })).json().name, name);
  }
  assert.deepEqual((await app.inject({ url: '/v1/sessions' })).json().sessions.map((s: { name: string }) => s.name), ['...', '.a', 'a.', 'src', 'v1.2']);
  assert.equal((await app.inject({ url: '/v1/sessions/src' })).json().version, 3, 'the two steps with metrics named "." and "..", and nothing else');
});

test('steps match torch.optim.ASGD bit for bit: groups, weight decay, maximize, averaging, missing grads', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const { app } = await buildTestApp(t);
  const params = [
    { name: 'w', shape: [5, 7], data: randomData(35, 11) },
    { name: 'b', shape: [17], data: randomData(17, 12) },
    { name: 'scale', shape: [], data: randomData(1, 13) },
  ];
  const defaults = { lr: 0.05, lambd: 0.001, alpha: 0.75, t0: 4 };
  const groups = [
    { params: ['w', 'scale'], weight_decay: 0.1 },
    { params: ['b'], lr: 0.2, maximize: true, t0: 2 },
  ];
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'exact', params, hyperparameters: defaults, param_groups: groups } });
  assert.equal(created.statusCode, 201, created.body);
  const steps: Record<string, number[] | null>[] = [];
  for (let k = 0; k < 40; k++) {
    const step: Record<string, number[] | null> = {
      w: randomData(35, 100 + k, 2),
      b: k % 3 === 1 ? null : randomData(17, 200 + k),
      scale: k < 5 ? null : randomData(1, 300 + k),
    };
    steps.push(step);
    const grads = Object.fromEntries(Object.entries(step).filter(([, v]) => v !== null).map(([n, v]) => [n, n === 'w' ? { shape: [5, 7], data: v } : v]));
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/exact/step', payload: { grads } });
    assert.equal(res.statusCode, 200, res.body);
    assert.deepEqual(res.json(), { session: 'exact', step: k + 1, version: k + 2, staleness: 0 });
    assert.equal(res.headers.etag, `"${k + 2}"`);
  }
  const ref = runTorchReference({ params, defaults, groups, steps });
  // The service numbers parameters group by group, as PyTorch's state_dict does: w, scale, b.
  const mine = (await app.inject({ url: '/v1/sessions/exact/params' })).json();
  for (const p of params) assert.deepEqual(hexOf(mine.params[p.name].data), ref.params[p.name], `param ${p.name}`);
  const averaged = (await app.inject({ url: '/v1/sessions/exact/params?averaged=true' })).json();
  for (const p of params) assert.deepEqual(hexOf(averaged.params[p.name].data), ref.averaged[p.name], `ax ${p.name}`);
  const sd = (await app.inject({ url: '/v1/sessions/exact/state_dict' })).json();
  assert.deepEqual(Object.keys(sd.state).sort(), Object.keys(ref.state).sort());
  for (const [k, s] of Object.entries(ref.state)) {
    const m = sd.state[k];
    assert.deepEqual(Object.keys(m), ['step', 'eta', 'mu', 'ax']);
    assert.deepEqual([hexOf([m.step])[0], hexOf([m.eta])[0], hexOf([m.mu])[0]], [s.step, s.eta, s.mu], `state ${k} scalars`);
    assert.deepEqual(hexOf(m.ax.data), s.ax, `state ${k} ax`);
  }
  assert.deepEqual(sd.param_groups.map((g: { params: number[] }) => g.params), ref.param_groups.map((g) => g.params));
  for (const [i, g] of sd.param_groups.entries()) {
    for (const key of ['lr', 'lambd', 'alpha', 't0', 'weight_decay', 'maximize']) assert.equal(g[key], ref.param_groups[i][key], key);
  }
});

test('a bad step answers 4xx with a code naming the parameter and changes nothing', async (t) => {
  const { app } = await buildTestApp(t);
  await app.inject({ method: 'POST', url: '/v1/sessions', payload: twoParams('s') });
  const ok = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', payload: { grads: { w: randomData(21, 5), b: randomData(7, 6) } } });
  assert.equal(ok.statusCode, 200);
  const before = (await app.inject({ url: '/v1/sessions/s/state_dict' })).body;
  const beforeParams = (await app.inject({ url: '/v1/sessions/s/params' })).body;
  const cases: [unknown, number, string, RegExp][] = [
    [{ grads: { w: randomData(20, 1), b: randomData(7, 1) } }, 400, 'SHAPE_MISMATCH', /grads\.w/],
    [{ grads: { w: { shape: [7, 3], data: randomData(21, 1) } } }, 400, 'SHAPE_MISMATCH', /grads\.w\.shape/],
    [{ grads: { nope: [1] } }, 400, 'UNKNOWN_PARAMETER', /grads\.nope/],
    // torch's t.tolist() of a matrix: said to be nested, not a wrong count.
    [{ grads: { w: [randomData(7, 1), randomData(7, 2), randomData(7, 3)] } }, 400, 'SHAPE_MISMATCH', /grads\.w: expected a flat list of 21 numbers .*got a nested list/],
    [{ grads: { w: { shape: [3, 7], data: [randomData(7, 1), randomData(7, 2), randomData(7, 3)] } } }, 400, 'SHAPE_MISMATCH', /grads\.w: expected a flat list .*nested/],
    // A bare NaN (Python's json.dumps writes it; not JSON) is read as "NaN": the gradient is named.
    [{ grads: { w: randomData(21, 1), b: [1, 2, 3, 4, 5, 6, NaN] } }, 422, 'NON_FINITE_GRADIENT', /grads\.b: element 6/],
    [{ grads: { w: randomData(21, 1), b: [1, 2, 3, 4, 5, 6, 'NaN'] } }, 422, 'NON_FINITE_GRADIENT', /grads\.b: element 6/],
    [{ grads: { b: [1, 2, 3, 4, 5, 6, 'Infinity'] } }, 422, 'NON_FINITE_GRADIENT', /grads\.b/],
    [{ grads: { b: [1, 2, 3, 4, 5, 6, 1e39] } }, 422, 'NON_FINITE_GRADIENT', /grads\.b: element 6/],
    [{ grads: { b: [1, 2, 3, 4, 5, 6, 'x'] } }, 400, 'INVALID_TENSOR', /grads\.b\.data\[6\]/],
    [{ grads: {} }, 400, 'EMPTY_STEP', /grads/],
    [{ grads: [1, 2] }, 400, 'INVALID_BODY', /grads/],
    [{}, 400, 'INVALID_BODY', /grads/],
    [[1], 400, 'INVALID_BODY', /body/],
    [{ grads: { b: randomData(7, 1) }, base_version: -1 }, 400, 'INVALID_BODY', /base_version/],
  ];
  for (const [payload, status, code, message] of cases) {
    const raw = JSON.stringify(payload).replace('null]', 'NaN]');
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'content-type': 'application/json' }, payload: raw });
    assert.equal(res.statusCode, status, `${raw.slice(0, 120)} -> ${res.body}`);
    assert.equal(res.json().code, code, res.body);
    assert.match(res.json().message, message);
  }
  const unknown = await app.inject({ method: 'POST', url: '/v1/sessions/nope/step', payload: { grads: { w: [1] } } });
  assert.equal(unknown.statusCode, 404);
  assert.equal(unknown.json().code, 'SESSION_NOT_FOUND');
  assert.equal((await app.inject({ url: '/v1/sessions/s/state_dict' })).body, before);
  assert.equal((await app.inject({ url: '/v1/sessions/s/params' })).body, beforeParams);
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 2);
});

test('a JSON body over the JSON limit is 413 before it becomes a string; the process stays up', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_BODY_LIMIT_JSON: '4096' } });
  const big = { name: 'big', params: [{ name: 'w', shape: [2000], data: randomData(2000, 9) }] };
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: big });
  assert.equal(res.statusCode, 413, res.body);
  assert.equal(res.json().code, 'BODY_TOO_LARGE');
  assert.match(res.json().message, /JSON body is limited to 4096 bytes/);
  // Without a Content-Length (chunked), the limit holds once the bytes are in.
  const { Readable } = await import('node:stream');
  const chunked = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: Readable.from([Buffer.from(JSON.stringify(big))]) });
  assert.equal(chunked.statusCode, 413, chunked.body);
  const small = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'small', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
  assert.equal(small.statusCode, 201, small.body);
  assert.equal((await app.inject({ url: '/v1/sessions' })).json().sessions.length, 1);
});

test('foreach: true, false or None is kept as given (JSON, .pt, PATCH) and the step is the single-tensor path either way', async (t) => {
  const { app } = await buildTestApp(t);
  const { readTorchSave, toAsgdStateDict, torchSaveToBuffer, fromAsgdStateDict } = await import('../../src/formats/index.ts');
  const grads = { w: randomData(21, 7), b: randomData(7, 8) };
  const foreachOf = async (name: string) => (await app.inject({ url: `/v1/sessions/${name}/state_dict` })).json().param_groups.map((g: { foreach: unknown }) => g.foreach);
  for (const [name, foreach] of [['fe-true', true], ['fe-false', false], ['fe-none', null]] as const) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { ...twoParams(name), hyperparameters: { lr: 0.05, t0: 1, foreach } } });
    assert.equal(res.statusCode, 201, res.body);
    assert.deepEqual(res.json().param_groups.map((g: { foreach: unknown }) => g.foreach), [foreach]);
    assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads } })).statusCode, 200);
    assert.deepEqual(await foreachOf(name), [foreach]);
  }
  // The same step whatever the flag.
  const paramsOf = async (name: string) => (await app.inject({ url: `/v1/sessions/${name}/params` })).json().params;
  assert.deepEqual(await paramsOf('fe-true'), await paramsOf('fe-none'));
  assert.deepEqual(await paramsOf('fe-false'), await paramsOf('fe-none'));

  // Its torch.save state_dict says foreach=True, and loads back as it is.
  const pt = await app.inject({ url: '/v1/sessions/fe-true/state_dict', headers: { accept: 'application/octet-stream' } });
  assert.equal(pt.statusCode, 200);
  const read = toAsgdStateDict(readTorchSave(pt.rawPayload));
  assert.equal(read.paramGroups[0].foreach, true);
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/fe-none/state_dict', headers: { 'content-type': 'application/octet-stream' }, payload: torchSaveToBuffer(fromAsgdStateDict(read)) });
  assert.equal(put.statusCode, 200, put.body);
  assert.deepEqual(await foreachOf('fe-none'), [true]);
  assert.equal((await app.inject({ method: 'PATCH', url: '/v1/sessions/fe-none/param_groups', payload: { param_groups: [{ foreach: false }] } })).statusCode, 200);
  assert.deepEqual(await foreachOf('fe-none'), [false]);

  // Not a bool or None: refused naming it; the session unchanged.
  const bad = await app.inject({ method: 'PATCH', url: '/v1/sessions/fe-none/param_groups', payload: { param_groups: [{ foreach: 'yes' }] } });
  assert.equal(bad.statusCode, 400);
  assert.equal(bad.json().code, 'INVALID_HYPERPARAMETER');
  assert.match(bad.json().message, /param_groups\[0\]\.foreach/);
  assert.deepEqual(await foreachOf('fe-none'), [false]);
});

test('a page of the session list ends early once its sessions name LIST_PAGE_PARAMS parameters, and next goes on from there', async (t) => {
  // Found by a review: every entry lists its parameters, and a page of sessions with 100,000 parameters
  // each was hundreds of MB (past V8's longest string at about 100 such sessions).
  const { app } = await buildTestApp(t);
  const many = (name: string, n: number) => ({ name, params: Array.from({ length: n }, (_, i) => ({ name: `p${i}`, shape: [1], data: [i] })) });
  const share = Math.floor(LIST_PAGE_PARAMS * 0.4);
  for (const name of ['m-1', 'm-2', 'm-3']) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: many(name, share) });
    assert.equal(res.statusCode, 201, res.body);
  }
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: many('m-4', 2) })).statusCode, 201);
  const names = (page: { sessions: { name: string }[] }) => page.sessions.map((s) => s.name);
  const page1 = (await app.inject({ url: '/v1/sessions?limit=100' })).json();
  assert.deepEqual(names(page1), ['m-1', 'm-2'], 'a third would take the page past the bound');
  assert.equal(page1.next, 'm-2');
  const page2 = (await app.inject({ url: `/v1/sessions?limit=100&after=${page1.next}` })).json();
  assert.deepEqual(names(page2), ['m-3', 'm-4']);
  assert.equal(page2.next, null);
});

test('large JSON bodies parsed and held at once are bounded (ASGD_JSON_IN_FLIGHT_BYTES): one over the bound is 503 with Retry-After; a share is freed when its answer is sent or its client goes', async (t) => {
  // Found by a hostile review: six 160 MB JSON creates sent together took the process past V8's heap limit.
  // A body counts once it has arrived (announcing a length holds nothing), until its request is done: here a
  // contribution to a round, held open while the round waits for its second worker.
  const { app } = await buildTestApp(t, { env: { ASGD_JSON_IN_FLIGHT_BYTES: String(3 * 1024 * 1024) } });
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = new URL(base);
  const { connect } = await import('node:net');
  const N = 120_000;
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'r', params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], aggregation: { contributions: 2 } } });
  assert.equal(created.statusCode, 201, created.body);
  const contribution = (worker: string) => Buffer.from(JSON.stringify({ grads: { w: randomData(N, 3) }, worker, base_version: 1 }));
  const sockets: import('node:net').Socket[] = [];
  /** A POST over its own connection, `part` bytes of its body sent now; `rest()` sends the others. */
  const post = (path: string, body: Buffer, part = body.length) => {
    const socket = connect(Number(port), '127.0.0.1');
    sockets.push(socket);
    let text = '';
    socket.on('data', (d) => (text += d));
    const answer = new Promise<string>((resolve) => socket.on('close', () => resolve(text)));
    socket.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`);
    socket.write(body.subarray(0, part));
    return { answer, rest: () => socket.write(body.subarray(part)), drop: () => socket.destroy() };
  };
  const status = (answer: string) => Number(answer.split(' ')[1]);
  const big = contribution('w1');
  assert.ok(big.length > 2 * 1024 * 1024 && 2 * big.length > 3 * 1024 * 1024, `${big.length} bytes`);
  const large = () => app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ name: 'x', params: [{ name: 'w', shape: [N], data: randomData(N, 4) }] }) });

  try {
    // Announced and not sent: holds nothing (its headers are read well before the contribution below is).
    const announced = post('/v1/sessions', big, 1000);
    await new Promise((r) => setTimeout(r, 200));
    // A contribution arrived whole and waits for its round: it holds its share.
    const first = post('/v1/sessions/r/step?wait=30', big);
    for (let i = 0; i < 150 && (await app.inject({ url: '/v1/sessions/r' })).json().round?.contributions !== 1; i++) await new Promise((r) => setTimeout(r, 100));
    const refused = await large();
    assert.equal(refused.statusCode, 503, refused.body);
    assert.equal(refused.json().code, 'SERVICE_UNAVAILABLE');
    assert.equal(refused.headers['retry-after'], '1');
    assert.match(refused.json().message, /^body: 2\.\d MiB of JSON while this process holds 2\.\d MiB .*ASGD_JSON_IN_FLIGHT_BYTES 3\.0 MiB.*send large tensors as safetensors/);
    // Small bodies are not counted.
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'small', params: [{ name: 'w', shape: [2], data: [1, 2] }] } })).statusCode, 201);
    // Its client gives up (no answer is ever sent to it): the share goes with the connection (once the
    // server has seen it close: asked again for up to 5 s, each refusal creating nothing).
    first.drop();
    await first.answer;
    let after = await large();
    for (let i = 0; i < 50 && after.statusCode === 503; i++) {
      await new Promise((r) => setTimeout(r, 100));
      after = await large();
    }
    assert.equal(after.statusCode, 201, after.body);
    // Answered: the second contribution steps the round and is answered; nothing stays held.
    const second = post('/v1/sessions/r/step?wait=30', contribution('w2'));
    assert.equal(status(await second.answer), 200);
    announced.drop();
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ name: 'y', params: [{ name: 'w', shape: [N], data: randomData(N, 5) }] }) })).statusCode, 201);
    assert.deepEqual((await app.inject({ url: '/v1/sessions' })).json().sessions.map((s: { name: string }) => s.name), ['r', 'small', 'x', 'y']);
  } finally {
    // Before the app closes (it waits for open connections), also when the test fails half-way.
    for (const socket of sockets) socket.destroy();
  }
});

test('a session says which of its groups\' hyperparameters are ints (int_hyperparameters), in the keys\' order: JSON writes 4.0 as 4', async (t) => {
  // A PyTorch user's review: a worker joining a session made with t0=4 held 4.0; and their order followed
  // the order of the changes that made them ints (a README review).
  const { app } = await buildTestApp(t);
  const create = (name: string, t0: string) => app.inject({
    method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' },
    payload: `{"name": "${name}", "params": [{"name": "w", "shape": [1], "data": [1]}], "hyperparameters": {"lr": 0.5, "t0": ${t0}}}`,
  });
  assert.equal((await create('ints', '4')).statusCode, 201);
  assert.equal((await create('floats', '4.0')).statusCode, 201);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/ints' })).json().int_hyperparameters, [['t0', 'weight_decay']]);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/floats' })).json().int_hyperparameters, [['weight_decay']]);
  // An int lr set later comes first, as lr comes first.
  const patched = await app.inject({ method: 'PATCH', url: '/v1/sessions/ints/param_groups', headers: { 'content-type': 'application/json' }, payload: '{"param_groups": [{"lr": 1}]}' });
  assert.equal(patched.statusCode, 200, patched.body);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/ints' })).json().int_hyperparameters, [['lr', 't0', 'weight_decay']]);
  assert.deepEqual((await app.inject({ url: '/v1/sessions' })).json().sessions.find((s: { name: string }) => s.name === 'ints').int_hyperparameters, [['lr', 't0', 'weight_decay']]);
});
