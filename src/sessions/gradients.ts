// Gradients of one step, decoded straight into the session's gradient arena and validated before any
// parameter moves: a bad gradient leaves the session exactly as it was.
import { errors } from '../errors.ts';
import type { SessionState } from './state.ts';
import { firstNonFinite, readJsonTensor } from './tensors.ts';

export type GradientInput =
  /** The `grads` object of a JSON step body: name -> tensor or flat list. */
  | { format: 'json'; grads: unknown }
  /** Decoded binary tensors (safetensors), name -> float32 data with its shape. */
  | { format: 'tensors'; tensors: ReadonlyMap<string, { shape: readonly number[]; data: Float32Array }> };

/** Writes the gradients into `state.arena.grads`; returns the indices of the parameters that have one. */
export function decodeGradients(input: GradientInput, state: SessionState): number[] {
  const { layout } = state;
  const present: number[] = [];
  if (input.format === 'json') {
    const grads = input.grads;
    if (grads === null || typeof grads !== 'object' || Array.isArray(grads)) throw errors.invalidBody('grads: must be an object mapping parameter names to tensors');
    for (const [name, value] of Object.entries(grads as Record<string, unknown>)) {
      const i = layout.index.get(name);
      if (i === undefined) throw errors.unknownParameter(`grads.${name}`, name);
      if (value === null) continue; // like p.grad = None: skipped this step
      readJsonTensor(value, `grads.${name}`, layout.params[i].shape, state.grad(i), 'gradient');
      present.push(i);
    }
  } else {
    for (const [name, tensor] of input.tensors) {
      const i = layout.index.get(name);
      if (i === undefined) throw errors.unknownParameter(`grads.${name}`, name);
      const shape = layout.params[i].shape;
      if (tensor.shape.length !== shape.length || tensor.shape.some((d, k) => d !== shape[k])) {
        throw errors.shapeMismatch(`grads.${name}`, `expected shape ${JSON.stringify(shape)}, got ${JSON.stringify(tensor.shape)}`);
      }
      const bad = firstNonFinite(tensor.data);
      if (bad >= 0) throw errors.nonFiniteGradient(`grads.${name}`, bad);
      const target = state.grad(i);
      if (tensor.data !== target) target.set(tensor.data);
      present.push(i);
    }
  }
  if (present.length === 0) throw errors.emptyStep();
  return present.sort((a, b) => a - b);
}

/** The log's form of a step's gradients: the present parameters' float32 values, concatenated in index order. */
export function packGradients(state: SessionState, present: readonly number[]): Buffer {
  const grads = state.arena.grads;
  if (present.length === state.layout.params.length) {
    return Buffer.from(grads.buffer, grads.byteOffset, grads.byteLength); // every parameter: the arena as it is
  }
  let total = 0;
  for (const i of present) total += state.layout.numels[i];
  const out = Buffer.allocUnsafe(total * 4);
  const view = new Float32Array(out.buffer, out.byteOffset, total);
  let at = 0;
  for (const i of present) {
    view.set(state.grad(i), at);
    at += state.layout.numels[i];
  }
  return out;
}

/** Writes a logged step's gradients back into the arena (for replay). */
export function unpackGradients(state: SessionState, present: readonly number[], bytes: Buffer): void {
  let total = 0;
  for (const i of present) total += state.layout.numels[i];
  if (bytes.byteLength !== total * 4) throw new Error(`step log entry holds ${bytes.byteLength} bytes, expected ${total * 4}`);
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : Buffer.from(bytes);
  const view = new Float32Array(aligned.buffer, aligned.byteOffset, total);
  let at = 0;
  for (const i of present) {
    state.grad(i).set(view.subarray(at, at + state.layout.numels[i]));
    at += state.layout.numels[i];
  }
}
