// The README's example runs against a live service, twice: the second run continues the first's session.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import test from 'node:test';
import { fileURLToPath } from 'node:url';
import { liveService, uniqueName } from './service.ts';

const EXAMPLE = fileURLToPath(new URL('../examples/train.ts', import.meta.url));

test('examples/train.ts trains through the service and continues where it left off', async () => {
  const { url, client } = await liveService();
  const session = uniqueName('example');
  const run = () => spawnSync(process.execPath, [EXAMPLE], { env: { ...process.env, ASGD_URL: url, ASGD_SESSION: session, EPOCHS: '3' }, encoding: 'utf8' });
  const first = run();
  assert.equal(first.status, 0, first.stderr);
  assert.match(first.stdout, /session .*: version 1, step 0/);
  assert.match(first.stdout, /epoch 3\/3: loss/);
  const second = run();
  assert.equal(second.status, 0, second.stderr);
  assert.match(second.stdout, /version 25, step 24/); // 3 epochs of 8 batches before it
  assert.equal((await client.getSession(session)).step, 48);
  const losses = [...(first.stdout + second.stdout).matchAll(/epoch \d+\/3: loss ([0-9.]+)/g)].map((m) => Number(m[1]));
  assert.ok(losses[losses.length - 1] < losses[0], `the loss fell: ${losses}`);
});
