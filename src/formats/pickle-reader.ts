// A safe unpickler, modelled on torch/_weights_only_unpickler.py: it runs no Python and resolves
// no names. GLOBAL and STACK_GLOBAL are looked up in an allow-list the caller passes; anything
// else is refused the moment it is named, before any REDUCE could call it. Every read is bounded
// by the input, nesting and expanded size are limited, cycles are refused, and every failure is a
// FormatError with a stable code.

import { FormatError } from './errors.ts';
import { OP, opcodeName } from './pickle-opcodes.ts';
import { PyDict, PyTuple, isPyKey, pyTypeName, type PyValue } from './pyvalue.ts';

/** Stack items that are not Python values (allowed globals, storages). They never escape `unpickle`. */
export abstract class Opaque {
  abstract describe(): string;
}

/** A stack item: a Python value or an opaque item. Tuples may hold opaque items (a REDUCE's arguments). */
export type Item = PyValue | Opaque;

/** An allowed global. `call` implements REDUCE with it; a global without `call` can only be an argument. */
export class PyGlobal extends Opaque {
  readonly qualifiedName: string;
  readonly call?: (args: readonly Item[]) => Item;

  constructor(qualifiedName: string, call?: (args: readonly Item[]) => Item) {
    super();
    this.qualifiedName = qualifiedName;
    if (call) this.call = call;
  }

  describe(): string {
    return `global ${this.qualifiedName}`;
  }
}

export interface UnpickleOptions {
  /** The allow-list: the global named module.name, or undefined to refuse it. */
  findGlobal: (module: string, name: string) => PyGlobal | undefined;
  /** BINPERSID handler; without one, persistent ids are refused. */
  persistentLoad?: (pid: PyTuple) => Item;
  /** Deepest nesting of containers and of MARKs. Default 100. */
  maxDepth?: number;
  /** Most nodes the result may have when shared sub-values are counted each time they appear. Default 10 million. */
  maxExpandedSize?: number;
}

const LONG_MAX_BYTES = 1 << 16;
const utf8 = new TextDecoder('utf-8', { fatal: true });

interface Measure {
  depth: number;
  size: number;
}
const LEAF: Measure = { depth: 0, size: 1 };

/** Unpickles `data` into a Python value. Throws only FormatError. */
export function unpickle(data: Uint8Array, options: UnpickleOptions): PyValue {
  return new Unpickler(data, options).run();
}

class Unpickler {
  private readonly buf: Buffer;
  private pos = 0;
  private stack: Item[] = [];
  private readonly metastack: Item[][] = [];
  private readonly memo = new Map<number, Item>();
  // Plain Map/Set (faster than the weak kinds); they live only as long as this unpickler.
  private readonly measures = new Map<object, Measure>();
  /** Containers already placed inside another value: mutating one could close a cycle. */
  private readonly sealed = new Set<object>();
  /** Tuples that hold opaque items, directly or in nested tuples. */
  private readonly internal = new Set<PyTuple>();
  private readonly maxDepth: number;
  private readonly maxExpandedSize: number;

  private readonly options: UnpickleOptions;

  constructor(data: Uint8Array, options: UnpickleOptions) {
    this.options = options;
    this.buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    this.maxDepth = options.maxDepth ?? 100;
    this.maxExpandedSize = options.maxExpandedSize ?? 10_000_000;
  }

  run(): PyValue {
    for (;;) {
      const code = this.u8();
      if (code === OP.STOP) return this.finish();
      this.step(code);
    }
  }

  private finish(): PyValue {
    if (this.metastack.length !== 0) throw stackError('STOP with an unclosed MARK');
    if (this.stack.length !== 1) throw stackError(`STOP with ${this.stack.length} items on the stack`);
    const result = this.stack[0];
    this.checkStorable(result, 'the result');
    return result as PyValue;
  }

  private step(code: number): void {
    switch (code) {
      case OP.PROTO: {
        const proto = this.u8();
        if (proto > 5) throw new FormatError('PICKLE_OPCODE_REFUSED', `pickle protocol ${proto} is not supported`);
        return;
      }
      case OP.FRAME:
        this.take(8); // framing is a read-ahead hint; the data follows inline
        return;
      case OP.MARK:
        if (this.metastack.length >= this.maxDepth) throw new FormatError('PICKLE_TOO_DEEP', `pickle MARKs nest deeper than ${this.maxDepth}`);
        this.metastack.push(this.stack);
        this.stack = [];
        return;
      case OP.POP:
        if (this.stack.length > 0) this.stack.pop();
        else this.popMark();
        return;
      case OP.POP_MARK:
        this.popMark();
        return;
      case OP.DUP:
        this.push(this.top());
        return;
      case OP.NONE:
        return this.push(null);
      case OP.NEWTRUE:
        return this.push(true);
      case OP.NEWFALSE:
        return this.push(false);
      case OP.BININT:
        return this.push(BigInt(this.take(4).readInt32LE(0)));
      case OP.BININT1:
        return this.push(BigInt(this.u8()));
      case OP.BININT2:
        return this.push(BigInt(this.take(2).readUInt16LE(0)));
      case OP.LONG1:
        return this.push(decodeLong(this.take(this.u8())));
      case OP.LONG4: {
        const n = this.take(4).readInt32LE(0);
        if (n < 0) throw new FormatError('PICKLE_STACK_INVALID', 'LONG4 with a negative byte count');
        if (n > LONG_MAX_BYTES) throw new FormatError('PICKLE_LIMIT_EXCEEDED', `integer of ${n} bytes exceeds the ${LONG_MAX_BYTES}-byte limit`);
        return this.push(decodeLong(this.take(n)));
      }
      case OP.BINFLOAT:
        return this.push(this.take(8).readDoubleBE(0));
      case OP.SHORT_BINUNICODE:
        return this.push(this.text(this.u8()));
      case OP.BINUNICODE:
        return this.push(this.text(this.take(4).readUInt32LE(0)));
      case OP.BINUNICODE8:
        return this.push(this.text(this.length64()));
      case OP.SHORT_BINSTRING:
        return this.push(this.text(this.u8())); // Python 2 str; torch.load decodes it as UTF-8
      case OP.BINSTRING: {
        const n = this.take(4).readInt32LE(0);
        if (n < 0) throw new FormatError('PICKLE_STACK_INVALID', 'BINSTRING with a negative length');
        return this.push(this.text(n));
      }
      case OP.SHORT_BINBYTES:
        return this.push(Uint8Array.from(this.take(this.u8())));
      case OP.BINBYTES:
        return this.push(Uint8Array.from(this.take(this.take(4).readUInt32LE(0))));
      case OP.BINBYTES8:
      case OP.BYTEARRAY8:
        return this.push(Uint8Array.from(this.take(this.length64())));
      case OP.EMPTY_TUPLE:
        return this.push(this.tuple([]));
      case OP.TUPLE1:
      case OP.TUPLE2:
      case OP.TUPLE3: {
        const n = code - OP.TUPLE1 + 1;
        if (this.stack.length < n) throw stackError(`${opcodeName(code)} needs ${n} items on the stack`);
        return this.push(this.tuple(this.stack.splice(this.stack.length - n, n)));
      }
      case OP.TUPLE:
        return this.push(this.tuple(this.popMark()));
      case OP.EMPTY_LIST:
        return this.push(this.container([]));
      case OP.LIST: {
        const items = this.popMark();
        const list = this.container([] as PyValue[]);
        this.extend(list, items);
        return this.push(list);
      }
      case OP.APPEND: {
        const item = this.pop();
        this.extend(this.top(), [item]);
        return;
      }
      case OP.APPENDS: {
        const items = this.popMark();
        this.extend(this.top(), items);
        return;
      }
      case OP.EMPTY_DICT:
        return this.push(this.container(new PyDict()));
      case OP.DICT: {
        const items = this.popMark();
        const dict = this.container(new PyDict());
        this.setItems(dict, items);
        return this.push(dict);
      }
      case OP.SETITEM: {
        const value = this.pop();
        const key = this.pop();
        this.setItems(this.top(), [key, value]);
        return;
      }
      case OP.SETITEMS: {
        const items = this.popMark();
        this.setItems(this.top(), items);
        return;
      }
      case OP.GLOBAL: {
        const module = this.line();
        const name = this.line();
        return this.push(this.global(module, name));
      }
      case OP.STACK_GLOBAL: {
        const name = this.pop();
        const module = this.pop();
        if (typeof module !== 'string' || typeof name !== 'string') throw stackError('STACK_GLOBAL needs two strings');
        return this.push(this.global(module, name));
      }
      case OP.REDUCE:
        return this.reduce();
      case OP.BUILD:
        return this.build();
      case OP.BINPERSID:
        return this.persistentLoad();
      case OP.BINPUT:
        return this.memoPut(this.u8());
      case OP.LONG_BINPUT:
        return this.memoPut(this.take(4).readUInt32LE(0));
      case OP.MEMOIZE:
        return this.memoPut(this.memo.size);
      case OP.BINGET:
        return this.memoGet(this.u8());
      case OP.LONG_BINGET:
        return this.memoGet(this.take(4).readUInt32LE(0));
      default:
        throw new FormatError('PICKLE_OPCODE_REFUSED', `pickle opcode ${opcodeName(code)} at offset ${this.pos - 1} is not supported`);
    }
  }

  // --- input -------------------------------------------------------------------------------

  private u8(): number {
    if (this.pos >= this.buf.length) throw new FormatError('PICKLE_TRUNCATED', 'pickle ends before its STOP opcode');
    return this.buf[this.pos++];
  }

  private take(n: number): Buffer {
    if (n > this.buf.length - this.pos) {
      throw new FormatError('PICKLE_TRUNCATED', `pickle ends inside a ${n}-byte argument at offset ${this.pos}`);
    }
    this.pos += n;
    return this.buf.subarray(this.pos - n, this.pos);
  }

  private length64(): number {
    const n = this.take(8).readBigUInt64LE(0);
    if (n > BigInt(this.buf.length - this.pos)) throw new FormatError('PICKLE_TRUNCATED', `pickle ends inside a ${n}-byte argument`);
    return Number(n);
  }

  private text(n: number): string {
    const bytes = this.take(n);
    if (n <= 64 && isAscii(bytes)) return bytes.toString('latin1');
    try {
      return utf8.decode(bytes);
    } catch {
      throw new FormatError('PICKLE_STRING_INVALID', `pickle string at offset ${this.pos - n} is not valid UTF-8`);
    }
  }

  private line(): string {
    const end = this.buf.indexOf(0x0a, this.pos);
    if (end < 0) throw new FormatError('PICKLE_TRUNCATED', 'pickle ends inside a GLOBAL name');
    return this.text(end - this.pos + 1).slice(0, -1);
  }

  // --- stack -------------------------------------------------------------------------------

  private push(item: Item): void {
    this.stack.push(item);
  }

  private pop(): Item {
    if (this.stack.length === 0) throw stackError('pop from an empty stack');
    return this.stack.pop() as Item;
  }

  private top(): Item {
    if (this.stack.length === 0) throw stackError('the stack is empty');
    return this.stack[this.stack.length - 1];
  }

  private popMark(): Item[] {
    const items = this.stack;
    const previous = this.metastack.pop();
    if (!previous) throw stackError('no MARK to pop to');
    this.stack = previous;
    return items;
  }

  private memoPut(index: number): void {
    this.memo.set(index, this.top());
  }

  private memoGet(index: number): void {
    const item = this.memo.get(index);
    if (item === undefined) throw new FormatError('PICKLE_MEMO_INVALID', `pickle memo has no entry ${index}`);
    this.push(item);
  }

  // --- values ------------------------------------------------------------------------------

  private measure(item: Item): Measure {
    return (typeof item === 'object' && item !== null && this.measures.get(item)) || LEAF;
  }

  private container<T extends PyValue[] | PyDict>(value: T): T {
    this.measures.set(value, { depth: 1, size: 1 });
    return value;
  }

  /** Opaque items (and tuples holding them) may only be arguments, never stored in a list, dict or result. */
  private checkStorable(item: Item, where: string): void {
    if (item instanceof Opaque) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `${item.describe()} cannot be used as a value in ${where}`);
    if (item instanceof PyTuple && this.internal.has(item)) {
      throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `a tuple holding a torch global or storage cannot be used as a value in ${where}`);
    }
  }

  /** Records that `parent` now holds `children`, keeping depth and expanded size within limits. */
  private adopt(parent: object, children: readonly Item[], start: Measure): Measure {
    let { depth, size } = start;
    for (const child of children) {
      if (child === parent) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', 'a container that contains itself (a cycle) is not supported');
      const m = this.measure(child);
      depth = Math.max(depth, m.depth + 1);
      size += m.size;
      if (typeof child === 'object' && child !== null) this.sealed.add(child);
    }
    if (depth > this.maxDepth) throw new FormatError('PICKLE_TOO_DEEP', `pickle values nest deeper than ${this.maxDepth}`);
    if (size > this.maxExpandedSize) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle value expands to more than ${this.maxExpandedSize} nodes`);
    }
    const measure = { depth, size };
    this.measures.set(parent, measure);
    return measure;
  }

  private checkMutable(target: object, op: string): void {
    if (this.sealed.has(target)) {
      throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `${op} on a container already placed in another value (a cycle) is not supported`);
    }
  }

  private tuple(items: Item[]): PyTuple {
    const tuple = new PyTuple(items as PyValue[]);
    this.adopt(tuple, items, { depth: 1, size: 1 });
    if (items.some((item) => item instanceof Opaque || (item instanceof PyTuple && this.internal.has(item)))) this.internal.add(tuple);
    return tuple;
  }

  private extend(target: Item, items: readonly Item[]): void {
    if (!Array.isArray(target)) throw stackError(`can only append to a list, not ${describe(target)}`);
    this.checkMutable(target, 'APPEND');
    for (const item of items) this.checkStorable(item, 'a list');
    this.adopt(target, items, this.measure(target));
    for (const item of items) target.push(item as PyValue);
  }

  private setItems(target: Item, items: readonly Item[]): void {
    if (!(target instanceof PyDict)) throw stackError(`can only set items on a dict, not ${describe(target)}`);
    if (items.length % 2 !== 0) throw stackError('SETITEMS with an odd number of items');
    this.checkMutable(target, 'SETITEM');
    for (let i = 0; i < items.length; i += 2) {
      const key = items[i];
      if (!isPyKey(key)) throw new FormatError('PICKLE_VALUE_UNSUPPORTED', `dict keys of type ${describe(key)} are not supported (only int and str)`);
      this.checkStorable(items[i + 1], 'a dict');
    }
    this.adopt(target, items, this.measure(target));
    for (let i = 0; i < items.length; i += 2) target.set(items[i] as string | bigint, items[i + 1] as PyValue);
  }

  private global(module: string, name: string): PyGlobal {
    const normalized = module === '__builtin__' ? 'builtins' : module; // Python 2 names, as pickle's fix_imports maps them
    const found = this.options.findGlobal(normalized, name);
    if (!found) throw new FormatError('PICKLE_GLOBAL_REFUSED', `pickle global ${module}.${name} is not allowed`);
    return found;
  }

  private reduce(): void {
    const args = this.pop();
    const callable = this.pop();
    if (!(callable instanceof PyGlobal)) throw stackError(`REDUCE of ${describe(callable)}, which is not an allowed global`);
    if (!callable.call) throw new FormatError('PICKLE_GLOBAL_REFUSED', `pickle global ${callable.qualifiedName} may not be called`);
    if (!(args instanceof PyTuple)) throw stackError(`REDUCE arguments must be a tuple, got ${describe(args)}`);
    this.push(callable.call(args.items));
  }

  /** BUILD: only an OrderedDict's attributes (its __dict__), as torch's weights_only unpickler allows. */
  private build(): void {
    const state = this.pop();
    const target = this.top();
    if (!(target instanceof PyDict) || !target.ordered) throw new FormatError('PICKLE_CALL_INVALID', `BUILD is only supported on an OrderedDict, not ${describe(target)}`);
    if (!(state instanceof PyDict)) throw new FormatError('PICKLE_CALL_INVALID', `BUILD state must be a dict, got ${describe(state)}`);
    this.checkMutable(target, 'BUILD');
    const attributes = this.container(new PyDict());
    const items: Item[] = [];
    for (const [key, value] of [...(target.attributes ?? []), ...state]) {
      if (typeof key !== 'string') throw new FormatError('PICKLE_CALL_INVALID', 'BUILD attribute names must be strings');
      items.push(key, value);
    }
    this.setItems(attributes, items);
    target.attributes = attributes;
    this.adopt(target, [attributes], this.measure(target));
  }

  private persistentLoad(): void {
    const pid = this.pop();
    if (!this.options.persistentLoad) throw new FormatError('PICKLE_OPCODE_REFUSED', 'pickle persistent ids are not supported here');
    if (!(pid instanceof PyTuple)) throw stackError(`persistent id must be a tuple, got ${describe(pid)}`);
    this.push(this.options.persistentLoad(pid));
  }
}

function isAscii(bytes: Buffer): boolean {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] > 0x7f) return false;
  return true;
}

function describe(item: Item): string {
  return item instanceof Opaque ? item.describe() : pyTypeName(item);
}

function stackError(message: string): FormatError {
  return new FormatError('PICKLE_STACK_INVALID', `invalid pickle: ${message}`);
}

/** Little-endian two's complement bytes to an int (pickle.decode_long). */
function decodeLong(bytes: Buffer): bigint {
  if (bytes.length === 0) return 0n;
  const hex = Buffer.from(bytes).reverse().toString('hex');
  const value = BigInt(`0x${hex}`);
  return bytes[bytes.length - 1] & 0x80 ? value - (1n << BigInt(8 * bytes.length)) : value;
}
