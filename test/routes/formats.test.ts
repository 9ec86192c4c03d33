// PyTorch in, PyTorch out: torch.save files and safetensors through the API, checked with real PyTorch.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { writeSafetensors, streamToBuffer, type Tensor } from '../../src/formats/index.ts';
import { buildTestApp, randomData } from '../helper.ts';
import { hexOf, runPython, skipWithoutTorch } from '../support/torch.ts';

const params = [
  { name: 'fc.weight', shape: [3, 5], data: randomData(15, 41) },
  { name: 'fc.bias', shape: [3], data: randomData(3, 42) },
];
const hyper = { lr: 0.05, t0: 2, lambd: 0.001, weight_decay: 0.02 };
const grads = (k: number) => ({ 'fc.weight': randomData(15, 900 + k), 'fc.bias': randomData(3, 950 + k) });
const f32 = (shape: number[], data: number[]): Tensor => ({ dtype: 'float32', shape, data: Float32Array.from(data) });
const safetensorsOf = (tensors: Record<string, Tensor>, metadata?: Record<string, string>) => streamToBuffer(writeSafetensors(Object.entries(tensors), metadata));

async function setup(t: Parameters<typeof buildTestApp>[0], name = 'f') {
  const { app } = await buildTestApp(t);
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params, hyperparameters: hyper } });
  assert.equal(res.statusCode, 201, res.body);
  return app;
}

test('a downloaded .pt state_dict loads into torch ASGD, and stepping on there equals stepping on here', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const app = await setup(t);
  for (let k = 0; k < 5; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-pt-'));
  const sdRes = await app.inject({ url: '/v1/sessions/f/state_dict', headers: { accept: 'application/octet-stream' } });
  assert.equal(sdRes.statusCode, 200);
  assert.equal(sdRes.headers['content-type'], 'application/octet-stream');
  writeFileSync(join(dir, 'opt.pt'), sdRes.rawPayload);
  const paramsRes = await app.inject({ url: '/v1/sessions/f/params?format=pt' });
  writeFileSync(join(dir, 'model.pt'), paramsRes.rawPayload);
  const later = [5, 6, 7, 8].map(grads);
  for (let k = 5; k < 9; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const out = JSON.parse(runPython(`
import json, struct, sys
d = sys.argv[1]
model = torch.nn.Module()
model.fc = torch.nn.Linear(5, 3)
model.load_state_dict(torch.load(d + '/model.pt'))
opt = torch.optim.ASGD(model.parameters())
model = model.fc
sd = torch.load(d + '/opt.pt')
assert sd['param_groups'][0]['lr'] == 0.05 and isinstance(sd['param_groups'][0]['weight_decay'], float)
assert list(sd['state'][0].keys()) == ['step', 'eta', 'mu', 'ax'] and sd['state'][0]['step'].dtype == torch.float32
opt.load_state_dict(sd)
for g in json.loads(sys.stdin.read()):
    model.weight.grad = torch.tensor(g['fc.weight']).reshape(3, 5)
    model.bias.grad = torch.tensor(g['fc.bias'])
    opt.step()
hx = lambda t: [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().numpy().astype('<f4').tobytes())]
print(json.dumps({'w': hx(model.weight), 'b': hx(model.bias), 'ax': hx(opt.state[model.weight]['ax'])}))
`, [dir], JSON.stringify(later)));
  const mine = (await app.inject({ url: '/v1/sessions/f/params' })).json().params;
  assert.deepEqual(hexOf(mine['fc.weight'].data), out.w);
  assert.deepEqual(hexOf(mine['fc.bias'].data), out.b);
  const sd = (await app.inject({ url: '/v1/sessions/f/state_dict' })).json();
  assert.deepEqual(hexOf(sd.state['0'].ax.data), out.ax);
});

test('a state_dict torch.save wrote, PUT as it is, then stepped here, matches PyTorch bit for bit', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const app = await setup(t);
  const dir = mkdtempSync(join(tmpdir(), 'asgd-pt-'));
  const steps = Array.from({ length: 12 }, (_, k) => grads(k));
  const out = JSON.parse(runPython(`
import json, struct, sys
d = sys.argv[1]
spec = json.loads(sys.stdin.read())
w = torch.tensor(spec['w']).reshape(3, 5).requires_grad_()
b = torch.tensor(spec['b']).requires_grad_()
opt = torch.optim.ASGD([w, b], lr=0.05, t0=2, lambd=0.001, weight_decay=0.02)
for k, g in enumerate(spec['steps']):
    w.grad = torch.tensor(g['fc.weight']).reshape(3, 5)
    b.grad = torch.tensor(g['fc.bias'])
    opt.step()
    if k == 5:
        torch.save(opt.state_dict(), d + '/opt.pt')
        torch.save({'fc.weight': w.detach().clone(), 'fc.bias': b.detach().clone()}, d + '/model.pt')
hx = lambda t: [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().numpy().astype('<f4').tobytes())]
print(json.dumps({'w': hx(w), 'b': hx(b), 'ax': hx(opt.state[w]['ax'])}))
`, [dir], JSON.stringify({ w: params[0].data, b: params[1].data, steps })));
  // The model from the file (torch.save of a dict of tensors) and the optimizer state from torch.save.
  const model = await app.inject({ method: 'PUT', url: '/v1/sessions/f/checkpoint', payload: { model: {}, optimizer: {}, step: 0 } });
  assert.equal(model.statusCode, 400, 'a JSON checkpoint without the parameters is refused');
  const created = await app.inject({
    method: 'POST', url: `/v1/sessions?name=g&options=${encodeURIComponent(JSON.stringify({ hyperparameters: { lr: 0.5 } }))}`,
    headers: { 'content-type': 'application/octet-stream' }, payload: readFileSync(join(dir, 'model.pt')),
  });
  assert.equal(created.statusCode, 201, created.body);
  assert.deepEqual(created.json().params.map((p: { name: string }) => p.name), ['fc.weight', 'fc.bias']);
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/g/state_dict', headers: { 'content-type': 'application/octet-stream' }, payload: readFileSync(join(dir, 'opt.pt')) });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal(put.json().param_groups[0].lr, 0.05, 'hyperparameters come from the file');
  for (let k = 6; k < 12; k++) {
    const body = safetensorsOf({ 'fc.weight': f32([3, 5], steps[k]['fc.weight']), 'fc.bias': f32([3], steps[k]['fc.bias']) });
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/g/step', headers: { 'content-type': 'application/x-safetensors' }, payload: body });
    assert.equal(res.statusCode, 200, res.body);
  }
  const mine = (await app.inject({ url: '/v1/sessions/g/params' })).json().params;
  assert.deepEqual(hexOf(mine['fc.weight'].data), out.w);
  assert.deepEqual(hexOf(mine['fc.bias'].data), out.b);
  assert.deepEqual(hexOf((await app.inject({ url: '/v1/sessions/g/state_dict' })).json().state['0'].ax.data), out.ax);
});

test('safetensors: params download, gradients upload, session creation, state_dict round trip', async (t) => {
  const app = await setup(t);
  const res = await app.inject({ url: '/v1/sessions/f/params', headers: { accept: 'application/x-safetensors' } });
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['content-type'], 'application/x-safetensors');
  const headerLength = Number(res.rawPayload.readBigUInt64LE(0));
  const header = JSON.parse(res.rawPayload.subarray(8, 8 + headerLength).toString());
  assert.deepEqual(header['fc.weight'].shape, [3, 5]);
  assert.equal(header.__metadata__.version, '1');
  // The tensors are in safetensors' order (by name: fc.bias first); param_names gives the session's (the
  // model's), in which the clients hand them out (a review: the Python client's order depended on the format).
  assert.deepEqual(Object.keys(header).filter((k) => k !== '__metadata__'), ['fc.bias', 'fc.weight']);
  assert.deepEqual(JSON.parse(header.__metadata__.param_names), params.map((p) => p.name));
  const [b, e] = header['fc.weight'].data_offsets;
  const w = new Float32Array(res.rawPayload.buffer.slice(res.rawPayload.byteOffset + 8 + headerLength + b, res.rawPayload.byteOffset + 8 + headerLength + e));
  assert.deepEqual(hexOf(w), hexOf(params[0].data));

  // The same step as JSON and as safetensors gives the same state.
  await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'f2', params, hyperparameters: hyper } });
  await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(1) } });
  const st = safetensorsOf({ 'fc.weight': f32([3, 5], grads(1)['fc.weight']), 'fc.bias': f32([3], grads(1)['fc.bias']) });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/f2/step', headers: { 'content-type': 'application/x-safetensors' }, payload: st })).statusCode, 200);
  assert.equal((await app.inject({ url: '/v1/sessions/f2/state_dict' })).body, (await app.inject({ url: '/v1/sessions/f/state_dict' })).body);

  // state_dict as safetensors and back.
  const sdFile = await app.inject({ url: '/v1/sessions/f/state_dict?format=safetensors' });
  assert.equal(sdFile.statusCode, 200);
  const before = (await app.inject({ url: '/v1/sessions/f/state_dict' })).body;
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/f/state_dict', headers: { 'content-type': 'application/x-safetensors' }, payload: sdFile.rawPayload });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal((await app.inject({ url: '/v1/sessions/f/state_dict' })).body, before);

  // Creation from safetensors with options in the metadata.
  const create = await app.inject({
    method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/x-safetensors' },
    payload: safetensorsOf({ a: f32([2], [1, 2]), b: f32([], [3]) }, { asgd: JSON.stringify({ name: 'from-st', hyperparameters: { lr: 0.2 } }) }),
  });
  assert.equal(create.statusCode, 201, create.body);
  assert.equal(create.json().param_groups[0].lr, 0.2);
});

test('checkpoint download and upload: resuming from it equals never stopping; restarting from weights alone does not', async (t) => {
  const app = await setup(t);
  for (let k = 0; k < 8; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const ckpt = await app.inject({ url: '/v1/sessions/f/checkpoint' });
  assert.equal(ckpt.statusCode, 200);
  assert.equal(ckpt.headers['content-type'], 'application/octet-stream');
  for (let k = 8; k < 20; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const uninterrupted = (await app.inject({ url: '/v1/sessions/f/params' })).json().params;

  for (const name of ['resumed', 'weights-only']) {
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params, hyperparameters: hyper } })).statusCode, 201);
  }
  const put = await app.inject({ method: 'PUT', url: '/v1/sessions/resumed/checkpoint', headers: { 'content-type': 'application/octet-stream' }, payload: ckpt.rawPayload });
  assert.equal(put.statusCode, 200, put.body);
  assert.equal(put.json().step, 8);
  // weights only: the parameters of the checkpoint, fresh optimizer state
  const weights = (await app.inject({ url: '/v1/sessions/resumed/params' })).json().params;
  const freshSd = (await app.inject({ url: '/v1/sessions/weights-only/state_dict' })).json();
  const putW = await app.inject({
    method: 'PUT', url: '/v1/sessions/weights-only/checkpoint',
    payload: { model: weights, optimizer: freshSd, step: 8 },
  });
  assert.equal(putW.statusCode, 200, putW.body);
  for (const name of ['resumed', 'weights-only']) {
    for (let k = 8; k < 20; k++) assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: grads(k) } })).statusCode, 200);
  }
  const resumed = (await app.inject({ url: '/v1/sessions/resumed/params' })).json().params;
  const restarted = (await app.inject({ url: '/v1/sessions/weights-only/params' })).json().params;
  assert.deepEqual(hexOf(resumed['fc.weight'].data), hexOf(uninterrupted['fc.weight'].data));
  assert.notDeepEqual(hexOf(restarted['fc.weight'].data), hexOf(uninterrupted['fc.weight'].data));
  // A checkpoint given to create a session (found by an operator's review: "params["model"] must be a
  // tensor, got OrderedDict") is named as what it is, with the two calls that do it.
  const asCreate = await app.inject({ method: 'POST', url: '/v1/sessions?name=from-ckpt', headers: { 'content-type': 'application/octet-stream' }, payload: ckpt.rawPayload });
  assert.equal(asCreate.statusCode, 400, asCreate.body);
  assert.match(asCreate.json().message, /is a checkpoint \(model and optimizer\), not a model state_dict: .*PUT …\/checkpoint/);
});

test('malformed files: each a 4xx with a code, the session unchanged, nothing run', async (t) => {
  const app = await setup(t);
  await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(0) } });
  const good = (await app.inject({ url: '/v1/sessions/f/state_dict?format=pt' })).rawPayload;
  const before = (await app.inject({ url: '/v1/sessions/f/state_dict' })).body + (await app.inject({ url: '/v1/sessions/f/params' })).body;
  const pt = { 'content-type': 'application/octet-stream' };
  const st = { 'content-type': 'application/x-safetensors' };
  // Pickles that would call os.system / builtins.eval when unpickled by an unsafe loader.
  const evilPickle = Buffer.from('\x80\x02cos\nsystem\nX\x05\x00\x00\x00touch\x85R.', 'latin1');
  const evalPickle = Buffer.from('\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.', 'latin1');
  const { zipStream } = await import('../../src/formats/index.ts');
  const zipOf = (pkl: Buffer) => streamToBuffer(zipStream([
    { name: 'archive/data.pkl', size: pkl.length, data: () => [pkl] },
    { name: 'archive/version', size: 2, data: () => [Buffer.from('3\n')] },
  ]));
  const headerTooLong = Buffer.alloc(16);
  headerTooLong.writeBigUInt64LE(1000n, 0);
  const cases: [string, string, Record<string, string>, Buffer, string][] = [
    ['PUT', '/v1/sessions/f/state_dict', pt, good.subarray(0, good.length - 100), 'ZIP_'],
    ['PUT', '/v1/sessions/f/state_dict', pt, zipOf(evilPickle), 'PICKLE_GLOBAL_REFUSED'],
    ['PUT', '/v1/sessions/f/state_dict', pt, zipOf(evalPickle), 'PICKLE_GLOBAL_REFUSED'],
    ['PUT', '/v1/sessions/f/checkpoint', pt, zipOf(evilPickle), 'PICKLE_GLOBAL_REFUSED'],
    ['POST', '/v1/sessions/f/step', pt, zipOf(evilPickle), 'PICKLE_GLOBAL_REFUSED'],
    ['PUT', '/v1/sessions/f/state_dict', pt, Buffer.from('not a zip at all'), 'ZIP_'],
    ['POST', '/v1/sessions/f/step', st, headerTooLong, 'SAFETENSORS_HEADER_INVALID'],
    ['POST', '/v1/sessions/f/step', st, Buffer.from([1, 2, 3]), 'SAFETENSORS_HEADER_INVALID'],
    ['POST', '/v1/sessions/f/step', st, safetensorsOf({ 'fc.bias': { dtype: 'float64', shape: [3], data: Float64Array.of(1, 2, 3) } }), 'INVALID_TENSOR'],
    ['POST', '/v1/sessions/f/step', st, safetensorsOf({ 'fc.bias': f32([1, 3], [1, 2, 3]) }), 'SHAPE_MISMATCH'],
    ['POST', '/v1/sessions/f/step', st, safetensorsOf({ 'fc.bias': f32([3], [1, NaN, 3]) }), 'NON_FINITE_GRADIENT'],
    ['POST', '/v1/sessions/f/step', st, safetensorsOf({ nope: f32([3], [1, 2, 3]) }), 'UNKNOWN_PARAMETER'],
    // One tensor more than the session has (a model with an extra variable): named, as in JSON.
    ['POST', '/v1/sessions/f/step', st, safetensorsOf({ 'fc.weight': f32([3, 5], new Array(15).fill(0)), 'fc.bias': f32([3], [1, 2, 3]), extra: f32([1], [1]) }), 'UNKNOWN_PARAMETER'],
    ['PUT', '/v1/sessions/f/state_dict', st, safetensorsOf({ 'state.0.ax': f32([3], [1, 2, 3]) }), 'INVALID_STATE_DICT'],
    // A malformed state_dict file answers the code a malformed JSON state_dict does.
    ['PUT', '/v1/sessions/f/state_dict', st, safetensorsOf({ 'state.x.ax': f32([3], [1, 2, 3]) }), 'INVALID_STATE_DICT'],
  ];
  for (const [method, url, headers, payload, code] of cases) {
    const res = await app.inject({ method: method as 'PUT', url, headers, payload });
    assert.ok(res.statusCode >= 400 && res.statusCode < 500, `${url} ${code}: ${res.statusCode} ${res.body}`);
    assert.ok(res.json().code.startsWith(code), `${url}: expected ${code}, got ${res.body}`);
  }
  // torch.save({"grads": {name: grad}}), the JSON body's wrapper in a file (a review: INVALID_STATE_DICT
  // "grads[\"grads\"] must be a tensor, got dict"): a tensor error saying what the file holds.
  const { torchSaveToBuffer, PyDict: Dict } = await import('../../src/formats/index.ts');
  const wrapped = await app.inject({
    method: 'POST', url: '/v1/sessions/f/step', headers: pt,
    payload: torchSaveToBuffer(new Dict([['grads', new Dict([['fc.bias', f32([3], [1, 2, 3])]])]])),
  });
  assert.equal(wrapped.statusCode, 400, wrapped.body);
  assert.equal(wrapped.json().code, 'INVALID_TENSOR');
  assert.match(wrapped.json().message, /^grads\["grads"\] must be a tensor, got dict: the file holds one tensor under each parameter's name/);
  // Every other shape a file of named tensors must not have: the same code (a review: INVALID_STATE_DICT for these).
  const { PyTuple: Tuple } = await import('../../src/formats/index.ts');
  for (const [value, message] of [
    [new Tuple([f32([3], [1, 2, 3])]), /^grads must be a dict of tensors by name, got tuple/],
    [new Dict([[1n, f32([3], [1, 2, 3])]]), /^grads has a non-string key 1/],
    [new Dict([['model', new Dict()], ['optimizer', new Dict()]]), /^grads is a checkpoint/],
  ] as const) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/f/step', headers: pt, payload: torchSaveToBuffer(value) });
    assert.equal(res.statusCode, 400, res.body);
    assert.deepEqual(res.json().code, 'INVALID_TENSOR', res.body);
    assert.match(res.json().message, message);
  }
  const refused = await app.inject({ method: 'PUT', url: '/v1/sessions/f/state_dict', headers: pt, payload: zipOf(evilPickle) });
  assert.match(refused.json().message, /os\.system/);
  const after = (await app.inject({ url: '/v1/sessions/f/state_dict' })).body + (await app.inject({ url: '/v1/sessions/f/params' })).body;
  assert.equal(after, before);
  assert.equal((await app.inject({ url: '/v1/sessions/f' })).json().version, 2);
  const wrongType = await app.inject({ method: 'POST', url: '/v1/sessions/f/step', headers: { 'content-type': 'text/plain' }, payload: 'x' });
  assert.equal(wrongType.statusCode, 415, wrongType.body);
  const notAcceptable = await app.inject({ url: '/v1/sessions/f/params', headers: { accept: 'text/html' } });
  assert.equal(notAcceptable.statusCode, 406);
  // A step answers JSON (or, with ?return, safetensors): an Accept of neither is 406 before it is applied.
  for (const accept of ['text/html', 'application/x-safetensors', 'application/json;q=0, */*']) {
    const step = await app.inject({ method: 'POST', url: '/v1/sessions/f/step', headers: { accept }, payload: { grads: grads(1) } });
    assert.equal(step.statusCode, 406, `Accept: ${accept}: ${step.body}`);
    assert.equal(step.json().code, 'NOT_ACCEPTABLE');
  }
  for (const accept of ['application/json', '*/*', 'application/*', 'text/html, application/json;q=0.1']) {
    const step = await app.inject({ method: 'POST', url: '/v1/sessions/f/step', headers: { accept }, payload: { grads: grads(2) } });
    assert.equal(step.statusCode, 200, `Accept: ${accept}: ${step.body}`);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/f' })).json().version, 6, 'the four accepted steps applied, the refused ones not');
});

test('Accept: the most specific range decides a format\'s quality (q=0 excludes it beside a wildcard); snapshots\' downloads vary by Accept', async (t) => {
  const app = await setup(t);
  const typeOf = async (url: string, accept: string) => {
    const res = await app.inject({ url, headers: { accept } });
    return res.statusCode === 200 ? String(res.headers['content-type']).split(';')[0] : res.statusCode;
  };
  const cases: [string, string, string | number][] = [
    ['/v1/sessions/f/params', 'application/json;q=0, */*', 'application/octet-stream'],
    ['/v1/sessions/f/params', 'application/json;q=0, application/*', 'application/octet-stream'],
    ['/v1/sessions/f/params', 'application/json;q=0, application/octet-stream;q=0, */*', 'application/x-safetensors'],
    ['/v1/sessions/f/params', 'application/json;q=0, application/octet-stream;q=0, application/x-safetensors;q=0, */*', 406],
    ['/v1/sessions/f/params', '*/*', 'application/json'],
    ['/v1/sessions/f/params', 'application/x-safetensors, application/json', 'application/x-safetensors'],
    ['/v1/sessions/f/params', 'application/json;q=0.5, application/x-safetensors;q=0.9', 'application/x-safetensors'],
    ['/v1/sessions/f/params', 'text/html, */*;q=0.1', 'application/json'],
    ['/v1/sessions/f/checkpoint', 'application/octet-stream;q=0, */*', 'application/json'],
    ['/v1/sessions/f/checkpoint', '*/*', 'application/octet-stream'],
    // Routes that answer JSON alone refuse an Accept that excludes it, as the downloads do (a review: 200 JSON).
    ...['/v1/sessions/f', '/v1/sessions/f/metrics', '/v1/sessions/f/hyperparameters', '/v1/sessions/f/norms', '/v1/sessions/f/snapshots', '/v1/sessions'].flatMap((url): [string, string, string | number][] => [
      [url, 'application/octet-stream', 406], [url, 'application/json;q=0, */*', 406], [url, 'text/html', 406],
      [url, 'text/html, application/*;q=0.5', 'application/json'], [url, '*/*', 'application/json'],
    ]),
    // Health probes are answered whatever they accept.
    ['/healthz', 'text/html', 'application/json'],
  ];
  for (const [url, accept, expected] of cases) assert.equal(await typeOf(url, accept), expected, `${url} Accept: ${accept}`);
  const snapshot = (await app.inject({ method: 'POST', url: '/v1/sessions/f/snapshots' })).json().id;
  for (const kind of ['params', 'state_dict', 'checkpoint']) {
    const res = await app.inject({ url: `/v1/sessions/f/snapshots/${snapshot}/${kind}`, headers: { accept: 'application/x-safetensors, */*' } });
    assert.equal(res.statusCode, 200, res.body);
    assert.match(String(res.headers.vary), /(^|, *)Accept(,|$)/, `${kind}: Vary: ${res.headers.vary}`);
  }
});

test('a safetensors file sent as application/octet-stream (or a torch.save file as safetensors) is refused saying which it is and the Content-Type to send', async (t) => {
  const app = await setup(t);
  const before = (await app.inject({ url: '/v1/sessions/f' })).json().version;
  const safetensors = (await app.inject({ url: '/v1/sessions/f/params?format=safetensors' })).rawPayload;
  const pt = (await app.inject({ url: '/v1/sessions/f/params?format=pt' })).rawPayload;
  for (const [url, method] of [['/v1/sessions/f/params', 'PUT'], ['/v1/sessions/f/step', 'POST']] as const) {
    const asPt = await app.inject({ method, url, headers: { 'content-type': 'application/octet-stream' }, payload: safetensors });
    assert.equal(asPt.statusCode, 400, asPt.body);
    assert.equal(asPt.json().code, 'ZIP_CORRUPT');
    assert.match(asPt.json().message, /\(it is a safetensors file: send it with Content-Type: application\/x-safetensors\)/);
    const asSafetensors = await app.inject({ method, url, headers: { 'content-type': 'application/x-safetensors' }, payload: pt });
    assert.equal(asSafetensors.statusCode, 400, asSafetensors.body);
    assert.equal(asSafetensors.json().code, 'SAFETENSORS_HEADER_INVALID');
    assert.match(asSafetensors.json().message, /\(it is a zip archive, as torch\.save writes: send it with Content-Type: application\/octet-stream\)/);
  }
  // PUT checkpoint takes no safetensors: its hint says what it takes.
  const checkpoint = await app.inject({ method: 'PUT', url: '/v1/sessions/f/checkpoint', headers: { 'content-type': 'application/octet-stream' }, payload: safetensors });
  assert.equal(checkpoint.json().code, 'ZIP_CORRUPT');
  assert.match(checkpoint.json().message, /^checkpoint: not a zip archive: .*\(it is a safetensors file: PUT …\/checkpoint takes a torch\.save file of \{"model", "optimizer", "step"\}, or the same as JSON\)/);
  assert.equal((await app.inject({ url: '/v1/sessions/f' })).json().version, before, 'nothing changed');
});

test('torch 2.x (when present): downloaded .pt files load with weights_only=True and step on identically', async (t) => {
  const python = process.env.TORCH2_PYTHON;
  if (!python) return t.skip('TORCH2_PYTHON is not set (no torch 2.x on this machine)');
  const app = await setup(t);
  for (let k = 0; k < 5; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-pt2-'));
  writeFileSync(join(dir, 'opt.pt'), (await app.inject({ url: '/v1/sessions/f/state_dict?format=pt' })).rawPayload);
  writeFileSync(join(dir, 'model.pt'), (await app.inject({ url: '/v1/sessions/f/params?format=pt' })).rawPayload);
  writeFileSync(join(dir, 'ckpt.pt'), (await app.inject({ url: '/v1/sessions/f/checkpoint' })).rawPayload);
  const later = [5, 6, 7].map(grads);
  for (let k = 5; k < 8; k++) await app.inject({ method: 'POST', url: '/v1/sessions/f/step', payload: { grads: grads(k) } });
  const { spawnSync } = await import('node:child_process');
  const r = spawnSync(python, ['-c', `
import json, struct, sys, torch
torch.set_num_threads(1)
d = sys.argv[1]
ckpt = torch.load(d + '/ckpt.pt', weights_only=True)
assert ckpt['step'] == 5
model = torch.nn.Module()
model.fc = torch.nn.Linear(5, 3)
model.load_state_dict(torch.load(d + '/model.pt', weights_only=True))
opt = torch.optim.ASGD(model.parameters())
opt.load_state_dict(torch.load(d + '/opt.pt', weights_only=True))
for g in json.loads(sys.stdin.read()):
    model.fc.weight.grad = torch.tensor(g['fc.weight']).reshape(3, 5)
    model.fc.bias.grad = torch.tensor(g['fc.bias'])
    opt.step()
hx = lambda t: [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().numpy().astype('<f4').tobytes())]
print(json.dumps({'w': hx(model.fc.weight), 'b': hx(model.fc.bias)}))
`, dir], { input: JSON.stringify(later), encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout);
  const mine = (await app.inject({ url: '/v1/sessions/f/params' })).json().params;
  assert.deepEqual(hexOf(mine['fc.weight'].data), out.w);
  assert.deepEqual(hexOf(mine['fc.bias'].data), out.b);
});

test('a model state_dict with buffers (BatchNorm) is refused naming the buffer and what to send; its parameters alone create the session', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const { app } = await buildTestApp(t);
  const files = JSON.parse(runPython(`
import io, json, base64
m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
def saved(obj):
    b = io.BytesIO(); torch.save(obj, b); return base64.b64encode(b.getvalue()).decode()
print(json.dumps({"state_dict": saved(m.state_dict()), "parameters": saved(dict(m.named_parameters()))}))
`)) as Record<string, string>;
  const create = (name: string, file: string) => app.inject({
    method: 'POST', url: `/v1/sessions?name=${name}`, headers: { 'content-type': 'application/octet-stream' }, payload: Buffer.from(file, 'base64'),
  });
  const refused = await create('bn', files.state_dict);
  assert.equal(refused.statusCode, 400, refused.body);
  assert.equal(refused.json().code, 'INVALID_TENSOR');
  assert.match(refused.json().message, /1\.num_batches_tracked: dtype int64 is not supported.*named_parameters/);
  assert.equal((await app.inject({ url: '/v1/sessions/bn' })).statusCode, 404);
  const created = await create('bn', files.parameters);
  assert.equal(created.statusCode, 201, created.body);
  assert.deepEqual(created.json().params.map((p: { name: string }) => p.name), ['0.weight', '0.bias', '1.weight', '1.bias']);
});

test('PUT params takes torch.save(model.state_dict()) of a model with buffers (twelve BatchNorm layers): the buffers are left out, the parameters loaded exactly; a plain dict or safetensors with a name the session lacks is refused', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const { app } = await buildTestApp(t);
  const torch = JSON.parse(runPython(`
import io, json, base64, struct
torch.manual_seed(3)
m = torch.nn.Sequential(*[layer for _ in range(12) for layer in (torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))])
m(torch.randn(5, 3))  # the running statistics and num_batches_tracked move
def saved(obj):
    b = io.BytesIO(); torch.save(obj, b); return base64.b64encode(b.getvalue()).decode()
hx = lambda t: [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().contiguous().numpy().astype('<f4').tobytes())]
sd = m.state_dict()
lacking = m.state_dict()  # a module's state_dict (its _metadata kept) without one parameter
del lacking['0.bias']
params = dict(m.named_parameters())
print(json.dumps({
    "parameters": saved(params),
    "state_dict": saved(sd),
    "lacking": saved(lacking),
    "plain_lacking": saved(dict(lacking)),
    "plain_extra": saved({**{k: v.detach() for k, v in params.items()}, 'head.weight': torch.zeros(2, 3)}),
    "ddp": saved({'module.' + k: v.detach() for k, v in params.items()}),
    "ddp_state_dict": saved({'module.' + k: v for k, v in sd.items()}),
    "params": {k: hx(v) for k, v in params.items()},
    "buffers": len(sd) - len(params),
}))
`)) as { parameters: string; state_dict: string; lacking: string; plain_lacking: string; plain_extra: string; ddp: string; ddp_state_dict: string; params: Record<string, string[]>; buffers: number };
  assert.equal(torch.buffers, 36);
  const pt = { 'content-type': 'application/octet-stream' };
  const created = await app.inject({ method: 'POST', url: '/v1/sessions?name=bn', headers: pt, payload: Buffer.from(torch.parameters, 'base64') });
  assert.equal(created.statusCode, 201, created.body);
  const put = (payload: Buffer, type = 'application/octet-stream') => app.inject({ method: 'PUT', url: '/v1/sessions/bn/params', headers: { 'content-type': type }, payload });
  const version = async () => (await app.inject({ url: '/v1/sessions/bn' })).json().version as number;

  const loaded = await put(Buffer.from(torch.state_dict, 'base64'));
  assert.equal(loaded.statusCode, 200, loaded.body);
  const params = (await app.inject({ url: '/v1/sessions/bn/params' })).json().params as Record<string, { data: number[] }>;
  assert.deepEqual(Object.keys(params), Object.keys(torch.params), 'the buffers are not parameters of the session');
  for (const name of Object.keys(torch.params)) assert.deepEqual(hexOf(params[name].data), torch.params[name], name);

  const before = await version();
  // A parameter missing from the state_dict: nothing is left out, and the refusal names the first entry the session lacks and what is missing.
  const lacking = await put(Buffer.from(torch.lacking, 'base64'));
  assert.equal(lacking.statusCode, 400, lacking.body);
  assert.equal(lacking.json().code, 'UNKNOWN_PARAMETER');
  assert.match(lacking.json().message, /^params\.1\.running_mean: .*"0\.bias" is missing from params/);
  // The same as a plain dict (dict(model.state_dict()): no _metadata): named so too, not refused for its
  // int64 buffer's dtype (a review).
  const plainLacking = await put(Buffer.from(torch.plain_lacking, 'base64'));
  assert.equal(plainLacking.statusCode, 400, plainLacking.body);
  assert.equal(plainLacking.json().code, 'UNKNOWN_PARAMETER');
  assert.match(plainLacking.json().message, /^params\.1\.running_mean: .*"0\.bias" is missing from params/);
  // A dict of tensors (not a module's state_dict) or a safetensors file naming what the session lacks: refused, as in JSON.
  const extra = await put(Buffer.from(torch.plain_extra, 'base64'));
  assert.equal(extra.statusCode, 400, extra.body);
  assert.equal(extra.json().code, 'UNKNOWN_PARAMETER');
  assert.match(extra.json().message, /^params\.head\.weight: .*a buffer .*\? send the parameters only, dict\(model\.named_parameters\(\)\), or torch\.save\(model\.state_dict\(\)\) as a file$/);
  // A DistributedDataParallel model's names: said as such, with what to send.
  const ddp = await put(Buffer.from(torch.ddp, 'base64'));
  assert.equal(ddp.statusCode, 400, ddp.body);
  assert.equal(ddp.json().code, 'UNKNOWN_PARAMETER');
  assert.match(ddp.json().message, /^params\.module\.0\.weight: .*names that begin with "module\." are a DistributedDataParallel or DataParallel model's: use the names of model\.module .*take "module\." off each name\)$/);
  // Its whole state_dict, buffers and all (int64 num_batches_tracked): the same, not "a buffer, not a parameter?" (a review).
  const ddpModule = await put(Buffer.from(torch.ddp_state_dict, 'base64'));
  assert.equal(ddpModule.statusCode, 400, ddpModule.body);
  assert.equal(ddpModule.json().code, 'UNKNOWN_PARAMETER');
  assert.match(ddpModule.json().message, /^params\.module\.0\.weight: .*names that begin with "module\." are a DistributedDataParallel/);
  const json = await app.inject({ method: 'PUT', url: '/v1/sessions/bn/params', payload: { params: { '_orig_mod.0.weight': { shape: [3, 3], data: Array(9).fill(0) } } } });
  assert.equal(json.statusCode, 400, json.body);
  assert.match(json.json().message, /^params\._orig_mod\.0\.weight: .*names that begin with "_orig_mod\." are a torch\.compile\(\)d model's/);
  const floats = (hex: string[]) => new Float32Array(new Uint32Array(hex.map((h) => parseInt(h, 16))).buffer);
  const safetensors = streamToBuffer(writeSafetensors([
    ...Object.entries(torch.params).map(([name, hex]): [string, Tensor] => [name, { dtype: 'float32', shape: [floats(hex).length], data: floats(hex) }]),
    ['1.num_batches_tracked', { dtype: 'int64', shape: [], data: new BigInt64Array([1n]) }],
  ]));
  const asSafetensors = await put(safetensors, 'application/x-safetensors');
  assert.equal(asSafetensors.statusCode, 400, asSafetensors.body);
  // A name the session lacks, as the README has it for safetensors (before its int64 dtype is read).
  assert.equal(asSafetensors.json().code, 'UNKNOWN_PARAMETER');
  assert.match(asSafetensors.json().message, /^params\.1\.num_batches_tracked: no parameter named .*send the parameters only, dict\(model\.named_parameters\(\)\)/);
  assert.equal(await version(), before, 'nothing changed');
});

test('PUT checkpoint of a training script\'s checkpoint (its argparse.Namespace, numpy values, an LR scheduler beside model and optimizer) loads them exactly; the same objects in the optimizer are refused naming where', async (t) => {
  const skip = skipWithoutTorch();
  if (skip) return t.skip(skip);
  const { app } = await buildTestApp(t);
  const torch = JSON.parse(runPython(`
import argparse, collections, io, json, base64, struct
import numpy as np
torch.manual_seed(5)
m = torch.nn.Linear(3, 2)
opt = torch.optim.ASGD(m.parameters(), lr=0.05, t0=1)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
for _ in range(3):
    m.weight.grad = torch.randn(2, 3); m.bias.grad = torch.randn(2)
    opt.step(); sched.step()
def saved(obj):
    b = io.BytesIO(); torch.save(obj, b); return base64.b64encode(b.getvalue()).decode()
hx = lambda t: [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().contiguous().numpy().astype('<f4').tobytes())]
extras = {'args': argparse.Namespace(lr=0.05, epochs=3), 'best_loss': np.float64(0.25), 'history': np.arange(4), 'scheduler': sched, 'counts': collections.defaultdict(int, a=2), 'epoch': 3}
poisoned = opt.state_dict(); poisoned['param_groups'][0]['best'] = np.float32(1)
print(json.dumps({
    "create": saved(dict(m.named_parameters())),
    "checkpoint": saved({'model_state_dict': m.state_dict(), 'optimizer_state_dict': opt.state_dict(), **extras}),
    "poisoned": saved({'model': m.state_dict(), 'optimizer': poisoned, 'args': extras['args']}),
    "module": saved({'model': m, 'optimizer': opt.state_dict()}),
    "whole": saved(m),
    "lightning": saved({'epoch': 3, 'global_step': 9, 'state_dict': m.state_dict(), 'optimizer_states': [opt.state_dict()], 'lr_schedulers': [sched.state_dict()]}),
    "params": {k: hx(v) for k, v in m.named_parameters()},
    "ax": [hx(opt.state[p]['ax']) for p in m.parameters()],
    "lr": opt.param_groups[0]['lr'],
}))
`)) as { create: string; checkpoint: string; poisoned: string; module: string; whole: string; lightning: string; params: Record<string, string[]>; ax: string[][]; lr: number };
  const file = (b64: string) => Buffer.from(b64, 'base64');
  const pt = { 'content-type': 'application/octet-stream' };
  const created = await app.inject({ method: 'POST', url: '/v1/sessions?name=run', headers: pt, payload: file(torch.create) });
  assert.equal(created.statusCode, 201, created.body);
  const loaded = await app.inject({ method: 'PUT', url: '/v1/sessions/run/checkpoint', headers: pt, payload: file(torch.checkpoint) });
  assert.equal(loaded.statusCode, 200, loaded.body);
  const params = (await app.inject({ url: '/v1/sessions/run/params' })).json().params as Record<string, { data: number[] }>;
  for (const [name, hex] of Object.entries(torch.params)) assert.deepEqual(hexOf(params[name].data), hex, name);
  const state = (await app.inject({ url: '/v1/sessions/run/state_dict' })).json();
  assert.deepEqual([0, 1].map((i) => hexOf(state.state[i].ax.data ?? state.state[i].ax)), torch.ax);
  assert.equal(state.param_groups[0].lr, torch.lr);

  const version = (await app.inject({ url: '/v1/sessions/run' })).json().version;
  for (const [payload, message] of [
    [torch.poisoned, /^checkpoint\.optimizer\.param_groups\[0\]\.best: pickle global numpy\.core\.multiarray\.scalar is not allowed here/],
    [torch.module, /^checkpoint\.model: pickle global torch\.nn\.modules\.linear\.Linear is not allowed here \(a whole torch\.nn\.Module: save model\.state_dict\(\) instead\)/],
  ] as const) {
    const refused = await app.inject({ method: 'PUT', url: '/v1/sessions/run/checkpoint', headers: pt, payload: file(payload) });
    assert.equal(refused.statusCode, 400, refused.body);
    assert.equal(refused.json().code, 'PICKLE_GLOBAL_REFUSED');
    assert.match(refused.json().message, message);
  }
  // Elsewhere (a state_dict, parameters, gradients) such an object is refused when named, as weights_only refuses
  // it, the file named, with what to send instead.
  const asStateDict = await app.inject({ method: 'PUT', url: '/v1/sessions/run/state_dict', headers: pt, payload: file(torch.poisoned) });
  assert.equal(asStateDict.json().code, 'PICKLE_GLOBAL_REFUSED');
  assert.match(asStateDict.json().message, /^state_dict: pickle global \S+ is not allowed \(torch\.load\(weights_only=True\) refuses it too/);
  for (const [method, url, message] of [
    ['POST', '/v1/sessions/run/step', /^grads: pickle global torch\.nn\.modules\.linear\.Linear is not allowed \(a whole torch\.nn\.Module was saved: send its gradients, \{name: p\.grad/],
    ['PUT', '/v1/sessions/run/params', /^params: pickle global torch\.nn\.modules\.linear\.Linear is not allowed \(a whole torch\.nn\.Module was saved: save dict\(model\.named_parameters\(\)\) instead\)/],
  ] as const) {
    const refused = await app.inject({ method, url, headers: pt, payload: file(torch.whole) });
    assert.equal(refused.statusCode, 400, refused.body);
    assert.match(refused.json().message, message);
  }
  // Another layout (PyTorch Lightning's): the layouts taken, the file's keys, and what to send.
  const lightning = await app.inject({ method: 'PUT', url: '/v1/sessions/run/checkpoint', headers: pt, payload: file(torch.lightning) });
  assert.equal(lightning.statusCode, 400, lightning.body);
  assert.equal(lightning.json().code, 'INVALID_STATE_DICT');
  assert.match(lightning.json().message, /^checkpoint\.model is missing \(a checkpoint is \{"model", "optimizer", "step"\?\}, or the tutorial's \{"model_state_dict", "optimizer_state_dict", …\}; this one has "epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers"; a PyTorch Lightning checkpoint: send \{"model": ckpt\["state_dict"\], "optimizer": ckpt\["optimizer_states"\]\[0\]\}/);
  const json = await app.inject({ method: 'PUT', url: '/v1/sessions/run/checkpoint', payload: { state_dict: {}, optimizer_states: [] } });
  assert.equal(json.statusCode, 400, json.body);
  assert.match(json.json().message, /^model: is missing \(.*this one has "state_dict", "optimizer_states"; a PyTorch Lightning checkpoint/);
  assert.equal((await app.inject({ url: '/v1/sessions/run' })).json().version, version, 'nothing changed');
});

test('a JSON read too large to give is refused (406) before an old version is rebuilt for it', async (t) => {
  const { app } = await buildTestApp(t);
  const n = 8_400_000; // a state_dict of 2n numbers: over the 16M a JSON answer holds; params alone under it
  const w = new Float32Array(n).fill(0.5);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions?name=big', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors([['w', { dtype: 'float32', shape: [n], data: w }]])) });
  assert.equal(created.statusCode, 201, created.body);
  const step = await app.inject({ method: 'POST', url: '/v1/sessions/big/step', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors([['w', { dtype: 'float32', shape: [n], data: new Float32Array(n).fill(0.25) }]])) });
  assert.equal(step.statusCode, 200, step.body);
  const replayed = async () => Number(/^asgd_replayed_steps_total (\S+)$/m.exec((await app.inject({ url: '/metrics' })).body)?.[1]);
  const before = await replayed();
  const old = await app.inject({ url: '/v1/sessions/big/state_dict?version=1', headers: { accept: 'application/json' } });
  assert.equal(old.statusCode, 406, old.body);
  assert.match(old.json().message, /JSON answers hold at most 16777216 numbers/);
  await app.sessions.dropCache(); // the size then comes from the session's row
  const again = await app.inject({ url: '/v1/sessions/big/checkpoint?version=2&format=json' });
  assert.equal(again.statusCode, 406, again.body);
  assert.equal(await replayed(), before, 'no state was built for the refused reads');
  assert.equal(app.sessions.cacheStats().sessions, 0);
});

test('files real torch wrote with what torch.load(weights_only=True) takes: Parameters carrying attributes create a session and load as params; the tutorial\'s checkpoint with a config of dtypes, devices, a layout and a complex loads as torch has it', async (t) => {
  // test/fixtures/formats/weights_only_values.py made them, with torch 1.13 and 2.13 (2.x pickles a Parameter's
  // attributes with _rebuild_parameter_with_state; 1.13 leaves them out).
  const { app } = await buildTestApp(t);
  const options = encodeURIComponent(JSON.stringify({ hyperparameters: { lr: 0.05, t0: 1, lambd: 1e-3 } }));
  for (const label of ['2.x', '1.13']) {
    const dir = join(import.meta.dirname, `../fixtures/formats/torch-${label}`);
    const file = (name: string) => readFileSync(join(dir, name));
    const expected = JSON.parse(file('weights-only-values.json').toString('utf8'));
    const pt = { 'content-type': 'application/octet-stream' };
    const name = `attrs-${label.replace('.', '')}`;
    const created = await app.inject({ method: 'POST', url: `/v1/sessions?name=${name}&options=${options}`, headers: pt, payload: file('params-with-attributes.pt') });
    assert.equal(created.statusCode, 201, `${label}: ${created.body}`);
    const paramsOf = async () => (await app.inject({ url: `/v1/sessions/${name}/params` })).json().params;
    assert.deepEqual(hexOf((await paramsOf()).weight.data), expected.before.weight, label);

    const put = await app.inject({ method: 'PUT', url: `/v1/sessions/${name}/checkpoint`, headers: pt, payload: file('tutorial-checkpoint.pt') });
    assert.equal(put.statusCode, 200, `${label}: ${put.body}`);
    assert.equal(put.json().step, 5);
    const params = await paramsOf();
    for (const p of ['weight', 'bias']) assert.deepEqual(hexOf(params[p].data), expected.after[p], `${label} ${p}`);
    const { state } = (await app.inject({ url: `/v1/sessions/${name}/state_dict` })).json();
    for (const [index, s] of Object.entries(expected.state) as [string, Record<string, string[]>][]) {
      for (const key of ['step', 'eta', 'mu']) assert.deepEqual(hexOf([state[index][key]]), s[key], `${label} state[${index}].${key}`);
      assert.deepEqual(hexOf(state[index].ax.data), s.ax, `${label} state[${index}].ax`);
    }

    const putParams = await app.inject({ method: 'PUT', url: `/v1/sessions/${name}/params`, headers: pt, payload: file('params-with-attributes.pt') });
    assert.equal(putParams.statusCode, 200, `${label}: ${putParams.body}`);
    assert.deepEqual(hexOf((await paramsOf()).bias.data), expected.before.bias, label);
  }
  // An attribute torch's weights_only refuses (an argparse.Namespace) is refused here too, the session unchanged.
  const refused = await app.inject({ method: 'PUT', url: '/v1/sessions/attrs-2x/params', headers: { 'content-type': 'application/octet-stream' }, payload: readFileSync(join(import.meta.dirname, '../fixtures/formats/torch-2.x/refused-attribute.pt')) });
  assert.equal(refused.statusCode, 400, refused.body);
  assert.equal(refused.json().code, 'PICKLE_GLOBAL_REFUSED');
  assert.match(refused.json().message, /argparse\.Namespace/);
});
