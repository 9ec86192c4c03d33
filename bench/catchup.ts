// Catch-up: a fresh process taking over a 1e6-parameter session 99 steps after its last snapshot (the
// previous owner crashed: no shutdown snapshot). The figure is the time of the first read of the params on
// a fresh app (its newest replay point + the logged gradients after it replayed); the baseline, the same
// first read of a session whose newest snapshot is its current version (loading a snapshot alone). Notes:
// the worst case (15 steps after a point) and the point lost (all 99 steps replayed).
//   node bench/catchup.ts [--rounds 5]
// Each round builds two fresh apps in this process (listening on loopback) on the same database, times
// one first read on each, and closes them without writing anything (their caches are dropped first).
import pg from 'pg';
import { to as copyTo } from 'pg-copy-streams';
import { buildApp } from '../src/app.ts';
import { loadConfig } from '../src/config.ts';
import {
  call, createDatabase, createSession, describe, isMain, median, ms, now, SAFETENSORS, safetensorsOf, startServer,
  type BenchResult, type ServerProcess,
} from './common.ts';
import { STEP_SPEC } from './durable-step.ts';
import { replayPointInterval } from '../src/sessions/replay-points.ts';

const STEPS_AFTER_SNAPSHOT = 99;

export interface CatchupOptions {
  rounds?: number;
  log?: (line: string) => void;
}

/** Seconds of the first GET params (safetensors) on a fresh app. */
async function firstRead(databaseUrl: string, session: string): Promise<number> {
  const app = await buildApp({ config: loadConfig({ LOG_LEVEL: 'silent', DATABASE_URL: databaseUrl, ASGD_HEALTH_CHECK_INTERVAL_MS: '0' }), logger: false });
  try {
    await app.listen({ host: '127.0.0.1', port: 0 });
    const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    const start = now();
    const answer = await call(url, 'GET', `/v1/sessions/${session}/params?format=safetensors`);
    const seconds = now() - start;
    if (answer.body.byteLength < STEP_SPEC.reduce((a, p) => a + p.numel * 4, 0)) throw new Error('short answer');
    return seconds;
  } finally {
    app.sessions.dropCache(); // a read-only visit: no shutdown snapshot
    await app.close();
  }
}

/**
 * The floor: seconds for PostgreSQL alone to hand over the logged gradients a takeover replays (one binary
 * COPY of them to a client that only counts the bytes), and how many bytes that is.
 */
async function bareLogRead(url: string, session: string): Promise<{ seconds: number; bytes: number }> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const start = now();
    let bytes = 0;
    const sql = `COPY (SELECT l.grads FROM step_log l JOIN sessions s ON s.id = l.session_id WHERE s.name = '${session}' ORDER BY l.version) TO STDOUT WITH (FORMAT binary)`;
    for await (const chunk of client.query(copyTo(sql))) bytes += (chunk as Buffer).byteLength;
    return { seconds: now() - start, bytes };
  } finally {
    await client.end();
  }
}

export async function runCatchupBench(options: CatchupOptions = {}): Promise<BenchResult> {
  const rounds = options.rounds ?? 5;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  let owner: ServerProcess | null = null;
  try {
    // The previous owner: the sessions created (snapshot at version 1) and stepped, never snapshotted again
    // (snapshot_every 1000); 'snapshotted' then gets a manual snapshot at its current version. The owner
    // writes replay points as configured by default (ASGD_REPLAY_BOUND_BYTES 64 MiB: every 16 steps here).
    // 'worst' stops 15 steps after a point (the most a takeover replays); 'lost' loses its point, as when
    // PostgreSQL, crashing, empties its unlogged tables: the takeover replays all 99 steps.
    owner = await startServer({ DATABASE_URL: db.url });
    const bodies = [1, 2, 3].map((seed) => safetensorsOf(STEP_SPEC, 300 + seed, 0.01));
    const interval = replayPointInterval({ numel: STEP_SPEC.reduce((a, p) => a + p.numel, 0), params: STEP_SPEC }, loadConfig({ DATABASE_URL: db.url }).replayBoundBytes);
    const worstSteps = interval === null ? STEPS_AFTER_SNAPSHOT : Math.floor(STEPS_AFTER_SNAPSHOT / interval) * interval - 2; // version = a point + interval - 1
    const plan: [string, number][] = [['takeover', STEPS_AFTER_SNAPSHOT], ['snapshotted', STEPS_AFTER_SNAPSHOT], ['worst', worstSteps], ['lost', STEPS_AFTER_SNAPSHOT]];
    for (const [name, steps] of plan) {
      await createSession(owner.url, name, STEP_SPEC, { snapshot_every: 1000 });
      for (let i = 0; i < steps; i++) {
        await call(owner.url, 'POST', `/v1/sessions/${name}/step`, { headers: SAFETENSORS, body: bodies[i % bodies.length] });
      }
    }
    await call(owner.url, 'POST', '/v1/sessions/snapshotted/snapshots', { headers: { 'content-type': 'application/json' }, body: '{}' }, 201);
    await owner.stop('SIGKILL'); // a crash: no shutdown snapshot
    owner = null;
    await dropPoint(db.url, 'lost');
    const points = await pointsOf(db.url);

    await firstRead(db.url, 'snapshotted'); // warm-up: code paths and the database's caches
    await firstRead(db.url, 'takeover');
    const takeover: number[] = [];
    const snapshotOnly: number[] = [];
    const worst: number[] = [];
    const lost: number[] = [];
    const logOnly: number[] = [];
    let logBytes = 0;
    for (let r = 0; r < rounds; r++) {
      takeover.push(await firstRead(db.url, 'takeover'));
      snapshotOnly.push(await firstRead(db.url, 'snapshotted'));
      worst.push(await firstRead(db.url, 'worst'));
      lost.push(await firstRead(db.url, 'lost'));
      const bare = await bareLogRead(db.url, 'lost');
      logOnly.push(bare.seconds);
      logBytes = bare.bytes;
      log(`  round ${r + 1}/${rounds}: takeover ${ms(takeover[r])}, snapshot alone ${ms(snapshotOnly[r])}, 15 steps after a point ${ms(worst[r])}, ` +
        `replay point lost ${ms(lost[r])}, bare COPY of the log ${ms(bare.seconds)}`);
    }
    const figure = median(takeover);
    const base = median(snapshotOnly);
    const floor = median(logOnly);
    const replayedFrom = (name: string) => points.get(name) ?? 1;
    const versionOf = (name: string) => 1 + plan.find(([n]) => n === name)![1];
    const replayedSteps = (name: string) => versionOf(name) - replayedFrom(name);
    return {
      key: 'catchup',
      title: `catch-up: first read on a fresh app, 1e6 parameters, ${STEPS_AFTER_SNAPSHOT} steps after the last snapshot`,
      figure: ms(figure),
      baseline: `${ms(base)} for the same first read from a snapshot alone`,
      ratio: figure / base,
      target: { op: '<=', value: 3 },
      notes: [
        `median of ${rounds} rounds; replay points every ${interval ?? '(off)'} steps (ASGD_REPLAY_BOUND_BYTES default): the takeover loads the point at version ` +
          `${replayedFrom('takeover')} and replays ${replayedSteps('takeover')} steps (4 MB of logged gradients and a kernel step each)`,
        `the most a takeover replays, ${replayedSteps('worst')} steps after a point: ${ms(median(worst))} = ${(median(worst) / base).toFixed(2)}x the baseline`,
        `the point lost (PostgreSQL empties unlogged tables when it crashes): all ${replayedSteps('lost')} steps replayed, ${ms(median(lost))} = ${(median(lost) / base).toFixed(2)}x ` +
          `(${ms((median(lost) - base) / STEPS_AFTER_SNAPSHOT)} per replayed step)`,
        `floor of that, in the same rounds: PostgreSQL alone hands over the ${STEPS_AFTER_SNAPSHOT} logged gradients (one bare binary COPY of ${(logBytes / 1e6).toFixed(0)} MB ` +
          `to a client that only counts them) in ${ms(floor)} = ${(floor / base).toFixed(2)}x the baseline`,
      ],
    };
  } finally {
    await owner?.stop('SIGKILL');
    await db.drop();
  }
}

/** The version of each session's replay point. */
async function pointsOf(url: string): Promise<Map<string, number>> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const { rows } = await client.query<{ name: string; version: number }>('SELECT s.name, p.version::float8 AS version FROM replay_points p JOIN sessions s ON s.id = p.session_id');
    return new Map(rows.map((r) => [r.name, r.version]));
  } finally {
    await client.end();
  }
}

async function dropPoint(url: string, session: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query('DELETE FROM replay_points WHERE session_id = (SELECT id FROM sessions WHERE name = $1)', [session]);
  } finally {
    await client.end();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  console.log(describe(await runCatchupBench({ rounds: opt('--rounds') })));
}
