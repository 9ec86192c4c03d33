// A zip reader for untrusted uploads: central directory first, every offset and size checked
// against the buffer before it is used. Stored entries come back as views (no copy); deflated
// ones are inflated with a bounded output. Zip64 is read; encryption and multi-disk archives are refused.

import { crc32, inflateRawSync } from 'node:zlib';
import { FormatError } from './errors.ts';

export interface ZipEntry {
  name: string;
  /** 0 stored, 8 deflate. */
  method: 0 | 8;
  crc32: number;
  compressedSize: number;
  size: number;
  localHeaderOffset: number;
  /** Offset of the entry's (possibly compressed) bytes in the archive. */
  dataOffset: number;
}

export interface ZipReadOptions {
  /** Check CRC-32s on read. A stored CRC of 0 is not checked: PyTorch 2.x writes 0 when CRCs are disabled. Default true. */
  verifyCrc?: boolean;
  /**
   * Most bytes deflated entries may inflate to, in total over all reads from this archive. Default: 64 MiB
   * plus 4 times the archive's size, at most 1 GiB. torch.save stores its records uncompressed; a file
   * zipped again by another tool inflates to about its own size (float data hardly compresses), while a
   * small archive of zeros could otherwise hold 1 GiB and keep the process busy inflating it for seconds.
   */
  maxInflatedSize?: number;
  /** Most entries the central directory may list; more are refused before any is read. Default MAX_ZIP_ENTRIES. */
  maxEntries?: number;
}

/**
 * Entries of an upload: 500,016. torch.save writes data.pkl, version, byteorder, .data/serialization_id (and
 * .format_version, .storage_alignment in PyTorch 2.x) plus one data/<key> per storage; a checkpoint of a session's
 * largest size (100,000 parameters) has five storages per parameter (the model tensor, and ASGD's step, eta, mu
 * and ax): 500,006 entries at most. Refused at once, a central directory of a million entries would otherwise
 * take seconds to read and check.
 */
export const MAX_ZIP_ENTRIES = 5 * 100_000 + 16;

export interface ZipArchive {
  /** Entries by name, in central directory order. */
  readonly entries: ReadonlyMap<string, ZipEntry>;
  /** The entry's bytes: a view into the archive for stored entries. ZIP_ENTRY_MISSING if absent. */
  read(name: string): Buffer;
}

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const EOCD_SIZE = 22;
const CENTRAL_SIZE = 46;
const LOCAL_SIZE = 30;
const ZIP64_LOCATOR_SIZE = 20;
const ZIP64_EOCD_SIZE = 56;
const U32_MAX = 0xffffffff;
/** DEFLATE cannot expand more than about 1032:1; a header claiming more is lying. */
const DEFLATE_MAX_RATIO = 1032;

const utf8 = new TextDecoder('utf-8', { fatal: true });
const latin1 = new TextDecoder('latin1');

export function readZip(input: Uint8Array, options: ZipReadOptions = {}): ZipArchive {
  const buf = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  const verifyCrc = options.verifyCrc ?? true;
  const maxInflatedSize = options.maxInflatedSize ?? defaultInflateBudget(buf.length);

  const { count, cdOffset, cdSize } = readEndOfCentralDirectory(buf);
  const maxEntries = options.maxEntries ?? MAX_ZIP_ENTRIES;
  if (count > maxEntries) throw new FormatError('ZIP_LIMIT_EXCEEDED', `zip archive lists ${count} entries; at most ${maxEntries} are allowed`);
  const entries = new Map<string, ZipEntry>();
  let pos = cdOffset;
  const cdEnd = cdOffset + cdSize;
  for (let i = 0; i < count; i++) {
    const entry = readCentralEntry(buf, pos, cdEnd, cdOffset);
    if (entries.has(entry.entry.name)) throw new FormatError('ZIP_DUPLICATE_ENTRY', `zip entry ${entry.entry.name} appears twice`);
    entries.set(entry.entry.name, entry.entry);
    pos = entry.next;
  }
  checkNoOverlap([...entries.values()], cdOffset);

  let inflateBudget = maxInflatedSize;
  return {
    entries,
    read(name: string): Buffer {
      const entry = entries.get(name);
      if (!entry) throw new FormatError('ZIP_ENTRY_MISSING', `zip entry ${name} is missing`);
      const raw = buf.subarray(entry.dataOffset, entry.dataOffset + entry.compressedSize);
      let data = raw;
      if (entry.method === 8) {
        data = inflateEntry(entry, raw, inflateBudget, maxInflatedSize);
        inflateBudget -= data.length;
      }
      if (verifyCrc && entry.crc32 !== 0 && crc32(data) !== entry.crc32) {
        throw new FormatError('ZIP_CRC_MISMATCH', `zip entry ${name} fails its CRC-32 check`);
      }
      return data;
    },
  };
}

function readEndOfCentralDirectory(buf: Buffer): { count: number; cdOffset: number; cdSize: number } {
  const eocd = findEocd(buf);
  const disk = buf.readUInt16LE(eocd + 4);
  const cdDisk = buf.readUInt16LE(eocd + 6);
  let diskCount = buf.readUInt16LE(eocd + 8);
  let count = buf.readUInt16LE(eocd + 10);
  let cdSize = buf.readUInt32LE(eocd + 12);
  let cdOffset = buf.readUInt32LE(eocd + 16);
  let cdLimit = eocd;

  const locator = eocd - ZIP64_LOCATOR_SIZE;
  if (locator >= 0 && buf.readUInt32LE(locator) === SIG_ZIP64_LOCATOR) {
    if (buf.readUInt32LE(locator + 4) !== 0 || buf.readUInt32LE(locator + 16) > 1) {
      throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
    }
    const z64 = toOffset(buf.readBigUInt64LE(locator + 8), 'zip64 end of central directory offset');
    if (z64 + ZIP64_EOCD_SIZE > locator) throw new FormatError('ZIP_CORRUPT', 'zip64 end of central directory lies outside the archive');
    if (buf.readUInt32LE(z64) !== SIG_ZIP64_EOCD) throw new FormatError('ZIP_CORRUPT', 'bad zip64 end of central directory signature');
    if (buf.readUInt32LE(z64 + 16) !== 0 || buf.readUInt32LE(z64 + 20) !== 0) {
      throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
    }
    diskCount = toCount(buf.readBigUInt64LE(z64 + 24));
    count = toCount(buf.readBigUInt64LE(z64 + 32));
    cdSize = toOffset(buf.readBigUInt64LE(z64 + 40), 'central directory size');
    cdOffset = toOffset(buf.readBigUInt64LE(z64 + 48), 'central directory offset');
    cdLimit = z64;
  } else if (disk !== 0 || cdDisk !== 0) {
    throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
  }
  if (diskCount !== count) throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
  if (cdOffset + cdSize > cdLimit) {
    throw new FormatError('ZIP_CORRUPT', `central directory (offset ${cdOffset}, ${cdSize} bytes) extends past its end record`);
  }
  if (count * CENTRAL_SIZE > cdSize) {
    throw new FormatError('ZIP_CORRUPT', `central directory of ${cdSize} bytes cannot hold ${count} entries`);
  }
  return { count, cdOffset, cdSize };
}

function findEocd(buf: Buffer): number {
  const lowest = Math.max(0, buf.length - EOCD_SIZE - 0xffff);
  for (let pos = buf.length - EOCD_SIZE; pos >= lowest; pos--) {
    if (buf.readUInt32LE(pos) === SIG_EOCD && pos + EOCD_SIZE + buf.readUInt16LE(pos + 20) <= buf.length) return pos;
  }
  if (buf.length >= 4 && buf.readUInt32LE(0) === SIG_LOCAL) {
    throw new FormatError('ZIP_TRUNCATED', 'zip archive is truncated: no end of central directory record');
  }
  throw new FormatError('ZIP_CORRUPT', 'not a zip archive: no end of central directory record');
}

function readCentralEntry(buf: Buffer, pos: number, cdEnd: number, cdOffset: number): { entry: ZipEntry; next: number } {
  if (pos + CENTRAL_SIZE > cdEnd) throw new FormatError('ZIP_CORRUPT', 'central directory entry runs past the directory');
  if (buf.readUInt32LE(pos) !== SIG_CENTRAL) throw new FormatError('ZIP_CORRUPT', `bad central directory signature at offset ${pos}`);
  const flags = buf.readUInt16LE(pos + 8);
  const method = buf.readUInt16LE(pos + 10);
  const crc = buf.readUInt32LE(pos + 16);
  let compressedSize = buf.readUInt32LE(pos + 20);
  let size = buf.readUInt32LE(pos + 24);
  const nameLength = buf.readUInt16LE(pos + 28);
  const extraLength = buf.readUInt16LE(pos + 30);
  const commentLength = buf.readUInt16LE(pos + 32);
  const diskStart = buf.readUInt16LE(pos + 34);
  let localHeaderOffset = buf.readUInt32LE(pos + 42);
  const next = pos + CENTRAL_SIZE + nameLength + extraLength + commentLength;
  if (next > cdEnd) throw new FormatError('ZIP_CORRUPT', 'central directory entry runs past the directory');
  const nameBytes = buf.subarray(pos + CENTRAL_SIZE, pos + CENTRAL_SIZE + nameLength);
  const name = decodeName(nameBytes, flags);
  if (flags & 0x41) throw new FormatError('ZIP_UNSUPPORTED', `zip entry ${name} is encrypted`);
  if (method !== 0 && method !== 8) throw new FormatError('ZIP_UNSUPPORTED', `zip entry ${name} uses compression method ${method}; only stored and deflate are supported`);

  const needs = { size: size === U32_MAX, compressed: compressedSize === U32_MAX, offset: localHeaderOffset === U32_MAX, disk: diskStart === 0xffff };
  if (needs.size || needs.compressed || needs.offset || needs.disk) {
    const z64 = findExtra(buf, pos + CENTRAL_SIZE + nameLength, extraLength, 0x0001, name);
    if (!z64) throw new FormatError('ZIP_CORRUPT', `zip entry ${name} lacks its zip64 extra field`);
    let at = z64.start;
    const take = (): bigint => {
      if (at + 8 > z64.end) throw new FormatError('ZIP_CORRUPT', `zip64 extra field of ${name} is too short`);
      at += 8;
      return buf.readBigUInt64LE(at - 8);
    };
    if (needs.size) size = toOffset(take(), `size of ${name}`);
    if (needs.compressed) compressedSize = toOffset(take(), `compressed size of ${name}`);
    if (needs.offset) localHeaderOffset = toOffset(take(), `offset of ${name}`);
    if (needs.disk && (at + 4 > z64.end || buf.readUInt32LE(at) !== 0)) throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
  } else if (diskStart !== 0) {
    throw new FormatError('ZIP_UNSUPPORTED', 'multi-disk zip archives are not supported');
  }
  if (method === 0 && compressedSize !== size) throw new FormatError('ZIP_CORRUPT', `stored zip entry ${name} has compressed size ${compressedSize} but size ${size}`);

  if (localHeaderOffset + LOCAL_SIZE > cdOffset) throw new FormatError('ZIP_CORRUPT', `local header of ${name} lies outside the archive data`);
  if (buf.readUInt32LE(localHeaderOffset) !== SIG_LOCAL) throw new FormatError('ZIP_CORRUPT', `bad local header signature for ${name}`);
  const localNameLength = buf.readUInt16LE(localHeaderOffset + 26);
  const localExtraLength = buf.readUInt16LE(localHeaderOffset + 28);
  const dataOffset = localHeaderOffset + LOCAL_SIZE + localNameLength + localExtraLength;
  if (dataOffset + compressedSize > cdOffset) {
    throw new FormatError('ZIP_CORRUPT', `data of ${name} (offset ${dataOffset}, ${compressedSize} bytes) runs past the archive data`);
  }
  if (!buf.subarray(localHeaderOffset + LOCAL_SIZE, localHeaderOffset + LOCAL_SIZE + localNameLength).equals(nameBytes)) {
    throw new FormatError('ZIP_CORRUPT', `local header name differs from central directory name ${name}`);
  }
  const entry: ZipEntry = { name, method, crc32: crc, compressedSize, size, localHeaderOffset, dataOffset };
  return { entry, next };
}

function findExtra(buf: Buffer, start: number, length: number, id: number, name: string): { start: number; end: number } | undefined {
  let pos = start;
  const end = start + length;
  while (pos + 4 <= end) {
    const blockId = buf.readUInt16LE(pos);
    const blockSize = buf.readUInt16LE(pos + 2);
    if (pos + 4 + blockSize > end) throw new FormatError('ZIP_CORRUPT', `extra field of ${name} runs past its end`);
    if (blockId === id) return { start: pos + 4, end: pos + 4 + blockSize };
    pos += 4 + blockSize;
  }
  return undefined;
}

/** Entries must not share bytes: each one's header and data end before the next header begins. */
function checkNoOverlap(entries: ZipEntry[], cdOffset: number): void {
  const byOffset = [...entries].sort((a, b) => a.localHeaderOffset - b.localHeaderOffset);
  for (let i = 0; i < byOffset.length; i++) {
    const end = byOffset[i].dataOffset + byOffset[i].compressedSize;
    const limit = i + 1 < byOffset.length ? byOffset[i + 1].localHeaderOffset : cdOffset;
    if (end > limit) throw new FormatError('ZIP_CORRUPT', `zip entries ${byOffset[i].name} and ${byOffset[i + 1]?.name ?? 'central directory'} overlap`);
  }
}

/** ZipReadOptions.maxInflatedSize's default for an archive of `archiveBytes`. */
export function defaultInflateBudget(archiveBytes: number): number {
  return Math.min(2 ** 30, 64 * 2 ** 20 + 4 * archiveBytes);
}

function inflateEntry(entry: ZipEntry, raw: Buffer, budget: number, maxInflatedSize: number): Buffer {
  if (entry.size > raw.length * DEFLATE_MAX_RATIO + 1024) {
    throw new FormatError('ZIP_CORRUPT', `zip entry ${entry.name} claims ${entry.size} bytes from ${raw.length} deflated bytes`);
  }
  if (entry.size > budget) {
    throw new FormatError('ZIP_LIMIT_EXCEEDED', `zip entry ${entry.name} inflates to ${entry.size} bytes; deflated entries of this archive may inflate to ${maxInflatedSize} bytes in total (store the records uncompressed, as torch.save does)`);
  }
  let out: Buffer;
  try {
    // One output chunk of the declared size: no chunks to gather and concatenate (half the time and memory).
    out = inflateRawSync(raw, { maxOutputLength: Math.max(entry.size, 1), chunkSize: Math.max(entry.size, 64) });
  } catch (err) {
    // More output than the header says is zlib's ERR_BUFFER_TOO_LARGE ("Cannot create a Buffer larger than N
    // bytes"): said in the archive's terms.
    if ((err as { code?: unknown }).code === 'ERR_BUFFER_TOO_LARGE') throw new FormatError('ZIP_CORRUPT', `zip entry ${entry.name} inflates to more than the ${entry.size} bytes its header says`);
    throw new FormatError('ZIP_CORRUPT', `zip entry ${entry.name} does not inflate: ${(err as Error).message}`);
  }
  if (out.length !== entry.size) throw new FormatError('ZIP_CORRUPT', `zip entry ${entry.name} inflates to ${out.length} bytes, header says ${entry.size}`);
  return out;
}

function decodeName(bytes: Buffer, flags: number): string {
  if (!(flags & 0x800)) return latin1.decode(bytes);
  try {
    return utf8.decode(bytes);
  } catch {
    throw new FormatError('ZIP_CORRUPT', 'zip entry name is not valid UTF-8');
  }
}

function toOffset(value: bigint, what: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError('ZIP_CORRUPT', `${what} is out of range: ${value}`);
  return Number(value);
}

function toCount(value: bigint): number {
  return toOffset(value, 'entry count');
}
