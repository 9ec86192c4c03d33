// A database restored from a backup (or failed over to a standby that had not received the last commits)
// under running processes: the sessions' versions go back, and new steps reach the same version numbers
// with other gradients. A process whose copy of a session is at such a number must not serve it, step it,
// replay the new log on top of it, or write it as a snapshot (its shutdown snapshot made the wrong state
// the stored truth): every process serves the database's history. Found by an operator's review, with
// pg_dump and pg_restore as here.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { bits, buildTestApp, randomData, TEST_DB_KIND } from '../helper.ts';

const multi = TEST_DB_KIND !== 'postgres' && 'pg_dump and pg_restore under two processes: PostgreSQL only';

const N = 8;

async function step(app: FastifyInstance, name: string, seed: number): Promise<number> {
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: randomData(N, seed) } } });
  assert.equal(res.statusCode, 200, res.body);
  return res.json().version;
}

async function params(app: FastifyInstance, name: string, version?: number): Promise<{ version: number; w: number[] }> {
  const res = await app.inject({ url: `/v1/sessions/${name}/params${version ? `?version=${version}` : ''}` });
  assert.equal(res.statusCode, 200, res.body);
  const body = res.json();
  return { version: body.version, w: bits(body.params.w.data) };
}

test('after a restore from a backup, every process serves, steps and snapshots the restored history', { skip: multi, timeout: 120_000 }, async (t) => {
  const { app: b, databaseUrl } = await buildTestApp(t);
  const { app: a } = await buildTestApp(null, { databaseUrl: databaseUrl! });
  let aClosed = false;
  t.after(async () => {
    if (!aClosed) await a.close();
  });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-restore-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const dump = join(dir, 'backup.dump');

  // "same": a's copy will be at the version the restored history reaches again; "behind": at a version in
  // between (it catches up from the log: the new steps must not be replayed on top of it).
  for (const name of ['same', 'behind']) {
    const res = await a.inject({
      method: 'POST', url: '/v1/sessions',
      payload: { name, params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], hyperparameters: { lr: 0.1 }, snapshot_every: 1000 },
    });
    assert.equal(res.statusCode, 201, res.body);
    for (let k = 0; k < 3; k++) await step(a, name, 10 + k); // version 4
  }
  execFileSync('pg_dump', ['-Fc', '-f', dump, databaseUrl!]);
  for (let k = 0; k < 3; k++) await step(a, 'same', 20 + k); // version 7, in a's copy
  await step(a, 'behind', 20); // version 5, in a's copy
  assert.equal((await params(a, 'same')).version, 7);
  assert.equal((await params(a, 'behind')).version, 5);

  execFileSync('pg_restore', ['--clean', '--if-exists', '--single-transaction', '-d', databaseUrl!, dump]);
  for (const name of ['same', 'behind']) {
    for (let k = 0; k < 3; k++) await step(b, name, 30 + k); // versions 5..7 again, with other gradients
  }

  for (const name of ['same', 'behind']) {
    const truth = await params(b, name);
    assert.equal(truth.version, 7);
    assert.deepEqual(await params(a, name), truth, `${name}: the process whose copy predates the restore serves the database's version 7`);
  }
  // A step through that process is applied to the restored history's state, as through the other one.
  const v8 = await step(a, 'same', 40);
  assert.equal(v8, 8);
  const fromA = await params(a, 'same');
  assert.deepEqual(await params(b, 'same'), fromA, 'both processes agree at version 8');

  // At shutdown a process snapshots the copies that moved since their last snapshot: only ones of the database's history.
  await step(a, 'behind', 41);
  const behindFromA = await params(a, 'behind');
  aClosed = true;
  await a.close();
  const { app: c } = await buildTestApp(t, { databaseUrl: databaseUrl! });
  assert.deepEqual(await params(c, 'same', 8), fromA, 'a new process reads version 8 as it was stepped');
  assert.deepEqual(await params(c, 'behind', 8), behindFromA);
  assert.deepEqual(await params(c, 'same', 7), await params(b, 'same', 7));
});
