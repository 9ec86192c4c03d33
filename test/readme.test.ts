// The README's first command and its curl walk-through, run as written against a freshly started
// service on its embedded database (only the port differs).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { startServer } from './ops/processes.ts';

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

  const dir = mkdtempSync(join(tmpdir(), 'asgd-readme-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // `npm start` is `node src/server.ts`; the same here, with the README's defaults (no DATABASE_URL).
  const { run: server, port } = await startServer(process.execPath, ['src/server.ts'], { ASGD_DATA_DIR: join(dir, 'data'), LOG_LEVEL: 'info' });
  t.after(() => { server.child.kill('SIGTERM'); });

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
  assert.equal(session.step, 1); // the loaded state's: one optimizer step
  // sd.pt is a torch.save file (a zip)
  assert.equal(readFileSync(join(dir, 'sd.pt')).subarray(0, 2).toString(), 'PK');
});
