import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { FormatError, PyDict, PyTuple, findTorchGlobal, orderedDict, pickle, unpickle, type PyValue } from '../../src/formats/index.ts';
import { describeValue } from './describe.ts';

const FIXTURES = join(import.meta.dirname, '../fixtures/formats');
const load = (bytes: Uint8Array | string, options = {}) =>
  unpickle(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes, { findGlobal: findTorchGlobal, ...options });

function refused(bytes: Uint8Array | string, code: string, message?: RegExp, options = {}): void {
  assert.throws(
    () => load(bytes, options),
    (err: unknown) => {
      assert.ok(err instanceof FormatError, `expected a FormatError, got ${String(err)}`);
      assert.equal(err.code, code, err.message);
      if (message) assert.match(err.message, message);
      return true;
    },
  );
}

/** Runs Python (no torch needed) with `script`; returns its stdout parsed as JSON. */
function python(script: string, input = ''): unknown {
  const result = spawnSync('python3', ['-c', script], { input, encoding: 'utf8', env: { ...process.env, PYTHONPATH: FIXTURES }, maxBuffer: 64 << 20 });
  assert.equal(result.status, 0, result.stderr);
  return JSON.parse(result.stdout);
}

const VALUES = `
import collections
values = {
    'ints': [0, 1, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**31, -2**31 - 1, 2**63, -2**63, 2**64, -2**100 - 7, 10**300],
    'floats': [0.0, -0.0, 1.5, 1e-310, 5e-324, 1.7976931348623157e308, float('inf'), -float('inf')],
    'strs': ['', 'a', 'ünïcødé ✓ 𝄞', 'x' * 300, 'line\\nbreak'],
    'bytes': [b'', b'\\x00\\xff\\x80abc', bytes(range(256))],
    'tuples': [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),)],
    'nested': {'a': [{'b': (None, True, False)}], 7: collections.OrderedDict([('z', 1), ('y', [2])])},
    'shared': None,
    'many': list(range(2500)),
    'bigdict': {str(i): i for i in range(1100)},
}
inner = [1, 2]
values['shared'] = [inner, inner, (inner,)]
`;

describe('unpickler reads what CPython pickles', () => {
  test('protocols 2 to 5 (FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE, BINBYTES, BYTEARRAY8, LONG4)', () => {
    const cases = python(`${VALUES}
import json, pickle
from pyvalues import describe
out = []
for proto in (2, 3, 4, 5):
    out.append([pickle.dumps(values, protocol=proto).hex(), describe(values)])
out.append([pickle.dumps(bytearray(b'xyz'), protocol=5).hex(), describe(b'xyz')])
out.append([pickle.dumps(2**5000, protocol=2).hex(), describe(2**5000)])
print(json.dumps(out))
`) as [string, unknown][];
    for (const [hex, expected] of cases) assert.deepStrictEqual(describeValue(load(Buffer.from(hex, 'hex'))), expected);
  });

  test('shared sub-values stay shared (memo), as Python builds them', () => {
    const shared = new PyDict([['x', [1n, 2n]]]);
    const outer = [shared, shared];
    const back = load(pickle(outer)) as PyValue[];
    assert.equal(back[0], back[1]);
  });
});

describe('the memo', () => {
  test('MEMOIZE, BINPUT and LONG_BINPUT at any index, mixed: each get reads what the last put at its index stored, as CPython', () => {
    // Indices from 0 as MEMOIZE gives them are kept in an array, others (far apart, or ahead of it) in maps;
    // the array then reaches one of those, and a put at an index again replaces it.
    const text = '\x80\x04](' +
      'K\x01\x94K\x02\x94' + // memo 0 = 1, memo 1 = 2 (MEMOIZE)
      'K\x03r\x05\x00\x01\x00' + // memo 65541 = 3 (LONG_BINPUT)
      'K\x04q\x03' + // memo 3 = 4 (BINPUT, ahead of the array)
      'K\x05\x94' + // MEMOIZE: memo 4 = 5 (the memo's size)
      'K\x06q\x02K\x07q\x03K\x09q\x01' + // memo 2 = 6, memo 3 = 7 (replacing 4), memo 1 = 9 (replacing 2)
      'h\x00h\x01h\x02h\x03h\x04j\x05\x00\x01\x00' + // the gets
      'e.';
    const ours = (load(text) as bigint[]).map(Number);
    const cpython = python(`import json, pickle; print(json.dumps(pickle.loads(bytes.fromhex('${Buffer.from(text, 'latin1').toString('hex')}'))))`);
    assert.deepEqual(ours, cpython);
    assert.deepEqual(ours.slice(-6), [1, 9, 6, 7, 5, 3]);
  });
});

describe('pickler writes what CPython reads', () => {
  test('every value kind round-trips through Python pickle.loads exactly', () => {
    const values = python(`${VALUES}
import json, pickle
from pyvalues import describe
print(json.dumps(pickle.dumps(values, protocol=2).hex()))
`) as string;
    const parsed = load(Buffer.from(values, 'hex'));
    const ours = pickle(parsed);
    const back = python(`
import json, pickle, sys, pickletools
from pyvalues import describe
data = bytes.fromhex(sys.stdin.read())
ops = {op.name for op, _, _ in pickletools.genops(data)}
print(json.dumps({'value': describe(pickle.loads(data)), 'ops': sorted(ops)}))
`, ours.toString('hex')) as { value: unknown; ops: string[] };
    assert.deepStrictEqual(back.value, describeValue(parsed));
    // Only protocol-2 opcodes torch 2.x's weights_only unpickler accepts.
    const allowed = ['PROTO', 'STOP', 'EMPTY_DICT', 'EMPTY_LIST', 'EMPTY_TUPLE', 'MARK', 'SETITEM', 'SETITEMS', 'APPEND', 'APPENDS', 'TUPLE', 'TUPLE1',
      'TUPLE2', 'TUPLE3', 'BININT', 'BININT1', 'BININT2', 'LONG1', 'BINFLOAT', 'BINUNICODE', 'NONE', 'NEWTRUE', 'NEWFALSE', 'GLOBAL', 'REDUCE', 'BUILD',
      'BINPUT', 'LONG_BINPUT', 'BINGET', 'LONG_BINGET'];
    for (const op of back.ops) assert.ok(allowed.includes(op), `opcode ${op}`);
  });

  test('integers use the smallest encoding CPython uses', () => {
    const ints = [0n, 255n, 256n, 65535n, 65536n, -1n, 2n ** 31n - 1n, -(2n ** 31n), 2n ** 31n, -128n, -129n, -(2n ** 63n), 2n ** 64n - 1n, 10n ** 40n];
    const expected = python(`
import json, pickle
ints = [0, 255, 256, 65535, 65536, -1, 2**31 - 1, -2**31, 2**31, -128, -129, -2**63, 2**64 - 1, 10**40]
print(json.dumps([pickle.dumps(i, protocol=2).hex() for i in ints]))
`) as string[];
    assert.deepEqual(ints.map((i) => pickle(i).toString('hex')), expected);
  });

  test('OrderedDict attributes (a state_dict\'s _metadata) are written with BUILD and read back', () => {
    const dict = orderedDict([['w', 1.5]]);
    dict.attributes = new PyDict([['_metadata', orderedDict([['', new PyDict([['version', 1n]])]])]]);
    const back = load(pickle(dict)) as PyDict;
    assert.deepStrictEqual(describeValue(back), describeValue(dict));
    assert.ok(back.ordered);
  });

  test('refuses values it cannot represent', () => {
    const code = (fn: () => unknown) => assert.throws(fn, FormatError);
    code(() => pickle(undefined as never));
    code(() => pickle({ a: 1 } as never));
    code(() => pickle('\ud800'));
    code(() => pickle(new PyDict([[1.5 as never, 1n]])));
    const cyclic: PyValue[] = [];
    cyclic.push(cyclic);
    assert.throws(() => pickle(cyclic), (err: FormatError) => err.code === 'PICKLE_VALUE_UNSUPPORTED' && /cyclic/.test(err.message));
    const inTuple: PyValue[] = [];
    inTuple.push(new PyTuple([inTuple]));
    assert.throws(() => pickle(inTuple), (err: FormatError) => err.code === 'PICKLE_VALUE_UNSUPPORTED');
    let deep: PyValue = 1n;
    for (let i = 0; i < 2000; i++) deep = [deep];
    assert.throws(() => pickle(deep), (err: FormatError) => err.code === 'PICKLE_TOO_DEEP');
    const shared = [1n];
    assert.equal((load(pickle([shared, shared, new PyTuple([shared])])) as PyValue[]).length, 3); // shared, not cyclic
    code(() => pickle({ dtype: 'float32', shape: [1], data: new Float32Array(1) }));
  });
});

describe('unpickler refuses hostile pickles before anything could run', () => {
  test('GLOBAL os.system, builtins.eval, posix.system, nt.system', () => {
    refused('\x80\x02cos\nsystem\nq\x00.', 'PICKLE_GLOBAL_REFUSED', /pickle global os\.system is not allowed/);
    refused('cbuiltins\neval\n.', 'PICKLE_GLOBAL_REFUSED', /builtins\.eval/);
    refused('c__builtin__\neval\n.', 'PICKLE_GLOBAL_REFUSED', /__builtin__\.eval/);
    refused('cposix\nsystem\n.', 'PICKLE_GLOBAL_REFUSED', /posix\.system/);
    refused('cnt\nsystem\n.', 'PICKLE_GLOBAL_REFUSED', /nt\.system/);
    refused('ctorch\nload\n.', 'PICKLE_GLOBAL_REFUSED', /torch\.load/);
    refused('ctorch._utils\n_rebuild_device_tensor_from_numpy\n.', 'PICKLE_GLOBAL_REFUSED');
  });

  test('STACK_GLOBAL with the same names', () => {
    const stackGlobal = (module: string, name: string) =>
      Buffer.concat([Buffer.from([0x80, 4, 0x8c, module.length]), Buffer.from(module), Buffer.from([0x8c, name.length]), Buffer.from(name), Buffer.from([0x93, 0x2e])]);
    assert.throws(() => load(stackGlobal('posix', 'system')), (err: FormatError) => err.code === 'PICKLE_GLOBAL_REFUSED' && /posix\.system/.test(err.message));
    assert.throws(() => load(stackGlobal('builtins', 'eval')), (err: FormatError) => err.code === 'PICKLE_GLOBAL_REFUSED');
    assert.throws(() => load(stackGlobal('os', 'system')), (err: FormatError) => /os\.system is not allowed/.test(err.message));
  });

  test('a REDUCE of a refused callable, as Python pickles a __reduce__ exploit', () => {
    const exploits = python(`
import json, os, pickle
class Exploit:
    def __reduce__(self):
        return (os.system, ('echo pwned',))
class Evil:
    def __reduce__(self):
        return (eval, ('1+1',))
print(json.dumps([pickle.dumps(x, protocol=p).hex() for x in (Exploit(), Evil()) for p in (0, 2, 4)]))
`) as string[];
    for (const hex of exploits) {
      assert.throws(() => load(Buffer.from(hex, 'hex')), (err: FormatError) => err.code === 'PICKLE_GLOBAL_REFUSED' && /(posix|os|builtins|__builtin__)\.(system|eval)/.test(err.message));
    }
    refused('cos\nsystem\n(S\'echo pwned\'\ntR.', 'PICKLE_GLOBAL_REFUSED');
  });

  test('REDUCE of something that is not an allowed callable', () => {
    refused('\x80\x02ctorch\nFloatStorage\n)R.', 'PICKLE_GLOBAL_REFUSED', /may not be called/);
    refused('\x80\x02])R.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02ccollections\nOrderedDict\n]R.', 'PICKLE_STACK_INVALID', /must be a tuple/);
    refused('\x80\x02ccollections\nOrderedDict\nK\x01\x85R.', 'PICKLE_CALL_INVALID');
    refused('\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf-8\x86R.', 'PICKLE_CALL_INVALID');
    refused('\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)))\x89NtR.', 'PICKLE_CALL_INVALID', /storage/);
  });

  test('opcodes outside the safe set', () => {
    refused('(i__main__\nX\n.', 'PICKLE_OPCODE_REFUSED', /INST/);
    refused('\x80\x02ccollections\nOrderedDict\n)\x81.', 'PICKLE_OPCODE_REFUSED', /NEWOBJ/);
    refused('\x80\x02\x82\x01.', 'PICKLE_OPCODE_REFUSED', /EXT1/);
    refused('Pfoo\n.', 'PICKLE_OPCODE_REFUSED', /PERSID/);
    refused('\x80\x04\x8f.', 'PICKLE_OPCODE_REFUSED', /EMPTY_SET/);
    refused('I1\n.', 'PICKLE_OPCODE_REFUSED', /INT/);
    refused('\xff.', 'PICKLE_OPCODE_REFUSED', /unknown opcode 0xff/);
    refused('\x80\x06N.', 'PICKLE_OPCODE_REFUSED', /protocol 6/);
    refused('\x80\x02)Q.', 'PICKLE_OPCODE_REFUSED', /persistent ids/);
  });

  test('deep nesting: 100k MARKs, 100k nested lists, 100k nested tuples', () => {
    const start = Date.now();
    refused('\x80\x02' + '('.repeat(100_000), 'PICKLE_TOO_DEEP');
    refused('\x80\x02' + ']'.repeat(100_000) + 'a'.repeat(99_999) + '.', 'PICKLE_TOO_DEEP');
    refused('\x80\x02)' + '\x85'.repeat(100_000) + '.', 'PICKLE_TOO_DEEP');
    refused('\x80\x02' + '}X\x01\x00\x00\x00k'.repeat(100_000) + '}' + 's'.repeat(100_000) + '.', 'PICKLE_TOO_DEEP');
    assert.ok(Date.now() - start < 2000);
    assert.equal((load('\x80\x02' + ']'.repeat(50) + 'a'.repeat(49) + '.') as unknown[]).length, 1);
  });

  test('cycles are refused, direct or through another container', () => {
    refused('\x80\x02]q\x00h\x00a.', 'PICKLE_VALUE_UNSUPPORTED', /cycle/);
    refused('\x80\x02]q\x00]q\x01h\x00ah\x01a.', 'PICKLE_VALUE_UNSUPPORTED', /cycle/); // a = [b], b = [a]
    refused('\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.', 'PICKLE_VALUE_UNSUPPORTED', /cycle/);
  });

  test('exponential expansion through the memo (billion laughs)', () => {
    let bomb = '\x80\x02]q\x00';
    for (let i = 0; i < 12; i++) bomb += '(' + 'h\x00'.repeat(10) + 'lq\x00';
    refused(bomb + '.', 'PICKLE_LIMIT_EXCEEDED');
  });

  test('bad memo, stack and mark use', () => {
    refused('\x80\x02h\x05.', 'PICKLE_MEMO_INVALID');
    refused('\x80\x02j\x00\x00\x00\x10.', 'PICKLE_MEMO_INVALID');
    refused('\x80\x02q\x00.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02a.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02t.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02NN.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02(N.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02.', 'PICKLE_STACK_INVALID');
    refused('\x80\x02K\x01]a.', 'PICKLE_STACK_INVALID'); // append to an int
    refused('\x80\x02]K\x01K\x02s.', 'PICKLE_STACK_INVALID'); // setitem on a list
    refused('\x80\x02}G?\xf0\x00\x00\x00\x00\x00\x00K\x01s.', 'PICKLE_VALUE_UNSUPPORTED', /keys of type float/);
    refused('\x80\x02]}b.', 'PICKLE_CALL_INVALID', /BUILD/);
    refused('\x80\x02ctorch\nFloatStorage\n.', 'PICKLE_VALUE_UNSUPPORTED', /torch\.FloatStorage/);
    refused('\x80\x02]ctorch\nFloatStorage\na.', 'PICKLE_VALUE_UNSUPPORTED');
    refused('\x80\x02ctorch\nFloatStorage\n\x85.', 'PICKLE_VALUE_UNSUPPORTED', /tuple holding/);
  });

  test('lengths bounded by the input; every strict prefix is truncated; bad UTF-8', () => {
    refused('\x80\x02X\xff\xff\xff\xff.', 'PICKLE_TRUNCATED');
    refused('\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.', 'PICKLE_TRUNCATED');
    refused('\x80\x02\x8b\xff\xff\xff\x7f', 'PICKLE_LIMIT_EXCEEDED');
    refused('\x80\x02\x8b\x00\x00\x00\x80', 'PICKLE_STACK_INVALID');
    refused('\x80\x02X\x02\x00\x00\x00\xc3\x28.', 'PICKLE_STRING_INVALID');
    refused('\x80\x02cos', 'PICKLE_TRUNCATED');
    const value = new PyDict([['a', [1n, 2.5, 'x', new PyTuple([null, true]), new Uint8Array([1, 2])]], ['b', orderedDict([['c', -70000n]])]]);
    const bytes = pickle(value);
    assert.deepStrictEqual(describeValue(load(bytes)), describeValue(value));
    for (let cut = 0; cut < bytes.length; cut++) refused(bytes.subarray(0, cut), 'PICKLE_TRUNCATED');
  });
});
