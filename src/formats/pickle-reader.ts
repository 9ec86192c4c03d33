// A safe unpickler, modelled on torch/_weights_only_unpickler.py: it runs no Python and resolves
// no names. GLOBAL and STACK_GLOBAL are looked up in an allow-list the caller passes; anything
// else is refused the moment it is named, before any REDUCE could call it. Every read is bounded
// by the input, nesting and expanded size are limited, cycles are refused, and every failure is a
// FormatError with a stable code.

import { FormatError } from './errors.ts';
import { OP, opcodeName } from './pickle-opcodes.ts';
import { InertValue, PyDict, PyTuple, UnreadObject, isPyKey, pyTypeName, type PyValue } from './pyvalue.ts';

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
  /**
   * The allow-list: the global named module.name, or undefined to refuse it. A global that is itself a value
   * (torch.float16, a torch.dtype) is an InertValue, which may be stored where any value may.
   */
  findGlobal: (module: string, name: string) => PyGlobal | InertValue | undefined;
  /**
   * A global outside the allow-list: refused when named (the default), or, 'unread', an UnreadObject that
   * REDUCE, NEWOBJ, BUILD, APPENDS and SETITEMS take as a class or an object to build, making another
   * UnreadObject and dropping what they were given (counted against the call budgets). Nothing is built or
   * called either way; the caller refuses UnreadObjects where it reads values.
   */
  unknownGlobals?: 'refuse' | 'unread';
  /** BINPERSID handler; without one, persistent ids are refused. */
  persistentLoad?: (pid: PyTuple) => Item;
  /** Deepest nesting of containers and of MARKs. Default 100. */
  maxDepth?: number;
  /** Most nodes the result may have when shared sub-values are counted each time they appear. Default 10 million. */
  maxExpandedSize?: number;
  /**
   * Most items the whole pickle may push onto its stacks (every push counts: new values, DUP, memo gets, REDUCE
   * results) plus the memo entries it stores. Default MAX_PICKLE_ITEMS.
   */
  maxItems?: number;
  /**
   * Most new values the pickle may create: ints beyond BININT1, floats, str, non-empty bytes, tuples, lists, dicts,
   * and what REDUCE, BUILD and BINPERSID make. Default MAX_PICKLE_OBJECTS.
   */
  maxObjects?: number;
  /** Most items the stack and the stacks its MARKs set aside may hold together at any time. Default MAX_PICKLE_STACK_ITEMS. */
  maxStackItems?: number;
  /** Most bytes the str, bytes and long int values the pickle creates may hold together (their encoded lengths). Default MAX_PICKLE_TEXT_BYTES. */
  maxTextBytes?: number;
}

/**
 * Items (pushes plus memo entries) of one pickle: 2**25. torch.save of a checkpoint of a session's largest size
 * (100,000 parameters; each a model tensor plus ASGD's step, eta, mu and ax) pushes 9.7 million items and stores
 * 3.1 million memo entries (12.8 million, PyTorch 1.13, 1-dimensional tensors; about 14 million with 4-dimensional
 * ones): a 2.6x margin. Every count and collection stays far below V8's limits (2**24 entries for a Map).
 */
export const MAX_PICKLE_ITEMS = 2 ** 25;
/**
 * New values of one pickle: 2**23 (8,388,608). The same checkpoint of 100,000 parameters creates 4.9 million
 * (tuples, tensors, OrderedDicts, storages, names, ints): a 1.7x margin, whatever the tensors' dimensions. Lists,
 * dicts and tuples cost 50-200 bytes each, so this bounds the memory a pickle of cheap opcodes (`}` is one byte) can
 * take far below what MAX_PICKLE_ITEMS alone would.
 */
export const MAX_PICKLE_OBJECTS = 2 ** 23;
/**
 * Items on the stacks at once: 2**20. CPython's pickler (and this service's writer) appends and sets items in
 * batches of 1000, so a state_dict keeps a few thousand items there; a writer that does not batch keeps two per
 * entry of its largest dict (200,000 for a dict of 100,000 tensors, 2.6x below this). A hostile pickle piles millions of new
 * objects there instead.
 */
export const MAX_PICKLE_STACK_ITEMS = 2 ** 19;
/**
 * Bytes of str and bytes values of one pickle: 128 MiB. A checkpoint of 100,000 parameters names each once
 * (parameter names of at most 256 characters: 25.6 MB in ASCII, 102 MB if every character took 4 bytes) and
 * adds a few bytes of storage key per tensor.
 */
export const MAX_PICKLE_TEXT_BYTES = 128 * 2 ** 20;

const LONG_MAX_BYTES = 1 << 16;
const utf8 = new TextDecoder('utf-8', { fatal: true });

interface Measure {
  depth: number;
  size: number;
}
const LEAF: Measure = { depth: 0, size: 1 };
const EMPTY_CONTAINER: Measure = { depth: 1, size: 1 };
/** BININT1's values, made once: bigints are immutable, so a pickle of a million small ints allocates none. */
const SMALL_INTS: readonly bigint[] = Array.from({ length: 256 }, (_, i) => BigInt(i));
const EMPTY_BYTES = new Uint8Array(0);

/** Entries split over Maps of at most 2**22 each: a pickle may create more objects than one Map can hold (2**24). */
class ObjectMap<V> {
  private static readonly SHARD = 2 ** 22;
  private readonly shards: Map<object, V>[] = [new Map()];

  get(key: object): V | undefined {
    for (const shard of this.shards) {
      const value = shard.get(key);
      if (value !== undefined) return value;
    }
    return undefined;
  }

  has(key: object): boolean {
    return this.get(key) !== undefined;
  }

  set(key: object, value: V): void {
    for (const shard of this.shards) {
      if (shard.has(key)) {
        shard.set(key, value);
        return;
      }
    }
    let last = this.shards[this.shards.length - 1];
    if (last.size >= ObjectMap.SHARD) this.shards.push((last = new Map()));
    last.set(key, value);
  }
}

/**
 * The memo, by index (any uint32): indices 0, 1, 2, ... as pickle's MEMOIZE and Python's pickler give them
 * in a plain array, any other in Maps of at most 2**16 entries each (no Map key is below the array's
 * length). A Map entry costs ten times an array slot: 33 million MEMOIZE of one byte each (a 33 MB file)
 * took 9-46 s and 1 GB in Maps (found by a hostile-input review).
 */
class Memo {
  private readonly dense: Item[] = [];
  private readonly pages = new Map<number, Map<number, Item>>();
  size = 0;

  get(index: number): Item | undefined {
    return index < this.dense.length ? this.dense[index] : this.pages.get(index >>> 16)?.get(index & 0xffff);
  }

  set(index: number, item: Item): void {
    if (index < this.dense.length) {
      this.dense[index] = item;
      return;
    }
    if (index === this.dense.length) {
      const had = this.pages.get(index >>> 16)?.delete(index & 0xffff) ?? false;
      this.dense.push(item);
      if (!had) this.size++;
      return;
    }
    let page = this.pages.get(index >>> 16);
    if (!page) this.pages.set(index >>> 16, (page = new Map()));
    const before = page.size;
    page.set(index & 0xffff, item);
    this.size += page.size - before;
  }
}

/** Unpickles `data` into a Python value. Throws only FormatError. */
export function unpickle(data: Uint8Array, options: UnpickleOptions): PyValue {
  return new Unpickler(data, options).run();
}

class Unpickler {
  private readonly buf: Buffer;
  private pos = 0;
  private stack: Item[] = [];
  private readonly metastack: Item[][] = [];
  /** Items in the stacks of `metastack`. */
  private metastackItems = 0;
  private readonly memo = new Memo();
  // Plain Maps/Sets (faster than the weak kinds), split so none nears V8's size limit; they live only as long as this unpickler.
  /** Depth and expanded size of containers and tuples; a container without an entry is an empty one. */
  private readonly measures = new ObjectMap<Measure>();
  /** Lists and dicts already placed inside another value: mutating one could close a cycle. */
  private readonly sealed = new ObjectMap<true>();
  /** Tuples that hold opaque items, directly or in nested tuples. */
  private readonly internal = new ObjectMap<true>();
  private readonly maxDepth: number;
  private readonly maxExpandedSize: number;
  private readonly maxStackItems: number;
  /** Items (pushes and memo entries) and text bytes this pickle may still create. */
  private itemsLeft: number;
  private objectsLeft: number;
  private textBytesLeft: number;
  /** What the pickle's calls may still take in arguments (callArguments): bytes of text and ints, nodes. */
  private callTextLeft: number;
  private callNodesLeft: number;
  private readonly maxItems: number;
  private readonly maxObjects: number;
  private readonly maxTextBytes: number;

  private readonly options: UnpickleOptions;

  constructor(data: Uint8Array, options: UnpickleOptions) {
    this.options = options;
    this.buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    this.maxDepth = options.maxDepth ?? 100;
    this.maxExpandedSize = options.maxExpandedSize ?? 10_000_000;
    this.maxItems = this.itemsLeft = options.maxItems ?? MAX_PICKLE_ITEMS;
    this.maxObjects = this.objectsLeft = options.maxObjects ?? MAX_PICKLE_OBJECTS;
    this.maxStackItems = options.maxStackItems ?? MAX_PICKLE_STACK_ITEMS;
    this.maxTextBytes = this.textBytesLeft = options.maxTextBytes ?? MAX_PICKLE_TEXT_BYTES;
    this.callTextLeft = this.maxTextBytes;
    this.callNodesLeft = this.maxExpandedSize;
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
        this.metastackItems += this.stack.length;
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
        return this.pushNew(BigInt(this.take(4).readInt32LE(0)));
      case OP.BININT1:
        return this.push(SMALL_INTS[this.u8()]);
      case OP.BININT2:
        return this.pushNew(BigInt(this.take(2).readUInt16LE(0)));
      case OP.LONG1: {
        const bytes = this.take(this.u8());
        this.countText(bytes.length);
        return this.pushNew(decodeLong(bytes));
      }
      case OP.LONG4: {
        const n = this.take(4).readInt32LE(0);
        if (n < 0) throw new FormatError('PICKLE_STACK_INVALID', 'LONG4 with a negative byte count');
        if (n > LONG_MAX_BYTES) throw new FormatError('PICKLE_LIMIT_EXCEEDED', `integer of ${n} bytes exceeds the ${LONG_MAX_BYTES}-byte limit`);
        const bytes = this.take(n);
        this.countText(n);
        return this.pushNew(decodeLong(bytes));
      }
      case OP.BINFLOAT:
        return this.pushNew(this.take(8).readDoubleBE(0));
      case OP.SHORT_BINUNICODE:
        return this.pushNew(this.text(this.u8()));
      case OP.BINUNICODE:
        return this.pushNew(this.text(this.take(4).readUInt32LE(0)));
      case OP.BINUNICODE8:
        return this.pushNew(this.text(this.length64()));
      case OP.SHORT_BINSTRING:
        return this.pushNew(this.text(this.u8())); // Python 2 str; torch.load decodes it as UTF-8
      case OP.BINSTRING: {
        const n = this.take(4).readInt32LE(0);
        if (n < 0) throw new FormatError('PICKLE_STACK_INVALID', 'BINSTRING with a negative length');
        return this.pushNew(this.text(n));
      }
      case OP.SHORT_BINBYTES:
        return this.push(this.bytes(this.u8()));
      case OP.BINBYTES:
        return this.push(this.bytes(this.take(4).readUInt32LE(0)));
      case OP.BINBYTES8:
      case OP.BYTEARRAY8:
        return this.push(this.bytes(this.length64()));
      case OP.EMPTY_TUPLE:
        return this.pushNew(this.tuple([]));
      case OP.TUPLE1:
      case OP.TUPLE2:
      case OP.TUPLE3: {
        const n = code - OP.TUPLE1 + 1;
        if (this.stack.length < n) throw stackError(`${opcodeName(code)} needs ${n} items on the stack`);
        return this.pushNew(this.tuple(this.stack.splice(this.stack.length - n, n)));
      }
      case OP.TUPLE:
        return this.pushNew(this.tuple(this.popMark()));
      case OP.EMPTY_LIST:
        return this.pushNew(this.container([]));
      case OP.LIST: {
        const items = this.popMark();
        const list = this.container([] as PyValue[]);
        this.extend(list, items);
        return this.pushNew(list);
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
        return this.pushNew(this.container(new PyDict()));
      case OP.DICT: {
        const items = this.popMark();
        const dict = this.container(new PyDict());
        this.setItems(dict, items);
        return this.pushNew(dict);
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
      case OP.NEWOBJ:
      case OP.NEWOBJ_EX:
        return this.newObject(code);
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

  /** Counts `n` bytes of a str, bytes or LONG int value against the pickle's limit, before they are decoded. */
  private countText(n: number): void {
    this.textBytesLeft -= n;
    if (this.textBytesLeft < 0) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle strings, bytes and long ints exceed ${this.maxTextBytes} bytes in total`);
    }
  }

  /** A bytes value; every empty one is the same (immutable, as in Python) and costs nothing. */
  private bytes(n: number): Uint8Array {
    const bytes = this.take(n);
    if (n === 0) return EMPTY_BYTES;
    this.countText(n);
    this.countObject();
    return Uint8Array.from(bytes);
  }

  private text(n: number): string {
    const bytes = this.take(n);
    this.countText(n);
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
    this.countItem();
    if (this.stack.length + this.metastackItems >= this.maxStackItems) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle stacks hold more than ${this.maxStackItems} items`);
    }
    this.stack.push(item);
  }

  /** Pushes a value the pickle just created, counting it against the limit of new values. */
  private pushNew(item: Item): void {
    this.countObject();
    this.push(item);
  }

  private countObject(): void {
    if (--this.objectsLeft < 0) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle creates more than ${this.maxObjects} values`);
    }
  }

  /** Counts one push or memo entry against the pickle's limit. */
  private countItem(): void {
    if (--this.itemsLeft < 0) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle pushes and memoizes more than ${this.maxItems} items`);
    }
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
    this.metastackItems -= previous.length;
    this.stack = previous;
    return items;
  }

  private memoPut(index: number): void {
    const item = this.top();
    this.countItem();
    this.memo.set(index, item);
  }

  private memoGet(index: number): void {
    const item = this.memo.get(index);
    if (item === undefined) throw new FormatError('PICKLE_MEMO_INVALID', `pickle memo has no entry ${index}`);
    this.push(item);
  }

  // --- values ------------------------------------------------------------------------------

  private measure(item: Item): Measure {
    if (typeof item !== 'object' || item === null) return LEAF;
    return this.measures.get(item) ?? (Array.isArray(item) || item instanceof PyDict || item instanceof PyTuple ? EMPTY_CONTAINER : LEAF);
  }

  /** A new list or dict; its measure is EMPTY_CONTAINER until it holds something. */
  private container<T extends PyValue[] | PyDict>(value: T): T {
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
      if (Array.isArray(child) || child instanceof PyDict) this.sealed.set(child, true);
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
    if (items.length === 0) return tuple; // measured as EMPTY_CONTAINER
    this.adopt(tuple, items, { depth: 1, size: 1 });
    if (items.some((item) => item instanceof Opaque || (item instanceof PyTuple && this.internal.has(item)))) this.internal.set(tuple, true);
    return tuple;
  }

  private extend(target: Item, items: readonly Item[]): void {
    if (target instanceof UnreadObject) return this.chargeCall(items); // a list subclass's items
    if (!Array.isArray(target)) throw stackError(`can only append to a list, not ${describe(target)}`);
    this.checkMutable(target, 'APPEND');
    for (const item of items) this.checkStorable(item, 'a list');
    this.adopt(target, items, this.measure(target));
    for (const item of items) target.push(item as PyValue);
  }

  private setItems(target: Item, items: readonly Item[]): void {
    if (target instanceof UnreadObject) return this.chargeCall(items); // a dict subclass's items (a defaultdict)
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

  private global(module: string, name: string): PyGlobal | InertValue {
    const normalized = module === '__builtin__' ? 'builtins' : module; // Python 2 names, as pickle's fix_imports maps them
    const found = this.options.findGlobal(normalized, name);
    if (found) return found;
    // Named in messages at most 200 characters long (a review: a 20 MB class name came back in a 20 MB answer).
    const qualified = `${module}.${name}`; // as the file names it
    const shown = qualified.length > 200 ? `${qualified.slice(0, 200)}… (${qualified.length} characters)` : qualified;
    if (this.options.unknownGlobals === 'unread') {
      this.countObject();
      return new UnreadObject(shown);
    }
    throw new FormatError('PICKLE_GLOBAL_REFUSED', `pickle global ${shown} is not allowed`);
  }

  /** NEWOBJ (cls, args) and NEWOBJ_EX (cls, args, kwargs): only of an UnreadObject class, as an UnreadObject. */
  private newObject(code: number): void {
    const kwargs = code === OP.NEWOBJ_EX ? this.pop() : null;
    const args = this.pop();
    const cls = this.pop();
    if (!(cls instanceof UnreadObject)) {
      throw new FormatError('PICKLE_OPCODE_REFUSED', `pickle opcode ${opcodeName(code)} at offset ${this.pos - 1} is not supported`);
    }
    if (!(args instanceof PyTuple)) throw stackError(`${opcodeName(code)} arguments must be a tuple, got ${describe(args)}`);
    this.chargeCall(kwargs === null ? args.items : [...args.items, kwargs]);
    this.pushNew(new UnreadObject(cls.type));
  }

  private reduce(): void {
    const args = this.pop();
    const callable = this.pop();
    if (callable instanceof UnreadObject) {
      if (!(args instanceof PyTuple)) throw stackError(`REDUCE arguments must be a tuple, got ${describe(args)}`);
      this.chargeCall(args.items);
      return this.pushNew(new UnreadObject(callable.type));
    }
    if (!(callable instanceof PyGlobal)) throw stackError(`REDUCE of ${describe(callable)}, which is not an allowed global`);
    if (!callable.call) throw new FormatError('PICKLE_GLOBAL_REFUSED', `pickle global ${callable.qualifiedName} may not be called`);
    if (!(args instanceof PyTuple)) throw stackError(`REDUCE arguments must be a tuple, got ${describe(args)}`);
    this.chargeCall(args.items);
    this.pushNew(callable.call(args.items));
  }

  /**
   * A call's arguments, charged against budgets of their own, as large as the pickle's text and expanded
   * size: a value is read once but can be passed from the memo to call after call, each of which works on it
   * (a 10 MB string to _codecs.encode, a 100,000-int list to torch.Size, a 64 KB int to torch.device), which
   * no other limit counted (a review: a 25 MB file ran the process out of heap, a 0.4 MB one held it for
   * minutes). A file torch writes passes each value to one call.
   */
  private chargeCall(items: readonly Item[]): void {
    let text = 0;
    let nodes = 0;
    for (const item of items) {
      if (typeof item === 'string') text += item.length;
      else if (typeof item === 'bigint') text += Math.ceil((item < 0n ? -item : item).toString(16).length / 2);
      else if (item instanceof Uint8Array) text += item.length;
      else nodes += this.measure(item).size;
    }
    this.callTextLeft -= text;
    this.callNodesLeft -= nodes;
    if (this.callTextLeft < 0 || this.callNodesLeft < 0) {
      throw new FormatError('PICKLE_LIMIT_EXCEEDED', `pickle calls take more than ${this.maxTextBytes} bytes or ${this.maxExpandedSize} nodes in arguments in all`);
    }
  }

  /** BUILD: only an OrderedDict's attributes (its __dict__), as torch's weights_only unpickler allows. */
  private build(): void {
    const state = this.pop();
    const target = this.top();
    if (target instanceof UnreadObject) return this.chargeCall([state]);
    if (!(target instanceof PyDict) || !target.ordered) throw new FormatError('PICKLE_CALL_INVALID', `BUILD is only supported on an OrderedDict, not ${describe(target)}`);
    if (!(state instanceof PyDict)) throw new FormatError('PICKLE_CALL_INVALID', `BUILD state must be a dict, got ${describe(state)}`);
    this.checkMutable(target, 'BUILD');
    this.countObject();
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
    this.pushNew(this.options.persistentLoad(pid));
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
