// Safetensors gradients in F16 and BF16: widened exactly to float32, so the session equals PyTorch
// applying the same half tensors `.float()`'d, bit for bit; logged as received (two bytes an element,
// with their dtype) and widened again when the state is rebuilt from the log.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { streamToBuffer, writeSafetensors, type Tensor } from '../../src/formats/index.ts';
import { buildTestApp, rng } from '../helper.ts';
import { hexOf, runPython, skipWithoutTorch } from '../support/torch.ts';

const SHAPES = { w: [4, 9], b: [5] } as const;
type Name = keyof typeof SHAPES;
const numel = (name: Name) => SHAPES[name].reduce((a, b) => a * b, 1);

/** Random finite 16-bit floats of every kind (subnormals, zeros, large) for a dtype. */
function randomBits(dtype: 'float16' | 'bfloat16', n: number, next: () => number): Uint16Array {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    for (;;) {
      const bits = Math.floor(next() * 65536) & 0xffff;
      const exponent = dtype === 'float16' ? (bits >> 10) & 0x1f : (bits >> 7) & 0xff;
      if (exponent === (dtype === 'float16' ? 0x1f : 0xff)) continue; // inf/NaN: the service refuses those
      // keep bfloat16 gradients within a sane range, so the parameters stay finite
      if (dtype === 'bfloat16' && exponent > 130) continue;
      out[i] = bits;
      break;
    }
  }
  return out;
}

// Each step: the dtype of every gradient (float32 ones are random float32 values).
const STEPS: Array<Partial<Record<Name, 'float16' | 'bfloat16' | 'float32'>>> = [
  { w: 'float16', b: 'float16' },
  { w: 'bfloat16', b: 'bfloat16' },
  { w: 'float16' }, // b has no gradient this step
  { w: 'bfloat16', b: 'float32' }, // a mix: logged as float32
  { w: 'float16', b: 'float16' },
];

test('F16 and BF16 gradients: the step is PyTorch\'s for the widened gradient, logged at half the bytes, replayed exactly', { skip: skipWithoutTorch() }, async (t) => {
  const { app } = await buildTestApp(t);
  const next = rng(1216);
  const init = Object.fromEntries((Object.keys(SHAPES) as Name[]).map((n) => [n, Array.from({ length: numel(n) }, () => Math.fround(next() - 0.5))]));
  const hyper = { lr: 0.05, t0: 2, weight_decay: 0.01, lambd: 1e-3 };
  const created = await app.inject({
    method: 'POST', url: '/v1/sessions',
    payload: { name: 'half', params: (Object.keys(SHAPES) as Name[]).map((n) => ({ name: n, shape: SHAPES[n], data: init[n] })), hyperparameters: hyper, snapshot_every: 1000 },
  });
  assert.equal(created.statusCode, 201, created.body);

  const sent: Array<Record<string, { dtype: string; bits: number[] }>> = [];
  const paramsAt = new Map<number, string>();
  for (const step of STEPS) {
    const tensors: Array<[string, Tensor]> = [];
    const record: Record<string, { dtype: string; bits: number[] }> = {};
    for (const [name, dtype] of Object.entries(step) as Array<[Name, 'float16' | 'bfloat16' | 'float32']>) {
      const shape = [...SHAPES[name]];
      if (dtype === 'float32') {
        const data = Float32Array.from({ length: numel(name) }, () => Math.fround((next() - 0.5) * 0.1));
        tensors.push([name, { dtype, shape, data }]);
        record[name] = { dtype, bits: Array.from(new Uint32Array(data.buffer)) };
      } else {
        const data = randomBits(dtype, numel(name), next);
        tensors.push([name, { dtype, shape, data }]);
        record[name] = { dtype, bits: Array.from(data) };
      }
    }
    sent.push(record);
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/half/step', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors(tensors)) });
    assert.equal(res.statusCode, 200, res.body);
    const params = (await app.inject({ url: '/v1/sessions/half/params' })).json().params;
    paramsAt.set(res.json().version, JSON.stringify(Object.fromEntries(Object.entries(params).map(([n, p]) => [n, hexOf((p as { data: number[] }).data)]))));
  }

  // PyTorch: the same bits as half tensors, .float()'d, as the gradients of torch.optim.ASGD
  const torch = JSON.parse(runPython(`
import json, sys, struct
spec = json.loads(sys.stdin.read())
params = {n: torch.tensor(v, dtype=torch.float32).reshape(spec['shapes'][n]).requires_grad_() for n, v in spec['init'].items()}
opt = torch.optim.ASGD(list(params.values()), lr=spec['hyper']['lr'], t0=spec['hyper']['t0'], weight_decay=spec['hyper']['weight_decay'], lambd=spec['hyper']['lambd'])
def hexbits(t):
    return [format(x, '08x') for x in struct.unpack('<%dI' % t.numel(), t.detach().contiguous().numpy().astype('<f4').tobytes())]
out = []
for step in spec['steps']:
    for n, p in params.items():
        g = step.get(n)
        if g is None:
            p.grad = None
        elif g['dtype'] == 'float32':
            p.grad = torch.tensor([b - (1 << 32) if b >= (1 << 31) else b for b in g['bits']], dtype=torch.int32).view(torch.float32).reshape(p.shape)
        else:
            half = torch.tensor([b - 65536 if b >= 32768 else b for b in g['bits']], dtype=torch.int16).view(getattr(torch, g['dtype']))
            p.grad = half.float().reshape(p.shape)
    opt.step()
    out.append(json.dumps({n: hexbits(p) for n, p in params.items()}, separators=(',', ':')))
print(json.dumps(out))
`, [], JSON.stringify({ init, shapes: SHAPES, hyper, steps: sent }))) as string[];

  const versions = [...paramsAt.keys()];
  versions.forEach((version, k) => assert.equal(paramsAt.get(version), torch[k], `after step ${k + 1} (version ${version})`));

  // logged as received: two bytes an element and the dtype for one-dtype steps, float32 for the mix
  const logged = await app.db.query<{ version: number; grad_dtype: string | null; bytes: number }>(
    'SELECT version::float8 AS version, grad_dtype, octet_length(grads) AS bytes FROM step_log ORDER BY version',
  );
  assert.deepEqual(logged.map((r) => [r.grad_dtype, r.bytes]), [
    ['float16', 2 * (36 + 5)],
    ['bfloat16', 2 * (36 + 5)],
    ['float16', 2 * 36],
    [null, 4 * (36 + 5)],
    ['float16', 2 * (36 + 5)],
  ]);

  // rebuilt from the creation snapshot and the log (widened again): the same bits at every version
  app.sessions.dropCache();
  for (const [version, expected] of paramsAt) {
    const params = (await app.inject({ url: `/v1/sessions/half/params?version=${version}` })).json().params;
    assert.equal(JSON.stringify(Object.fromEntries(Object.entries(params).map(([n, p]) => [n, hexOf((p as { data: number[] }).data)]))), expected, `rebuilt at version ${version}`);
  }
});

test('a half gradient holding Inf or NaN is refused (422) and changes nothing; other dtypes are refused (400)', async (t) => {
  const { app } = await buildTestApp(t);
  await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'h', params: [{ name: 'w', shape: [3], data: [1, 2, 3] }] } });
  const send = (tensor: Tensor) => app.inject({ method: 'POST', url: '/v1/sessions/h/step', headers: { 'content-type': 'application/x-safetensors' }, payload: streamToBuffer(writeSafetensors([['w', tensor]])) });
  const inf = await send({ dtype: 'float16', shape: [3], data: Uint16Array.of(0x3c00, 0x7c00, 0) });
  assert.equal(inf.statusCode, 422, inf.body);
  assert.equal(inf.json().code, 'NON_FINITE_GRADIENT');
  assert.match(inf.json().message, /grads\.w/);
  const nan = await send({ dtype: 'bfloat16', shape: [3], data: Uint16Array.of(0x7fc0, 0, 0) });
  assert.equal(nan.statusCode, 422, nan.body);
  const wrong = await send({ dtype: 'int32', shape: [3], data: Int32Array.of(1, 2, 3) });
  assert.equal(wrong.statusCode, 400, wrong.body);
  assert.match(wrong.json().message, /grads\.w.*int32 is not supported; gradients are float32, float16 or bfloat16/);
  const session = (await app.inject({ url: '/v1/sessions/h' })).json();
  assert.equal(session.version, 1);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/h/params' })).json().params.w.data, [1, 2, 3]);
});
