// Runs real PyTorch (Debian's python3-torch under /usr/bin/python3) as the reference for tests.
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const TORCH_PYTHON = process.env.TORCH_PYTHON ?? '/usr/bin/python3';

let available: boolean | null = null;
export function torchAvailable(): boolean {
  if (available === null) {
    const r = spawnSync(TORCH_PYTHON, ['-c', 'import torch'], { encoding: 'utf8' });
    available = r.status === 0;
  }
  return available;
}

/** CI must run the PyTorch comparisons: a missing torch there is a failure, not a skip. */
export function skipWithoutTorch(): string | false {
  if (torchAvailable()) return false;
  if (process.env.CI) throw new Error(`PyTorch is required in CI: ${TORCH_PYTHON} cannot import torch`);
  return `${TORCH_PYTHON} cannot import torch`;
}

export interface TorchResult {
  torch: string;
  params: Record<string, string[]>;
  averaged: Record<string, string[]>;
  state: Record<string, { step: string; eta: string; mu: string; ax: string[] }>;
  param_groups: Record<string, unknown>[];
}

export function runTorchReference(spec: unknown): TorchResult {
  const script = fileURLToPath(new URL('./torch_reference.py', import.meta.url));
  const r = spawnSync(TORCH_PYTHON, [script], { input: JSON.stringify(spec), encoding: 'utf8', maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(`torch reference failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as TorchResult;
}

export const hexOf = (values: ArrayLike<number>): string[] =>
  Array.from(new Uint32Array(Float32Array.from(values).buffer), (x) => x.toString(16).padStart(8, '0'));

/** Runs a Python snippet under PyTorch with `args` in sys.argv[1:]; returns its stdout. */
export function runPython(code: string, args: string[] = [], input?: string): string {
  const r = spawnSync(TORCH_PYTHON, ['-c', `import torch\ntorch.set_num_threads(1)\n${code}`, ...args], { input, encoding: 'utf8', maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new Error(`python failed: ${r.stderr}`);
  return r.stdout;
}
