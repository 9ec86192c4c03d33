// PostgreSQL that stops answering without closing the connection (a network black hole, a hung server): a
// statement fails after ASGD_DB_TIMEOUT_MS of silence with a 503, the process serves again once the database
// answers, and a step whose commit went through before its answer was lost counts once when retried with its
// Idempotency-Key.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { Writable } from 'node:stream';
import { buildApp } from '../../src/app.ts';
import { openDatabase, withGenericPlans } from '../../src/db/database.ts';
import { buildTestApp, createTestDatabase, TEST_DB_KIND, testConfig } from '../helper.ts';
import { proxiedDatabase } from './db-proxy.ts';

const session = {
  name: 'silent',
  params: [{ name: 'w', shape: [4], data: [0.5, -0.25, 1, 2] }],
  hyperparameters: { lr: 0.1 },
};
const stepBody = (k: number) => ({ grads: { w: [0.01 * k, -0.02, 0.03, 0.04] } });

test('a statement PostgreSQL leaves unanswered fails with 503 after ASGD_DB_TIMEOUT_MS; a retried step counts once', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const { url, proxy } = await proxiedDatabase(t);
  // The periodic probe is off: this test is about the statements of requests.
  const { app } = await buildTestApp(t, { databaseUrl: url.toString(), env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  const step = (k: number, key: string) => app.inject({ method: 'POST', url: '/v1/sessions/silent/step', headers: { 'idempotency-key': key }, payload: stepBody(k) });

  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  assert.equal((await step(1, 'k1')).json().version, 2);

  // The step reaches PostgreSQL and commits; its answer is lost on the way back.
  proxy.mode = 'drop-replies';
  let started = Date.now();
  const lost = await step(2, 'k2');
  const waited = Date.now() - started;
  assert.equal(lost.statusCode, 503, lost.body);
  assert.equal(lost.json().code, 'SERVICE_UNAVAILABLE');
  assert.match(lost.json().message, /did not answer for 1 s.*Idempotency-Key/);
  assert.ok(lost.headers['retry-after']);
  assert.ok(waited >= 900 && waited < 10_000, `answered after ${waited} ms`);

  // Nothing gets through: a read fails the same way, not for ever.
  proxy.mode = 'black-hole';
  started = Date.now();
  const read = await app.inject({ url: '/v1/sessions/silent' });
  assert.equal(read.statusCode, 503, read.body);
  assert.ok(Date.now() - started < 10_000);
  const blackHoled = await step(3, 'k3');
  assert.equal(blackHoled.statusCode, 503, blackHoled.body);

  // PostgreSQL answers again: the same process serves. The lost step was committed once: its retry gets
  // its answer; the black-holed one never reached PostgreSQL and is applied now.
  proxy.mode = 'pass';
  const retried = await step(2, 'k2');
  assert.equal(retried.statusCode, 200, retried.body);
  assert.equal(retried.json().version, 3);
  assert.equal(retried.json().replayed, true);
  const third = await step(3, 'k3');
  assert.equal(third.statusCode, 200, third.body);
  assert.equal(third.json().version, 4);
  const now = (await app.inject({ url: '/v1/sessions/silent' })).json();
  assert.equal(now.version, 4);
  assert.equal(now.step, 3);
  // The parameters are those of the three steps, each applied once: the same as a session that never lost one.
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { ...session, name: 'reference' } })).statusCode, 201);
  for (const k of [1, 2, 3]) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/reference/step', payload: stepBody(k) })).statusCode, 200);
  const params = async (name: string) => (await app.inject({ url: `/v1/sessions/${name}/params` })).json().params;
  assert.deepEqual(await params('silent'), await params('reference'));
});

test('a silent database whose address then refuses connections: the cancel\'s refused connection does not end the process; 503, and it serves again', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const { url, proxy } = await proxiedDatabase(t);
  const { app } = await buildTestApp(t, { databaseUrl: url.toString(), env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  // Its connections go silent and its address refuses new ones (a host that vanished): the cancel sent after
  // 1 s of silence cannot connect. Its connection's error was an 'error' event nobody heard: the process ended.
  proxy.mode = 'black-hole';
  proxy.server.close();
  const refused: NodeJS.ErrnoException[] = [];
  const seen = (err: NodeJS.ErrnoException) => refused.push(err);
  process.on('uncaughtException', seen);
  t.after(() => process.off('uncaughtException', seen));
  const step = await app.inject({ method: 'POST', url: '/v1/sessions/silent/step', payload: stepBody(1) });
  assert.equal(step.statusCode, 503, step.body);
  assert.match(step.json().message, /did not answer for 1 s/);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.deepEqual(refused.map((e) => e.code ?? e.message), [], 'no uncaught error');
  // The address answers again (the same port: the process's pool keeps the URL).
  proxy.mode = 'pass';
  proxy.server.listen(proxy.port, '127.0.0.1');
  await new Promise((resolve) => proxy.server.once('listening', resolve));
  let again = await app.inject({ url: '/v1/sessions/silent' });
  for (let i = 0; i < 20 && again.statusCode !== 200; i++) {
    await new Promise((resolve) => setTimeout(resolve, 250));
    again = await app.inject({ url: '/v1/sessions/silent' });
  }
  assert.equal(again.statusCode, 200, again.body);
  assert.equal(again.json().version, 1, 'the step that got 503 never reached PostgreSQL');
});

test('ASGD_DB_TIMEOUT_MS=0 waits for the database; a bad value is refused naming the variable', async () => {
  const { loadConfig } = await import('../../src/config.ts');
  assert.equal(loadConfig({ ASGD_DB_TIMEOUT_MS: '0' }).dbTimeoutMs, 0);
  assert.equal(loadConfig({}).dbTimeoutMs, 30_000);
  assert.throws(() => loadConfig({ ASGD_DB_TIMEOUT_MS: '-5' }), /ASGD_DB_TIMEOUT_MS/);
  assert.throws(() => loadConfig({ ASGD_DB_TIMEOUT_MS: 'soon' }), /ASGD_DB_TIMEOUT_MS/);
});

/** A connection of its own holding the session's row lock (as another replica's long batch would) until released. */
async function holdRowLock(databaseUrl: string, session: string): Promise<{ release(): Promise<void> }> {
  const client = new pg.Client({ connectionString: databaseUrl });
  client.on('error', () => {}); // the database is dropped at the test's end
  await client.connect();
  await client.query('BEGIN');
  await client.query('SELECT 1 FROM sessions WHERE name = $1 FOR UPDATE', [session]);
  return {
    async release() {
      await client.query('COMMIT');
      await client.end();
    },
  };
}

test('a statement waiting for a lock past ASGD_DB_TIMEOUT_MS is cancelled in PostgreSQL: 503, nothing committed then or later', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const { app, databaseUrl } = await buildTestApp(t, { env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const lock = await holdRowLock(databaseUrl!, 'silent');
  const started = Date.now();
  // No Idempotency-Key, as a curl user sends it: the step must not commit behind the 503.
  const waited = await app.inject({ method: 'POST', url: '/v1/sessions/silent/step', payload: stepBody(1) });
  assert.equal(waited.statusCode, 503, waited.body);
  assert.match(waited.json().message, /cancelled the statement.*nothing of it was committed/);
  assert.ok(Date.now() - started < 5_000, `answered after ${Date.now() - started} ms`);
  // No backend of the service is left waiting for the lock; released, the session is where it was.
  const admin = new pg.Client({ connectionString: databaseUrl! });
  admin.on('error', () => {});
  await admin.connect();
  const waiting = await admin.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'");
  await admin.end();
  await lock.release();
  assert.equal(waiting.rows[0].n, 0);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal((await app.inject({ url: '/v1/sessions/silent' })).json().version, 1);
  // The connection that was cancelled serves the next step.
  const next = await app.inject({ method: 'POST', url: '/v1/sessions/silent/step', payload: stepBody(1) });
  assert.equal(next.statusCode, 200, next.body);
  assert.equal(next.json().version, 2);
});

test('every pooled connection taken by a lock wait: the replica stays ready (the probe has its own connection)', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL');
  const { app, databaseUrl } = await buildTestApp(t, { env: { ASGD_DB_POOL_SIZE: '1', ASGD_DB_TIMEOUT_MS: '20000', ASGD_HEALTH_CHECK_INTERVAL_MS: '100' } });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  const lock = await holdRowLock(databaseUrl!, 'silent');
  const stepping = app.inject({ method: 'POST', url: '/v1/sessions/silent/step', payload: stepBody(1) });
  await new Promise((r) => setTimeout(r, 700)); // the step holds the one pooled connection, waiting for the lock
  const ready = await app.inject({ url: '/readyz' });
  assert.equal(ready.statusCode, 200, ready.body);
  assert.equal(app.databaseHealth?.up, true);
  await lock.release();
  assert.equal((await stepping).statusCode, 200);
});

test('shutdown does not wait for a database that stopped answering', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const { url, proxy } = await proxiedDatabase(t);
  const { app } = await buildTestApp(null, { databaseUrl: url.toString(), env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: session })).statusCode, 201);
  proxy.mode = 'black-hole';
  const started = Date.now();
  await app.close();
  assert.ok(Date.now() - started < 8_000, `closed after ${Date.now() - started} ms`);
});

/** An app on `databaseUrl` with a second of ASGD_DB_TIMEOUT_MS and 16 sessions each moved since its last snapshot (a shutdown snapshot due). */
async function sixteenMoved(databaseUrl: string) {
  const { app } = await buildTestApp(null, { databaseUrl, env: { ASGD_DB_TIMEOUT_MS: '1000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0', ASGD_SHUTDOWN_TIMEOUT_MS: '60000' } });
  for (let k = 0; k < 16; k++) {
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { ...session, name: `moved${k}` } })).statusCode, 201);
    assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/moved${k}/step`, payload: stepBody(1) })).statusCode, 200);
  }
  return app;
}

/** Closes `app`, asserting that it took one session's wait (a second of silence, a second for the cancel), not sixteen. */
async function closesInOneWait(app: Awaited<ReturnType<typeof sixteenMoved>>) {
  const started = Date.now();
  await app.close();
  assert.ok(Date.now() - started < 8_000, `closed after ${Date.now() - started} ms`);
}

test('shutdown gives up the snapshots of every session once the database does not answer for one, rather than wait for each', async (t) => {
  // Found by an operator's review: each moved session's shutdown snapshot waited ASGD_DB_TIMEOUT_MS in turn.
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const { url, proxy } = await proxiedDatabase(t);
  const app = await sixteenMoved(url.toString());
  proxy.mode = 'black-hole';
  await closesInOneWait(app);
});

test('shutdown gives up the snapshots once one waits out ASGD_DB_TIMEOUT_MS on a lock (its statement cancelled), rather than wait for each', async (t) => {
  // Found by a review: only a dropped connection counted, not a cancelled statement (57014): a lock wait
  // or a hung server that still takes a cancel made each session wait in turn.
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL locks');
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const app = await sixteenMoved(db.url);
  const holder = new pg.Client({ connectionString: db.url });
  await holder.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('LOCK TABLE snapshots IN ACCESS EXCLUSIVE MODE');
    await closesInOneWait(app);
  } finally {
    await holder.end();
  }
});

test('a 503 of a database outage is one warn line without a stack per request (the outage itself is said once)', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const raw of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(raw));
      done();
    },
  });
  // Nothing listens on port 1: every statement is refused.
  const config = testConfig({ DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', LOG_LEVEL: 'info', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' });
  const app = await buildApp({ config, migrate: false, logger: { level: 'info', stream } });
  t.after(() => app.close());
  await app.ready();
  const answer = await app.inject({ url: '/v1/sessions/anything' });
  assert.equal(answer.statusCode, 503, answer.body);
  const failed = lines.filter((l) => l.statusCode === 503 && l.code === 'SERVICE_UNAVAILABLE');
  assert.equal(failed.length, 1, JSON.stringify(lines));
  assert.equal(failed[0].level, 40);
  assert.match(String(failed[0].cause), /ECONNREFUSED|connect/);
  const ofRequest = lines.filter((l) => l.reqId === failed[0].reqId);
  assert.ok(!JSON.stringify(ofRequest).includes('"stack"'), `a stack in ${JSON.stringify(ofRequest)}`);
});

test('migrate says when it waits for another migration; a database a newer build migrated is said once; a password with a bare % connects', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL');
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const warnings: string[] = [];
  const holder = new pg.Client({ connectionString: db.url });
  holder.on('error', () => {});
  await holder.connect();
  await holder.query('SELECT pg_advisory_lock(7142053311)');
  const database = await openDatabase({ databaseUrl: db.url, dataDir: '', poolSize: 2, onWarning: (m) => warnings.push(m) });
  t.after(() => database.close());
  const migrating = database.migrate();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /waiting for another process's migration.*advisory lock 7142053311/);
  await holder.query('SELECT pg_advisory_unlock(7142053311)');
  await migrating;
  await database.ready();
  assert.equal(warnings.length, 1);
  // A newer build added a migration this one does not know: still ready, said once.
  await holder.query("INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ('from-a-newer-build', 99999999999999)");
  await holder.end();
  await database.ready();
  await database.ready();
  assert.equal(warnings.length, 2);
  assert.match(warnings[1], /a newer asgd-serve migrated it/);
  // pg reads "se%cret" as it is written; the URL the service derives from it must too.
  assert.equal(withGenericPlans('postgres://postgres:se%cret@127.0.0.1:5432/x'), 'postgres://postgres:se%cret@127.0.0.1:5432/x');
  assert.match(withGenericPlans('postgres://postgres:se%25cret@127.0.0.1:5432/x'), /plan_cache_mode/);
});

test('the health probe survives losing its idle connection (a PostgreSQL restart): the next probe reconnects and passes', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL');
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const database = await openDatabase({ databaseUrl: db.url, dataDir: '', poolSize: 2 });
  t.after(() => database.close());
  await database.migrate();
  await database.ready();
  // Every connection of the service to this database is terminated, as a restart does.
  const admin = new pg.Client({ connectionString: db.url });
  admin.on('error', () => {});
  await admin.connect();
  await admin.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()");
  await admin.end();
  await new Promise((r) => setTimeout(r, 200));
  await database.ready(); // resolves: a lost idle connection is no outage
});
