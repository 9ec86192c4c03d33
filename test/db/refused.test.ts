// A database that answers but refuses the service (a privilege, a schema) is said to refuse, with its
// SQLSTATE, not to be unreachable; and `migrate` says PostgreSQL's reason, not only the statement.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import pg from 'pg';
import { buildApp } from '../../src/app.ts';
import { main } from '../../src/cli.ts';
import { createTestDatabase, PG_ADMIN_URL, testConfig, TEST_DB_KIND } from '../helper.ts';

test('a role without the migrations schema: /readyz and the API say the database refuses (42501); migrate says why it failed', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const role = `asgd_limited_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: scratch.url });
  await admin.connect();
  t.after(async () => {
    await admin.end();
    await scratch.drop();
    const root = new pg.Client({ connectionString: PG_ADMIN_URL });
    await root.connect();
    await root.query(`DROP ROLE IF EXISTS ${role}`);
    await root.end();
  });
  // Migrated by the owner; the app's role gets the tables, not the drizzle schema (a usual least-privilege setup).
  assert.equal(await main(['migrate'], { DATABASE_URL: scratch.url, LOG_LEVEL: 'silent' }, { stdout: { write: () => {} }, stderr: { write: () => {} } }), 0);
  await admin.query(`CREATE ROLE ${role} LOGIN`);
  await admin.query(`GRANT USAGE ON SCHEMA public TO ${role}; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ${role}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ${role}`);
  await admin.query(`REVOKE CREATE ON DATABASE ${new URL(scratch.url).pathname.slice(1)} FROM PUBLIC`);
  const url = new URL(scratch.url);
  url.username = role;

  const app = await buildApp({ config: testConfig({ DATABASE_URL: url.toString(), ASGD_MIGRATE: 'false', ASGD_HEALTH_CHECK_INTERVAL_MS: '100' }), migrate: false, logger: false });
  t.after(() => app.close());
  await app.ready();
  const ready = await app.inject({ url: '/readyz' });
  assert.equal(ready.statusCode, 503);
  assert.match(ready.json().message, /refuses this service's queries \(SQLSTATE 42501/);
  await new Promise((resolve) => setTimeout(resolve, 400)); // a probe or two
  const api = await app.inject({ url: '/v1/sessions' });
  assert.equal(api.statusCode, 503, api.body);
  assert.match(api.json().message, /refuses this service's queries \(SQLSTATE 42501/);

  // migrate as that role: PostgreSQL's reason, one line.
  let stderr = '';
  const code = await main(['migrate'], { DATABASE_URL: url.toString(), LOG_LEVEL: 'silent' }, { stdout: { write: () => {} }, stderr: { write: (s: string) => (stderr += s) } });
  assert.equal(code, 1);
  // The role cannot read the journal: it is told what a serving role needs and who migrates (it was told
  // migrations were pending when all were applied).
  assert.match(stderr, /^asgd-serve: migrate failed \(PostgreSQL at [^)]+\): permission denied for schema drizzle \(SQLSTATE 42501\) while reading the migrations journal: a serving role needs USAGE ON SCHEMA drizzle .*migrations are applied by the role that owns the schema/);
  assert.match(stderr, /^[^\n]+\n$/, 'one line');
});

test('a database that stops accepting connections (ALLOW_CONNECTIONS false) is said to, not to be a privilege or schema problem; the replica serves again once it accepts them', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const dbName = new URL(scratch.url).pathname.slice(1);
  const root = new pg.Client({ connectionString: PG_ADMIN_URL });
  await root.connect();
  t.after(async () => {
    await root.query(`ALTER DATABASE ${dbName} ALLOW_CONNECTIONS true`).catch(() => {});
    await root.end();
    await scratch.drop();
  });
  const app = await buildApp({ config: testConfig({ DATABASE_URL: scratch.url, ASGD_HEALTH_CHECK_INTERVAL_MS: '100' }), migrate: true, logger: false });
  t.after(() => app.close());
  await app.ready();
  assert.equal((await app.inject({ url: '/readyz' })).statusCode, 200);
  await root.query(`ALTER DATABASE ${dbName} ALLOW_CONNECTIONS false`);
  await root.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [dbName]);
  // Before the probe has seen it (a second app whose probe is off): a 503 with Retry-After that the clients
  // retry, not a 500 (found by an operator's review).
  const unprobed = await buildApp({ config: testConfig({ DATABASE_URL: scratch.url, ASGD_HEALTH_CHECK_INTERVAL_MS: '0', ASGD_MIGRATE: 'false' }), migrate: false, logger: false });
  t.after(() => unprobed.close());
  await unprobed.ready();
  const early = await unprobed.inject({ url: '/v1/sessions' });
  assert.equal(early.statusCode, 503, early.body);
  assert.equal(early.json().code, 'SERVICE_UNAVAILABLE');
  assert.ok(Number(early.headers['retry-after']) > 0, early.body);
  assert.match(early.json().message, /does not accept this service's connections now \(SQLSTATE 55000/);
  let ready = await app.inject({ url: '/readyz' });
  for (let i = 0; i < 50 && ready.statusCode === 200; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    ready = await app.inject({ url: '/readyz' });
  }
  assert.equal(ready.statusCode, 503, ready.body);
  assert.match(ready.json().message, /does not accept this service's connections now \(SQLSTATE 55000/);
  assert.doesNotMatch(ready.json().message, /privilege/);
  await root.query(`ALTER DATABASE ${dbName} ALLOW_CONNECTIONS true`);
  let api = await app.inject({ url: '/v1/sessions' });
  for (let i = 0; i < 100 && api.statusCode !== 200; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    api = await app.inject({ url: '/v1/sessions' });
  }
  assert.equal(api.statusCode, 200, api.body);
});
