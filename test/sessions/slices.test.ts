// Large copies and checksums of a session's tensors are made a slice (8 MB) at a time, with other work let
// run between the slices: a fork of a 3e7-parameter session held every other request for 2.3 s in one piece.
// What the rest of the code relies on: the copy is exact to the bit, the checksum is the one stored
// snapshots carry (sha256 of the bytes, then the canonical JSON of groups and scalars), and work queued
// before a multi-slice copy or hash runs before it is done.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import type { GroupSpec } from '../../src/db/schema.ts';
import { copyInSlices, copyOf, SLICE_BYTES } from '../../src/sessions/slices.ts';
import { canonicalJson, snapshotChecksum } from '../../src/sessions/state.ts';

const SLICE = SLICE_BYTES / 4;

/** Floats whose bits are all different, NaN payloads and -0 included. */
function floats(n: number): Float32Array {
  const bits = new Uint32Array(n);
  for (let i = 0; i < n; i++) bits[i] = Math.imul(i + 1, 2654435761) >>> 0;
  bits[0] = 0x80000000; // -0
  if (n > 1) bits[1] = 0x7fc00001; // a NaN with a payload
  return new Float32Array(bits.buffer);
}

const bitsOf = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

/** Runs `work` and says whether an immediate queued just before it ran before it resolved. */
async function turnsDuring(work: () => Promise<unknown>): Promise<boolean> {
  let ran = false;
  setImmediate(() => (ran = true));
  await work();
  return ran;
}

test('copies are exact to the bit at every size, and a copy of several slices lets queued work run', async () => {
  for (const n of [0, 1, 1000, SLICE - 1, SLICE, SLICE + 1, 2 * SLICE + 123]) {
    const src = floats(n);
    const copy = await copyOf(src);
    assert.notEqual(copy.buffer, src.buffer);
    assert.ok(bitsOf(copy).equals(bitsOf(src)), `copyOf ${n}`);
    const into = new Float32Array(n + 7);
    await copyInSlices(into, src, 5);
    assert.ok(bitsOf(into.subarray(5, 5 + n)).equals(bitsOf(src)), `copyInSlices ${n}`);
    assert.equal(into[4], 0);
    assert.equal(into[n + 5], 0);
  }
  assert.equal(await turnsDuring(() => copyOf(floats(2 * SLICE + 1))), true, 'a three-slice copy yields');
  const bytes = Buffer.from(bitsOf(floats(SLICE + 9)));
  const out = Buffer.alloc(bytes.byteLength);
  assert.equal(await turnsDuring(() => copyInSlices(out, bytes)), true, 'a byte copy over a slice yields');
  assert.ok(out.equals(bytes));
});

test('a snapshot checksum is sha256 of the bytes in order, then the canonical JSON; over a slice it lets queued work run', async () => {
  const groups: GroupSpec[] = [{ params: [0, 1], lr: 0.01, lambd: 1e-4, alpha: 0.75, t0: 1e6, weight_decay: 0, maximize: false }];
  const scalars = [{ step: 3, eta: 0.009999999776482582, mu: 1 }, null];
  for (const sizes of [[0], [100], [SLICE_BYTES], [SLICE_BYTES, 5], [3, SLICE_BYTES + 17, 2 * SLICE_BYTES + 1]]) {
    const chunks = sizes.map((n, k) => Buffer.from(bitsOf(floats(Math.ceil(n / 4) + k)).subarray(0, n)));
    const expected = createHash('sha256');
    for (const c of chunks) expected.update(c);
    expected.update(canonicalJson({ groups, scalars }));
    assert.equal(await snapshotChecksum(chunks, groups, scalars), expected.digest('hex'), `chunks of ${sizes.join(', ')} bytes`);
  }
  const big = [Buffer.alloc(SLICE_BYTES, 1), Buffer.alloc(10, 2)];
  assert.equal(await turnsDuring(() => snapshotChecksum(big, [], [])), true);
});
