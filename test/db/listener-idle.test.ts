// The LISTEN connection outlives a server-side idle_session_timeout (it is idle by nature).
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
