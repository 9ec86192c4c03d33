// The wasm kernel against the JS reference (itself checked against PyTorch in golden.test.ts), its
// memory handling, and the freshness of the committed wasm artifact.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initialState, jsKernel } from '../../src/optim/asgd.ts';
import { selectKernel, wasmKernel as emulatingKernel } from '../../src/optim/index.ts';
import { wasmKernels } from './kernels.ts';
import { CHUNK_ELEMENTS } from '../../src/optim/wasm/index.ts';
import type { AsgdHyperparameters, AsgdScalarState, KernelOptions } from '../../src/optim/types.ts';
import { ASGD_DEFAULTS } from '../../src/optim/types.ts';
import { ARTIFACT_PATH, buildArtifact, readSources } from '../../scripts/build-wasm.ts';
import { COMMITTED_GOLDEN_DIR, loadManifest, readBinary } from './golden-harness.ts';
import { exactFmaf32, float32Bits, hex32 } from './exact.ts';
import { halfwayTriples } from './halfway.ts';
import { doubleRoundingKernel } from './variant-kernels.ts';
import { mulberry32, randomFloat32InBinades } from './random.ts';

test('the committed wasm artifact is what scripts/build-wasm.ts builds from asgd.wat and asgd-fma.wat', async () => {
  const fresh = await buildArtifact(readSources());
  assert.equal(readFileSync(ARTIFACT_PATH, 'utf8'), fresh, 'stale: run node scripts/build-wasm.ts');
});

test('selectKernel: wasm and js on request, an error for an unknown name', () => {
  assert.equal(selectKernel('wasm').kernel, emulatingKernel);
  assert.equal(selectKernel('js').kernel, jsKernel);
  assert.throws(() => selectKernel('gpu' as 'js'), /unknown ASGD kernel/);
});

/** Values of every kind: normal, tiny, subnormal, zeros of both signs, huge. */
function mixedArray(next: () => number, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const kind = next() % 10;
    if (kind === 0) out[i] = next() & 1 ? 0 : -0;
    else if (kind === 1) out[i] = (next() & 1 ? 1 : -1) * (next() % 0x7fffff) * 2 ** -149;
    else if (kind === 2) out[i] = randomFloat32InBinades(next, -126, -100);
    else if (kind === 3) out[i] = randomFloat32InBinades(next, 10, 30);
    else out[i] = randomFloat32InBinades(next, -12, 1);
  }
  return out;
}

function assertBitsEqual(got: Float32Array, expected: Float32Array, what: string) {
  const a = new Uint32Array(got.buffer, got.byteOffset, got.length);
  const b = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) assert.fail(`${what}[${i}]: wasm ${hex32(got[i])}, js ${hex32(expected[i])}`);
  }
}

const configurations: Array<{ label: string; hyper: AsgdHyperparameters; mu: number; options?: KernelOptions }> = [
  { label: 'defaults', hyper: { ...ASGD_DEFAULTS }, mu: 1 },
  { label: 'weight decay + averaging', hyper: { ...ASGD_DEFAULTS, weightDecay: 1e-2, t0: 1 }, mu: 0.25 },
  { label: 'maximize + weight decay', hyper: { ...ASGD_DEFAULTS, weightDecay: 3e-4, maximize: true }, mu: 1 },
  { label: 'maximize + averaging', hyper: { ...ASGD_DEFAULTS, maximize: true, lambd: 0.5 }, mu: Math.fround(1 / 3) },
  { label: 'unfused', hyper: { ...ASGD_DEFAULTS, weightDecay: 1e-2 }, mu: Math.fround(0.1), options: { fma: false } },
  { label: 'unfused defaults', hyper: { ...ASGD_DEFAULTS }, mu: 1, options: { fma: false } },
];

for (const wasmKernel of wasmKernels) {
  for (const { label, hyper, mu, options } of configurations) {
    test(`${wasmKernel.name}: wasm equals js on mixed data, every size 0..41 and 1000: ${label}`, () => {
      const next = mulberry32(label.length * 7919);
      for (const n of [...Array.from({ length: 42 }, (_, i) => i), 1000]) {
        const param = mixedArray(next, n);
        const grad = mixedArray(next, n);
        const ax = mixedArray(next, n);
        const eta = Math.fround(0.001 + (next() % 1000) * 1e-4);
        const jsState: AsgdScalarState = { step: 5, eta, mu };
        const wasmState: AsgdScalarState = { ...jsState };
        const expected = [param.slice(), ax.slice()];
        jsKernel.step(expected[0], grad, expected[1], jsState, hyper, options);
        const arena = wasmKernel.createArena(n);
        arena.params.set(param);
        arena.grads.set(grad);
        arena.ax.set(ax);
        wasmKernel.step(arena.params, arena.grads, arena.ax, wasmState, hyper, options);
        assertBitsEqual(arena.params, expected[0], `n=${n} param`);
        assertBitsEqual(arena.ax, expected[1], `n=${n} ax`);
        assert.deepEqual(wasmState, jsState);
        // and through copies, from arrays outside any wasm memory
        const copied = [param.slice(), ax.slice()];
        wasmKernel.step(copied[0], grad, copied[1], { step: 5, eta, mu }, hyper, options);
        assertBitsEqual(copied[0], expected[0], `n=${n} copied param`);
        assertBitsEqual(copied[1], expected[1], `n=${n} copied ax`);
        arena.release();
      }
    });
  }

  test(`${wasmKernel.name}: wasm equals torch.add(c, a, alpha=b) on the golden FMA cases, in the vector body and the tail`, () => {
    const manifest = loadManifest(COMMITTED_GOLDEN_DIR);
    const cases = manifest.fmaCases!;
    const rows = new Float32Array(readBinary(COMMITTED_GOLDEN_DIR, cases.file));
    const arena = wasmKernel.createArena(19);
    const hyper = { ...ASGD_DEFAULTS, lambd: 0 }; // decay factor exactly 1: the step is fma(grad, -eta, param)
    for (let r = 0; r < cases.count; r++) {
      const [a, b, c, torch] = rows.subarray(r * 4, r * 4 + 4);
      arena.params.fill(c);
      arena.grads.fill(a);
      wasmKernel.step(arena.params, arena.grads, arena.ax, { step: 0, eta: -b, mu: 1 }, hyper);
      for (let i = 0; i < 19; i++) {
        assert.equal(float32Bits(arena.params[i]), float32Bits(torch), `row ${r} lane ${i}: ${hex32(arena.params[i])} vs torch ${hex32(torch)}`);
      }
    }
  });

  test(`${wasmKernel.name}: arrays spanning several scratch chunks, some inside an arena and some not`, () => {
    const next = mulberry32(99);
    const n = 2 * CHUNK_ELEMENTS + 123;
    const hyper = { ...ASGD_DEFAULTS, weightDecay: 1e-3, t0: 0 };
    const param = mixedArray(next, n);
    const grad = mixedArray(next, n);
    const ax = mixedArray(next, n);
    const expected = [param.slice(), ax.slice()];
    jsKernel.step(expected[0], grad, expected[1], { step: 3, eta: 0.01, mu: 0.5 }, hyper);
    const arena = wasmKernel.createArena(n);
    arena.params.set(param);
    arena.ax.set(ax);
    wasmKernel.step(arena.params, grad, arena.ax, { step: 3, eta: 0.01, mu: 0.5 }, hyper); // grad from outside
    assertBitsEqual(arena.params, expected[0], 'param');
    assertBitsEqual(arena.ax, expected[1], 'ax');
    assert.deepEqual(grad, grad.slice(), 'grad is read-only');
  });

  test(`${wasmKernel.name}: an arena holds 5e7 elements per tensor (600 MB) and its views never detach`, () => {
    const n = 50_000_000;
    const arena = wasmKernel.createArena(n);
    const { params, grads, ax } = arena;
    assert.equal(params.length, n);
    assert.equal(params.buffer, grads.buffer);
    params[n - 1] = 1;
    grads[n - 1] = 2;
    const state = initialState(0.5);
    wasmKernel.step(params, grads, ax, state, { ...ASGD_DEFAULTS, lr: 0.5, lambd: 0 });
    assert.equal(params[n - 1], 0);
    assert.equal(ax[n - 1], 0);
    assert.equal(params.length, n, 'still attached');
    assert.equal(state.step, 1);
    arena.release();
    assert.throws(() => wasmKernel.createArena(400_000_000), RangeError);
  });

  test(`${wasmKernel.name}: an empty tensor still advances the scalar state, like PyTorch`, () => {
    const state = initialState(0.01);
    const empty = new Float32Array(0);
    wasmKernel.step(empty, empty, empty, state, { ...ASGD_DEFAULTS });
    assert.equal(state.step, 1);
    assert.throws(() => wasmKernel.step(new Float32Array(2), new Float32Array(3), new Float32Array(2), state, { ...ASGD_DEFAULTS }), RangeError);
  });

  test(`${wasmKernel.name}: halfway traps in every fast loop (update FMA without weight decay, weight-decay FMA with it)`, () => {
    const lanes = 16; // two fast iterations
    const arena = wasmKernel.createArena(lanes);
    let naiveWouldFail = 0;
    for (const maximize of [false, true]) {
      for (const averaging of [false, true]) {
        const mu = averaging ? Math.fround(0.3) : 1;
        // no weight decay: lambd = 0 makes the step exactly fma(g, -eta, param)
        for (const [a, b, c] of halfwayTriples(averaging ? 11 : 12, 150, false)) {
          arena.params.fill(c);
          arena.grads.fill(maximize ? -a : a);
          arena.ax.fill(0.5);
          wasmKernel.step(arena.params, arena.grads, arena.ax, { step: 1, eta: -b, mu }, { ...ASGD_DEFAULTS, lambd: 0, maximize });
          const expected = exactFmaf32(a, b, c);
          for (let i = 0; i < lanes; i++) assert.equal(float32Bits(arena.params[i]), float32Bits(expected), `lane ${i}: ${hex32(a)} ${hex32(b)} ${hex32(c)}`);
          if (float32Bits(Math.fround(a * b + c)) !== float32Bits(expected)) naiveWouldFail++;
        }
        // weight decay (1 - 2^-23) * 2^-7 with params ±(1 + 2^-23) * 2^e: grad.add(param, alpha=wd) is a trap
        const wd = Math.fround((1 - 2 ** -23) * 2 ** -7);
        const next = mulberry32(averaging ? 21 : 22);
        for (let round = 0; round < 50; round++) {
          const param = new Float32Array(lanes);
          const grad = new Float32Array(lanes);
          for (let i = 0; i < lanes; i++) {
            const e = -30 + (next() % 16);
            param[i] = (next() & 1 ? -1 : 1) * (1 + 2 ** -23) * 2 ** e;
            grad[i] = (next() & 1 ? -1 : 1) * (0x800001 + 2 * (next() % 0x3fffff)) * 2 ** (e - 6);
          }
          const hyper = { ...ASGD_DEFAULTS, weightDecay: wd, maximize };
          const expected = [param.slice(), new Float32Array(lanes).fill(0.25)];
          jsKernel.step(expected[0], grad, expected[1], { step: 1, eta: 0.01, mu }, hyper);
          arena.params.set(param);
          arena.grads.set(grad);
          arena.ax.fill(0.25);
          wasmKernel.step(arena.params, arena.grads, arena.ax, { step: 1, eta: 0.01, mu }, hyper);
          assertBitsEqual(arena.params, expected[0], 'param');
          assertBitsEqual(arena.ax, expected[1], 'ax');
          const naive = [param.slice(), new Float32Array(lanes).fill(0.25)];
          doubleRoundingKernel.step(naive[0], grad, naive[1], { step: 1, eta: 0.01, mu }, hyper);
          if (naive[0].some((x, i) => float32Bits(x) !== float32Bits(expected[0][i]))) naiveWouldFail++;
        }
      }
    }
    assert.ok(naiveWouldFail > 400, `only ${naiveWouldFail} traps`);
  });
}
