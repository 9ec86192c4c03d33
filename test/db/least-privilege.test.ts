// A serving role with the privileges the README lists (no CREATE on the database) starts with the default
// ASGD_MIGRATE=true on a migrated database: a start with nothing pending runs no DDL. With a migration
// pending it fails saying what to do (before: "permission denied ... CREATE SCHEMA" and nothing more, and
// under a restart policy it restarted in a loop). Found by an operator's review.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { test, type TestContext } from 'node:test';
import pg from 'pg';
import { openDatabase } from '../../src/db/database.ts';
import { buildTestApp, createTestDatabase, PG_ADMIN_URL, TEST_DB_KIND } from '../helper.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'database roles: PostgreSQL only';

/**
 * A scratch database migrated by its owner (as `asgd-serve migrate` does) and a new login role with the
 * README's grants; everything is dropped after the test. url logs in as the role.
 */
async function servingRole(t: TestContext) {
  const scratch = await createTestDatabase();
  const role = `asgd_serving_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  const owner = new pg.Client({ connectionString: scratch.url });
  await owner.connect();
  t.after(async () => {
    await owner.end().catch(() => {});
    await scratch.drop();
    await admin.query(`DROP ROLE IF EXISTS ${role}`);
    await admin.end();
  });
  const migrator = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 });
  await migrator.migrate();
  await migrator.close();
  await admin.query(`CREATE ROLE ${role} LOGIN`);
  await owner.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ${role}`);
  await owner.query(`GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ${role}`);
  await owner.query(`GRANT USAGE ON SCHEMA drizzle TO ${role}`);
  await owner.query(`GRANT SELECT ON drizzle.__drizzle_migrations TO ${role}`);
  const url = new URL(scratch.url);
  url.username = role;
  url.password = '';
  return { scratch, admin, owner, role, url: url.toString(), database: new URL(scratch.url).pathname.slice(1) };
}

test('a least-privilege serving role starts with ASGD_MIGRATE=true on a migrated database, and is told what to do when one is pending', { skip, timeout: 60_000 }, async (t) => {
  const { admin, owner, url, database } = await servingRole(t);
  // PostgreSQL 15 gives PUBLIC no CREATE on schema public; the database's CREATE is revoked here.
  await admin.query(`REVOKE CREATE ON DATABASE ${database} FROM PUBLIC`);
  await owner.query('REVOKE CREATE ON SCHEMA public FROM PUBLIC');

  // Start-up with the default ASGD_MIGRATE=true (buildTestApp migrates), then a session and a step.
  const { app } = await buildTestApp(null, { databaseUrl: url });
  try {
    assert.equal((await app.inject({ url: '/readyz' })).statusCode, 200);
    const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
    assert.equal(created.statusCode, 201, created.body);
    const stepped = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', payload: { grads: { w: [0.5, 0.5] } } });
    assert.equal(stepped.statusCode, 200, stepped.body);
  } finally {
    await app.close();
  }

  // A migration pending (the newest one undone by the owner): the serving role cannot apply it, and says what to do.
  await owner.query('DROP TABLE replaced_versions');
  await owner.query('DELETE FROM drizzle.__drizzle_migrations WHERE id = (SELECT max(id) FROM drizzle.__drizzle_migrations)');
  const serving = await openDatabase({ databaseUrl: url, dataDir: '', poolSize: 1 });
  try {
    await assert.rejects(serving.migrate(), (err: Error) => {
      assert.match(err.message, /^permission denied for database \S+ \(SQLSTATE 42501\) while running .*; migrations are pending and this database role may not apply them: run `asgd-serve migrate` as the role that owns the schema, and start the service with ASGD_MIGRATE=false/s);
      return true;
    });
  } finally {
    await serving.close();
  }
});

test('a serving role that may not read the migrations journal is told which grant it lacks, not that migrations are pending', { skip, timeout: 60_000 }, async (t) => {
  // Found by an operator's review: the unreadable journal counted as "nothing applied", the start then ran
  // drizzle's CREATE SCHEMA and failed saying migrations were pending, when all were applied.
  const { owner, role, url } = await servingRole(t);
  await owner.query(`REVOKE SELECT ON drizzle.__drizzle_migrations FROM ${role}`);
  const serving = await openDatabase({ databaseUrl: url, dataDir: '', poolSize: 1 });
  try {
    await assert.rejects(serving.migrate(), (err: Error & { code?: string }) => {
      assert.match(err.message, /^permission denied for table __drizzle_migrations \(SQLSTATE 42501\) while reading the migrations journal: a serving role needs USAGE ON SCHEMA drizzle and SELECT ON drizzle.__drizzle_migrations/);
      assert.doesNotMatch(err.message, /pending/);
      assert.equal(err.code, '42501');
      return true;
    });
  } finally {
    await serving.close();
  }
});

test('a table without its grants (one an upgrade added) or a read-only database: /readyz and requests are 503 naming why, not ready and 500', { skip, timeout: 60_000 }, async (t) => {
  // Found by an operator's review: the readiness check read only the migrations' journal, and a missing
  // privilege (SQLSTATE 42501) or a read-only database (25006) on a request fell through to 500 INTERNAL,
  // which the clients do not retry.
  const { owner, role, scratch, url } = await servingRole(t);
  // The grants of the newest migration's tables forgotten, as after `migrate` by the owner in an upgrade.
  await owner.query(`REVOKE ALL ON replay_points, replay_point_chunks FROM ${role}`);
  const { app } = await buildTestApp(t, { databaseUrl: url, env: { ASGD_MIGRATE: 'false' } });
  const ready = await app.inject({ url: '/readyz' });
  assert.equal(ready.statusCode, 503, ready.body);
  assert.match(ready.json().message, /SQLSTATE 42501.*permission denied for table replay_point_chunks, replay_points/);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
  assert.equal(created.statusCode, 503, created.body);
  assert.match(created.json().message, /SQLSTATE 42501.*permission denied for table replay_point/);

  // Some of the four privileges on a table is not enough: has_table_privilege given them as a list answered
  // true for any one (a role granted only SELECT on the step log was ready, and every step failed).
  await owner.query(`GRANT SELECT, INSERT, UPDATE, DELETE ON replay_points, replay_point_chunks TO ${role}`);
  // Ready once the probe that the refusal made look again every second sees the grants.
  const readyAgain = async () => {
    let last;
    for (const until = Date.now() + 5000; Date.now() < until; await new Promise((r) => setTimeout(r, 100))) {
      last = await app.inject({ url: '/readyz' });
      if (last.statusCode === 200) return;
    }
    assert.fail(`not ready again: ${last?.body}`);
  };
  await readyAgain();
  await owner.query(`REVOKE INSERT, UPDATE, DELETE ON step_log FROM ${role}`);
  const partial = await app.inject({ url: '/readyz' });
  assert.equal(partial.statusCode, 503, partial.body);
  assert.match(partial.json().message, /SQLSTATE 42501.*permission denied for table step_log: this role needs SELECT, INSERT, UPDATE, DELETE/);
  await owner.query(`GRANT INSERT, UPDATE, DELETE ON step_log TO ${role}`);
  // A sequence behind an id without USAGE: no session could be made.
  await owner.query(`REVOKE USAGE ON ALL SEQUENCES IN SCHEMA public FROM ${role}`);
  const noSequence = await app.inject({ url: '/readyz' });
  assert.equal(noSequence.statusCode, 503, noSequence.body);
  assert.match(noSequence.json().message, /SQLSTATE 42501.*permission denied for sequence (\w+, )*sessions_id_seq\b/);
  await owner.query(`GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ${role}`);
  await readyAgain();

  // A read-only database (a standby, or default_transaction_read_only), as the owner sees it.
  const readOnly = new URL(scratch.url);
  readOnly.searchParams.set('options', '-c default_transaction_read_only=on');
  const ro = await buildTestApp(t, { databaseUrl: readOnly.toString(), env: { ASGD_MIGRATE: 'false' } });
  const roReady = await ro.app.inject({ url: '/readyz' });
  assert.equal(roReady.statusCode, 503, roReady.body);
  assert.match(roReady.json().message, /read-only \(SQLSTATE 25006/);
  const roCreate = await ro.app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
  assert.equal(roCreate.statusCode, 503, roCreate.body);
  assert.match(roCreate.json().message, /read-only/);
});

test('compose\'s init script (deploy/postgres-init) makes a serving role that serves after `migrate` by the owner, may not change the tables, and can be run again on a database that has them', { skip, timeout: 60_000 }, async (t) => {
  const scratch = await createTestDatabase();
  const app = `asgd_app_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  t.after(async () => {
    await scratch.drop();
    await admin.query(`DROP ROLE IF EXISTS ${app}`);
    await admin.end();
  });
  const database = new URL(scratch.url).pathname.slice(1);
  const ownerUrl = new URL(scratch.url);
  // As the postgres image runs it: POSTGRES_USER (the owner) and POSTGRES_DB, here over TCP.
  const runScript = () => {
    const run = spawnSync('sh', ['deploy/postgres-init/10-serving-role.sh'], {
      env: { ...process.env, PGHOST: ownerUrl.hostname, PGPORT: ownerUrl.port || '5432', POSTGRES_USER: decodeURIComponent(ownerUrl.username), POSTGRES_DB: database, ASGD_APP_USER: app, ASGD_APP_PASSWORD: 'pw-for-the-test' },
      encoding: 'utf8',
    });
    assert.equal(run.status, 0, run.stderr);
  };
  runScript(); // on a new database, before any migration (the image runs it at the volume's first start)
  const migrator = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 });
  await migrator.migrate();
  await migrator.close();

  const url = new URL(scratch.url);
  url.username = app;
  url.password = 'pw-for-the-test';
  const served = await buildTestApp(null, { databaseUrl: url.toString() });
  try {
    assert.equal((await served.app.inject({ url: '/readyz' })).statusCode, 200);
    const created = await served.app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
    assert.equal(created.statusCode, 201, created.body);
    const stepped = await served.app.inject({ method: 'POST', url: '/v1/sessions/s/step', payload: { grads: { w: [0.5, 0.5] } } });
    assert.equal(stepped.statusCode, 200, stepped.body);
    const snapshot = await served.app.inject({ method: 'POST', url: '/v1/sessions/s/snapshots', payload: {} });
    assert.equal(snapshot.statusCode, 201, snapshot.body);
    assert.equal((await served.app.inject({ method: 'DELETE', url: '/v1/sessions/s' })).statusCode, 204);
  } finally {
    await served.app.close();
  }
  // It may not change the schema: no table made, none dropped or altered.
  const asApp = new pg.Client({ connectionString: url.toString() });
  await asApp.connect();
  try {
    for (const ddl of ['CREATE TABLE public.x (a int)', 'DROP TABLE sessions', 'ALTER TABLE step_log ADD COLUMN x int', 'CREATE SCHEMA x', 'DELETE FROM drizzle.__drizzle_migrations']) {
      await assert.rejects(asApp.query(ddl), (err: Error & { code?: string }) => err.code === '42501', ddl);
    }
  } finally {
    await asApp.end();
  }
  // Again on the migrated database (a volume made before the script existed): it succeeds and the role serves.
  runScript();
  const again = await buildTestApp(null, { databaseUrl: url.toString() });
  try {
    assert.equal((await again.app.inject({ url: '/readyz' })).statusCode, 200);
  } finally {
    await again.app.close();
  }
});
