// torch.optim.ASGD, one step of _single_tensor_asgd (torch/optim/asgd.py), bit for bit, on float32.
//
// Reference (PyTorch 1.13 asgd.py; 2.x is the same arithmetic on this path):
//   grad = grad if not maximize else -grad
//   step_t += 1                                    # float32 0-dim tensor: stalls at 2**24
//   if weight_decay != 0: grad = grad.add(param, alpha=weight_decay)
//   param.mul_(1 - lambd * eta.item())             # Python double, rounded once to float32
//   param.add_(grad, alpha=-eta.item())            # vec::fmadd: one rounding on SIMD builds
//   if mu.item() != 1: ax.add_(param.sub(ax).mul(mu))
//   else: ax.copy_(param)
//   eta.copy_(torch.tensor(lr / math.pow((1 + lambd * lr * step), alpha)))
//   mu.copy_(torch.tensor(1 / max(1, step - t0)))
// Every float32 operation here is computed in double and rounded with Math.fround: for one +, -, *
// of float32 values this equals the float32 operation (the double result has >= 2*24+2 bits).

import { fmaf32 } from './fma.ts';
import { pow } from './pow.ts';
import type { AsgdHyperparameters, AsgdKernel, AsgdScalarState, KernelArena, KernelOptions } from './types.ts';

const fround = Math.fround;

/** The state ASGD creates at a parameter's first step with a gradient (ASGD.step, "State initialization"). */
export function initialState(lr: number): AsgdScalarState {
  return { step: 0, eta: fround(lr), mu: 1 };
}

/** `1 - lambd * eta.item()` as the float32 scalar that param.mul_ multiplies by. */
export function decayFactor(eta: number, lambd: number): number {
  return fround(1 - lambd * eta);
}

/**
 * The scalar part of one step, run after the tensors were updated with the old eta and mu:
 * step_t += 1 in float32, then eta and mu from the new step, each computed in double and stored as
 * float32. Python's max(1, x) keeps 1 unless x > 1 (so also for NaN).
 * The power is glibc's pow, as Python's `**` computes it (pow.ts): V8's Math.pow differs from it in a
 * double's last bit for some inputs (alpha 0.5: about 1 base in 3,000), which now and then moved eta by a
 * float32 ulp (found by a PyTorch user's review).
 */
export function advanceScalarState(state: AsgdScalarState, hyper: AsgdHyperparameters): void {
  const step = fround(state.step + 1);
  const { lr, lambd, alpha, t0 } = hyper;
  state.step = step;
  state.eta = fround(lr / cachedPow(1 + lambd * lr * step, alpha));
  const sinceT0 = step - t0;
  state.mu = fround(1 / (sinceT0 > 1 ? sinceT0 : 1));
}

/** The last power computed: the parameters of a group step together, with the same base and exponent (pow.ts takes ~0.6 µs). */
let lastBase = NaN;
let lastExponent = NaN;
let lastPower = NaN;

function cachedPow(base: number, exponent: number): number {
  if (base !== lastBase || exponent !== lastExponent) {
    lastPower = pow(base, exponent);
    lastBase = base;
    lastExponent = exponent;
  }
  return lastPower;
}

export function assertSameLengths(param: Float32Array, grad: Float32Array, ax: Float32Array): void {
  if (grad.length !== param.length || ax.length !== param.length) {
    throw new RangeError(`param, grad and ax must have equal lengths (got ${param.length}, ${grad.length}, ${ax.length})`);
  }
}

/** Plain Float32Arrays: the JS kernel has no memory of its own to prefer. */
export function createPlainArena(elements: number): KernelArena {
  return {
    params: new Float32Array(elements),
    grads: new Float32Array(elements),
    ax: new Float32Array(elements),
    release() {},
  };
}

/**
 * The readable reference kernel: one element at a time, exactly the operations of asgd.py.
 * `options.fma === false` rounds the multiply and the add of `add(x, alpha=a)` separately, as PyTorch
 * does under ATEN_CPU_CAPABILITY=default.
 */
export const jsKernel: AsgdKernel = {
  name: 'js',
  createArena: createPlainArena,
  step(param, grad, ax, state, hyper, options?: KernelOptions) {
    assertSameLengths(param, grad, ax);
    const fused = options?.fma ?? true;
    const eta = fround(state.eta); // the state holds float32 values; fround guards against a stray double
    const decay = decayFactor(eta, hyper.lambd);
    const negEta = -eta; // alpha=-eta.item(): eta is a float32, so its negation is too
    const decayed = hyper.weightDecay !== 0;
    const weightDecay = fround(hyper.weightDecay); // alpha=weight_decay, converted to float32 by ATen
    const maximize = hyper.maximize;
    const mu = fround(state.mu);
    const averaging = mu !== 1; // the mu stored by the previous step
    const n = param.length;
    for (let i = 0; i < n; i++) {
      const p = param[i];
      let g = maximize ? -grad[i] : grad[i];
      if (decayed) g = fused ? fmaf32(p, weightDecay, g) : fround(g + fround(p * weightDecay));
      const decayedParam = fround(p * decay);
      const updated = fused ? fmaf32(g, negEta, decayedParam) : fround(decayedParam + fround(g * negEta));
      param[i] = updated;
      if (averaging) {
        const a = ax[i];
        ax[i] = fround(a + fround(fround(updated - a) * mu));
      } else {
        ax[i] = updated;
      }
    }
    advanceScalarState(state, hyper);
  },
};
