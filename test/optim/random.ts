// Seeded pseudo-random numbers for tests (mulberry32): reproducible, no dependencies.

export { mulberry32 } from '../../src/optim/fma-cases.ts';

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** A random finite float32 from uniformly random bits (every exponent equally likely). */
export function randomFiniteFloat32(next: () => number): number {
  for (;;) {
    u32[0] = next();
    if (Number.isFinite(f32[0])) return f32[0];
  }
}

/** A random float32 with exponent in [minExp, maxExp] and a random sign and mantissa. */
export function randomFloat32InBinades(next: () => number, minExp: number, maxExp: number): number {
  const exponent = minExp + (next() % (maxExp - minExp + 1));
  const mantissa = 1 + (next() & 0x7fffff) / 0x800000;
  const sign = next() & 1 ? -1 : 1;
  return Math.fround(sign * mantissa * 2 ** exponent);
}
