// F16 and BF16 gradients: the client rounds float32 gradients to nearest even, the service widens them
// exactly, and the steps equal torch.optim.ASGD on the rounded gradients bit for bit. Runs where the
// service takes half-precision gradients (issue 12's src/sessions/gradients.ts).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { decodeSafetensors, encodeSafetensors } from '../src/index.ts';
import { hexOf, liveService, rng, runTorchReference, skipWithoutTorch, uniqueName } from './service.ts';

const gradientsSource = readFileSync(new URL('../../../src/sessions/gradients.ts', import.meta.url), 'utf8');
const halfSupported = /float16/.test(gradientsSource);

test('F16 and BF16 gradients step the session as torch does with the rounded gradients', {
  skip: !halfSupported ? 'this service does not take half-precision gradients yet (issue 12)' : skipWithoutTorch(),
}, async (t) => {
  const { client } = await liveService(t);
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

test('a finite gradient that overflows float16 is refused by the client, naming the element; infinities and NaN go as they are', () => {
  assert.throws(() => encodeSafetensors({ b: { shape: [2], data: [1, 1e6] } }, {}, 'F16'), /^RangeError: b: element 1 \(1000000\) overflows float16 \(largest finite 65504\); send it as F32$/);
  assert.doesNotThrow(() => encodeSafetensors({ b: { shape: [2], data: [65504, -65504] } }, {}, 'F16'));
  assert.doesNotThrow(() => encodeSafetensors({ b: { shape: [2], data: [1e6, 3e38] } }, {}, 'BF16'));
  assert.throws(() => encodeSafetensors({ b: { shape: [1], data: [3.4e38] } }, {}, 'BF16'), /overflows bfloat16/);
  // Not finite to begin with: the service refuses it, naming it (NON_FINITE_GRADIENT).
  assert.doesNotThrow(() => encodeSafetensors({ b: { shape: [2], data: [Infinity, NaN] } }, {}, 'F16'));
});
