// The same plain-JSON description of a Python value that test/fixtures/formats/torch_interop.py
// builds, so the two sides can compare values exactly (floats by their bits, tensors by their bytes).
import { InertValue, PyDict, PyTuple, isTensor, tensorBytes, type PyValue } from '../../src/formats/index.ts';

export type Description = Record<string, unknown>;

export function describeValue(value: PyValue): Description {
  if (value === null) return { t: 'none' };
  if (typeof value === 'boolean') return { t: 'bool', v: value };
  if (typeof value === 'bigint') return { t: 'int', v: value.toString() };
  if (typeof value === 'number') {
    const bytes = Buffer.alloc(8);
    bytes.writeDoubleBE(value);
    return { t: 'float', hex: bytes.toString('hex') };
  }
  if (typeof value === 'string') return { t: 'str', v: value };
  if (Array.isArray(value)) return { t: 'list', items: value.map(describeValue) };
  if (value instanceof PyTuple) return { t: 'tuple', items: value.items.map(describeValue) };
  if (value instanceof PyDict) {
    const out: Description = { t: 'dict', ordered: value.ordered, items: [...value].map(([k, v]) => [describeValue(k), describeValue(v)]) };
    if (value.attributes && value.attributes.size > 0) out.attrs = [...value.attributes].map(([k, v]) => [k, describeValue(v)]);
    return out;
  }
  if (isTensor(value)) {
    return { t: 'tensor', dtype: value.dtype, shape: value.shape, hex: tensorBytes(value).toString('hex'), requires_grad: value.requiresGrad ?? false };
  }
  if (value instanceof Uint8Array) return { t: 'bytes', hex: Buffer.from(value).toString('hex') };
  if (value instanceof InertValue) return { t: value.type, repr: value.repr };
  throw new Error(`cannot describe ${String(value)}`);
}
