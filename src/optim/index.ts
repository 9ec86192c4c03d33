// The ASGD kernels. Pure numeric code on Float32Array: nothing here knows HTTP or SQL.
import { jsKernel } from './asgd.ts';
import type { AsgdKernel } from './types.ts';
import { wasmKernel } from './wasm/index.ts';

export * from './types.ts';
export { initialState, advanceScalarState, decayFactor, jsKernel } from './asgd.ts';
export { fmaf32 } from './fma.ts';
export { wasmKernel } from './wasm/index.ts';

export type KernelName = 'wasm' | 'js';
export const KERNEL_NAMES: readonly KernelName[] = ['wasm', 'js'];

/** The kernel by name; 'wasm' (the default) is the fast one, 'js' the readable reference. */
export function selectKernel(name: KernelName = 'wasm'): AsgdKernel {
  switch (name) {
    case 'wasm':
      return wasmKernel;
    case 'js':
      return jsKernel;
    default:
      throw new RangeError(`unknown ASGD kernel '${String(name)}' (expected 'wasm' or 'js')`);
  }
}
