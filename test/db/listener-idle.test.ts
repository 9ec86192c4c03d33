// The LISTEN connection outlives a server-side idle_session_timeout (it is idle by nature), and a failed attempt leaves no connection behind.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { openDatabase } from '../../src/db/database.ts';
import { createTestDatabase, TEST_DB_KIND } from '../helper.ts';

test('with idle_session_timeout = 1s on the database, the listener is not dropped and hears a NOTIFY sent after 3 s', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const admin = new pg.Client({ connectionString: scratch.url });
  await admin.connect();
  await admin.query(`ALTER DATABASE ${new URL(scratch.url).pathname.slice(1)} SET idle_session_timeout = '1s'`);
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2 });
  const heard: string[] = [];
  let resets = 0;
  const errors: Error[] = [];
  const listener = await db.listen('asgd_idle_probe', { onNotify: (p) => heard.push(p), onReset: () => resets++, onError: (e) => errors.push(e) });
  t.after(async () => {
    await listener.close();
    await db.close();
    await admin.end();
    await scratch.drop();
  });
  await new Promise((resolve) => setTimeout(resolve, 3_000));
  await admin.query("NOTIFY asgd_idle_probe, 'after-3s'");
  const deadline = Date.now() + 5_000;
  while (heard.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(heard, ['after-3s']);
  assert.equal(resets, 0, 'never reconnected');
  assert.deepEqual(errors.map((e) => e.message), []);
});

test('a connection that came up but could not LISTEN is closed before the next attempt (none left open beside the listener)', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const admin = new pg.Client({ connectionString: scratch.url });
  await admin.connect();
  // The first two LISTENs fail (as on a server shutting down between the connect and the LISTEN).
  const query = pg.Client.prototype.query;
  let failures = 2;
  pg.Client.prototype.query = function (this: pg.Client, ...args: unknown[]) {
    if (typeof args[0] === 'string' && args[0].startsWith('LISTEN') && failures > 0) {
      failures--;
      return Promise.reject(new Error('LISTEN refused (test)'));
    }
    return (query as (...a: unknown[]) => unknown).apply(this, args);
  } as typeof query;
  const { listenPostgres } = await import('../../src/db/listener.ts');
  const errors: string[] = [];
  let resets = 0;
  const heard: string[] = [];
  const listener = await listenPostgres(scratch.url, 'asgd_refused_probe', { onNotify: (p) => heard.push(p), onReset: () => resets++, onError: (e) => errors.push(e.message) });
  t.after(async () => {
    pg.Client.prototype.query = query;
    await listener.close();
    await admin.end();
    await scratch.drop();
  });
  const deadline = Date.now() + 10_000;
  while (resets === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(resets, 1, 'connected on the third attempt');
  assert.deepEqual(errors, ['LISTEN refused (test)', 'LISTEN refused (test)']);
  await admin.query("NOTIFY asgd_refused_probe, 'heard'");
  while (heard.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(heard, ['heard']);
  // The failed attempts' connections are gone: only the listener's and this test's own remain.
  let others = -1;
  while (Date.now() < deadline) {
    const { rows } = await admin.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()');
    others = rows[0].n;
    if (others === 1) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(others, 1, 'connections to the database besides this one');
});
