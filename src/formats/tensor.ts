// Dense CPU tensors as the formats carry them: a dtype, a shape and the elements in row-major
// (C-contiguous) order, little-endian, exactly as PyTorch stores them in a torch.save record.

import { FormatError } from './errors.ts';

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  // Typed arrays use the host byte order; every format here is little-endian.
  throw new Error('src/formats requires a little-endian host');
}

/** The dtypes a Tensor can hold. float16 and bfloat16 keep their raw bits in a Uint16Array. */
export const DTYPES = ['float32', 'float64', 'float16', 'bfloat16', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool'] as const;
export type DType = (typeof DTYPES)[number];

/** The typed array that holds each dtype's elements. `bool` is one byte per element, 0 or 1. */
export interface TensorArrays {
  float32: Float32Array;
  float64: Float64Array;
  float16: Uint16Array;
  bfloat16: Uint16Array;
  int64: BigInt64Array;
  int32: Int32Array;
  int16: Int16Array;
  int8: Int8Array;
  uint8: Uint8Array;
  bool: Uint8Array;
}

export interface TensorOf<D extends DType> {
  dtype: D;
  /** Sizes of each dimension; [] is a 0-dim (scalar) tensor with one element. */
  shape: number[];
  /** numel(shape) elements, row-major. May be a view into a larger buffer (e.g. the file it came from). */
  data: TensorArrays[D];
  /** PyTorch's requires_grad flag as pickled; absent means false. */
  requiresGrad?: boolean;
}

/** A tensor of any supported dtype; narrowing on `dtype` narrows `data`. */
export type Tensor = { [D in DType]: TensorOf<D> }[DType];
export type Float32Tensor = TensorOf<'float32'>;
export type TypedArray = TensorArrays[DType];

const ELEMENT_SIZE: Record<DType, number> = {
  float32: 4, float64: 8, float16: 2, bfloat16: 2, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};

type ArrayCtor = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): TypedArray; new (length: number): TypedArray };
const ARRAY_CTOR: Record<DType, ArrayCtor> = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, bfloat16: Uint16Array, int64: BigInt64Array,
  int32: Int32Array, int16: Int16Array, int8: Int8Array, uint8: Uint8Array, bool: Uint8Array,
} as Record<DType, ArrayCtor>;

export function isDType(name: unknown): name is DType {
  return typeof name === 'string' && (DTYPES as readonly string[]).includes(name);
}

export function elementSize(dtype: DType): number {
  return ELEMENT_SIZE[dtype];
}

/** Number of elements of a shape; 1 for a 0-dim shape. */
export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const size of shape) n *= size;
  return n;
}

/** Throws TENSOR_SHAPE_INVALID unless every size is a non-negative safe integer and numel is safe. */
export function checkShape(shape: readonly number[], what = 'tensor'): void {
  let n = 1;
  for (const size of shape) {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new FormatError('TENSOR_SHAPE_INVALID', `${what} has an invalid size ${String(size)} in shape [${shape.join(', ')}]`);
    }
    n *= size;
  }
  if (!Number.isSafeInteger(n)) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `${what} shape [${shape.join(', ')}] has too many elements`);
  }
}

/** Row-major strides of a shape, in elements. */
export function contiguousStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  let stride = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = stride;
    stride *= Math.max(shape[i], 1); // as torch's: a (3, 0) tensor has strides (1, 1)
  }
  return strides;
}

/** Builds a tensor after checking that `data` has the dtype's array type and numel(shape) elements. */
export function makeTensor<D extends DType>(dtype: D, shape: readonly number[], data: TensorArrays[D]): TensorOf<D> {
  if (!isDType(dtype)) throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `dtype ${String(dtype)} is not supported`);
  if (!Array.isArray(shape)) throw new FormatError('TENSOR_SHAPE_INVALID', 'tensor shape must be an array');
  checkShape(shape);
  if (!(data instanceof ARRAY_CTOR[dtype])) {
    throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `${dtype} tensor data must be a ${ARRAY_CTOR[dtype].name}`);
  }
  if (data.length !== numel(shape)) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `shape [${shape.join(', ')}] needs ${numel(shape)} elements, data has ${data.length}`);
  }
  return { dtype, shape: [...shape], data };
}

export function isTensor(value: unknown): value is Tensor {
  if (typeof value !== 'object' || value === null) return false;
  const t = value as Partial<Tensor>;
  return isDType(t.dtype) && Array.isArray(t.shape) && ArrayBuffer.isView(t.data);
}

/**
 * Elements from little-endian bytes. A zero-copy view when the bytes are aligned for the
 * element type (and `copy` is false); otherwise a copy. `bytes.length` must be a multiple of the element size.
 */
export function arrayFromBytes<D extends DType>(dtype: D, bytes: Uint8Array, copy = false): TensorArrays[D] {
  const size = ELEMENT_SIZE[dtype];
  if (bytes.byteLength % size !== 0) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `${bytes.byteLength} bytes is not a whole number of ${dtype} elements`);
  }
  const Ctor = ARRAY_CTOR[dtype];
  const length = bytes.byteLength / size;
  if (!copy && bytes.byteOffset % size === 0) return new Ctor(bytes.buffer, bytes.byteOffset, length) as TensorArrays[D];
  const out = new Ctor(length);
  new Uint8Array(out.buffer, out.byteOffset, out.byteLength).set(bytes);
  return out as TensorArrays[D];
}

/** The raw little-endian bytes of a tensor's elements, as a Buffer view (no copy). */
export function tensorBytes(tensor: Tensor): Buffer {
  const { data } = tensor;
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

const F32_SCRATCH = new Float32Array(1);
const U32_SCRATCH = new Uint32Array(F32_SCRATCH.buffer);

/** IEEE half bits to the float32 value (exact: every half is a float32). */
export function halfToFloat(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

/** bfloat16 bits to the float32 value (exact: the top half of a float32). */
export function bfloat16ToFloat(bits: number): number {
  U32_SCRATCH[0] = (bits & 0xffff) << 16;
  return F32_SCRATCH[0];
}

/** int64 to the nearest float32, ties to even, in one rounding as C++'s static_cast<float> does. */
export function int64ToFloat32(value: bigint): number {
  const negative = value < 0n;
  let magnitude = negative ? -value : value;
  if (magnitude <= 2n ** 53n) return Math.fround(Number(value)); // exact in a double: one rounding
  const shift = BigInt(magnitude.toString(2).length - 24);
  const kept = magnitude >> shift;
  const rest = magnitude - (kept << shift);
  const half = 1n << (shift - 1n);
  let rounded = kept;
  if (rest > half || (rest === half && (kept & 1n) === 1n)) rounded += 1n;
  magnitude = rounded << shift;
  const result = Math.fround(Number(magnitude)); // exact: at most 25 significant bits, already rounded
  return negative ? -result : result;
}

/**
 * The tensor's elements as float32 values. A float32 tensor returns its own data (no copy);
 * every other dtype is converted with one rounding (float64 and int64 may lose precision, as
 * PyTorch's .float() does).
 */
export function toFloat32(tensor: Tensor): Float32Array {
  switch (tensor.dtype) {
    case 'float32':
      return tensor.data;
    case 'float16':
      return Float32Array.from(tensor.data, halfToFloat);
    case 'bfloat16':
      return Float32Array.from(tensor.data, bfloat16ToFloat);
    case 'int64':
      return Float32Array.from(tensor.data, int64ToFloat32);
    default:
      return Float32Array.from(tensor.data as ArrayLike<number>); // float64, int32, int16, int8, uint8, bool: Math.fround per element
  }
}

/** The tensor as a float32 tensor (the same object when it already is one). */
export function toFloat32Tensor(tensor: Tensor): Float32Tensor {
  if (tensor.dtype === 'float32') return tensor;
  const out: Float32Tensor = { dtype: 'float32', shape: [...tensor.shape], data: toFloat32(tensor) };
  if (tensor.requiresGrad !== undefined) out.requiresGrad = tensor.requiresGrad;
  return out;
}

/** The single element of a tensor with one element, as a JS number (bigint for int64). */
export function scalarValue(tensor: Tensor): number | bigint {
  if (tensor.data.length !== 1) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `expected a tensor with one element, got shape [${tensor.shape.join(', ')}]`);
  }
  if (tensor.dtype === 'float16') return halfToFloat(tensor.data[0]);
  if (tensor.dtype === 'bfloat16') return bfloat16ToFloat(tensor.data[0]);
  return tensor.data[0];
}
