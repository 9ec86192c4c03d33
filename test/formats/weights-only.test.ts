// What torch.load(weights_only=True) reads besides tensors and plain values, in files real torch wrote
// (committed: test/fixtures/formats/weights_only_values.py made them with torch 1.13 and 2.13): Parameters
// that carry Python attributes. What weights_only refuses stays refused.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  FormatError, PyDict, findTorchGlobal, isTensor, readTorchSave, streamToBuffer, toModelStateDict, unpickle, zipStream, type PyValue,
} from '../../src/formats/index.ts';

const FIXTURES = join(import.meta.dirname, '../fixtures/formats');
const hex = (data: Float32Array) => Array.from(new Uint32Array(data.buffer, data.byteOffset, data.length), (x) => x.toString(16).padStart(8, '0'));

function refusal(fn: () => unknown): FormatError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a refusal');
}

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

    if (label === '2.x') {
      test('a Parameter attribute weights_only refuses (an argparse.Namespace) is refused', () => {
        const err = refusal(() => read('refused-attribute.pt'));
        assert.equal(err.code, 'PICKLE_GLOBAL_REFUSED');
        assert.match(err.message, /argparse\.Namespace is not allowed/);
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
});
