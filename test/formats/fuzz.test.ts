// Committed torch.save files (scripts/formats/make-fixtures.sh) read exactly without PyTorch, and a
// seeded fuzz loop: thousands of mutated valid files through every reader, which may only ever
// throw FormatError (anything else would be a 500 for a user's bad upload).
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  FormatError, PyDict, findTorchGlobal, readSafetensors, readTorchSave, readZip, streamToBuffer, toAsgdStateDict, toCheckpoint, toModelStateDict,
  unpickle, writeSafetensors, type PyValue,
} from '../../src/formats/index.ts';
import { describeValue } from './describe.ts';

const FIXTURES = join(import.meta.dirname, '../fixtures/formats');
const torchDirs = readdirSync(FIXTURES).filter((d) => d.startsWith('torch-'));

describe('committed torch.save fixtures', () => {
  for (const dir of torchDirs) {
    test(`${dir}: every file reads exactly and converts to the typed forms`, () => {
      const manifest = JSON.parse(readFileSync(join(FIXTURES, dir, 'manifest.json'), 'utf8')) as { files: Record<string, unknown> };
      for (const [name, expected] of Object.entries(manifest.files)) {
        assert.deepStrictEqual(describeValue(readTorchSave(readFileSync(join(FIXTURES, dir, name)))), expected, `${dir}/${name}`);
      }
      const read = (name: string) => readTorchSave(readFileSync(join(FIXTURES, dir, name)));
      assert.equal(toAsgdStateDict(read('asgd.pt')).state.get(1)!.step, 6);
      assert.equal(toModelStateDict(read('model.pt')).tensors.size, 7);
      assert.equal(toCheckpoint(read('checkpoint.pt')).step, 6);
    });
  }
});

/** mulberry32: a small seeded PRNG, so every failure reproduces. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const INTERESTING = [0x00, 0xff, 0x7f, 0x80, 0x01, 0x2e, 0x28, 0x71, 0x68, 0x58, 0x4b, 0x8a, 0x93];

function mutate(seed: Uint8Array, random: () => number): Buffer {
  const out = Buffer.from(seed);
  const pick = (n: number) => Math.floor(random() * n);
  switch (pick(6)) {
    case 0: { // flip a few bits
      for (let i = 1 + pick(4); i > 0; i--) out[pick(out.length)] ^= 1 << pick(8);
      return out;
    }
    case 1: { // overwrite bytes with boundary and opcode values
      for (let i = 1 + pick(4); i > 0; i--) out[pick(out.length)] = INTERESTING[pick(INTERESTING.length)];
      return out;
    }
    case 2: // truncate
      return out.subarray(0, pick(out.length));
    case 3: { // delete a range
      const start = pick(out.length);
      return Buffer.concat([out.subarray(0, start), out.subarray(start + 1 + pick(16))]);
    }
    case 4: { // insert random bytes
      const start = pick(out.length);
      const noise = Buffer.from(Array.from({ length: 1 + pick(8) }, () => pick(256)));
      return Buffer.concat([out.subarray(0, start), noise, out.subarray(start)]);
    }
    default: { // overwrite a 32-bit little-endian field with an extreme value
      const at = pick(Math.max(1, out.length - 4));
      if (out.length >= 4) out.writeUInt32LE([0, 1, 0x7fffffff, 0xffffffff, out.length, 64][pick(6)], at);
      return out;
    }
  }
}

/** Runs `read` on `count` mutations of each seed; fails on anything thrown that is not a FormatError. */
function fuzz(seeds: Uint8Array[], count: number, seed: number, read: (input: Buffer) => unknown): { refused: number; accepted: number } {
  const random = rng(seed);
  let refused = 0;
  let accepted = 0;
  for (let i = 0; i < count; i++) {
    const input = mutate(seeds[i % seeds.length], random);
    try {
      read(input);
      accepted++;
    } catch (err) {
      if (!(err instanceof FormatError)) {
        assert.fail(`seed ${seed}, case ${i}: ${(err as Error)?.stack ?? String(err)}\ninput: ${input.toString('base64')}`);
      }
      refused++;
    }
  }
  return { refused, accepted };
}

/** Reads a value the way the service does: walk it all and try every typed converter. */
function consume(value: PyValue): void {
  describeValue(value);
  for (const convert of [toAsgdStateDict, toModelStateDict, toCheckpoint]) {
    try {
      convert(value, { toFloat32: true });
    } catch (err) {
      if (!(err instanceof FormatError)) throw err;
    }
  }
}

const torchSeeds = torchDirs.flatMap((dir) =>
  readdirSync(join(FIXTURES, dir)).filter((f) => f.endsWith('.pt')).map((f) => readFileSync(join(FIXTURES, dir, f))));

describe('fuzz: mutated valid files only ever raise FormatError', () => {
  test('torch.save files (CRC checks off, so mutations reach the unpickler)', () => {
    assert.ok(torchSeeds.length >= 8);
    const result = fuzz(torchSeeds, 1500, 1, (input) => consume(readTorchSave(input, { verifyCrc: false })));
    assert.ok(result.refused > 300 && result.accepted > 50, JSON.stringify(result));
  });

  test('torch.save files with CRC checks on', () => {
    fuzz(torchSeeds, 500, 2, (input) => consume(readTorchSave(input)));
  });

  test('bare pickles (data.pkl of each fixture)', () => {
    const pickles = torchSeeds.map((file) => {
      const zip = readZip(file);
      return zip.read([...zip.entries.keys()].find((n) => n.endsWith('/data.pkl'))!);
    });
    const result = fuzz(pickles, 1500, 3, (input) =>
      describeValue(unpickle(input, { findGlobal: findTorchGlobal, persistentLoad: () => new PyDict() as never })));
    assert.ok(result.refused > 300, JSON.stringify(result));
  });

  test('safetensors files', () => {
    const seeds = [
      streamToBuffer(writeSafetensors([
        ['w', { dtype: 'float32', shape: [2, 3], data: Float32Array.of(1, 2, 3, 4, 5, 6) }],
        ['b', { dtype: 'float32', shape: [], data: Float32Array.of(1) }],
      ], { step: '3' })),
      streamToBuffer(writeSafetensors([['i', { dtype: 'int64', shape: [2], data: BigInt64Array.of(1n, 2n) }], ['e', { dtype: 'float32', shape: [0], data: new Float32Array(0) }]])),
    ];
    const result = fuzz(seeds, 1500, 4, (input) => {
      const file = readSafetensors(input, { dtypes: 'all' });
      for (const tensor of file.tensors.values()) describeValue(tensor);
    });
    assert.ok(result.refused > 300 && result.accepted > 10, JSON.stringify(result));
  });
});
