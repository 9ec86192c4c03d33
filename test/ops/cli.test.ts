// The commands the Dockerfile and docker-compose.yml run, run here the same way: bin/asgd-serve.mjs
// migrate, bin/asgd-serve.mjs serve, bin/healthcheck.mjs.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import pg from 'pg';
import { createTestDatabase, TEST_DB_KIND } from '../helper.ts';
import { FLAGS, flagName, main, parseArgs } from '../../src/cli.ts';
import { ADMIN } from './support.ts';

const BIN = 'bin/asgd-serve.mjs';

interface Run { code: number | null; stdout: string; stderr: string }

/** Runs a command to its end with a clean environment plus `env`. */
function run(args: string[], env: Record<string, string> = {}, timeoutMs = 60_000): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => { stdout += d; });
    child.stderr.on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** main() in this process, its output captured. */
async function runHere(argv: string[], env: Record<string, string> = {}): Promise<Run> {
  const out = { stdout: '', stderr: '' };
  const code = await main(argv, env, { stdout: { write: (s: string) => (out.stdout += s) }, stderr: { write: (s: string) => (out.stderr += s) } });
  return { code, ...out };
}

test('--help lists a flag for every variable src/config.ts reads; 0.0.0.0 without a token is refused with exit code 2', async () => {
  const source = readFileSync('src/config.ts', 'utf8');
  const read = new Set([...source.matchAll(/env(?:\.|, ')([A-Z][A-Z0-9_]+)/g)].map((m) => m[1]));
  assert.ok(read.size >= 25, [...read].join());
  const flagged = new Set(FLAGS.map((f) => f.env));
  for (const key of read) assert.ok(flagged.has(key), `${key} has no CLI flag: add it to FLAGS in src/cli.ts`);
  for (const key of flagged) assert.ok(read.has(key), `${key} is a flag but config.ts does not read it`);

  // The real executable, as a container runs it.
  const [help, fromEnv, fromFlag] = await Promise.all([
    run([BIN, '--help']),
    run([BIN], { HOST: '0.0.0.0' }),
    run([BIN, 'serve', '--host', '0.0.0.0'], { HOST: '127.0.0.1' }),
  ]);
  assert.equal(help.code, 0, help.stderr);
  for (const f of FLAGS) assert.match(help.stdout, new RegExp(`${flagName(f.env)}\\b.*\\[${f.env}\\]`));
  assert.match(help.stdout, /serve .*\n.*migrate/);
  for (const r of [fromEnv, fromFlag]) {
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /refusing to listen on 0\.0\.0\.0 without authentication: set ASGD_ADMIN_TOKEN/);
  }
});

test('flags override the environment; bad flags and values exit 2', async () => {
  const { command, env } = parseArgs(['migrate', '--host', '0.0.0.0', '--allow-insecure', '--port=9', '--fma=false'], { HOST: '127.0.0.1', PORT: '1' });
  assert.equal(command, 'migrate');
  assert.deepEqual([env.HOST, env.PORT, env.ASGD_ALLOW_INSECURE, env.ASGD_FMA], ['0.0.0.0', '9', 'true', 'false']);
  assert.equal(parseArgs([], {}).command, 'serve');
  assert.throws(() => parseArgs(['--port'], {}), /needs a value/);
  assert.throws(() => parseArgs(['start'], {}), /unknown command/);
  const shortToken = await runHere(['--host', '0.0.0.0', '--admin-token', 'too-short']);
  assert.equal(shortToken.code, 2);
  assert.match(shortToken.stderr, /ASGD_ADMIN_TOKEN must be at least 16 characters/);
  const unknownFlag = await runHere(['serve', '--no-such-flag']);
  assert.equal(unknownFlag.code, 2);
  assert.match(unknownFlag.stderr, /unknown option --no-such-flag/);
  const badPort = await runHere(['--port', 'eighty']);
  assert.equal(badPort.code, 2);
  assert.match(badPort.stderr, /PORT must be a whole number/);
  const unreachable = await runHere(['migrate', '--database-url', 'postgres://postgres@127.0.0.1:1/none']);
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.stderr, /migrate failed/);
});

test('migrate, then serve: ready, guarded, healthy, and a clean exit on SIGTERM (the compose sequence)', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('runs against PostgreSQL');
  const db = await createTestDatabase();
  t.after(() => db.drop());

  const migrated = await run([BIN, 'migrate'], { DATABASE_URL: db.url });
  assert.equal(migrated.code, 0, migrated.stderr);
  assert.match(migrated.stdout, /migrations applied \(PostgreSQL\)/);
  const again = await runHere(['migrate', '--database-url', db.url]);
  assert.equal(again.code, 0, 'migrating twice is harmless');
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  const tables = (await client.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")).rows.map((r) => r.tablename);
  await client.end();
  assert.ok(['sessions', 'snapshots', 'step_log', 'tokens'].every((name) => tables.includes(name)), tables.join());

  const child = spawn(process.execPath, [BIN, 'serve', '--port', '0', '--log-level', 'info'], {
    env: { PATH: process.env.PATH ?? '', DATABASE_URL: db.url, ASGD_ADMIN_TOKEN: ADMIN, HOST: '127.0.0.1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line: ${output} ${stderr}`)), 30_000);
    child.stdout.on('data', (d) => {
      output += d;
      const m = /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(output);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
  });
  const base = `http://127.0.0.1:${port}`;
  assert.equal((await fetch(`${base}/healthz`)).status, 200);
  assert.equal((await fetch(`${base}/readyz`)).status, 200);
  assert.equal((await fetch(`${base}/v1/sessions`)).status, 401);
  assert.equal((await fetch(`${base}/v1/sessions`, { headers: { authorization: `Bearer ${ADMIN}` } })).status, 200);
  const healthy = await run(['bin/healthcheck.mjs'], { PORT: String(port) });
  assert.equal(healthy.code, 0, healthy.stderr);

  child.kill('SIGTERM');
  assert.equal(await exited, 0, stderr);
  assert.match(output, /"msg":"closing: finishing in-flight requests"/);
  assert.match(output, /"msg":"closed"/);
  assert.ok(!output.includes(ADMIN), 'the admin token is not logged');
  const down = await run(['bin/healthcheck.mjs'], { PORT: String(port) });
  assert.equal(down.code, 1);
  assert.match(down.stderr, /ECONNREFUSED/);
});
