// torch.save files written by hand, for views and values torch.save writes but this service's writer
// never does: any sizes, strides and offsets into a storage, and ints beyond 32 bits.
import assert from 'node:assert/strict';
import { FormatError, streamToBuffer, zipStream } from '../../src/formats/index.ts';

/** A tensor as a view into storage `key`, whose `numel` float32 elements are `fill` (default 0, 1, 2, …). */
export interface View { key: string; numel: number; offset?: number; size: (number | bigint)[]; stride: number[]; fill?: number }
/** Python values: ints are bigints, floats numbers, dicts Maps (int or str keys), lists arrays. */
export type PickleValue = null | boolean | number | bigint | string | View | PickleValue[] | Map<string | bigint, PickleValue>;

const latin1 = (b: Buffer) => b.toString('latin1');
const str = (s: string) => { const b = Buffer.from(s, 'utf8'); const h = Buffer.alloc(5); h[0] = 0x58; h.writeUInt32LE(b.length, 1); return latin1(Buffer.concat([h, b])); };
/** LONG1: any int, as Python pickles ints beyond 32 bits. */
const int = (n: number | bigint) => {
  let v = BigInt(n);
  const bytes: number[] = [];
  do { bytes.push(Number(v & 0xffn)); v >>= 8n; } while (v > 0n || (bytes[bytes.length - 1] & 0x80) !== 0);
  return latin1(Buffer.from([0x8a, bytes.length, ...bytes]));
};
const float = (x: number) => { const b = Buffer.alloc(9); b[0] = 0x47; b.writeDoubleBE(x, 1); return latin1(b); };

const isView = (v: PickleValue): v is View => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Map);

function pickleOf(value: PickleValue, storages: Map<string, View>): string {
  if (value === null) return 'N';
  if (typeof value === 'boolean') return value ? '\x88' : '\x89';
  if (typeof value === 'bigint') return int(value);
  if (typeof value === 'number') return float(value);
  if (typeof value === 'string') return str(value);
  if (Array.isArray(value)) return ']' + (value.length ? '(' + value.map((v) => pickleOf(v, storages)).join('') + 'e' : '');
  if (value instanceof Map) return '}' + (value.size ? '(' + [...value].map(([k, v]) => pickleOf(k, storages) + pickleOf(v, storages)).join('') + 'u' : '');
  if (!isView(value)) throw new Error('unreachable');
  storages.set(value.key, value);
  return 'ctorch._utils\n_rebuild_tensor_v2\n((' + str('storage') + 'ctorch\nFloatStorage\n' + str(value.key) + str('cpu') + int(value.numel)
    + 'tQ' + int(value.offset ?? 0) + '(' + value.size.map(int).join('') + 't(' + value.stride.map(int).join('') + 't\x89ccollections\nOrderedDict\n)RtR';
}

/** The torch.save archive of `value`. */
export function torchFile(value: PickleValue): Buffer {
  const storages = new Map<string, View>();
  const pkl = '\x80\x02' + pickleOf(value, storages) + '.';
  const records: [string, Buffer][] = [
    ['a/data.pkl', Buffer.from(pkl, 'latin1')],
    ...[...storages].map(([key, v]): [string, Buffer] => [`a/data/${key}`, Buffer.from(Float32Array.from({ length: v.numel }, (_, i) => v.fill ?? i).buffer)]),
    ['a/version', Buffer.from('3\n')],
  ];
  return streamToBuffer(zipStream(records.map(([name, data]) => ({ name, size: data.length, data: () => [data] }))));
}

/** A dict of views, as torch.save({name: tensor, …}) writes it. */
export const viewsFile = (views: Record<string, View>): Buffer => torchFile(new Map(Object.entries(views)));

/** The FormatError that reading throws (fails the test when it throws none, or another error). */
export function refusal(fn: () => unknown): FormatError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a refusal');
}
