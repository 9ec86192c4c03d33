// What torch.load(weights_only=True) reads besides tensors and plain values, in files real torch wrote
// (committed: test/fixtures/formats/weights_only_values.py made them with torch 1.13 and 2.13): Parameters
// that carry Python attributes, and a checkpoint's torch.dtype, torch.device, torch.layout and complex values.
// What weights_only refuses stays refused.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  InertValue, PyDict, findTorchGlobal, isTensor, readTorchSave, streamToBuffer, toCheckpoint, toModelStateDict, unpickle, zipStream, type PyValue,
} from '../../src/formats/index.ts';
import { refusal } from './torch-files.ts';

const FIXTURES = join(import.meta.dirname, '../fixtures/formats');
const hex = (data: Float32Array) => Array.from(new Uint32Array(data.buffer, data.byteOffset, data.length), (x) => x.toString(16).padStart(8, '0'));

for (const label of ['1.13', '2.x']) {
  describe(`files torch ${label} wrote`, () => {
    const dir = join(FIXTURES, `torch-${label}`);
    const read = (name: string) => readTorchSave(readFileSync(join(dir, name)));
    const expected = JSON.parse(readFileSync(join(dir, 'weights-only-values.json'), 'utf8')) as {
      before: Record<string, string[]>; after: Record<string, string[]>; state: Record<string, Record<string, string[]>>;
    };

    test('dict(model.named_parameters()) whose Parameters carry attributes reads as its tensors (the attributes left out)', () => {
      const model = toModelStateDict(read('params-with-attributes.pt'));
      assert.deepEqual([...model.tensors.keys()], ['weight', 'bias']);
      for (const [name, tensor] of model.tensors) {
        assert.equal(tensor.dtype, 'float32');
        assert.equal(tensor.requiresGrad, true);
        assert.deepEqual(hex(tensor.data as Float32Array), expected.before[name], name);
      }
    });

    test('a checkpoint\'s torch.dtype, torch.device, torch.layout and complex values read as inert values; the model and optimizer as torch has them', () => {
      const value = read('tutorial-checkpoint.pt') as PyDict;
      const config = value.get('config') as PyDict;
      const described = (v: PyValue): unknown => (v instanceof InertValue ? `${v.type} ${v.repr}` : Array.isArray(v) ? v.map(described) : (v as { items?: PyValue[] }).items?.map(described));
      assert.deepEqual([...config].map(([key, v]) => [key, described(v)]), [
        ['torch_dtype', 'torch.dtype torch.float16'],
        ['dtypes', ['torch.dtype torch.float32', 'torch.dtype torch.bfloat16']],
        ['device', 'torch.device device(type=\'cpu\')'],
        ['devices', ['torch.device device(type=\'cuda\', index=0)', 'torch.device device(type=\'cuda\', index=1)']],
        ['layout', 'torch.layout torch.strided'],
        ['z', 'complex (1.5-2j)'],
      ]);
      const checkpoint = toCheckpoint(value);
      for (const [name, tensor] of checkpoint.model.tensors) assert.deepEqual(hex(tensor.data as Float32Array), expected.after[name], name);
      for (const [index, s] of checkpoint.optimizer.state) {
        assert.deepEqual(hex(s.ax.data), expected.state[index].ax);
        assert.deepEqual(hex(Float32Array.of(s.step, s.eta, s.mu)), [expected.state[index].step[0], expected.state[index].eta[0], expected.state[index].mu[0]]);
      }
      assert.deepEqual(checkpoint.extra?.map(([key]) => key), ['epoch', 'loss', 'config']);
    });

    if (label === '2.x') {
      test('a Parameter attribute weights_only refuses (an argparse.Namespace) is refused, in a checkpoint\'s reading (unknown globals unread) too', () => {
        const err = refusal(() => read('refused-attribute.pt'));
        assert.equal(err.code, 'PICKLE_GLOBAL_REFUSED');
        assert.match(err.message, /argparse\.Namespace is not allowed/);
        const unread = refusal(() => readTorchSave(readFileSync(join(dir, 'refused-attribute.pt')), { unknownGlobals: 'unread' }));
        assert.equal(unread.code, 'PICKLE_GLOBAL_REFUSED');
        assert.match(unread.message, /pickle global argparse\.Namespace is not allowed \(a Parameter's attribute /);
      });
    } else {
      test('torch 1.13 leaves a Parameter\'s attributes out of the file: the one weights_only would refuse is not there', () => {
        assert.ok(isTensor((read('refused-attribute.pt') as PyDict).get('w') as PyValue));
      });
    }
  });
}

describe('pickles torch would not write, or weights_only refuses', () => {
  const load = (pkl: string) => unpickle(Buffer.from(`\x80\x02${pkl}.`, 'latin1'), { findGlobal: findTorchGlobal });
  /** A torch.save archive of _rebuild_parameter_with_state(<a tensor of 2 floats>, True, OrderedDict(), <state>). */
  const parameterFile = (state: string) => {
    const pkl = Buffer.from('\x80\x02ctorch._utils\n_rebuild_parameter_with_state\n(ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n'
      + 'X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR\x88ccollections\nOrderedDict\n)R' + state + 'tR.', 'latin1');
    const records: [string, Buffer][] = [['a/data.pkl', pkl], ['a/data/0', Buffer.from(Float32Array.of(1, 2).buffer)], ['a/version', Buffer.from('3\n')]];
    return streamToBuffer(zipStream(records.map(([name, data]) => ({ name, size: data.length, data: () => [data] }))));
  };

  test('_rebuild_parameter_with_state takes a dict (or None, or a (dict, slots) pair) of attributes, nothing else', () => {
    for (const state of ['}X\x01\x00\x00\x00aK\x07s', 'N', '}N\x86', 'N}\x86']) {
      const value = readTorchSave(parameterFile(state));
      assert.ok(isTensor(value) && value.requiresGrad && [...value.data].join() === '1,2', JSON.stringify(state));
    }
    for (const state of ['K\x01', 'ctorch\nFloatStorage\n', 'ctorch\nFloatStorage\n}\x86', ']', '}}}\x87']) {
      const err = refusal(() => readTorchSave(parameterFile(state)));
      assert.ok(['PICKLE_CALL_INVALID', 'PICKLE_VALUE_UNSUPPORTED'].includes(err.code), `${JSON.stringify(state)}: ${err.code} ${err.message}`);
    }
  });

  test('globals weights_only refuses stay refused, in a parameter\'s attributes as anywhere', () => {
    for (const global of ['torch\nnn\n', 'torch\nload\n', 'builtins\neval\n', 'torch\nfloat\n', 'torch\nTensor\n', 'torch.serialization\nload\n', 'argparse\nNamespace\n', 'numpy.core.multiarray\nscalar\n']) {
      assert.equal(refusal(() => load(`}X\x01\x00\x00\x00ac${global}s`)).code, 'PICKLE_GLOBAL_REFUSED', global);
    }
  });

  test('torch.device, _get_layout and complex take what torch pickles, and nothing else', () => {
    for (const call of ['ctorch\ndevice\nK\x00\x85R', 'ctorch\ndevice\n)R', 'ctorch\ndevice\nX\x03\x00\x00\x00cpuX\x01\x00\x00\x000\x86R',
      'ctorch.serialization\n_get_layout\nX\x0b\x00\x00\x00torch.wrong\x85R', 'c__builtin__\ncomplex\nX\x01\x00\x00\x001\x85R', 'ctorch\nfloat16\n)R']) {
      const err = refusal(() => load(call));
      assert.ok(['PICKLE_CALL_INVALID', 'PICKLE_STACK_INVALID'].includes(err.code), `${JSON.stringify(call)}: ${err.code} ${err.message}`);
    }
    const device = load('ctorch\ndevice\nX\x04\x00\x00\x00cudaK\x02\x86R');
    assert.ok(device instanceof InertValue && device.repr === 'device(type=\'cuda\', index=2)');
    const z = load('cbuiltins\ncomplex\nG\x3f\xf8\x00\x00\x00\x00\x00\x00K\x02\x86R');
    assert.ok(z instanceof InertValue && z.repr === '(1.5+2j)', String((z as InertValue).repr));
  });

  test('hostile calls: a memoized value passed to call after call is charged each time; torch.device as torch takes it; attributes torch would set on the tensor', () => {
    const memo = (i: number) => `r${String.fromCharCode(i, 0, 0, 0)}`;
    const get = (i: number) => `j${String.fromCharCode(i, 0, 0, 0)}`;
    const str = (text: string) => `X${String.fromCharCode(text.length & 0xff, (text.length >> 8) & 0xff, (text.length >> 16) & 0xff, 0)}${text}`;
    const repeat = (callable: string, args: string, n: number) => `]${callable}${memo(1)}0${args}${memo(2)}0${`${get(1)}${get(2)}Ra`.repeat(n)}`;
    const limits = { maxTextBytes: 1_000_000, maxExpandedSize: 100_000 };
    const loadWithin = (pkl: string) => unpickle(Buffer.from(`\x80\x02${pkl}.`, 'latin1'), { findGlobal: findTorchGlobal, ...limits });
    // A 100 KB string to _codecs.encode 50 times (5 MB made of it), a 50,000-int list to torch.Size 5 times.
    const text = 'a'.repeat(100_000);
    assert.equal(refusal(() => loadWithin(repeat('c_codecs\nencode\n', `${str(text)}${str('latin1')}\x86`, 50))).code, 'PICKLE_LIMIT_EXCEEDED');
    assert.equal((loadWithin(repeat('c_codecs\nencode\n', `${str(text)}${str('latin1')}\x86`, 5)) as unknown[]).length, 5, 'a few calls are fine');
    const ints = `(${'K\x01'.repeat(100)}l`;
    assert.equal(refusal(() => loadWithin(repeat('ctorch\nSize\n', `${ints}\x85`, 5))).code, 'PICKLE_CALL_INVALID', 'over 64 dimensions');
    const list = `(${'K\x01'.repeat(60)}l`;
    assert.equal(refusal(() => loadWithin(repeat('ctorch\nSize\n', `${list}\x85`, 2000))).code, 'PICKLE_LIMIT_EXCEEDED', 'a 60-int list 2,000 times');
    // torch.device: its types, an int64 index, not an index twice.
    const huge = `\x8b${String.fromCharCode(9, 0, 0, 0)}${'\xff'.repeat(8)}\x7f`; // 2^71 - 1
    for (const args of [`${str('cuda')}${huge}\x86`, `${str('foo')}\x85`, `${str('cpu:0')}K\x00\x86`, `${str('a'.repeat(1000))}\x85`]) {
      assert.equal(refusal(() => load(`ctorch\ndevice\n${args}R`)).code, 'PICKLE_CALL_INVALID', JSON.stringify(args.slice(0, 30)));
    }
    assert.equal((load(`ctorch\ndevice\n${str('cuda:1')}\x85R`) as InertValue).repr, "device(type='cuda', index=1)");
    // complex of an int no float holds: Python's OverflowError.
    assert.equal(refusal(() => load(`cbuiltins\ncomplex\n\x8b${String.fromCharCode(200, 0, 0, 0)}${'\x01'.repeat(200)}\x85R`)).code, 'PICKLE_CALL_INVALID');
    // A parameter's attributes that torch would set on the tensor (data: other values loaded), or not named by a string.
    for (const state of [`}${str('data')}K\x01s`, `}${str('requires_grad')}${str('no')}s`, `}K\x00K\x01s`, `}${str('__class__')}K\x01s`, `N}${str('grad')}K\x01s\x86`]) {
      const err = refusal(() => readTorchSave(parameterFile(state)));
      assert.equal(err.code, 'PICKLE_CALL_INVALID', `${JSON.stringify(state)}: ${err.message}`);
    }
    // torch.constructor is no storage class: a refused global, not an unsupported dtype.
    assert.equal(refusal(() => load('ctorch\nconstructor\n')).code, 'PICKLE_GLOBAL_REFUSED');
  });

  test('an inert value is refused where a tensor or a number belongs, naming the key', () => {
    const model = new PyDict([['w', load('ctorch\nfloat16\n')]]);
    const err = refusal(() => toModelStateDict(model));
    assert.match(err.message, /model\["w"\] must be a tensor, got torch\.dtype/);
  });
});
