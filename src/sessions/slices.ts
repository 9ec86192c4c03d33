// Large synchronous work (copying or hashing a model's tensors) done in slices, with other requests let run
// between them: a fork of a 3e7-parameter session held the event loop for 0.8 s in one piece (a 240 MB copy,
// a checksum of it), and every other session's steps and reads waited that long. Work of up to one slice
// is done at once, as before: a model of up to 2 million parameters never waits a turn.
import type { Hash } from 'node:crypto';

/** Bytes handled before the event loop gets a turn (a slice of a copy or a hash takes a few milliseconds). */
export const SLICE_BYTES = 8 * 1024 * 1024;

/** Lets the event loop run what is waiting (I/O callbacks included) before the next slice. */
export function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** dst.set(src, at), a slice at a time. Whoever changes src or dst waits for this (the caller holds the session's lock). */
export async function copyInSlices<T extends Float32Array | Uint8Array>(dst: T, src: T, at = 0): Promise<void> {
  const step = SLICE_BYTES / src.BYTES_PER_ELEMENT;
  for (let from = 0; from < src.length; from += step) {
    if (from > 0) await nextTurn();
    (dst as Float32Array).set(src.subarray(from, Math.min(src.length, from + step)) as Float32Array, at + from);
  }
}

/** A copy of src, made a slice at a time. */
export async function copyOf(src: Float32Array): Promise<Float32Array> {
  if (src.byteLength <= SLICE_BYTES) return src.slice();
  const out = new Float32Array(src.length);
  await copyInSlices(out, src);
  return out;
}

/** hash.update over `data`, a slice at a time; the event loop gets a turn before each slice after the first. */
export async function hashInSlices(hash: Hash, data: Uint8Array, first = true): Promise<void> {
  for (let from = 0; from < data.byteLength; from += SLICE_BYTES) {
    if (from > 0 || !first) await nextTurn();
    hash.update(data.subarray(from, Math.min(data.byteLength, from + SLICE_BYTES)));
  }
}
