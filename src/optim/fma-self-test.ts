// The start-up proof that a kernel computes PyTorch's step bit for bit on THIS machine: run before the
// hardware-FMA kernel (relaxed SIMD, whose rounding the engine and CPU choose) may serve a step.
//
// It compares whole kernel steps, bit for bit, against:
//  - real PyTorch outputs embedded from the golden fixtures: 450 fma rows, 300 of them halfway traps
//    (150 with normal, 150 with subnormal results) where a multiply and an add rounded separately, or
//    a double rounded to float32, is wrong; each row sits at a different place in vectors of 1 to 19
//    elements, so the kernel's vector loop and its tail both meet them;
//  - the exact emulating JS kernel (itself proven against PyTorch by the golden tests) on the same
//    vectors, and on random tensors (tiny and subnormal values included) in every configuration
//    (weight decay, averaging, maximize).
// The first difference fails the test with the inputs that show it.
import { initialState, jsKernel } from './asgd.ts';
import { mulberry32 } from './fma-cases.ts';
import { TORCH_FMA_CASES_BASE64 } from './fma-torch-cases.ts';
import type { AsgdHyperparameters, AsgdKernel, AsgdScalarState } from './types.ts';

export type SelfTestResult = { ok: true; checked: number } | { ok: false; checked: number; failure: string };

const bitsOf = (x: number) => {
  const f = new Float32Array([x]);
  return new Uint32Array(f.buffer)[0];
};
const hex = (x: number) => `0x${bitsOf(x).toString(16).padStart(8, '0')}`;

/** The fixtures' rows as [a, b, c, torch] float32 values. */
function torchRows(): Array<[number, number, number, number]> {
  const bytes = Buffer.from(TORCH_FMA_CASES_BASE64, 'base64');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const rows: Array<[number, number, number, number]> = [];
  for (let o = 0; o + 16 <= bytes.byteLength; o += 16) {
    rows.push([view.getFloat32(o, true), view.getFloat32(o + 4, true), view.getFloat32(o + 8, true), view.getFloat32(o + 12, true)]);
  }
  return rows;
}

const PLAIN: AsgdHyperparameters = { lr: 0.01, lambd: 0, alpha: 0.75, t0: 1e6, weightDecay: 0, maximize: false };

interface Case {
  label: string;
  param: Float32Array;
  grad: Float32Array;
  ax: Float32Array;
  state: AsgdScalarState;
  hyper: AsgdHyperparameters;
  /** index and PyTorch's value for that param element, when known */
  torch?: { index: number; value: number };
}

/**
 * One step with the fma under test at `index` of a vector of `length` (the rest filler): with lambd = 0
 * the decay factor is 1, and with eta = -b the step computes param' = fma(grad, b, param), exactly
 * torch.add(c, a, alpha=b) for grad = a, param = c.
 */
function fmaCase(label: string, [a, b, c]: readonly number[], length: number, index: number, next: () => number): Case {
  const param = new Float32Array(length);
  const grad = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    param[i] = c * (1 + (next() % 1024) / 4096);
    grad[i] = a * (1 - (next() % 1024) / 4096);
  }
  param[index] = c;
  grad[index] = a;
  return { label, param, grad, ax: new Float32Array(length), state: { step: 0, eta: -b, mu: 1 }, hyper: PLAIN };
}

function randomFloat(next: () => number): number {
  const exponent = (next() % 60) - 40 + (next() % 8 === 0 ? -95 : 0); // some tiny and subnormal values
  return Math.fround((next() & 1 ? -1 : 1) * (1 + (next() & 0x7fffff) / 0x800000) * 2 ** exponent);
}

function* cases(): Generator<Case> {
  const next = mulberry32(0x5eed);
  const rows = torchRows();
  for (let r = 0; r < rows.length; r++) {
    const [a, b, c, torch] = rows[r];
    const length = 1 + (r % 19); // 1..19: tail only, loop + tail, whole loops
    const index = r % length;
    yield { ...fmaCase(`PyTorch fma row ${r}`, [a, b, c], length, index, next), torch: { index, value: torch } };
  }
  // every configuration, random tensors: 1003 = 125 loops of 8 and a tail of 3
  for (let config = 0; config < 8; config++) {
    for (const length of [1003, 16]) {
      const param = new Float32Array(length);
      const grad = new Float32Array(length);
      const ax = new Float32Array(length);
      for (let i = 0; i < length; i++) {
        param[i] = randomFloat(next);
        grad[i] = randomFloat(next);
        ax[i] = randomFloat(next);
      }
      const hyper: AsgdHyperparameters = { lr: 0.05, lambd: 1e-4, alpha: 0.75, t0: 1e6, weightDecay: config & 1 ? 0.01 : 0, maximize: (config & 4) !== 0 };
      const state = initialState(hyper.lr);
      if (config & 2) state.mu = Math.fround(1 / 3); // averaging
      yield { label: `random tensors, weight decay ${hyper.weightDecay}, averaging ${(config & 2) !== 0}, maximize ${hyper.maximize}, length ${length}`, param, grad, ax, state, hyper };
    }
  }
}

/** Runs every case through `kernel` and `reference` (default: the exact JS kernel); the first difference fails. */
export function fmaSelfTest(kernel: AsgdKernel, reference: AsgdKernel = jsKernel): SelfTestResult {
  let checked = 0;
  try {
    for (const c of cases()) {
      const got = { param: c.param.slice(), ax: c.ax.slice(), state: { ...c.state } };
      const want = { param: c.param.slice(), ax: c.ax.slice(), state: { ...c.state } };
      kernel.step(got.param, c.grad, got.ax, got.state, c.hyper, { fma: true });
      reference.step(want.param, c.grad, want.ax, want.state, c.hyper, { fma: true });
      checked++;
      if (c.torch && bitsOf(got.param[c.torch.index]) !== bitsOf(c.torch.value)) {
        const i = c.torch.index;
        return fail(checked, `${c.label}: fma(${hex(c.grad[i])}, ${hex(-c.state.eta)}, ${hex(c.param[i])}) gave ${hex(got.param[i])}, PyTorch ${hex(c.torch.value)}`);
      }
      for (const [name, g, w] of [['param', got.param, want.param], ['ax', got.ax, want.ax]] as const) {
        for (let i = 0; i < g.length; i++) {
          if (bitsOf(g[i]) !== bitsOf(w[i])) return fail(checked, `${c.label}: ${name}[${i}] = ${hex(g[i])}, expected ${hex(w[i])}`);
        }
      }
    }
  } catch (err) {
    return fail(checked, `the kernel threw: ${(err as Error).message}`);
  }
  return { ok: true, checked };
}

const fail = (checked: number, failure: string): SelfTestResult => ({ ok: false, checked, failure });
