// Small-model throughput: 1e3 parameters, 16 concurrent clients spread over 3 server processes, all
// stepping one session (safetensors gradients), in steps per second; against a bare `pg` locked-row
// update (BEGIN; SELECT … FOR UPDATE; UPDATE; COMMIT) by 16 concurrent connections on one row.
//   node bench/throughput.ts [--rounds 5] [--seconds 3]
// Rounds alternate the two; each runs for a fixed time (and at most a fixed number of steps per client);
// the figure is the median over rounds.
import pg from 'pg';
import {
  call, cpuSecondsOf, createDatabase, createSession, describe, isMain, machineCpu, median, modelSpec, now, postgresCpuSeconds, RawConnection, SAFETENSORS, safetensorsOf, startServer,
  type BenchResult, type ServerProcess,
} from './common.ts';

const NUMEL = 1_000;
const CLIENTS = 16;
const SERVERS = 3;
/** Bound on each client's loop within one round, whatever the clock says. */
const MAX_STEPS_PER_CLIENT = 100_000;

export interface ThroughputOptions {
  rounds?: number;
  seconds?: number;
  log?: (line: string) => void;
}

/** Runs `clients` loops of `one(client)` for `seconds`; returns completed operations per second. */
async function saturate(clients: number, seconds: number, one: (client: number) => Promise<void>): Promise<number> {
  const start = now();
  const deadline = start + seconds;
  let done = 0;
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      for (let i = 0; i < MAX_STEPS_PER_CLIENT && now() < deadline; i++) {
        await one(c);
        done++;
      }
    }),
  );
  return done / (now() - start);
}

export async function runThroughputBench(options: ThroughputOptions = {}): Promise<BenchResult> {
  const rounds = options.rounds ?? 5;
  const seconds = options.seconds ?? 3;
  const log = options.log ?? console.log;
  const db = await createDatabase();
  const servers: ServerProcess[] = [];
  const connections: pg.Client[] = [];
  const links: RawConnection[] = [];
  try {
    for (let s = 0; s < SERVERS; s++) servers.push(await startServer({ DATABASE_URL: db.url }));
    const spec = modelSpec(NUMEL, 2);
    await createSession(servers[0].url, 'small', spec);
    const bodies = Array.from({ length: CLIENTS }, (_, c) => safetensorsOf(spec, 200 + c, 0.01));
    // Each client on its own keep-alive connection to its server, sending prebuilt requests (as wrk does).
    for (let c = 0; c < CLIENTS; c++) links.push(await RawConnection.open(servers[c % SERVERS].url));
    const requests = bodies.map((body, c) => RawConnection.requestBytes(servers[c % SERVERS].url, 'POST', '/v1/sessions/small/step', SAFETENSORS, body));
    const step = async (c: number) => {
      const status = await links[c].send(requests[c]);
      if (status !== 200) throw new Error(`step: HTTP ${status}`);
    };

    const setup = new pg.Client({ connectionString: db.url });
    await setup.connect();
    await setup.query('CREATE TABLE bench_counter (id int PRIMARY KEY, version bigint NOT NULL)');
    await setup.query('INSERT INTO bench_counter VALUES (1, 0)');
    await setup.end();
    for (let c = 0; c < CLIENTS; c++) {
      const client = new pg.Client({ connectionString: db.url });
      await client.connect();
      connections.push(client);
    }
    const lockedUpdate = async (c: number) => {
      const client = connections[c];
      await client.query('BEGIN');
      await client.query({ name: 'lock', text: 'SELECT version FROM bench_counter WHERE id = 1 FOR UPDATE' });
      await client.query({ name: 'bump', text: 'UPDATE bench_counter SET version = version + 1 WHERE id = 1' });
      await client.query('COMMIT');
    };

    await saturate(CLIENTS, 1, step); // warm-up: every process loads the session, JIT warms up
    await saturate(CLIENTS, 1, lockedUpdate);
    const oursRounds: number[] = [];
    const baseRounds: number[] = [];
    let serverCpu = 0;
    let clientCpu = 0;
    let postgresCpu = 0;
    let machineBusy = 0;
    let machineTotal = 0;
    let oursSteps = 0;
    for (let r = 0; r < rounds; r++) {
      const cpuBefore = servers.reduce((a, x) => a + cpuSecondsOf(x.pid), 0);
      const selfBefore = cpuSecondsOf(process.pid);
      const postgresBefore = postgresCpuSeconds();
      const machineBefore = machineCpu();
      const started = now();
      oursRounds.push(await saturate(CLIENTS, seconds, step));
      oursSteps += oursRounds[r] * (now() - started);
      serverCpu += servers.reduce((a, x) => a + cpuSecondsOf(x.pid), 0) - cpuBefore;
      clientCpu += cpuSecondsOf(process.pid) - selfBefore;
      postgresCpu += postgresCpuSeconds() - postgresBefore;
      const machineAfter = machineCpu();
      machineBusy += machineAfter.busy - machineBefore.busy;
      machineTotal += machineAfter.total - machineBefore.total;
      baseRounds.push(await saturate(CLIENTS, seconds, lockedUpdate));
      log(`  round ${r + 1}/${rounds}: ${oursRounds[r].toFixed(0)} steps/s, bare locked update ${baseRounds[r].toFixed(0)}/s`);
    }
    // The same clients on one process: one queue batches all 16 (the row lock is never contended).
    const batchSizeOf = async (server: ServerProcess) => {
      const text = (await call(server.url, 'GET', '/metrics')).body.toString();
      const sample = (name: string) => Number(text.split('\n').find((l) => l.startsWith(`${name} `))?.split(' ')[1] ?? 0);
      return { steps: sample('asgd_step_batch_size_sum'), commits: sample('asgd_step_batch_size_count') };
    };
    const soloLinks: RawConnection[] = [];
    for (let c = 0; c < CLIENTS; c++) soloLinks.push(await RawConnection.open(servers[0].url));
    links.push(...soloLinks);
    const soloRequests = bodies.map((body) => RawConnection.requestBytes(servers[0].url, 'POST', '/v1/sessions/small/step', SAFETENSORS, body));
    const soloStep = async (c: number) => {
      const status = await soloLinks[c].send(soloRequests[c]);
      if (status !== 200) throw new Error(`step: HTTP ${status}`);
    };
    const soloBefore = await batchSizeOf(servers[0]);
    const soloRounds: number[] = [];
    for (let r = 0; r < 2; r++) soloRounds.push(await saturate(CLIENTS, seconds, soloStep));
    const soloAfter = await batchSizeOf(servers[0]);
    const solo = median(soloRounds);
    const ours = median(oursRounds);
    const base = median(baseRounds);
    const version = (await call(servers[0].url, 'GET', '/v1/sessions/small')).json<{ version: number }>().version;
    let batched = -(soloAfter.steps - soloBefore.steps);
    let commits = -(soloAfter.commits - soloBefore.commits);
    for (const server of servers) {
      const counts = await batchSizeOf(server);
      batched += counts.steps;
      commits += counts.commits;
    }
    return {
      key: 'throughput',
      title: `small-model throughput, 1e3 parameters, ${CLIENTS} clients over ${SERVERS} processes, one session`,
      figure: `${ours.toFixed(0)} steps/s`,
      baseline: `${base.toFixed(0)} bare pg locked-row updates/s (${CLIENTS} connections)`,
      ratio: ours / base,
      target: { op: '>=', value: 2 },
      notes: [
        `median of ${rounds} alternating rounds of ${seconds} s each; the session reached version ${version}`,
        `CPU while stepping: the machine was ${((100 * machineBusy) / machineTotal).toFixed(0)}% busy (all cores; clients, servers and PostgreSQL share them); the ${SERVERS} servers used ${((1000 * serverCpu) / oursSteps).toFixed(2)} ms of CPU a step, the ${CLIENTS} clients (this process, raw keep-alive connections) ${((1000 * clientCpu) / oursSteps).toFixed(2)} ms, PostgreSQL ${((1000 * postgresCpu) / oursSteps).toFixed(2)} ms`,
        `group commit: ${(batched / commits).toFixed(2)} steps per commit on average (${batched} steps in ${commits} statements over the ${SERVERS} processes)`,
        `the same ${CLIENTS} clients on one process (${soloRounds.length} rounds after the others): ${solo.toFixed(0)} steps/s = ${(solo / base).toFixed(2)}x the baseline, ${((soloAfter.steps - soloBefore.steps) / (soloAfter.commits - soloBefore.commits)).toFixed(2)} steps per commit (each of ${SERVERS} processes serves about a third of the clients)`,
      ],
    };
  } finally {
    for (const link of links) link.close();
    await Promise.all(connections.map((c) => c.end()));
    await Promise.all(servers.map((s) => s.stop()));
    await db.drop();
  }
}

if (isMain(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name: string) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : undefined);
  const result = await runThroughputBench({ rounds: opt('--rounds'), seconds: opt('--seconds') });
  for (const note of result.notes) console.log(`  ${note}`);
  console.log(describe(result));
}
