// Fused multiply-add rounded like float32 hardware FMA (vfmadd on AVX2, fmla on NEON), in plain JS.
//
// PyTorch's CPU add kernel computes `a + alpha * b` as vec::fmadd(b, alpha, a) (aten/src/ATen/native/
// ufunc/add.h), i.e. ONE rounding of the exact a*b + c to float32. JS has no float32 FMA, so we build it:
//  - the product of two float32 values has at most 48 significant bits and an exponent far inside
//    double's range, so `a * b` in double is exact (no rounding, no underflow, no overflow);
//  - `s = p + c` in double rounds once, to 53 bits. Rounding s again to float32 (24 bits) gives the
//    right answer except when s lands EXACTLY on a float32 midpoint (the tie of the second rounding
//    then hides which side the exact sum was on). Only then do we need the rounding error of the sum
//    (TwoSum, Knuth), whose sign says on which side of the midpoint the exact sum lies.
// Double rounding cannot jump over a midpoint (midpoints are doubles), so no other case can go wrong.

/** Largest finite float32, (2 - 2^-23) * 2^127. */
export const FLT_MAX = 3.4028234663852886e38;
/** Halfway between FLT_MAX and 2^128: the float32 overflow threshold under round-to-nearest-even. */
const FLT_OVERFLOW_EDGE = 3.4028235677973366e38; // 2^128 - 2^103

/**
 * float32(a * b + c) with a single rounding (round to nearest, ties to even), for float32 inputs
 * held in JS numbers. Matches C's fmaf and x86/ARM float32 FMA instructions bit for bit, including
 * subnormal results and the overflow threshold (NaN payloads aside).
 */
export function fmaf32(a: number, b: number, c: number): number {
  const p = a * b; // exact for float32 inputs
  const s = p + c;
  const r = Math.fround(s);
  if (r === s || s !== s) return r; // s is a float32 already (so exact enough), or NaN
  return fmaf32Rare(p, c, s, r);
}

/** The part of fmaf32 that runs only when s is not a float32: is s a float32 midpoint? */
function fmaf32Rare(p: number, c: number, s: number, r: number): number {
  if (r === Infinity || r === -Infinity) {
    // Only the overflow threshold itself is ambiguous: below it the exact value rounds to FLT_MAX.
    if (Math.abs(s) !== FLT_OVERFLOW_EDGE) return r;
    const e = twoSumError(p, c, s);
    if (e === 0 || (e > 0) === (s > 0)) return r;
    return s > 0 ? FLT_MAX : -FLT_MAX;
  }
  // If s is halfway between two float32 values, r is one of them and o = 2s - r is the other
  // (computed exactly: s - r is exact by Sterbenz, and o is representable). If s is not halfway,
  // o lies strictly between two float32 values, so it is not one.
  const o = s + (s - r);
  if (Math.fround(o) !== o) return r;
  const e = twoSumError(p, c, s);
  if (e === 0) return r; // a true tie: Math.fround already chose the even one
  // The exact sum is s + e: pick the neighbour on e's side.
  return e > 0 ? Math.max(r, o) : Math.min(r, o);
}

/** The rounding error of s = fl(p + c): exactly p + c - s (TwoSum, Knuth; no branch on magnitudes). */
export function twoSumError(p: number, c: number, s: number): number {
  const cv = s - p;
  const pv = s - cv;
  return (p - pv) + (c - cv);
}

/** float32(a * b + c) with two roundings (the multiply, then the add), as unfused float32 code. */
export function mulAddUnfusedf32(a: number, b: number, c: number): number {
  return Math.fround(Math.fround(a * b) + c);
}
