// Deliberately wrong kernels: each golden test must reject them, or it could not fail.

import { advanceScalarState, assertSameLengths, createPlainArena, decayFactor } from '../../src/optim/asgd.ts';
import { mulAddUnfusedf32 } from '../../src/optim/fma.ts';
import type { AsgdKernel } from '../../src/optim/types.ts';

function variantKernel(name: string, mulAdd: (a: number, b: number, c: number) => number): AsgdKernel {
  return {
    name,
    createArena: createPlainArena,
    step(param, grad, ax, state, hyper) {
      assertSameLengths(param, grad, ax);
      const decay = decayFactor(state.eta, hyper.lambd);
      const wd = Math.fround(hyper.weightDecay);
      for (let i = 0; i < param.length; i++) {
        let g = hyper.maximize ? -grad[i] : grad[i];
        if (hyper.weightDecay !== 0) g = mulAdd(param[i], wd, g);
        const p = mulAdd(g, -state.eta, Math.fround(param[i] * decay));
        param[i] = p;
        ax[i] = state.mu !== 1 ? Math.fround(ax[i] + Math.fround(Math.fround(p - ax[i]) * state.mu)) : p;
      }
      advanceScalarState(state, hyper);
    },
  };
}

/** Rounds the double a*b + c to float32: right except on halfway cases. */
export const doubleRoundingKernel = variantKernel('double-rounding', (a, b, c) => Math.fround(a * b + c));
/** Rounds the product, then the sum: what PyTorch does only without SIMD. */
export const unfusedKernel = variantKernel('unfused', mulAddUnfusedf32);
