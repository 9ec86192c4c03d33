// The Python values a torch.save pickle can hold, as JS values:
//   int -> bigint (always, so 0 and 0.0 stay distinct), float -> number, bool -> boolean,
//   None -> null, str -> string, bytes -> Uint8Array, list -> PyValue[], tuple -> PyTuple,
//   dict -> PyDict (insertion-ordered), collections.OrderedDict -> PyDict with ordered = true,
//   torch.Tensor -> Tensor, torch.dtype / torch.device / torch.layout / complex -> InertValue.
// Values are acyclic trees (shared sub-values are allowed); the unpickler refuses cycles.

import { FormatError } from './errors.ts';
import { isTensor, type Tensor } from './tensor.ts';

/** Dict keys this model supports: Python int and str (all a state_dict uses). */
export type PyKey = bigint | string;

export type PyValue = null | boolean | bigint | number | string | Uint8Array | PyValue[] | PyTuple | PyDict | Tensor | InertValue;

/**
 * A value torch.load(weights_only=True) builds that the service reads and never uses: a torch.dtype
 * (a config's {"torch_dtype": torch.float16}), a torch.device, a torch.layout, a complex. Kept as its
 * Python type and repr, for messages; refused wherever a tensor or number belongs, and never written.
 */
export class InertValue {
  /** Python's type, e.g. `torch.dtype`. */
  readonly type: string;
  /** Python's repr, e.g. `torch.float16`. */
  readonly repr: string;

  constructor(type: string, repr: string) {
    this.type = type;
    this.repr = repr;
  }
}

/**
 * An object of a class outside the allow-list, read and not built, where the caller lets such values stand:
 * the keys of a checkpoint the service ignores (the run's `argparse.Namespace`, a numpy scalar, a scheduler
 * object). Only the class's name is kept; whatever the pickle passed to build it is counted and dropped. A
 * reader refuses one anywhere it reads values (PICKLE_GLOBAL_REFUSED, naming where it is).
 */
export class UnreadObject extends InertValue {
  constructor(qualifiedName: string) {
    super(qualifiedName, `<${qualifiedName} object>`);
  }
}

/** A Python tuple: an immutable sequence. */
export class PyTuple {
  readonly items: readonly PyValue[];

  constructor(items: readonly PyValue[]) {
    this.items = Object.freeze([...items]);
  }

  get length(): number {
    return this.items.length;
  }
}

/**
 * A Python dict (or collections.OrderedDict when `ordered`), keys in insertion order.
 * Map's key equality matches Python's for int (bigint) and str keys.
 */
export class PyDict extends Map<PyKey, PyValue> {
  /** true for collections.OrderedDict, pickled as OrderedDict() plus items. */
  ordered: boolean;
  /**
   * Instance attributes set by BUILD (OrderedDict.__dict__), e.g. the `_metadata` PyTorch attaches
   * to a module's state_dict. Written back on save. Only meaningful on an OrderedDict.
   */
  attributes?: PyDict;

  constructor(entries?: Iterable<readonly [PyKey, PyValue]> | null, options: { ordered?: boolean } = {}) {
    super();
    this.ordered = options.ordered ?? false;
    if (entries) for (const [key, value] of entries) this.set(key, value);
  }
}

export function orderedDict(entries?: Iterable<readonly [PyKey, PyValue]>): PyDict {
  return new PyDict(entries, { ordered: true });
}

export function isPyKey(value: unknown): value is PyKey {
  return typeof value === 'bigint' || typeof value === 'string';
}

/** A short description of a value's Python type, for error messages. */
export function pyTypeName(value: unknown): string {
  if (value === null) return 'None';
  if (typeof value === 'boolean') return 'bool';
  if (typeof value === 'bigint') return 'int';
  if (typeof value === 'number') return 'float';
  if (typeof value === 'string') return 'str';
  if (value instanceof Uint8Array) return 'bytes';
  if (Array.isArray(value)) return 'list';
  if (value instanceof PyTuple) return 'tuple';
  if (value instanceof PyDict) return value.ordered ? 'OrderedDict' : 'dict';
  if (isTensor(value)) return `Tensor(${value.dtype})`;
  if (value instanceof InertValue) return value.type;
  return typeof value;
}

/** Python's int(value) for a bigint within the safe integer range, else an INVALID_STATE_DICT error naming `path`. */
export function pyIntToNumber(value: PyValue, path: string): number {
  if (typeof value !== 'bigint') {
    throw new FormatError('INVALID_STATE_DICT', `${path} must be an int, got ${pyTypeName(value)}`);
  }
  if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new FormatError('INVALID_STATE_DICT', `${path} is out of range: ${value}`);
  }
  return Number(value);
}

/**
 * Where the first UnreadObject in `value` is (`path` with the keys and indices that lead to it, as
 * `.key` and `[i]`), and its class; null when there is none. Each container is looked at once, however
 * often the pickle shares it.
 */
export function findUnread(value: PyValue, path: string): { path: string; type: string } | null {
  const seen = new Set<object>();
  const walk = (v: PyValue, at: string): { path: string; type: string } | null => {
    if (v instanceof UnreadObject) return { path: at, type: v.type };
    if (typeof v !== 'object' || v === null || seen.has(v)) return null;
    if (Array.isArray(v) || v instanceof PyTuple) {
      seen.add(v);
      const items = Array.isArray(v) ? v : v.items;
      for (let i = 0; i < items.length; i++) {
        const found = walk(items[i], `${at}[${i}]`);
        if (found) return found;
      }
    } else if (v instanceof PyDict) {
      seen.add(v);
      for (const [key, item] of v) {
        const found = walk(item, typeof key === 'string' ? `${at}.${key}` : `${at}[${key}]`);
        if (found) return found;
      }
      if (v.attributes) return walk(v.attributes, `${at}.__dict__`);
    }
    return null;
  };
  return walk(value, path);
}
