#!/usr/bin/env node
// Runs every test/**/*.test.ts with node's test runner; Node 24 runs the TypeScript natively (type
// stripping). We list the files ourselves so that arguments can filter them.
// Extra arguments are file filters: `npm test -- kernel` runs files whose path contains "kernel".
// `--all` also runs the API tests (test/routes) on the embedded database and the two clients' suites, in
// the same pool (what .ci/run does); `--record` rewrites test/durations.json from a run that passed.
//
// Each file is its own `node --test` process; its output is printed whole when it ends, with its time and
// CPU seconds, so two files' lines never interleave. Each test makes its own database and listens on a port
// of its own, so files can run side by side. How many do is set by CPU, not by a fixed count: most files
// spend much of their time waiting (browsers, processes starting, backoffs, a dashboard's refresh) and a
// few keep a core busy, so a file starts while the CPU the running files use, by an earlier run's record
// (test/durations.json: seconds and CPU seconds of each), leaves room for it within the machine's cores
// (ASGD_TEST_CPUS, default three quarters of them), with at most ASGD_TEST_CONCURRENCY (default 4) at once,
// and two at least (one where ASGD_TEST_CONCURRENCY=1).
// The slowest files start first, so that no long file starts last and runs alone while the rest idles.
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import pg from 'pg';

function walk(dir) {
  const out = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...walk(path));
    else if (path.endsWith('.test.ts')) out.push(path);
  }
  return out;
}

const args = process.argv.slice(2);
const record = args.includes('--record');
const all = args.includes('--all');
const filters = args.filter((a) => !a.startsWith('--'));
const unknown = args.filter((a) => a.startsWith('--') && a !== '--record' && a !== '--all');
if (unknown.length) {
  console.error(`unknown option ${unknown.join(', ')}: the options are --all and --record; other arguments filter files by path`);
  process.exit(2);
}
const wholeNumber = (name, fallback, min) => {
  const raw = process.env[name];
  const n = raw === undefined || raw === '' ? fallback : Number(raw);
  if (!Number.isFinite(n) || n < min || (name !== 'ASGD_TEST_CPUS' && !Number.isInteger(n))) {
    console.error(`${name} must be a ${name === 'ASGD_TEST_CPUS' ? 'number' : 'whole number'} >= ${min}, not ${raw}`);
    process.exit(2);
  }
  return n;
};
const concurrency = wholeNumber('ASGD_TEST_CONCURRENCY', 4, 1);
// The CPU a file's record counts is its own processes' (servers, browsers, CLIs it starts), not that of the
// PostgreSQL server it keeps busy: with files at 1.46 counted cores on average, 2 cores were fully used
// and timing tests failed (a heartbeat thread not run within 300 ms). So 0.75 of the cores by default.
const cpus = wholeNumber('ASGD_TEST_CPUS', 0.75 * availableParallelism(), 0.5);

// A job that runs past this is stopped and failed, with what it printed, so that a hang (a browser or a
// server that never answers) fails the run in minutes instead of holding CI for good (seen once: a browser
// test waited 21 minutes). The slowest file takes about 140 s; each test also gets --test-timeout. A
// client's suite is many files' worth: it gets three times as long.
const FILE_TIMEOUT_S = Number(process.env.ASGD_TEST_FILE_TIMEOUT_S ?? 600);
const TEST_TIMEOUT_MS = Number(process.env.ASGD_TEST_TIMEOUT_MS ?? 300_000);

const matches = (f) => filters.length === 0 || filters.some((p) => f.includes(p));
const files = walk('test').sort().filter(matches);
const mode = process.env.ASGD_TEST_DB === 'pglite' ? 'pglite' : 'postgres';

/** A job: one test file on one database, or a client's whole suite. `key` names it in test/durations.json. */
const jobs = files.map((file) => ({ kind: mode, key: file, file, command: process.execPath, args: testArgs(file), env: {}, cwd: process.cwd() }));
// The API test files `--all` runs again on the embedded database: those whose paths differ there (one
// connection that every request, group commit and background snapshot shares; waits woken in the process
// instead of by LISTEN; rounds' timers; PGlite's own reading of binary results and bytea). The others test
// what is the same on both (parsing, validation, the same SQL) and would add 340 CPU-seconds to a CI run on
// 2 cores that must end within 30 minutes. `ASGD_TEST_DB=pglite npm test -- test/routes` runs them all there.
const EMBEDDED = ['sessions', 'training', 'state-dict', 'group-commit', 'conditional', 'rounds', 'snapshots-in-place', 'history', 'replay', 'half-gradients']
  .map((name) => join('test', 'routes', `${name}.test.ts`));
if (all) {
  // The embedded database runs the API tests (the rest is about PostgreSQL, processes, or no database).
  for (const file of files.filter((f) => EMBEDDED.includes(f))) {
    jobs.push({ kind: 'pglite', key: file, file, command: process.execPath, args: testArgs(file), env: { ASGD_TEST_DB: 'pglite' }, cwd: process.cwd() });
  }
  // The clients' suites, each as one job (they start their own service processes on PostgreSQL).
  jobs.push({ kind: 'clients', key: 'clients/python', file: 'clients/python (/usr/bin/python3 run_tests.py)', command: '/usr/bin/python3', args: ['clients/python/run_tests.py'], env: {}, cwd: process.cwd() });
  jobs.push({ kind: 'clients', key: 'clients/typescript', file: 'clients/typescript (npm test)', command: 'npm', args: ['test'], env: {}, cwd: join(process.cwd(), 'clients', 'typescript') });
}
if (jobs.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}

function testArgs(file) {
  return ['--test', '--test-reporter=spec', `--test-timeout=${TEST_TIMEOUT_MS}`, file];
}

// Seconds and CPU seconds each job took in a recorded run, per kind (the embedded database is slower, and
// not evenly). An older record holds seconds alone.
const durationsPath = join('test', 'durations.json');
let durations = {};
try {
  durations = JSON.parse(readFileSync(durationsPath, 'utf8'));
} catch {
  // No record yet: alphabetical order, one core each.
}
const recorded = (job) => {
  const r = durations[job.kind]?.[job.key];
  return typeof r === 'number' ? { seconds: r } : r ?? {};
};
// A job with no record starts first: it may be long, and a short one costs little there.
const expected = (job) => recorded(job).seconds ?? Infinity;
/** The cores a job keeps busy while it runs, by its record; one where there is none. */
const load = (job) => {
  const { seconds, cpu } = recorded(job);
  return seconds > 0 && cpu >= 0 ? Math.min(Math.max(cpu / seconds, 0.1), cpus) : 1;
};
const queue = [...jobs].sort((a, b) => expected(b) - expected(a) || a.kind.localeCompare(b.kind) || a.key.localeCompare(b.key));

// Every Node process a test file starts (the file itself, the servers and CLIs it spawns: a few hundred in
// all) keeps its compiled code in one on-disk cache (Node's compile cache, keyed by the source's contents):
// a server's start took about 0.5 s of CPU less of its 2.3 s, measured here.
// In this checkout (not a fixed path in a shared /tmp, where another user could plant code for it).
process.env.NODE_COMPILE_CACHE ??= join(process.cwd(), 'node_modules', '.cache', 'node-compile-cache');

const running = new Map(); // child -> its job's load
const results = [];
const started = Date.now();

let jobIndex = 0;

// CPU seconds of the children this process has waited for (with theirs: the servers and browsers a test
// file starts), from /proc (Linux; 0 elsewhere). Read when a job's process ends, the jump is that job's
// CPU (unless two end between reads: rare, and then one is charged with both).
function childCpuSeconds() {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[13]) + Number(fields[14])) / 100; // cutime, cstime (clock ticks: 100 a second)
  } catch {
    return 0;
  }
}
let cpuSeen = childCpuSeconds();

/**
 * Drops the PostgreSQL databases a job's run made and left behind (test/helper.ts names them
 * asgd_test_<tag>_<hex>): a file drops its own when it ends, but not when it crashed or was stopped. The
 * number dropped (0 when PostgreSQL cannot be reached: nothing to do here).
 */
async function dropDatabasesOf(tag) {
  const client = new pg.Client({ connectionString: process.env.ASGD_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432/postgres' });
  try {
    await client.connect();
    const prefix = `asgd_test_${tag}_`;
    const { rows } = await client.query('SELECT datname FROM pg_database WHERE left(datname, $1) = $2', [prefix.length, prefix]);
    for (const { datname } of rows) await client.query(`DROP DATABASE IF EXISTS "${datname}" WITH (FORCE)`);
    return rows.length;
  } catch {
    return 0;
  } finally {
    await client.end().catch(() => {});
  }
}

function runJob(job) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    // Its own process group: a timeout stops what it started too (servers, a browser).
    const tag = `r${process.pid}f${jobIndex++}`;
    const child = spawn(job.command, job.args, {
      cwd: job.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
      env: { ...process.env, ...job.env, ASGD_TEST_DB_TAG: tag },
    });
    running.set(child, load(job));
    const chunks = [];
    child.stdout.on('data', (c) => chunks.push(c));
    child.stderr.on('data', (c) => chunks.push(c));
    let timedOut = false;
    const stop = (signal) => {
      try {
        process.kill(-child.pid, signal);
      } catch {
        // gone already
      }
    };
    const limit = job.kind === 'clients' ? 3 * FILE_TIMEOUT_S : FILE_TIMEOUT_S;
    const timer = setTimeout(() => {
      timedOut = true;
      chunks.push(Buffer.from(`\n${job.file}: still running after ${limit} s (ASGD_TEST_FILE_TIMEOUT_S): stopped\n`));
      stop('SIGTERM');
      setTimeout(() => stop('SIGKILL'), 10_000).unref();
    }, limit * 1000);
    child.on('error', (error) => chunks.push(Buffer.from(`\n${job.file}: could not start ${job.command}: ${error.message}\n`)));
    child.on('close', async (code, signal) => {
      clearTimeout(timer);
      const cpuNow = childCpuSeconds();
      const cpu = cpuNow - cpuSeen;
      cpuSeen = cpuNow;
      if (timedOut) stop('SIGKILL');
      running.delete(child);
      const leftBehind = await dropDatabasesOf(tag);
      if (leftBehind) chunks.push(Buffer.from(`\n${job.file}: dropped ${leftBehind} test database(s) it left behind\n`));
      const seconds = (Date.now() - t0) / 1000;
      const output = Buffer.concat(chunks).toString('utf8');
      const counts = countsOf(output);
      const result = { job, seconds, cpu, ok: code === 0 && !timedOut, exit: timedOut ? 'timeout' : signal ?? code, ...counts };
      const status = result.ok ? 'ok' : `FAILED (exit ${result.exit})`;
      const on = job.kind === 'pglite' ? ' on PGlite' : '';
      process.stdout.write(`\n▶ ${job.file}${on}: ${status}, ${result.tests} tests, ${seconds.toFixed(1)} s, ${cpu.toFixed(0)} CPU-s\n${output}`);
      resolve(result);
    });
  });
}

// The summary lines of the spec reporter ("ℹ pass 12"), or the Python suite's "python: N passed, N failed,
// N skipped"; 0 where a job crashed before printing them.
function countsOf(output) {
  const sum = (label) => {
    let n = 0;
    for (const m of output.matchAll(new RegExp(`^ℹ ${label} (\\d+)$`, 'gm'))) n += Number(m[1]);
    return n;
  };
  const counts = { tests: sum('tests'), pass: sum('pass'), fail: sum('fail'), skipped: sum('skipped'), todo: sum('todo') };
  const python = /^python: (\d+) passed, (\d+) failed, (\d+) skipped$/m.exec(output);
  if (python) {
    const [pass, fail, skipped] = python.slice(1).map(Number);
    counts.pass += pass;
    counts.fail += fail;
    counts.skipped += skipped;
    counts.tests += pass + fail + skipped;
  }
  return counts;
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const child of running.keys()) {
      try {
        process.kill(-child.pid, 'SIGTERM');
      } catch {
        // gone already
      }
    }
    process.exit(130);
  });
}

/**
 * The next job to start now, taken from the queue, or none: the longest while fewer than `floor` run (two,
 * as before the CPU was counted: a file that keeps a core busy must not leave the other idle), then the
 * longest that fits in the CPU left.
 */
const floor = Math.min(2, concurrency);
function next() {
  if (running.size >= concurrency) return undefined;
  let busy = 0;
  for (const l of running.values()) busy += l;
  const i = running.size < floor ? 0 : queue.findIndex((job) => busy + load(job) <= cpus + 1e-9);
  return i < 0 ? undefined : queue.splice(i, 1)[0];
}

await new Promise((done) => {
  const fill = () => {
    for (let job = next(); job !== undefined; job = next()) {
      runJob(job).then((result) => {
        results.push(result);
        // Done when every job has its result: a job leaves `running` before it drops its databases and
        // reports, so "nothing queued, nothing running" was also true while the last short one did that, and
        // the run ended without it (its output and its failure, had it failed, never counted: a CI run
        // summed 114 of 115 jobs).
        if (results.length === jobs.length) done();
        else fill();
      });
    }
  };
  fill();
});

const total = (key) => results.reduce((n, r) => n + r[key], 0);
const wall = (Date.now() - started) / 1000;
const slowest = [...results].sort((a, b) => b.seconds - a.seconds).slice(0, 10);
const name = (r) => `${r.job.file}${r.job.kind === 'pglite' ? ' (PGlite)' : ''}`;
const kinds = [...new Set(results.map((r) => r.job.kind))].join(', ');
console.log(`\n== ${results.length} jobs (${kinds}), up to ${concurrency} at a time within ${cpus} CPUs, ${wall.toFixed(0)} s`);
console.log(`slowest: ${slowest.map((r) => `${name(r)} ${r.seconds.toFixed(0)} s`).join(', ')}`);
const busiest = [...results].sort((a, b) => b.cpu - a.cpu).slice(0, 10);
console.log(`CPU: ${total('cpu').toFixed(0)} s in all (${(total('cpu') / wall).toFixed(2)} cores on average); most: ${busiest.map((r) => `${name(r)} ${r.cpu.toFixed(0)} s`).join(', ')}`);
console.log(`tests ${total('tests')}, pass ${total('pass')}, fail ${total('fail')}, skipped ${total('skipped')}, todo ${total('todo')}`);
const failed = results.filter((r) => !r.ok);
for (const r of failed) console.log(`failed: ${name(r)} (exit ${r.exit}, ${r.fail} failing tests)`);

if (record && failed.length === 0) {
  const next = { ...durations };
  for (const r of results) {
    next[r.job.kind] = { ...next[r.job.kind], [r.job.key]: { seconds: Math.round(r.seconds * 10) / 10, cpu: Math.round(r.cpu * 10) / 10 } };
  }
  // Files that no longer exist leave the record.
  const exists = new Set([...walk('test'), 'clients/python', 'clients/typescript']);
  for (const kind of Object.keys(next)) {
    next[kind] = Object.fromEntries(Object.entries(next[kind]).filter(([key]) => exists.has(key)).sort(([a], [b]) => a.localeCompare(b)));
  }
  writeFileSync(durationsPath, `${JSON.stringify(next, null, 2)}\n`);
  console.log(`recorded ${results.length} durations in ${durationsPath}`);
}
process.exit(failed.length === 0 ? 0 : 1);
