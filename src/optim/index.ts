// The ASGD kernels. Pure numeric code on Float32Array: nothing here knows HTTP or SQL.
import { jsKernel } from './asgd.ts';
import { fmaSelfTest } from './fma-self-test.ts';
import type { AsgdKernel } from './types.ts';
import { wasmFmaKernel, wasmKernel } from './wasm/index.ts';

export * from './types.ts';
export { initialState, advanceScalarState, decayFactor, jsKernel } from './asgd.ts';
export { fmaf32 } from './fma.ts';
export { fmaSelfTest } from './fma-self-test.ts';
export { wasmKernel, wasmFmaKernel } from './wasm/index.ts';

/** 'auto' (the default): wasm-fma where its self-test passes on this machine, else wasm. */
export type KernelChoice = 'auto' | 'wasm-fma' | 'wasm' | 'js';
export const KERNEL_CHOICES: readonly KernelChoice[] = ['auto', 'wasm-fma', 'wasm', 'js'];

export class KernelUnavailableError extends Error {}

export interface SelectedKernel {
  kernel: AsgdKernel;
  /** Why this one: for the start-up log line. */
  reason: string;
}

/**
 * The hardware-FMA kernel if this machine runs it exactly as PyTorch computes; otherwise why not.
 * `candidate` builds the kernel (tests pass deliberately unfused ones to see the self-test refuse them).
 */
type Proof = { kernel: AsgdKernel; checked: number } | { kernel: null; why: string };
/** The proof for this machine's own wasm-fma kernel, once per process (apps built in tests share it). */
let ownProof: Proof | null = null;

export function provenFmaKernel(candidate?: () => AsgdKernel): Proof {
  if (candidate) return prove(candidate);
  ownProof ??= prove(wasmFmaKernel);
  return ownProof;
}

function prove(candidate: () => AsgdKernel): Proof {
  let kernel: AsgdKernel;
  try {
    kernel = candidate();
  } catch (err) {
    return { kernel: null, why: `WebAssembly relaxed SIMD is unavailable in this engine (${(err as Error).message})` };
  }
  const result = fmaSelfTest(kernel);
  if (!result.ok) return { kernel: null, why: `its self-test failed: f32x4.relaxed_madd does not fuse as PyTorch does here (${result.failure})` };
  return { kernel, checked: result.checked };
}

/**
 * The kernel for ASGD_KERNEL. Forcing 'wasm-fma' where it is not proven throws KernelUnavailableError:
 * a kernel that is not bit-exact must never serve.
 */
export function selectKernel(choice: KernelChoice = 'auto', fmaCandidate?: () => AsgdKernel): SelectedKernel {
  switch (choice) {
    case 'auto':
    case 'wasm-fma': {
      const fma = provenFmaKernel(fmaCandidate);
      if (fma.kernel) return { kernel: fma.kernel, reason: `hardware fused multiply-add (relaxed SIMD), self-test passed on ${fma.checked} cases` };
      if (choice === 'wasm-fma') throw new KernelUnavailableError(`ASGD_KERNEL=wasm-fma cannot run on this machine: ${fma.why}. Use ASGD_KERNEL=wasm (exact emulation).`);
      return { kernel: wasmKernel, reason: `exact FMA emulation; the hardware-FMA kernel is not used: ${fma.why}` };
    }
    case 'wasm':
      return { kernel: wasmKernel, reason: 'exact FMA emulation (ASGD_KERNEL=wasm)' };
    case 'js':
      return { kernel: jsKernel, reason: 'the readable reference kernel (ASGD_KERNEL=js)' };
    default:
      throw new RangeError(`unknown ASGD kernel '${String(choice)}' (expected ${KERNEL_CHOICES.join(', ')})`);
  }
}
