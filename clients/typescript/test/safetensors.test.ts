// safetensors encoding and decoding, and F16/BF16 rounding checked bit for bit against torch's .half()
// and .bfloat16() (round to nearest, ties to even) on values chosen to hit every case.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import test from 'node:test';
import { decodeSafetensors, encodeSafetensors, float32ToBfloat16Bits, float32ToFloat16Bits } from '../src/index.ts';
import { rng, skipWithoutTorch, TORCH_PYTHON } from './service.ts';

function values(): Float32Array {
  const signed = rng(7); // uniform in [-0.5, 0.5)
  const random = () => signed() + 0.5;
  const out: number[] = [0, -0, 1, -1, 65504, 65519.99, 65520, -65536, 1e-8, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -14, 2 ** -15 * 1.5, 1e30, -1e-40, Infinity, -Infinity, 3.4e38];
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  for (let i = 0; i < 4000; i++) {
    u[0] = Math.floor(random() * 2 ** 32);
    if (Number.isFinite(f[0])) out.push(f[0]);
  }
  // Exact halfway cases of both formats: a kept bit pattern plus half of the dropped part.
  for (let i = 0; i < 500; i++) {
    u[0] = (Math.floor(random() * 2 ** 19) << 13) | 0x1000;
    if (Number.isFinite(f[0])) out.push(f[0]);
    u[0] = (Math.floor(random() * 2 ** 16) << 16) | 0x8000;
    if (Number.isFinite(f[0])) out.push(f[0]);
  }
  for (let i = 0; i < 500; i++) out.push((random() - 0.5) * 2 ** Math.floor(random() * 40 - 30));
  return Float32Array.from(out);
}

test('F16 and BF16 encoding equal torch .half() and .bfloat16() bit for bit', { skip: skipWithoutTorch() }, () => {
  const data = values();
  const script = `import json, sys, torch
v = torch.tensor(json.load(sys.stdin), dtype=torch.float32)
print(json.dumps({"f16": v.half().view(torch.int16).tolist(), "bf16": v.bfloat16().view(torch.int16).tolist()}))`;
  const r = spawnSync(TORCH_PYTHON, ['-c', script], { input: JSON.stringify(Array.from(data, (x) => (Object.is(x, -0) ? '-0.0' : Number.isFinite(x) ? x : String(x)))).replace(/"(-?Infinity|-0\.0)"/g, '$1'), encoding: 'utf8', maxBuffer: 1 << 28 });
  assert.equal(r.status, 0, r.stderr);
  const torch = JSON.parse(r.stdout) as { f16: number[]; bf16: number[] };
  let f16Mismatch = 0;
  let bf16Mismatch = 0;
  data.forEach((x, i) => {
    if (float32ToFloat16Bits(x) !== (torch.f16[i] & 0xffff)) f16Mismatch++;
    if (float32ToBfloat16Bits(x) !== (torch.bf16[i] & 0xffff)) bf16Mismatch++;
  });
  assert.equal(f16Mismatch, 0, `F16 differs from torch on ${f16Mismatch} of ${data.length} values`);
  assert.equal(bf16Mismatch, 0, `BF16 differs from torch on ${bf16Mismatch} of ${data.length} values`);
  // And the encoded file reads back to the rounded values.
  const file = decodeSafetensors(encodeSafetensors({ x: { shape: [data.length], data } }, {}, 'F16'));
  assert.equal(file.tensors.get('x')!.dtype, 'F16');
  const back = file.tensors.get('x')!.data;
  for (let i = 0; i < data.length; i++) assert.equal(float32ToFloat16Bits(back[i]), float32ToFloat16Bits(data[i]), `value ${i}`);
});

test('a safetensors file round-trips float32 tensors and metadata, header aligned to 8 bytes', () => {
  const a = { shape: [2, 3], data: Float32Array.from([1, -2.5, NaN, Infinity, 1e-45, 3.4028234663852886e38]) };
  const b = { shape: [], data: Float32Array.from([7]) };
  const bytes = encodeSafetensors({ a, b }, { session: 's', version: '3' });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(n % 8, 0);
  const file = decodeSafetensors(bytes);
  assert.deepEqual(file.metadata, { session: 's', version: '3' });
  assert.deepEqual(file.tensors.get('a')!.shape, [2, 3]);
  assert.deepEqual(new Uint8Array(file.tensors.get('a')!.data.buffer), new Uint8Array(a.data.buffer));
  assert.deepEqual([...file.tensors.get('b')!.data], [7]);
  assert.throws(() => encodeSafetensors({ a: { shape: [4], data: new Float32Array(3) } }), /does not hold 3 values/);
  assert.throws(() => decodeSafetensors(bytes.subarray(0, 30)), RangeError);
});
