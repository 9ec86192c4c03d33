// A first start on a fresh embedded data directory runs PGlite's initdb (17-49 s measured before the
// banner): the operator is told at once, before it begins, and not again on later starts.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { spawnService, type ServiceRun } from './processes.ts';

const SERVER_ENV = { PORT: '0', LOG_LEVEL: 'info', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' };
const INITIALISING = /new embedded database.*first start can take up to a minute/;

const logLines = (run: ServiceRun) =>
  run.output().split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line) as { level: number; msg: string; dataDir?: string; url?: string });

test('the first start on a fresh data directory says at once that it initialises it and may take a minute; a restart does not', { timeout: 300_000 }, async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'asgd-first-start-'));
  t.after(() => rmSync(root, { recursive: true, force: true }));
  const dir = join(root, 'data');

  const first = spawnService(process.execPath, ['src/server.ts'], { ...SERVER_ENV, ASGD_DATA_DIR: dir });
  t.after(() => first.child.kill('SIGKILL'));
  // Within seconds, not after the initialisation it announces.
  const deadline = Date.now() + 15_000;
  while (!logLines(first).some((entry) => INITIALISING.test(entry.msg))) {
    assert.ok(Date.now() < deadline, `no line about initialising within 15 s:\n${first.output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const [line] = logLines(first);
  assert.match(line.msg, INITIALISING, 'the first line the service writes');
  assert.equal(line.level, 30, 'info');
  assert.equal(line.dataDir, dir);
  await first.banner();
  first.child.kill('SIGTERM');
  assert.equal(await first.exited, 0);

  const again = spawnService(process.execPath, ['src/server.ts'], { ...SERVER_ENV, ASGD_DATA_DIR: dir });
  t.after(() => again.child.kill('SIGKILL'));
  await again.banner();
  assert.ok(!logLines(again).some((entry) => INITIALISING.test(entry.msg)), again.output());
  again.child.kill('SIGTERM');
  assert.equal(await again.exited, 0);
});
