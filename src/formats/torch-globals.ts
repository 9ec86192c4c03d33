// The allow-list for torch.save pickles: as narrow as torch/_weights_only_unpickler.py, and every
// entry implemented here in JS (nothing is ever looked up by name and run).
//   torch._utils._rebuild_tensor_v2 / _rebuild_tensor      dense CPU tensors
//   torch._utils._rebuild_parameter(_with_state)           nn.Parameter, read as its tensor
//   torch.<X>Storage                                        storage classes (dtype markers)
//   collections.OrderedDict                                 OrderedDict()
//   torch.Size                                              a tuple of ints
//   _codecs.encode, builtins.bytes                          how protocol 2 spells bytes
//   torch.<dtype>, torch.device, torch.serialization._get_layout, builtins.complex
//                                                           values a checkpoint's other keys may hold
//                                                           (a config's torch_dtype), read as InertValues

import { FormatError } from './errors.ts';
import { Opaque, PyGlobal, type Item } from './pickle-reader.ts';
import { findUnread, InertValue, PyDict, PyTuple, pyTypeName, type PyValue } from './pyvalue.ts';
import { checkShape, contiguousStrides, elementSize, isTensor, numel, type DType, type Tensor, type TypedArray } from './tensor.ts';

/** torch.<name> storage class for each dtype (torch/storage.py, pickle_storage_type). */
export const STORAGE_CLASS: Record<DType, string> = {
  float32: 'FloatStorage',
  float64: 'DoubleStorage',
  float16: 'HalfStorage',
  bfloat16: 'BFloat16Storage',
  int64: 'LongStorage',
  int32: 'IntStorage',
  int16: 'ShortStorage',
  int8: 'CharStorage',
  uint8: 'ByteStorage',
  bool: 'BoolStorage',
};

const DTYPE_OF_STORAGE = new Map<string, DType>(Object.entries(STORAGE_CLASS).map(([dtype, cls]) => [cls, dtype as DType]));

/** Storage classes PyTorch has whose dtypes this service refuses, with the dtype they hold. */
const UNSUPPORTED_STORAGE: Record<string, string> = {
  ComplexFloatStorage: 'complex64',
  ComplexDoubleStorage: 'complex128',
  QInt8Storage: 'qint8',
  QUInt8Storage: 'quint8',
  QInt32Storage: 'qint32',
  QUInt4x2Storage: 'quint4x2',
  QUInt2x4Storage: 'quint2x4',
  UntypedStorage: 'untyped bytes',
};

/** A storage class named in a pickle: marks the dtype of the storage in a persistent id. */
export class StorageClass extends PyGlobal {
  readonly dtype: DType;

  constructor(dtype: DType) {
    super(`torch.${STORAGE_CLASS[dtype]}`);
    this.dtype = dtype;
  }
}

/**
 * A storage loaded through a persistent id: its elements, in its dtype. A storage whose record is missing or
 * of another size is `refused`: the tensors made from it are refused by their place in the file.
 */
export class Storage extends Opaque {
  readonly key: string;
  readonly dtype: DType;
  readonly data: TypedArray;
  readonly refused: FormatError | null;

  constructor(key: string, dtype: DType, data: TypedArray, refused: FormatError | null = null) {
    super();
    this.key = key;
    this.dtype = dtype;
    this.data = data;
    this.refused = refused;
  }

  describe(): string {
    return `storage ${this.key}`;
  }
}

/**
 * The torch.dtype names torch 2.13's weights_only unpickler allows (torch/_weights_only_unpickler.py,
 * _get_allowed_globals: str(t) of every dtype it lists), each with its value. torch 1.13 and 2.x pickle a
 * dtype as GLOBAL torch.<name>; the service never uses one, so each is a value of its own (an InertValue).
 */
const TORCH_DTYPES = new Map([
  'float32', 'float64', 'float16', 'bfloat16', 'complex32', 'complex64', 'complex128', 'bool',
  'uint8', 'int8', 'int16', 'int32', 'int64', 'uint16', 'uint32', 'uint64',
  'uint1', 'uint2', 'uint3', 'uint4', 'uint5', 'uint6', 'uint7', 'int1', 'int2', 'int3', 'int4', 'int5', 'int6', 'int7',
  'qint8', 'quint8', 'qint32', 'quint4x2', 'quint2x4', 'bits1x8', 'bits2x4', 'bits4x2', 'bits8', 'bits16',
  'float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz', 'float8_e8m0fnu', 'float4_e2m1fn_x2',
].map((name) => [name, Object.freeze(new InertValue('torch.dtype', `torch.${name}`))]));

/** The layouts torch.serialization._get_layout knows (str of every torch.layout in torch's namespace, 2.13). */
const TORCH_LAYOUTS = new Set(['torch.strided', 'torch.sparse_coo', 'torch.sparse_csr', 'torch.sparse_csc', 'torch.sparse_bsr', 'torch.sparse_bsc', 'torch._mkldnn', 'torch.jagged']);

/** The allow-list, as UnpickleOptions.findGlobal. */
export function findTorchGlobal(module: string, name: string): PyGlobal | InertValue | undefined {
  if (module === 'torch') {
    const dtype = DTYPE_OF_STORAGE.get(name);
    if (dtype) return new StorageClass(dtype);
    // One value for each dtype, shared: a GLOBAL (counted as an item, not a new value) allocates nothing.
    const dtypeValue = TORCH_DTYPES.get(name);
    if (dtypeValue) return dtypeValue;
    if (Object.hasOwn(UNSUPPORTED_STORAGE, name)) { // not `in`: torch.constructor is no storage (a review)
      throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `torch.${name} holds ${UNSUPPORTED_STORAGE[name]} tensors, which are not supported`);
    }
  }
  // torch 2.x pickles tensors of its newer dtypes (uint16, uint32, uint64, the float8 types) with this
  // rebuild, named before the dtype: the file holds a tensor of a dtype the service does not read.
  if (module === 'torch._utils' && name === '_rebuild_tensor_v3') {
    throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', 'the file holds a tensor of a dtype torch saves with _rebuild_tensor_v3 (uint16, uint32, uint64 or a float8 type), which is not supported: '
      + 'parameters and gradients are float32 (float16 and bfloat16 are widened exactly)');
  }
  return GLOBALS.get(`${module}.${name}`);
}

const GLOBALS = new Map<string, PyGlobal>(
  [
    new PyGlobal('torch._utils._rebuild_tensor_v2', (args) => {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      arity('_rebuild_tensor_v2', args, 6, 7);
      const tensor = rebuildTensor(args[0], args[1], args[2], args[3]);
      if (typeof args[4] !== 'boolean') throw callError(`_rebuild_tensor_v2 requires_grad must be a bool, got ${describeItem(args[4])}`);
      if (args[4]) tensor.requiresGrad = true;
      checkEmptyHooks('_rebuild_tensor_v2', args[5]);
      if (args.length === 7 && args[6] !== null && !(args[6] instanceof PyDict && args[6].size === 0)) {
        throw callError('_rebuild_tensor_v2 tensor metadata is not supported');
      }
      return tensor;
    }),
    new PyGlobal('torch._utils._rebuild_tensor', (args) => {
      arity('_rebuild_tensor', args, 4, 4);
      return rebuildTensor(args[0], args[1], args[2], args[3]);
    }),
    new PyGlobal('torch._utils._rebuild_parameter', (args) => {
      // (data, requires_grad, backward_hooks): an nn.Parameter, read as its tensor
      arity('_rebuild_parameter', args, 3, 3);
      return rebuildParameter(args[0], args[1], args[2]);
    }),
    new PyGlobal('torch._utils._rebuild_parameter_with_state', (args) => {
      // (data, requires_grad, backward_hooks, state): torch 2.x pickles a Parameter carrying Python attributes
      // (Mamba's A_log._no_weight_decay, Megatron's tensor_model_parallel) so, its __dict__ in the state, or
      // (__dict__, slots) (torch/_utils.py, _set_obj_state). The attributes are no optimizer state: left out.
      // They were read by this unpickler like any value, so a global weights_only refuses is refused there too.
      arity('_rebuild_parameter_with_state', args, 4, 4);
      checkParameterState(args[3]);
      return rebuildParameter(args[0], args[1], args[2]);
    }),
    new PyGlobal('collections.OrderedDict', (args) => {
      arity('OrderedDict', args, 0, 0);
      return new PyDict(null, { ordered: true });
    }),
    new PyGlobal('torch.Size', (args) => {
      arity('torch.Size', args, 1, 1);
      const sizes = args[0];
      if (!(sizes instanceof PyTuple || Array.isArray(sizes)) || !items(sizes).every((s) => typeof s === 'bigint')) {
        throw callError('torch.Size takes a sequence of ints');
      }
      if (items(sizes).length > MAX_DIMS) throw callError(`torch.Size of ${items(sizes).length} dimensions: at most ${MAX_DIMS} are supported`);
      return new PyTuple(items(sizes));
    }),
    new PyGlobal('_codecs.encode', (args) => {
      // protocol 2 pickles bytes as _codecs.encode(text, 'latin1')
      arity('_codecs.encode', args, 2, 2);
      const [text, encoding] = args;
      if (typeof text !== 'string' || (encoding !== 'latin1' && encoding !== 'latin-1')) {
        throw callError(`_codecs.encode is only allowed as encode(str, 'latin1'), got encoding ${String(encoding)}`);
      }
      if (/[^\u0000-\u00ff]/.test(text)) throw callError('_codecs.encode: text is not latin-1');
      return Uint8Array.from(Buffer.from(text, 'latin1'));
    }),
    new PyGlobal('torch.device', (args) => {
      // torch.device('cpu'), torch.device('cuda', 0), as Device.__reduce__ pickles one (torch/csrc/Device.cpp)
      // As torch takes them: one of its device types, its index in the string ('cuda:1') or given apart, a
      // C++ int64 (a 64 KB int was turned into a 158,000-character repr at each of thousands of calls: a review).
      arity('torch.device', args, 1, 2);
      const [type, index] = args;
      const typed = typeof type === 'string' && type.length <= 40 ? /^([a-z]+)(?::([0-9]{1,18}))?$/.exec(type) : null;
      if (!typed || !DEVICE_TYPES.has(typed[1])) throw callError(`torch.device takes a device type such as 'cpu' or 'cuda:0', got ${typeof type === 'string' ? JSON.stringify(type.slice(0, 40)) : describeItem(type)}`);
      if (args.length === 2 && (typeof index !== 'bigint' || index < 0n || index > MAX_INT64 || typed[2] !== undefined)) {
        throw callError(`torch.device index must be a non-negative int64, and only with a type that names none, got ${typeof index === 'bigint' ? (index > MAX_INT64 ? 'an int beyond int64' : String(index)) : describeItem(index)}`);
      }
      return new InertValue('torch.device', `device(type='${typed[1]}'${typed[2] !== undefined ? `, index=${typed[2]}` : args.length === 2 ? `, index=${index}` : ''})`);
    }),
    new PyGlobal('torch.serialization._get_layout', (args) => {
      // torch.layout pickles as _get_layout('torch.strided')
      arity('_get_layout', args, 1, 1);
      const [name] = args;
      if (typeof name !== 'string' || !TORCH_LAYOUTS.has(name)) throw callError(`_get_layout takes a torch layout's name, got ${typeof name === 'string' ? JSON.stringify(name.slice(0, 40)) : describeItem(name)}`);
      return new InertValue('torch.layout', name);
    }),
    new PyGlobal('builtins.complex', (args) => {
      // complex(real, imag), as complex.__reduce__ pickles one (protocol 2 names it __builtin__.complex)
      arity('complex', args, 0, 2);
      const parts = args.map((part) => {
        if (typeof part === 'number') return part;
        if (typeof part === 'bigint') {
          if (!Number.isFinite(Number(part))) throw callError('complex: an int too large for a float (Python: OverflowError)');
          return Number(part);
        }
        throw callError(`complex takes numbers, got ${describeItem(part)}`);
      });
      const [real = 0, imag = 0] = parts;
      // Python's repr, for messages: (1.5-2j), 2j
      const sign = imag < 0 || Object.is(imag, -0) ? '-' : '+';
      return new InertValue('complex', Object.is(real, 0) ? `${imag}j` : `(${real}${sign}${Math.abs(imag)}j)`);
    }),
    new PyGlobal('builtins.bytes', (args) => {
      // protocol 2 pickles b'' as bytes()
      arity('bytes', args, 0, 0);
      return new Uint8Array(0);
    }),
  ].map((g) => [g.qualifiedName, g]),
);

/**
 * A Parameter's pickled state: None, its __dict__, or (__dict__, slots) with each part a dict or None. torch
 * sets each attribute on the Parameter (setattr): one named as a tensor's own (data, grad, requires_grad,
 * ...) would change what torch loads, which the service, leaving attributes out, would not (a review: a
 * state {'data': <another tensor>} loaded other values in torch): refused, as a name that is no string.
 */
function checkParameterState(state: Item): void {
  const isPart = (part: Item) => part === null || part instanceof PyDict;
  const parts = isPart(state) ? [state] : state instanceof PyTuple && state.length === 2 && state.items.every(isPart) ? state.items : null;
  if (!parts) throw callError(`_rebuild_parameter_with_state state must be a dict of the parameter's attributes, got ${describeItem(state)}`);
  for (const part of parts) {
    if (!(part instanceof PyDict)) continue;
    for (const key of part.keys()) {
      if (typeof key !== 'string') throw callError(`_rebuild_parameter_with_state: a parameter's attribute names are strings, got ${describeItem(key)}`);
      if (TENSOR_ATTRIBUTES.has(key) || key.startsWith('__')) throw callError(`_rebuild_parameter_with_state: the attribute ${JSON.stringify(key.slice(0, 40))} is the tensor's own (torch would set it on the parameter), not one of its Python attributes`);
    }
    // Read in 'unread' mode (a checkpoint), an attribute of a class weights_only refuses is an UnreadObject:
    // refused here as that mode's default refuses it where it is named (found by a review: such a Parameter
    // passed in a checkpoint's model).
    const unread = findUnread(part, 'attribute');
    if (unread) throw new FormatError('PICKLE_GLOBAL_REFUSED', `pickle global ${unread.type} is not allowed (a Parameter's ${unread.path.replace(/^attribute\.?/, 'attribute ')})`);
  }
}

/** A tensor's own attributes that setattr on a Parameter changes (or that torch refuses to set). */
const TENSOR_ATTRIBUTES = new Set(['data', 'grad', '_grad', 'requires_grad', 'retains_grad', 'grad_fn', '_grad_fn', 'is_leaf', '_backward_hooks',
  '_post_accumulate_grad_hooks', '_base', '_version', '_cdata', 'names', 'real', 'imag', 'shape', 'dtype', 'device', 'layout', 'T', 'mT', 'H', 'mH']);

/** torch's device types (c10/core/DeviceType.h, as torch.device parses them). */
const DEVICE_TYPES = new Set(['cpu', 'cuda', 'mkldnn', 'opengl', 'opencl', 'ideep', 'hip', 'fpga', 'maia', 'xla', 'vulkan', 'metal', 'xpu', 'mps', 'meta',
  'hpu', 've', 'lazy', 'ipu', 'mtia', 'privateuseone']);
const MAX_INT64 = 2n ** 63n - 1n;
/** Dimensions of a torch.Size: far above any model's (torch's own kernels stop at 25 or 64). */
const MAX_DIMS = 64;

function rebuildParameter(data: Item, requiresGrad: Item, hooks: Item): Tensor {
  if (!isTensor(data)) throw callError(`_rebuild_parameter data must be a tensor, got ${describeItem(data)}`);
  if (typeof requiresGrad !== 'boolean') throw callError('_rebuild_parameter requires_grad must be a bool');
  checkEmptyHooks('_rebuild_parameter', hooks);
  const tensor = { ...data } as Tensor;
  if (requiresGrad) tensor.requiresGrad = true;
  else delete tensor.requiresGrad;
  return tensor;
}

/**
 * A dense tensor from a storage, offset, sizes and strides (torch._utils._rebuild_tensor).
 * Contiguous layouts are views of the storage. Other strides are checked here but copied later, by
 * copyStridedViews, once the tensor's place in the file is known: the copy can be larger than the
 * file (a stride of 0 repeats one element, as torch.zeros(1).expand(n) saves it), so it is charged
 * against a budget and refused by name before anything is allocated.
 */
export function rebuildTensor(storage: Item, offsetItem: Item, sizeItem: Item, strideItem: Item): Tensor {
  if (!(storage instanceof Storage)) throw callError(`tensor storage must come from a persistent id, got ${describeItem(storage)}`);
  // A tensor's place in the file (params.w) is known once the whole value is read: what is wrong with its
  // storage, sizes or strides is said then, by copyStridedViews, with that place.
  if (storage.refused) return refusedTensor(storage, storage.refused);
  try {
    return viewOf(storage, offsetItem, sizeItem, strideItem);
  } catch (err) {
    if (err instanceof FormatError) return refusedTensor(storage, err);
    throw err;
  }
}

/** Tensors refused while the file was read, by their placeholder array, with why. */
const REFUSED_TENSORS = new WeakMap<TypedArray, FormatError>();

function refusedTensor(storage: Storage, why: FormatError): Tensor {
  const placeholder = storage.data.subarray(0, 0);
  REFUSED_TENSORS.set(placeholder, why);
  return { dtype: storage.dtype, shape: [0], data: placeholder } as Tensor;
}

function viewOf(storage: Storage, offsetItem: Item, sizeItem: Item, strideItem: Item): Tensor {
  const offset = toIndex(offsetItem, 'storage offset');
  const shape = intTuple(sizeItem, 'size');
  const stride = intTuple(strideItem, 'stride');
  if (shape.length !== stride.length) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `tensor has ${shape.length} sizes but ${stride.length} strides`);
  }
  checkShape(shape, `tensor in storage ${storage.key}`);
  const count = numel(shape);
  const data = storage.data;
  if (count === 0) return { dtype: storage.dtype, shape, data: data.subarray(0, 0) } as Tensor;
  let last = offset;
  for (let i = 0; i < shape.length; i++) last += (shape[i] - 1) * stride[i];
  if (last >= data.length) {
    throw new FormatError('STORAGE_MISSING', `tensor of shape [${shape.join(', ')}] at offset ${offset} needs ${last + 1} elements, storage ${storage.key} has ${data.length}`);
  }
  const expected = contiguousStrides(shape);
  const contiguous = shape.every((size, i) => size === 1 || stride[i] === expected[i]);
  if (contiguous) return { dtype: storage.dtype, shape, data: data.subarray(offset, offset + count) } as Tensor;
  // A distinct empty array stands in for the data: _rebuild_parameter copies the tensor object, not
  // its array, so every tensor made from this view finds the same pending copy through it.
  const placeholder = data.subarray(0, 0);
  PENDING_VIEWS.set(placeholder, { storage, offset, shape, stride, count });
  return { dtype: storage.dtype, shape, data: placeholder } as Tensor;
}

interface StridedView {
  storage: Storage;
  offset: number;
  shape: number[];
  stride: number[];
  count: number;
}

/** Strided views not yet copied, by their placeholder array. Weak: a load that fails leaves nothing behind. */
const PENDING_VIEWS = new WeakMap<TypedArray, StridedView>();

/**
 * Refuses the tensors refused while the file was read (rebuildTensor), named by their place in `value`, and
 * copies the strided views in `value` into row-major arrays, in place. Their copies may take at most
 * `budgetBytes` together; a view that would go over is refused, named by its place in `value` (`root`
 * for the value itself, `root.key` and `root[index]` inside it), before its array is allocated.
 */
export function copyStridedViews(value: PyValue, budgetBytes: number, root: string): void {
  const copies = new Map<TypedArray, TypedArray>();
  const seen = new Set<object>(); // shared sub-values (memo) are walked once
  let spent = 0;
  const visit = (item: PyValue, path: string): void => {
    if (item === null || typeof item !== 'object' || item instanceof Uint8Array || seen.has(item)) return;
    seen.add(item);
    if (item instanceof PyDict) {
      for (const [key, child] of item) visit(child, typeof key === 'string' ? (path ? `${path}.${key}` : key) : `${path}[${key}]`);
      if (item.attributes) visit(item.attributes, path);
    } else if (item instanceof PyTuple || Array.isArray(item)) {
      items(item).forEach((child, i) => visit(child, `${path}[${i}]`));
    } else if (isTensor(item)) {
      const refused = REFUSED_TENSORS.get(item.data);
      if (refused) throw new FormatError(refused.code, `${path || 'tensor'}: ${refused.message}`);
      const view = PENDING_VIEWS.get(item.data);
      if (!view) return;
      let copy = copies.get(item.data);
      if (!copy) {
        const bytes = view.count * elementSize(item.dtype);
        if (spent + bytes > budgetBytes) {
          const { storage } = view;
          throw new FormatError('TENSOR_SHAPE_INVALID', `${path || 'tensor'}: a view of shape [${view.shape.join(', ')}] with strides [${view.stride.join(', ')}] `
            + `into storage ${storage.key} (${storage.data.length} ${storage.dtype} element${storage.data.length === 1 ? '' : 's'}) would take ${bytes} bytes to copy; `
            + `this file's strided views may take ${budgetBytes} bytes in all${spent ? ` (${spent} already taken)` : ''}`);
        }
        spent += bytes;
        copy = gather(view.storage.data, view.offset, view.shape, view.stride, view.count);
        copies.set(item.data, copy);
      }
      (item as { data: TypedArray }).data = copy;
    }
  };
  visit(value, root);
}

/** Copies a strided view into row-major order. */
function gather(data: TypedArray, offset: number, shape: number[], stride: number[], count: number): TypedArray {
  const out = new (data.constructor as new (n: number) => TypedArray)(count);
  const index = new Array<number>(shape.length).fill(0);
  let source = offset;
  for (let i = 0; i < count; i++) {
    (out as unknown as unknown[])[i] = (data as unknown as unknown[])[source];
    for (let d = shape.length - 1; d >= 0; d--) {
      index[d]++;
      source += stride[d];
      if (index[d] < shape[d]) break;
      source -= stride[d] * shape[d];
      index[d] = 0;
    }
  }
  return out;
}

function intTuple(item: Item, what: string): number[] {
  if (!(item instanceof PyTuple)) throw new FormatError('TENSOR_SHAPE_INVALID', `tensor ${what} must be a tuple, got ${describeItem(item)}`);
  return item.items.map((value) => toIndex(value, what));
}

function toIndex(item: Item, what: string): number {
  if (typeof item !== 'bigint' || item < 0n || item > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new FormatError('TENSOR_SHAPE_INVALID', `tensor ${what} must be a non-negative int, got ${typeof item === 'bigint' ? item : describeItem(item)}`);
  }
  return Number(item);
}

function checkEmptyHooks(fn: string, hooks: Item): void {
  if (hooks !== null && !(hooks instanceof PyDict && hooks.size === 0)) throw callError(`${fn} with backward hooks is not supported`);
}

function arity(fn: string, args: readonly Item[], min: number, max: number): void {
  if (args.length < min || args.length > max) {
    throw callError(`${fn} takes ${min === max ? min : `${min} to ${max}`} arguments, got ${args.length}`);
  }
}

function items(sequence: PyTuple | PyValue[]): PyValue[] {
  return sequence instanceof PyTuple ? [...sequence.items] : sequence;
}

function describeItem(item: Item): string {
  return item instanceof Opaque ? item.describe() : pyTypeName(item);
}

function callError(message: string): FormatError {
  return new FormatError('PICKLE_CALL_INVALID', message);
}
