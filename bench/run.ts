// Runs the benchmarks and writes bench/RESULTS.md (and bench/results.json, the figures it is made from).
//   npm run bench                      every benchmark
//   npm run bench -- durable-step pglite   some of them (the others keep their last figures)
// Names: kernel, durable-step, throughput, pglite, catchup, memory, training, dashboard, rounds, stall. Each also runs alone:
// `node bench/<name>.ts` (prints, writes nothing).
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { runCatchupBench } from './catchup.ts';
import { runDashboardBench } from './dashboard.ts';
import { describe, holds, machine, postgresVersion, ROOT, type BenchResult } from './common.ts';
import { runDurableStepBench } from './durable-step.ts';
import { runKernelBench, type KernelBenchRow } from './kernel.ts';
import { runMemoryBench } from './memory.ts';
import { runPgliteBench } from './pglite.ts';
import { runRoundsBench } from './rounds.ts';
import { runStallBench } from './stall.ts';
import { runThroughputBench } from './throughput.ts';
import { runTrainingBench } from './training.ts';

const PYTHON = process.env.TORCH_PYTHON ?? '/usr/bin/python3';

interface Stored {
  result: BenchResult;
  measuredAt: string;
  /** 1-minute load average before and after: others' work on the machine shows here. */
  load: [number, number];
  kernelRows?: KernelBenchRow[];
}

/** The slowest ratio to PyTorch among the rows of one configuration, as a result with that configuration's target. */
function kernelConfigResult(rows: KernelBenchRow[], config: string, key: string, target: number): BenchResult {
  const withTorch = rows.filter((r) => r.torch && r.config === config);
  const worst = withTorch.reduce((a, b) => (a.selected / a.torch! < b.selected / b.torch! ? a : b), withTorch[0]);
  const kernel = rows[0]?.kernel ?? 'n/a';
  return {
    key,
    title: `${key}: ASGD step (${config}), the ${kernel} kernel, slowest size of ${rows.filter((r) => r.config === config).map((r) => r.elements.toExponential(0)).join(', ')}`,
    figure: worst ? `${(worst.selected / 1e6).toFixed(0)}M elements/s at ${worst.elements.toExponential(0)} (${(worst.selected / worst.limit).toFixed(2)} of the memory-traffic limit)` : 'n/a',
    baseline: worst ? `${(worst.torch! / 1e6).toFixed(0)}M elements/s for PyTorch ASGD.step(), 1 thread (${(worst.torch! / worst.limit).toFixed(2)} of the limit)` : 'PyTorch not available',
    ratio: worst ? worst.selected / worst.torch! : NaN,
    target: { op: '>=', value: target },
    notes: ['see the kernel table; medians of 7 interleaved rounds; the limit is the step\'s bytes at the bandwidth of a memcpy of those bytes, timed in the same rounds'],
  };
}

async function kernelResults(): Promise<{ results: BenchResult[]; rows: KernelBenchRow[] }> {
  const rows = await runKernelBench({ python: PYTHON, samples: 7 });
  return { rows, results: [kernelConfigResult(rows, 'defaults', 'kernel', 1.15), kernelConfigResult(rows, 'wd+averaging', 'kernel-wd', 2.5)] };
}

const one = (run: () => Promise<BenchResult>) => async () => ({ results: [await run()] });

/** Each benchmark by name; one run may give several results (the kernel: defaults, and weight decay + averaging). */
const BENCHES: Record<string, () => Promise<{ results: BenchResult[]; rows?: KernelBenchRow[] }>> = {
  kernel: kernelResults,
  'durable-step': one(runDurableStepBench),
  throughput: one(runThroughputBench),
  pglite: one(runPgliteBench),
  catchup: one(runCatchupBench),
  memory: async () => ({ results: await runMemoryBench() }),
  training: one(() => runTrainingBench({ python: PYTHON })),
  dashboard: one(runDashboardBench),
  rounds: one(runRoundsBench),
  stall: one(runStallBench),
};
/** Result keys in the order the summary lists them. */
const RESULT_ORDER = ['kernel', 'kernel-wd', 'durable-step', 'throughput', 'pglite', 'catchup', 'memory', 'big-step', 'training', 'dashboard', 'rounds', 'stall'];

function torchVersion(): string {
  try {
    return execFileSync(PYTHON, ['-c', 'import torch; print(torch.__version__)'], { encoding: 'utf8' }).trim();
  } catch {
    return 'not available';
  }
}

function kernelTable(rows: KernelBenchRow[]): string[] {
  const m = (x: number | null) => (x === null ? 'n/a' : `${(x / 1e6).toFixed(0)}M`);
  const r = (a: number, b: number | null) => (b ? `${(a / b).toFixed(2)}x` : 'n/a');
  const f = (a: number | null, limit: number) => (a === null ? 'n/a' : (a / limit).toFixed(2));
  const kernel = rows[0]?.kernel ?? 'selected';
  return [
    `The selected kernel is \`${kernel}\` (ASGD_KERNEL=auto on this machine); \`wasm\` is the exact FMA emulation. "limit": elements/s at the`,
    'memory-traffic limit (16 bytes an element with defaults, 20 with averaging, at the bandwidth of a memcpy of those bytes).',
    '',
    `| elements | config | ${kernel}/s | wasm/s | js/s | PyTorch/s | limit/s | ${kernel}/PyTorch | wasm/PyTorch | ${kernel} of limit | wasm of limit | PyTorch of limit |`,
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map((x) => `| ${x.elements.toExponential(0)} | ${x.config} | ${m(x.selected)} | ${m(x.wasm)} | ${m(x.js)} | ${m(x.torch)} | ${m(x.limit)} | ${r(x.selected, x.torch)} | ${r(x.wasm, x.torch)} | ${f(x.selected, x.limit)} | ${f(x.wasm, x.limit)} | ${f(x.torch, x.limit)} |`),
  ];
}

function render(stored: Record<string, Stored>, env: Record<string, string>): string {
  const order = [...RESULT_ORDER, ...Object.keys(stored).filter((k) => !RESULT_ORDER.includes(k))].filter((k) => stored[k]);
  const lines = [
    '# Benchmark results',
    '',
    'Written by `npm run bench` (bench/run.ts). Every figure is a ratio against a baseline measured in the same run,',
    'on the same machine, interleaved with it; medians of several repetitions. Loopback only; each benchmark creates',
    'and drops its own databases.',
    '',
    '## Machine',
    '',
    ...Object.entries(env).map(([k, v]) => `- ${k}: ${v}`),
    '',
    '## Summary',
    '',
    '| benchmark | figure | baseline | ratio | target | holds |',
    '| --- | --- | --- | ---: | --- | --- |',
    ...order.map((k) => {
      const { result } = stored[k];
      const h = holds(result);
      return `| ${k} | ${result.figure} | ${result.baseline} | ${result.ratio.toFixed(2)}x | ${result.target ? `${result.target.op} ${result.target.value}x` : '—'} | ${h === null ? '—' : h ? 'yes' : '**no**'} |`;
    }),
    '',
    '## Details',
    '',
  ];
  for (const k of order) {
    const s = stored[k];
    lines.push(`### ${k}`, '', `${s.result.title}.`, '', `- measured ${s.measuredAt}, 1-minute load average ${s.load[0].toFixed(1)} before, ${s.load[1].toFixed(1)} after`);
    for (const note of s.result.notes) lines.push(`- ${note}`);
    if (s.kernelRows?.[0]?.selected !== undefined) lines.push('', ...kernelTable(s.kernelRows)); // older runs stored another shape
    lines.push('');
  }
  return lines.join('\n');
}

const wanted = process.argv.slice(2);
for (const name of wanted) if (!(name in BENCHES)) throw new Error(`unknown benchmark ${name}; one of ${Object.keys(BENCHES).join(', ')}`);
const jsonPath = join(ROOT, 'bench', 'results.json');
const stored: Record<string, Stored> = existsSync(jsonPath) ? JSON.parse(readFileSync(jsonPath, 'utf8')) : {};
const env = { ...machine(), PostgreSQL: await postgresVersion(), PyTorch: `${torchVersion()} (${PYTHON})` };
/**
 * Waits (at most `maxSeconds`) for the 1-minute load average to fall below `below`: each benchmark starts on
 * a machine as quiet as it gets, not on the tail of the one before (whose servers, clients and PostgreSQL
 * work leave the load at 2-3). ASGD_BENCH_QUIET_WAIT_S=0 skips the wait.
 */
async function settle(below = 1, maxSeconds = Number(process.env.ASGD_BENCH_QUIET_WAIT_S ?? 120)): Promise<void> {
  const deadline = Date.now() + maxSeconds * 1000;
  while (loadavg()[0] >= below && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2000));
}

for (const name of wanted.length ? wanted : Object.keys(BENCHES)) {
  await settle();
  console.log(`== ${name} (1-minute load average ${loadavg()[0].toFixed(2)})`);
  const before = loadavg()[0];
  const { results, rows } = await BENCHES[name]();
  for (const [i, result] of results.entries()) {
    // the kernel table goes with the first of the kernel's results
    stored[result.key] = { result, measuredAt: new Date().toISOString(), load: [before, loadavg()[0]], ...(rows && i === 0 && { kernelRows: rows }) };
    console.log(describe(result));
  }
  writeFileSync(jsonPath, JSON.stringify(stored, null, 2) + '\n');
  // A hand-written "## Notes" section at the end (what misses and why) survives the rewrite.
  const resultsPath = join(ROOT, 'bench', 'RESULTS.md');
  const previous = existsSync(resultsPath) ? readFileSync(resultsPath, 'utf8') : '';
  const notes = previous.indexOf('\n## Notes\n');
  writeFileSync(resultsPath, render(stored, env) + (notes >= 0 ? previous.slice(notes) : '\n'));
}
