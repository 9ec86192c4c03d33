// QueryOptions.lockFirst on PostgreSQL: a small locking statement and the statement itself go out in one
// round trip and run in one implicit transaction. The statement starts once the lock is granted, so it sees
// the row as the lock's last holder left it; both commit (or roll back) together; the locking statement is
// prepared once per connection, and a connection whose statement failed is not reused. The step statement
// takes its session's row lock this way (repository.ts).
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import pg from 'pg';
import { openDatabase, type Database } from '../../src/db/database.ts';
import { createTestDatabase, TEST_DB_KIND } from '../helper.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'PostgreSQL only (PGlite has one connection: nothing waits for a lock)';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const LOCK = { name: 'lock_first_t', text: 'SELECT FROM t WHERE id = $1 FOR UPDATE', values: [1] };

/** A scratch database with table t holding the row (1, 0), the service's pool on it and one other connection. */
async function tableT(t: TestContext, poolSize: number): Promise<{ db: Database; other: pg.Client }> {
  const scratch = await createTestDatabase();
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize });
  const other = new pg.Client({ connectionString: scratch.url });
  t.after(async () => {
    await other.end();
    await db.close();
    await scratch.drop();
  });
  await db.query('CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL)');
  await db.query('INSERT INTO t VALUES (1, 0)');
  await other.connect();
  return { db, other };
}

test('lockFirst: the statement waits for the row lock, then sees the row as its holder left it, and commits with the lock', { skip, timeout: 30_000 }, async (t) => {
  const { db, other: holder } = await tableT(t, 2);

  await holder.query('BEGIN');
  await holder.query('SELECT FROM t WHERE id = 1 FOR UPDATE');
  await holder.query('UPDATE t SET v = 1 WHERE id = 1');
  // Without the lock, a statement reads the row as committed now; with it, it waits.
  assert.deepEqual(await db.query('SELECT v FROM t WHERE id = $1', [1]), [{ v: 0 }]);
  let settled = false;
  // A plain read, which takes no lock itself; txid_current_if_assigned() is set only in a transaction that
  // locked a row: the lock's own.
  const read = 'SELECT v, txid_current_if_assigned() IS NOT NULL AS holds_lock FROM t WHERE id = $1';
  const locked = db.query<{ v: number; holds_lock: boolean }>(read, [1], { name: 'read_t', lockFirst: LOCK }).finally(() => (settled = true));
  await sleep(300);
  assert.equal(settled, false, 'the statement waits while another transaction holds the row lock');
  await holder.query('COMMIT');
  assert.deepEqual(await locked, [{ v: 1, holds_lock: true }], 'it ran after the holder committed, in the lock\'s transaction');

  // Again on the same connections (both statements prepared by now), several times; writes commit.
  for (let i = 0; i < 5; i++) await db.query('UPDATE t SET v = v + 1 WHERE id = $1 RETURNING v', [1], { name: 'bump_t', lockFirst: LOCK });
  assert.deepEqual(await db.query('SELECT v FROM t WHERE id = 1'), [{ v: 6 }]);
  assert.deepEqual(await db.query(read, [1], { name: 'read_t', lockFirst: LOCK }), [{ v: 6, holds_lock: true }]);
});

test('lockFirst: a failing statement rolls the lock back with it, and the pool goes on', { skip, timeout: 30_000 }, async (t) => {
  const { db, other } = await tableT(t, 1);

  await assert.rejects(
    db.query('UPDATE t SET v = v / (v - v) WHERE id = $1 RETURNING v', [1], { name: 'divide_t', lockFirst: LOCK }),
    (err: { code?: string }) => err.code === '22012',
  );
  // The lock is gone and nothing was written. The failed connection is closed, and its backend ends its
  // transaction when it reads that: a moment later under load (NOWAIT right away failed once in CI), so the
  // lock is waited for, up to a bound that a lock left held would run into.
  await other.query('BEGIN');
  await other.query("SET LOCAL lock_timeout = '5s'");
  await other.query('SELECT FROM t WHERE id = 1 FOR UPDATE');
  await other.query('ROLLBACK');
  assert.deepEqual(await db.query('SELECT v FROM t WHERE id = 1'), [{ v: 0 }]);
  // The pool of one goes on (the failed connection is replaced, as pg-pool does after a failed query).
  assert.deepEqual(await db.query('UPDATE t SET v = v + 2 WHERE id = $1 RETURNING v', [1], { name: 'bump_t', lockFirst: LOCK }), [{ v: 2 }]);
  await assert.rejects(db.query('UPDATE t SET v = v / (v - v) WHERE id = $1 RETURNING v', [1], { name: 'divide_t', lockFirst: LOCK }), (err: { code?: string }) => err.code === '22012');
  assert.deepEqual(await db.query('SELECT count(*)::int AS n FROM t WHERE v = 2'), [{ n: 1 }]);
});
