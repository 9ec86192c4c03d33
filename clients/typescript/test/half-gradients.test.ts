// F16 and BF16 gradients: the client rounds float32 gradients to nearest even, the service widens them
// exactly, and the steps equal torch.optim.ASGD on the rounded gradients bit for bit. Runs where the
// service takes half-precision gradients (issue 12's src/sessions/gradients.ts).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { ASGDClient, decodeSafetensors, encodeSafetensors } from '../src/index.ts';
import { hexOf, liveService, rng, runTorchReference, skipWithoutTorch, uniqueName } from './service.ts';

const gradientsSource = readFileSync(new URL('../../../src/sessions/gradients.ts', import.meta.url), 'utf8');
const halfSupported = /float16/.test(gradientsSource);

test('F16 and BF16 gradients step the session as torch does with the rounded gradients', {
  skip: !halfSupported ? 'this service does not take half-precision gradients yet (issue 12)' : skipWithoutTorch(),
}, async () => {
  const { client } = await liveService();
  const random = rng(21);
  const init = Array.from({ length: 12 }, () => random());
  for (const dtype of ['F16', 'BF16'] as const) {
    const name = uniqueName(`half-${dtype}`);
    await client.createSession({ name, params: [{ name: 'w', shape: [3, 4], data: init }], hyperparameters: { lr: 0.1, t0: 1 } });
    const rounded: number[][] = [];
    for (let i = 0; i < 5; i++) {
      const g = Float32Array.from({ length: 12 }, () => random() * 3);
      await client.step(name, { w: g }, { dtype });
      // What went over the wire, widened back: the gradient the service applied.
      rounded.push(Array.from(decodeSafetensors(encodeSafetensors({ w: { shape: [12], data: g } }, {}, dtype)).tensors.get('w')!.data));
    }
    const torch = runTorchReference({ params: [{ name: 'w', shape: [3, 4], data: init }], defaults: { lr: 0.1, t0: 1 }, steps: rounded.map((w) => ({ w })) });
    assert.deepEqual(hexOf((await client.params(name)).params.w.data), torch.params.w, dtype);
  }
});

test('a step with a finite gradient that overflows float16/bfloat16 is refused by the client before any request, naming the element; the encoder rounds as torch does', async () => {
  const client = new ASGDClient('http://127.0.0.1:9', { logger: null });
  await assert.rejects(client.step('s', { w: { shape: [1], data: [1] }, b: { shape: [2], data: [1, 1e6] } }, { dtype: 'F16' }),
    /^RangeError: grads\.b: element 1 \(1000000\) overflows float16 \(largest finite 65504\); send it as F32$/);
  await assert.rejects(client.step('s', { b: { shape: [1], data: [3.4e38] } }, { dtype: 'BF16' }), /overflows bfloat16/);
  // A dtype plain JavaScript passes that is none of them is named, not sent (the service's error spoke of bytes).
  await assert.rejects(client.step('s', { b: { shape: [1], data: [1] } }, { dtype: 'F64' as 'F32' }), /^RangeError: dtype: "F64" is not a gradient dtype \(F32, F16 or BF16\)$/);
  // The encoder itself is torch's .half(): 1e6 becomes +Infinity there, as in torch.
  const widened = decodeSafetensors(encodeSafetensors({ b: { shape: [2], data: [65504, 1e6] } }, {}, 'F16')).tensors.get('b')!.data;
  assert.deepEqual(Array.from(widened), [65504, Infinity]);
});
