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
import { test, type TestContext } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { bits, buildTestApp, randomData, TEST_DB_KIND } from '../helper.ts';
import { N, params, step } from './support.ts';

const multi = TEST_DB_KIND !== 'postgres' && 'pg_dump and pg_restore under two processes: PostgreSQL only';

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

/** Two processes on one database; sessions stepped to version 4 by `a`, backed up, stepped to 7 by `a`, then the backup restored. */
async function restoredUnder(t: TestContext, names: string[]) {
  const { app: b, databaseUrl } = await buildTestApp(t);
  const { app: a } = await buildTestApp(null, { databaseUrl: databaseUrl! });
  const state = { aClosed: false };
  t.after(async () => {
    if (!state.aClosed) await a.close();
  });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-restore-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const dump = join(dir, 'backup.dump');
  for (const name of names) {
    const res = await a.inject({
      method: 'POST', url: '/v1/sessions',
      payload: { name, params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], hyperparameters: { lr: 0.1 }, snapshot_every: 1000 },
    });
    assert.equal(res.statusCode, 201, res.body);
    for (let k = 0; k < 3; k++) await step(a, name, 10 + k);
  }
  execFileSync('pg_dump', ['-Fc', '-f', dump, databaseUrl!]);
  for (const name of names) for (let k = 0; k < 3; k++) await step(a, name, 20 + k);
  execFileSync('pg_restore', ['--clean', '--if-exists', '--single-transaction', '-d', databaseUrl!, dump]);
  return { a, b, databaseUrl: databaseUrl!, state };
}

test('after a restore, a step through the process with the old copy (not read first) is applied to the restored state', { skip: multi, timeout: 60_000 }, async (t) => {
  const { a, b } = await restoredUnder(t, ['s']);
  for (let k = 0; k < 3; k++) await step(b, 's', 30 + k); // version 7 again
  assert.equal(await step(a, 's', 40), 8);
  assert.deepEqual(await params(a, 's'), await params(b, 's'));
});

test('after a restore, a step answer with ?return=params holds the database\'s parameters at its version', { skip: multi, timeout: 60_000 }, async (t) => {
  const { a, b } = await restoredUnder(t, ['s']);
  for (let k = 0; k < 2; k++) await step(b, 's', 30 + k); // version 6
  const res = await a.inject({ method: 'POST', url: '/v1/sessions/s/step?return=params', payload: { grads: { w: randomData(N, 32) } } });
  assert.equal(res.statusCode, 200, res.body);
  assert.equal(res.json().version, 7); // a's old copy is at 7 too
  assert.deepEqual(bits(res.json().params.w.data), (await params(b, 's', 7)).w);
});

test('after a restore, the shutdown of a process holding an old copy at the database\'s version writes no snapshot of it', { skip: multi, timeout: 60_000 }, async (t) => {
  const { a, b, databaseUrl, state } = await restoredUnder(t, ['s']);
  for (let k = 0; k < 3; k++) await step(b, 's', 30 + k); // version 7 again, never read through a
  const truth = await params(b, 's');
  state.aClosed = true;
  await a.close();
  const { app: c } = await buildTestApp(t, { databaseUrl });
  assert.deepEqual(await params(c, 's', 7), truth);
});

test('after a restore, a session created with an id the restore freed does not take the steps of the one it removed', { skip: multi, timeout: 60_000 }, async (t) => {
  // `gone` exists only after the backup: the restore removes it and rewinds the id sequence, and the
  // session created next gets its id. The process that served `gone` still knows its name by that id.
  const { app: b, databaseUrl } = await buildTestApp(t);
  const { app: a } = await buildTestApp(t, { databaseUrl: databaseUrl! });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-restore-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const dump = join(dir, 'backup.dump');
  const create = async (app: FastifyInstance, name: string) => {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], hyperparameters: { lr: 0.1 } } });
    assert.equal(res.statusCode, 201, res.body);
    return res.json();
  };
  await create(a, 'kept');
  execFileSync('pg_dump', ['-Fc', '-f', dump, databaseUrl!]);
  await create(a, 'gone');
  await step(a, 'gone', 1);
  execFileSync('pg_restore', ['--clean', '--if-exists', '--single-transaction', '-d', databaseUrl!, dump]);
  await create(b, 'new');
  const before = await params(b, 'new');
  const res = await a.inject({ method: 'POST', url: '/v1/sessions/gone/step', payload: { grads: { w: randomData(N, 2) } } });
  assert.equal(res.statusCode, 404, res.body);
  assert.equal(res.json().code, 'SESSION_NOT_FOUND');
  assert.deepEqual(await params(b, 'new'), before, 'the new session is as it was created');
  assert.deepEqual(await params(a, 'new'), before);
});

test('a restore between reading a session and writing its manual snapshot writes no snapshot of the old history', { skip: multi, timeout: 60_000 }, async (t) => {
  const { app: b, databaseUrl } = await buildTestApp(t);
  const { app: a } = await buildTestApp(t, { databaseUrl: databaseUrl! });
  const dir = mkdtempSync(join(tmpdir(), 'asgd-restore-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const dump = join(dir, 'backup.dump');
  const res = await a.inject({
    method: 'POST', url: '/v1/sessions',
    payload: { name: 's', params: [{ name: 'w', shape: [N], data: randomData(N, 1) }], hyperparameters: { lr: 0.1 }, snapshot_every: 1000 },
  });
  assert.equal(res.statusCode, 201, res.body);
  for (let k = 0; k < 3; k++) await step(a, 's', 10 + k); // version 4
  execFileSync('pg_dump', ['-Fc', '-f', dump, databaseUrl!]);
  for (let k = 0; k < 3; k++) await step(a, 's', 20 + k); // version 7, in a's copy

  // The restore lands in the moment between the snapshot's read (a transaction for a consistent read)
  // and its write (the next transaction): the first plain transaction a opens from here on.
  const db = a.db;
  const transaction = db.transaction.bind(db);
  let armed = true;
  db.transaction = ((fn, options) => {
    if (armed && !options?.consistentRead) {
      armed = false;
      execFileSync('pg_restore', ['--clean', '--if-exists', '--single-transaction', '-d', databaseUrl!, dump]);
    }
    return transaction(fn, options);
  }) as typeof db.transaction;
  const taken = await a.inject({ method: 'POST', url: '/v1/sessions/s/snapshots' });
  assert.equal(armed, false, 'the restore ran');
  assert.equal(taken.statusCode, 201, taken.body);
  assert.equal(taken.json().version, 4, 'the snapshot is of the restored history, at its version');
  const listed = await b.inject({ url: '/v1/sessions/s/snapshots' });
  assert.equal(listed.statusCode, 200, listed.body);
  for (const s of listed.json().snapshots) assert.ok(s.version <= 4, `no snapshot above the restored version 4: ${s.version}`);

  for (let k = 0; k < 3; k++) await step(b, 's', 30 + k); // version 7 again, with other gradients
  const { app: c } = await buildTestApp(t, { databaseUrl: databaseUrl! });
  assert.deepEqual(await params(c, 's', 7), await params(b, 's', 7), 'a new process reads version 7 of the restored history');
});
