// A file for `sessions import`, read on the operator's machine: its wire format (the Content-Type it is sent
// as) from its first bytes, and what it holds (an optimizer state_dict, a checkpoint or parameters: the
// route it goes to) from its structure. The service checks the contents in full; this only picks the route.
import { readFile } from 'node:fs/promises';
import { isFormatError, isTensor, PyDict, pyTypeName, readSafetensors, readTorchSave } from '../formats/index.ts';
import { MEDIA, type WireFormat } from '../routes/media.ts';
import { usageError } from './http.ts';

/** What a state file holds: the name of its route (GET to download, PUT to import). */
export const WHATS = ['checkpoint', 'state_dict', 'params'] as const;
export type What = (typeof WHATS)[number];

export interface StateFile {
  format: WireFormat;
  what: What;
  /** The media type it is sent as (the first of its format in src/routes/media.ts). */
  type: string;
  body: Uint8Array<ArrayBuffer>;
}

const FORMAT_NAMES: Record<WireFormat, string> = { pt: 'torch.save file', safetensors: 'safetensors file', json: 'JSON file' };

/** The file's format, from its first bytes; null for anything else. */
function formatOf(bytes: Buffer): WireFormat | null {
  // torch.save writes a zip since PyTorch 1.6; before, a pickle (protocol 2), which the service refuses saying why.
  if (bytes.length >= 4 && bytes.readUInt32LE(0) === 0x04034b50) return 'pt';
  if (bytes.length >= 2 && bytes[0] === 0x80 && bytes[1] === 0x02) return 'pt';
  // safetensors: the JSON header's length (u64, little-endian), then the header. Before JSON: a safetensors
  // header of 123 bytes starts with "{" too.
  if (bytes.length >= 9 && bytes.readBigUInt64LE(0) <= BigInt(bytes.length - 8) && bytes[8] === 0x7b) return 'safetensors';
  const first = bytes.findIndex((b) => b !== 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d);
  // JSON: an object, or any other JSON value, which readStateFile then says is not an object.
  return first >= 0 && (bytes[first] === 0x7b || bytes[first] === 0x5b) ? 'json' : null;
}

/** What a dict's keys say it is, as the service's three layouts lay it out; null for none of them. */
function whatOfKeys(keys: readonly unknown[], allTensors: boolean, torchSave = false): What | null {
  if (keys.includes('model') && keys.includes('optimizer')) return 'checkpoint';
  // PyTorch's tutorial on saving a general checkpoint: PUT .../checkpoint takes its torch.save file too.
  if (torchSave && keys.includes('model_state_dict') && keys.includes('optimizer_state_dict')) return 'checkpoint';
  if (keys.includes('state') && keys.includes('param_groups')) return 'state_dict';
  return keys.length > 0 && allTensors ? 'params' : null;
}

const describeKeys = (keys: readonly unknown[]) => (keys.length === 0 ? 'no keys' : `keys ${keys.slice(0, 6).map(String).join(', ')}${keys.length > 6 ? ', …' : ''}`);

/**
 * Reads `file` for `sessions import` and tells what it holds (or takes `forced`, --what). Every problem is a
 * usage error naming the file: missing, unreadable, not one of the formats, or none of the three layouts.
 */
export async function readStateFile(file: string, forced: What | undefined): Promise<StateFile> {
  let bytes: Buffer<ArrayBuffer>;
  try {
    bytes = await readFile(file);
  } catch (err) {
    const code = (err as { code?: string }).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'it is a directory' : code === 'EACCES' ? 'permission denied'
      : code === 'ERR_FS_FILE_TOO_LARGE' ? 'it is larger than 2 GiB, more than this command sends' : code ?? (err as Error).message;
    throw usageError(`sessions import: cannot read ${file}: ${why}`);
  }
  const format = formatOf(bytes);
  if (format === null) throw usageError(`sessions import: ${file} is ${bytes.length === 0 ? 'empty' : 'not a torch.save file, safetensors or JSON'}`);
  if (forced === 'checkpoint' && format === 'safetensors') throw usageError('sessions import: a checkpoint is a torch.save file or JSON; a safetensors file holds a state_dict or parameters');
  let found: { what: What | null; holds: string };
  let body: Uint8Array<ArrayBuffer> = bytes;
  try {
    if (format === 'json') {
      let value: unknown;
      try {
        value = JSON.parse(bytes.toString('utf8'));
      } catch (err) {
        throw usageError(`sessions import: ${file} is not valid JSON: ${(err as Error).message}`);
      }
      if (value === null || typeof value !== 'object' || Array.isArray(value)) {
        const holds = Array.isArray(value) ? 'a JSON array' : value === null ? 'JSON null' : `a JSON ${typeof value}`;
        throw usageError(`sessions import: ${file} holds ${holds}, not an object (a state_dict, a checkpoint or {"params": ...})`);
      }
      const keys = Object.keys(value as object);
      found = { what: keys.includes('params') ? 'params' : whatOfKeys(keys, false), holds: `an object with ${describeKeys(keys)}` };
      // The parameters as `sessions download --what params --format json` writes them carry the session,
      // version and step beside them; the route takes {"params"} alone.
      if ((forced ?? found.what) === 'params' && keys.includes('params') && keys.length > 1) {
        body = Buffer.from(JSON.stringify({ params: (value as { params: unknown }).params }));
      }
    } else if (forced) {
      found = { what: forced, holds: '' }; // forced: the service reads the file, and says what is wrong with it
    } else if (format === 'pt') {
      const value = readTorchSave(bytes);
      const keys = value instanceof PyDict ? [...value.keys()] : [];
      found = {
        what: value instanceof PyDict ? whatOfKeys(keys, [...value.values()].every(isTensor), true) : null,
        holds: value instanceof PyDict ? `a dict with ${describeKeys(keys)}` : `a ${pyTypeName(value)}`,
      };
    } else {
      // The service's state_dict layout: state.<i>.<key> tensors, the param groups in the metadata.
      const { tensors, metadata } = readSafetensors(bytes, { dtypes: 'all' });
      const names = [...tensors.keys()];
      found = {
        what: metadata.has('param_groups') || names.some((n) => /^state\.\d+\./.test(n)) ? 'state_dict' : names.length > 0 ? 'params' : null,
        holds: 'no tensors',
      };
    }
  } catch (err) {
    if (!isFormatError(err)) throw err;
    throw usageError(`sessions import: ${file} is not a readable ${FORMAT_NAMES[format]}: ${err.message}`);
  }
  const what = forced ?? found.what;
  if (what === null) throw usageError(`sessions import: cannot tell what ${file} holds (${found.holds}): pass --what ${WHATS.join('|')}`);
  return { format, what, type: MEDIA[format][0], body };
}
