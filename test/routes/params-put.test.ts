// PUT /v1/sessions/:name/params: the parameters change, the optimizer state does not, as when a PyTorch
// user edits model weights in place between torch.optim.ASGD steps.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bfloat16ToFloat, fromModelStateDict, halfToFloat, streamToBuffer, torchSaveToBuffer, writeSafetensors, type Tensor } from '../../src/formats/index.ts';
import { buildTestApp, randomData } from '../helper.ts';
import { hexOf, runTorchReference, skipWithoutTorch } from '../support/torch.ts';

const params = [
  { name: 'w', shape: [3, 4], data: randomData(12, 31) },
  { name: 'b', shape: [4], data: randomData(4, 32) },
];
const defaults = { lr: 0.05, t0: 2, lambd: 0.01, weight_decay: 0.01 };
const grads = (k: number) => ({ w: randomData(12, 700 + k), b: randomData(4, 800 + k) });

async function setup(t: Parameters<typeof buildTestApp>[0], env?: Record<string, string>) {
  const { app } = await buildTestApp(t, { env });
  const headers = env?.ASGD_ADMIN_TOKEN ? { authorization: `Bearer ${env.ASGD_ADMIN_TOKEN}` } : {};
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', headers, payload: { name: 'p', params, hyperparameters: defaults } });
  assert.equal(res.statusCode, 201, res.body);
  return app;
}

const f32 = (shape: number[], values: number[]): Tensor => ({ dtype: 'float32', shape, data: Float32Array.from(values) });

test('PUT params replaces the weights only; the next steps match torch.optim.ASGD stepping the edited weights', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const app = await setup(t);
  for (let k = 0; k < 5; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(k) } })).statusCode, 200);
  const stateBefore = (await app.inject({ url: '/v1/sessions/p/state_dict' })).json();

  // Clipped weights, as WGAN's p.data.clamp_(-0.1, 0.1): one as a tensor, one as a flat list.
  const now = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  const clipped = Object.fromEntries(params.map((p) => [p.name, (now[p.name].data as number[]).map((x) => Math.fround(Math.min(0.1, Math.max(-0.1, x))))]));
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', payload: { params: { w: { shape: [3, 4], data: clipped.w }, b: clipped.b } } });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal(put.json().version, 7);
  assert.equal(put.headers.etag, '"7"');
  assert.equal(put.json().step, 5, 'the session\'s step counts optimizer steps: unchanged');
  assert.deepEqual(put.json().param_groups[0].lr, defaults.lr);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p/params' })).json().params.w.data, clipped.w);
  // step, eta, mu and ax are what they were.
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p/state_dict' })).json(), stateBefore);

  const steps = [];
  for (let k = 5; k < 12; k++) {
    steps.push(grads(k));
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(k) } })).statusCode, 200);
  }
  const ref = runTorchReference({ params: params.map((p) => ({ ...p, data: clipped[p.name] })), defaults, groups: null, state_dict: stateBefore, steps });
  const mine = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  for (const p of params) assert.deepEqual(hexOf(mine[p.name].data), ref.params[p.name]);
  const sd = (await app.inject({ url: '/v1/sessions/p/state_dict' })).json();
  for (const [k, s] of Object.entries(ref.state)) assert.deepEqual(hexOf(sd.state[k].ax.data), s.ax);
});

test('PUT params takes safetensors and a torch.save model state_dict', async (t) => {
  const app = await setup(t);
  const w = randomData(12, 41).map(Math.fround);
  const b = randomData(4, 42).map(Math.fround);
  const st = streamToBuffer(writeSafetensors([['w', f32([3, 4], w)], ['b', f32([4], b)]]));
  const a = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'application/x-safetensors' }, payload: st });
  assert.equal(a.statusCode, 200, a.body);
  let got = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  assert.deepEqual(got.w.data, w);
  assert.deepEqual(got.b.data, b);

  const pt = torchSaveToBuffer(fromModelStateDict({ tensors: new Map([['w', f32([3, 4], b.concat(w).slice(0, 12))], ['b', f32([4], w.slice(0, 4))]]) }));
  const c = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'application/octet-stream', 'if-match': '"2"' }, payload: pt });
  assert.equal(c.statusCode, 200, c.body);
  assert.equal(c.json().version, 3);
  got = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  assert.deepEqual(got.w.data, b.concat(w).slice(0, 12));
  assert.deepEqual(got.b.data, w.slice(0, 4));
});

test('PUT params and create take float16 and bfloat16 parameters, widened exactly to float32', async (t) => {
  const app = await setup(t);
  // Every bit pattern class: normal, subnormal, negative zero, the largest finite.
  const halfBits = Uint16Array.from([0x3c00, 0x0001, 0x8000, 0x7bff, 0xb555, 0x03ff, 0x4248, 0xc000, 0x1234, 0x5678, 0x9abc, 0x0400]);
  const bBits = Uint16Array.from([0x7f7f, 0x0080, 0xbf00, 0x4049]);
  const half = { dtype: 'float16', shape: [3, 4], data: halfBits } as unknown as Tensor;
  const bf16 = { dtype: 'bfloat16', shape: [4], data: bBits } as unknown as Tensor;
  const expectW = Array.from(halfBits, halfToFloat); // -0.0 too: JSON answers write it as -0.0 (deepEqual tells it from 0)
  const expectB = Array.from(bBits, bfloat16ToFloat);
  for (const [type, body] of [
    ['application/x-safetensors', streamToBuffer(writeSafetensors([['w', half], ['b', bf16]]))],
    ['application/octet-stream', torchSaveToBuffer(fromModelStateDict({ tensors: new Map([['w', half], ['b', bf16]]) }))],
  ] as const) {
    const put = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': type }, payload: body });
    assert.equal(put.statusCode, 200, put.body);
    const read = await app.inject({ url: '/v1/sessions/p/params' });
    assert.match(read.body, /"data":\[1,5\.960464477539063e-8,-0\.0,65504,/, 'the sign of the zero in the JSON text');
    const got = read.json().params;
    assert.deepEqual(got.w.data, expectW, type);
    assert.deepEqual(got.b.data, expectB, type);
  }
  const created = await app.inject({
    method: 'POST', url: '/v1/sessions?name=h', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors([['w', half], ['b', bf16]])),
  });
  assert.equal(created.statusCode, 201, created.body);
  const got = (await app.inject({ url: '/v1/sessions/h/params' })).json().params;
  assert.deepEqual(got.w.data, expectW);
  assert.deepEqual(got.b.data, expectB);
  // A half parameter holding Inf is refused as a float32 one.
  const inf = await app.inject({
    method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'application/x-safetensors' },
    payload: streamToBuffer(writeSafetensors([['w', half], ['b', { ...bf16, data: Uint16Array.from([0, 0x7f80, 0, 0]) } as unknown as Tensor]])),
  });
  assert.equal(inf.statusCode, 400, inf.body);
  assert.match(inf.json().message, /^params\.b\.data\[1\]: is not finite$/);
});

test('PUT params refuses what does not fit the session, naming the field, and changes nothing', async (t) => {
  const app = await setup(t);
  await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(0) } });
  const before = (await app.inject({ url: '/v1/sessions/p/checkpoint?format=json' })).body;
  const w = randomData(12, 51);
  const b = randomData(4, 52);
  const json = (body: unknown, headers: Record<string, string> = {}) => app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers, payload: body as object });
  const file = (tensors: [string, Tensor][]) => app.inject({
    method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors(tensors)),
  });
  const cases: [Promise<{ statusCode: number; json(): { code: string; message: string } }>, number, string, RegExp][] = [
    [json({ params: { w, b, extra: [1] } }), 400, 'UNKNOWN_PARAMETER', /^params\.extra: /],
    [json({ params: { w } }), 400, 'STATE_DICT_MISMATCH', /^params\.b: missing /],
    [file([['w', f32([3, 4], w)]]), 400, 'STATE_DICT_MISMATCH', /^params\.b: missing /],
    [json({ params: { w: { shape: [4, 3], data: w }, b } }), 400, 'SHAPE_MISMATCH', /^params\.w\.shape: expected \[3,4\]/],
    [json({ params: { w: w.slice(1), b } }), 400, 'SHAPE_MISMATCH', /^params\.w: expected 12 elements/],
    [json({ params: { w: [...w.slice(1), 'NaN'], b } }), 400, 'INVALID_TENSOR', /^params\.w\.data\[11\]: is not finite$/],
    [json({ params: { w, b: [1e39, 0, 0, 0] } }), 400, 'INVALID_TENSOR', /^params\.b\.data\[0\]: overflows float32$/],
    // What GET params answers besides the tensors is taken back (and ignored), but checked as it answers it.
    [json({ params: { w, b }, step: -1 }), 400, 'INVALID_BODY', /^step: /],
    [json({ params: { w, b }, version: '2' }), 400, 'INVALID_BODY', /^version: /],
    [json({ params: { w, b }, averaged: 'yes' }), 400, 'INVALID_BODY', /^averaged: /],
    [json({ params: { w, b }, epoch: 3 }), 400, 'INVALID_BODY', /epoch: unknown key/],
    [json({ grads: { w, b } }), 400, 'INVALID_BODY', /params/],
    [json({ params: { w, b } }, { 'if-match': '"1"' }), 412, 'VERSION_MISMATCH', /^If-Match: expected "1", the session is at version 2$/],
    [file([['w', f32([3, 4], w)], ['b', f32([4], [0, Infinity, 0, 0])]]), 400, 'INVALID_TENSOR', /^params\.b\.data\[1\]: is not finite$/],
    [file([['w', f32([12], w)], ['b', f32([4], b)]]), 400, 'SHAPE_MISMATCH', /^params\.w: expected shape \[3,4\], got \[12\]/],
    [file([['w', f32([3, 4], w)], ['b', { dtype: 'int64', shape: [4], data: new BigInt64Array(4) } as unknown as Tensor]]), 400, 'INVALID_TENSOR', /^params\.b: dtype int64/],
    [app.inject({ method: 'PUT', url: '/v1/sessions/nope/params', payload: { params: { w, b } } }), 404, 'SESSION_NOT_FOUND', /nope/],
    [app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'text/csv' }, payload: '1,2' }), 415, 'UNSUPPORTED_MEDIA_TYPE', /Content-Type/],
  ];
  for (const [pending, status, code, message] of cases) {
    const res = await pending;
    assert.equal(res.statusCode, status, JSON.stringify(res.json()));
    assert.equal(res.json().code, code);
    assert.match(res.json().message, message);
  }
  const none = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params' });
  assert.equal(none.statusCode, 400);
  assert.equal(none.json().code, 'INVALID_BODY');
  assert.equal((await app.inject({ url: '/v1/sessions/p/checkpoint?format=json' })).body, before);
});

test('what GET params answers, in each format, PUT params takes back as it is (an earlier version, the averages, another session)', async (t) => {
  const app = await setup(t);
  const other = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'q', params, hyperparameters: defaults } });
  assert.equal(other.statusCode, 201, other.body);
  for (let k = 0; k < 3; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(k) } })).statusCode, 200);
  const get = (query: string) => app.inject({ url: `/v1/sessions/p/params?${query}` });
  const paramsOf = async (session: string) => (await app.inject({ url: `/v1/sessions/${session}/params` })).json().params;
  const cases: [string, string][] = [['version=2', 'application/json'], ['averaged=true', 'application/json'], ['format=safetensors&version=3', 'application/x-safetensors'],
    ['format=pt&averaged=true', 'application/octet-stream']];
  for (const [query, type] of cases) {
    const read = await get(query);
    assert.equal(read.statusCode, 200, read.body);
    const expected = (await get(query.replace(/format=\w+&?/, ''))).json().params;
    for (const session of ['p', 'q']) {
      const put = await app.inject({ method: 'PUT', url: `/v1/sessions/${session}/params`, headers: { 'content-type': type }, payload: read.rawPayload });
      assert.equal(put.statusCode, 200, `${query} into ${session}: ${put.body}`);
      assert.deepEqual(await paramsOf(session), expected, `${query} into ${session}`);
    }
  }
  // The step and the optimizer state stay the session's own: the echoed step is not taken.
  assert.equal((await app.inject({ url: '/v1/sessions/q' })).json().step, 0);
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).json().step, 3);
});

test('PUT params: a step token may send parameters (a worker clipping its weights); a read token may not', async (t) => {
  const admin = 'an-admin-token-for-params';
  const app = await setup(t, { ASGD_ADMIN_TOKEN: admin });
  const tokenOf = async (scope: string) => {
    const made = await app.inject({ method: 'POST', url: '/v1/tokens', headers: { authorization: `Bearer ${admin}` }, payload: { name: `a-${scope}`, scope, sessions: ['p'] } });
    assert.equal(made.statusCode, 201, made.body);
    return { authorization: `Bearer ${made.json().token}` };
  };
  const body = { params: { w: randomData(12, 61), b: randomData(4, 62) } };
  const read = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: await tokenOf('read'), payload: body });
  assert.equal(read.statusCode, 403);
  assert.equal(read.json().code, 'FORBIDDEN');
  const step = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: await tokenOf('step'), payload: body });
  assert.equal(step.statusCode, 200, step.body);
  assert.equal(step.json().version, 2);
});

test('PUT params equal to the session\'s, bit for bit, changes nothing: no new version, no snapshot; -0 for 0 is a change', async (t) => {
  const app = await setup(t);
  for (let k = 0; k < 2; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: grads(k) } })).statusCode, 200);
  const snapshots = async () => (await app.inject({ url: '/v1/sessions/p/snapshots' })).json().snapshots.length;
  const before = { snapshots: await snapshots(), state: (await app.inject({ url: '/v1/sessions/p/state_dict' })).json() };
  const now = (await app.inject({ url: '/v1/sessions/p/params' })).json().params;
  // The same values, as a worker of a round sends them after the same clamp another worker sent first.
  const same = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'if-match': '"3"' }, payload: { params: { w: now.w, b: now.b.data } } });
  assert.equal(same.statusCode, 200, same.body);
  assert.deepEqual([same.json().version, same.headers.etag, same.json().step], [3, '"3"', 2]);
  assert.equal(await snapshots(), before.snapshots, 'no snapshot written');
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p/state_dict' })).json(), before.state);
  // The If-Match is still checked.
  assert.equal((await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'if-match': '"2"' }, payload: { params: { w: now.w, b: now.b.data } } })).statusCode, 412);

  // One element different, or a zero's sign: a new version.
  const zeroed = { w: { shape: [3, 4], data: (now.w.data as number[]).map((x, i) => (i === 0 ? 0 : x)) }, b: now.b.data };
  assert.equal((await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', payload: { params: zeroed } })).json().version, 4);
  const negZero = { ...zeroed, w: { shape: [3, 4], data: zeroed.w.data.map((x, i) => (i === 0 ? -0 : x)) } };
  const signed = await app.inject({ method: 'PUT', url: '/v1/sessions/p/params', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors([
    ['w', f32([3, 4], negZero.w.data)], ['b', f32([4], negZero.b)],
  ])) });
  assert.equal(signed.statusCode, 200, signed.body);
  assert.equal(signed.json().version, 5, '-0 is not 0');
  assert.equal(await snapshots(), before.snapshots + 2);
});
