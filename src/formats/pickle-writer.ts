// A protocol-2 pickler for the Python value model, writing what CPython's pickle writes for the
// same values with torch.save's persistent ids for tensors (torch/serialization.py, _save), and
// only opcodes that torch 1.13's pickle and torch 2.x's weights_only unpickler both read.

import { FormatError } from './errors.ts';
import { OP } from './pickle-opcodes.ts';
import { PyDict, PyTuple, type PyKey, type PyValue } from './pyvalue.ts';
import { contiguousStrides, isTensor, type Tensor } from './tensor.ts';

/** What torch.save's persistent_id returns for a tensor's storage: ('storage', torch.<storageClass>, key, location, numel). */
export interface StorageId {
  /** e.g. "FloatStorage" (a name in the torch module). */
  storageClass: string;
  key: string;
  location: string;
  /** Elements in the storage. */
  numel: number;
  /** Offset of the tensor's first element in the storage, in elements. */
  offset: number;
}

export interface PickleWriteOptions {
  /** Storage for each tensor; required when the value holds tensors. */
  storageOf?: (tensor: Tensor) => StorageId;
  /** Deepest nesting accepted (guards against cyclic inputs). Default 1000. */
  maxDepth?: number;
}

const BATCH = 1000; // pickle.Pickler._BATCHSIZE
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Pickles a value with protocol 2. */
export function pickle(value: PyValue, options: PickleWriteOptions = {}): Buffer {
  const writer = new Pickler(options);
  writer.bytes(OP.PROTO, 2);
  writer.value(value, 0);
  writer.bytes(OP.STOP);
  return writer.result();
}

class Pickler {
  private buf = Buffer.allocUnsafe(256);
  private length = 0;
  private readonly memo = new Map<unknown, number>();
  /** Containers being written: meeting one again means the value is cyclic. */
  private readonly open = new Set<object>();
  private readonly maxDepth: number;

  private readonly options: PickleWriteOptions;

  constructor(options: PickleWriteOptions) {
    this.options = options;
    this.maxDepth = options.maxDepth ?? 1000;
  }

  result(): Buffer {
    return Buffer.from(this.buf.subarray(0, this.length));
  }

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(grown, 0, 0, this.length);
    this.buf = grown;
  }

  bytes(...codes: number[]): void {
    this.reserve(codes.length);
    for (const code of codes) this.buf[this.length++] = code;
  }

  private raw(data: Uint8Array): void {
    this.reserve(data.length);
    this.buf.set(data, this.length);
    this.length += data.length;
  }

  private u32(code: number, n: number): void {
    this.reserve(5);
    this.buf[this.length] = code;
    this.buf.writeUInt32LE(n, this.length + 1);
    this.length += 5;
  }

  value(value: PyValue, depth: number): void {
    if (depth > this.maxDepth) throw new FormatError('PICKLE_TOO_DEEP', `value nests deeper than ${this.maxDepth} (or is cyclic)`);
    if (value === null) return this.bytes(OP.NONE);
    switch (typeof value) {
      case 'boolean':
        return this.bytes(value ? OP.NEWTRUE : OP.NEWFALSE);
      case 'bigint':
        return this.int(value);
      case 'number':
        return this.float(value);
      case 'string':
        return this.str(value);
      case 'object':
        break;
      default:
        throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `cannot pickle a JS ${typeof value}`);
    }
    if (this.open.has(value)) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', 'cannot pickle a cyclic value');
    const memoized = this.memo.get(value);
    if (memoized !== undefined) return this.get(memoized);
    if (Array.isArray(value) || value instanceof PyTuple || value instanceof PyDict) {
      this.open.add(value);
      if (Array.isArray(value)) this.list(value, depth);
      else if (value instanceof PyTuple) this.tuple(value, depth);
      else this.dict(value, depth);
      this.open.delete(value);
      return;
    }
    if (isTensor(value)) return this.tensor(value);
    if (value instanceof Uint8Array) return this.pyBytes(value);
    throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `cannot pickle a ${(value as object).constructor?.name ?? 'object'}`);
  }

  private put(key: unknown): void {
    const index = this.memo.size;
    this.memo.set(key, index);
    if (index < 256) this.bytes(OP.BINPUT, index);
    else this.u32(OP.LONG_BINPUT, index);
  }

  private get(index: number): void {
    if (index < 256) this.bytes(OP.BINGET, index);
    else this.u32(OP.LONG_BINGET, index);
  }

  private int(value: bigint): void {
    if (value >= 0n && value <= 0xffn) return this.bytes(OP.BININT1, Number(value));
    if (value >= 0n && value <= 0xffffn) return this.bytes(OP.BININT2, Number(value) & 0xff, Number(value) >> 8);
    if (value >= -(2n ** 31n) && value < 2n ** 31n) {
      this.reserve(5);
      this.buf[this.length] = OP.BININT;
      this.buf.writeInt32LE(Number(value), this.length + 1);
      this.length += 5;
      return;
    }
    const encoded = encodeLong(value);
    if (encoded.length < 256) this.bytes(OP.LONG1, encoded.length);
    else this.u32(OP.LONG4, encoded.length);
    this.raw(encoded);
  }

  private float(value: number): void {
    this.reserve(9);
    this.buf[this.length] = OP.BINFLOAT;
    this.buf.writeDoubleBE(value, this.length + 1);
    this.length += 9;
  }

  private str(value: string): void {
    if (LONE_SURROGATE.test(value)) throw new FormatError('PICKLE_STRING_INVALID', 'cannot pickle a string with unpaired surrogates');
    const encoded = Buffer.from(value, 'utf8');
    this.u32(OP.BINUNICODE, encoded.length);
    this.raw(encoded);
  }

  /** A global, memoized so later uses are a BINGET (as CPython's pickler does). */
  private global(module: string, name: string): void {
    const key = `global:${module}.${name}`;
    const memoized = this.memo.get(key);
    if (memoized !== undefined) return this.get(memoized);
    this.bytes(OP.GLOBAL);
    this.raw(Buffer.from(`${module}\n${name}\n`, 'utf8'));
    this.put(key);
  }

  private list(value: PyValue[], depth: number): void {
    this.bytes(OP.EMPTY_LIST);
    this.put(value);
    for (let start = 0; start < value.length; start += BATCH) {
      const batch = value.slice(start, start + BATCH);
      if (batch.length > 1) this.bytes(OP.MARK);
      for (const item of batch) this.value(item, depth + 1);
      this.bytes(batch.length > 1 ? OP.APPENDS : OP.APPEND);
    }
  }

  private tuple(value: PyTuple, depth: number): void {
    const { items } = value;
    if (items.length === 0) return this.bytes(OP.EMPTY_TUPLE);
    if (items.length > 3) this.bytes(OP.MARK);
    for (const item of items) this.value(item, depth + 1);
    this.bytes(items.length > 3 ? OP.TUPLE : OP.TUPLE1 + items.length - 1);
    this.put(value);
  }

  private dict(value: PyDict, depth: number): void {
    if (value.ordered) {
      this.global('collections', 'OrderedDict');
      this.bytes(OP.EMPTY_TUPLE, OP.REDUCE);
    } else {
      this.bytes(OP.EMPTY_DICT);
    }
    this.put(value);
    this.items([...value], depth);
    if (value.attributes && value.attributes.size > 0) {
      if (!value.ordered) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', 'only an OrderedDict can carry attributes');
      this.value(value.attributes, depth + 1);
      this.bytes(OP.BUILD);
    }
  }

  private items(entries: [PyKey, PyValue][], depth: number): void {
    for (let start = 0; start < entries.length; start += BATCH) {
      const batch = entries.slice(start, start + BATCH);
      if (batch.length > 1) this.bytes(OP.MARK);
      for (const [key, item] of batch) {
        if (typeof key !== 'bigint' && typeof key !== 'string') throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `dict keys must be int (bigint) or str, got ${typeof key}`);
        this.value(key, depth + 1);
        this.value(item, depth + 1);
      }
      this.bytes(batch.length > 1 ? OP.SETITEMS : OP.SETITEM);
    }
  }

  /** bytes, as protocol 2 spells them: _codecs.encode(latin-1 text, 'latin1'). */
  private pyBytes(value: Uint8Array): void {
    this.global('_codecs', 'encode');
    this.str(Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('latin1'));
    this.str('latin1');
    this.bytes(OP.TUPLE2, OP.REDUCE);
    this.put(value);
  }

  /** torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict()). */
  private tensor(tensor: Tensor): void {
    if (!this.options.storageOf) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', 'tensors can only be pickled inside a torch.save archive');
    const storage = this.options.storageOf(tensor);
    this.global('torch._utils', '_rebuild_tensor_v2');
    this.bytes(OP.MARK, OP.MARK);
    this.str('storage');
    this.global('torch', storage.storageClass);
    this.str(storage.key);
    this.str(storage.location);
    this.int(BigInt(storage.numel));
    this.bytes(OP.TUPLE, OP.BINPERSID);
    this.int(BigInt(storage.offset));
    this.tuple(new PyTuple(tensor.shape.map((size) => BigInt(size))), 0);
    this.tuple(new PyTuple(contiguousStrides(tensor.shape).map((stride) => BigInt(stride))), 0);
    this.bytes(tensor.requiresGrad ? OP.NEWTRUE : OP.NEWFALSE);
    this.global('collections', 'OrderedDict');
    this.bytes(OP.EMPTY_TUPLE, OP.REDUCE, OP.TUPLE, OP.REDUCE);
    this.put(tensor);
  }
}

/** Minimal little-endian two's complement bytes of an int (pickle.encode_long). */
export function encodeLong(value: bigint): Buffer {
  if (value === 0n) return Buffer.alloc(0);
  const bits = (value < 0n ? -value - 1n : value).toString(2).length;
  const nbytes = (bits >> 3) + 1; // room for the sign bit
  const out = Buffer.alloc(nbytes);
  let rest = BigInt.asUintN(nbytes * 8, value);
  for (let i = 0; i < nbytes; i++) {
    out[i] = Number(rest & 0xffn);
    rest >>= 8n;
  }
  return out;
}
