// A streaming zip writer in PyTorch's layout (caffe2/serialize/inline_container.cc, which drives
// miniz): stored entries, each entry's data aligned to 64 bytes by padding in an extra field with
// id 'FB', CRC and sizes in a data descriptor after the data (so the CRC is computed while the data
// streams), zip64 where a size or offset needs it. The whole layout is fixed before the first
// byte, so the total length is known up front (Content-Length) and entry data is passed through
// by reference, never copied.

import { crc32 } from 'node:zlib';

export interface ZipWriterEntry {
  name: string;
  /** Exact byte count `data()` yields. */
  size: number;
  /** The entry's bytes; called once per pass over the stream, so it must be repeatable. */
  data: () => Iterable<Uint8Array>;
}

export interface ZipWriterOptions {
  /** Alignment of each entry's data in the file. Default 64, as PyTorch (kFieldAlignment). */
  alignment?: number;
  /** Write zip64 extra fields and end records even when nothing needs them (for tests). */
  forceZip64?: boolean;
}

export interface ByteStream {
  /** Total bytes the chunks add up to. */
  byteLength: number;
  /** The bytes, in order. Every iteration is a fresh pass; chunks may be views of the caller's data. */
  chunks: Iterable<Buffer>;
}

const U32_MAX = 0xffffffff;
const LOCAL_SIZE = 30;
const CENTRAL_SIZE = 46;
/** Data is handed out in slices of this size so the CRC work between two chunks stays short. */
const SLICE = 4 << 20;
const FLAGS = 0x0808; // bit 3: sizes and CRC in a data descriptor; bit 11: UTF-8 names
const DOS_DATE_1980_01_01 = (1 << 5) | 1;

interface Planned {
  entry: ZipWriterEntry;
  name: Buffer;
  offset: number;
  zip64: boolean;
  padding: number;
  descriptorSize: number;
}

/** Lays out the archive and returns its length and a repeatable stream of its bytes. */
export function zipStream(entries: readonly ZipWriterEntry[], options: ZipWriterOptions = {}): ByteStream {
  const alignment = options.alignment ?? 64;
  const force = options.forceZip64 ?? false;
  const names = new Set<string>();
  const planned: Planned[] = [];
  let cursor = 0;
  for (const entry of entries) {
    if (names.has(entry.name)) throw new Error(`zip entry ${entry.name} written twice`);
    if (!Number.isSafeInteger(entry.size) || entry.size < 0) throw new Error(`zip entry ${entry.name} has invalid size ${entry.size}`);
    names.add(entry.name);
    const name = Buffer.from(entry.name, 'utf8');
    if (name.length > 0xffff) throw new Error(`zip entry name too long: ${entry.name.slice(0, 40)}...`);
    const zip64 = force || entry.size >= U32_MAX;
    const headerEnd = cursor + LOCAL_SIZE + name.length + (zip64 ? 20 : 0) + 4;
    const padding = (alignment - (headerEnd % alignment)) % alignment;
    const descriptorSize = zip64 ? 24 : 16;
    planned.push({ entry, name, offset: cursor, zip64, padding, descriptorSize });
    cursor = headerEnd + padding + entry.size + descriptorSize;
  }
  const cdOffset = cursor;
  const cdSize = planned.reduce((sum, p) => sum + CENTRAL_SIZE + p.name.length + centralExtraSize(p, force), 0);
  const zip64End = force || planned.length >= 0xffff || cdOffset >= U32_MAX || cdSize >= U32_MAX;
  const byteLength = cdOffset + cdSize + (zip64End ? 56 + 20 : 0) + 22;

  return {
    byteLength,
    chunks: {
      [Symbol.iterator]: () => generate(planned, { cdOffset, cdSize, zip64End, force }),
    },
  };
}

function* generate(planned: Planned[], end: { cdOffset: number; cdSize: number; zip64End: boolean; force: boolean }): Generator<Buffer> {
  const crcs: number[] = [];
  for (const p of planned) {
    yield localHeader(p);
    let crc = 0;
    let written = 0;
    for (const chunk of p.entry.data()) {
      for (let start = 0; start < chunk.byteLength; start += SLICE) {
        const slice = Buffer.from(chunk.buffer, chunk.byteOffset + start, Math.min(SLICE, chunk.byteLength - start));
        crc = crc32(slice, crc);
        written += slice.length;
        yield slice;
      }
    }
    if (written !== p.entry.size) throw new Error(`zip entry ${p.entry.name} yielded ${written} bytes, declared ${p.entry.size}`);
    crcs.push(crc);
    yield dataDescriptor(p, crc);
  }
  const central = Buffer.alloc(end.cdSize);
  let pos = 0;
  planned.forEach((p, i) => {
    pos = writeCentralEntry(central, pos, p, crcs[i], end.force);
  });
  yield central;
  yield endRecords(planned.length, end);
}

function localHeader(p: Planned): Buffer {
  const extraLength = (p.zip64 ? 20 : 0) + 4 + p.padding;
  const header = Buffer.alloc(LOCAL_SIZE + p.name.length + extraLength);
  header.writeUInt32LE(0x04034b50, 0);
  header.writeUInt16LE(p.zip64 ? 45 : 20, 4);
  header.writeUInt16LE(FLAGS, 6);
  header.writeUInt16LE(0, 8); // stored
  header.writeUInt16LE(0, 10);
  header.writeUInt16LE(DOS_DATE_1980_01_01, 12);
  // CRC and sizes are 0 here (flag bit 3); zip64 entries say 0xffffffff and carry zeros in the zip64 field.
  if (p.zip64) {
    header.writeUInt32LE(U32_MAX, 18);
    header.writeUInt32LE(U32_MAX, 22);
  }
  header.writeUInt16LE(p.name.length, 26);
  header.writeUInt16LE(extraLength, 28);
  p.name.copy(header, LOCAL_SIZE);
  let pos = LOCAL_SIZE + p.name.length;
  if (p.zip64) {
    header.writeUInt16LE(0x0001, pos);
    header.writeUInt16LE(16, pos + 2);
    pos += 20; // two zero 8-byte sizes
  }
  header.write('FB', pos, 'latin1');
  header.writeUInt16LE(p.padding, pos + 2);
  header.fill('Z', pos + 4, pos + 4 + p.padding);
  return header;
}

function dataDescriptor(p: Planned, crc: number): Buffer {
  const d = Buffer.alloc(p.descriptorSize);
  d.writeUInt32LE(0x08074b50, 0);
  d.writeUInt32LE(crc, 4);
  if (p.zip64) {
    d.writeBigUInt64LE(BigInt(p.entry.size), 8);
    d.writeBigUInt64LE(BigInt(p.entry.size), 16);
  } else {
    d.writeUInt32LE(p.entry.size, 8);
    d.writeUInt32LE(p.entry.size, 12);
  }
  return d;
}

function centralNeeds(p: Planned, force: boolean): { sizes: boolean; offset: boolean } {
  return { sizes: force || p.entry.size >= U32_MAX, offset: force || p.offset >= U32_MAX };
}

function centralExtraSize(p: Planned, force: boolean): number {
  const needs = centralNeeds(p, force);
  const body = (needs.sizes ? 16 : 0) + (needs.offset ? 8 : 0);
  return body ? 4 + body : 0;
}

function writeCentralEntry(out: Buffer, start: number, p: Planned, crc: number, force: boolean): number {
  const needs = centralNeeds(p, force);
  const extraLength = centralExtraSize(p, force);
  const version = needs.sizes || needs.offset ? 45 : 20;
  out.writeUInt32LE(0x02014b50, start);
  out.writeUInt16LE(version, start + 4);
  out.writeUInt16LE(version, start + 6);
  out.writeUInt16LE(FLAGS, start + 8);
  out.writeUInt16LE(0, start + 10);
  out.writeUInt16LE(0, start + 12);
  out.writeUInt16LE(DOS_DATE_1980_01_01, start + 14);
  out.writeUInt32LE(crc, start + 16);
  out.writeUInt32LE(needs.sizes ? U32_MAX : p.entry.size, start + 20);
  out.writeUInt32LE(needs.sizes ? U32_MAX : p.entry.size, start + 24);
  out.writeUInt16LE(p.name.length, start + 28);
  out.writeUInt16LE(extraLength, start + 30);
  // comment length, disk, internal and external attributes stay 0
  out.writeUInt32LE(needs.offset ? U32_MAX : p.offset, start + 42);
  let pos = start + CENTRAL_SIZE;
  p.name.copy(out, pos);
  pos += p.name.length;
  if (extraLength) {
    out.writeUInt16LE(0x0001, pos);
    out.writeUInt16LE(extraLength - 4, pos + 2);
    pos += 4;
    if (needs.sizes) {
      out.writeBigUInt64LE(BigInt(p.entry.size), pos);
      out.writeBigUInt64LE(BigInt(p.entry.size), pos + 8);
      pos += 16;
    }
    if (needs.offset) {
      out.writeBigUInt64LE(BigInt(p.offset), pos);
      pos += 8;
    }
  }
  return pos;
}

function endRecords(count: number, end: { cdOffset: number; cdSize: number; zip64End: boolean }): Buffer {
  const out = Buffer.alloc((end.zip64End ? 76 : 0) + 22);
  let pos = 0;
  if (end.zip64End) {
    const z64Offset = end.cdOffset + end.cdSize;
    out.writeUInt32LE(0x06064b50, 0);
    out.writeBigUInt64LE(44n, 4); // size of the rest of this record
    out.writeUInt16LE(45, 12);
    out.writeUInt16LE(45, 14);
    // disk numbers at 16 and 20 stay 0
    out.writeBigUInt64LE(BigInt(count), 24);
    out.writeBigUInt64LE(BigInt(count), 32);
    out.writeBigUInt64LE(BigInt(end.cdSize), 40);
    out.writeBigUInt64LE(BigInt(end.cdOffset), 48);
    out.writeUInt32LE(0x07064b50, 56);
    out.writeUInt32LE(0, 60);
    out.writeBigUInt64LE(BigInt(z64Offset), 64);
    out.writeUInt32LE(1, 72);
    pos = 76;
  }
  out.writeUInt32LE(0x06054b50, pos);
  out.writeUInt16LE(Math.min(count, 0xffff), pos + 8);
  out.writeUInt16LE(Math.min(count, 0xffff), pos + 10);
  out.writeUInt32LE(Math.min(end.cdSize, U32_MAX), pos + 12);
  out.writeUInt32LE(Math.min(end.cdOffset, U32_MAX), pos + 16);
  return out;
}

/** Collects a stream into one Buffer (for small archives and tests). */
export function streamToBuffer(stream: ByteStream): Buffer {
  const out = Buffer.allocUnsafe(stream.byteLength);
  let pos = 0;
  for (const chunk of stream.chunks) {
    if (pos + chunk.length > out.length) throw new Error('stream yielded more bytes than its byteLength');
    chunk.copy(out, pos);
    pos += chunk.length;
  }
  if (pos !== out.length) throw new Error(`stream yielded ${pos} bytes, byteLength says ${out.length}`);
  return out;
}
