// A training loop through the service, as a PyTorch user runs it: two worker processes train a ~10k-parameter
// MLP (64-128-10, 9,610 parameters) on synthetic data through one session on PostgreSQL with
// RemoteASGD(pipeline=True), for a fixed number of global steps. Figure: the wall-clock of their loops against
// one local torch process doing the same number of steps with torch.optim.ASGD, measured in the same run,
// interleaved, medians over rounds. Also the cost of one optimizer step at 1e6 parameters, remote against local.
//   node bench/training.ts [--steps 2000] [--rounds 3] [--percall-steps 15] [--python /usr/bin/python3]
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { bareWrites, cpuSecondsOf, createDatabase, describe, machineCpu, isMain, median, ms, postgresCpuSeconds, request, ROOT, startServer, type BenchResult } from './common.ts';

const WORKER = join(ROOT, 'bench', 'training_worker.py');
/** Sub-millisecond times: two decimals. */
const fine = (seconds: number) => `${(seconds * 1000).toFixed(2)} ms`;

export interface TrainingBenchOptions {
  /** Global steps of one run (the workers share them). */
  steps?: number;
  rounds?: number;
  /** Steps of the 1e6-parameter per-step measure. */
  percallSteps?: number;
  python?: string;
  log?: (line: string) => void;
}

interface LoopTimes {
  start: number;
  end: number;
  loss: number | null;
  /** CPU seconds of the loop's forward and backward passes. */
  compute: number;
  /** CPU seconds of the whole loop (remote workers). */
  cpu?: number;
  stale_dropped?: number;
}

interface Worker {
  /** Resolves when the process printed "ready" (remote workers, after joining the session). */
  ready: Promise<void>;
  go(): void;
  /** Its JSON line. */
  result: Promise<Record<string, number>>;
}

/** Runs training_worker.py. */
function python(exe: string, args: string[]): Worker {
  const child = spawn(exe, [WORKER, ...args], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, OMP_NUM_THREADS: '1' } });
  let out = '';
  let err = '';
  let markReady = () => {};
  const ready = new Promise<void>((resolve) => (markReady = resolve));
  child.stdout.on('data', (c) => {
    out += c;
    if (/^ready$/m.test(out)) markReady();
  });
  child.stderr.on('data', (c) => (err = (err + c).slice(-4000)));
  const result = new Promise<Record<string, number>>((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code) => {
      markReady();
      const line = out.trim().split('\n').pop() ?? '';
      if (code !== 0 || !line.startsWith('{')) reject(new Error(`training_worker.py ${args[0]} exited ${code}: ${err}`));
      else resolve(JSON.parse(line));
    });
  });
  return { ready, result, go: () => child.stdin.end('go\n') };
}

async function run(exe: string, args: string[]): Promise<Record<string, number>> {
  const worker = python(exe, args);
  worker.go();
  return worker.result;
}

export async function runTrainingBench(opts: TrainingBenchOptions = {}): Promise<BenchResult> {
  const steps = opts.steps ?? 2000;
  const rounds = opts.rounds ?? 3;
  const percallSteps = opts.percallSteps ?? 15;
  const exe = opts.python ?? process.env.TORCH_PYTHON ?? '/usr/bin/python3';
  const log = opts.log ?? (() => {});
  const workers = 2;
  const db = await createDatabase();
  const server = await startServer({ DATABASE_URL: db.url, LOG_LEVEL: 'warn' });
  /** The two workers' loops on a new session, started together once both joined it. */
  const runWorkers = async (session: string): Promise<LoopTimes[]> => {
    const procs = Array.from({ length: workers }, (_, rank) =>
      python(exe, ['remote', '--url', server.url, '--session', session, '--rank', String(rank), '--workers', String(workers), '--steps', String(steps / workers)]));
    await Promise.all(procs.map((p) => p.ready)); // both joined the session: start their loops together
    for (const p of procs) p.go();
    return (await Promise.all(procs.map((p) => p.result))) as unknown as LoopTimes[];
  };
  try {
    const remote: number[] = [];
    const local: number[] = [];
    const busy: number[] = [];
    // CPU ms of one forward and backward pass: local, local sleeping after each step, in the remote workers.
    const compute = { local: [] as number[], paused: [] as number[], remote: [] as number[] };
    // CPU seconds a global step of the remote rounds: the workers' loops (client included), the service, PostgreSQL.
    const cpu = { workers: [] as number[], service: [] as number[], postgres: [] as number[] };
    let dropped = 0;
    let losses: string[] = [];
    // One untimed round of the workers first: a service that has just started runs its first thousands of
    // steps before V8 has compiled its hot paths (measured: the first round took 2.40 ms a global step, the
    // next ones 1.95), which a training run against a running service does not pay.
    await runWorkers(`training-warmup-${Date.now()}`);
    for (let r = 0; r < rounds; r++) {
      const l = (await run(exe, ['local', '--steps', String(steps)])) as unknown as LoopTimes;
      local.push(l.end - l.start);
      compute.local.push(l.compute / steps);
      const cpuBefore = machineCpu();
      const serviceBefore = cpuSecondsOf(server.pid);
      const postgresBefore = postgresCpuSeconds();
      const runs = await runWorkers(`training-${r}-${Date.now()}`);
      const wall = Math.max(...runs.map((x) => x.end)) - Math.min(...runs.map((x) => x.start));
      const cpuAfter = machineCpu();
      // The service's and PostgreSQL's from the workers' start-up to their exit (joining the session included: a few requests).
      cpu.service.push((cpuSecondsOf(server.pid) - serviceBefore) / steps);
      cpu.postgres.push((postgresCpuSeconds() - postgresBefore) / steps);
      cpu.workers.push(runs.reduce((a, x) => a + (x.cpu ?? NaN), 0) / steps);
      busy.push((cpuAfter.busy - cpuBefore.busy) / (cpuAfter.total - cpuBefore.total));
      remote.push(wall);
      compute.remote.push(runs.reduce((a, x) => a + x.compute, 0) / steps);
      dropped += runs.reduce((a, x) => a + (x.stale_dropped ?? 0), 0);
      losses = [`local ${l.loss?.toFixed(3)}`, ...runs.map((x, i) => `worker ${i} ${x.loss?.toFixed(3)}`)];
      log(`round ${r}: local ${ms(local[r])}, two workers ${ms(wall)}`);
    }
    // The same local loop sleeping 2 ms after each step, as a worker waits for its answers (not timed as a
    // figure: only its forward and backward passes count). A round of 1000 steps is enough.
    const pausedSteps = Math.min(steps, 1000);
    for (let r = 0; r < Math.min(rounds, 2); r++) {
      const p = (await run(exe, ['local', '--steps', String(pausedSteps), '--pause-ms', '2'])) as unknown as LoopTimes;
      compute.paused.push(p.compute / pausedSteps);
    }
    const metrics = (await request(server.url, 'GET', '/metrics')).body.toString();
    const sample = (name: string) => Number(/^(\S+) (\S+)$/m.exec(metrics.split('\n').find((l) => l.startsWith(`${name} `)) ?? '')?.[2] ?? NaN);
    const perCommit = sample('asgd_step_batch_size_sum') / sample('asgd_step_batch_size_count');
    const writes = await bareWrites(db.url, 9610 * 4, { count: 300, warmup: 20 });
    const floor = writes.reduce((a, b) => a + b, 0) / writes.length;
    const percall = await run(exe, ['percall', '--url', server.url, '--session', `percall-${Date.now()}`, '--steps', String(percallSteps)]);
    const wall = median(remote);
    const base = median(local);
    return {
      key: 'training',
      title: `training: ${steps} global steps of a 9,610-parameter MLP, two worker processes with RemoteASGD(pipeline=True) on PostgreSQL`,
      figure: `${ms(wall)} wall-clock`,
      baseline: `${ms(base)} for one local torch.optim.ASGD process`,
      ratio: wall / base,
      target: { op: '<=', value: 3 },
      notes: [
        `medians of ${rounds} rounds (local, then the two workers), loops timed inside the processes (no start-up, import or session creation), after one untimed round of the workers (the service warmed up, as one that has been running is)`,
        `per step: ${ms(wall / steps)} remote (both workers together) against ${ms(base / steps)} local, forward and backward included`,
        `one optimizer step at 1e6 parameters (blocking, one request): ${ms(percall.remote)} remote against ${ms(percall.local)} for torch.optim.ASGD.step() = ${(percall.remote / percall.local).toFixed(1)}x`,
        `forward and backward, CPU time a pass: ${fine(median(compute.local))} in the local loop; ${fine(median(compute.paused))} in the same loop sleeping 2 ms after each step; ${fine(median(compute.remote))} in the remote workers. ` +
          'The same work: a loop that waits (its core goes idle) computes slower after each wait on this machine, so part of the remote figure is not the service\'s',
        `CPU while the workers trained: the machine was ${(100 * median(busy)).toFixed(0)}% busy (both cores; two torch workers, the service and PostgreSQL share them, where the local run has one core to itself)`,
        `CPU a global step (medians): the workers' loops ${fine(median(cpu.workers))} (forward and backward ${fine(median(compute.remote))}, the rest the client's work), ` +
          `the service ${fine(median(cpu.service))}, PostgreSQL ${fine(median(cpu.postgres))}; together ${fine(median(cpu.workers) + median(cpu.service) + median(cpu.postgres))} ` +
          `of the ${fine(2 * (wall / steps))} two cores give in ${fine(wall / steps)} of wall-clock`,
        `floor: one bare durable INSERT of a step's gradient bytes (${9610 * 4} bytes, autocommit) takes ${ms(floor)}; the service committed ${perCommit.toFixed(2)} steps per commit (group commit), so the disk alone costs ${ms(floor / perCommit)} a global step = ${(floor / perCommit / (base / steps)).toFixed(1)}x the local step`,
        `gradients dropped as stale: ${dropped} (no max_staleness: none expected); last losses: ${losses.join(', ')}`,
      ],
    };
  } finally {
    await server.stop();
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const arg = (name: string) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : undefined;
  };
  const result = await runTrainingBench({
    steps: arg('steps') ? Number(arg('steps')) : undefined,
    rounds: arg('rounds') ? Number(arg('rounds')) : undefined,
    percallSteps: arg('percall-steps') ? Number(arg('percall-steps')) : undefined,
    python: arg('python'),
    log: console.log,
  });
  for (const note of result.notes) console.log(`  ${note}`);
  console.log(describe(result));
}
