// Throughput of the ASGD kernels (elements per second of one step), as ratios against PyTorch's
// ASGD.step() measured in the same run (one thread) and against a plain memory copy of the same size.
//   npx tsx bench/kernel.ts [--sizes 1e5,1e6,1e7] [--python /usr/bin/python3]
// Medians of several samples; each sample times enough steps to last ~25 ms.

import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { initialState, jsKernel } from '../src/optim/asgd.ts';
import { wasmKernel } from '../src/optim/wasm/index.ts';
import { ASGD_DEFAULTS, type AsgdHyperparameters, type AsgdKernel } from '../src/optim/types.ts';

export interface BenchConfig {
  name: string;
  hyper: AsgdHyperparameters;
}

export const BENCH_CONFIGS: BenchConfig[] = [
  { name: 'defaults', hyper: { ...ASGD_DEFAULTS } },
  // t0=1: mu != 1 from the third step on (averaging); weight decay on
  { name: 'wd+averaging', hyper: { ...ASGD_DEFAULTS, weightDecay: 1e-4, t0: 1 } },
];

/** Steps before timing: enough for mu != 1 under t0=1, as in PyTorch's run. */
const WARMUP_STEPS = 4;

export interface KernelBenchRow {
  elements: number;
  config: string;
  /** elements per second */
  wasm: number;
  js: number;
  torch: number | null;
  memcpy: number;
}

export interface KernelBenchOptions {
  sizes?: number[];
  python?: string;
  samples?: number;
  log?: (line: string) => void;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Median seconds per call of fn over `samples` samples of a calibrated number of calls. */
function timePerCall(fn: () => void, samples: number): number {
  const t0 = performance.now();
  fn();
  const once = Math.max((performance.now() - t0) / 1000, 1e-7);
  const calls = Math.max(1, Math.min(10_000, Math.round(0.025 / once)));
  const perCall: number[] = [];
  for (let s = 0; s < samples; s++) {
    const start = performance.now();
    for (let c = 0; c < calls; c++) fn();
    perCall.push((performance.now() - start) / 1000 / calls);
  }
  return median(perCall);
}

function fillRandom(array: Float32Array, seed: number, scale: number): void {
  let x = seed >>> 0 || 1;
  for (let i = 0; i < array.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    array[i] = ((x >>> 0) / 2 ** 32 - 0.5) * scale;
  }
}

function kernelRate(kernel: AsgdKernel, n: number, config: BenchConfig, samples: number): number {
  const arena = kernel.createArena(n);
  fillRandom(arena.params, 1, 1);
  fillRandom(arena.grads, 2, 0.1);
  const state = initialState(config.hyper.lr);
  const step = () => kernel.step(arena.params, arena.grads, arena.ax, state, config.hyper);
  for (let i = 0; i < WARMUP_STEPS; i++) step();
  const seconds = timePerCall(step, samples);
  arena.release();
  return n / seconds;
}

function memcpyRate(n: number, samples: number): number {
  const source = new Float32Array(n);
  const target = new Float32Array(n);
  fillRandom(source, 3, 1);
  return n / timePerCall(() => target.set(source), samples);
}

const TORCH_SCRIPT = String.raw`
import json, sys, time, statistics
import torch
torch.set_num_threads(1)
sizes, configs, samples, warmup = json.loads(sys.argv[1])
out = {}
for n in sizes:
    for c in configs:
        p = torch.nn.Parameter(torch.rand(n) - 0.5)
        p.grad = (torch.rand(n) - 0.5) * 0.1
        h = c['hyper']
        opt = torch.optim.ASGD([p], lr=h['lr'], lambd=h['lambd'], alpha=h['alpha'], t0=h['t0'],
                               weight_decay=h['weightDecay'], maximize=h['maximize'])
        for _ in range(warmup):
            opt.step()
        t = time.perf_counter(); opt.step(); once = max(time.perf_counter() - t, 1e-7)
        calls = max(1, min(10000, round(0.025 / once)))
        per = []
        for _ in range(samples):
            t = time.perf_counter()
            for _ in range(calls):
                opt.step()
            per.append((time.perf_counter() - t) / calls)
        out[f"{n}:{c['name']}"] = n / statistics.median(per)
print(json.dumps({'torch': torch.__version__, 'rates': out}))
`;

/** PyTorch's ASGD.step() rates (elements/s) by "n:config", or null (with the reason) without torch. */
export function torchRates(python: string, sizes: number[], samples: number): { version: string; rates: Record<string, number> } | { error: string } {
  const result = spawnSync(python, ['-c', TORCH_SCRIPT, JSON.stringify([sizes, BENCH_CONFIGS, samples, WARMUP_STEPS])], {
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  if (result.status !== 0) return { error: (result.stderr || String(result.error)).trim().split('\n').pop() ?? 'failed' };
  const parsed = JSON.parse(result.stdout.trim().split('\n').pop()!);
  return { version: parsed.torch, rates: parsed.rates };
}

const fmt = (rate: number) => `${(rate / 1e6).toFixed(0)}M`.padStart(7);
const ratio = (a: number, b: number | null) => (b ? `${(a / b).toFixed(2)}x` : 'n/a').padStart(7);

/** Runs the benchmark, prints a table, and returns the rows. */
export async function runKernelBench(options: KernelBenchOptions = {}): Promise<KernelBenchRow[]> {
  const sizes = options.sizes ?? [1e5, 1e6, 1e7];
  const samples = options.samples ?? 7;
  const log = options.log ?? ((line: string) => console.log(line));
  const python = options.python ?? process.env.TORCH_PYTHON ?? '/usr/bin/python3';

  const torch = torchRates(python, sizes, samples);
  log('error' in torch ? `PyTorch not measured (${python}): ${torch.error}` : `PyTorch ${torch.version} via ${python}, 1 thread`);
  log('elements  config          wasm/s     js/s  torch/s memcpy/s | wasm/torch js/torch wasm/memcpy');
  const rows: KernelBenchRow[] = [];
  for (const n of sizes) {
    const memcpy = memcpyRate(n, samples);
    for (const config of BENCH_CONFIGS) {
      const wasm = kernelRate(wasmKernel, n, config, samples);
      const js = kernelRate(jsKernel, n, config, Math.min(samples, n >= 1e7 ? 3 : samples));
      const torchRate = 'error' in torch ? null : torch.rates[`${n}:${config.name}`] ?? null;
      rows.push({ elements: n, config: config.name, wasm, js, torch: torchRate, memcpy });
      log(
        `${n.toExponential(0).padEnd(9)} ${config.name.padEnd(13)} ${fmt(wasm)}  ${fmt(js)}  ${torchRate ? fmt(torchRate) : '    n/a'}  ${fmt(memcpy)} |` +
          `    ${ratio(wasm, torchRate)}  ${ratio(js, torchRate)}     ${ratio(wasm, memcpy)}`,
      );
    }
  }
  return rows;
}

function parseArgs(argv: string[]): KernelBenchOptions {
  const options: KernelBenchOptions = {};
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--sizes') options.sizes = argv[++i].split(',').map(Number);
    else if (argv[i] === '--python') options.python = argv[++i];
    else if (argv[i] === '--samples') options.samples = Number(argv[++i]);
  }
  return options;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  await runKernelBench(parseArgs(process.argv.slice(2)));
}
