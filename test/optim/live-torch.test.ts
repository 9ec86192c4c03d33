// Live: run the golden generator with real PyTorch for a fresh seed and replay its output through
// both kernels, bit for bit. Fused (this machine's SIMD PyTorch) and unfused (the same PyTorch with
// ATEN_CPU_CAPABILITY=default). If TORCH2_PYTHON names an interpreter with PyTorch 2.x, it is checked
// too (measured once: 2.13.0+cpu from /opt/wheels, installed with --no-deps into a venv whose missing
// typing_extensions/sympy pieces had to be shimmed, agrees bit for bit and even writes byte-identical
// fixtures). Skips only when /usr/bin/python3 cannot import torch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomInt } from 'node:crypto';
import { jsKernel } from '../../src/optim/asgd.ts';
import { fmaf32, mulAddUnfusedf32 } from '../../src/optim/fma.ts';
import { wasmKernel } from '../../src/optim/wasm/index.ts';
import { wasmKernels } from './kernels.ts';
import { checkEtaTable, checkFmaCases, loadManifest, replayScenario, type GoldenManifest } from './golden-harness.ts';

const PYTHON = '/usr/bin/python3';
const GENERATOR = new URL('../../scripts/golden/generate.py', import.meta.url).pathname;

function torchVersion(python: string): string | null {
  const probe = spawnSync(python, ['-c', 'import torch; print(torch.__version__)'], { encoding: 'utf8' });
  return probe.status === 0 ? probe.stdout.trim() : null;
}

const torch = torchVersion(PYTHON);
const skip = torch ? false : `${PYTHON} cannot import torch: live PyTorch comparison skipped`;

function generate(python: string, env: NodeJS.ProcessEnv = {}): { dir: string; seed: number; manifest: GoldenManifest } {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-golden-'));
  const seed = randomInt(1, 2 ** 31);
  const run = spawnSync(python, [GENERATOR, '--out', dir, '--seed', String(seed), '--quick'], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
  });
  assert.equal(run.status, 0, `generator failed (seed ${seed}): ${run.stderr}`);
  return { dir, seed, manifest: loadManifest(dir) };
}

function replayAll(dir: string, manifest: GoldenManifest, fma: boolean, seed: number) {
  for (const [kernel, arena] of [[jsKernel, false], ...wasmKernels.flatMap((k) => [[k, true], [k, false]] as const)] as const) {
    for (const scenario of manifest.scenarios) {
      const result = replayScenario(dir, scenario, { kernel, arena, kernelOptions: { fma } });
      assert.equal(result.mismatch, null, `${kernel.name}${arena ? ' (arena)' : ''}, seed ${seed}`);
    }
  }
}

test(`PyTorch ${torch ?? ''} (SIMD, fused): a fresh seed replays bit for bit through js and wasm`, { skip }, () => {
  const { dir, seed, manifest } = generate(PYTHON);
  try {
    assert.equal(manifest.fma, true, `expected a SIMD PyTorch, got capability ${manifest.cpuCapability}`);
    replayAll(dir, manifest, true, seed);
    assert.equal(checkFmaCases(dir, manifest, fmaf32), null, `seed ${seed}`);
    assert.equal(checkEtaTable(dir, manifest), null, `seed ${seed}`);
    // the fixture could fail: the unfused mode does not match it
    assert.ok(manifest.scenarios.some((s) => replayScenario(dir, s, { kernel: wasmKernel, kernelOptions: { fma: false } }).mismatch));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PyTorch with ATEN_CPU_CAPABILITY=default (unfused): the fma: false mode replays bit for bit', { skip }, () => {
  const { dir, seed, manifest } = generate(PYTHON, { ATEN_CPU_CAPABILITY: 'default' });
  try {
    assert.equal(manifest.fma, false, `capability ${manifest.cpuCapability}`);
    replayAll(dir, manifest, false, seed);
    assert.equal(checkFmaCases(dir, manifest, mulAddUnfusedf32), null, `seed ${seed}`);
    // and the fused mode of every kernel does not match an unfused PyTorch
    for (const kernel of wasmKernels) assert.ok(manifest.scenarios.some((s) => replayScenario(dir, s, { kernel }).mismatch), kernel.name);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

const torch2 = process.env.TORCH2_PYTHON;
const torch2Version = torch2 ? torchVersion(torch2) : null;
test(`PyTorch 2.x from TORCH2_PYTHON (${torch2Version ?? 'not set'}): a fresh seed replays bit for bit`, {
  skip: torch2Version ? false : 'set TORCH2_PYTHON to an interpreter with PyTorch 2.x to run this (optional)',
}, () => {
  const { dir, seed, manifest } = generate(torch2!);
  try {
    replayAll(dir, manifest, manifest.fma, seed);
    assert.equal(checkFmaCases(dir, manifest, manifest.fma ? fmaf32 : mulAddUnfusedf32), null, `seed ${seed}`);
    assert.equal(checkEtaTable(dir, manifest), null, `seed ${seed}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the committed fixtures are exactly what the generator writes for their seed', { skip }, () => {
  const committed = loadManifest(new URL('../fixtures/golden/', import.meta.url).pathname);
  const dir = mkdtempSync(join(tmpdir(), 'asgd-golden-'));
  try {
    const run = spawnSync(PYTHON, [GENERATOR, '--out', dir, '--seed', String(committed.seed)], { encoding: 'utf8' });
    assert.equal(run.status, 0, run.stderr);
    const files = [...committed.scenarios.map((s) => s.file), committed.fmaCases!.file, committed.etaTable!.file];
    for (const file of files) {
      const fresh = readFileSync(join(dir, file));
      const old = readFileSync(new URL(`../fixtures/golden/${file}`, import.meta.url));
      assert.ok(fresh.equals(old), `${file} differs from a fresh run: regenerate with /usr/bin/python3 scripts/golden/generate.py`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
