// The safetensors format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length
// N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}} padded with spaces
// to a multiple of 8, then the tensors' bytes, little-endian. Float32 in and out; F16 and BF16 are written
// from float32 by rounding to nearest, ties to even (as torch's .half() and .bfloat16() do), and read back
// exactly; F64 is read by rounding to float32.
import type { Tensor, TensorInput } from './tensors.ts';
import { numelOf, tensorProblem } from './tensors.ts';

export type DType = 'F32' | 'F16' | 'BF16';

export interface SafetensorsFile {
  tensors: Map<string, Tensor & { dtype: string }>;
  metadata: Record<string, string>;
}

const SIZE: Record<string, number> = { F32: 4, F16: 2, BF16: 2, F64: 8 };

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The bits of IEEE binary16 nearest to a float32 (ties to even); NaN stays a quiet NaN of the same sign. */
export function float32ToFloat16Bits(value: number): number {
  f32[0] = value;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // A subnormal half (or zero): the 24-bit significand shifted down by 14 - e, rounded.
    const shift = 14 - e;
    if (shift > 24) return sign;
    const m = mant | 0x800000;
    let r = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry out of the mantissa lands in the exponent, which is the right answer (up to infinity).
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

export function float16BitsToFloat32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** The upper 16 bits of the float32, rounded to nearest, ties to even; NaN stays a quiet NaN. */
export function float32ToBfloat16Bits(value: number): number {
  f32[0] = value;
  const bits = u32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return ((bits >>> 16) | 0x40) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bfloat16BitsToFloat32(b: number): number {
  u32[0] = b << 16;
  return f32[0];
}

/**
 * The first element of `data` that is finite but rounds to an infinity in `dtype` (F16 above 65504, BF16
 * near float32's limit), or -1. A step refuses such a gradient naming it (Client.step): the service would
 * otherwise say 'not finite' about a number the caller never had. The encoder itself rounds as torch does.
 */
export function firstHalfOverflow(data: ArrayLike<number>, dtype: DType): number {
  if (dtype === 'F32') return -1;
  const convert = dtype === 'F16' ? float32ToFloat16Bits : float32ToBfloat16Bits;
  const exponent = dtype === 'F16' ? 0x7c00 : 0x7f80;
  for (let i = 0; i < data.length; i++) {
    if ((convert(data[i]) & exponent) === exponent && Number.isFinite(Math.fround(data[i]))) return i;
  }
  return -1;
}

function encodeData(data: ArrayLike<number>, dtype: DType): Uint8Array {
  if (dtype === 'F32') {
    const out = new Uint8Array(data.length * 4);
    const view = new DataView(out.buffer);
    for (let i = 0; i < data.length; i++) view.setFloat32(i * 4, data[i], true);
    return out;
  }
  const convert = dtype === 'F16' ? float32ToFloat16Bits : float32ToBfloat16Bits;
  const out = new Uint8Array(data.length * 2);
  const view = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) view.setUint16(i * 2, convert(data[i]), true);
  return out;
}

/**
 * A safetensors file of these tensors, all in `dtype`, with `metadata` (string values) in `__metadata__`.
 * Data given as numbers is rounded to float32 first (as Float32Array.from does).
 */
export function encodeSafetensors(tensors: Record<string, TensorInput>, metadata: Record<string, string> = {}, dtype: DType = 'F32'): Uint8Array {
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const problem = tensorProblem(t, name, false);
    if (problem) throw new TypeError(problem);
    if (numelOf(t.shape) !== t.data.length) throw new RangeError(`${name}: shape [${t.shape.join(', ')}] does not hold ${t.data.length} values`);
    const bytes = encodeData(t.data, dtype);
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.length] };
    parts.push(bytes);
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  const encoded = new TextEncoder().encode(json);
  const padded = Math.ceil(encoded.length / 8) * 8;
  json += ' '.repeat(padded - encoded.length);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.length;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Reads a safetensors file; every tensor comes back as float32 (F16/BF16 exactly, F64 rounded). */
export function decodeSafetensors(bytes: Uint8Array): SafetensorsFile {
  if (bytes.length < 8) throw new RangeError('safetensors: shorter than its 8-byte header length');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (8 + n > bytes.length) throw new RangeError(`safetensors: header of ${n} bytes does not fit in ${bytes.length}`);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as Record<string, unknown>;
  const base = 8 + n;
  const tensors = new Map<string, Tensor & { dtype: string }>();
  let metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(header)) {
    if (name === '__metadata__') {
      metadata = (value ?? {}) as Record<string, string>;
      continue;
    }
    const { dtype, shape, data_offsets: [begin, end] } = value as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const size = SIZE[dtype];
    if (!size) throw new RangeError(`safetensors: tensor ${name} has dtype ${dtype}, which this client does not read`);
    const count = numelOf(shape);
    if (end - begin !== count * size || base + end > bytes.length) throw new RangeError(`safetensors: tensor ${name} has data_offsets that do not match its shape`);
    const data = new Float32Array(count);
    const at = base + begin;
    for (let i = 0; i < count; i++) {
      const o = at + i * size;
      data[i] =
        dtype === 'F32' ? view.getFloat32(o, true)
        : dtype === 'F64' ? view.getFloat64(o, true)
        : dtype === 'F16' ? float16BitsToFloat32(view.getUint16(o, true))
        : bfloat16BitsToFloat32(view.getUint16(o, true));
    }
    tensors.set(name, { dtype, shape, data });
  }
  return { tensors, metadata };
}
