// Kernel selection. The WebAssembly kernel is the default once it is built; the JS kernel is the reference.
import { jsKernel } from './asgd.ts';
import type { AsgdKernel } from './types.ts';

export function selectKernel(name: 'wasm' | 'js'): AsgdKernel {
  void name;
  return jsKernel;
}
