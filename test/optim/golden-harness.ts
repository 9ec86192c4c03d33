// Replays the golden fixtures written by scripts/golden/generate.py (real PyTorch) through a kernel
// and compares float32 BIT PATTERNS: per-step hashes of every param and ax, the scalar state, and
// full tensors at checkpoint steps. Never tolerances.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { advanceScalarState, initialState } from '../../src/optim/asgd.ts';
import type { AsgdHyperparameters, AsgdKernel, AsgdScalarState, KernelOptions } from '../../src/optim/types.ts';

export interface GoldenGroup extends AsgdHyperparameters {
  params: number[];
}

export interface GoldenParam {
  size: number;
  firstGradStep: number;
  skipEvery: number;
  loadedState: AsgdScalarState | null;
}

export interface GoldenScenario {
  name: string;
  description: string;
  steps: number;
  file: string;
  sections: Record<string, { offset: number; bytes: number }>;
  groups: GoldenGroup[];
  params: GoldenParam[];
  checkpointSteps: number[];
  halfwayTraps: number;
}

export interface GoldenManifest {
  formatVersion: number;
  torch: string;
  cpuCapability: string;
  fma: boolean;
  seed: number;
  scenarios: GoldenScenario[];
  fmaCases?: { file: string; count: number; halfwayTraps: number };
  etaTable?: { file: string; count: number };
}

export const COMMITTED_GOLDEN_DIR = new URL('../fixtures/golden/', import.meta.url).pathname;

export function loadManifest(dir: string): GoldenManifest {
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as GoldenManifest;
  if (manifest.formatVersion !== 1) throw new Error(`unknown golden format ${manifest.formatVersion}`);
  return manifest;
}

/** A file's bytes in a fresh ArrayBuffer (so typed views are aligned). */
export function readBinary(dir: string, file: string): ArrayBuffer {
  const bytes = readFileSync(join(dir, file));
  const copy = new ArrayBuffer(bytes.length);
  new Uint8Array(copy).set(bytes);
  return copy;
}

/** The hashes of scripts/golden/generate.py tensor_hashes: two weighted sums mod 2^32 of the bit patterns. */
export function tensorHashes(values: Float32Array): [number, number] {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  let h1 = 0;
  let h2 = 0;
  for (let i = 0; i < u.length; i++) {
    const w1 = Math.imul(2 * i + 1, 0x9e3779b1) | 1;
    const w2 = (Math.imul(i, 0x85ebca77) ^ 0xc2b2ae3d) | 1;
    h1 = (h1 + Math.imul(u[i], w1)) >>> 0;
    h2 = (h2 + Math.imul(u[i] ^ (u[i] >>> 15), w2)) >>> 0;
  }
  return [h1, h2];
}

export function hasGradient(param: GoldenParam, step: number): boolean {
  if (step < param.firstGradStep) return false;
  return param.skipEvery === 0 || (step - param.firstGradStep) % param.skipEvery !== param.skipEvery - 1;
}

export interface ReplayOptions {
  kernel: AsgdKernel;
  kernelOptions?: KernelOptions;
  /** Place the tensors in one kernel arena (in-place path) instead of separate Float32Arrays. */
  arena?: boolean;
}

export interface ReplayResult {
  /** null when every step matched; else where and how the first difference showed. */
  mismatch: string | null;
  stepsCompared: number;
  checkpointsCompared: number;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function bits(x: number): number {
  f32[0] = x;
  return u32[0];
}

export function replayScenario(dir: string, scenario: GoldenScenario, options: ReplayOptions): ReplayResult {
  const buffer = readBinary(dir, scenario.file);
  const section = (name: string) => {
    const s = scenario.sections[name];
    return new Float32Array(buffer, s.offset, s.bytes / 4);
  };
  const initialParams = section('initialParams');
  const grads = section('grads');
  const trace = new Uint32Array(buffer, scenario.sections.trace.offset, scenario.sections.trace.bytes / 4);
  const checkpoints = section('checkpoints');
  const initialAx = scenario.sections.initialAx ? section('initialAx') : new Float32Array(0);

  const sizes = scenario.params.map((p) => p.size);
  const total = sizes.reduce((a, b) => a + b, 0);
  const arena = options.arena ? options.kernel.createArena(total) : null;
  const params: Float32Array[] = [];
  const axes: Float32Array[] = [];
  const gradBuffers: Float32Array[] = [];
  let offset = 0;
  for (const size of sizes) {
    params.push(arena ? arena.params.subarray(offset, offset + size) : new Float32Array(size));
    axes.push(arena ? arena.ax.subarray(offset, offset + size) : new Float32Array(size));
    gradBuffers.push(arena ? arena.grads.subarray(offset, offset + size) : new Float32Array(size));
    offset += size;
  }
  const states: Array<AsgdScalarState | null> = [];
  let initOffset = 0;
  let axOffset = 0;
  scenario.params.forEach((p, j) => {
    params[j].set(initialParams.subarray(initOffset, initOffset + p.size));
    initOffset += p.size;
    axes[j].fill(0);
    if (p.loadedState) {
      states.push({ ...p.loadedState });
      axes[j].set(initialAx.subarray(axOffset, axOffset + p.size));
      axOffset += p.size;
    } else states.push(null);
  });
  const groupOf = new Map<number, GoldenGroup>();
  for (const g of scenario.groups) for (const j of g.params) groupOf.set(j, g);

  let gradCursor = 0;
  let traceCursor = 0;
  let checkpointCursor = 0;
  let checkpointsCompared = 0;
  try {
    for (let step = 1; step <= scenario.steps; step++) {
      for (const group of scenario.groups) {
        for (const j of group.params) {
          const p = scenario.params[j];
          if (!hasGradient(p, step)) continue;
          gradBuffers[j].set(grads.subarray(gradCursor, gradCursor + p.size));
          gradCursor += p.size;
          let state = states[j];
          if (!state) {
            state = initialState(group.lr);
            states[j] = state;
            axes[j].fill(0);
          }
          options.kernel.step(params[j], gradBuffers[j], axes[j], state, group, options.kernelOptions);
        }
      }
      for (let j = 0; j < sizes.length; j++) {
        const expected = trace.subarray(traceCursor, traceCursor + 7);
        traceCursor += 7;
        const [p1, p2] = tensorHashes(params[j]);
        const [a1, a2] = tensorHashes(axes[j]);
        const state = states[j];
        const scalars = state ? [bits(state.step), bits(state.eta), bits(state.mu)] : [0, 0, 0];
        const where = `${scenario.name}: step ${step}, param ${j}`;
        if (p1 !== expected[0] || p2 !== expected[1]) return fail(`${where}: param differs${describeAtCheckpoint(step)}`);
        if (a1 !== expected[2] || a2 !== expected[3]) return fail(`${where}: ax differs${describeAtCheckpoint(step)}`);
        for (let s = 0; s < 3; s++) {
          if (scalars[s] !== expected[4 + s]) {
            return fail(`${where}: ${['step', 'eta', 'mu'][s]} bits 0x${scalars[s].toString(16)}, torch 0x${expected[4 + s].toString(16)}`);
          }
        }
      }
      if (scenario.checkpointSteps.includes(step)) {
        for (const tensors of [params, axes]) {
          for (let j = 0; j < sizes.length; j++) {
            const expected = new Uint32Array(checkpoints.buffer, checkpoints.byteOffset + checkpointCursor * 4, sizes[j]);
            const got = new Uint32Array(tensors[j].buffer, tensors[j].byteOffset, sizes[j]);
            checkpointCursor += sizes[j];
            for (let i = 0; i < sizes[j]; i++) {
              if (got[i] !== expected[i]) {
                return fail(`${scenario.name}: checkpoint step ${step}, ${tensors === params ? 'param' : 'ax'} ${j}[${i}] bits 0x${got[i].toString(16)}, torch 0x${expected[i].toString(16)}`);
              }
            }
          }
        }
        checkpointsCompared++;
      }
    }
    if (gradCursor !== grads.length) return fail(`${scenario.name}: replay consumed ${gradCursor} of ${grads.length} gradient values`);
    return { mismatch: null, stepsCompared: scenario.steps, checkpointsCompared };
  } finally {
    arena?.release();
  }

  function fail(message: string): ReplayResult {
    return { mismatch: message, stepsCompared: 0, checkpointsCompared };
  }
  function describeAtCheckpoint(step: number): string {
    return scenario.checkpointSteps.includes(step) ? ' (a checkpoint step)' : '';
  }
}

/** The first row where mulAdd(a, b, c) differs from torch.add(c, a, alpha=b) in the fma-cases file, or null. */
export function checkFmaCases(dir: string, manifest: GoldenManifest, mulAdd: (a: number, b: number, c: number) => number): string | null {
  const cases = manifest.fmaCases!;
  const rows = new Float32Array(readBinary(dir, cases.file));
  for (let r = 0; r < cases.count; r++) {
    const [a, b, c, torch] = rows.subarray(r * 4, r * 4 + 4);
    const got = mulAdd(a, b, c);
    if (bits(got) !== bits(torch)) {
      return `row ${r}: a=0x${bits(a).toString(16)} b=0x${bits(b).toString(16)} c=0x${bits(c).toString(16)}: 0x${bits(got).toString(16)}, torch 0x${bits(torch).toString(16)}`;
    }
  }
  return null;
}

/** The first row where advanceScalarState's eta or mu differs from asgd.py's in the eta table, or null. */
export function checkEtaTable(dir: string, manifest: GoldenManifest): string | null {
  const table = manifest.etaTable!;
  const buffer = readBinary(dir, table.file);
  const doubles = new Float64Array(buffer, 0, table.count * 4);
  const floats = new Float32Array(buffer, table.count * 32, table.count * 3);
  for (let r = 0; r < table.count; r++) {
    const [lr, lambd, alpha, t0] = doubles.subarray(r * 4, r * 4 + 4);
    const [step, eta, mu] = floats.subarray(r * 3, r * 3 + 3);
    const state = { step: step - 1, eta: 0, mu: 0 };
    advanceScalarState(state, { lr, lambd, alpha, t0, weightDecay: 0, maximize: false });
    if (state.step !== step || bits(state.eta) !== bits(eta) || bits(state.mu) !== bits(mu)) {
      return `row ${r}: lr=${lr} lambd=${lambd} alpha=${alpha} t0=${t0} step=${step}: eta ${state.eta} vs ${eta}, mu ${state.mu} vs ${mu}`;
    }
  }
  return null;
}
