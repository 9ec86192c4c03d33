// Every kernel this machine can run: js, wasm (exact FMA emulation), and wasm-fma (hardware FMA through
// relaxed SIMD) when its start-up self-test passes here. The golden, live PyTorch and wasm tests run on each.
import { provenFmaKernel } from '../../src/optim/index.ts';
import type { AsgdKernel } from '../../src/optim/types.ts';
import { wasmKernel } from '../../src/optim/wasm/index.ts';

export const fmaProof = provenFmaKernel();
export const wasmKernels: AsgdKernel[] = fmaProof.kernel ? [wasmKernel, fmaProof.kernel] : [wasmKernel];
if (!fmaProof.kernel) console.log(`wasm-fma is not tested on this machine: ${fmaProof.why}`);
