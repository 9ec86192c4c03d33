// The container HEALTHCHECK (bin/healthcheck.mjs) reaches the service wherever HOST binds it: a specific
// interface address, a wildcard, IPv6. Against a stand-in that answers /healthz as the service does.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:http';
import { test } from 'node:test';

async function serveHealthz(host: string): Promise<{ port: number; close(): void }> {
  const server = createServer((req, res) => res.writeHead(req.url === '/healthz' ? 200 : 404).end());
  server.listen(0, host);
  await once(server, 'listening');
  return { port: (server.address() as { port: number }).port, close: () => server.close() };
}

/** Runs the check as Docker does (exit code, stderr); not spawnSync: the stand-in serves from this process. */
const healthcheck = (env: Record<string, string>) =>
  new Promise<{ status: number | null; stderr: string }>((resolve) => {
    execFile(process.execPath, ['bin/healthcheck.mjs'], { env: { PATH: process.env.PATH ?? '', ...env }, timeout: 10_000 }, (err, _stdout, stderr) =>
      resolve({ status: err ? (typeof err.code === 'number' ? err.code : null) : 0, stderr }));
  });

test('the health check passes for a service bound to one address (HOST=127.0.0.2), a wildcard, or IPv6 loopback', async (t) => {
  for (const host of ['127.0.0.2', '0.0.0.0', '::', '::1']) {
    const service = await serveHealthz(host);
    t.after(() => service.close());
    const run = await healthcheck({ HOST: host, PORT: String(service.port) });
    assert.equal(run.status, 0, `HOST=${host}: ${run.stderr}`);
  }
});

test('control: the health check fails when nothing answers at HOST:PORT', async (t) => {
  const service = await serveHealthz('127.0.0.1');
  t.after(() => service.close());
  const run = await healthcheck({ HOST: '127.0.0.2', PORT: String(service.port) });
  assert.equal(run.status, 1);
  assert.match(run.stderr, /127\.0\.0\.2/);
});

test('a --port and --host the service was started with (the container\'s command) override PORT and HOST, as in the service', async (t) => {
  // An operator's review: `command: ["serve", "--port", "9090"]` was probed on PORT's 8080 and the container
  // marked unhealthy. The check reads the main process's command line (PID 1 in a container; here a process
  // with the same command line, named by ASGD_HEALTHCHECK_PID).
  const service = await serveHealthz('127.0.0.2');
  t.after(() => service.close());
  for (const args of [['serve', '--port', String(service.port), '--host', '127.0.0.2'], ['serve', `--port=${service.port}`, '--host=127.0.0.2']]) {
    const main = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)', 'bin/asgd-serve.mjs', ...args], { stdio: 'ignore' });
    t.after(() => main.kill());
    await once(main, 'spawn');
    const run = await healthcheck({ ASGD_HEALTHCHECK_PID: String(main.pid), PORT: '1', HOST: '127.0.0.1' });
    assert.equal(run.status, 0, `${args.join(' ')}: ${run.stderr}`);
  }
  // A process that is not the service (a shell as PID 1): PORT and HOST decide, as before.
  const other = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)', 'other.js', '--port', String(service.port)], { stdio: 'ignore' });
  t.after(() => other.kill());
  await once(other, 'spawn');
  assert.equal((await healthcheck({ ASGD_HEALTHCHECK_PID: String(other.pid), PORT: String(service.port), HOST: '127.0.0.2' })).status, 0);
  assert.equal((await healthcheck({ ASGD_HEALTHCHECK_PID: String(other.pid), PORT: '1', HOST: '127.0.0.2' })).status, 1);
});
