// Inputs from the hostile-input review that got a 500 or were accepted and then lost: deep nesting hashed
// for an Idempotency-Key, and the name __proto__ for a parameter or a metric (JavaScript objects built by
// name cannot hold it as their own key).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { streamToBuffer, writeSafetensors, type Tensor } from '../../src/formats/index.ts';
import { buildTestApp } from '../helper.ts';

const safetensorsOf = (tensors: Record<string, Tensor>, metadata?: Record<string, string>) => streamToBuffer(writeSafetensors(Object.entries(tensors), metadata));
const f32 = (...v: number[]): Tensor => ({ dtype: 'float32', shape: [v.length], data: Float32Array.from(v) });
const session = { name: 's', params: [{ name: 'w', shape: [2], data: [0.5, -0.5] }] };

test('a deeply nested JSON step with an Idempotency-Key is a 400 (refused before parsing), not a 500; the session is unchanged', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const depth = 20_000;
  const payload = `{"grads":{"w":${'['.repeat(depth)}${']'.repeat(depth)}}}`;
  const r = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'content-type': 'application/json', 'idempotency-key': 'deep' }, payload });
  assert.equal(r.statusCode, 400, r.body);
  assert.equal(r.json().code, 'INVALID_BODY');
  assert.match(r.json().message, /^body: JSON nested deeper than 64 levels/);
  const now = (await app.inject({ url: '/v1/sessions/s' })).json();
  assert.equal(now.version, 1);
  // The key was not spent: the same key with a good body steps.
  const good = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'idempotency-key': 'deep' }, payload: { grads: { w: [0.1, 0.2] } } });
  assert.equal(good.statusCode, 200, good.body);
});

test('a wide JSON body (millions of empty lists) is refused before it is parsed, naming the bound; the session is unchanged', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  // To a route without a bound of its own on a JSON body's size (a create): the parser's bound on containers.
  const junk = `[${'[],'.repeat(2_500_000)}[]]`;
  const r = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: `{"name":"t","params":[{"name":"w","shape":[2],"data":[1,2]}],"junk":${junk}}` });
  assert.equal(r.statusCode, 400, r.body);
  assert.equal(r.json().code, 'INVALID_BODY');
  assert.match(r.json().message, /^body: JSON with more than 2401024 arrays and objects \(at character \d+\)/);
  assert.equal((await app.inject({ url: '/v1/sessions/t' })).statusCode, 404);
  // A step of this small session: refused sooner, by its size (a JSON step takes what its session needs).
  const step = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'content-type': 'application/json' }, payload: `{"grads":{"w":[0.1,0.2]},"metrics":{"loss":1},"junk":${junk}}` });
  assert.equal(step.statusCode, 413, step.body);
  assert.equal(step.json().code, 'BODY_TOO_LARGE');
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 1);
});

test('a JSON body with millions of keys is refused before it is parsed, naming the bound; the session is unchanged', async (t) => {
  // Found by a hostile-input review: 3 million keys in a step's metrics (40 MB, under the step's JSON bound
  // for a 1e6-parameter session) held the event loop 40 s; 10 million in a create ran the heap out.
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const keys = (n: number, from = 0) => Array.from({ length: n }, (_, i) => `"k${from + i}":1`).join(',');
  const one = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: `{"name":"t","params":[{"name":"w","shape":[2],"data":[1,2]}],"junk":{${keys(3_000_000)}}}` });
  assert.equal(one.statusCode, 400, one.body);
  assert.equal(one.json().code, 'INVALID_BODY');
  assert.match(one.json().message, /^body: JSON with more than 101024 keys in one object or 3201024 in all \(at character \d+\)/);
  // Spread over many objects of fewer keys each: the bound on the whole body.
  const objects = Array.from({ length: 40 }, (_, j) => `"o${j}":{${keys(90_000, j * 90_000)}}`).join(',');
  const all = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: `{"name":"t","params":[{"name":"w","shape":[2],"data":[1,2]}],"junk":{${objects}}}` });
  assert.equal(all.statusCode, 400, all.body);
  assert.match(all.json().message, /^body: JSON with more than 101024 keys in one object or 3201024 in all/);
  assert.equal((await app.inject({ url: '/v1/sessions/t' })).statusCode, 404);
  // A step needs a few keys a parameter (a tensor as {"shape", "data"}, a group's hyperparameters): its body
  // is bounded to that, whatever its size bound.
  const big = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'big', params: [{ name: 'w', shape: [1_000_000], data: new Array(1_000_000).fill(0.5) }] } });
  assert.equal(big.statusCode, 201, big.body);
  const metrics = Array.from({ length: 3 }, (_, j) => `"m${j}":{${keys(90_000, j * 90_000)}}`).join(',');
  const step = await app.inject({ method: 'POST', url: '/v1/sessions/big/step', headers: { 'content-type': 'application/json' }, payload: `{"grads":{"w":[]},"junk":{${metrics}}}` });
  assert.equal(step.statusCode, 400, step.body);
  assert.match(step.json().message, /^body: JSON with more than 101024 keys in one object or 4108 in all/);
  // The largest a step of many parameters needs fits: 40,000 gradients as {"shape", "data"}, one group each
  // with its lr (found by a review: a bound of one key a parameter refused them).
  const n = 40_000;
  const many = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'many', params: Array.from({ length: n }, (_, i) => ({ name: `p${i}`, shape: [1], data: [0.5] })), param_groups: Array.from({ length: n }, (_, i) => ({ params: [`p${i}`] })) } });
  assert.equal(many.statusCode, 201, many.body.slice(0, 300));
  const wide = await app.inject({ method: 'POST', url: '/v1/sessions/many/step', payload: { grads: Object.fromEntries(Array.from({ length: n }, (_, i) => [`p${i}`, { shape: [1], data: [0.1] }])), param_groups: Array.from({ length: n }, () => ({ lr: 0.02, weight_decay: 0 })), metrics: { loss: 1 } } });
  assert.equal(wide.statusCode, 200, wide.body.slice(0, 300));
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 1);
  assert.equal((await app.inject({ url: '/v1/sessions/big' })).json().version, 1);
});

test('__proto__ is refused as a parameter name (safetensors create) and as a metric name (safetensors step)', async (t) => {
  const { app } = await buildTestApp(t);
  // An object literal's __proto__ key sets the prototype: build the file's entries explicitly instead.
  const entries: [string, Tensor][] = [['w', f32(1, 2)], ['__proto__', f32(3)]];
  const file = streamToBuffer(writeSafetensors(entries));
  const refused = await app.inject({ method: 'POST', url: '/v1/sessions?name=p', headers: { 'content-type': 'application/x-safetensors' }, payload: file });
  assert.equal(refused.statusCode, 400, refused.body);
  assert.match(refused.json().message, /__proto__/);
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).statusCode, 404);

  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const step = await app.inject({
    method: 'POST', url: '/v1/sessions/s/step', headers: { 'content-type': 'application/x-safetensors' },
    payload: safetensorsOf({ w: f32(0.1, 0.2) }, { metrics: '{"__proto__": 1, "loss": 0.5}' }),
  });
  assert.equal(step.statusCode, 400, step.body);
  assert.equal(step.json().code, 'INVALID_METRICS');
  assert.match(step.json().message, /__metadata__\.metrics\.__proto__/);
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 1);
});

test('a query parameter the route does not read is refused by name (a misspelt check is not skipped)', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const r = await app.inject({ method: 'POST', url: '/v1/sessions/s/step?base_versoin=0', payload: { grads: { w: [0.1, 0.2] } } });
  assert.equal(r.statusCode, 400, r.body);
  assert.equal(r.json().code, 'INVALID_QUERY');
  assert.match(r.json().message, /^base_versoin: is not a parameter of this route \(it reads .*base_version/);
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 1);
  const read = await app.inject({ url: '/v1/sessions/s/params?fromat=pt' });
  assert.equal(read.statusCode, 400);
  assert.match(read.json().message, /^fromat:/);
  assert.equal((await app.inject({ url: '/v1/sessions/s/params?format=json' })).statusCode, 200);
  // Routes that read no query refuse one too (DELETE ?force=true deleted, GET /v1/tokens?all=true looked filtered).
  for (const [method, url] of [['GET', '/v1/sessions/s?x=1'], ['DELETE', '/v1/sessions/s?force=true'], ['GET', '/v1/tokens?all=true'], ['GET', '/v1/sessions/s/snapshots?x=1'],
    ['GET', '/v1/sessions/s/snapshots/1/state_dict?averaged=true'], ['GET', '/v1/sessions/s/snapshots/1/checkpoint?averaged=true']] as const) {
    const res = await app.inject({ method, url });
    assert.equal(res.statusCode, 400, `${method} ${url}: ${res.body}`);
    assert.equal(res.json().code, 'INVALID_QUERY');
  }
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).statusCode, 200, 'not deleted');
  assert.equal((await app.inject({ url: '/v1/sessions/s/snapshots/1/params?averaged=true' })).statusCode, 200);
  // A whole decimal number too large to be a version says so (not "must be a whole number written in decimal").
  const huge = await app.inject({ url: '/v1/sessions/s/params?after_version=99999999999999999999' });
  assert.equal(huge.statusCode, 400);
  assert.equal(huge.json().message, 'after_version: is too large (at most 9007199254740991)');
});

test('Python json.dumps\' bare NaN and Infinity (not JSON) are read as those values: the field is named, not "not valid JSON"', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const send = (text: string) => app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'content-type': 'application/json' }, payload: text });
  const cases: [string, number, string, RegExp][] = [
    ['{"grads": {"w": [0.1, 0.2]}, "metrics": {"loss": NaN}}', 400, 'INVALID_METRICS', /^metrics\.loss/],
    ['{"grads": {"w": [0.1, 0.2]}, "metrics": {"NaN": -Infinity}}', 400, 'INVALID_METRICS', /^metrics\.NaN/],
    ['{"grads": {"w": [0.1, 0.2]}, "param_groups": [{"lr": Infinity}]}', 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.lr: /],
    ['{"grads": {"w": [0.1, NaN]}}', 422, 'NON_FINITE_GRADIENT', /^grads\.w: element 1 is not finite/],
    // A number beyond float64 (JSON.parse reads it as an infinity) is said to be one, not "must be number".
    ['{"grads": {"w": [0.1, 0.2]}, "param_groups": [{"weight_decay": 1e400}]}', 400, 'INVALID_HYPERPARAMETER', /^param_groups\[0\]\.weight_decay: must be a finite number \(this one is beyond float64's range/],
    // A finite number beyond float32's range: said as such, not as "not finite" (it is, as written).
    ['{"grads": {"w": [0.1, 1e39]}}', 422, 'NON_FINITE_GRADIENT', /^grads\.w: element 1 overflows float32/],
    ['{"grads": {"w": [-1e39, 0.1]}}', 422, 'NON_FINITE_GRADIENT', /^grads\.w: element 0 overflows float32/],
    ['{"grads": {"w": [0.1, NaN}}', 400, 'INVALID_JSON', /not valid JSON/],
  ];
  for (const [text, status, code, message] of cases) {
    const res = await send(text);
    assert.equal(res.statusCode, status, `${text}: ${res.body}`);
    assert.equal(res.json().code, code, res.body);
    assert.match(res.json().message, message);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/s' })).json().version, 1);
  // A string that says NaN stays a string (a parameter named "NaN" is no number).
  const named = await send('{"grads": {"w": [0.5, 0.25]}, "metrics": {"NaN": 1}}');
  assert.equal(named.statusCode, 200, named.body);
});

test('text PostgreSQL cannot store (a NUL, an unpaired surrogate) and bytes that are not UTF-8 are refused, naming the field; the session is unchanged', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const sd = (await app.inject({ url: '/v1/sessions/s/state_dict' })).json();
  const put = (groups: string) => app.inject({
    method: 'PUT', url: '/v1/sessions/s/state_dict', headers: { 'content-type': 'application/json' },
    payload: `{"state":${JSON.stringify(sd.state)},"param_groups":[${groups}]}`,
  });
  const group = JSON.stringify(sd.param_groups[0]).slice(1, -1);
  for (const [groups, field] of [
    [`{${group},"note":"a\\u0000b"}`, 'param_groups[0].note'],
    [`{${group},"note":"\\ud800"}`, 'param_groups[0].note'],
    [`{${group},"\\udc00x":1}`, 'param_groups[0]."\\udc00x"'],
  ] as const) {
    const r = await put(groups);
    assert.equal(r.statusCode, 400, r.body);
    assert.equal(r.json().code, 'INVALID_BODY');
    assert.equal(r.json().message.split(': text with')[0], field, r.body);
  }
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: '{"name":"u","params":[{"name":"w\\ud800","shape":[1],"data":[1]}]}' });
  assert.equal(created.statusCode, 400, created.body);
  assert.match(created.json().message, /^params\[0\]\.name: text with a NUL character or an unpaired UTF-16 surrogate/);
  const latin1 = Buffer.concat([Buffer.from('{"name":"u","params":[{"name":"w'), Buffer.from([0xff, 0xfe]), Buffer.from('","shape":[1],"data":[1]}]}')]);
  const notUtf8 = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' }, payload: latin1 });
  assert.equal(notUtf8.statusCode, 400, notUtf8.body);
  assert.equal(notUtf8.json().code, 'INVALID_JSON');
  assert.match(notUtf8.json().message, /not UTF-8/);
  assert.equal((await app.inject({ url: '/v1/sessions/u' })).statusCode, 404);
  // A surrogate pair (an emoji, escaped) is text like any other.
  const ok = await put(`{${group},"note":"\\ud83d\\ude00"}`);
  assert.equal(ok.statusCode, 200, ok.body);
  assert.equal((await app.inject({ url: '/v1/sessions/s/state_dict' })).json().param_groups[0].note, '\u{1F600}');
});

test('a parameter name past 256 UTF-16 code units (129 emoji) is refused saying how it is counted', async (t) => {
  // Found by a hostile-input review: "must be 1-256 characters" for a name of 129 characters as Python counts them.
  const { app } = await buildTestApp(t);
  const name = '\u{1F600}'.repeat(129);
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'e', params: [{ name, shape: [1], data: [1] }] } });
  assert.equal(res.statusCode, 400, res.body);
  assert.equal(res.json().code, 'INVALID_TENSOR');
  assert.match(res.json().message, /must be 1-256 UTF-16 code units \(most characters take one, an emoji two\)/);
  const fits = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'e', params: [{ name: '\u{1F600}'.repeat(128), shape: [1], data: [1] }] } });
  assert.equal(fits.statusCode, 201, fits.body);
});
