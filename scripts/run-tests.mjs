#!/usr/bin/env node
// Runs every test/**/*.test.ts with node's test runner; Node 24 runs the TypeScript natively (type
// stripping). We list the files ourselves so that arguments can filter them.
// Extra arguments are file filters: `npm test -- kernel` runs files whose path contains "kernel".
//
// Two files run at once (ASGD_TEST_CONCURRENCY sets how many): each test makes its own database and
// listens on a port of its own, and most of a file's time is waiting (browsers, processes starting,
// backoffs). Each file is its own `node --test` process; its output is printed whole when it ends, with
// its time, so two files' lines never interleave. The slowest files start first (test/durations.json,
// from an earlier run: `--record` rewrites it), so that no long file starts last and runs alone while the
// other slot idles: that tail was ~3 minutes of a CI run.
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
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
const filters = args.filter((a) => a !== '--record');
const files = walk('test').sort().filter((f) => filters.length === 0 || filters.some((p) => f.includes(p)));
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}
const concurrency = Number(process.env.ASGD_TEST_CONCURRENCY ?? 2);
if (!Number.isInteger(concurrency) || concurrency < 1) {
  console.error(`ASGD_TEST_CONCURRENCY must be a whole number >= 1, not ${process.env.ASGD_TEST_CONCURRENCY}`);
  process.exit(1);
}

// Seconds each file took in a recorded run, per database (the embedded one is slower, and not evenly).
const mode = process.env.ASGD_TEST_DB === 'pglite' ? 'pglite' : 'postgres';
const durationsPath = join('test', 'durations.json');
let durations = {};
try {
  durations = JSON.parse(readFileSync(durationsPath, 'utf8'));
} catch {
  // No record yet: alphabetical order.
}
const known = durations[mode] ?? {};
// A file with no record starts first: it may be long, and a short one costs little there.
const expected = (f) => known[f] ?? Infinity;
const queue = [...files].sort((a, b) => expected(b) - expected(a) || a.localeCompare(b));

// Every Node process a test file starts (the file itself, the servers and CLIs it spawns: a few hundred in
// all) keeps its compiled code in one on-disk cache (Node's compile cache, keyed by the source's contents):
// a server's start took about 0.5 s of CPU less of its 2.3 s, measured here.
// In this checkout (not a fixed path in a shared /tmp, where another user could plant code for it).
process.env.NODE_COMPILE_CACHE ??= join(process.cwd(), 'node_modules', '.cache', 'node-compile-cache');

const running = new Set();
const results = [];
const started = Date.now();

// A file that runs past this is stopped and failed, with what it printed, so that a hang (a browser or a
// server that never answers) fails the run in minutes instead of holding CI for good (seen once: a browser
// test waited 21 minutes). The slowest file takes about 100 s; each test also gets --test-timeout.
const FILE_TIMEOUT_S = Number(process.env.ASGD_TEST_FILE_TIMEOUT_S ?? 600);
const TEST_TIMEOUT_MS = Number(process.env.ASGD_TEST_TIMEOUT_MS ?? 300_000);

let fileIndex = 0;

// CPU seconds of the children this process has waited for (with theirs: the servers and browsers a test
// file starts), from /proc (Linux; 0 elsewhere). Read when a file's process ends, the jump is that file's
// CPU: what a run on 2 cores is bound by, where its wall time also counts its waits.
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
 * Drops the PostgreSQL databases a test file's run made and left behind (test/helper.ts names them
 * asgd_test_<tag>_<hex>): a file drops its own when it ends, but not when it crashed or was stopped. The
 * number dropped (0 on the embedded database, or when PostgreSQL cannot be reached: nothing to do here).
 */
async function dropDatabasesOf(tag) {
  if (mode !== 'postgres') return 0;
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

function runFile(file) {
  return new Promise((resolve) => {
    const t0 = Date.now();
    // Its own process group: a timeout stops what it started too (servers, a browser).
    const tag = `r${process.pid}f${fileIndex++}`;
    const child = spawn(process.execPath, ['--test', '--test-reporter=spec', `--test-timeout=${TEST_TIMEOUT_MS}`, file], {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
      env: { ...process.env, ASGD_TEST_DB_TAG: tag },
    });
    running.add(child);
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
    const timer = setTimeout(() => {
      timedOut = true;
      chunks.push(Buffer.from(`\n${file}: still running after ${FILE_TIMEOUT_S} s (ASGD_TEST_FILE_TIMEOUT_S): stopped\n`));
      stop('SIGTERM');
      setTimeout(() => stop('SIGKILL'), 10_000).unref();
    }, FILE_TIMEOUT_S * 1000);
    child.on('close', async (code, signal) => {
      clearTimeout(timer);
      const cpuNow = childCpuSeconds();
      const cpu = cpuNow - cpuSeen;
      cpuSeen = cpuNow;
      if (timedOut) stop('SIGKILL');
      running.delete(child);
      const leftBehind = await dropDatabasesOf(tag);
      if (leftBehind) chunks.push(Buffer.from(`\n${file}: dropped ${leftBehind} test database(s) it left behind\n`));
      const seconds = (Date.now() - t0) / 1000;
      const output = Buffer.concat(chunks).toString('utf8');
      const count = (label) => sumOf(output, label);
      const result = {
        file,
        seconds,
        cpu,
        ok: code === 0 && !timedOut,
        exit: timedOut ? 'timeout' : signal ?? code,
        tests: count('tests'),
        pass: count('pass'),
        fail: count('fail'),
        skipped: count('skipped'),
        todo: count('todo'),
      };
      const status = result.ok ? 'ok' : `FAILED (exit ${result.exit})`;
      process.stdout.write(`\n▶ ${file}: ${status}, ${result.tests} tests, ${seconds.toFixed(1)} s, ${cpu.toFixed(0)} CPU-s\n${output}`);
      resolve(result);
    });
  });
}

// The summary lines of the spec reporter ("ℹ pass 12"); 0 where a file crashed before printing them.
function sumOf(output, label) {
  let n = 0;
  for (const m of output.matchAll(new RegExp(`^ℹ ${label} (\\d+)$`, 'gm'))) n += Number(m[1]);
  return n;
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const child of running) {
      try {
        process.kill(-child.pid, 'SIGTERM');
      } catch {
        // gone already
      }
    }
    process.exit(130);
  });
}

async function worker() {
  for (let file = queue.shift(); file !== undefined; file = queue.shift()) results.push(await runFile(file));
}
await Promise.all(Array.from({ length: Math.min(concurrency, files.length) }, worker));

const total = (key) => results.reduce((n, r) => n + r[key], 0);
const wall = (Date.now() - started) / 1000;
const slowest = [...results].sort((a, b) => b.seconds - a.seconds).slice(0, 10);
console.log(`\n== ${results.length} files, ${concurrency} at a time, ${wall.toFixed(0)} s (${mode})`);
console.log(`slowest: ${slowest.map((r) => `${r.file} ${r.seconds.toFixed(0)} s`).join(', ')}`);
const busiest = [...results].sort((a, b) => b.cpu - a.cpu).slice(0, 10);
console.log(`CPU: ${total('cpu').toFixed(0)} s in all; most: ${busiest.map((r) => `${r.file} ${r.cpu.toFixed(0)} s`).join(', ')}`);
console.log(
  `tests ${total('tests')}, pass ${total('pass')}, fail ${total('fail')}, skipped ${total('skipped')}, todo ${total('todo')}`,
);
const failed = results.filter((r) => !r.ok);
for (const r of failed) console.log(`failed: ${r.file} (exit ${r.exit}, ${r.fail} failing tests)`);

if (record && failed.length === 0) {
  const next = { ...durations, [mode]: { ...known } };
  for (const r of results) next[mode][r.file] = Math.round(r.seconds * 10) / 10;
  // Files that no longer exist leave the record.
  const all = new Set(walk('test'));
  for (const f of Object.keys(next[mode])) if (!all.has(f)) delete next[mode][f];
  next[mode] = Object.fromEntries(Object.entries(next[mode]).sort(([a], [b]) => a.localeCompare(b)));
  writeFileSync(durationsPath, `${JSON.stringify(next, null, 2)}\n`);
  console.log(`recorded ${results.length} durations in ${durationsPath}`);
}
process.exit(failed.length === 0 ? 0 : 1);
