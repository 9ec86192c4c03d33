// The WebAssembly SIMD ASGD kernels: same results as jsKernel, bit for bit, several times faster.
// 'wasm' (asgd.wat) emulates the fused multiply-add exactly; 'wasm-fma' (asgd-fma.wat) uses the CPU's
// through relaxed SIMD, and is only chosen after src/optim/fma-self-test.ts proved it exact here.
//
// Every arena owns one WebAssembly.Memory, sized once and never grown, so its Float32Array views
// never detach. step() runs in place when param, grad and ax are views into one instance's memory;
// any other array is copied through that instance's scratch space in chunks (and param/ax back).

import { advanceScalarState, assertSameLengths, decayFactor } from '../asgd.ts';
import type { AsgdHyperparameters, AsgdKernel, AsgdScalarState, KernelArena, KernelOptions } from '../types.ts';
import { ASGD_FMA_WASM_BASE64, ASGD_WASM_BASE64 } from './asgd.wasm.ts';

const PAGE = 65536;
/** Bytes 0..127: the kernel's own scratch for the last elements (n % 4 in asgd.wat, n % 8 in asgd-fma.wat). */
const RESERVED = 128;
/** Elements per chunk when arrays outside the memory are copied through scratch. */
export const CHUNK_ELEMENTS = 16384;
const CHUNK_BYTES = CHUNK_ELEMENTS * 4;
const SCRATCH_BYTES = 3 * CHUNK_BYTES;
const MAX_MEMORY_BYTES = 65536 * PAGE; // wasm32: 4 GiB

const FLAG_WEIGHT_DECAY = 1;
const FLAG_AVERAGING = 2;
const FLAG_MAXIMIZE = 4;
const FLAG_UNFUSED = 8;

type StepExport = (n: number, pp: number, gp: number, ap: number, decay: number, negEta: number, wd: number, mu: number, flags: number) => void;

interface Instance {
  memory: WebAssembly.Memory;
  step: StepExport;
  scratch: [Float32Array, Float32Array, Float32Array];
}


/**
 * A kernel running the `step` export of a compiled module (either .wat). `unfused` handles steps with
 * options.fma === false when the module has no unfused mode of its own (asgd-fma.wat).
 */
export function createWasmKernel(name: string, module: WebAssembly.Module, unfused?: AsgdKernel): AsgdKernel {
  function instantiate(bytes: number): Instance {
    if (bytes > MAX_MEMORY_BYTES) throw new RangeError(`an ASGD arena of ${bytes} bytes exceeds the 4 GiB of a wasm memory`);
    const pages = Math.ceil(bytes / PAGE);
    const memory = new WebAssembly.Memory({ initial: pages, maximum: pages });
    const instance = new WebAssembly.Instance(module, { env: { memory } });
    const buffer = memory.buffer;
    return {
      memory,
      step: instance.exports.step as StepExport,
      scratch: [0, 1, 2].map((k) => new Float32Array(buffer, RESERVED + k * CHUNK_BYTES, CHUNK_ELEMENTS)) as Instance['scratch'],
    };
  }

  /** Instances by the ArrayBuffer of their memory, to recognise arena views. */
  const instances = new WeakMap<ArrayBuffer, Instance>();
  let shared: Instance | null = null;
  function sharedInstance(): Instance {
    shared ??= instantiate(RESERVED + SCRATCH_BYTES);
    return shared;
  }

  function instanceOf(array: Float32Array): Instance | undefined {
    return instances.get(array.buffer as ArrayBuffer);
  }

  function createWasmArena(elements: number): KernelArena {
    if (!Number.isSafeInteger(elements) || elements < 0) throw new RangeError(`invalid arena size ${elements}`);
    const tensorBytes = Math.ceil((elements * 4) / 64) * 64; // each tensor 64-byte aligned
    const base = RESERVED + SCRATCH_BYTES;
    const instance = instantiate(base + 3 * tensorBytes);
    const buffer = instance.memory.buffer;
    instances.set(buffer, instance);
    return {
      params: new Float32Array(buffer, base, elements),
      grads: new Float32Array(buffer, base + tensorBytes, elements),
      ax: new Float32Array(buffer, base + 2 * tensorBytes, elements),
      release() {
        // The memory goes with the last view; after this, these views are stepped through copies.
        instances.delete(buffer);
      },
    };
  }

  function flagsFor(mu: number, hyper: AsgdHyperparameters, options?: KernelOptions): number {
    return (
      (hyper.weightDecay !== 0 ? FLAG_WEIGHT_DECAY : 0) |
      (mu !== 1 ? FLAG_AVERAGING : 0) |
      (hyper.maximize ? FLAG_MAXIMIZE : 0) |
      (options?.fma === false ? FLAG_UNFUSED : 0)
    );
  }

  function wasmStep(
    param: Float32Array,
    grad: Float32Array,
    ax: Float32Array,
    state: AsgdScalarState,
    hyper: AsgdHyperparameters,
    options?: KernelOptions,
  ): void {
    assertSameLengths(param, grad, ax);
    const n = param.length;
    const eta = Math.fround(state.eta); // float32 by contract; the wasm call would round it anyway
    const decay = decayFactor(eta, hyper.lambd);
    const negEta = -eta;
    const wd = Math.fround(hyper.weightDecay);
    const mu = Math.fround(state.mu);
    const flags = flagsFor(mu, hyper, options);
    const instance = instanceOf(param) ?? instanceOf(ax) ?? instanceOf(grad) ?? sharedInstance();
    const buffer = instance.memory.buffer;
    const paramInside = param.buffer === buffer;
    const gradInside = grad.buffer === buffer;
    const axInside = ax.buffer === buffer;
    if (paramInside && gradInside && axInside) {
      if (n > 0) instance.step(n, param.byteOffset, grad.byteOffset, ax.byteOffset, decay, negEta, wd, mu, flags);
    } else {
      const scratchParam = instance.scratch[0];
      const scratchGrad = instance.scratch[1];
      const scratchAx = instance.scratch[2];
      for (let start = 0; start < n; start += CHUNK_ELEMENTS) {
        const end = Math.min(n, start + CHUNK_ELEMENTS);
        const count = end - start;
        if (!paramInside) scratchParam.set(param.subarray(start, end));
        if (!gradInside) scratchGrad.set(grad.subarray(start, end));
        if (!axInside) scratchAx.set(ax.subarray(start, end));
        instance.step(
          count,
          paramInside ? param.byteOffset + start * 4 : scratchParam.byteOffset,
          gradInside ? grad.byteOffset + start * 4 : scratchGrad.byteOffset,
          axInside ? ax.byteOffset + start * 4 : scratchAx.byteOffset,
          decay,
          negEta,
          wd,
          mu,
          flags,
        );
        if (!paramInside) param.set(scratchParam.subarray(0, count), start);
        if (!axInside) ax.set(scratchAx.subarray(0, count), start);
      }
    }
    advanceScalarState(state, hyper);
  }

  return {
    name,
    createArena: createWasmArena,
    step(param, grad, ax, state, hyper, options) {
      if (unfused && options?.fma === false) unfused.step(param, grad, ax, state, hyper, options);
      else wasmStep(param, grad, ax, state, hyper, options);
    },
  };
}

/** The exact FMA emulation (the default where the hardware FMA is not proven). */
export const wasmKernel: AsgdKernel = createWasmKernel('wasm', new WebAssembly.Module(Buffer.from(ASGD_WASM_BASE64, 'base64')));

/**
 * The hardware-FMA kernel, compiled on first use; throws where the engine lacks relaxed SIMD. Check it with
 * fmaSelfTest before use: relaxed_madd may round twice (CPUs without FMA).
 */
let fmaKernel: AsgdKernel | null = null;
export function wasmFmaKernel(): AsgdKernel {
  fmaKernel ??= createWasmKernel('wasm-fma', new WebAssembly.Module(Buffer.from(ASGD_FMA_WASM_BASE64, 'base64')), wasmKernel);
  return fmaKernel;
}
