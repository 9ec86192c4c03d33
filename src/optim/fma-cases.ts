// Adversarial inputs for a fused multiply-add, shared by the start-up self-test and the tests.

/** Seeded pseudo-random numbers (mulberry32): reproducible, no dependencies. */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/**
 * Triples whose double sum lands exactly on a float32 midpoint although the exact sum does not:
 * b*a ≡ 2^(K-1) + d (mod 2^K) puts the product's part below the float32 grid of the result just
 * off its half-way point, by less than the double grid resolves. Solved with a modular inverse.
 * A multiply and an add rounded separately, or the double a*b + c rounded to float32, get about half
 * of them wrong; a true FMA gets all of them right.
 */
export function halfwayTriples(seed: number, count: number, subnormalResults: boolean): Array<[number, number, number]> {
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
