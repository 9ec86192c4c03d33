// Starting the server as operators do: through a symlinked release path (/srv/app/current -> release), and
// with a setting the process cannot start with (one line saying why, exit 1, no stack trace).
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
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

test('a server that cannot start says why in one line and exits 1', async () => {
  const port = await freePort();
  const missing = new URL(PG_ADMIN_URL);
  missing.pathname = '/asgd_no_such_database_for_this_test';
  const cases: [string, Record<string, string>, RegExp][] = [
    ['a database that does not exist', { DATABASE_URL: missing.toString() }, /^asgd-serve: could not start: PostgreSQL: database "asgd_no_such_database_for_this_test" does not exist \(SQLSTATE 3D000\)$/],
    ['a database nobody listens for', { DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/x` }, /^asgd-serve: could not start: cannot connect to PostgreSQL: .*ECONNREFUSED.*\(is it running there\? DATABASE_URL\)$/],
  ];
  for (const [what, env, line] of cases) {
    const run = spawnService(process.execPath, ['src/server.ts'], { ...env, PORT: '0', LOG_LEVEL: 'silent' });
    assert.equal(await run.exited, 1, what);
    const lines = run.output().trim().split('\n');
    assert.equal(lines.length, 1, `${what}: ${run.output()}`);
    assert.match(lines[0], line, what);
  }
});
