// Exact reference arithmetic for tests: rationals with power-of-two denominators as BigInt * 2^e.
// Slow and obviously correct: nothing here relies on the double tricks that src/optim/fma.ts uses.

const f64 = new Float64Array(1);
const u64 = new BigUint64Array(f64.buffer);
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** x = mantissa * 2^exponent exactly, for a finite double x. */
export function decompose(x: number): { mantissa: bigint; exponent: number } {
  f64[0] = x;
  const bits = u64[0];
  const negative = bits >> 63n === 1n;
  const biased = Number((bits >> 52n) & 0x7ffn);
  let mantissa = bits & ((1n << 52n) - 1n);
  let exponent: number;
  if (biased === 0) exponent = -1074;
  else {
    mantissa |= 1n << 52n;
    exponent = biased - 1075;
  }
  return { mantissa: negative ? -mantissa : mantissa, exponent };
}

/** Round n * 2^e (exact, nonzero) to the nearest float32, ties to even, with subnormals and overflow. */
export function roundToFloat32(n: bigint, e: number): number {
  const negative = n < 0n;
  let magnitude = negative ? -n : n;
  const length = magnitude.toString(2).length;
  const topExponent = length - 1 + e; // floor(log2 |x|)
  const quantum = Math.max(topExponent - 23, -149); // exponent of the float32 ulp at |x|
  let kept: bigint;
  if (quantum <= e) {
    kept = magnitude << BigInt(e - quantum);
  } else {
    const shift = BigInt(quantum - e);
    kept = magnitude >> shift;
    const rest = magnitude - (kept << shift);
    const half = 1n << (shift - 1n);
    if (rest > half || (rest === half && (kept & 1n) === 1n)) kept += 1n;
  }
  magnitude = kept;
  const value = Number(magnitude) * 2 ** quantum; // magnitude <= 2^24: exact
  const rounded = value >= 2 ** 128 ? Infinity : value;
  return negative ? -rounded : rounded;
}

/** The float32 nearest to the exact a*b + c (inputs float32 values). Non-finite inputs follow IEEE. */
export function exactFmaf32(a: number, b: number, c: number): number {
  if (!Number.isFinite(a) || !Number.isFinite(b) || !Number.isFinite(c)) return Math.fround(a * b + c);
  const da = decompose(a);
  const db = decompose(b);
  const dc = decompose(c);
  const ep = da.exponent + db.exponent;
  const e = Math.min(ep, dc.exponent);
  const n = ((da.mantissa * db.mantissa) << BigInt(ep - e)) + (dc.mantissa << BigInt(dc.exponent - e));
  if (n === 0n) return Math.fround(a * b + c); // exact zero: IEEE's sign rule, which double follows too
  return roundToFloat32(n, e);
}

export function float32Bits(x: number): number {
  f32[0] = x;
  return u32[0];
}

export function hex32(x: number): string {
  return '0x' + float32Bits(x).toString(16).padStart(8, '0');
}
