// Shared types of the ASGD kernel (src/optim). Pure numeric code: nothing here knows HTTP or SQL.

/** Hyperparameters of one torch.optim.ASGD param group, as PyTorch holds them (Python floats = JS doubles). */
export interface AsgdHyperparameters {
  lr: number;
  lambd: number;
  alpha: number;
  t0: number;
  weightDecay: number;
  maximize: boolean;
}

/** PyTorch's defaults (torch/optim/asgd.py, ASGD.__init__). */
export const ASGD_DEFAULTS: Readonly<AsgdHyperparameters> = Object.freeze({
  lr: 0.01,
  lambd: 1e-4,
  alpha: 0.75,
  t0: 1e6,
  weightDecay: 0,
  maximize: false,
});

/**
 * Per-parameter scalar state. PyTorch keeps each as a 0-dim float32 tensor, so every value here
 * is always a float32 value (Math.fround of itself) held in a JS number.
 */
export interface AsgdScalarState {
  step: number;
  eta: number;
  mu: number;
}

/** Options that select how the step is computed. */
export interface KernelOptions {
  /**
   * true (default): param.add_(grad, alpha=-eta) is a fused multiply-add, as on every SIMD build of
   * PyTorch (AVX2, AVX-512, NEON). false: separately rounded multiply and add, as PyTorch under
   * ATEN_CPU_CAPABILITY=default.
   */
  fma: boolean;
}

/**
 * An ASGD kernel. `step` applies one step of PyTorch's _single_tensor_asgd to one parameter:
 * it updates `param` and `ax` in place and `state` (step, eta, mu) in place. `grad` is read-only.
 * `param`, `grad`, `ax` have equal lengths. The state must have been created by `initialState`
 * (or loaded from a state_dict) before the parameter's first step.
 */
export interface AsgdKernel {
  readonly name: string;
  /**
   * Float32Arrays this kernel steps fastest (for WebAssembly: views into its own memory, so that no
   * copy is needed). Any Float32Array is accepted by `step`; these only avoid copies.
   * An arena is freed when it is garbage (or by `release`).
   */
  createArena(elements: number): KernelArena;
  step(param: Float32Array, grad: Float32Array, ax: Float32Array, state: AsgdScalarState, hyper: AsgdHyperparameters, options?: KernelOptions): void;
}

/** Three equally long tensors (concatenated parameters, their gradients and their averages). */
export interface KernelArena {
  readonly params: Float32Array;
  readonly grads: Float32Array;
  readonly ax: Float32Array;
  release(): void;
}
