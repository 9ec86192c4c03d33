// Small hostile files must be refused by name, quickly, before anything large is allocated; the views
// and state_dicts PyTorch users actually save must still load exactly.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import {
  FormatError, MAX_PICKLE_ITEMS, MAX_PICKLE_OBJECTS, MAX_PICKLE_STACK_ITEMS, MAX_PICKLE_TEXT_BYTES, MAX_ZIP_ENTRIES, PyDict, findTorchGlobal, fromAsgdStateDict,
  readSafetensors, readTorchSave, readZip, streamToBuffer, toAsgdStateDict, toCheckpoint, torchSaveToBuffer, unpickle, zipStream, type Tensor, type UnpickleOptions,
} from '../../src/formats/index.ts';
import { MAX_PARAMS } from '../../src/sessions/spec.ts';
import { MAX_STEP_COUNT } from '../../src/formats/optimizer-state.ts';
import { runPython, skipWithoutTorch } from '../support/torch.ts';
import { refusal, viewsFile as torchFile, type View } from './torch-files.ts';

describe('torch.save views that would expand a small storage', () => {
  test('a 1 KB file whose view claims 2**50 elements is refused by name, at once, instead of a RangeError', () => {
    const file = torchFile({ w: { key: '0', numel: 1, size: [2n ** 50n], stride: [0] }, b: { key: '1', numel: 2, size: [2], stride: [1] } });
    assert.ok(file.length < 2048, `${file.length} bytes`);
    const err = refusal(() => readTorchSave(file, { name: 'grads' }));
    assert.equal(err.code, 'TENSOR_SHAPE_INVALID');
    assert.match(err.message, /^grads\.w: a view of shape \[1125899906842624\] with strides \[0\]/);
  });

  test('an expanded view larger than the file is refused before its copy is allocated: 2**28 elements take no time', () => {
    const file = torchFile({ w: { key: '0', numel: 1, size: [2 ** 28], stride: [0] } });
    const started = performance.now();
    const err = refusal(() => readTorchSave(file));
    assert.ok(performance.now() - started < 200, `${performance.now() - started} ms`); // copying 2**28 elements took seconds
    assert.match(err.message, /^w: .*would take 1073741824 bytes to copy/);
  });

  test('the budget is for the whole file: many views of one element add up', () => {
    const views: Record<string, View> = {};
    for (let k = 0; k < 5; k++) views[`v${k}`] = { key: '0', numel: 1, size: [2 ** 16], stride: [0] }; // 256 KiB each
    const err = refusal(() => readTorchSave(torchFile(views)));
    assert.match(err.message, /^v4: .*\(1048576 already taken\)/);
    // the caller's name for the file comes first
    const nested = torchFile({ w: { key: '0', numel: 1, size: [2 ** 30], stride: [0] } });
    assert.match(refusal(() => readTorchSave(nested, { name: 'checkpoint' })).message, /^checkpoint\.w: /);
  });

  test('views within the budget (transposes, column slices, rows, small expanded views) load as before', () => {
    assert.match(refusal(() => readTorchSave(torchFile({ big: { key: '1', numel: 2, size: [2 ** 20, 2], stride: [0, 1] } }))).message, /^big: /);
    const tensors = readTorchSave(torchFile({
      transposed: { key: '0', numel: 6, size: [3, 2], stride: [1, 3] },
      column: { key: '0', numel: 6, size: [2], offset: 1, stride: [3] },
      row: { key: '0', numel: 6, size: [3], offset: 3, stride: [1] },
      expanded: { key: '1', numel: 2, size: [3, 2], stride: [0, 1] },
    })) as PyDict;
    const data = (name: string) => [...(tensors.get(name) as Tensor).data];
    assert.deepEqual(data('transposed'), [0, 3, 1, 4, 2, 5]);
    assert.deepEqual(data('column'), [1, 4]);
    assert.deepEqual(data('row'), [3, 4, 5]);
    assert.deepEqual(data('expanded'), [0, 1, 0, 1, 0, 1]);
  });

  test('what PyTorch saves (transposed, sliced, channels_last, tied and expanded tensors) reads back exactly; its expand(2**40) is refused', (t) => {
    const skip = skipWithoutTorch();
    if (skip) return t.skip(skip);
    const hex = runPython(`
import io, sys
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
values = {
  'transposed': base.t(), 'column': base[:, 2], 'strided': base[::2, 1::2], 'tied_a': base, 'tied_b': base.t(),
  'channels_last': torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 4).to(memory_format=torch.channels_last),
  'expanded': torch.tensor([1., 2.]).expand(3, 2), 'bias': torch.zeros(5),
}
f = io.BytesIO(); torch.save(values, f); sys.stdout.write(f.getvalue().hex())
f = io.BytesIO(); torch.save({'w': torch.zeros(1).expand(2**40)}, f); sys.stdout.write(' ' + f.getvalue().hex())
`);
    const [file, bomb] = hex.split(' ').map((h) => Buffer.from(h, 'hex'));
    assert.match(refusal(() => readTorchSave(bomb, { name: 'grads' })).message, /^grads\.w: a view of shape \[1099511627776\] with strides \[0\]/);
    const read = readTorchSave(file) as PyDict;
    const expected: Record<string, number[]> = {
      transposed: Array.from({ length: 24 }, (_, i) => (i % 4) * 6 + Math.floor(i / 4)),
      column: [2, 8, 14, 20],
      strided: [1, 3, 5, 13, 15, 17],
      tied_a: Array.from({ length: 24 }, (_, i) => i),
      channels_last: Array.from({ length: 16 }, (_, i) => i),
      expanded: [1, 2, 1, 2, 1, 2],
      bias: [0, 0, 0, 0, 0],
    };
    expected.tied_b = expected.transposed;
    for (const [name, values] of Object.entries(expected)) assert.deepEqual([...(read.get(name) as Tensor).data], values, name);
  });
});

// ---- step counts: what torch's float32 counter can hold and this service can store and serve back ----

function asgdStateDict(step: number | bigint | Tensor): PyDict {
  const scalar = (x: number): Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });
  return new PyDict([
    ['state', new PyDict([[0n, new PyDict([['step', step], ['eta', scalar(0.01)], ['mu', scalar(1)], ['ax', { dtype: 'float32', shape: [2], data: Float32Array.of(1, 2) }]])]])],
    ['param_groups', [new PyDict([['lr', 0.01], ['lambd', 1e-4], ['alpha', 0.75], ['t0', 1e6], ['weight_decay', 0n], ['foreach', null], ['maximize', false], ['params', [0n]]])]],
  ]);
}
const f32 = (x: number): Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });

describe('step counts in a torch.save state_dict', () => {
  test('infinite, NaN, negative, fractional or too large counts are refused, naming the field; whole counts up to 2**53 - 2**29 round-trip', () => {
    for (const step of [f32(Infinity), f32(NaN), f32(-3), f32(1.5), f32(1e30), 1e300]) {
      const file = torchSaveToBuffer(asgdStateDict(step));
      const err = refusal(() => toAsgdStateDict(readTorchSave(file), { toFloat32: true }));
      assert.equal(err.code, 'INVALID_STATE_DICT');
      assert.match(err.message, /^state_dict\.state\[0\]\.step must be a whole number of steps from 0 to 9007198717870080/);
    }
    const checkpoint = new PyDict([['model', new PyDict()], ['optimizer', asgdStateDict(f32(Infinity))], ['step', 1n]]);
    assert.match(refusal(() => toCheckpoint(readTorchSave(torchSaveToBuffer(checkpoint)))).message, /^checkpoint\.optimizer\.state\[0\]\.step must be a whole number/);
    // the largest float32 below 2**53 (and every whole float32 under it) is a count the service stores and serves back
    for (const step of [0, 1, 2 ** 24, MAX_STEP_COUNT]) {
      const sd = toAsgdStateDict(readTorchSave(torchSaveToBuffer(asgdStateDict(f32(step)))));
      assert.equal(sd.state.get(0)!.step, step);
      assert.equal(toAsgdStateDict(readTorchSave(torchSaveToBuffer(fromAsgdStateDict(sd)))).state.get(0)!.step, step);
    }
  });
});

describe('an empty per-parameter entry in a torch.save state_dict', () => {
  test('{} (torch leaves it after optimizer.state[p] was read) is no state, as torch.optim.ASGD.load_state_dict takes it', () => {
    const sd = asgdStateDict(f32(3));
    (sd.get('state') as PyDict).set(0n, new PyDict());
    assert.equal(toAsgdStateDict(readTorchSave(torchSaveToBuffer(sd))).state.size, 0);
  });
});

describe('another optimizer\'s state in a torch.save state_dict', () => {
  test('a per-parameter key ASGD does not have (SGD\'s momentum_buffer) is refused by name, not dropped', () => {
    const sd = asgdStateDict(f32(3));
    ((sd.get('state') as PyDict).get(0n) as PyDict).set('momentum_buffer', { dtype: 'float32', shape: [2], data: Float32Array.of(0, 0) });
    const err = refusal(() => toAsgdStateDict(readTorchSave(torchSaveToBuffer(sd))));
    assert.equal(err.code, 'INVALID_STATE_DICT');
    assert.match(err.message, /^state_dict\.state\[0\]\.momentum_buffer is not part of ASGD's per-parameter state/);
  });
});

// ---- safetensors headers: bounded by what the caller can use, refused before the work ----

function safetensorsHeader(header: string): Buffer {
  const json = Buffer.from(header);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, json]);
}

describe('safetensors headers', () => {
  const emptyTensors = (n: number) => safetensorsHeader('{' + Array.from({ length: n }, (_, i) => `"t${i}":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`).join(',') + '}');

  test('a header larger than the caller\'s tensors can need is refused before it is parsed', () => {
    const file = emptyTensors(200_000); // 11 MB
    const started = performance.now();
    const err = refusal(() => readSafetensors(file, { maxTensors: 2 }));
    assert.ok(performance.now() - started < 50, `${performance.now() - started} ms`);
    assert.equal(err.code, 'SAFETENSORS_HEADER_INVALID');
    assert.match(err.message, /^header of \d+ bytes is larger than 2 tensors need/);
  });

  test('a header listing more tensors than the caller can use, or too many metadata keys, is refused before its entries are read', () => {
    assert.match(refusal(() => readSafetensors(emptyTensors(3), { maxTensors: 2 })).message, /^header lists more than 2 tensors/);
    const metadata = safetensorsHeader('{"__metadata__":{' + Array.from({ length: 1025 }, (_, i) => `"m${i}":"x"`).join(',') + '}}');
    assert.match(refusal(() => readSafetensors(metadata)).message, /^header __metadata__ \(or a tensor's entry\) has more than 1024 entries/);
  });

  test('the caller refuses the first unknown name before the rest of the header is checked', () => {
    const seen: string[] = [];
    const file = safetensorsHeader('{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"evil":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},"x":{}}');
    assert.throws(() => readSafetensors(file, { checkName: (name) => { seen.push(name); if (name !== 'w') throw new Error(`unknown ${name}`); } }), /unknown evil/);
    assert.deepEqual(seen, ['w', 'evil']);
  });

  test('data_offsets beyond 2^53 are said to point past any body, not to break an order they keep (a hostile review)', () => {
    for (const offsets of ['[0,9007199254740992]', '[16,1152921504606846976]']) {
      const err = refusal(() => readSafetensors(safetensorsHeader(`{"w":{"dtype":"F32","shape":[4],"data_offsets":${offsets}}}`)));
      assert.match(err.message, /tensor w data_offsets \[\d+,\d+\] point past the end of any body \(beyond 2\^53 bytes\)/);
    }
    for (const offsets of ['[4,0]', '[-1,4]', '[0.5,4]', '[0]']) {
      assert.match(refusal(() => readSafetensors(safetensorsHeader(`{"w":{"dtype":"F32","shape":[1],"data_offsets":${offsets}}}`))).message, /data_offsets must be \[begin, end\] with 0 <= begin <= end/);
    }
  });
});

test('a torch.save file in the legacy (pre-1.6) format is refused as such, not as a corrupt zip', () => {
  // The first bytes torch.save(obj, f, _use_new_zipfile_serialization=False) writes (torch 1.13).
  const legacy = Buffer.from('80028a0a6cfc9c46f9206aa850192e80024de9032e80027d', 'hex');
  assert.throws(() => readTorchSave(legacy), (err: FormatError) => err.code === 'TORCH_SAVE_INVALID' && /legacy format.*PyTorch 1\.6/.test(err.message));
});

// ---- pickles and archives of a few KB that would push millions of items (review hostile-2: H1, H2, H3, H5) ----

/** A torch.save-shaped archive whose data.pkl is `pkl` (deflated when `deflate`, as a re-zipped file is). */
function archiveOf(pkl: Buffer, deflate = false): Buffer {
  const records: [string, Buffer][] = [['a/data.pkl', pkl], ['a/version', Buffer.from('3\n')]];
  const zip = streamToBuffer(zipStream(records.map(([name, data]) => ({ name, size: data.length, data: () => [data] }))));
  return deflate ? deflateEntries(zip) : zip;
}

/** The same archive with every entry deflated (zip's method 8). */
function deflateEntries(zip: Buffer): Buffer {
  const archive = readZip(zip);
  const locals: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  for (const [name, entry] of archive.entries) {
    const data = archive.read(name);
    const packed = deflateRawSync(data, { level: 9 });
    const nameBytes = Buffer.from(name);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0); local.writeUInt16LE(20, 4); local.writeUInt16LE(8, 8);
    local.writeUInt32LE(entry.crc32, 14); local.writeUInt32LE(packed.length, 18); local.writeUInt32LE(data.length, 22); local.writeUInt16LE(nameBytes.length, 26);
    const record = Buffer.alloc(46);
    record.writeUInt32LE(0x02014b50, 0); record.writeUInt16LE(20, 4); record.writeUInt16LE(20, 6); record.writeUInt16LE(8, 10);
    record.writeUInt32LE(entry.crc32, 16); record.writeUInt32LE(packed.length, 20); record.writeUInt32LE(data.length, 24); record.writeUInt16LE(nameBytes.length, 28);
    record.writeUInt32LE(offset, 42);
    locals.push(local, nameBytes, packed);
    central.push(record, nameBytes);
    offset += 30 + nameBytes.length + packed.length;
  }
  const cd = Buffer.concat(central);
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0); eocd.writeUInt16LE(archive.entries.size, 8); eocd.writeUInt16LE(archive.entries.size, 10);
  eocd.writeUInt32LE(cd.length, 12); eocd.writeUInt32LE(offset, 16);
  return Buffer.concat([...locals, cd, eocd]);
}

const pickleOf = (...parts: (string | Buffer)[]) => Buffer.concat([Buffer.from('\x80\x02', 'latin1'), ...parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : p)), Buffer.from('.')]);
const repeat = (unit: string, n: number) => Buffer.alloc(unit.length * n, unit, 'latin1');

/** Refused with PICKLE_LIMIT_EXCEEDED (not a RangeError, not after the whole pickle was run) and a message matching `message`. */
function limitRefusal(fn: () => unknown, message: RegExp): void {
  const err = refusal(fn);
  assert.equal(err.code, 'PICKLE_LIMIT_EXCEEDED', err.message);
  assert.match(err.message, message);
}

describe('pickles that push millions of items', () => {
  test('H1: 2 million empty bytes (4 MB, 10 KB deflated) are refused once the stacks hold MAX_PICKLE_STACK_ITEMS, not run to an out-of-memory', () => {
    const file = archiveOf(pickleOf(repeat('C\x00', 2_000_000)), true);
    assert.ok(file.length < 20_000, `${file.length} bytes`);
    limitRefusal(() => readTorchSave(file), new RegExp(`^pickle stacks hold more than ${MAX_PICKLE_STACK_ITEMS} items`));
    // DUPs behind MARKs count too: the items of every stack a MARK set aside
    const half = MAX_PICKLE_STACK_ITEMS / 2 + 1;
    limitRefusal(() => readTorchSave(archiveOf(pickleOf('N(N', repeat('2', half), '(N', repeat('2', half)))), /^pickle stacks hold more than/);
  });

  test('H2/H3: a deflated pickle of a million EMPTY_LIST (and 17 MB of them, past V8\'s Map limit) is refused by the stack limit', () => {
    const bomb = archiveOf(pickleOf(repeat(']', 1_000_000)), true);
    assert.ok(bomb.length < 5000, `${bomb.length} bytes`);
    limitRefusal(() => readTorchSave(bomb), /^pickle stacks hold more than/);
    limitRefusal(() => unpickle(pickleOf(repeat(']', 17_000_000)), { findGlobal: findTorchGlobal }), /^pickle stacks hold more than/);
  });

  test('every push (new values, DUP, memo gets) and every memo entry counts against maxItems, across the whole pickle', () => {
    const load = (pkl: Buffer, options: Partial<UnpickleOptions>) => unpickle(pkl, { findGlobal: findTorchGlobal, ...options });
    // pushed and popped again: the stack stays small, the count does not
    assert.equal(load(pickleOf(repeat('N0', 99), 'N'), { maxItems: 100 }), null);
    limitRefusal(() => load(pickleOf(repeat('N0', 100), 'N'), { maxItems: 100 }), /^pickle pushes and memoizes more than 100 items/);
    limitRefusal(() => load(pickleOf('N', repeat('2', 100)), { maxItems: 100 }), /more than 100 items/); // DUP
    limitRefusal(() => load(pickleOf('Nq\x00', repeat('0h\x00', 99)), { maxItems: 100 }), /more than 100 items/); // BINGET
    const puts = Buffer.concat(Array.from({ length: 100 }, (_, i) => Buffer.from([0x72, i, 0, 0, 0])));
    limitRefusal(() => load(pickleOf('N', puts), { maxItems: 100 }), /more than 100 items/); // LONG_BINPUT: memo entries
    // new values: lists, dicts, tuples, strings, non-empty bytes, ints beyond BININT1
    limitRefusal(() => load(pickleOf('](', repeat('}', 100), 'e'), { maxObjects: 100 }), /^pickle creates more than 100 values/);
    limitRefusal(() => load(pickleOf('](', repeat(')', 100), 'e'), { maxObjects: 100 }), /^pickle creates more than 100 values/);
    limitRefusal(() => load(pickleOf('](', repeat('C\x01x', 100), 'e'), { maxObjects: 100 }), /^pickle creates more than 100 values/);
    // BININT1 and empty bytes allocate nothing: they count as items only
    assert.equal((load(pickleOf('](', repeat('K\x07', 200), repeat('C\x00', 200), 'e'), { maxObjects: 2 }) as unknown[]).length, 400);
    // bytes of str, bytes and long ints
    limitRefusal(() => load(pickleOf('](', repeat('X\x05\x00\x00\x00abcde', 20), 'e'), { maxTextBytes: 99 }), /^pickle strings, bytes and long ints exceed 99 bytes in total/);
    limitRefusal(() => load(pickleOf('](', repeat('\x8a\x08\x01\x01\x01\x01\x01\x01\x01\x01', 20), 'e'), { maxTextBytes: 99 }), /exceed 99 bytes/);
  });

  test('the defaults leave a real checkpoint room: one of 1,000 parameters reads within a hundredth of each limit (MAX_PARAMS is 100,000)', () => {
    const tensor = (n: number): Tensor => ({ dtype: 'float32', shape: [n, 2], data: new Float32Array(2 * n) });
    const scalar = (x: number): Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });
    const n = 1000;
    const names = Array.from({ length: n }, (_, i) => `encoder.layers.${i}.self_attention.out_projection.weight`);
    const checkpoint = new PyDict([
      ['model', new PyDict(names.map((name) => [name, tensor(3)]))],
      ['optimizer', new PyDict([
        ['state', new PyDict(names.map((_, i) => [BigInt(i), new PyDict([['step', scalar(1)], ['eta', scalar(0.01)], ['mu', scalar(1)], ['ax', tensor(3)]])]))],
        ['param_groups', [new PyDict([['lr', 0.01], ['lambd', 1e-4], ['alpha', 0.75], ['t0', 1e6], ['weight_decay', 0n], ['foreach', null], ['maximize', false], ['params', names.map((_, i) => BigInt(i))]])]],
      ])],
      ['step', 1n],
    ]);
    const file = torchSaveToBuffer(checkpoint);
    const read = readTorchSave(file, {
      maxItems: MAX_PICKLE_ITEMS / 100, maxObjects: MAX_PICKLE_OBJECTS / 100, maxTextBytes: MAX_PICKLE_TEXT_BYTES / 100, maxEntries: (MAX_ZIP_ENTRIES - 16) / 100 + 16,
    });
    assert.equal(toCheckpoint(read).model.tensors.size, n);
    // and at a tenth of that, the same file is refused: the limits are not idle
    assert.equal(refusal(() => readTorchSave(file, { maxItems: MAX_PICKLE_ITEMS / 1000 })).code, 'PICKLE_LIMIT_EXCEEDED');
    assert.equal(refusal(() => readTorchSave(file, { maxEntries: (MAX_ZIP_ENTRIES - 16) / 1000 + 16 })).code, 'ZIP_LIMIT_EXCEEDED');
  });
});

describe('zip archives that list more entries than a torch.save file can have', () => {
  /** A zip64 archive whose central directory declares `count` entries (and is as large as they need), of zeros. */
  function manyEntries(count: number): Buffer {
    const cdSize = 46 * count;
    const buf = Buffer.alloc(cdSize + 56 + 20 + 22);
    const z64 = cdSize;
    buf.writeUInt32LE(0x06064b50, z64); buf.writeBigUInt64LE(44n, z64 + 4); buf.writeUInt16LE(45, z64 + 12); buf.writeUInt16LE(45, z64 + 14);
    buf.writeBigUInt64LE(BigInt(count), z64 + 24); buf.writeBigUInt64LE(BigInt(count), z64 + 32); buf.writeBigUInt64LE(BigInt(cdSize), z64 + 40); buf.writeBigUInt64LE(0n, z64 + 48);
    const locator = z64 + 56;
    buf.writeUInt32LE(0x07064b50, locator); buf.writeBigUInt64LE(BigInt(z64), locator + 8); buf.writeUInt32LE(1, locator + 16);
    const eocd = locator + 20;
    buf.writeUInt32LE(0x06054b50, eocd); buf.writeUInt16LE(0xffff, eocd + 8); buf.writeUInt16LE(0xffff, eocd + 10);
    buf.writeUInt32LE(0xffffffff, eocd + 12); buf.writeUInt32LE(0xffffffff, eocd + 16);
    return buf;
  }

  test('H5: MAX_ZIP_ENTRIES + 1 entries are refused from the end records, before any entry is read', () => {
    assert.equal(MAX_ZIP_ENTRIES, 5 * MAX_PARAMS + 16); // five storages per parameter of a checkpoint, and torch.save's own records
    const err = refusal(() => readTorchSave(manyEntries(MAX_ZIP_ENTRIES + 1)));
    assert.equal(err.code, 'ZIP_LIMIT_EXCEEDED');
    assert.match(err.message, /^zip archive lists 500017 entries; at most 500016 are allowed/);
    // a caller may set its own bound
    const small = archiveOf(pickleOf('N'));
    assert.equal(readTorchSave(small, { maxEntries: 2 }), null);
    assert.equal(refusal(() => readZip(small, { maxEntries: 1 })).code, 'ZIP_LIMIT_EXCEEDED');
  });
});
