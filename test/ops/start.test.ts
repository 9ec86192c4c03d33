// Starting the server as operators do: through a symlinked release path (/srv/app/current -> release), and
// with a setting the process cannot start with (one line saying why, exit 1, no stack trace).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createServer, connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { PG_ADMIN_URL } from '../helper.ts';
import { freePort, spawnService, startServer } from './processes.ts';

const ROOT = resolve(import.meta.dirname, '../..');

test('node <symlinked release>/src/server.ts serves, as from the real path', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-start-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const current = join(dir, 'current');
  symlinkSync(ROOT, current);
  const { run, url } = await startServer(process.execPath, [join(current, 'src/server.ts')], { ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'info' });
  t.after(() => { run.child.kill('SIGTERM'); });
  assert.equal((await fetch(`${url}/healthz`)).status, 200);
});

test('an Idempotency-Key window shorter than a request may take (and a minute) is warned about at start; one that outlasts them is not', async (t) => {
  // An operator's review: with ASGD_IDEMPOTENCY_WINDOW_SECONDS=2 a retry 3 s later was a second step, and nothing said so.
  for (const [env, warned] of [[{ ASGD_IDEMPOTENCY_WINDOW_SECONDS: '2' }, true], [{ ASGD_IDEMPOTENCY_WINDOW_SECONDS: '90', ASGD_REQUEST_TIMEOUT_MS: '20000' }, false]] as const) {
    const { run } = await startServer(process.execPath, ['src/server.ts'], { ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'info', ...env });
    run.child.kill('SIGTERM');
    await run.exited;
    const said = /ASGD_IDEMPOTENCY_WINDOW_SECONDS \(2 s\) is shorter than ASGD_REQUEST_TIMEOUT_MS and a minute \(360 s\): a step or change retried after its key expired is applied again/.test(run.output());
    assert.equal(said, warned, `${JSON.stringify(env)}: ${run.output()}`);
    if (!warned) assert.doesNotMatch(run.output(), /ASGD_IDEMPOTENCY_WINDOW_SECONDS/);
  }
});

test('a server that cannot start says why in one line and exits 1', async (t) => {
  // Nobody listens on port 1 (privileged; the suite's servers listen on ephemeral ports): a port that was
  // free when a test picked it may be taken by another test's server meanwhile, whose silence then reads as
  // a connection timeout, not as the refusal this test is about (a CI run failed so).
  const port = 1;
  const busy = createServer() as ReturnType<typeof createServer> & { port: number };
  await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
  t.after(() => busy.close());
  Object.assign(busy, { port: (busy.address() as { port: number }).port });
  const missing = new URL(PG_ADMIN_URL);
  missing.pathname = '/asgd_no_such_database_for_this_test';
  const cases: [string, Record<string, string>, RegExp][] = [
    ['a database that does not exist', { DATABASE_URL: missing.toString() }, /^asgd-serve: could not start: PostgreSQL: database "asgd_no_such_database_for_this_test" does not exist \(SQLSTATE 3D000\)$/],
    // Waited for (ASGD_DB_START_TIMEOUT_MS), then given up.
    ['a database nobody listens for', { DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/x`, ASGD_DB_START_TIMEOUT_MS: '1500' }, /^asgd-serve: could not start: cannot connect to PostgreSQL: .*ECONNREFUSED.*\(is it running there\? DATABASE_URL\)$/],
    // listen() failing is said as that, naming HOST or PORT, not as a PostgreSQL failure (ENOTFOUND was read as one).
    ['a port already in use', { ASGD_DATA_DIR: 'memory://', PORT: String(busy.port) }, new RegExp(`^asgd-serve: could not start: cannot listen on 127\\.0\\.0\\.1:${busy.port}: .*EADDRINUSE.*; the port is in use \\(PORT\\)$`)],
    // Said before the database is waited for (an operator's review: only after PGlite's first start, or the wait).
    ['a port already in use, the database not up', { DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/x`, ASGD_DB_START_TIMEOUT_MS: '60000', PORT: String(busy.port) },
      new RegExp(`^asgd-serve: could not start: cannot listen on 127\\.0\\.0\\.1:${busy.port}: .*EADDRINUSE.*; the port is in use \\(PORT\\)$`)],
    // (An address, not a name: a name that does not resolve may wait on the resolver's timeouts.)
    ['an address that is not this machine\'s', { ASGD_DATA_DIR: 'memory://', HOST: '192.0.2.1', ASGD_ADMIN_TOKEN: 'x'.repeat(16) }, /^asgd-serve: could not start: cannot listen on 192\.0\.2\.1:0: .*EADDRNOTAVAIL.*; no such address on this machine \(HOST\)$/],
  ];
  for (const [what, env, line] of cases) {
    const run = spawnService(process.execPath, ['src/server.ts'], { PORT: '0', ...env, LOG_LEVEL: 'silent' });
    assert.equal(await run.exited, 1, what);
    const lines = run.output().trim().split('\n');
    assert.equal(lines.length, 1, `${what}: ${run.output()}`);
    assert.match(lines[0], line, what);
  }
});

test('a setting the server cannot take says which in one line and exits 2 (a usage error), before anything starts', async () => {
  for (const [env, line] of [
    [{ PORT: 'abc' }, /^asgd-serve: PORT must be a whole number, got "abc"$/],
    [{ LOG_LEVEL: 'verbose' }, /^asgd-serve: LOG_LEVEL .*verbose/],
  ] as const) {
    const run = spawnService(process.execPath, ['src/server.ts'], { ASGD_DATA_DIR: 'memory://', ...env });
    assert.equal(await run.exited, 2, run.output());
    const lines = run.output().trim().split('\n');
    assert.equal(lines.length, 1, run.output());
    assert.match(lines[0], line);
  }
});

test('a replica started before PostgreSQL accepts connections waits for it (saying so) and serves once it does', async (t) => {
  // PostgreSQL "comes up" when a TCP proxy to it starts listening on the port the replica was given.
  const port = await freePort();
  const target = new URL(PG_ADMIN_URL);
  const url = new URL(PG_ADMIN_URL);
  url.port = String(port);
  const run = spawnService(process.execPath, ['src/server.ts'], { DATABASE_URL: url.toString(), ASGD_DB_START_TIMEOUT_MS: '60000', PORT: '0', LOG_LEVEL: 'info' });
  t.after(() => { run.child.kill('SIGKILL'); });
  const deadline = Date.now() + 20_000;
  while (!/waiting for PostgreSQL/.test(run.output()) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.match(run.output(), /waiting for PostgreSQL \(cannot connect to PostgreSQL: .*ECONNREFUSED/);
  assert.equal(run.child.exitCode, null, 'still running');
  const sockets = new Set<Socket>();
  const proxy = createServer((client) => {
    const upstream = connect(Number(target.port || 5432), target.hostname);
    sockets.add(client).add(upstream);
    client.pipe(upstream).pipe(client);
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
  });
  await new Promise<void>((resolve) => proxy.listen(port, '127.0.0.1', resolve));
  t.after(() => {
    for (const s of sockets) s.destroy();
    proxy.close();
  });
  const banner = await run.banner(30_000);
  assert.equal((await fetch(`${banner.url}/readyz`)).status, 200);
});

for (const [command, said] of [['serve', 'starting: stopped before serving'], ['migrate', 'migrating: stopped']] as const) {
  test(`SIGTERM while \`${command}\` waits for PostgreSQL stops the process at once, also as PID 1 in a container`, async (t) => {
    // Found by operators' reviews: the signal handlers came after the start, and node as PID 1 (no init in
    // the image) ignores a signal it has no handler for: `docker stop` waited its whole grace period; then
    // the same of the compose file's one-shot `migrate`.
    const port = await freePort(); // nothing listens there: the start waits for PostgreSQL
    const url = new URL(PG_ADMIN_URL);
    url.port = String(port);
    const env = { DATABASE_URL: url.toString(), ASGD_DB_START_TIMEOUT_MS: '60000', PORT: '0', LOG_LEVEL: 'info' };
    const args = command === 'serve' ? ['src/server.ts'] : ['bin/asgd-serve.mjs', 'migrate'];
    const pid1 = spawnSync('unshare', ['-fp', '--kill-child', 'true']).status === 0; // root, as CI: a PID namespace
    const run = pid1 ? spawnService('unshare', ['-fp', '--kill-child', process.execPath, ...args], env) : spawnService(process.execPath, args, env);
    t.after(() => { run.child.kill('SIGKILL'); });
    const deadline = Date.now() + 20_000;
    while (!/waiting for PostgreSQL/.test(run.output()) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
    assert.match(run.output(), /waiting for PostgreSQL/);
    // The process itself: unshare's child (PID 1 in its namespace), or the spawned node.
    const server = pid1 ? Number(readFileSync(`/proc/${run.child.pid}/task/${run.child.pid}/children`, 'utf8').trim().split(' ')[0]) : run.child.pid!;
    if (pid1) assert.match(readFileSync(`/proc/${server}/status`, 'utf8'), /^NSpid:\s+\d+\s+1$/m, 'PID 1 in its namespace');
    const sent = Date.now();
    process.kill(server, 'SIGTERM');
    const code = await Promise.race([run.exited, new Promise((resolve) => setTimeout(() => resolve('still running 10 s later'), 10_000))]);
    assert.equal(code, 143, run.output());
    assert.ok(Date.now() - sent < 10_000);
    assert.ok(run.output().includes(`asgd-serve: SIGTERM while ${said}`), run.output());
  });
}
