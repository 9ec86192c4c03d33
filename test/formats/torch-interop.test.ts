// Interop with real PyTorch: files torch.save wrote are read exactly; files we write load with
// torch.load (1.13: weights_only=False; 2.x: weights_only=True), ASGD.load_state_dict accepts them
// and state_dict() gives back exactly what was written. PyTorch 1.13 is /usr/bin/python3; a 2.x
// interpreter is used when TORCH2_PYTHON names one. Both run concurrently to keep the suite fast.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  FormatError, fromAsgdStateDict, fromCheckpoint, fromModelStateDict, readTorchSave, toAsgdStateDict, toCheckpoint,
  toModelStateDict, torchSaveToBuffer, type AsgdStateDict, type PyValue,
} from '../../src/formats/index.ts';
import { describeValue, type Description } from './describe.ts';

const SCRIPT = join(import.meta.dirname, '../fixtures/formats/torch_interop.py');

/** Whether `python` can import torch, without paying for the import. */
function hasTorch(python: string | undefined): python is string {
  if (!python) return false;
  const probe = 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)';
  return spawnSync(python, ['-c', probe], { stdio: 'ignore', timeout: 30_000 }).status === 0;
}

const TORCH2 = process.env.TORCH2_PYTHON;
const versions = [
  { label: '1.13', python: '/usr/bin/python3', available: hasTorch('/usr/bin/python3') },
  { label: '2.x', python: TORCH2 ?? '', available: hasTorch(TORCH2) },
];

interface Outcome {
  dir: string;
  manifest: { torch: string; files: Record<string, Description> };
  read: Map<string, PyValue>;
  /** Descriptions of the files the JS side wrote, by name. */
  written: Record<string, Description>;
  check: Record<string, unknown> & { files: Record<string, unknown>; asgd: Record<string, unknown> };
}
const outcomes = new Map<string, Outcome>();

/** A state_dict built from scratch, as the service would build one for a new session. */
export function scratchStateDict(): AsgdStateDict {
  return {
    state: new Map([
      [0, { step: 5, eta: Math.fround(0.00999), mu: 0.5, ax: { dtype: 'float32' as const, shape: [2, 2], data: Float32Array.of(1, -2, 0.5, 3) } }],
      [1, { step: 5, eta: Math.fround(0.00999), mu: 0.5, ax: { dtype: 'float32' as const, shape: [3], data: Float32Array.of(0.25, 0, -1) } }],
    ]),
    paramGroups: [{ lr: 0.01, lambd: 1e-4, alpha: 0.75, t0: 1e6, weightDecay: 0, foreach: null, maximize: false, differentiable: false, capturable: false, params: [0, 1] }],
  };
}

/** Starts `torch_interop.py serve`: resolves once the fixtures are made, then `finish()` runs the checks. */
function serve(python: string, dir: string): Promise<{ finish: () => Promise<string> }> {
  return new Promise((resolve, reject) => {
    const child = spawn(python, [SCRIPT, 'serve', dir], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, OMP_NUM_THREADS: '1' } });
    let stdout = '';
    let stderr = '';
    let ready = false;
    const exited = new Promise<string>((done, fail) => {
      child.on('close', (code) => (code === 0 ? done(stdout) : fail(new Error(`${python} exited ${code}: ${stderr.slice(-2000)}`))));
    });
    exited.catch(reject);
    child.stderr.on('data', (chunk) => (stderr += chunk));
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      if (!ready && stdout.includes('ready\n')) {
        ready = true;
        stdout = stdout.slice(stdout.indexOf('ready\n') + 6);
        resolve({ finish: () => (child.stdin.end('go\n'), exited) });
      }
    });
  });
}

/** make -> read and rewrite on the JS side -> check, for one PyTorch version. */
async function exercise(python: string): Promise<Outcome> {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-formats-'));
  const server = await serve(python, dir);
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as Outcome['manifest'];
  const read = new Map<string, PyValue>();
  for (const name of Object.keys(manifest.files)) read.set(name, readTorchSave(readFileSync(join(dir, name))));

  const js: { files: Record<string, Description>; asgd: string[] } = { files: {}, asgd: [] };
  const write = (name: string, value: PyValue, expected: Description, options = {}) => {
    writeFileSync(join(dir, name), torchSaveToBuffer(value, options));
    js.files[name] = expected;
  };
  for (const [name, value] of read) write(`rt-${name}`, value, manifest.files[name]);
  write('asgd-domain.pt', fromAsgdStateDict(toAsgdStateDict(read.get('asgd.pt')!)), manifest.files['asgd.pt']);
  write('asgd-zip64.pt', fromAsgdStateDict(toAsgdStateDict(read.get('asgd.pt')!)), manifest.files['asgd.pt'], { forceZip64: true });
  js.asgd.push('rt-asgd.pt', 'asgd-domain.pt', 'asgd-zip64.pt');
  write('checkpoint-domain.pt', fromCheckpoint(toCheckpoint(read.get('checkpoint.pt')!)), manifest.files['checkpoint.pt']);
  write('js-model.pt', fromModelStateDict(toModelStateDict(read.get('model.pt')!)), manifest.files['model.pt']);
  const scratch = fromAsgdStateDict(scratchStateDict());
  write('js-asgd.pt', scratch, describeValue(scratch));
  writeFileSync(join(dir, 'js-manifest.json'), JSON.stringify(js));

  const stdout = await server.finish();
  return { dir, manifest, read, written: js.files, check: JSON.parse(stdout) };
}

before(async () => {
  const available = versions.filter((v) => v.available);
  const results = await Promise.all(available.map((v) => exercise(v.python)));
  available.forEach((v, i) => outcomes.set(v.label, results[i]));
});

after(() => {
  for (const outcome of outcomes.values()) rmSync(outcome.dir, { recursive: true, force: true });
});

for (const { label, available } of versions) {
  const skip = available ? false : label === '2.x' ? 'set TORCH2_PYTHON to a python with torch 2.x' : '/usr/bin/python3 has no torch';
  describe(`PyTorch ${label}`, { skip }, () => {
    const outcome = () => outcomes.get(label)!;

    test('every value torch.save wrote reads back exactly (dtypes, strides, shared storages, ints, floats, bytes)', () => {
      const { manifest, read } = outcome();
      for (const [name, expected] of Object.entries(manifest.files)) {
        assert.deepStrictEqual(describeValue(read.get(name)!), expected, name);
      }
    });

    test('tensors sharing a storage in the file share memory; strided views are materialised', () => {
      const tensors = outcome().read.get('tensors.pt') as Map<string, { data: Float32Array; shape: number[] }>;
      const a = tensors.get('shared_a')!;
      const b = tensors.get('shared_b')!;
      assert.equal(a.data.buffer, b.data.buffer);
      assert.deepEqual([...b.data], [12, 13, 14, 15, 16, 17]);
      assert.deepEqual(tensors.get('transposed')!.shape, [6, 4]);
      assert.deepEqual([...tensors.get('transposed')!.data.slice(0, 5)], [0, 6, 12, 18, 1]);
    });

    test('ASGD state_dict converts to the typed form with Python int/float kinds kept', () => {
      const sd = toAsgdStateDict(outcome().read.get('asgd.pt')!);
      assert.deepEqual([...sd.state.keys()], [0, 1]);
      const s0 = sd.state.get(0)!;
      assert.equal(s0.step, 6);
      assert.equal(s0.mu, 0.25); // 1 / max(1, 6 - t0) with t0 = 2
      assert.equal(s0.eta, Math.fround(s0.eta));
      assert.deepEqual(s0.ax.shape, [3, 2]);
      assert.deepEqual(sd.paramGroups.map((g) => [g.lr, g.lambd, g.alpha, g.t0, g.weightDecay, g.params]), [
        [0.05, 1e-3, 0.75, 2, 0.01, [0]],
        [0.02, 1e-3, 0.75, 2, 0.01, [1]],
      ]);
      assert.deepEqual(sd.paramGroups[0].intKeys, ['t0']);
      const defaults = toAsgdStateDict(outcome().read.get('asgd-defaults.pt')!);
      assert.deepEqual(defaults.paramGroups[0].intKeys, ['weight_decay']);
      assert.equal(defaults.paramGroups[0].t0, 1e6);
      assert.equal(defaults.paramGroups[0].differentiable, label === '2.x' ? false : undefined);
    });

    test('float64 optimizer state is refused by default and converted to float32 on request', () => {
      const value = outcome().read.get('asgd-float64.pt')!;
      assert.throws(() => toAsgdStateDict(value), (err: FormatError) => err.code === 'TENSOR_DTYPE_UNSUPPORTED' && /state\[0\]\.step has dtype float64/.test(err.message));
      const sd = toAsgdStateDict(value, { toFloat32: true });
      const raw = ((value as Map<string, PyValue>).get('state') as Map<bigint, Map<string, { data: Float64Array }>>).get(0n)!;
      assert.equal(sd.state.get(0)!.eta, Math.fround(raw.get('eta')!.data[0]));
      assert.deepEqual([...sd.state.get(0)!.ax.data], [...raw.get('ax')!.data].map(Math.fround));
    });

    test('model state_dict keeps int64 buffers and _metadata; checkpoints convert', () => {
      const model = toModelStateDict(outcome().read.get('model.pt')!);
      assert.deepEqual([...model.tensors.keys()], ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']);
      const tracked = model.tensors.get('1.num_batches_tracked')!;
      assert.equal(tracked.dtype, 'int64');
      assert.deepEqual([...tracked.data], [1n]);
      assert.ok(model.metadata?.has('1'));
      const checkpoint = toCheckpoint(outcome().read.get('checkpoint.pt')!);
      assert.equal(checkpoint.step, 6);
      assert.equal(checkpoint.model.tensors.size, 7);
      assert.equal(checkpoint.optimizer.state.size, 2);
    });

    test('files we write load in torch and equal what torch wrote', () => {
      const { check } = outcome();
      for (const [name, result] of Object.entries(check.files)) assert.equal(result, 'ok', `${name}: ${JSON.stringify(result)}`);
      assert.deepEqual(Object.keys(check.files).sort(), Object.keys(outcome().written).sort());
    });

    test('ASGD.load_state_dict accepts our state_dicts; state_dict() and further steps are bit-identical', () => {
      const { check } = outcome();
      for (const [name, result] of Object.entries(check.asgd)) assert.equal(result, 'ok', `${name}: ${JSON.stringify(result)}`);
      assert.equal(check.js_asgd, 'ok', JSON.stringify(check.js_asgd));
      assert.equal(check.js_asgd_steps, 'ok');
      if (label === '1.13') assert.equal(check.weights_only_113_model, 'ok');
    });
  });
}
