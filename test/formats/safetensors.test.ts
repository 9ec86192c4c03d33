import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, test } from 'node:test';
import { FormatError, readSafetensors, streamToBuffer, writeSafetensors, type Tensor } from '../../src/formats/index.ts';

/** A safetensors file from a header object and body, the way the spec lays it out. */
function file(header: unknown, body: Uint8Array = new Uint8Array(0), pad = true): Buffer {
  let json = Buffer.from(JSON.stringify(header));
  if (pad) json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, json, body]);
}

function refused(buf: Uint8Array, code: string, message?: RegExp, options = {}): void {
  assert.throws(() => readSafetensors(buf, options), (err: unknown) => {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (message) assert.match(err.message, message);
    return true;
  });
}

const f32 = (...v: number[]) => new Uint8Array(Float32Array.from(v).buffer);

describe('safetensors interop (reference layout built by hand in Python: struct + json)', () => {
  test('we read files laid out per the spec, and Python parses ours the same way', () => {
    const ours = streamToBuffer(writeSafetensors([
      ['w', { dtype: 'float32', shape: [2, 2], data: Float32Array.of(1, -2, 3.5, 4) }],
      ['a.bias', { dtype: 'float32', shape: [3], data: Float32Array.of(0.25, 0, -1) }],
      ['scalar', { dtype: 'float32', shape: [], data: Float32Array.of(7) }],
    ], { format: 'pt', step: '12' }));
    const script = `
import json, struct, sys
def st(tensors, metadata=None, pad=True):
    header, body = {}, b''
    if metadata is not None:
        header['__metadata__'] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [len(body), len(body) + len(raw)]}
        body += raw
    h = json.dumps(header).encode()
    if pad:
        h += b' ' * ((8 - len(h) % 8) % 8)
    return struct.pack('<Q', len(h)) + h + body
refs = {
    'f32': st([('zeta', 'F32', [2], struct.pack('<2f', 1.5, -2.0)), ('alpha', 'F32', [1, 1], struct.pack('<f', 3.0))], {'k': 'v'}),
    'mixed': st([('d', 'F64', [1], struct.pack('<d', 0.1)), ('i', 'I64', [2], struct.pack('<2q', -1, 2**62)),
                 ('h', 'BF16', [1], struct.pack('<H', 0x3f80)), ('b', 'BOOL', [2], bytes([1, 0]))]),
    'unpadded': st([('x', 'F32', [1], struct.pack('<f', 9.0))], {'a': 'bc'}, pad=False),
    'empty': st([]),
}
data = bytes.fromhex(sys.stdin.read())
n = struct.unpack('<Q', data[:8])[0]
header = json.loads(data[8:8 + n])
body = data[8 + n:]
parsed = {name: [info['dtype'], info['shape'], list(struct.unpack('<%df' % ((info['data_offsets'][1] - info['data_offsets'][0]) // 4),
          body[info['data_offsets'][0]:info['data_offsets'][1]]))] for name, info in header.items() if name != '__metadata__'}
spans = sorted(info['data_offsets'] for name, info in header.items() if name != '__metadata__')
covered = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(body)
print(json.dumps({'refs': {k: v.hex() for k, v in refs.items()}, 'ours': {'n': n, 'metadata': header.get('__metadata__'),
      'order': list(header), 'tensors': parsed, 'covered': covered, 'padding': data[8:8 + n].decode()[-1:]}}))
`;
    const result = spawnSync('python3', ['-c', script], { input: ours.toString('hex'), encoding: 'utf8' });
    assert.equal(result.status, 0, result.stderr);
    const { refs, ours: parsed } = JSON.parse(result.stdout) as { refs: Record<string, string>; ours: Record<string, unknown> };

    assert.equal((parsed.n as number) % 8, 0);
    assert.deepEqual(parsed.metadata, { format: 'pt', step: '12' });
    assert.deepEqual(parsed.order, ['__metadata__', 'a.bias', 'scalar', 'w']);
    assert.deepEqual(parsed.tensors, { w: ['F32', [2, 2], [1, -2, 3.5, 4]], 'a.bias': ['F32', [3], [0.25, 0, -1]], scalar: ['F32', [], [7]] });
    assert.equal(parsed.covered, true);

    const ref = (name: string) => Buffer.from(refs[name], 'hex');
    const f = readSafetensors(ref('f32'));
    assert.deepEqual([...f.tensors.keys()], ['zeta', 'alpha']); // body order
    assert.deepEqual([...f.tensors.get('zeta')!.data], [1.5, -2]);
    assert.deepEqual(f.tensors.get('alpha')!.shape, [1, 1]);
    assert.deepEqual([...f.metadata], [['k', 'v']]);

    refused(ref('mixed'), 'TENSOR_DTYPE_UNSUPPORTED', /tensor d has dtype F64; only F32/);
    const mixed = readSafetensors(ref('mixed'), { dtypes: 'all' }).tensors;
    assert.deepEqual([...mixed.get('d')!.data], [0.1]);
    assert.deepEqual([...mixed.get('i')!.data], [-1n, 2n ** 62n]);
    assert.equal(mixed.get('h')!.dtype, 'bfloat16');
    assert.deepEqual([...mixed.get('b')!.data], [1, 0]);

    const unpadded = readSafetensors(ref('unpadded'));
    assert.deepEqual([...unpadded.tensors.get('x')!.data], [9]);
    assert.equal(readSafetensors(ref('empty')).tensors.size, 0);
  });
});

describe('safetensors writer', () => {
  test('round-trips with zero-copy views, sorts larger dtypes first then names, pads the header with spaces', () => {
    const w = Float32Array.of(1, 2, 3, 4, 5, 6);
    const tensors: [string, Tensor][] = [
      ['b', { dtype: 'float32', shape: [2, 3], data: w }],
      ['a', { dtype: 'float32', shape: [1], data: Float32Array.of(-1) }],
      ['c', { dtype: 'uint8', shape: [3], data: Uint8Array.of(1, 2, 3) }],
      ['d', { dtype: 'int64', shape: [1], data: BigInt64Array.of(5n) }],
      ['e', { dtype: 'float32', shape: [0], data: new Float32Array(0) }],
    ];
    const stream = writeSafetensors(tensors);
    const chunks = [...stream.chunks];
    assert.ok(chunks.some((c) => c.buffer === w.buffer), 'tensor data streamed by reference');
    const buf = streamToBuffer(stream);
    assert.equal(buf.length, stream.byteLength);
    const n = Number(buf.readBigUInt64LE(0));
    assert.equal(n % 8, 0);
    assert.match(buf.subarray(8, 8 + n).toString(), /^\{"d":.*\} *$/);
    const back = readSafetensors(buf, { dtypes: 'all' });
    assert.deepEqual([...back.tensors.keys()], ['d', 'a', 'b', 'e', 'c']);
    for (const [name, tensor] of tensors) assert.deepEqual(back.tensors.get(name), tensor, name);
    assert.equal(back.tensors.get('b')!.data.buffer, buf.buffer, 'aligned data read as a view');
    assert.notEqual(readSafetensors(buf, { dtypes: 'all', copy: true }).tensors.get('b')!.data.buffer, buf.buffer);
  });

  test('refuses what it cannot write', () => {
    assert.throws(() => writeSafetensors([['x', { dtype: 'float32', shape: [2], data: Float32Array.of(1) }]]), (err: FormatError) => err.code === 'TENSOR_SHAPE_INVALID');
    assert.throws(() => writeSafetensors([['__metadata__', { dtype: 'float32', shape: [], data: Float32Array.of(1) }]]), FormatError);
    assert.throws(() => writeSafetensors([['x', { dtype: 'float32', shape: [], data: Float32Array.of(1) }], ['x', { dtype: 'float32', shape: [], data: Float32Array.of(1) }]]), FormatError);
  });
});

describe('safetensors reader refuses hostile files', () => {
  const good = { x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };

  test('shapes and data_offsets are integers as written: 48.0 or 8e0 is refused, as the safetensors library refuses it', () => {
    const raw = (json: string, body: Uint8Array) => {
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
      return Buffer.concat([length, Buffer.from(json), body]);
    };
    assert.deepEqual([...readSafetensors(raw('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f32(1, 2))).tensors.get('x')!.data], [1, 2]);
    refused(raw('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /^tensor x data_offsets must be \[begin, end\]/);
    refused(raw('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0e0,8]}}', f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /data_offsets/);
    refused(raw('{"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', f32(1, 2)), 'TENSOR_SHAPE_INVALID', /^tensor x shape must be a list of non-negative integers/);
    // Digits before a dot or an e inside strings (names, metadata, an escaped quote) are no numbers.
    const named = readSafetensors(raw('{"__metadata__":{"note":"1.5e3 \\"2.0\\""},"layer1.e2":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f32(1, 2)));
    assert.deepEqual([...named.tensors.get('layer1.e2')!.data], [1, 2]);
    assert.equal(named.metadata.get('note'), '1.5e3 "2.0"');
    refused(raw('{"layer1.e2":{"dtype":"F32","shape":[2],"data_offsets":[0,8E0]}}', f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /^tensor layer1\.e2 data_offsets/);
    refused(raw('{"x\\"1.0":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}}', f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /data_offsets/);
  });

  test('header length beyond the body, short files, bad JSON', () => {
    refused(Buffer.alloc(4), 'SAFETENSORS_HEADER_INVALID', /too short/);
    const long = file(good, f32(1, 2));
    long.writeBigUInt64LE(BigInt(long.length), 0);
    refused(long, 'SAFETENSORS_HEADER_INVALID', /exceeds/);
    const huge = Buffer.from(long);
    huge.writeBigUInt64LE(2n ** 63n, 0);
    refused(huge, 'SAFETENSORS_HEADER_INVALID', /exceeds/);
    const badJson = Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{"x"')]);
    refused(badJson, 'SAFETENSORS_HEADER_INVALID', /JSON/);
    refused(Buffer.concat([Buffer.from([2, 0, 0, 0, 0, 0, 0, 0]), Buffer.from([0xc3, 0x28])]), 'SAFETENSORS_HEADER_INVALID', /UTF-8/);
    refused(file([1, 2]), 'SAFETENSORS_HEADER_INVALID', /object/);
    refused(file({ x: 'nope' }), 'SAFETENSORS_HEADER_INVALID');
    refused(file({ __metadata__: { a: 1 } }), 'SAFETENSORS_HEADER_INVALID', /__metadata__\.a/);
    // A byte-order mark before the JSON: the safetensors library refuses it (JSON has none), so do we.
    const json = Buffer.from('\ufeff{}', 'utf8');
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(json.length));
    refused(Buffer.concat([length, json]), 'SAFETENSORS_HEADER_INVALID', /JSON/);
  });

  test('offsets: overlapping, gaps, past the end, trailing bytes, inverted, non-integers', () => {
    refused(file({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, y: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, f32(1, 2, 3)), 'SAFETENSORS_HEADER_INVALID', /overlaps/);
    refused(file({ x: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /gap/);
    refused(file(good, f32(1)), 'SAFETENSORS_HEADER_INVALID', /past the 4-byte body/);
    refused(file(good, f32(1, 2, 3)), 'SAFETENSORS_HEADER_INVALID', /4 bytes after the last tensor/);
    refused(file({ x: { dtype: 'F32', shape: [0], data_offsets: [8, 0] } }, f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /begin <= end/);
    refused(file({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 8.5] } }, f32(1, 2)), 'SAFETENSORS_HEADER_INVALID');
    refused(file({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 2 ** 60] } }, f32(1, 2)), 'SAFETENSORS_HEADER_INVALID');
  });

  test('dtypes and shapes that do not match the bytes', () => {
    refused(file({ x: { dtype: 'F64', shape: [1], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_DTYPE_UNSUPPORTED', /F64/);
    refused(file({ x: { dtype: 'F8_E4M3', shape: [8], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_DTYPE_UNSUPPORTED', /F8_E4M3/, { dtypes: 'all' });
    refused(file({ x: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_SHAPE_INVALID', /needs 12 bytes/);
    refused(file({ x: { dtype: 'F32', shape: [-2], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_SHAPE_INVALID');
    refused(file({ x: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_SHAPE_INVALID');
    refused(file({ x: { shape: [2], data_offsets: [0, 8] } }, f32(1, 2)), 'SAFETENSORS_HEADER_INVALID', /dtype/);
    // Names on a plain object's prototype are no dtypes (they were taken for one, then sized as NaN bytes).
    for (const dtype of ['constructor', 'toString', '__proto__', 'hasOwnProperty']) {
      refused(file({ x: { dtype, shape: [2], data_offsets: [0, 8] } }, f32(1, 2)), 'TENSOR_DTYPE_UNSUPPORTED', new RegExp(`dtype ${dtype}, which is not supported`), { dtypes: 'all' });
    }
  });

  test('a tensor or __metadata__ named twice is refused, not one of them dropped', () => {
    const raw = (header: string, body: Uint8Array) => {
      const json = Buffer.from(header);
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt(json.length));
      return Buffer.concat([length, json, body]);
    };
    refused(raw('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', f32(1)), 'SAFETENSORS_HEADER_INVALID', /header names "x" twice/);
    refused(raw('{"__metadata__":{"a":"1"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"a":"2"}}', f32(1)), 'SAFETENSORS_HEADER_INVALID', /header names "__metadata__" twice/);
    refused(raw('{"__metadata__":{"a":"1","a":"2"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', f32(1)), 'SAFETENSORS_HEADER_INVALID', /header names "a" twice/);
    assert.deepEqual([...readSafetensors(raw('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', f32(1, 2))).tensors.keys()], ['x', 'y']);
  });
});
