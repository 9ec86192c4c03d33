// Tensors as this client hands them around: float32 data, row-major, with a shape. JSON carries them as
// {"shape", "data"} where non-finite values are the strings "NaN", "Infinity", "-Infinity".

export interface Tensor {
  shape: number[];
  data: Float32Array;
}

/** A tensor as this client accepts it: the data as a Float32Array or as plain numbers (made float32 when sent). */
export interface TensorInput {
  shape: number[];
  data: Float32Array | number[];
}

/** What a gradient may be given as: a tensor (with Float32Array or number[] data), or flat data (the session's shape is then used). */
export type TensorLike = TensorInput | Float32Array | number[];

export const numelOf = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** Float32 values as JSON numbers. A float32 widened to a double prints as a decimal that reads back to the same float32. */
export function toJsonData(data: ArrayLike<number>): (number | string)[] {
  const out = new Array<number | string>(data.length);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    out[i] = Number.isFinite(v) ? v : Number.isNaN(v) ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity';
  }
  return out;
}

const NON_FINITE: Record<string, number> = { NaN: NaN, Infinity: Infinity, '-Infinity': -Infinity };

export function fromJsonData(data: readonly unknown[], field: string): Float32Array {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i++) {
    const v = data[i];
    if (typeof v === 'number') out[i] = v;
    else if (typeof v === 'string' && v in NON_FINITE) out[i] = NON_FINITE[v];
    else throw new TypeError(`${field}[${i}]: not a number`);
  }
  return out;
}

/** A JSON tensor {"shape", "data"} of an answer, as a Tensor. */
export function fromJsonTensor(value: unknown, field: string): Tensor {
  const t = value as { shape?: unknown; data?: unknown };
  if (!t || !Array.isArray(t.shape) || !Array.isArray(t.data)) throw new TypeError(`${field}: not a tensor {"shape", "data"}`);
  return { shape: t.shape as number[], data: fromJsonData(t.data, `${field}.data`) };
}

export function fromJsonTensors(value: unknown, field: string): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (const [name, t] of Object.entries(value as Record<string, unknown>)) out[name] = fromJsonTensor(t, `${field}.${name}`);
  return out;
}

/**
 * Why `value` is not a tensor this client takes (a message naming `field`), or null. The types forbid these,
 * but plain JavaScript passes them: a tf.Tensor, a Float64Array, flat data where a shape is needed.
 * `flat`: flat data (Float32Array, number[]) is taken, with the session's shape.
 */
export function tensorProblem(value: unknown, field: string, flat: boolean): string | null {
  // Nested arrays (tensor.arraySync(), a 2-D literal) were read as one value a row: "shape [2, 2] does not hold 2 values".
  const data = Array.isArray(value) ? value : (value as { data?: unknown } | null)?.data;
  if (Array.isArray(data) && data.length > 0 && Array.isArray(data[0])) {
    return `${field}: a nested array (as tensor.arraySync() gives): pass the values flat (tensor.dataSync(), or .flat(Infinity)), ${flat ? 'or {shape, data} with data flat' : 'as {shape, data} with data flat'}`;
  }
  const isFlat = value instanceof Float32Array || Array.isArray(value);
  if (flat && isFlat) return null;
  const t = value as { shape?: unknown; data?: unknown; dataSync?: unknown } | null;
  if (t !== null && typeof t === 'object' && Array.isArray(t.shape) && (t.data instanceof Float32Array || Array.isArray(t.data))) return null;
  const got = t !== null && typeof t === 'object' && typeof t.dataSync === 'function' ? 'a tf.Tensor: pass {shape: t.shape, data: t.dataSync()}'
    : isFlat ? 'flat data: give its shape, {shape, data}'
    : ArrayBuffer.isView(value) ? `a ${value.constructor.name}: pass Float32Array.from(it)`
    : value === null ? 'null' : typeof value === 'object' ? 'an object without shape and data arrays' : typeof value;
  return `${field}: expected ${flat ? 'a Float32Array, a number[] or {shape, data}' : '{shape, data} (data a Float32Array or a number[])'}, got ${got}`;
}

export function asFloat32(data: Float32Array | number[]): Float32Array {
  return data instanceof Float32Array ? data : Float32Array.from(data);
}
