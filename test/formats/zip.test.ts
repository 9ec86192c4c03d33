import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { describe, test } from 'node:test';
import { FormatError, readZip, streamToBuffer, zipStream, type ZipWriterEntry } from '../../src/formats/index.ts';
import { defaultInflateBudget } from '../../src/formats/zip-reader.ts';

const entry = (name: string, data: Uint8Array): ZipWriterEntry => ({ name, size: data.byteLength, data: () => [data] });
const bytes = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);

function sample(options = {}): { zip: Buffer; contents: Map<string, Uint8Array> } {
  const contents = new Map<string, Uint8Array>([
    ['archive/data.pkl', bytes(100)],
    ['archive/empty', new Uint8Array(0)],
    ['archive/data/0', new Uint8Array(new Float32Array([1, 2, 3]).buffer)],
    ['archive/ünï', bytes(7, 9)],
  ]);
  return { zip: streamToBuffer(zipStream([...contents].map(([n, d]) => entry(n, d)), options)), contents };
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    return err.code;
  }
  return 'no error';
}

/** Offsets of every central directory record. */
function centralRecords(zip: Buffer): number[] {
  const out: number[] = [];
  for (let i = zip.indexOf('PK\x01\x02'); i >= 0; i = zip.indexOf('PK\x01\x02', i + 1)) out.push(i);
  return out;
}

describe('zip writer', () => {
  test('round-trips entries; every data record starts on a 64-byte boundary after an FB padding field', () => {
    for (const forceZip64 of [false, true]) {
      const { zip, contents } = sample({ forceZip64 });
      const archive = readZip(zip);
      assert.deepEqual([...archive.entries.keys()], [...contents.keys()]);
      for (const [name, data] of contents) {
        const e = archive.entries.get(name)!;
        assert.equal(e.dataOffset % 64, 0, name);
        assert.deepEqual(new Uint8Array(archive.read(name)), data);
        const local = e.localHeaderOffset;
        const nameLength = zip.readUInt16LE(local + 26);
        const extra = zip.subarray(local + 30 + nameLength, e.dataOffset);
        const fb = extra.indexOf('FB');
        assert.ok(fb >= 0, 'FB extra field');
        assert.equal(extra.readUInt16LE(fb + 2), extra.length - fb - 4);
        assert.ok(extra.subarray(fb + 4).every((b) => b === 0x5a)); // 'Z' padding, as PyTorch writes
      }
      assert.equal(zip.includes(Buffer.from('PK\x06\x06', 'latin1')), forceZip64);
    }
  });

  test('knows its length up front, passes data through by reference, and repeats identically', () => {
    const big = new Float32Array(3_000_000); // 12 MB: handed out as several slices of the same memory
    big[2_999_999] = 7;
    const small = bytes(10);
    const stream = zipStream([entry('a/x', small), entry('a/big', new Uint8Array(big.buffer))]);
    const chunks = [...stream.chunks];
    assert.equal(chunks.reduce((n, c) => n + c.length, 0), stream.byteLength);
    const views = chunks.filter((c) => c.buffer === big.buffer);
    assert.ok(views.length >= 3, 'big entry streamed as views of the tensor memory');
    assert.equal(views.reduce((n, c) => n + c.length, 0), big.byteLength);
    assert.ok(chunks.some((c) => c.buffer === small.buffer));
    assert.ok(streamToBuffer(stream).equals(streamToBuffer(stream)));
    assert.equal(readZip(streamToBuffer(stream)).read('a/big').readFloatLE(4 * 2_999_999), 7);
  });

  test('an entry whose data yields a different size than declared is a writer bug and throws', () => {
    const stream = zipStream([{ name: 'a/x', size: 5, data: () => [bytes(4)] }]);
    assert.throws(() => streamToBuffer(stream), /yielded 4 bytes, declared 5/);
  });
});

describe('zip interop with Python zipfile', () => {
  test('Python reads and CRC-checks our archives (plain and zip64); we read its stored, deflated and zip64 archives', () => {
    const dir = mkdtempSync(join(tmpdir(), 'asgd-zip-'));
    try {
      writeFileSync(join(dir, 'ours.zip'), sample().zip);
      writeFileSync(join(dir, 'ours64.zip'), sample({ forceZip64: true }).zip);
      const script = `
import sys, zipfile, os
d = sys.argv[1]
for name in ('ours.zip', 'ours64.zip'):
    with zipfile.ZipFile(os.path.join(d, name)) as z:
        assert z.testzip() is None, name
        print(name, ','.join(f'{i.filename}:{z.read(i).hex()}' for i in z.infolist()))
payload = bytes((i * 7) % 251 for i in range(5000))
with zipfile.ZipFile(os.path.join(d, 'py.zip'), 'w') as z:
    z.writestr('p/stored', payload, compress_type=zipfile.ZIP_STORED)
    z.writestr('p/deflated', payload, compress_type=zipfile.ZIP_DEFLATED)
with zipfile.ZipFile(os.path.join(d, 'py64.zip'), 'w', compression=zipfile.ZIP_DEFLATED) as z:
    with z.open('p/forced', 'w', force_zip64=True) as f:
        f.write(payload)
`;
      const result = spawnSync('python3', ['-c', script, dir], { encoding: 'utf8' });
      assert.equal(result.status, 0, result.stderr);
      const expected = [...sample().contents].map(([n, d]) => `${n}:${Buffer.from(d).toString('hex')}`).join(',');
      assert.deepEqual(result.stdout.trim().split('\n'), [`ours.zip ${expected}`, `ours64.zip ${expected}`]);

      const payload = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 7) % 251));
      const py = readZip(readFileSync(join(dir, 'py.zip')));
      assert.equal(py.entries.get('p/deflated')!.method, 8);
      assert.ok(py.read('p/stored').equals(payload));
      assert.ok(py.read('p/deflated').equals(payload));
      assert.ok(readZip(readFileSync(join(dir, 'py64.zip'))).read('p/forced').equals(payload));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('zip reader refuses hostile archives', () => {
  test('truncated archives', () => {
    const { zip } = sample();
    assert.equal(codeOf(() => readZip(zip.subarray(0, zip.length - 1))), 'ZIP_TRUNCATED');
    assert.equal(codeOf(() => readZip(zip.subarray(0, 100))), 'ZIP_TRUNCATED');
    for (let cut = 0; cut < zip.length; cut += 7) {
      assert.match(codeOf(() => readZip(zip.subarray(0, cut))), /^ZIP_(TRUNCATED|CORRUPT)$/, `cut at ${cut}`);
    }
    assert.equal(codeOf(() => readZip(Buffer.alloc(0))), 'ZIP_CORRUPT');
    assert.equal(codeOf(() => readZip(Buffer.from('not a zip at all, just some text here'))), 'ZIP_CORRUPT');
  });

  test('a central directory that points outside the file', () => {
    const { zip } = sample();
    const eocd = zip.lastIndexOf('PK\x05\x06');
    const far = Buffer.from(zip);
    far.writeUInt32LE(zip.length + 1000, eocd + 16);
    assert.equal(codeOf(() => readZip(far)), 'ZIP_CORRUPT');
    const big = Buffer.from(zip);
    big.writeUInt32LE(0xfffffff0, eocd + 12);
    assert.equal(codeOf(() => readZip(big)), 'ZIP_CORRUPT');
    const local = Buffer.from(zip);
    local.writeUInt32LE(zip.length * 2, centralRecords(zip)[1] + 42);
    assert.match(codeOf(() => readZip(local)), /ZIP_CORRUPT/);
  });

  test('absurd entry counts, sizes and zip64 offsets', () => {
    const { zip } = sample();
    const eocd = zip.lastIndexOf('PK\x05\x06');
    const count = Buffer.from(zip);
    count.writeUInt16LE(0xfffe, eocd + 8);
    count.writeUInt16LE(0xfffe, eocd + 10);
    assert.equal(codeOf(() => readZip(count)), 'ZIP_CORRUPT');
    const size = Buffer.from(zip);
    const record = centralRecords(zip)[0];
    size.writeUInt32LE(0x7fffffff, record + 20);
    size.writeUInt32LE(0x7fffffff, record + 24);
    assert.equal(codeOf(() => readZip(size)), 'ZIP_CORRUPT');
    const z64 = sample({ forceZip64: true }).zip;
    const locator = z64.lastIndexOf('PK\x06\x07');
    const bad = Buffer.from(z64);
    bad.writeBigUInt64LE(2n ** 60n, locator + 8);
    assert.equal(codeOf(() => readZip(bad)), 'ZIP_CORRUPT');
    const cd64 = Buffer.from(z64);
    cd64.writeBigUInt64LE(2n ** 40n, z64.lastIndexOf('PK\x06\x06') + 24); // entries on this disk
    cd64.writeBigUInt64LE(2n ** 40n, z64.lastIndexOf('PK\x06\x06') + 32); // entries in total
    assert.equal(codeOf(() => readZip(cd64)), 'ZIP_CORRUPT');
  });

  test('overlapping entries and duplicate names', () => {
    const { zip } = sample();
    const records = centralRecords(zip);
    const overlap = Buffer.from(zip);
    // data.pkl claims 300 bytes: its data would run into the next entry's local header
    overlap.writeUInt32LE(300, records[0] + 20);
    overlap.writeUInt32LE(300, records[0] + 24);
    assert.throws(() => readZip(overlap), (err: FormatError) => err.code === 'ZIP_CORRUPT' && /overlap/.test(err.message));
    const twice = streamToBuffer(zipStream([entry('a/x', bytes(3)), entry('a/y', bytes(3))]));
    const second = centralRecords(twice)[1];
    twice.write('x', second + 46 + 2, 'latin1');
    const localOfSecond = twice.readUInt32LE(second + 42);
    twice.write('x', localOfSecond + 30 + 2, 'latin1');
    assert.equal(codeOf(() => readZip(twice)), 'ZIP_DUPLICATE_ENTRY');
  });

  test('encryption, unknown compression methods and multi-disk archives', () => {
    const { zip } = sample();
    const record = centralRecords(zip)[0];
    const encrypted = Buffer.from(zip);
    encrypted.writeUInt16LE(encrypted.readUInt16LE(record + 8) | 1, record + 8);
    assert.equal(codeOf(() => readZip(encrypted)), 'ZIP_UNSUPPORTED');
    const bzip2 = Buffer.from(zip);
    bzip2.writeUInt16LE(12, record + 10);
    assert.throws(() => readZip(bzip2), (err: FormatError) => err.code === 'ZIP_UNSUPPORTED' && /method 12/.test(err.message));
    const disk = Buffer.from(zip);
    disk.writeUInt16LE(1, zip.lastIndexOf('PK\x05\x06') + 4);
    assert.equal(codeOf(() => readZip(disk)), 'ZIP_UNSUPPORTED');
  });

  test('CRC mismatches are caught, except a stored CRC of 0 (PyTorch 2.x with CRCs disabled)', () => {
    const { zip } = sample();
    const archive = readZip(zip);
    const e = archive.entries.get('archive/data.pkl')!;
    const corrupt = Buffer.from(zip);
    corrupt[e.dataOffset] ^= 0xff;
    assert.equal(codeOf(() => readZip(corrupt).read('archive/data.pkl')), 'ZIP_CRC_MISMATCH');
    assert.equal(readZip(corrupt, { verifyCrc: false }).read('archive/data.pkl')[0], corrupt[e.dataOffset]);
    const zeroCrc = Buffer.from(corrupt);
    zeroCrc.writeUInt32LE(0, centralRecords(zip)[0] + 16);
    assert.equal(readZip(zeroCrc).read('archive/data.pkl').length, 100);
    assert.equal(codeOf(() => readZip(zip).read('archive/nope')), 'ZIP_ENTRY_MISSING');
  });

  test('deflate bombs: sizes beyond the DEFLATE ratio or the caller limit', () => {
    const deflated = deflateRawSync(Buffer.alloc(1 << 20));
    const zip = streamToBuffer(zipStream([entry('a/bomb', deflated)]));
    const record = centralRecords(zip)[0];
    const asDeflate = (size: number) => {
      const z = Buffer.from(zip);
      z.writeUInt16LE(8, record + 10);
      z.writeUInt32LE(0, record + 16);
      z.writeUInt32LE(size, record + 24);
      return z;
    };
    assert.equal(readZip(asDeflate(1 << 20)).read('a/bomb').length, 1 << 20);
    assert.equal(codeOf(() => readZip(asDeflate(1 << 20), { maxInflatedSize: 1000 }).read('a/bomb')), 'ZIP_LIMIT_EXCEEDED');
    const budget = readZip(asDeflate(1 << 20), { maxInflatedSize: (1 << 20) + 10 });
    budget.read('a/bomb');
    assert.equal(codeOf(() => budget.read('a/bomb')), 'ZIP_LIMIT_EXCEEDED'); // the limit is a total over all reads
    assert.equal(codeOf(() => readZip(asDeflate(0xfffffff0)).read('a/bomb')), 'ZIP_CORRUPT');
    assert.equal(codeOf(() => readZip(asDeflate((1 << 20) - 1)).read('a/bomb')), 'ZIP_CORRUPT');
    // More than its header says: said so, not in zlib's words ("Cannot create a Buffer larger than …").
    assert.throws(() => readZip(asDeflate(16)).read('a/bomb'), (err: FormatError) => err.code === 'ZIP_CORRUPT' && err.message === 'zip entry a/bomb inflates to more than the 16 bytes its header says');
  });

  test('by default a small archive inflates to at most 64 MiB plus 4 times its size, before anything is inflated', () => {
    // 80 MiB of zeros deflate to about 80 KB: under the 1 GiB cap, over this archive's default budget.
    const size = 80 * 2 ** 20;
    const bomb = streamToBuffer(zipStream([entry('a/bomb', deflateRawSync(Buffer.alloc(size), { level: 9 }))]));
    const record = centralRecords(bomb)[0];
    bomb.writeUInt16LE(8, record + 10);
    bomb.writeUInt32LE(0, record + 16);
    bomb.writeUInt32LE(size, record + 24);
    assert.ok(bomb.length < 200_000 && bomb.length * 1032 > size);
    const archive = readZip(bomb);
    assert.equal(archive.entries.get('a/bomb')!.size, size);
    assert.throws(() => archive.read('a/bomb'), (err: FormatError) => err.code === 'ZIP_LIMIT_EXCEEDED' && /stored uncompressed|uncompressed/.test(err.message));
    assert.equal(defaultInflateBudget(bomb.length), 64 * 2 ** 20 + 4 * bomb.length);
    assert.equal(defaultInflateBudget(2 ** 30), 2 ** 30);
    assert.equal(readZip(bomb, { maxInflatedSize: size }).read('a/bomb').length, size); // a caller may allow more
  });
});
