// Other sessions while a large one is forked or snapshotted: one client steps a small session as fast as it
// is answered, on the same server process, while a 3e7-parameter session (240 MB of state) is snapshotted
// and forked (after a step of it, not timed). The figure is that client's slowest step during each, against its slowest step in a window of
// the same length with nothing else going on. Copies and checksums of a large state are made a slice at a
// time (src/sessions/slices.ts), so the event loop serves the small session between the slices.
//   node bench/stall.ts [--numel 30000000] [--repetitions 3]
import {
  call, createDatabase, createSession, describe, isMain, median, modelSpec, ms, now, request, SAFETENSORS, safetensorsOf, startServer, type BenchResult, type ServerProcess,
} from './common.ts';

export interface StallOptions {
  numel?: number;
  repetitions?: number;
  log?: (line: string) => void;
}

export async function runStallBench(options: StallOptions = {}): Promise<BenchResult> {
  const numel = options.numel ?? 30_000_000;
  const repetitions = options.repetitions ?? 3;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  let server: ServerProcess | null = null;
  try {
    server = await startServer({ DATABASE_URL: db.url });
    const url = server.url;
    await createSession(url, 'big', modelSpec(numel, 4));
    await call(url, 'POST', '/v1/sessions', { headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'small', params: [{ name: 'w', shape: [4], data: [1, 2, 3, 4] }] }) }, 201);
    const grad = JSON.stringify({ grads: { w: [0.1, 0.1, 0.1, 0.1] } });
    let stepping = true;
    let slowest = 0;
    const stepper = (async () => {
      while (stepping) {
        const t = now();
        await request(url, 'POST', '/v1/sessions/small/step', { headers: { 'content-type': 'application/json' }, body: grad });
        slowest = Math.max(slowest, now() - t);
      }
    })();
    /** The small session's slowest step while `work` runs (and for 0.2 s after), and how long `work` took. */
    const during = async (work: () => Promise<unknown>): Promise<{ slowest: number; took: number }> => {
      await new Promise((r) => setTimeout(r, 200));
      slowest = 0;
      const t = now();
      await work();
      const took = now() - t;
      await new Promise((r) => setTimeout(r, 200));
      return { slowest, took };
    };
    const idle: number[] = [];
    const snap: number[] = [];
    const fork: number[] = [];
    const bigGrad = safetensorsOf(modelSpec(numel, 4), 7, 0.01);
    for (let r = 0; r < repetitions; r++) {
      // A step first (not timed), so that the snapshot has a new version to write.
      await call(url, 'POST', '/v1/sessions/big/step', { headers: SAFETENSORS, body: bigGrad });
      const s = await during(() => call(url, 'POST', '/v1/sessions/big/snapshots', { headers: { 'content-type': 'application/json' }, body: '{}' }, 201));
      const f = await during(() => call(url, 'POST', '/v1/sessions/big/fork', { headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: `fork-${r}` }) }, 201));
      const quiet = await during(() => new Promise((resolve) => setTimeout(resolve, (s.took + f.took) * 500)));
      await call(url, 'DELETE', `/v1/sessions/fork-${r}`, {}, 204);
      snap.push(s.slowest);
      fork.push(f.slowest);
      idle.push(quiet.slowest);
      log(`  repetition ${r + 1}/${repetitions}: slowest small step during the snapshot ${ms(s.slowest)} (it took ${ms(s.took)}), the fork ${ms(f.slowest)} (${ms(f.took)}), nothing ${ms(quiet.slowest)}`);
    }
    stepping = false;
    await stepper;
    const worst = Math.max(median(snap), median(fork));
    return {
      key: 'stall',
      title: `another session's steps while a ${numel.toExponential(0)}-parameter session is snapshotted and forked (one server process, PostgreSQL)`,
      figure: `${ms(worst)} slowest step`,
      baseline: `${ms(median(idle))} slowest step with nothing else going on`,
      ratio: worst / median(idle),
      target: null,
      notes: [
        `medians of ${repetitions} repetitions: during the snapshot ${ms(median(snap))}, during the fork ${ms(median(fork))}`,
      ],
    };
  } finally {
    await server?.stop();
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runStallBench({ numel: opt('--numel'), repetitions: opt('--repetitions') })));
}
