// `npm start` as a process manager runs it (supervisord, a simple systemd unit, `kill <pid>`): npm's child
// is the server itself, SIGTERM to npm's pid stops it cleanly with in-flight steps answered, and a server
// whose npm died without relaying the signal does not stay behind as an orphan.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { LOCK_FILE } from '../../src/db/data-dir-lock.ts';
import { listening, running, startServer, waitFor } from './processes.ts';
import { startScriptNodeOptions, startScriptTunables } from './support.ts';

const SHUTDOWN_TIMEOUT_MS = 20_000;

const parentOf = (pid: number) => Number(readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')[1]);

async function startNpm(t: { after(fn: () => void): void }) {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-npm-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const { run: npm, port, url, pid } = await startServer('npm', ['start'], {
    ASGD_DATA_DIR: join(dir, 'data'),
    LOG_LEVEL: 'info',
    ASGD_SHUTDOWN_TIMEOUT_MS: String(SHUTDOWN_TIMEOUT_MS),
    ASGD_HEALTH_CHECK_INTERVAL_MS: '0',
  });
  t.after(() => {
    if (running(pid)) process.kill(pid, 'SIGKILL');
    npm.child.kill('SIGKILL');
  });
  return { npm, port, server: pid, url, dataDir: join(dir, 'data') };
}

/** A step whose headers and first half of the body are sent; `finish()` sends the rest and reads the answer. */
function stepInFlight(port: number, session: string, seed: number) {
  const body = JSON.stringify({ grads: { w: [seed, -seed, seed / 2, 1] } });
  const socket: Socket = connect(port, '127.0.0.1');
  let answer = '';
  socket.on('data', (d) => { answer += d; });
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.write(`POST /v1/sessions/${session}/step HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 10)}`);
  return {
    async finish(): Promise<{ status: number; body: Record<string, unknown> }> {
      socket.end(body.slice(10));
      await closed;
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1]);
      return { status, body: JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4) || '{}') };
    },
  };
}

test('SIGTERM to the pid of `npm start`: the steps in flight are answered, the port and the data directory are freed within the shutdown timeout', { timeout: 240_000 }, async (t) => {
  const { npm, port, server, url, dataDir } = await startNpm(t);
  // One node process under npm: no shell, no runtime compiler in between.
  assert.equal(parentOf(server), npm.child.pid, 'the server is npm\'s own child');
  // With malloc's settings for big steps (README "Configuration"): the ones the Docker image runs with too
  // (and the benchmarks' servers, which read them from the script).
  const tunables = startScriptTunables()!;
  assert.ok(readFileSync('Dockerfile', 'utf8').split('\n').some((line) => line.trim().replace(/\s*\\$/, '') === `GLIBC_TUNABLES=${tunables}`), 'the Dockerfile sets them');
  // The server started with them: glibc parses the variable in place at start-up, so the process's own copy
  // reads as its first setting (ld.so --list-tunables shows both in force).
  const environ = readFileSync(`/proc/${server}/environ`, 'latin1').split('\0');
  const seen = environ.find((v) => v.startsWith('GLIBC_TUNABLES='));
  assert.ok(seen && `GLIBC_TUNABLES=${tunables}`.startsWith(seen) && seen.includes('mmap_threshold'), seen ?? 'no GLIBC_TUNABLES');
  // And V8's young generation bounded (README "Configuration"), before any NODE_OPTIONS of the caller's.
  const nodeOptions = environ.find((v) => v.startsWith('NODE_OPTIONS='));
  assert.ok(nodeOptions?.startsWith(`NODE_OPTIONS=${startScriptNodeOptions()}`), nodeOptions ?? 'no NODE_OPTIONS');
  const created = await fetch(`${url}/v1/sessions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name: 'inflight', params: [{ name: 'w', shape: [4], data: [1, 2, 3, 4] }] }),
  });
  assert.equal(created.status, 201, await created.text());

  const steps = [1, 2, 3].map((seed) => stepInFlight(port, 'inflight', seed));
  await new Promise((r) => setTimeout(r, 300)); // the requests have arrived, their bodies have not
  const signalled = Date.now();
  npm.child.kill('SIGTERM');
  await waitFor('the server begins closing', () => npm.output().includes('closing: finishing in-flight requests'), 10_000);

  const answers = await Promise.all(steps.map((s) => s.finish()));
  for (const answer of answers) assert.equal(answer.status, 200, JSON.stringify(answer.body));
  assert.deepEqual(answers.map((a) => a.body.step).sort(), [1, 2, 3], 'each step in flight was applied once and answered');

  assert.equal(await npm.exited, 0, npm.output());
  const elapsed = Date.now() - signalled;
  assert.ok(elapsed < SHUTDOWN_TIMEOUT_MS, `stopped in ${elapsed} ms`);
  assert.equal(running(server), false, 'the server process is gone');
  assert.equal(await listening(port), false, 'the port is free');
  assert.ok(!existsSync(join(dataDir, LOCK_FILE)), 'the data directory is released');
  assert.match(npm.output(), /"msg":"closed"/);
  // The snapshot the shutdown wrote of the stepped session is said, as background ones are.
  assert.match(npm.output(), /"session":"inflight","version":4,"reason":"shutdown","msg":"snapshot written"/);
  t.diagnostic(`SIGTERM to exit: ${elapsed} ms`);
});

test('kill -9 of npm: the server notices its parent is gone and shuts down instead of serving as an orphan', { timeout: 240_000 }, async (t) => {
  const { npm, port, server } = await startNpm(t);
  npm.child.kill('SIGKILL');
  const took = await waitFor('the orphaned server exits', () => !running(server), SHUTDOWN_TIMEOUT_MS);
  assert.equal(await listening(port), false);
  t.diagnostic(`orphan gone after ${took} ms`);
});
