import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fmaf32, FLT_MAX } from '../../src/optim/fma.ts';
import { exactFmaf32, float32Bits, hex32 } from './exact.ts';
import { mulberry32, randomFiniteFloat32, randomFloat32InBinades } from './random.ts';
import { halfwayTriples } from './halfway.ts';

/** What a kernel gets when it rounds the double a*b + c to float32 without the halfway fix-up. */
const doubleRounded = (a: number, b: number, c: number) => Math.fround(a * b + c);

function assertSameBits(a: number, b: number, c: number, expected = exactFmaf32(a, b, c)) {
  const got = fmaf32(a, b, c);
  if (float32Bits(got) !== float32Bits(expected)) {
    assert.fail(`fmaf32(${hex32(a)}, ${hex32(b)}, ${hex32(c)}) = ${hex32(got)}, exact ${hex32(expected)}`);
  }
}

test('the constructed case from the reference rounds like a hardware FMA', () => {
  const a = Math.fround(1 + 2 ** -23);
  const b = Math.fround((1 - 2 ** -23) * 2 ** -24);
  assert.equal(fmaf32(a, b, a), 1 + 2 ** -23); // 0x1.000002p+0
  assert.equal(doubleRounded(a, b, a), 1 + 2 ** -22); // 0x1.000004p+0: the trap
  assert.equal(exactFmaf32(a, b, a), 1 + 2 ** -23);
});

test('random float32 bit patterns: fmaf32 equals the exact BigInt rounding', () => {
  const next = mulberry32(1);
  for (let i = 0; i < 100_000; i++) {
    assertSameBits(randomFiniteFloat32(next), randomFiniteFloat32(next), randomFiniteFloat32(next));
  }
});

test('random operands of nearby magnitudes (cancellation, subnormal and overflowing results)', () => {
  const next = mulberry32(2);
  for (let i = 0; i < 100_000; i++) {
    const e = (next() % 300) - 150;
    const ea = (next() % 60) - 30 + Math.trunc(e / 2);
    const a = randomFloat32InBinades(next, Math.max(-149, ea - 2), Math.min(127, ea + 2));
    const b = randomFloat32InBinades(next, Math.max(-149, e - ea - 2), Math.min(127, e - ea + 2));
    const c = next() & 1 ? Math.fround(-a * b) : randomFloat32InBinades(next, Math.max(-149, e - 30), Math.min(127, e + 2));
    assertSameBits(a, b, c);
  }
});

test('halfway cases with normal results: exact, where the naive double rounding is wrong for about half', () => {
  const cases = halfwayTriples(3, 1500, false);
  let naiveWrong = 0;
  for (const [a, b, c] of cases) {
    const exact = exactFmaf32(a, b, c);
    assertSameBits(a, b, c, exact);
    if (float32Bits(doubleRounded(a, b, c)) !== float32Bits(exact)) naiveWrong++;
  }
  // Ties-to-even sends the naive result the right way half of the time.
  assert.ok(naiveWrong > cases.length / 3, `only ${naiveWrong} of ${cases.length} were traps`);
});

test('halfway cases with subnormal results', () => {
  const cases = halfwayTriples(4, 2000, true);
  let naiveWrong = 0;
  for (const [a, b, c] of cases) {
    const exact = exactFmaf32(a, b, c);
    assert.ok(Math.abs(exact) < 2 ** -126, 'result must be subnormal');
    assertSameBits(a, b, c, exact);
    if (float32Bits(doubleRounded(a, b, c)) !== float32Bits(exact)) naiveWrong++;
  }
  assert.ok(naiveWrong > cases.length / 3, `only ${naiveWrong} of ${cases.length} were traps`);
});

test('difference-of-squares family: (1 + k·2^-23)(1 - k·2^-23) sits just below the midpoint', () => {
  let naiveWrong = 0;
  for (let k = 1; k < 200; k++) {
    for (const shift of [-140, -60, -24, 0, 40, 100]) {
      const a = Math.fround((1 + k * 2 ** -23) * 2 ** shift);
      const b = Math.fround((1 - k * 2 ** -23) * 2 ** -24);
      for (const mantissa of [1, 3, 0x7fffff, 0x123457]) {
        const c = Math.fround((1 + mantissa * 2 ** -23) * 2 ** shift);
        assertSameBits(a, b, c);
        assertSameBits(-a, b, -c);
        if (doubleRounded(a, b, c) !== exactFmaf32(a, b, c)) naiveWrong++;
      }
    }
  }
  assert.ok(naiveWrong > 1000, `${naiveWrong} traps`);
});

test('overflow threshold: just below 2^128 - 2^103 stays finite', () => {
  const a = Math.fround((1 + 2 ** -23) * 2 ** 52);
  const b = Math.fround((1 - 2 ** -23) * 2 ** 51);
  assert.equal(fmaf32(a, b, FLT_MAX), FLT_MAX);
  assert.equal(fmaf32(-a, b, -FLT_MAX), -FLT_MAX);
  assert.equal(doubleRounded(a, b, FLT_MAX), Infinity); // the trap
  assert.equal(fmaf32(Math.fround(2 ** 52), Math.fround(2 ** 51), FLT_MAX), Infinity); // a true tie
  assert.equal(fmaf32(Math.fround((1 + 2 ** -23) * 2 ** 52), Math.fround(2 ** 51), FLT_MAX), Infinity);
});

test('zeros, infinities and NaN follow IEEE 754', () => {
  assert.ok(Object.is(fmaf32(0, 5, -0), 0));
  assert.ok(Object.is(fmaf32(-0, 5, -0), -0));
  assert.ok(Object.is(fmaf32(2, 3, -6), 0));
  assert.ok(Object.is(Math.sign(fmaf32(Math.fround(1e-30), Math.fround(1e-30), -0)), 0)); // underflows to +0
  assert.ok(Object.is(fmaf32(Math.fround(-1e-30), Math.fround(1e-30), 0), -0));
  assert.equal(fmaf32(Infinity, 1, 5), Infinity);
  assert.ok(Number.isNaN(fmaf32(Infinity, 0, 5)));
  assert.ok(Number.isNaN(fmaf32(Infinity, 1, -Infinity)));
  assert.ok(Number.isNaN(fmaf32(NaN, 1, 1)));
  assert.equal(fmaf32(FLT_MAX, 2, -FLT_MAX), FLT_MAX); // the exact product is not overflowed
});
