// Gradients of one step, decoded straight into the session's gradient arena and validated before any
// parameter moves: a bad gradient leaves the session exactly as it was.
//
// Half-precision gradients (safetensors F16 or BF16) are widened exactly to float32 (every half and
// bfloat16 value is a float32), so the step is PyTorch's for the widened gradient. They are logged as
// received, two bytes an element, and widened again on replay.
import { errors, quoteValue } from '../errors.ts';
import { halfToFloat } from '../formats/tensor.ts';
import type { SessionState } from './state.ts';
import { firstNonFinite, readJsonTensor } from './tensors.ts';

/** How a step's gradients are logged: float32, or all of them in one 16-bit dtype as received. */
export type GradDtype = 'float32' | 'float16' | 'bfloat16';

/** One binary gradient: float32 values, or the raw bits of a 16-bit float dtype. */
export type BinaryGradient =
  | { shape: readonly number[]; dtype?: 'float32'; data: Float32Array }
  | { shape: readonly number[]; dtype: 'float16' | 'bfloat16'; data: Uint16Array };

export type GradientInput =
  /** The `grads` object of a JSON step body: name -> tensor or flat list. */
  | { format: 'json'; grads: unknown }
  /** Decoded binary tensors (safetensors), name -> data with its shape. */
  | { format: 'tensors'; tensors: ReadonlyMap<string, BinaryGradient> };

/** A step's gradients, validated and in the arena: the parameters that have one, and the form to log. */
export interface DecodedGradients {
  present: number[];
  dtype: GradDtype;
  /** 16-bit dtypes: the bits as received, by parameter index. */
  bits: Map<number, Uint16Array> | null;
}

/** Widens 16-bit float bits into float32 values, exactly. */
export function widen(dtype: 'float16' | 'bfloat16', bits: Uint16Array, target: Float32Array): void {
  if (dtype === 'bfloat16') {
    // the top half of a float32: shift the bits into place
    const out = new Uint32Array(target.buffer, target.byteOffset, target.length);
    for (let k = 0; k < bits.length; k++) out[k] = bits[k] << 16;
  } else {
    for (let k = 0; k < bits.length; k++) target[k] = halfToFloat(bits[k]);
  }
}

/** Writes the gradients into `state.arena.grads`; returns the parameters that have one and how to log them. */
export function decodeGradients(input: GradientInput, state: SessionState): DecodedGradients {
  const { layout } = state;
  const present: number[] = [];
  const dtypes = new Set<GradDtype>();
  const bits = new Map<number, Uint16Array>();
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
        throw errors.shapeMismatch(`grads.${name}`, `expected shape ${JSON.stringify(shape)}, got ${quoteValue(tensor.shape)}`);
      }
      const target = state.grad(i);
      if (tensor.dtype === 'float16' || tensor.dtype === 'bfloat16') {
        widen(tensor.dtype, tensor.data, target);
        bits.set(i, tensor.data);
        dtypes.add(tensor.dtype);
      } else {
        if (tensor.data !== target) target.set(tensor.data);
        dtypes.add('float32');
      }
      const bad = firstNonFinite(target);
      if (bad >= 0) throw errors.nonFiniteGradient(`grads.${name}`, bad);
      present.push(i);
    }
  }
  if (present.length === 0) throw errors.emptyStep();
  present.sort((a, b) => a - b);
  // One 16-bit dtype for the whole step: logged as received. A mix: logged as the widened float32 (exact too).
  const [only] = dtypes;
  return dtypes.size === 1 && only !== 'float32' ? { present, dtype: only, bits } : { present, dtype: 'float32', bits: null };
}

/**
 * The log's form of a step's gradients: the present parameters' values, concatenated in index order, as
 * float32 or (decoded.dtype 16-bit) as the bits received.
 */
export function packGradients(state: SessionState, decoded: DecodedGradients): Buffer {
  const { present, bits } = decoded;
  if (bits) return concatenate(present, (i) => bits.get(i)!);
  const grads = state.arena.grads;
  if (present.length === state.layout.params.length) {
    return Buffer.from(grads.buffer, grads.byteOffset, grads.byteLength); // every parameter: the arena as it is
  }
  return concatenate(present, (i) => state.grad(i));
}

/** The bytes of each present parameter's array, one after another in index order (the platform's byte order, as the arena holds them). */
function concatenate(present: readonly number[], arrayOf: (i: number) => Float32Array | Uint16Array): Buffer {
  let total = 0;
  for (const i of present) total += arrayOf(i).byteLength;
  const out = Buffer.allocUnsafe(total);
  let at = 0;
  for (const i of present) {
    const a = arrayOf(i);
    out.set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), at);
    at += a.byteLength;
  }
  return out;
}

/** Writes a logged step's gradients back into the arena (for replay), widening 16-bit ones again. */
export function unpackGradients(state: SessionState, present: readonly number[], bytes: Buffer, dtype: GradDtype = 'float32'): void {
  let total = 0;
  for (const i of present) total += state.layout.numels[i];
  if (dtype !== 'float32') {
    if (bytes.byteLength !== total * 2) throw new Error(`step log entry holds ${bytes.byteLength} bytes, expected ${total * 2} (${dtype})`);
    const aligned16 = bytes.byteOffset % 2 === 0 ? bytes : Buffer.from(bytes);
    const view = new Uint16Array(aligned16.buffer, aligned16.byteOffset, total);
    let at = 0;
    for (const i of present) {
      widen(dtype, view.subarray(at, at + state.layout.numels[i]), state.grad(i));
      at += state.layout.numels[i];
    }
    return;
  }
  if (bytes.byteLength !== total * 4) throw new Error(`step log entry holds ${bytes.byteLength} bytes, expected ${total * 4}`);
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : Buffer.from(bytes);
  const view = new Float32Array(aligned.buffer, aligned.byteOffset, total);
  let at = 0;
  for (const i of present) {
    state.grad(i).set(view.subarray(at, at + state.layout.numels[i]));
    at += state.layout.numels[i];
  }
}
