// Small hostile files must be refused by name, quickly, before anything large is allocated; the views
// and state_dicts PyTorch users actually save must still load exactly.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  FormatError, PyDict, fromAsgdStateDict, readSafetensors, readTorchSave, toAsgdStateDict, toCheckpoint, torchSaveToBuffer, type Tensor,
} from '../../src/formats/index.ts';
import { MAX_STEP_COUNT } from '../../src/formats/optimizer-state.ts';
import { runPython, skipWithoutTorch } from '../support/torch.ts';
import { viewsFile as torchFile, type View } from './torch-files.ts';

function refusal(fn: () => unknown): FormatError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a refusal');
}

describe('torch.save views that would expand a small storage', () => {
  test('a 1 KB file whose view claims 2**50 elements is refused by name, at once, instead of a RangeError', () => {
    const file = torchFile({ w: { key: '0', numel: 1, size: [2n ** 50n], stride: [0] }, b: { key: '1', numel: 2, size: [2], stride: [1] } });
    assert.ok(file.length < 2048, `${file.length} bytes`);
    const err = refusal(() => readTorchSave(file, { name: 'grads' }));
    assert.equal(err.code, 'TENSOR_SHAPE_INVALID');
    assert.match(err.message, /^grads\.w: a view of shape \[1125899906842624\] with strides \[0\]/);
  });

  test('an expanded view larger than the file is refused before its copy is allocated: 2**28 elements take no time', () => {
    const file = torchFile({ w: { key: '0', numel: 1, size: [2 ** 28], stride: [0] } });
    const started = performance.now();
    const err = refusal(() => readTorchSave(file));
    assert.ok(performance.now() - started < 200, `${performance.now() - started} ms`); // copying 2**28 elements took seconds
    assert.match(err.message, /^w: .*would take 1073741824 bytes to copy/);
  });

  test('the budget is for the whole file: many views of one element add up', () => {
    const views: Record<string, View> = {};
    for (let k = 0; k < 5; k++) views[`v${k}`] = { key: '0', numel: 1, size: [2 ** 16], stride: [0] }; // 256 KiB each
    const err = refusal(() => readTorchSave(torchFile(views)));
    assert.match(err.message, /^v4: .*\(1048576 already taken\)/);
    // the caller's name for the file comes first
    const nested = torchFile({ w: { key: '0', numel: 1, size: [2 ** 30], stride: [0] } });
    assert.match(refusal(() => readTorchSave(nested, { name: 'checkpoint' })).message, /^checkpoint\.w: /);
  });

  test('views within the budget (transposes, column slices, rows, small expanded views) load as before', () => {
    assert.match(refusal(() => readTorchSave(torchFile({ big: { key: '1', numel: 2, size: [2 ** 20, 2], stride: [0, 1] } }))).message, /^big: /);
    const tensors = readTorchSave(torchFile({
      transposed: { key: '0', numel: 6, size: [3, 2], stride: [1, 3] },
      column: { key: '0', numel: 6, size: [2], offset: 1, stride: [3] },
      row: { key: '0', numel: 6, size: [3], offset: 3, stride: [1] },
      expanded: { key: '1', numel: 2, size: [3, 2], stride: [0, 1] },
    })) as PyDict;
    const data = (name: string) => [...(tensors.get(name) as Tensor).data];
    assert.deepEqual(data('transposed'), [0, 3, 1, 4, 2, 5]);
    assert.deepEqual(data('column'), [1, 4]);
    assert.deepEqual(data('row'), [3, 4, 5]);
    assert.deepEqual(data('expanded'), [0, 1, 0, 1, 0, 1]);
  });

  test('what PyTorch saves (transposed, sliced, channels_last, tied and expanded tensors) reads back exactly; its expand(2**40) is refused', (t) => {
    const skip = skipWithoutTorch();
    if (skip) return t.skip(skip);
    const hex = runPython(`
import io, sys
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
values = {
  'transposed': base.t(), 'column': base[:, 2], 'strided': base[::2, 1::2], 'tied_a': base, 'tied_b': base.t(),
  'channels_last': torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 4).to(memory_format=torch.channels_last),
  'expanded': torch.tensor([1., 2.]).expand(3, 2), 'bias': torch.zeros(5),
}
f = io.BytesIO(); torch.save(values, f); sys.stdout.write(f.getvalue().hex())
f = io.BytesIO(); torch.save({'w': torch.zeros(1).expand(2**40)}, f); sys.stdout.write(' ' + f.getvalue().hex())
`);
    const [file, bomb] = hex.split(' ').map((h) => Buffer.from(h, 'hex'));
    assert.match(refusal(() => readTorchSave(bomb, { name: 'grads' })).message, /^grads\.w: a view of shape \[1099511627776\] with strides \[0\]/);
    const read = readTorchSave(file) as PyDict;
    const expected: Record<string, number[]> = {
      transposed: Array.from({ length: 24 }, (_, i) => (i % 4) * 6 + Math.floor(i / 4)),
      column: [2, 8, 14, 20],
      strided: [1, 3, 5, 13, 15, 17],
      tied_a: Array.from({ length: 24 }, (_, i) => i),
      channels_last: Array.from({ length: 16 }, (_, i) => i),
      expanded: [1, 2, 1, 2, 1, 2],
      bias: [0, 0, 0, 0, 0],
    };
    expected.tied_b = expected.transposed;
    for (const [name, values] of Object.entries(expected)) assert.deepEqual([...(read.get(name) as Tensor).data], values, name);
  });
});

// ---- step counts: what torch's float32 counter can hold and this service can store and serve back ----

function asgdStateDict(step: number | bigint | Tensor): PyDict {
  const scalar = (x: number): Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });
  return new PyDict([
    ['state', new PyDict([[0n, new PyDict([['step', step], ['eta', scalar(0.01)], ['mu', scalar(1)], ['ax', { dtype: 'float32', shape: [2], data: Float32Array.of(1, 2) }]])]])],
    ['param_groups', [new PyDict([['lr', 0.01], ['lambd', 1e-4], ['alpha', 0.75], ['t0', 1e6], ['weight_decay', 0n], ['foreach', null], ['maximize', false], ['params', [0n]]])]],
  ]);
}
const f32 = (x: number): Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });

describe('step counts in a torch.save state_dict', () => {
  test('infinite, NaN, negative, fractional or too large counts are refused, naming the field; whole counts up to 2**53 - 2**29 round-trip', () => {
    for (const step of [f32(Infinity), f32(NaN), f32(-3), f32(1.5), f32(1e30), 1e300]) {
      const file = torchSaveToBuffer(asgdStateDict(step));
      const err = refusal(() => toAsgdStateDict(readTorchSave(file), { toFloat32: true }));
      assert.equal(err.code, 'INVALID_STATE_DICT');
      assert.match(err.message, /^state_dict\.state\[0\]\.step must be a whole number of steps from 0 to 9007198717870080/);
    }
    const checkpoint = new PyDict([['model', new PyDict()], ['optimizer', asgdStateDict(f32(Infinity))], ['step', 1n]]);
    assert.match(refusal(() => toCheckpoint(readTorchSave(torchSaveToBuffer(checkpoint)))).message, /^checkpoint\.optimizer\.state\[0\]\.step must be a whole number/);
    // the largest float32 below 2**53 (and every whole float32 under it) is a count the service stores and serves back
    for (const step of [0, 1, 2 ** 24, MAX_STEP_COUNT]) {
      const sd = toAsgdStateDict(readTorchSave(torchSaveToBuffer(asgdStateDict(f32(step)))));
      assert.equal(sd.state.get(0)!.step, step);
      assert.equal(toAsgdStateDict(readTorchSave(torchSaveToBuffer(fromAsgdStateDict(sd)))).state.get(0)!.step, step);
    }
  });
});

describe('an empty per-parameter entry in a torch.save state_dict', () => {
  test('{} (torch leaves it after optimizer.state[p] was read) is no state, as torch.optim.ASGD.load_state_dict takes it', () => {
    const sd = asgdStateDict(f32(3));
    (sd.get('state') as PyDict).set(0n, new PyDict());
    assert.equal(toAsgdStateDict(readTorchSave(torchSaveToBuffer(sd))).state.size, 0);
  });
});

describe('another optimizer\'s state in a torch.save state_dict', () => {
  test('a per-parameter key ASGD does not have (SGD\'s momentum_buffer) is refused by name, not dropped', () => {
    const sd = asgdStateDict(f32(3));
    ((sd.get('state') as PyDict).get(0n) as PyDict).set('momentum_buffer', { dtype: 'float32', shape: [2], data: Float32Array.of(0, 0) });
    const err = refusal(() => toAsgdStateDict(readTorchSave(torchSaveToBuffer(sd))));
    assert.equal(err.code, 'INVALID_STATE_DICT');
    assert.match(err.message, /^state_dict\.state\[0\]\.momentum_buffer is not part of ASGD's per-parameter state/);
  });
});

// ---- safetensors headers: bounded by what the caller can use, refused before the work ----

function safetensorsHeader(header: string): Buffer {
  const json = Buffer.from(header);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, json]);
}

describe('safetensors headers', () => {
  const emptyTensors = (n: number) => safetensorsHeader('{' + Array.from({ length: n }, (_, i) => `"t${i}":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`).join(',') + '}');

  test('a header larger than the caller\'s tensors can need is refused before it is parsed', () => {
    const file = emptyTensors(200_000); // 11 MB
    const started = performance.now();
    const err = refusal(() => readSafetensors(file, { maxTensors: 2 }));
    assert.ok(performance.now() - started < 50, `${performance.now() - started} ms`);
    assert.equal(err.code, 'SAFETENSORS_HEADER_INVALID');
    assert.match(err.message, /^header of \d+ bytes is larger than 2 tensors need/);
  });

  test('a header listing more tensors than the caller can use, or too many metadata keys, is refused before its entries are read', () => {
    assert.match(refusal(() => readSafetensors(emptyTensors(3), { maxTensors: 2 })).message, /^header lists more than 2 tensors/);
    const metadata = safetensorsHeader('{"__metadata__":{' + Array.from({ length: 1025 }, (_, i) => `"m${i}":"x"`).join(',') + '}}');
    assert.match(refusal(() => readSafetensors(metadata)).message, /^header __metadata__ has more than 1024 entries/);
  });

  test('the caller refuses the first unknown name before the rest of the header is checked', () => {
    const seen: string[] = [];
    const file = safetensorsHeader('{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"evil":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},"x":{}}');
    assert.throws(() => readSafetensors(file, { checkName: (name) => { seen.push(name); if (name !== 'w') throw new Error(`unknown ${name}`); } }), /unknown evil/);
    assert.deepEqual(seen, ['w', 'evil']);
  });
});

test('a torch.save file in the legacy (pre-1.6) format is refused as such, not as a corrupt zip', () => {
  // The first bytes torch.save(obj, f, _use_new_zipfile_serialization=False) writes (torch 1.13).
  const legacy = Buffer.from('80028a0a6cfc9c46f9206aa850192e80024de9032e80027d', 'hex');
  assert.throws(() => readTorchSave(legacy), (err: FormatError) => err.code === 'TORCH_SAVE_INVALID' && /legacy format.*PyTorch 1\.6/.test(err.message));
});
