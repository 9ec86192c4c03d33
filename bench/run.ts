// Runs the benchmarks and writes bench/RESULTS.md (and bench/results.json, the figures it is made from).
//   npm run bench                      every benchmark
//   npm run bench -- durable-step pglite   some of them (the others keep their last figures)
// Names: kernel, durable-step, throughput, pglite, catchup, memory, training, dashboard. Each also runs alone:
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

async function kernelResult(): Promise<{ result: BenchResult; rows: KernelBenchRow[] }> {
  const rows = await runKernelBench({ python: PYTHON, samples: 7 });
  const withTorch = rows.filter((r) => r.torch);
  const worst = withTorch.reduce((a, b) => (a.wasm / a.torch! < b.wasm / b.torch! ? a : b), withTorch[0]);
  return {
    rows,
    result: {
      key: 'kernel',
      title: 'kernel: ASGD step, wasm SIMD kernel',
      figure: worst ? `${(worst.wasm / 1e6).toFixed(0)}M elements/s (slowest ratio: ${worst.elements.toExponential(0)}, ${worst.config})` : 'n/a',
      baseline: worst ? `${(worst.torch! / 1e6).toFixed(0)}M elements/s for PyTorch ASGD.step(), 1 thread` : 'PyTorch not available',
      ratio: worst ? worst.wasm / worst.torch! : NaN,
      target: null,
      notes: ['see the table below; medians of 7 interleaved rounds'],
    },
  };
}

const BENCHES: Record<string, () => Promise<{ result: BenchResult; rows?: KernelBenchRow[] }>> = {
  kernel: kernelResult,
  'durable-step': async () => ({ result: await runDurableStepBench() }),
  throughput: async () => ({ result: await runThroughputBench() }),
  pglite: async () => ({ result: await runPgliteBench() }),
  catchup: async () => ({ result: await runCatchupBench() }),
  memory: async () => ({ result: await runMemoryBench() }),
  training: async () => ({ result: await runTrainingBench({ python: PYTHON }) }),
  dashboard: async () => ({ result: await runDashboardBench() }),
};

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
  return [
    '| elements | config | wasm/s | js/s | PyTorch/s | memcpy/s | wasm/PyTorch | js/PyTorch | wasm/memcpy |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map((x) => `| ${x.elements.toExponential(0)} | ${x.config} | ${m(x.wasm)} | ${m(x.js)} | ${m(x.torch)} | ${m(x.memcpy)} | ${r(x.wasm, x.torch)} | ${r(x.js, x.torch)} | ${r(x.wasm, x.memcpy)} |`),
  ];
}

function render(stored: Record<string, Stored>, env: Record<string, string>): string {
  const order = Object.keys(BENCHES).filter((k) => stored[k]);
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
    if (s.kernelRows) lines.push('', ...kernelTable(s.kernelRows));
    lines.push('');
  }
  return lines.join('\n');
}

const wanted = process.argv.slice(2);
for (const name of wanted) if (!(name in BENCHES)) throw new Error(`unknown benchmark ${name}; one of ${Object.keys(BENCHES).join(', ')}`);
const jsonPath = join(ROOT, 'bench', 'results.json');
const stored: Record<string, Stored> = existsSync(jsonPath) ? JSON.parse(readFileSync(jsonPath, 'utf8')) : {};
const env = { ...machine(), PostgreSQL: await postgresVersion(), PyTorch: `${torchVersion()} (${PYTHON})` };
for (const name of wanted.length ? wanted : Object.keys(BENCHES)) {
  console.log(`== ${name}`);
  const before = loadavg()[0];
  const { result, rows } = await BENCHES[name]();
  stored[name] = { result, measuredAt: new Date().toISOString(), load: [before, loadavg()[0]], ...(rows && { kernelRows: rows }) };
  console.log(describe(result));
  writeFileSync(jsonPath, JSON.stringify(stored, null, 2) + '\n');
  // A hand-written "## Notes" section at the end (what misses and why) survives the rewrite.
  const resultsPath = join(ROOT, 'bench', 'RESULTS.md');
  const previous = existsSync(resultsPath) ? readFileSync(resultsPath, 'utf8') : '';
  const notes = previous.indexOf('\n## Notes\n');
  writeFileSync(resultsPath, render(stored, env) + (notes >= 0 ? previous.slice(notes) : '\n'));
}
