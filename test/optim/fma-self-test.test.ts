// The start-up self-test of the hardware-FMA kernel: it accepts exact kernels and refuses inexact ones,
// among them the same relaxed-SIMD kernel with its relaxed_madd replaced by a separate multiply and add
// (what V8 emits on a CPU without FMA), and forcing such a kernel refuses to start.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { jsKernel } from '../../src/optim/asgd.ts';
import { fmaSelfTest, KernelUnavailableError, selectKernel, wasmFmaKernel, wasmKernel } from '../../src/optim/index.ts';
import { createWasmKernel } from '../../src/optim/wasm/index.ts';
import { TORCH_FMA_CASES_BASE64 } from '../../src/optim/fma-torch-cases.ts';
import { compileWat, FMA_WAT_PATH } from '../../scripts/build-wasm.ts';
import { CASES_PATH, EMBEDDED_PATH, renderEmbedded } from '../../scripts/golden/embed-fma-cases.ts';
import { doubleRoundingKernel, unfusedKernel } from './variant-kernels.ts';

/** asgd-fma.wat with every relaxed_madd computed as a multiply and an add, each rounded. */
async function unfusedRelaxedKernel() {
  const wat = readFileSync(FMA_WAT_PATH, 'utf8');
  assert.ok(wat.includes('(f32x4.relaxed_madd '));
  const unfused = wat
    .replaceAll('(f32x4.relaxed_madd ', '(call $madd_unfused ')
    .replace('(import "env" "memory" (memory 1))', '(import "env" "memory" (memory 1))\n  (func $madd_unfused (param v128 v128 v128) (result v128) (f32x4.add (f32x4.mul (local.get 0) (local.get 1)) (local.get 2)))');
  const binary = await compileWat(unfused, 'unfused.wat');
  return createWasmKernel('wasm-fma-unfused', new WebAssembly.Module(new Uint8Array(binary)), wasmKernel);
}

test('Node 24 runs relaxed SIMD without flags, and on this FMA CPU relaxed_madd fuses: wasm-fma passes its self-test', { skip: !/\bfma\b/.test(readFileSync('/proc/cpuinfo', 'utf8')) && 'this CPU has no FMA' }, () => {
  const result = fmaSelfTest(wasmFmaKernel());
  assert.deepEqual(result, { ok: true, checked: result.checked });
  assert.ok(result.checked > 450);
  const selected = selectKernel('auto');
  assert.equal(selected.kernel.name, 'wasm-fma');
  assert.match(selected.reason, /self-test passed/);
  assert.equal(selectKernel('wasm-fma').kernel.name, 'wasm-fma');
});

test('the exact kernels pass the self-test', () => {
  assert.equal(fmaSelfTest(wasmKernel).ok, true);
  assert.equal(fmaSelfTest(jsKernel, wasmKernel).ok, true);
});

test('the relaxed-SIMD kernel with an unfused multiply-add fails the self-test, naming the case', async () => {
  const result = fmaSelfTest(await unfusedRelaxedKernel());
  assert.equal(result.ok, false);
  assert.match(!result.ok ? result.failure : '', /PyTorch fma row \d+: fma\(0x[0-9a-f]{8}, 0x[0-9a-f]{8}, 0x[0-9a-f]{8}\) gave 0x[0-9a-f]{8}, PyTorch 0x[0-9a-f]{8}/);
});

test('kernels that round twice fail the self-test (the JS variants, and the emulating kernel in its unfused mode)', () => {
  for (const kernel of [unfusedKernel, doubleRoundingKernel]) assert.equal(fmaSelfTest(kernel).ok, false, kernel.name);
  const unfusedMode = { ...wasmKernel, step: (...args: Parameters<typeof wasmKernel.step>) => wasmKernel.step(args[0], args[1], args[2], args[3], args[4], { fma: false }) };
  assert.equal(fmaSelfTest(unfusedMode).ok, false);
});

test('a failing self-test: auto falls back to the emulation and says why; a forced wasm-fma refuses to start', async () => {
  const bad = await unfusedRelaxedKernel();
  const auto = selectKernel('auto', () => bad);
  assert.equal(auto.kernel, wasmKernel);
  assert.match(auto.reason, /exact FMA emulation; the hardware-FMA kernel is not used: its self-test failed: f32x4.relaxed_madd does not fuse/);
  assert.throws(() => selectKernel('wasm-fma', () => bad), (err: Error) => {
    assert.ok(err instanceof KernelUnavailableError);
    assert.match(err.message, /^ASGD_KERNEL=wasm-fma cannot run on this machine: its self-test failed: .* Use ASGD_KERNEL=wasm/);
    return true;
  });
  const missing = selectKernel('auto', () => {
    throw new WebAssembly.CompileError('relaxed simd unsupported');
  });
  assert.match(missing.reason, /relaxed SIMD is unavailable in this engine \(relaxed simd unsupported\)/);
});

test('the embedded PyTorch fma cases are the golden fixture file, unchanged', () => {
  assert.equal(readFileSync(EMBEDDED_PATH, 'utf8'), renderEmbedded(readFileSync(CASES_PATH)), 'stale: run node scripts/golden/embed-fma-cases.ts');
  assert.equal(Buffer.from(TORCH_FMA_CASES_BASE64, 'base64').byteLength, 450 * 16);
});
