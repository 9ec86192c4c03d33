// No unused files, exports or dependencies (knip, configured in knip.jsonc, where each exception says why).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';

test('knip finds no unused files, exports or dependencies', () => {
  const run = spawnSync(join('node_modules', '.bin', 'knip'), ['--no-progress', '--reporter', 'compact'], { encoding: 'utf8', timeout: 300_000 });
  assert.equal(run.error, undefined, String(run.error));
  assert.equal(`${run.stdout}${run.stderr}`.trim(), '', 'knip reports unused code: remove it, or list it in knip.jsonc with why');
  assert.equal(run.status, 0);
});
