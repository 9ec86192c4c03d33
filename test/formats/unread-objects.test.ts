// Globals outside the allow-list read as UnreadObjects (UnpickleOptions.unknownGlobals 'unread'), as a
// checkpoint's other keys are read: classes are named, never built or called, what they were given is
// counted and dropped; refused by default, and wherever a checkpoint's model, optimizer or step holds one.
// The pickles are what Python 3.11's pickle.dumps(…, protocol=2 or 4) wrote (numpy 1.24).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { findTorchGlobal, PyDict, refuseUnreadInCheckpoint, unpickle, UnreadObject, type PyValue } from '../../src/formats/index.ts';
import { refusal } from './torch-files.ts';

const PICKLES = {
  // {'args': argparse.Namespace(lr=0.01, name='run')}: NEWOBJ, then BUILD with its __dict__.
  namespace: '80027d710058040000006172677371016361726770617273650a4e616d6573706163650a7102298171037d71042858020000006c727105473f847ae147ae147b58040000006e616d657106580300000072756e71077562732e',
  // {'best': np.float64(0.5), 'arr': np.arange(3)}: REDUCE and BUILD of numpy's scalar and ndarray.
  numpy: '80027d7100285804000000626573747101636e756d70792e636f72652e6d756c746961727261790a7363616c61720a7102636e756d70790a64747970650a71035802000000663871048988877105527106284b0358010000003c71074e4e4e4affffffff4affffffff4b0074710862635f636f646563730a656e636f64650a71095809000000000000000000c3a03f710a58060000006c6174696e31710b86710c52710d86710e52710f58030000006172727110636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7111636e756d70790a6e6461727261790a71124b0085711368095801000000627114680b867115527116877117527118284b014b03857119680358020000006938711a898887711b52711c284b0368074e4e4e4affffffff4affffffff4b0074711d628968095818000000000000000000000001000000000000000200000000000000711e680b86711f52712074712162752e',
  // {'dd': collections.defaultdict(list, a=[1, 2])}: SETITEMS on the object.
  defaultdict: '80027d710058020000006464710163636f6c6c656374696f6e730a64656661756c74646963740a7102635f5f6275696c74696e5f5f0a6c6973740a710385710452710558010000006171065d7107284b014b026573732e',
  // {'s': {1, 2}}: builtins.set, outside the allow-list.
  set: '80027d71005801000000737101635f5f6275696c74696e5f5f0a7365740a71025d7103284b014b0265857104527105732e',
  // {'args': argparse.Namespace(lr=1)}, protocol 4: STACK_GLOBAL, NEWOBJ.
  protocol4: '80049532000000000000007d948c0461726773948c086172677061727365948c094e616d6573706163659493942981947d948c026c72944b017362732e',
};

const read = (hex: string, unknownGlobals?: 'refuse' | 'unread') => unpickle(Buffer.from(hex, 'hex'), { findGlobal: findTorchGlobal, unknownGlobals });

test('unread: objects of classes outside the allow-list read as their class name, nothing built', () => {
  const types = (value: PyValue) => Object.fromEntries([...(value as PyDict)].map(([k, v]) => [k, v instanceof UnreadObject ? v.type : v]));
  assert.deepEqual(types(read(PICKLES.namespace, 'unread')), { args: 'argparse.Namespace' });
  assert.deepEqual(types(read(PICKLES.protocol4, 'unread')), { args: 'argparse.Namespace' });
  assert.deepEqual(types(read(PICKLES.numpy, 'unread')), { best: 'numpy.core.multiarray.scalar', arr: 'numpy.core.multiarray._reconstruct' });
  assert.deepEqual(types(read(PICKLES.defaultdict, 'unread')), { dd: 'collections.defaultdict' });
  assert.deepEqual(types(read(PICKLES.set, 'unread')), { s: '__builtin__.set' });
});

test('by default the same globals are refused when named; a name longer than 200 characters is cut in the message', () => {
  for (const hex of Object.values(PICKLES)) assert.equal(refusal(() => read(hex)).code, 'PICKLE_GLOBAL_REFUSED');
  assert.match(refusal(() => read(PICKLES.namespace)).message, /^pickle global argparse\.Namespace is not allowed$/);
  const long = Buffer.from(`\x80\x02c${'m'.repeat(100_000)}\nX\n.`, 'latin1').toString('hex');
  for (const mode of ['refuse', 'unread'] as const) {
    const message = mode === 'refuse' ? refusal(() => read(long)).message : (read(long, 'unread') as UnreadObject).type;
    assert.ok(message.length < 300, `${mode}: ${message.length} characters`);
    assert.match(message, /m{200}… \(100002 characters\)/);
  }
});

test('unread: NEWOBJ of an allowed class is still refused, and an unread object\'s calls count against the call budgets', () => {
  const allowedNew = Buffer.from('\x80\x02ccollections\nOrderedDict\n)\x81.', 'latin1').toString('hex');
  assert.equal(refusal(() => read(allowedNew, 'unread')).code, 'PICKLE_OPCODE_REFUSED');
  // A 1 MB string memoized, then passed to an unread class 200 times: 200 MB of arguments.
  const big = 'x'.repeat(1_000_000);
  const head = Buffer.concat([Buffer.from('\x80\x02X', 'latin1'), Buffer.from([big.length & 0xff, (big.length >> 8) & 0xff, (big.length >> 16) & 0xff, 0]), Buffer.from(big), Buffer.from('q\x00ccustom\nThing\nq\x01]q\x02(', 'latin1')]);
  const call = Buffer.from('h\x01h\x00\x85R', 'latin1');
  const pickle = Buffer.concat([head, ...Array.from({ length: 200 }, () => call), Buffer.from('e.', 'latin1')]);
  const err = refusal(() => unpickle(pickle, { findGlobal: findTorchGlobal, unknownGlobals: 'unread', maxTextBytes: 64 * 2 ** 20 }));
  assert.equal(err.code, 'PICKLE_LIMIT_EXCEEDED');
  assert.match(err.message, /pickle calls take more than/);
});

test('a checkpoint\'s model, optimizer or step holding an unread object is refused naming where; its other keys may hold any', () => {
  const unread = new UnreadObject('numpy.core.multiarray.scalar');
  const checkpoint = (parts: Record<string, PyValue>) => new PyDict(Object.entries(parts));
  const optimizer = (extra: PyValue) => new PyDict([['state', new PyDict()], ['param_groups', [new PyDict([['lr', 0.01], ['extra', extra]])]]]);
  assert.doesNotThrow(() => refuseUnreadInCheckpoint(checkpoint({ model: new PyDict(), optimizer: optimizer(1), args: new UnreadObject('argparse.Namespace'), best: [unread] })));
  const cases: [PyValue, RegExp][] = [
    [checkpoint({ model: new PyDict(), optimizer: optimizer(unread) }), /^checkpoint\.optimizer\.param_groups\[0\]\.extra: pickle global numpy\.core\.multiarray\.scalar is not allowed here/],
    [checkpoint({ model_state_dict: new UnreadObject('torch.nn.modules.linear.Linear'), optimizer_state_dict: optimizer(1) }), /^checkpoint\.model_state_dict: .*a whole torch\.nn\.Module: save model\.state_dict\(\) instead/],
    [checkpoint({ model: new PyDict(), optimizer: optimizer(1), step: unread }), /^checkpoint\.step: /],
    [unread, /^checkpoint: pickle global numpy/],
  ];
  for (const [value, message] of cases) {
    const err = refusal(() => refuseUnreadInCheckpoint(value));
    assert.equal(err.code, 'PICKLE_GLOBAL_REFUSED');
    assert.match(err.message, message);
  }
});
