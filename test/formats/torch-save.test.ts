import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import {
  FormatError, PyDict, PyTuple, fromAsgdStateDict, orderedDict, readTorchSave, readZip, streamToBuffer, toAsgdStateDict, toCheckpoint,
  torchSaveToBuffer, writeTorchSave, zipStream, type PyValue, type Tensor,
} from '../../src/formats/index.ts';
import { describeValue } from './describe.ts';

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    return err.code;
  }
  return 'no error';
}

/** A zip of raw records, for archives torch.save would never write. */
function archive(records: Record<string, Uint8Array | string>): Buffer {
  return streamToBuffer(zipStream(Object.entries(records).map(([name, content]) => {
    const data = typeof content === 'string' ? Buffer.from(content, 'latin1') : content;
    return { name, size: data.length, data: () => [data] };
  })));
}

const str = (s: string) => { const b = Buffer.from(s, 'utf8'); const h = Buffer.alloc(5); h[0] = 0x58; h.writeUInt32LE(b.length, 1); return Buffer.concat([h, b]).toString('latin1'); };
const int = (n: number) => { const b = Buffer.alloc(5); b[0] = 0x4a; b.writeInt32LE(n, 1); return b.toString('latin1'); };

/** data.pkl of one tensor: _rebuild_tensor_v2(storage(cls, key, numel), offset, size, stride, False, OrderedDict()). */
function tensorPickle(t: { cls?: string; key?: string; numel: number; offset?: number; size: number[]; stride: number[] }): string {
  return '\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((' + str('storage') + `ctorch\n${t.cls ?? 'FloatStorage'}\n` + str(t.key ?? '0') + str('cpu') + int(t.numel)
    + 'tQ' + int(t.offset ?? 0) + '(' + t.size.map(int).join('') + 't(' + t.stride.map(int).join('') + 't\x89ccollections\nOrderedDict\n)RtR.';
}

const floats = (...values: number[]) => new Uint8Array(Float32Array.from(values).buffer);

describe('torch.save writer', () => {
  test('round-trips every dtype, 0-dim and empty tensors, with the records PyTorch 2.x writes', () => {
    const tensors: [string, Tensor][] = [
      ['f32', { dtype: 'float32', shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) }],
      ['f64', { dtype: 'float64', shape: [1], data: Float64Array.of(0.1) }],
      ['f16', { dtype: 'float16', shape: [1], data: Uint16Array.of(0x3c00) }],
      ['bf16', { dtype: 'bfloat16', shape: [1], data: Uint16Array.of(0x3f80) }],
      ['i64', { dtype: 'int64', shape: [2], data: BigInt64Array.of(-1n, 2n ** 62n) }],
      ['i32', { dtype: 'int32', shape: [1], data: Int32Array.of(-7) }],
      ['i16', { dtype: 'int16', shape: [1], data: Int16Array.of(-7) }],
      ['i8', { dtype: 'int8', shape: [1], data: Int8Array.of(-7) }],
      ['u8', { dtype: 'uint8', shape: [1], data: Uint8Array.of(200) }],
      ['bool', { dtype: 'bool', shape: [2], data: Uint8Array.of(1, 0) }],
      ['scalar', { dtype: 'float32', shape: [], data: Float32Array.of(0.5), requiresGrad: true }],
      ['empty', { dtype: 'float32', shape: [0, 3], data: new Float32Array(0) }],
    ];
    const value = orderedDict(tensors);
    const bytes = torchSaveToBuffer(value, { archiveName: 'ckpt', serializationId: '1'.repeat(40) });
    assert.deepStrictEqual(describeValue(readTorchSave(bytes)), describeValue(value));
    const zip = readZip(bytes);
    const names = [...zip.entries.keys()];
    assert.deepEqual(names.slice(0, 4), ['ckpt/data.pkl', 'ckpt/.format_version', 'ckpt/.storage_alignment', 'ckpt/byteorder']);
    assert.deepEqual(names.slice(-2), ['ckpt/version', 'ckpt/.data/serialization_id']);
    assert.equal(zip.read('ckpt/version').toString(), '3\n');
    assert.equal(zip.read('ckpt/byteorder').toString(), 'little');
    assert.equal(zip.read('ckpt/.storage_alignment').toString(), '64');
    assert.equal(zip.read('ckpt/.data/serialization_id').toString(), '1'.repeat(40));
    // torch sorts storage keys as strings: data/0, data/1, data/10, data/11, data/2, ...
    assert.deepEqual(names.filter((n) => n.includes('/data/')).slice(0, 4), ['ckpt/data/0', 'ckpt/data/1', 'ckpt/data/10', 'ckpt/data/11']);
    for (const e of zip.entries.values()) assert.equal(e.dataOffset % 64, 0);
    assert.match(readZip(torchSaveToBuffer(null)).read('archive/.data/serialization_id').toString(), /^[0-9]{40}$/);
  });

  test('streams tensor memory by reference with a length known up front; one storage per shared array', () => {
    const data = new Float32Array(1000).fill(3);
    const a: Tensor = { dtype: 'float32', shape: [1000], data };
    const b: Tensor = { dtype: 'float32', shape: [10, 100], data }; // same storage, another shape
    const stream = writeTorchSave(new PyDict([['a', a], ['b', b], ['c', { dtype: 'float32', shape: [1], data: Float32Array.of(1) }]]));
    const chunks = [...stream.chunks];
    assert.equal(chunks.reduce((n, c) => n + c.length, 0), stream.byteLength);
    assert.equal(chunks.filter((c) => c.buffer === data.buffer).length, 1, 'the shared storage is written once, as a view');
    const back = readTorchSave(streamToBuffer(stream)) as PyDict;
    const [ra, rb] = [back.get('a') as Tensor, back.get('b') as Tensor];
    assert.equal(ra.data.buffer, rb.data.buffer);
    assert.deepEqual(rb.shape, [10, 100]);
    assert.equal([...readZip(streamToBuffer(stream)).entries.keys()].filter((n) => n.includes('/data/')).length, 2);
  });

  test('reads are views into the file unless asked to copy', () => {
    const bytes = torchSaveToBuffer([{ dtype: 'float32', shape: [3], data: Float32Array.of(1, 2, 3) }]);
    const [view] = readTorchSave(bytes) as Tensor[];
    assert.equal(view.data.buffer, bytes.buffer);
    const [copy] = readTorchSave(bytes, { copy: true }) as Tensor[];
    assert.notEqual(copy.data.buffer, bytes.buffer);
    assert.deepEqual([...copy.data], [1, 2, 3]);
  });

  test('refuses tensors whose data does not match dtype or shape', () => {
    assert.equal(codeOf(() => torchSaveToBuffer([{ dtype: 'float32', shape: [3], data: Float32Array.of(1) }])), 'TENSOR_SHAPE_INVALID');
    assert.equal(codeOf(() => torchSaveToBuffer([{ dtype: 'float32', shape: [1], data: Float64Array.of(1) } as never])), 'TENSOR_DTYPE_UNSUPPORTED');
  });

  test('the ASGD state_dict a fresh session writes reads back to the same typed value', () => {
    const sd = {
      state: new Map([[0, { step: 1, eta: Math.fround(0.01), mu: 1, ax: { dtype: 'float32' as const, shape: [2], data: Float32Array.of(0.5, -0.5) } }]]),
      paramGroups: [{ lr: 0.01, lambd: 1e-4, alpha: 0.75, t0: 1e6, weightDecay: 0, foreach: null, maximize: false, differentiable: false, capturable: false, params: [0, 1] }],
    };
    const value = fromAsgdStateDict(sd);
    const groups = (value.get('param_groups') as PyDict[])[0];
    assert.deepEqual([...groups.keys()], ['lr', 'lambd', 'alpha', 't0', 'weight_decay', 'foreach', 'maximize', 'differentiable', 'capturable', 'params']);
    assert.equal(groups.get('weight_decay'), 0n); // a Python int, as PyTorch's default
    assert.equal(groups.get('t0'), 1e6); // a Python float
    assert.deepEqual([...((value.get('state') as PyDict).get(0n) as PyDict).keys()], ['step', 'eta', 'mu', 'ax']);
    const back = toAsgdStateDict(readTorchSave(torchSaveToBuffer(value)));
    assert.deepEqual(back.state, sd.state);
    assert.deepEqual(back.paramGroups, [{ ...sd.paramGroups[0], intKeys: ['weight_decay'] }]);
  });
});

describe('torch.save reader refuses what torch.load would not read, or should not', () => {
  const valid = (pkl: string, extra: Record<string, Uint8Array | string> = {}) => archive({ 'a/data.pkl': pkl, 'a/data/0': floats(1, 2, 3, 4, 5, 6), 'a/version': '3\n', ...extra });

  test('archive layout: version record, folder, byte order, TorchScript, data.pkl', () => {
    const pkl = tensorPickle({ numel: 6, size: [6], stride: [1] });
    assert.equal((readTorchSave(valid(pkl)) as Tensor).data.length, 6);
    assert.equal(codeOf(() => readTorchSave(archive({ 'a/data.pkl': pkl, 'a/data/0': floats(1) }))), 'TORCH_SAVE_INVALID');
    assert.equal(codeOf(() => readTorchSave(archive({ 'data.pkl': pkl, version: '3\n' }))), 'TORCH_SAVE_INVALID');
    assert.equal(codeOf(() => readTorchSave(valid(pkl, { 'a/byteorder': 'big' }))), 'TORCH_SAVE_INVALID');
    assert.equal(codeOf(() => readTorchSave(valid(pkl, { 'a/version': 'x\n' }))), 'TORCH_SAVE_INVALID');
    assert.equal(codeOf(() => readTorchSave(valid(pkl, { 'a/constants.pkl': '' }))), 'TORCH_SAVE_INVALID');
    assert.equal(codeOf(() => readTorchSave(archive({ 'a/version': '3\n' }))), 'ZIP_ENTRY_MISSING');
    assert.equal((readTorchSave(archive({ 'a/data.pkl': '\x80\x02N.', 'a/.data/version': '3\n' }))), null);
  });

  test('a refused global inside data.pkl', () => {
    assert.throws(() => readTorchSave(valid("cos\nsystem\n(S'touch /tmp/pwned'\ntR.")), (err: FormatError) => err.code === 'PICKLE_GLOBAL_REFUSED' && /os\.system/.test(err.message));
  });

  test('storages: missing, too small, out-of-range views, mixed dtypes, unsupported dtypes', () => {
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ key: '9', numel: 6, size: [6], stride: [1] })))), 'STORAGE_MISSING');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 7, size: [7], stride: [1] })))), 'TORCH_SAVE_INVALID', 'a record shorter than its storage, as one longer');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 6, offset: 1, size: [6], stride: [1] })))), 'STORAGE_MISSING');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 6, size: [3, 2], stride: [3, 1] })))), 'STORAGE_MISSING');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 6, size: [-1], stride: [1] })))), 'TENSOR_SHAPE_INVALID');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 6, size: [2, 3], stride: [1] })))), 'TENSOR_SHAPE_INVALID');
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 3, cls: 'DoubleStorage', size: [3], stride: [1] })))), 'no error');
    assert.throws(() => readTorchSave(valid(tensorPickle({ numel: 3, cls: 'ComplexFloatStorage', size: [3], stride: [1] }))),
      (err: FormatError) => err.code === 'TENSOR_DTYPE_UNSUPPORTED' && /complex64/.test(err.message));
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 3, cls: 'EvilStorage', size: [3], stride: [1] })))), 'PICKLE_GLOBAL_REFUSED');
    const twoDtypes = '\x80\x02' + tensorPickle({ numel: 6, size: [6], stride: [1] }).slice(2, -1) + tensorPickle({ numel: 3, cls: 'LongStorage', size: [3], stride: [1] }).slice(2, -1) + '\x86.';
    assert.throws(() => readTorchSave(valid(twoDtypes)), (err: FormatError) => err.code === 'TORCH_SAVE_INVALID' && /float32 and int64/.test(err.message));
  });

  test('a tensor of a dtype torch 2.x saves with _rebuild_tensor_v3 (uint16, float8, ...) is an unsupported dtype, not a refused global', () => {
    // As torch 2.13 pickles torch.save({'w': torch.zeros(3, dtype=torch.uint16)}): the rebuild is named first.
    const pkl = '\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v3\n((' + str('storage') + 'ctorch.storage\nUntypedStorage\n' + str('0') + str('cpu') + int(6)
      + 'tQ' + int(0) + '(' + int(3) + 't(' + int(1) + 't\x89ccollections\nOrderedDict\n)Rctorch\nuint16\ntRs.';
    assert.throws(() => readTorchSave(archive({ 'a/data.pkl': pkl, 'a/data/0': new Uint8Array(6), 'a/version': '3\n' })),
      (err: FormatError) => err.code === 'TENSOR_DTYPE_UNSUPPORTED' && /_rebuild_tensor_v3 \(uint16, uint32, uint64 or a float8 type\)/.test(err.message));
  });

  test('what is wrong with a tensor\'s storage, sizes or strides is said with the tensor\'s place in the file', () => {
    // A state_dict-like file: {"w": tensor, "groups": [tensor]}; each fault in the second tensor only.
    const bad = (spec: Parameters<typeof tensorPickle>[0]) => {
      const good = tensorPickle({ numel: 6, size: [6], stride: [1] }).slice(2, -1);
      const other = tensorPickle({ key: '1', ...spec }).slice(2, -1);
      return valid(`\x80\x02}X\x01\x00\x00\x00w${good}sX\x06\x00\x00\x00groups]${other}as.`, { 'a/data/1': floats(1, 2, 3, 4) });
    };
    const said = (file: Buffer) => {
      try {
        readTorchSave(file, { name: 'params' });
      } catch (err) {
        return `${(err as FormatError).code} ${(err as FormatError).message}`;
      }
      return 'no error';
    };
    assert.equal(said(bad({ numel: 4, size: [4], stride: [1] })), 'no error');
    assert.equal(said(bad({ numel: 4, size: [3, 4], stride: [4, 1] })), 'STORAGE_MISSING params.groups[0]: tensor of shape [3, 4] at offset 0 needs 12 elements, storage 1 has 4');
    assert.equal(said(bad({ numel: 4, size: [2, 2], stride: [2] })), 'TENSOR_SHAPE_INVALID params.groups[0]: tensor has 2 sizes but 1 strides');
    assert.equal(said(bad({ numel: 4, offset: 3, size: [2], stride: [1] })), 'STORAGE_MISSING params.groups[0]: tensor of shape [2] at offset 3 needs 5 elements, storage 1 has 4');
    assert.equal(said(bad({ numel: 5, size: [4], stride: [1] })), 'TORCH_SAVE_INVALID params.groups[0]: storage 1 declares 5 float32 elements (20 bytes) but its record has 16 bytes');
    assert.equal(said(bad({ key: '7', numel: 4, size: [4], stride: [1] })), 'STORAGE_MISSING params.groups[0]: storage record data/7 is missing');
  });

  test('a storage record must hold exactly the bytes its storage declares; a large one is refused before it is inflated', () => {
    assert.equal(codeOf(() => readTorchSave(valid(tensorPickle({ numel: 5, size: [5], stride: [1] })))), 'TORCH_SAVE_INVALID');
    // A two-element storage whose record is 64 MiB of zeros, deflated to 64 KB: refused by its sizes alone.
    const zeros = 64 * 2 ** 20;
    const zip = archive({ 'a/data.pkl': tensorPickle({ numel: 2, size: [2], stride: [1] }), 'a/data/0': deflateRawSync(Buffer.alloc(zeros), { level: 9 }), 'a/version': '3\n' });
    const entry = readZip(zip).entries.get('a/data/0')!;
    const central = zip.lastIndexOf(Buffer.from('a/data/0')) - 46;
    assert.equal(zip.readUInt32LE(central), 0x02014b50);
    zip.writeUInt16LE(8, central + 10);
    zip.writeUInt32LE(0, central + 16);
    zip.writeUInt32LE(zeros, central + 24);
    assert.equal(entry.compressedSize < 100_000, true);
    assert.throws(() => readTorchSave(zip, { maxInflatedSize: 2 ** 30 }),
      (err: FormatError) => err.code === 'TORCH_SAVE_INVALID' && /storage 0 declares 2 float32 elements \(8 bytes\) but its record has 67108864 bytes/.test(err.message));
  });

  test('strided and expanded views are materialised in row-major order', () => {
    const transposed = readTorchSave(valid(tensorPickle({ numel: 6, size: [3, 2], stride: [1, 3] }))) as Tensor;
    assert.deepEqual([...transposed.data], [1, 4, 2, 5, 3, 6]);
    const expanded = readTorchSave(valid(tensorPickle({ numel: 6, offset: 4, size: [2, 2], stride: [0, 1] }))) as Tensor;
    assert.deepEqual([...expanded.data], [5, 6, 5, 6]);
    const size1 = readTorchSave(valid(tensorPickle({ numel: 6, offset: 2, size: [1, 3], stride: [99, 1] }))) as Tensor;
    assert.deepEqual([...size1.data], [3, 4, 5]); // PyTorch ignores the stride of a size-1 dim: still a view
  });

  test('typed converters name the field that is wrong', () => {
    const withGroups = (groups: PyValue, state: PyValue = new PyDict()) => new PyDict([['state', state], ['param_groups', groups]]);
    const group = (changes: [string, PyValue][] = []) => new PyDict([['lr', 0.01], ['lambd', 1e-4], ['alpha', 0.75], ['t0', 1e6], ['weight_decay', 0n], ['params', [0n]], ...changes]);
    const message = (fn: () => unknown) => { try { fn(); } catch (err) { assert.equal((err as FormatError).code, 'INVALID_STATE_DICT'); return (err as Error).message; } return 'no error'; };
    assert.match(message(() => toAsgdStateDict(withGroups([group([['lr', 'fast']])]))), /param_groups\[0\]\.lr must be a number, got str/);
    // torch 2.x's tensor lr: refused saying what to do (its eta is computed in float32, not the float path replayed here)
    const tensorLr = { dtype: 'float32', shape: [], data: Float32Array.of(0.01) } as Tensor;
    assert.match(message(() => toAsgdStateDict(withGroups([group([['lr', tensorLr]])]))),
      /param_groups\[0\]\.lr must be a number, got Tensor\(float32\); save the group's value as a Python float \(g\['lr'\] = float\(g\['lr'\]\)\) before torch\.save/);
    assert.match(message(() => toAsgdStateDict(withGroups([group([['params', [0n, 1.5]]])]))), /param_groups\[0\]\.params\[1\] must be an int/);
    // An id in two groups is read here and refused where the groups meet the session's (load-plan.ts), after
    // torch's checks of their number and sizes, as in a JSON state_dict.
    assert.equal(toAsgdStateDict(withGroups([group(), group()])).paramGroups.length, 2);
    assert.match(message(() => toAsgdStateDict(withGroups([group()], new PyDict([['x', new PyDict()]])))), /state\[x\] keys must be parameter ids/);
    assert.match(message(() => toAsgdStateDict(withGroups([group()], new PyDict([[-1n, new PyDict()]])))), /state\[-1\] keys must be parameter ids/);
    // An id no group lists is read (and checked) as torch and the JSON form take it; the load drops it.
    assert.match(message(() => toAsgdStateDict(withGroups([group()], new PyDict([[3n, new PyDict([['step', 'one']])]])))), /state\[3\]\.step must be a tensor, got str/);
    assert.match(message(() => toAsgdStateDict(withGroups([group()], new PyDict([[0n, new PyDict([['step', 'one']])]])))), /state\[0\]\.step must be a tensor, got str/);
    assert.match(message(() => toAsgdStateDict(new PyDict([['param_groups', []]]))), /state_dict\.state is missing/);
    assert.match(message(() => toCheckpoint(new PyDict([['model', new PyDict()], ['step', 1n]]))), /checkpoint\.optimizer is missing/);
    assert.match(message(() => toCheckpoint(new PyDict([['model', new PyDict([['w', 1n]])], ['optimizer', withGroups([])], ['step', 1n]]))), /checkpoint\.model\["w"\] must be a tensor/);
    assert.equal(codeOf(() => toAsgdStateDict(withGroups([group()], new PyDict([[0n, new PyDict([['step', 1.0], ['eta', 0.1], ['mu', 1.0], ['ax', []]])]])))), 'TENSOR_DTYPE_UNSUPPORTED');
    assert.equal(toAsgdStateDict(withGroups([group()]), {}).paramGroups[0].foreach, null);
    assert.ok(new PyTuple([]) instanceof PyTuple);
  });
});
