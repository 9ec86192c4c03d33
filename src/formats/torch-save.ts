// torch.save / torch.load files (the zip format, PyTorch >= 1.6): read with the safe unpickler and
// the torch allow-list, written as PyTorch 2.x writes them (torch/serialization.py, _save) so that
// torch.load in 1.13 (weights_only=False) and 2.x (weights_only=True) both read them.
//
//   <archive>/data.pkl                  pickle protocol 2 of the value; tensors as persistent ids
//   <archive>/.format_version           "1"
//   <archive>/.storage_alignment        "64"
//   <archive>/byteorder                 "little"
//   <archive>/data/<key>                raw little-endian elements of each storage, 64-byte aligned
//   <archive>/version                   "3\n" (required by every reader)
//   <archive>/.data/serialization_id    40 digits identifying this save

import { randomInt } from 'node:crypto';
import { FormatError } from './errors.ts';
import { unpickle, type Item } from './pickle-reader.ts';
import { pickle, type StorageId } from './pickle-writer.ts';
import { PyTuple, type PyValue } from './pyvalue.ts';
import { arrayFromBytes, elementSize, makeTensor, tensorBytes, type DType, type Tensor, type TypedArray } from './tensor.ts';
import { copyStridedViews, findTorchGlobal, Storage, STORAGE_CLASS, StorageClass } from './torch-globals.ts';
import { readZip, type ZipArchive, type ZipReadOptions } from './zip-reader.ts';
import { streamToBuffer, zipStream, type ByteStream, type ZipWriterEntry } from './zip-writer.ts';

export interface TorchLoadOptions extends ZipReadOptions {
  /**
   * Copy tensor data out of the file. Default false: tensors are views into `buf` where alignment
   * allows, and tensors that share a storage in the file share memory.
   */
  copy?: boolean;
  /** Pickle limits (see UnpickleOptions). */
  maxDepth?: number;
  maxExpandedSize?: number;
  maxItems?: number;
  maxObjects?: number;
  maxStackItems?: number;
  maxTextBytes?: number;
  /**
   * Most bytes the file's strided views (transposes, column slices, expanded tensors) may take, together,
   * once copied into row-major order. Default: four times the file's own size, and at least 1 MiB. A view
   * that repeats no element is never larger than its storage, whose bytes are in the file; several such
   * views of one storage (a transpose saved next to a column slice of it) may add up to a few times it.
   * Only views that repeat elements (a stride of 0, as expand() makes) grow without bound: such a view of
   * a few bytes could otherwise claim gigabytes.
   */
  maxViewCopyBytes?: number;
  /** What the file's value is called in error messages (e.g. "grads"); its tensors are named inside it ("grads.w"). */
  name?: string;
  /** Globals outside the allow-list: refused (the default) or read as UnreadObjects (UnpickleOptions.unknownGlobals). */
  unknownGlobals?: 'refuse' | 'unread';
}

/** The least copy budget for strided views, so that a small file may still hold a modest expanded tensor. */
const MIN_VIEW_COPY_BYTES = 1 << 20;
/** The copy budget for strided views, in multiples of the file's size (see maxViewCopyBytes). */
const VIEW_COPY_FACTOR = 4;

export interface TorchSaveOptions {
  /** Folder name inside the zip; torch.save uses the file's stem, torch.load ignores it. Default "archive". */
  archiveName?: string;
  /** Contents of .data/serialization_id. Default: 40 random digits. */
  serializationId?: string;
  /** Zip64 records for every entry (for tests of the zip64 path). */
  forceZip64?: boolean;
}

/** Reads a torch.save file into a Python value. Throws only FormatError on bad input. */
/** What torch.save wrote before PyTorch 1.6 (or with _use_new_zipfile_serialization=False): pickle protocol 2, then its magic number as a LONG1. */
const LEGACY_MAGIC = Uint8Array.of(0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19);

export function readTorchSave(buf: Uint8Array, options: TorchLoadOptions = {}): PyValue {
  if (buf.length >= LEGACY_MAGIC.length && LEGACY_MAGIC.every((b, i) => buf[i] === b)) {
    // Not a zip at all: said as such, rather than as a corrupt zip.
    throw new FormatError('TORCH_SAVE_INVALID', 'this is a torch.save file in the legacy format (PyTorch before 1.6, or _use_new_zipfile_serialization=False), which is not read: save it again with torch.save(obj, f) on PyTorch 1.6 or later');
  }
  const zip = withHint(options.name, buf, () => readZip(buf, options));
  const prefix = archivePrefix(zip);
  checkVersion(zip, prefix);

  const storages = new Map<string, Storage>();
  const persistentLoad = (pid: PyTuple): Item => {
    const [typename, storageClass, key, location, count] = pid.items as Item[];
    const name = typename instanceof Uint8Array ? Buffer.from(typename).toString('latin1') : typename;
    if (pid.length !== 5 || name !== 'storage') throw new FormatError('TORCH_SAVE_INVALID', 'persistent id is not a (\'storage\', class, key, location, numel) tuple');
    if (!(storageClass instanceof StorageClass)) throw new FormatError('TORCH_SAVE_INVALID', 'persistent id does not name a storage class');
    if (typeof key !== 'string' || typeof location !== 'string' || typeof count !== 'bigint' || count < 0n) {
      throw new FormatError('TORCH_SAVE_INVALID', 'persistent id has an invalid key, location or numel');
    }
    const { dtype } = storageClass;
    const known = storages.get(key);
    if (known) {
      if (known.dtype !== dtype) throw new FormatError('TORCH_SAVE_INVALID', `storage ${key} is used as both ${known.dtype} and ${dtype}`);
      return known;
    }
    const record = `${prefix}data/${key}`;
    const entry = zip.entries.get(record);
    // A storage refused here is refused with the first tensor made from it, named by its place in the file.
    const refuse = (why: FormatError) => {
      const refused = new Storage(key, dtype, arrayFromBytes(dtype, new Uint8Array(0), true), why);
      storages.set(key, refused);
      return refused;
    };
    if (!entry) return refuse(new FormatError('STORAGE_MISSING', `storage record data/${key} is missing`));
    // torch.save writes exactly a storage's bytes. The size is checked before the record is read: a small
    // storage whose (deflated) record is large would otherwise be inflated for nothing.
    const nbytes = BigInt(elementSize(dtype)) * count;
    if (nbytes !== BigInt(entry.size)) {
      return refuse(new FormatError('TORCH_SAVE_INVALID', `storage ${key} declares ${count} ${dtype} elements (${nbytes} bytes) but its record has ${entry.size} bytes`));
    }
    const bytes = zip.read(record);
    const storage = new Storage(key, dtype, arrayFromBytes(dtype, bytes.subarray(0, Number(nbytes)), options.copy ?? false));
    storages.set(key, storage);
    return storage;
  };

  const pkl = `${prefix}data.pkl`;
  if (!zip.entries.has(pkl)) throw new FormatError('ZIP_ENTRY_MISSING', 'torch.save archive has no data.pkl');
  const value = withHint(options.name, buf, () => unpickle(zip.read(pkl), {
    findGlobal: findTorchGlobal,
    persistentLoad,
    maxDepth: options.maxDepth,
    maxExpandedSize: options.maxExpandedSize,
    maxItems: options.maxItems,
    maxObjects: options.maxObjects,
    maxStackItems: options.maxStackItems,
    maxTextBytes: options.maxTextBytes,
    unknownGlobals: options.unknownGlobals,
  }));
  copyStridedViews(value, options.maxViewCopyBytes ?? Math.max(VIEW_COPY_FACTOR * buf.byteLength, MIN_VIEW_COPY_BYTES), options.name ?? '');
  return value;
}

/**
 * `read()`, with what its refusals say made specific to the file's role (`name`: "grads", "params",
 * "state_dict", "checkpoint"): a refused global named with the file and what to send instead (a whole
 * nn.Module, weights_only's refusals), a body that is not a zip told as the safetensors file it is.
 */
function withHint<T>(name: string | undefined, buf: Uint8Array, read: () => T): T {
  try {
    return read();
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    if (err.code === 'PICKLE_GLOBAL_REFUSED' && name) throw new FormatError(err.code, `${name}: ${err.message}${refusedGlobalHint(err.message, name)}`);
    if (err.code === 'ZIP_CORRUPT' && looksLikeSafetensors(buf)) {
      const send = name === 'checkpoint'
        ? 'PUT …/checkpoint takes a torch.save file of {"model", "optimizer", "step"}, or the same as JSON'
        : 'send it with Content-Type: application/x-safetensors';
      throw new FormatError(err.code, `${name ? `${name}: ` : ''}${err.message} (it is a safetensors file: ${send})`);
    }
    throw err;
  }
}

/** What to send instead of a file holding a refused global, for the ones files commonly hold. */
function refusedGlobalHint(message: string, name: string): string {
  if (/pickle global torch\.nn\.modules\./.test(message)) {
    const instead = name === 'grads' ? 'send its gradients, {name: p.grad for name, p in model.named_parameters()}'
      : name === 'state_dict' ? 'send the optimizer\'s state_dict()'
        : 'save dict(model.named_parameters()) instead';
    return ` (a whole torch.nn.Module was saved: ${instead})`;
  }
  if (/pickle global (argparse|numpy|torch\.optim)\./.test(message)) {
    return ' (torch.load(weights_only=True) refuses it too: keep such values out of the file; a checkpoint\'s other keys may hold them)';
  }
  return '';
}

/** A safetensors file: an 8-byte little-endian header length that fits, then the JSON header's `{`. */
function looksLikeSafetensors(buf: Uint8Array): boolean {
  if (buf.length <= 9) return false;
  const view = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  return view.readBigUInt64LE(0) <= BigInt(buf.length - 8) && buf[8] === 0x7b;
}

/** The "<archive>/" folder every record sits in; PyTorch takes it from the first entry (inline_container.cc). */
function archivePrefix(zip: ZipArchive): string {
  const first = zip.entries.keys().next();
  const slash = first.done ? -1 : first.value.indexOf('/');
  if (slash < 0) throw new FormatError('TORCH_SAVE_INVALID', 'not a torch.save archive: records are not under one folder');
  const prefix = first.value!.slice(0, slash + 1);
  if (zip.entries.has(`${prefix}constants.pkl`)) throw new FormatError('TORCH_SAVE_INVALID', 'TorchScript archives are not supported');
  return prefix;
}

function checkVersion(zip: ZipArchive, prefix: string): void {
  const name = [`${prefix}version`, `${prefix}.data/version`].find((n) => zip.entries.has(n));
  if (!name) throw new FormatError('TORCH_SAVE_INVALID', 'torch.save archive has no version record');
  const text = zip.read(name).toString('latin1').trim();
  if (!/^[0-9]{1,3}$/.test(text) || Number(text) < 1 || Number(text) > 10) {
    throw new FormatError('TORCH_SAVE_INVALID', `unsupported torch.save format version ${JSON.stringify(text.slice(0, 20))}`);
  }
  const byteorder = `${prefix}byteorder`;
  if (zip.entries.has(byteorder)) {
    const order = zip.read(byteorder).toString('latin1');
    if (order !== 'little') throw new FormatError('TORCH_SAVE_INVALID', `byteorder ${JSON.stringify(order.slice(0, 20))} is not supported (only little)`);
  }
}

/**
 * Lays out a torch.save file for `value`: its exact length and a repeatable stream of its bytes.
 * Tensor data is streamed from the tensors themselves (not copied); do not modify them while a
 * stream is being consumed. A tensor's `data` array is its storage: tensors sharing one array share a storage.
 */
export function writeTorchSave(value: PyValue, options: TorchSaveOptions = {}): ByteStream {
  const archive = options.archiveName ?? 'archive';
  if (!/^[A-Za-z0-9_.-]+$/.test(archive)) throw new Error(`invalid archive name ${JSON.stringify(archive)}`);
  const storages: { key: string; tensor: Tensor }[] = [];
  const keys = new Map<TypedArray, Map<DType, string>>();

  const storageOf = (tensor: Tensor): StorageId => {
    checkTensor(tensor);
    let byDtype = keys.get(tensor.data);
    if (!byDtype) keys.set(tensor.data, (byDtype = new Map()));
    let key = byDtype.get(tensor.dtype);
    if (key === undefined) {
      key = String(storages.length);
      byDtype.set(tensor.dtype, key);
      storages.push({ key, tensor });
    }
    return { storageClass: STORAGE_CLASS[tensor.dtype], key, location: 'cpu', numel: tensor.data.length, offset: 0 };
  };
  const dataPkl = pickle(value, { storageOf });

  const text = (name: string, content: string): ZipWriterEntry => {
    const bytes = Buffer.from(content, 'utf8');
    return { name: `${archive}/${name}`, size: bytes.length, data: () => [bytes] };
  };
  // torch.save writes storages in sorted key order (string order, as Python's sorted()).
  const sorted = [...storages].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  const entries: ZipWriterEntry[] = [
    { name: `${archive}/data.pkl`, size: dataPkl.length, data: () => [dataPkl] },
    text('.format_version', '1'),
    text('.storage_alignment', '64'),
    text('byteorder', 'little'),
    ...sorted.map(({ key, tensor }) => ({ name: `${archive}/data/${key}`, size: tensor.data.byteLength, data: () => [tensorBytes(tensor)] })),
    text('version', '3\n'),
    text('.data/serialization_id', options.serializationId ?? randomSerializationId()),
  ];
  return zipStream(entries, { forceZip64: options.forceZip64 });
}

/** writeTorchSave collected into one Buffer, for small values. */
export function torchSaveToBuffer(value: PyValue, options: TorchSaveOptions = {}): Buffer {
  return streamToBuffer(writeTorchSave(value, options));
}

function checkTensor(tensor: Tensor): void {
  makeTensor(tensor.dtype, tensor.shape, tensor.data as never);
}

function randomSerializationId(): string {
  let id = '';
  for (let i = 0; i < 4; i++) id += String(randomInt(0, 10_000_000_000)).padStart(10, '0');
  return id;
}
