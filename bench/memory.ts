// Memory: peak resident set of a server process (on PostgreSQL) that creates a 5e7-parameter session
// from a safetensors body and steps it with safetensors gradients, against the session's state size
// (params + ax + gradient, 3 x 200 MB = 600 MB).
//   node bench/memory.ts [--steps 4]
// The server is a child process; its VmHWM (/proc/<pid>/status) is read before it is stopped. The
// session snapshots every 2 steps, so a background snapshot (a copy of params + ax) overlaps stepping.
// The peak since the process started counts the creation too; the peak of the stepping phase alone is
// read after resetting the high-water mark (/proc/<pid>/clear_refs) once the session exists.
import { writeFileSync } from 'node:fs';
import {
  call, createDatabase, createSession, describe, isMain, modelSpec, SAFETENSORS, safetensorsOf, startServer, type BenchResult, type ServerProcess,
} from './common.ts';

const NUMEL = 50_000_000;
const MB = 1e6;

export interface MemoryOptions {
  steps?: number;
  log?: (line: string) => void;
}

export async function runMemoryBench(options: MemoryOptions = {}): Promise<BenchResult> {
  const steps = options.steps ?? 4;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  let server: ServerProcess | null = null;
  try {
    server = await startServer({ DATABASE_URL: db.url });
    const idle = server.peakRss();
    const spec = modelSpec(NUMEL, 4);
    await createSession(server.url, 'large', spec, { snapshot_every: 2 });
    const afterCreate = server.peakRss();
    log(`  idle ${(idle / MB).toFixed(0)} MB, peak after create ${(afterCreate / MB).toFixed(0)} MB`);
    let stepPeak: number | null = null;
    try {
      writeFileSync(`/proc/${server.pid}/clear_refs`, '5'); // resets VmHWM to the current RSS
      stepPeak = 0;
    } catch {
      // not permitted here: only the whole-life peak is reported
    }
    const gradient = safetensorsOf(spec, 400, 0.01);
    for (let i = 0; i < steps; i++) {
      await call(server.url, 'POST', '/v1/sessions/large/step', { headers: SAFETENSORS, body: gradient });
      log(`  step ${i + 1}/${steps}: peak ${(server.peakRss() / MB).toFixed(0)} MB`);
    }
    // Let the last background snapshot finish inside the measured window.
    await call(server.url, 'GET', '/v1/sessions/large/snapshots');
    await new Promise((r) => setTimeout(r, 3000));
    const peak = Math.max(afterCreate, server.peakRss());
    if (stepPeak !== null) stepPeak = server.peakRss();
    const state = NUMEL * 12;
    return {
      key: 'memory',
      title: 'memory: peak RSS of a server creating and stepping a 5e7-parameter session (safetensors)',
      figure: `${(peak / MB).toFixed(0)} MB peak RSS`,
      baseline: `${(state / MB).toFixed(0)} MB of state (params + ax + gradient)`,
      ratio: peak / state,
      target: { op: '<=', value: 3 },
      notes: [
        `idle process ${(idle / MB).toFixed(0)} MB; peak by the end of the create request ${(afterCreate / MB).toFixed(0)} MB (${(afterCreate / state).toFixed(2)}x)`,
        stepPeak !== null
          ? `peak while stepping alone (${steps} steps, snapshot every 2): ${(stepPeak / MB).toFixed(0)} MB (${(stepPeak / state).toFixed(2)}x)`
          : 'the stepping phase alone could not be isolated (clear_refs not permitted)',
      ],
    };
  } finally {
    await server?.stop('SIGKILL'); // a shutdown snapshot would add nothing to the figure
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runMemoryBench({ steps: opt('--steps') })));
}
