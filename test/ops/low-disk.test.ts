// An embedded database low on disk (below ASGD_MIN_FREE_BYTES): what frees space or writes a few bytes still
// goes through, new data is refused. Its own file (process): the file of the other disk tests opens many
// PGlite instances, and one more there met a V8 fatal error freeing WebAssembly code in CI.
import assert from 'node:assert/strict';
import nodeFs, { mkdtempSync, rmSync } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { buildApp } from '../../src/app.ts';
import { testConfig } from '../helper.ts';
import { ADMIN, asAdmin, bearer } from './support.ts';

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-lowdisk-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('an embedded database low on disk still deletes a session that fits the room, revokes a token and takes a settings PATCH or an unpin; new data is refused, and a session whose delete would need more room than there is', { timeout: 300_000 }, async (t) => {
  // Found by an operator's review: below ASGD_MIN_FREE_BYTES every write was 507, DELETE and a token's
  // revocation included: space could not be freed through the API, nor a leaked token revoked.
  const dir = join(tempDir(t), 'data');
  const env = { ASGD_DATA_DIR: dir, ASGD_ADMIN_TOKEN: ADMIN };
  const roomy = await buildApp({ config: testConfig(env), migrate: true, logger: false });
  const n = 1_000_000; // a state of 8 MB: its delete needs more than the 1 MiB of room below
  for (const [name, size] of [['small', 2], ['other', 2], ['big', n], ['m1', 70_000], ['m2', 70_000]] as const) {
    const res = await roomy.inject({ method: 'POST', url: '/v1/sessions', headers: asAdmin, payload: { name, params: [{ name: 'w', shape: [size], data: Array.from({ length: size }, (_, i) => i % 7) }] } });
    assert.equal(res.statusCode, 201, res.body);
  }
  const snapshot = (await roomy.inject({ method: 'POST', url: '/v1/sessions/other/snapshots', headers: asAdmin, payload: { pinned: true } })).json();
  const token = await roomy.inject({ method: 'POST', url: '/v1/tokens', headers: asAdmin, payload: { name: 'leaked', scope: 'step' } });
  assert.equal(token.statusCode, 201, token.body);
  await roomy.close();

  const minFree = 1024 ** 3;
  const realStatfs = nodeFs.statfsSync;
  const dataDir = resolve(dir);
  t.mock.method(nodeFs, 'statfsSync', ((path: string, options?: { bigint?: false }) => {
    const real = realStatfs(path, options);
    return resolve(String(path)).startsWith(dataDir) ? { ...real, bavail: Math.floor((minFree / 2 + 1024 * 1024) / real.bsize) } : real;
  }) as typeof nodeFs.statfsSync);
  syncBuiltinESMExports();
  t.after(() => {
    t.mock.restoreAll();
    syncBuiltinESMExports();
  });
  const tight = await buildApp({ config: testConfig({ ...env, ASGD_MIN_FREE_BYTES: String(minFree) }), migrate: true, logger: false });
  t.after(() => tight.close());
  // /metrics shows what the guard sees.
  const metrics = (await tight.inject({ url: '/metrics', headers: asAdmin })).body;
  const bsize = realStatfs(dir).bsize;
  assert.match(metrics, new RegExp(`^asgd_data_dir_free_bytes ${Math.floor((minFree / 2 + 1024 * 1024) / bsize) * bsize}$`, 'm'));
  assert.match(metrics, new RegExp(`^asgd_data_dir_min_free_bytes ${minFree}$`, 'm'));
  const step = await tight.inject({ method: 'POST', url: '/v1/sessions/small/step', headers: asAdmin, payload: { grads: { w: [1, 1] } } });
  assert.equal(step.statusCode, 507, step.body);
  const settings = await tight.inject({ method: 'PATCH', url: '/v1/sessions/other', headers: asAdmin, payload: { keep_snapshots: 1 } });
  assert.equal(settings.statusCode, 200, settings.body);
  const unpin = await tight.inject({ method: 'PATCH', url: `/v1/sessions/other/snapshots/${snapshot.id}`, headers: asAdmin, payload: { pinned: false } });
  assert.equal(unpin.statusCode, 200, unpin.body);
  const revoked = await tight.inject({ method: 'DELETE', url: `/v1/tokens/${token.json().id}`, headers: asAdmin });
  assert.ok(revoked.statusCode < 300, revoked.body);
  assert.equal((await tight.inject({ url: '/v1/sessions', headers: bearer(token.json().token) })).statusCode, 401, 'the token is revoked');
  const deleted = await tight.inject({ method: 'DELETE', url: '/v1/sessions/small', headers: asAdmin });
  assert.ok(deleted.statusCode < 300, deleted.body);
  assert.equal((await tight.inject({ url: '/v1/sessions/small', headers: asAdmin })).statusCode, 404);
  // Two deletes at once count together (a review: five at once each passed against the same free space):
  // each session's ~0.6 MB fits the 1 MiB of room, both do not; the one refused goes through once the other is done.
  const pair = await Promise.all(['m1', 'm2'].map((name) => tight.inject({ method: 'DELETE', url: `/v1/sessions/${name}`, headers: asAdmin })));
  assert.deepEqual(pair.map((r) => r.statusCode).sort(), [204, 507], pair.map((r) => r.body).join(' '));
  const refused = pair[0].statusCode === 507 ? 'm1' : 'm2';
  assert.equal((await tight.inject({ method: 'DELETE', url: `/v1/sessions/${refused}`, headers: asAdmin })).statusCode, 204);
  // The big session's delete would write WAL for its 8 MB of pages: more than the room.
  const big = await tight.inject({ method: 'DELETE', url: '/v1/sessions/big', headers: asAdmin });
  assert.equal(big.statusCode, 507, big.body);
  assert.match(big.json().message, /^DELETE \/v1\/sessions\/big: the disk of the embedded database .* \(half of ASGD_MIN_FREE_BYTES, at least 32 MiB, and the stored bytes of this session and of the deletes under way: a delete writes WAL for every page it empties\); free space or grow the volume$/);
  assert.equal((await tight.inject({ url: '/v1/sessions/big', headers: asAdmin })).statusCode, 200, 'still there');
});
