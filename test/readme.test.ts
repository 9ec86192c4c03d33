// The README's first command and its curl walk-through, run as written against a freshly started
// service on its embedded database (only the port differs).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

test('the README walk-through works as written on the embedded database', { timeout: 180_000 }, async (t) => {
  if (spawnSync('curl', ['--version']).status !== 0) {
    if (process.env.CI) throw new Error('curl is required in CI');
    return t.skip('curl is not installed');
  }
  const readme = readFileSync('README.md', 'utf8');
  assert.match(readme, /npm ci && npm start/);
  const section = readme.slice(readme.indexOf('## Walk-through with curl'));
  const script = /```sh\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(script && script.includes('curl'), 'the README has a curl walk-through');

  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'asgd-readme-'));
  // `npm start` is `node src/server.ts`; the same here, with the README's defaults.
  const server = spawn(process.execPath, ['src/server.ts'], {
    env: { ...process.env, PORT: String(port), ASGD_DATA_DIR: join(dir, 'data'), LOG_LEVEL: 'warn', DATABASE_URL: '' },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  t.after(() => {
    server.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  });
  const deadline = Date.now() + 120_000;
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) break;
    } catch {
      // not listening yet
    }
    assert.ok(Date.now() < deadline, 'the service started');
    await new Promise((r) => setTimeout(r, 250));
  }

  const run = spawnSync('bash', ['-euo', 'pipefail', '-c', script.replaceAll('localhost:8080', `localhost:${port}`)], { cwd: dir, encoding: 'utf8' });
  assert.equal(run.status, 0, run.stderr);
  assert.ok(run.stdout.includes('"name":"demo","version":1'), run.stdout);
  assert.ok(run.stdout.includes('{"session":"demo","step":1,"version":2,"staleness":0}'), run.stdout);
  // The restore brought the state_dict saved after step 1 back, as version 4.
  const sd = JSON.parse(readFileSync(join(dir, 'sd.json'), 'utf8'));
  assert.deepEqual(Object.keys(sd.state), ['0', '1']);
  const now = await (await fetch(`http://127.0.0.1:${port}/v1/sessions/demo/state_dict`)).json();
  assert.deepEqual(now, sd);
  const session = await (await fetch(`http://127.0.0.1:${port}/v1/sessions/demo`)).json();
  assert.equal(session.version, 4);
  assert.equal(session.step, 2);
  // sd.pt is a torch.save file (a zip)
  assert.equal(readFileSync(join(dir, 'sd.pt')).subarray(0, 2).toString(), 'PK');
});
