// Throughput of the ASGD kernels (elements per second of one step), as ratios against PyTorch's
// ASGD.step() measured in the same run (one thread), and as a fraction of the memory-traffic limit:
// the bytes the step must touch (read param and grad, write param and ax; with averaging also read ax:
// 16 or 20 bytes an element) moved at the bandwidth of a memcpy of the same bytes (copying half of
// them: a copy reads and writes each byte once), timed in the same rounds. 1.00 = as fast as memory.
//   node bench/kernel.ts [--sizes 1e4,1e5,1e6,1e7] [--python /usr/bin/python3] [--samples 9]
// Rounds of interleaved samples (the selected kernel, the exact emulation, js, PyTorch, memcpy); each
// sample times enough steps to last ~25 ms; the figures are medians over the rounds.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { initialState, jsKernel } from '../src/optim/asgd.ts';
import { selectKernel } from '../src/optim/index.ts';
import { wasmKernel } from '../src/optim/wasm/index.ts';
import { ASGD_DEFAULTS, type AsgdHyperparameters, type AsgdKernel } from '../src/optim/types.ts';

export interface BenchConfig {
  name: string;
  hyper: AsgdHyperparameters;
  /** Bytes of memory one element's step must read and write. */
  bytesPerElement: number;
}

export const BENCH_CONFIGS: BenchConfig[] = [
  // read param, grad; write param, ax (= param)
  { name: 'defaults', hyper: { ...ASGD_DEFAULTS }, bytesPerElement: 16 },
  // t0=1: mu != 1 from the third step on (averaging); weight decay on. Also reads ax.
  { name: 'wd+averaging', hyper: { ...ASGD_DEFAULTS, weightDecay: 1e-4, t0: 1 }, bytesPerElement: 20 },
];

/** Steps before timing: enough for mu != 1 under t0=1, as in PyTorch's run. */
const WARMUP_STEPS = 4;

export interface KernelBenchRow {
  elements: number;
  config: string;
  /** the kernel the service selects on this machine (ASGD_KERNEL=auto) */
  kernel: string;
  /** elements per second: the selected kernel, the exact-emulation wasm kernel, js, PyTorch */
  selected: number;
  wasm: number;
  js: number;
  torch: number | null;
  /** elements per second at the memory-traffic limit (a memcpy of the bytes the step touches) */
  limit: number;
}

export interface KernelBenchOptions {
  sizes?: number[];
  python?: string;
  /** rounds of samples (default 9) */
  samples?: number;
  log?: (line: string) => void;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Something to time: `calls` runs of one step (calibrated once to last ~25 ms). */
interface Subject {
  run(): void;
  calls: number;
}

function calibrate(run: () => void): Subject {
  const start = performance.now();
  run();
  const once = Math.max((performance.now() - start) / 1000, 1e-7);
  return { run, calls: Math.max(1, Math.min(10_000, Math.round(0.025 / once))) };
}

/** Seconds per step of one sample. */
function sample(subject: Subject): number {
  const start = performance.now();
  for (let c = 0; c < subject.calls; c++) subject.run();
  return (performance.now() - start) / 1000 / subject.calls;
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

function kernelSubject(kernel: AsgdKernel, n: number, config: BenchConfig): Subject {
  const arena = kernel.createArena(n);
  fillRandom(arena.params, 1, 1);
  fillRandom(arena.grads, 2, 0.1);
  const state = initialState(config.hyper.lr);
  const step = () => kernel.step(arena.params, arena.grads, arena.ax, state, config.hyper);
  for (let i = 0; i < WARMUP_STEPS; i++) step();
  return calibrate(step);
}

/** A copy of half of `bytes` (so that `bytes` are read or written): the bandwidth the step could have. */
function memcpySubject(bytes: number): Subject {
  const n = Math.ceil(bytes / 8);
  const source = new Float32Array(n);
  const target = new Float32Array(n);
  fillRandom(source, 3, 1);
  return calibrate(() => target.set(source));
}

// A PyTorch process that keeps one ASGD optimizer per (size, config) and times samples on request,
// so that its samples interleave with ours and a busy machine slows both alike.
const TORCH_SERVER = String.raw`
import json, sys, time
import torch
torch.set_num_threads(1)
subjects = {}
print(json.dumps({'torch': torch.__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    n, c = req['n'], req['config']
    key = (n, c['name'])
    if key not in subjects:
        p = torch.nn.Parameter(torch.rand(n) - 0.5)
        p.grad = (torch.rand(n) - 0.5) * 0.1
        h = c['hyper']
        opt = torch.optim.ASGD([p], lr=h['lr'], lambd=h['lambd'], alpha=h['alpha'], t0=h['t0'],
                               weight_decay=h['weightDecay'], maximize=h['maximize'])
        for _ in range(req['warmup']):
            opt.step()
        t = time.perf_counter(); opt.step(); once = max(time.perf_counter() - t, 1e-7)
        subjects[key] = (opt, max(1, min(10000, round(0.025 / once))))
    opt, calls = subjects[key]
    t = time.perf_counter()
    for _ in range(calls):
        opt.step()
    print(json.dumps({'seconds': (time.perf_counter() - t) / calls}), flush=True)
`;

interface TorchProcess {
  version: string;
  secondsPerStep(n: number, config: BenchConfig): Promise<number>;
  close(): void;
}

async function startTorch(python: string): Promise<TorchProcess | { error: string }> {
  const child = spawn(python, ['-c', TORCH_SERVER], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => (stderr += chunk));
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const exited = new Promise<{ done: true; value: undefined }>((resolve) => {
    child.on('error', (error) => {
      stderr += String(error);
      resolve({ done: true, value: undefined });
    });
    child.on('exit', () => resolve({ done: true, value: undefined }));
  });
  const next = async () => {
    const line = await Promise.race([lines.next(), exited]);
    if (line.done) throw new Error(stderr.trim().split('\n').pop() || 'PyTorch process ended');
    return JSON.parse(line.value as string);
  };
  try {
    const hello = await next();
    return {
      version: hello.torch,
      async secondsPerStep(n, config) {
        child.stdin.write(JSON.stringify({ n, config, warmup: WARMUP_STEPS }) + '\n');
        return (await next()).seconds;
      },
      close: () => child.stdin.end(),
    };
  } catch (error) {
    child.kill();
    return { error: (error as Error).message };
  }
}

const fmt = (rate: number) => `${(rate / 1e6).toFixed(0)}M`.padStart(7);
const ratio = (a: number, b: number | null) => (b ? `${(a / b).toFixed(2)}x` : 'n/a').padStart(7);
const fraction = (a: number | null, limit: number) => (a ? (a / limit).toFixed(2) : 'n/a').padStart(5);

/**
 * Runs the benchmark and prints a table: millions of elements per second per step, and ratios.
 * Samples of wasm, js, PyTorch and memcpy are taken in rounds, interleaved; each figure is the
 * median over the rounds.
 */
export async function runKernelBench(options: KernelBenchOptions = {}): Promise<KernelBenchRow[]> {
  const sizes = options.sizes ?? [1e4, 1e5, 1e6, 1e7];
  const rounds = options.samples ?? 9;
  const log = options.log ?? ((line: string) => console.log(line));
  const python = options.python ?? process.env.TORCH_PYTHON ?? '/usr/bin/python3';
  const { kernel, reason } = selectKernel('auto');

  const torch = await startTorch(python);
  log(`selected kernel: ${kernel.name} (${reason})`);
  log('error' in torch ? `PyTorch not measured (${python}): ${torch.error}` : `PyTorch ${torch.version} via ${python}, 1 thread; ${rounds} interleaved rounds, medians`);
  log('limit: elements/s if the step moved its bytes at memcpy bandwidth; fractions of it in the last columns');
  log(`elements  config        ${kernel.name.padStart(8)}     wasm     js/s  torch/s  limit/s | sel/torch | fraction of limit: ${kernel.name} wasm torch`);
  const rows: KernelBenchRow[] = [];
  try {
    for (const n of sizes) {
      for (const config of BENCH_CONFIGS) {
        const memcpy = memcpySubject(n * config.bytesPerElement);
        const selected = kernelSubject(kernel, n, config);
        const wasm = kernel === wasmKernel ? selected : kernelSubject(wasmKernel, n, config);
        const js = kernelSubject(jsKernel, n, config);
        const times = { selected: [] as number[], wasm: [] as number[], js: [] as number[], torch: [] as number[], memcpy: [] as number[] };
        for (let r = 0; r < rounds; r++) {
          if (!('error' in torch)) times.torch.push(await torch.secondsPerStep(n, config));
          times.selected.push(sample(selected));
          times.memcpy.push(sample(memcpy));
          if (wasm !== selected) times.wasm.push(sample(wasm));
          if (r < (n >= 1e7 ? 3 : rounds)) times.js.push(sample(js));
        }
        const row: KernelBenchRow = {
          elements: n,
          config: config.name,
          kernel: kernel.name,
          selected: n / median(times.selected),
          wasm: n / median(wasm === selected ? times.selected : times.wasm),
          js: n / median(times.js),
          torch: times.torch.length ? n / median(times.torch) : null,
          limit: n / median(times.memcpy),
        };
        rows.push(row);
        log(
          `${n.toExponential(0).padEnd(9)} ${config.name.padEnd(12)} ${fmt(row.selected)}  ${fmt(row.wasm)}  ${fmt(row.js)}  ${row.torch ? fmt(row.torch) : '    n/a'}  ${fmt(row.limit)} |` +
            `   ${ratio(row.selected, row.torch)} |                    ${fraction(row.selected, row.limit)} ${fraction(row.wasm, row.limit)} ${fraction(row.torch, row.limit)}`,
        );
      }
    }
  } finally {
    if (!('error' in torch)) torch.close();
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
