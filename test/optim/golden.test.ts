// The kernels against committed fixtures written by real PyTorch (scripts/golden/generate.py).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { jsKernel } from '../../src/optim/asgd.ts';
import { wasmKernels } from './kernels.ts';
import { fmaf32 } from '../../src/optim/fma.ts';
import type { AsgdKernel } from '../../src/optim/types.ts';
import { COMMITTED_GOLDEN_DIR, checkEtaTable, loadManifest, readBinary, replayScenario } from './golden-harness.ts';
import { doubleRoundingKernel, unfusedKernel } from './variant-kernels.ts';
import { float32Bits, hex32 } from './exact.ts';

const dir = COMMITTED_GOLDEN_DIR;
const manifest = loadManifest(dir);

const kernels: Array<{ label: string; kernel: AsgdKernel; arena: boolean }> = [
  { label: 'js', kernel: jsKernel, arena: false },
  ...wasmKernels.flatMap((kernel) => [
    { label: `${kernel.name} (in place, arena views)`, kernel, arena: true },
    { label: `${kernel.name} (copied, plain arrays)`, kernel, arena: false },
  ]),
];

test('the committed fixtures come from a fused (SIMD) PyTorch and cover the required cases', () => {
  assert.equal(manifest.fma, true);
  const names = manifest.scenarios.map((s) => s.name);
  for (const name of ['defaults', 'weight-decay', 'maximize', 't0-3', 't0-50', 'hyper-sweep', 'two-groups', 'sparse-grads', 'step-stall', 'tiny-and-subnormal']) {
    assert.ok(names.includes(name), name);
  }
  const sizes = new Set(manifest.scenarios.flatMap((s) => s.params.map((p) => p.size)));
  for (const size of [1, 7, 16, 33, 1000]) assert.ok(sizes.has(size), `size ${size}`);
  assert.ok(manifest.scenarios.some((s) => s.steps >= 200));
  assert.ok(manifest.scenarios.reduce((n, s) => n + s.halfwayTraps, 0) > 100, 'halfway traps planted');
});

for (const { label, kernel, arena } of kernels) {
  for (const scenario of manifest.scenarios) {
    test(`${label} kernel matches PyTorch bit for bit: ${scenario.name} (${scenario.description})`, () => {
      const result = replayScenario(dir, scenario, { kernel, arena });
      assert.equal(result.mismatch, null);
      assert.equal(result.stepsCompared, scenario.steps);
      assert.equal(result.checkpointsCompared, scenario.checkpointSteps.length);
    });
  }
}

test('an unfused kernel (separate roundings) does not match any scenario', () => {
  for (const scenario of manifest.scenarios) {
    const result = replayScenario(dir, scenario, { kernel: unfusedKernel });
    assert.notEqual(result.mismatch, null, scenario.name);
  }
});

test('a kernel that rounds the double a*b+c without the halfway fix fails where traps were planted', () => {
  let withTraps = 0;
  for (const scenario of manifest.scenarios) {
    const result = replayScenario(dir, scenario, { kernel: doubleRoundingKernel });
    if (scenario.halfwayTraps > 0) {
      withTraps++;
      assert.notEqual(result.mismatch, null, scenario.name);
    }
  }
  assert.ok(withTraps >= 6);
});

test('fmaf32 equals torch.add(c, a, alpha=b) on adversarial and random triples', () => {
  const cases = manifest.fmaCases!;
  const rows = new Float32Array(readBinary(dir, cases.file));
  assert.equal(rows.length, cases.count * 4);
  let traps = 0;
  for (let r = 0; r < cases.count; r++) {
    const [a, b, c, torch] = rows.subarray(r * 4, r * 4 + 4);
    const got = fmaf32(a, b, c);
    assert.equal(float32Bits(got), float32Bits(torch), `row ${r}: ${hex32(a)} ${hex32(b)} ${hex32(c)}: ${hex32(got)} vs torch ${hex32(torch)}`);
    if (float32Bits(Math.fround(a * b + c)) !== float32Bits(torch)) traps++;
  }
  assert.equal(traps, cases.halfwayTraps);
  assert.ok(traps > 100, `${traps} halfway traps`);
});

test('eta and mu follow asgd.py for random hyperparameters and steps up to 2^24', () => {
  assert.equal(checkEtaTable(dir, manifest), null);
});
