import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fmaf32, FLT_MAX } from '../../src/optim/fma.ts';
import { exactFmaf32, float32Bits, hex32 } from './exact.ts';
import { mulberry32, randomFiniteFloat32, randomFloat32InBinades } from './random.ts';

/** What a kernel gets when it rounds the double a*b + c to float32 without the halfway fix-up. */
const doubleRounded = (a: number, b: number, c: number) => Math.fround(a * b + c);

function assertSameBits(a: number, b: number, c: number, expected = exactFmaf32(a, b, c)) {
  const got = fmaf32(a, b, c);
  if (float32Bits(got) !== float32Bits(expected)) {
    assert.fail(`fmaf32(${hex32(a)}, ${hex32(b)}, ${hex32(c)}) = ${hex32(got)}, exact ${hex32(expected)}`);
  }
}

/**
 * Triples whose double sum lands exactly on a float32 midpoint although the exact sum does not:
 * b*a ≡ 2^(K-1) + d (mod 2^K) puts the product's part below the float32 grid of the result just
 * off its half-way point, by less than the double grid resolves. Solved with a modular inverse.
 */
function halfwayTriples(seed: number, count: number, subnormalResults: boolean): Array<[number, number, number]> {
  const next = mulberry32(seed);
  const out: Array<[number, number, number]> = [];
  while (out.length < count) {
    const K = 31 + (next() % (subnormalResults ? 6 : 17));
    const modulus = 1n << BigInt(K);
    const E = BigInt((next() & 0x7fffff) | 0x800001); // odd 24-bit mantissa of b
    const inverse = modInverse(E, modulus);
    const window = 1 << Math.max(0, K - 31);
    const d = BigInt(1 + (next() % window)) * (next() & 1 ? 1n : -1n);
    const G = (((modulus >> 1n) + d) * inverse) % modulus;
    const limit = subnormalResults ? 1n << 23n : 1n << 24n;
    if (G === 0n || G >= limit || (!subnormalResults && G < 1n << 23n)) continue;
    let a: number, b: number, c: number;
    if (subnormalResults) {
      // a subnormal (ulp 2^-149), b = E * 2^-K, so the product's ulp is 2^(-149-K); c on the 2^-149 grid.
      a = Number(G) * 2 ** -149;
      b = Number(E) * 2 ** -K;
      c = (0x400000 + (next() % 0x3f0000)) * 2 ** -149; // 2^-127 <= |s| < 2^-126: double ulp 2^-179
    } else {
      // c in [1, 2) has float32 ulp 2^-23; the product's ulp must be 2^(-23-K).
      const eb = -(next() % 20) - 23;
      b = Number(E) * 2 ** eb;
      a = Number(G) * 2 ** (-23 - K - eb);
      c = Math.fround(1 + (next() & 0x7fffff) * 2 ** -23);
      const scale = 2 ** ((next() % 200) - 100);
      a *= scale;
      c *= scale;
    }
    const signs = next();
    if (signs & 1) a = -a;
    if (signs & 2) b = -b;
    if (signs & 4) c = -c;
    if (Math.fround(a) !== a || Math.fround(b) !== b || Math.fround(c) !== c) continue;
    out.push([a, b, c]);
  }
  return out;
}

function modInverse(x: bigint, modulus: bigint): bigint {
  // Newton iteration for the inverse of an odd number modulo a power of two.
  let y = x;
  for (let i = 0; i < 7; i++) y = (y * (2n - x * y)) % modulus;
  return ((y % modulus) + modulus) % modulus;
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
