// Memory: peak resident set of a server process (on PostgreSQL) that creates a 5e7-parameter session
// from a safetensors body and steps it with safetensors gradients, against the session's state size
// (params + ax + gradient, 3 x 200 MB = 600 MB). The same run times those steps (`big-step`) against the
// least a durable step of that size can cost: sending the same body over loopback to a server that only
// reads it, plus one bare pg transaction writing the same bytes.
//   node bench/memory.ts [--steps 4]
// The server is a child process; its VmHWM (/proc/<pid>/status) is read before it is stopped. The
// session snapshots every 2 steps, so a background snapshot (a copy of params + ax) overlaps stepping.
// The peak since the process started counts the creation too; the peak of the stepping phase alone is
// read after resetting the high-water mark (/proc/<pid>/clear_refs) once the session exists.
import { writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import {
  bareWrites, call, createDatabase, createSession, describe, isMain, median, modelSpec, ms, now, request, SAFETENSORS, safetensorsOf, startServer, type BenchResult,
  type ServerProcess,
} from './common.ts';

const NUMEL = 50_000_000;
const MB = 1e6;

export interface MemoryOptions {
  steps?: number;
  log?: (line: string) => void;
}

/** Seconds to POST `body` over loopback to a server that reads it whole and answers 204 (median of `n`). */
async function loopbackSend(body: Buffer, n: number): Promise<number> {
  const sink = createServer((req, res) => {
    req.on('data', () => {});
    req.on('end', () => res.writeHead(204).end());
  });
  await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', resolve));
  try {
    const url = `http://127.0.0.1:${(sink.address() as { port: number }).port}`;
    const times: number[] = [];
    for (let i = 0; i < n; i++) {
      const start = now();
      await request(url, 'POST', '/', { headers: SAFETENSORS, body });
      times.push(now() - start);
    }
    return median(times);
  } finally {
    sink.close();
  }
}

export async function runMemoryBench(options: MemoryOptions = {}): Promise<BenchResult[]> {
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
    const stepTimes: number[] = [];
    for (let i = 0; i < steps; i++) {
      const start = now();
      await call(server.url, 'POST', '/v1/sessions/large/step', { headers: SAFETENSORS, body: gradient });
      stepTimes.push(now() - start);
      log(`  step ${i + 1}/${steps}: ${ms(stepTimes[i])}, peak ${(server.peakRss() / MB).toFixed(0)} MB`);
    }
    // Let the last background snapshot finish inside the measured window.
    await call(server.url, 'GET', '/v1/sessions/large/snapshots');
    await new Promise((r) => setTimeout(r, 3000));
    const peak = Math.max(afterCreate, server.peakRss());
    if (stepPeak !== null) stepPeak = server.peakRss();
    const state = NUMEL * 12;
    // The big step timed alone: no background snapshot (400 MB written meanwhile) overlapping it.
    await call(server.url, 'PATCH', '/v1/sessions/large', { headers: { 'content-type': 'application/json' }, body: JSON.stringify({ snapshot_every: 1000 }) });
    await new Promise((r) => setTimeout(r, 3000));
    const aloneTimes: number[] = [];
    for (let i = 0; i < 3; i++) {
      const start = now();
      await call(server.url, 'POST', '/v1/sessions/large/step', { headers: SAFETENSORS, body: gradient });
      aloneTimes.push(now() - start);
    }
    // The floor of a durable step of this size, measured after the server's figures (it is not counted in them).
    const send = await loopbackSend(gradient, 3);
    const write = median(await bareWrites(db.url, NUMEL * 4, { count: 3 }));
    const step = median(aloneTimes);
    log(`  loopback send of the body ${ms(send)}, bare transaction writing ${NUMEL * 4 / MB} MB ${ms(write)}`);
    const bigStep: BenchResult = {
      key: 'big-step',
      title: 'big step: one durable step of a 5e7-parameter session (200 MB safetensors gradient over HTTP, PostgreSQL)',
      figure: `${ms(step)}/step (median of ${aloneTimes.length})`,
      baseline: `${ms(send + write)}: the body sent over loopback to a server that only reads it (${ms(send)}) plus a bare pg transaction writing the same bytes (${ms(write)})`,
      ratio: step / (send + write),
      target: { op: '<=', value: 2 },
      notes: [
        `steps with no snapshot being written: ${aloneTimes.map(ms).join(', ')}`,
        `the memory run's steps (a background snapshot of 400 MB every 2 steps overlapping them): ${stepTimes.map(ms).join(', ')}`,
      ],
    };
    return [{
      key: 'memory',
      title: 'memory: peak RSS of a server creating and stepping a 5e7-parameter session (safetensors)',
      figure: `${(peak / MB).toFixed(0)} MB peak RSS`,
      baseline: `${(state / MB).toFixed(0)} MB of state (params + ax + gradient)`,
      ratio: peak / state,
      target: { op: '<=', value: 2.5 },
      notes: [
        `idle process ${(idle / MB).toFixed(0)} MB; peak by the end of the create request ${(afterCreate / MB).toFixed(0)} MB (${(afterCreate / state).toFixed(2)}x)`,
        stepPeak !== null
          ? `peak while stepping alone (${steps} steps, snapshot every 2): ${(stepPeak / MB).toFixed(0)} MB (${(stepPeak / state).toFixed(2)}x)`
          : 'the stepping phase alone could not be isolated (clear_refs not permitted)',
      ],
    }, bigStep];
  } finally {
    await server?.stop('SIGKILL'); // a shutdown snapshot would add nothing to the figure
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  for (const result of await runMemoryBench({ steps: opt('--steps') })) {
    for (const note of result.notes) console.log(`  ${note}`);
    console.log(describe(result));
  }
}
