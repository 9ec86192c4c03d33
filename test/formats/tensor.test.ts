import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, test } from 'node:test';
import {
  FormatError, arrayFromBytes, bfloat16ToFloat, checkShape, contiguousStrides, halfToFloat, int64ToFloat32, makeTensor, numel, scalarValue,
  toFloat32, toFloat32Tensor,
} from '../../src/formats/index.ts';

describe('tensor helpers', () => {
  test('numel, strides and shape checks', () => {
    assert.equal(numel([]), 1);
    assert.equal(numel([2, 0, 3]), 0);
    assert.deepEqual(contiguousStrides([2, 3, 4]), [12, 4, 1]);
    assert.deepEqual(contiguousStrides([]), []);
    // torch.zeros(3, 0).stride() == (1, 1), torch.zeros(0, 4).stride() == (4, 1): a size of 0 counts as 1.
    assert.deepEqual(contiguousStrides([3, 0]), [1, 1]);
    assert.deepEqual(contiguousStrides([0, 4]), [4, 1]);
    assert.deepEqual(contiguousStrides([2, 0, 5]), [5, 5, 1]);
    assert.throws(() => checkShape([2, -1]), (err: FormatError) => err.code === 'TENSOR_SHAPE_INVALID');
    assert.throws(() => checkShape([2 ** 30, 2 ** 30, 2 ** 30]), (err: FormatError) => err.code === 'TENSOR_SHAPE_INVALID');
    assert.throws(() => makeTensor('float32', [2, 2], new Float32Array(3)), (err: FormatError) => err.code === 'TENSOR_SHAPE_INVALID');
    assert.throws(() => makeTensor('float32', [1], new Float64Array(1) as never), (err: FormatError) => err.code === 'TENSOR_DTYPE_UNSUPPORTED');
    assert.throws(() => makeTensor('complex64' as never, [1], new Float32Array(2) as never), (err: FormatError) => err.code === 'TENSOR_DTYPE_UNSUPPORTED' && /complex64/.test(err.message));
  });

  test('arrayFromBytes views aligned bytes and copies unaligned ones', () => {
    const file = Buffer.alloc(24);
    file.writeFloatLE(1.5, 8);
    file.writeFloatLE(-2, 13);
    const aligned = arrayFromBytes('float32', file.subarray(8, 12));
    assert.equal(aligned.buffer, file.buffer);
    assert.deepEqual([...aligned], [1.5]);
    const unaligned = arrayFromBytes('float32', file.subarray(13, 17));
    assert.notEqual(unaligned.buffer, file.buffer);
    assert.deepEqual([...unaligned], [-2]);
    assert.notEqual(arrayFromBytes('float32', file.subarray(8, 12), true).buffer, file.buffer);
    assert.throws(() => arrayFromBytes('float64', file.subarray(0, 12)), FormatError);
  });

  test('every float16 and bfloat16 bit pattern converts as CPython and torch do', () => {
    // struct's 'e' is IEEE half; bfloat16 is the top half of a float32.
    const result = spawnSync('python3', ['-c', `
import struct, sys
out = []
for bits in range(65536):
    h = struct.unpack('<e', struct.pack('<H', bits))[0]
    b = struct.unpack('<f', struct.pack('<I', bits << 16))[0]
    out.append(struct.pack('<ff', h, b))
sys.stdout.buffer.write(b''.join(out))
`], { maxBuffer: 1 << 20 });
    assert.equal(result.status, 0, String(result.stderr));
    const expected = new Float32Array(result.stdout.buffer, result.stdout.byteOffset, 2 * 65536);
    const half = toFloat32({ dtype: 'float16', shape: [65536], data: Uint16Array.from({ length: 65536 }, (_, i) => i) });
    const bf16 = toFloat32({ dtype: 'bfloat16', shape: [65536], data: Uint16Array.from({ length: 65536 }, (_, i) => i) });
    for (let bits = 0; bits < 65536; bits++) {
      assert.ok(Object.is(half[bits], expected[2 * bits]) || (Number.isNaN(half[bits]) && Number.isNaN(expected[2 * bits])), `half 0x${bits.toString(16)}`);
      assert.ok(Object.is(bf16[bits], expected[2 * bits + 1]) || (Number.isNaN(bf16[bits]) && Number.isNaN(expected[2 * bits + 1])), `bf16 0x${bits.toString(16)}`);
    }
    assert.equal(halfToFloat(0x3c00), 1);
    assert.equal(bfloat16ToFloat(0xc040), -3);
  });

  test('int64 to float32 rounds once, like torch (values measured with torch 1.13 .float())', () => {
    // 2**54 + 2**30 + 1: via a double it would hit a tie and round down to 2**54; torch gives 2**54 + 2**31.
    assert.equal(int64ToFloat32(2n ** 54n + 2n ** 30n + 1n), 18014400656965632);
    assert.equal(int64ToFloat32(-(2n ** 54n + 2n ** 30n + 1n)), -18014400656965632);
    assert.equal(int64ToFloat32(2n ** 63n - 1n), 2 ** 63);
    assert.equal(int64ToFloat32(-(2n ** 63n)), -(2 ** 63));
    assert.equal(int64ToFloat32(2n ** 24n + 1n), 2 ** 24);
    assert.equal(int64ToFloat32(2n ** 24n + 3n), 2 ** 24 + 4);
    assert.equal(int64ToFloat32(2n ** 53n + 1n), 2 ** 53);
    assert.equal(int64ToFloat32(0n), 0);
  });

  test('toFloat32 keeps float32 data by reference and converts the rest', () => {
    const data = Float32Array.of(1, 2);
    assert.equal(toFloat32({ dtype: 'float32', shape: [2], data }), data);
    assert.deepEqual([...toFloat32({ dtype: 'float64', shape: [2], data: Float64Array.of(0.1, 1e300) })], [Math.fround(0.1), Infinity]);
    assert.deepEqual([...toFloat32({ dtype: 'int64', shape: [1], data: BigInt64Array.of(-5n) })], [-5]);
    assert.deepEqual([...toFloat32({ dtype: 'bool', shape: [2], data: Uint8Array.of(1, 0) })], [1, 0]);
    const converted = toFloat32Tensor({ dtype: 'float64', shape: [], data: Float64Array.of(0.1), requiresGrad: true });
    assert.deepEqual(converted, { dtype: 'float32', shape: [], data: Float32Array.of(Math.fround(0.1)), requiresGrad: true });
    assert.equal(scalarValue({ dtype: 'int64', shape: [], data: BigInt64Array.of(7n) }), 7n);
    assert.throws(() => scalarValue({ dtype: 'float32', shape: [2], data: new Float32Array(2) }), FormatError);
  });
});
