// A migration that needs a lock other transactions hold waits a bounded time, steps aside (rolled back)
// so that traffic queued behind it goes on, and tries again: it never holds every replica's steps up.
import assert from 'node:assert/strict';
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
  // Make the newest migration pending again (it adds tables with a foreign key to sessions: it locks sessions).
  const admin = await client();
  await admin.query('DROP TABLE replay_point_chunks, replay_points');
  await admin.query('DELETE FROM drizzle.__drizzle_migrations WHERE id = (SELECT max(id) FROM drizzle.__drizzle_migrations)');

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
  const said = () => warnings.some((w) => /waited 3000 ms for a table lock/.test(w));
  while (!said() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.ok(said(), `no warning of the lock wait; warnings: ${JSON.stringify(warnings)}`);
  await blocker.query('COMMIT');
  await migrating;
  const { rows } = await admin.query("SELECT to_regclass('public.replay_points') IS NOT NULL AS present");
  assert.equal(rows[0].present, true);
});
