// Binary reads on both databases: every byte value, empty and NULL bytea, jsonb, int8 and float8 come
// back as written, through pg's binary COPY to STDOUT and through PGlite's binary COPY.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openDatabase, type Database } from '../../src/db/database.ts';
import { copyToSql } from '../../src/db/binary-results.ts';
import { createTestDatabase } from '../helper.ts';

async function roundTrip(db: Database) {
  await db.query('CREATE TABLE bin_t (id int8, ratio float8, present jsonb, data bytea)');
  const all = Buffer.from(Array.from({ length: 256 * 40 }, (_, i) => i % 256));
  const rows = [
    [1, 0.1, [0, 2, 5], all],
    [2, -1e300, { a: 'ü' }, Buffer.alloc(0)],
    [3, 2 ** 53 - 1, [], null],
  ] as const;
  for (const [id, ratio, present, data] of rows) {
    await db.query(`INSERT INTO bin_t VALUES ($1, $2, $3, ${db.byteaParam(4)})`, [id, ratio, JSON.stringify(present), data && db.byteaValue(data)]);
  }
  const read = await db.query('SELECT id, ratio, present, data FROM bin_t WHERE id >= $1 ORDER BY id', [1], {
    binary: { id: 'int8', ratio: 'float8', present: 'jsonb', data: 'bytea' },
  });
  const want = rows.map(([id, ratio, present, data]) => ({ id, ratio, present, data: data && data.toString("hex") }));
  assert.deepEqual(read.map((r) => ({ ...r, data: r.data && (r.data as Buffer).toString("hex") })), want);
  assert.ok(Buffer.isBuffer(read[0].data));
  // inside a transaction too
  const inTx = await db.transaction((tx) => tx.query('SELECT data FROM bin_t WHERE id = $1', [1], { binary: { data: 'bytea' } }));
  assert.ok((inTx[0].data as Buffer).equals(all));
  assert.deepEqual(await db.query('SELECT data FROM bin_t WHERE id = $1', [99], { binary: { data: 'bytea' } }), []);
}

test('PGlite: binary COPY to the blob device', async () => {
  const db = await openDatabase({ databaseUrl: null, dataDir: 'memory://', poolSize: 1 });
  try {
    await roundTrip(db);
  } finally {
    await db.close();
  }
});

test('PostgreSQL: binary COPY to STDOUT', async () => {
  const scratch = await createTestDatabase();
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2 });
  try {
    await roundTrip(db);
  } finally {
    await db.close();
    await scratch.drop();
  }
});

test('a binary read on PGlite takes numeric parameters only (COPY has no bind parameters)', () => {
  assert.equal(copyToSql('SELECT a FROM t WHERE x = $1 AND y < $2 LIMIT $10', [5, 6.5, 0, 0, 0, 0, 0, 0, 0, 3], "'/dev/blob'"), "COPY (SELECT a FROM t WHERE x = 5 AND y < 6.5 LIMIT 3) TO '/dev/blob' WITH (FORMAT binary)");
  assert.throws(() => copyToSql('SELECT $1', ["1; DROP TABLE t"], 'STDOUT'), /parameter \$1 must be a finite number/);
  assert.throws(() => copyToSql('SELECT $1', [NaN], 'STDOUT'), /finite number/);
});
