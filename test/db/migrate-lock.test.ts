// A migration that needs a lock other transactions hold waits a bounded time, steps aside (rolled back)
// so that traffic queued behind it goes on, and tries again: it never holds every replica's steps up.
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { test } from 'node:test';
import pg from 'pg';
import { openDatabase } from '../../src/db/database.ts';
import { createTestDatabase, TEST_DB_KIND } from '../helper.ts';

test('a pending migration blocked by an open transaction steps aside for traffic and applies once it can', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const warnings: string[] = [];
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2, onWarning: (m) => warnings.push(m) });
  const clients: pg.Client[] = [];
  const client = async () => {
    const c = new pg.Client({ connectionString: scratch.url });
    await c.connect();
    clients.push(c);
    return c;
  };
  t.after(async () => {
    for (const c of clients) await c.end().catch(() => {});
    await db.close();
    await scratch.drop();
  });
  await db.migrate();
  // Make the migrations from 0010 on pending again (0010 adds a column to sessions: it locks sessions; 0011
  // adds a table referring to it; 0012 a table of its own).
  const admin = await client();
  const since0010 = readdirSync(new URL('../../migrations/', import.meta.url)).filter((f) => /^\d{4}_.*\.sql$/.test(f) && f >= '0010').length;
  for (const table of ['replaced_versions', 'retired_names']) await admin.query(`DROP TABLE ${table}`);
  await admin.query('ALTER TABLE sessions DROP COLUMN history_from');
  await admin.query(`DELETE FROM drizzle.__drizzle_migrations WHERE id IN (SELECT id FROM drizzle.__drizzle_migrations ORDER BY id DESC LIMIT ${since0010})`);

  // A transaction that wrote to sessions and stays open (a step batch, a long PATCH…).
  const blocker = await client();
  await blocker.query('BEGIN');
  await blocker.query('UPDATE sessions SET name = name WHERE false');
  const migrating = db.migrate();
  await new Promise((resolve) => setTimeout(resolve, 500));
  // Traffic behind the migration's queued lock: a write to sessions goes through while the blocker is still
  // open (before, it waited for the migration, which waited for the blocker).
  const traffic = await client();
  let trafficDone = false;
  const write = traffic.query('UPDATE sessions SET name = name WHERE false').then(() => (trafficDone = true));
  const deadline = Date.now() + 20_000;
  while (!trafficDone && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  assert.ok(trafficDone, 'a write queued behind the migration went through while the blocking transaction was open');
  await write;
  // The migration's lock wait ends in PostgreSQL (which lets the queued write through) a moment before the
  // service hears of it and warns: wait for the warning rather than race it.
  // The attempt and how many migrations are pending (0010-0012), not a migration's number.
  const said = () => warnings.some((w) => /^applying 3 pending migrations \(attempt 1 of \d+\) waited 3000 ms for a table lock/.test(w));
  while (!said() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.ok(said(), `no warning of the lock wait; warnings: ${JSON.stringify(warnings)}`);
  await blocker.query('COMMIT');
  await migrating;
  const { rows } = await admin.query("SELECT count(*)::int AS present FROM information_schema.columns WHERE table_name = 'sessions' AND column_name = 'history_from'");
  assert.equal(rows[0].present, 1);
  assert.equal((await admin.query("SELECT to_regclass('replaced_versions') IS NOT NULL AS present")).rows[0].present, true);
});

test('a replica waiting for another\'s migration longer than ASGD_DB_TIMEOUT_MS goes on waiting, then finds it done', async (t) => {
  // Found by an operator's review: the wait for the migration lock ran on a pool connection with the silence
  // timer, which cancelled it after ASGD_DB_TIMEOUT_MS, and the replica exited 1 ("canceling statement").
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const scratch = await createTestDatabase();
  const warnings: string[] = [];
  // 1 s, not shorter: it is also the time a connection may take to open (200 ms failed to connect in a CI run
  // with the machine's 2 cores busy).
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2, silenceTimeoutMs: 1_000, onWarning: (m) => warnings.push(m) });
  const other = new pg.Client({ connectionString: scratch.url });
  await other.connect();
  t.after(async () => {
    await other.end().catch(() => {});
    await db.close();
    await scratch.drop();
  });
  // Another replica migrating: it holds the migration lock for 4 s (four times the timer), then migrates.
  await other.query('SELECT pg_advisory_lock(7142053311)');
  const released = (async () => {
    await new Promise((resolve) => setTimeout(resolve, 4_000));
    const first = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 });
    try {
      await other.query('SELECT pg_advisory_unlock(7142053311)');
      await first.migrate();
    } finally {
      await first.close();
    }
  })();
  await db.migrate();
  await released;
  assert.ok(warnings.some((w) => /waiting for another process's migration/.test(w)), warnings.join('\n'));
  await db.ready();
  // The timer is back on the pool's connections afterwards: a statement silent for longer is cancelled.
  await assert.rejects(db.query('SELECT pg_sleep(3)'), /cancel|ASGD_DB_TIMEOUT_MS|57014/i);
});
