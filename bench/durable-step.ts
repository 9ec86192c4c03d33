// Durable step, 1e6 parameters, safetensors gradients, end to end over HTTP to a server process on
// PostgreSQL, against a bare `pg` transaction that writes the full state (params + ax, 8 MB of bytea)
// under a row lock: what a step would cost if it wrote the state instead of the gradient.
//   node bench/durable-step.ts [--rounds 9] [--steps 12]
// Rounds interleave the two (K of ours, then K of the baseline); the figure is the median over rounds of
// the mean time per step within a round. Sessions snapshot every 100 steps (the default) in the
// background, so about one round in nine carries a snapshot; the mean over all steps is reported too.
import pg from 'pg';
import {
  call, createDatabase, createSession, describe, isMain, mean, median, modelSpec, ms, now, randomFloats, SAFETENSORS, safetensorsOf, startServer,
  type BenchResult, type ServerProcess,
} from './common.ts';

export const STEP_NUMEL = 1_000_000;
export const STEP_SPEC = modelSpec(STEP_NUMEL, 4);

export interface DurableOptions {
  rounds?: number;
  steps?: number;
  log?: (line: string) => void;
}

/** A session of 1e6 parameters on `server` and a function that times `k` sequential steps (seconds each). */
export async function stepSubject(server: ServerProcess, name: string): Promise<{ run(k: number): Promise<number>; all: number[] }> {
  await createSession(server.url, name, STEP_SPEC);
  // A few different gradients, so that no layer can cache an answer.
  const bodies = [1, 2, 3].map((seed) => safetensorsOf(STEP_SPEC, 100 + seed, 0.01));
  let i = 0;
  const all: number[] = [];
  const run = async (k: number) => {
    const start = now();
    for (let j = 0; j < k; j++) {
      const t = now();
      await call(server.url, 'POST', `/v1/sessions/${name}/step`, { headers: SAFETENSORS, body: bodies[i++ % bodies.length] });
      all.push(now() - t);
    }
    return (now() - start) / k;
  };
  return { run, all };
}

/** The baseline: BEGIN; SELECT … FOR UPDATE; UPDATE state SET data = <8 MB>; COMMIT, on one connection. */
export async function fullStateWriter(url: string): Promise<{ run(k: number): Promise<number>; close(): Promise<void> }> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  // Same storage as the service's tensor columns (migration 0001): no futile compression attempt.
  await client.query('CREATE TABLE bench_state (id int PRIMARY KEY, version bigint NOT NULL, data bytea NOT NULL)');
  await client.query('ALTER TABLE bench_state ALTER COLUMN data SET STORAGE EXTERNAL');
  const states = [1, 2, 3].map((seed) => Buffer.from(randomFloats(STEP_NUMEL * 2, seed).buffer));
  await client.query('INSERT INTO bench_state VALUES (1, 0, $1)', [states[0]]);
  let i = 0;
  return {
    async run(k) {
      const start = now();
      for (let j = 0; j < k; j++) {
        await client.query('BEGIN');
        await client.query({ name: 'lock', text: 'SELECT version FROM bench_state WHERE id = 1 FOR UPDATE' });
        await client.query({ name: 'write', text: 'UPDATE bench_state SET data = $1, version = version + 1 WHERE id = 1', values: [states[i++ % states.length]] });
        await client.query('COMMIT');
      }
      return (now() - start) / k;
    },
    close: () => client.end(),
  };
}

/** The floor: one autocommit INSERT of a step's gradient bytes (4 MB, stored as step_log stores them), what a durable step must write at least. */
export async function gradientWriter(url: string): Promise<{ run(k: number): Promise<number>; close(): Promise<void> }> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  await client.query('CREATE TABLE bench_grads (id bigserial PRIMARY KEY, data bytea NOT NULL)');
  await client.query('ALTER TABLE bench_grads ALTER COLUMN data SET STORAGE EXTERNAL');
  const grads = [1, 2, 3].map((seed) => Buffer.from(randomFloats(STEP_NUMEL, 50 + seed).buffer));
  let i = 0;
  return {
    async run(k) {
      const start = now();
      for (let j = 0; j < k; j++) await client.query({ name: 'insert', text: 'INSERT INTO bench_grads (data) VALUES ($1)', values: [grads[i++ % grads.length]] });
      return (now() - start) / k;
    },
    close: () => client.end(),
  };
}

export async function runDurableStepBench(options: DurableOptions = {}): Promise<BenchResult> {
  const rounds = options.rounds ?? 9;
  const k = options.steps ?? 12;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  let server: ServerProcess | null = null;
  let writer: Awaited<ReturnType<typeof fullStateWriter>> | null = null;
  let floor: Awaited<ReturnType<typeof gradientWriter>> | null = null;
  try {
    server = await startServer({ DATABASE_URL: db.url });
    const ours = await stepSubject(server, 'durable');
    writer = await fullStateWriter(db.url);
    floor = await gradientWriter(db.url);
    await ours.run(3);
    await writer.run(3);
    await floor.run(3);
    ours.all.length = 0;
    const oursRounds: number[] = [];
    const baseRounds: number[] = [];
    const floorRounds: number[] = [];
    for (let r = 0; r < rounds; r++) {
      oursRounds.push(await ours.run(k));
      baseRounds.push(await writer.run(k));
      floorRounds.push(await floor.run(k));
      log(`  round ${r + 1}/${rounds}: step ${ms(oursRounds[r])}, full-state write ${ms(baseRounds[r])}, gradient insert ${ms(floorRounds[r])}`);
    }
    const step = median(oursRounds);
    const base = median(baseRounds);
    const least = median(floorRounds);
    return {
      key: 'durable-step',
      title: 'durable step, 1e6 parameters, safetensors over HTTP, PostgreSQL',
      figure: `${ms(step)}/step`,
      baseline: `${ms(base)} per bare pg transaction writing params + ax (8 MB bytea)`,
      ratio: step / base,
      target: { op: '<=', value: 0.5 },
      notes: [
        `median of ${rounds} rounds of ${k} sequential steps, interleaved with ${k} baseline transactions per round`,
        `mean over all ${ours.all.length} steps (background snapshot every 100 steps included): ${ms(mean(ours.all))}; fastest ${ms(Math.min(...ours.all))}`,
        `floor, in the same rounds: one bare autocommit INSERT of the step's 4 MB gradient (what a durable step writes at least) takes ${ms(least)} = ${(least / base).toFixed(2)}x the baseline; the step is ${(step / least).toFixed(2)}x that insert`,
      ],
    };
  } finally {
    await writer?.close();
    await floor?.close();
    await server?.stop();
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runDurableStepBench({ rounds: opt('--rounds'), steps: opt('--steps') })));
}
