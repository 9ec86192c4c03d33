// safetensors (huggingface/safetensors, safetensors/src/tensor.rs): 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
// then the body. Offsets are relative to the body; the tensors must cover it exactly, without
// gaps or overlaps. The writer sorts as the reference does (larger dtypes first, then by name), so
// every tensor is aligned, and pads the header with spaces to a multiple of 8.

import { FormatError } from './errors.ts';
import { arrayFromBytes, checkShape, elementSize, isTensor, numel, tensorBytes, type DType, type Tensor } from './tensor.ts';
import type { ByteStream } from './zip-writer.ts';
import { firstDuplicateKey, jsonTooDeepAt } from './json-depth.ts';

const DTYPE_OF: Record<string, DType> = {
  F32: 'float32', F64: 'float64', F16: 'float16', BF16: 'bfloat16',
  I64: 'int64', I32: 'int32', I16: 'int16', I8: 'int8', U8: 'uint8', BOOL: 'bool',
};
const NAME_OF = Object.fromEntries(Object.entries(DTYPE_OF).map(([name, dtype]) => [dtype, name])) as Record<DType, string>;
/** The reference implementation refuses headers above 100 MB. */
const MAX_HEADER = 100_000_000;
/**
 * Header bytes one tensor entry can need: a 256-character name written as \uXXXX escapes (1,536 bytes),
 * 16 dimensions of 16 digits, two offsets and the keys. Bounds the header of a file of known tensor count.
 */
const HEADER_BYTES_PER_TENSOR = 2048;
/** Header bytes for __metadata__ and the braces around it, beside the tensors (param_groups JSON, metrics, options). */
const HEADER_BYTES_METADATA = 1 << 20;
/** Most __metadata__ entries: files carry a handful ("format", the service's own keys). */
const MAX_METADATA_KEYS = 1024;

export interface SafetensorsFile {
  /** Tensors by name, in body order. */
  tensors: Map<string, Tensor>;
  /** The "__metadata__" strings (empty when absent). */
  metadata: Map<string, string>;
}

export interface SafetensorsReadOptions {
  /** 'float32' (default): any other dtype is refused with TENSOR_DTYPE_UNSUPPORTED. 'all': every supported dtype is returned as stored. */
  dtypes?: 'float32' | 'all';
  /** Copy tensor data out of the file. Default false: views into `buf` where aligned. */
  copy?: boolean;
  /**
   * Most tensors the caller can use (e.g. a session's parameter count). A header longer than that many
   * entries can need, or listing more, is refused before its entries are read.
   */
  maxTensors?: number;
  /**
   * Throws the caller's error for a tensor name it cannot use. Called for each name in header order
   * before any entry is checked, so the first unknown name is refused without reading the rest.
   */
  checkName?: (name: string) => void;
}

export function readSafetensors(input: Uint8Array, options: SafetensorsReadOptions = {}): SafetensorsFile {
  const buf = Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  if (buf.length < 8) throw headerError(`file of ${buf.length} bytes is too short for a safetensors header`);
  const declared = buf.readBigUInt64LE(0);
  if (declared > BigInt(buf.length - 8)) {
    // A zip archive's local header (PK\x03\x04): a torch.save file sent as safetensors.
    const zip = buf.readUInt32LE(0) === 0x04034b50 ? ' (it is a zip archive, as torch.save writes: send it with Content-Type: application/octet-stream)' : '';
    throw headerError(`header length ${declared} exceeds the ${buf.length - 8} bytes after it${zip}`);
  }
  const headerLength = Number(declared);
  if (headerLength > MAX_HEADER) throw headerError(`header length ${headerLength} exceeds ${MAX_HEADER}`);
  // Parsing and checking a header costs time on the event loop in proportion to its size: refuse one
  // larger than the tensors the caller can use need before parsing it, and one listing more entries
  // than they (and a few metadata keys) make before reading any entry.
  const { maxTensors, checkName } = options;
  if (maxTensors !== undefined && headerLength > maxTensors * HEADER_BYTES_PER_TENSOR + HEADER_BYTES_METADATA) {
    throw headerError(`header of ${headerLength} bytes is larger than ${maxTensors} tensors need (at most ${maxTensors * HEADER_BYTES_PER_TENSOR + HEADER_BYTES_METADATA} bytes)`);
  }
  const header = parseHeader(buf.subarray(8, 8 + headerLength), maxTensors);
  let entries = 0;
  for (const name in header) {
    if (name === '__metadata__') continue; // its entries were counted before the header was parsed
    // Names first: with the caller's names as the bound, one tensor too many has a name it cannot use,
    // refused by that name (an extra variable of the model) rather than by the count.
    checkName?.(name);
    if (maxTensors !== undefined && ++entries > maxTensors) throw headerError(`header lists more than ${maxTensors} tensors`);
  }
  const bodyStart = 8 + headerLength;
  const bodyLength = buf.length - bodyStart;

  const metadata = new Map<string, string>();
  const infos: { name: string; dtypeName: string; shape: number[]; begin: number; end: number }[] = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (!isPlainObject(info)) throw headerError('__metadata__ must be an object of strings');
      for (const [key, value] of Object.entries(info)) {
        if (typeof value !== 'string') throw headerError(`__metadata__.${key} must be a string`);
        metadata.set(key, value);
      }
      continue;
    }
    infos.push(readInfo(name, info));
  }

  infos.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let expected = 0;
  for (const info of infos) {
    if (info.begin < expected) throw headerError(`tensor ${info.name} overlaps the tensor before it (offset ${info.begin} < ${expected})`);
    if (info.begin > expected) throw headerError(`body has a gap before tensor ${info.name} (offset ${info.begin}, expected ${expected})`);
    expected = info.end;
  }
  if (expected !== bodyLength) {
    throw headerError(expected > bodyLength ? `tensor data ends at ${expected}, past the ${bodyLength}-byte body` : `body has ${bodyLength - expected} bytes after the last tensor`);
  }

  const tensors = new Map<string, Tensor>();
  for (const info of infos) {
    // Own keys only: "constructor" or "toString" is no dtype (they were found on the object's prototype).
    const dtype = Object.hasOwn(DTYPE_OF, info.dtypeName) ? DTYPE_OF[info.dtypeName] : undefined;
    if (!dtype) throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `tensor ${info.name} has dtype ${info.dtypeName}, which is not supported`);
    if (dtype !== 'float32' && (options.dtypes ?? 'float32') === 'float32') {
      throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `tensor ${info.name} has dtype ${info.dtypeName}; only F32 is accepted here`);
    }
    checkShape(info.shape, `tensor ${info.name}`);
    const nbytes = numel(info.shape) * elementSize(dtype);
    if (nbytes !== info.end - info.begin) {
      throw new FormatError('TENSOR_SHAPE_INVALID', `tensor ${info.name} of shape [${info.shape.join(', ')}] ${info.dtypeName} needs ${nbytes} bytes, data_offsets span ${info.end - info.begin}`);
    }
    const bytes = buf.subarray(bodyStart + info.begin, bodyStart + info.end);
    tensors.set(info.name, { dtype, shape: info.shape, data: arrayFromBytes(dtype, bytes, options.copy ?? false) } as Tensor);
  }
  return { tensors, metadata };
}

/** A header is an object of objects holding short lists: nothing in one nests deeper. */
const MAX_HEADER_DEPTH = 8;

/**
 * ignoreBOM keeps a leading byte-order mark in the text, where JSON.parse refuses it, as the safetensors
 * library (serde_json) does: the header is JSON, and JSON has no BOM. One decoder for every header: a decode
 * that is not streamed keeps no state between calls.
 */
const HEADER_DECODER = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** A JSON string token (what it holds is not looked at), for taking strings out of a header's text. */
const JSON_STRING = /"(?:[^"\\]|\\.)*"/g;

/**
 * Whether the header's text may hold a number written with a fraction or an exponent (`48.0`, `4.8e1`): a
 * digit followed by `.`, `e` or `E` outside strings. Only such a header is parsed with integersOnly, whose
 * reviver sees every value (about 2 us a tensor, 5x the parse itself, on every step).
 */
const mayHoldNonInteger = (text: string): boolean => /\d[.eE]/.test(text.replace(JSON_STRING, '""'));

function parseHeader(bytes: Buffer, maxTensors?: number): Record<string, unknown> {
  let text: string;
  try {
    text = HEADER_DECODER.decode(bytes);
  } catch {
    throw headerError('header is not valid UTF-8');
  }
  // Bounded before JSON.parse builds anything (json-depth.ts): 94 MB of `[` took seconds and gigabytes.
  const deep = jsonTooDeepAt(text, MAX_HEADER_DEPTH);
  if (deep >= 0) throw headerError(`header nests deeper than ${MAX_HEADER_DEPTH} levels (at character ${deep} of the header)`);
  // JSON.parse keeps the last of a repeated key: a tensor (or __metadata__) named twice is refused, as JSON
  // bodies with a repeated key are, rather than one of them silently dropped. And a header of more entries
  // than the file may hold tensors is refused before JSON.parse builds them (1.5 million empty tensors, an
  // 89 MB header, took 11.6 s to parse before the count refused them: a hostile-input review).
  const twice = firstDuplicateKey(text, MAX_METADATA_KEYS, Infinity, maxTensors === undefined ? Infinity : maxTensors + 1);
  if (twice?.many === 'outermost') throw headerError(`header lists more than ${maxTensors} tensors`);
  if (twice?.many) throw headerError(`header __metadata__ (or a tensor's entry) has more than ${MAX_METADATA_KEYS} entries`);
  if (twice) throw headerError(`header names ${JSON.stringify(twice.key)} twice (at character ${twice.at} of the header)`);
  let header: unknown;
  try {
    header = mayHoldNonInteger(text)
      ? (JSON.parse as (text: string, reviver: (key: string, value: unknown, context?: { source?: string }) => unknown) => unknown)(text, integersOnly)
      : JSON.parse(text);
  } catch (err) {
    throw headerError(`header is not valid JSON: ${(err as Error).message}`);
  }
  if (!isPlainObject(header)) throw headerError('header must be a JSON object');
  return header;
}

/**
 * The header's numbers (shapes and data_offsets) are integers as written: `48.0` or `4.8e1` is NaN here, so
 * the checks of readInfo refuse it, as the safetensors library (serde_json into usize) does.
 */
function integersOnly(_key: string, value: unknown, context?: { source?: string }): unknown {
  return typeof value === 'number' && context?.source !== undefined && !/^-?\d+$/.test(context.source) ? NaN : value;
}

function readInfo(name: string, info: unknown): { name: string; dtypeName: string; shape: number[]; begin: number; end: number } {
  if (!isPlainObject(info)) throw headerError(`entry ${name} must be an object {dtype, shape, data_offsets}`);
  const { dtype, shape, data_offsets: offsets } = info as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
  if (typeof dtype !== 'string') throw headerError(`tensor ${name} has no dtype`);
  if (!Array.isArray(shape) || !shape.every((s) => Number.isSafeInteger(s) && s >= 0)) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `tensor ${name} shape must be a list of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isInteger(o) && o >= 0) || offsets[0] > offsets[1]) {
    throw headerError(`tensor ${name} data_offsets must be [begin, end] with 0 <= begin <= end`);
  }
  // Whole numbers in order, but beyond what JSON's numbers hold exactly (and far past any body):
  // said as such, not as the ordering they do satisfy.
  if (!offsets.every((o) => Number.isSafeInteger(o))) {
    throw headerError(`tensor ${name} data_offsets ${JSON.stringify(offsets)} point past the end of any body (beyond 2^53 bytes)`);
  }
  return { name, dtypeName: dtype, shape, begin: offsets[0], end: offsets[1] };
}

/**
 * Lays out a safetensors file: its exact length and a repeatable stream (tensor data by
 * reference, not copied). Tensors are ordered larger dtypes first, then by name, as the reference writes them.
 */
export function writeSafetensors(tensors: Iterable<readonly [string, Tensor]>, metadata?: ReadonlyMap<string, string> | Record<string, string>): ByteStream {
  const entries = [...tensors].map(([name, tensor]) => {
    if (!isTensor(tensor) || !NAME_OF[tensor.dtype]) throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `tensor ${name} cannot be written to safetensors`);
    if (name === '__metadata__') throw new FormatError('SAFETENSORS_HEADER_INVALID', 'a tensor cannot be named __metadata__');
    checkShape(tensor.shape, `tensor ${name}`);
    if (tensor.data.length !== numel(tensor.shape)) throw new FormatError('TENSOR_SHAPE_INVALID', `tensor ${name} data does not match its shape`);
    return { name, tensor, key: Buffer.from(name, 'utf8') };
  });
  entries.sort((a, b) => elementSize(b.tensor.dtype) - elementSize(a.tensor.dtype) || Buffer.compare(a.key, b.key));
  for (let i = 1; i < entries.length; i++) {
    if (entries[i].name === entries[i - 1].name) throw new FormatError('SAFETENSORS_HEADER_INVALID', `tensor ${entries[i].name} appears twice`);
  }

  const parts: string[] = [];
  const meta = metadata instanceof Map ? [...metadata] : Object.entries(metadata ?? {});
  if (meta.length > 0) {
    for (const [, value] of meta) if (typeof value !== 'string') throw new FormatError('SAFETENSORS_HEADER_INVALID', '__metadata__ values must be strings');
    parts.push(`"__metadata__":${JSON.stringify(Object.fromEntries(meta))}`);
  }
  let offset = 0;
  for (const { name, tensor } of entries) {
    const end = offset + tensor.data.byteLength;
    parts.push(`${JSON.stringify(name)}:${JSON.stringify({ dtype: NAME_OF[tensor.dtype], shape: tensor.shape, data_offsets: [offset, end] })}`);
    offset = end;
  }
  const json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const padded = Buffer.alloc(json.length + ((8 - (json.length % 8)) % 8), 0x20);
  json.copy(padded);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(padded.length));
  return {
    byteLength: 8 + padded.length + offset,
    chunks: {
      *[Symbol.iterator]() {
        yield prefix;
        yield padded;
        for (const { tensor } of entries) if (tensor.data.byteLength > 0) yield tensorBytes(tensor);
      },
    },
  };
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function headerError(message: string): FormatError {
  return new FormatError('SAFETENSORS_HEADER_INVALID', message);
}
