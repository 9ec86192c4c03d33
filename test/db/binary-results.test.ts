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

test('a COPY stream split anywhere parses the same (fields spanning chunks are joined, others are views)', async () => {
  const { parseBinaryCopy } = await import('../../src/db/binary-results.ts');
  const int32 = (n: number) => { const b = Buffer.alloc(4); b.writeInt32BE(n); return b; };
  const int16 = (n: number) => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b; };
  const blob = Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 31) & 255));
  const version = Buffer.alloc(8);
  version.writeDoubleBE(42);
  const stream = Buffer.concat([
    Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1'), int32(0), int32(0),
    int16(3), int32(8), version, int32(4), Buffer.from([1, 0x5b, 0x32, 0x5d]), int32(blob.length), blob,
    int16(3), int32(8), version, int32(-1), int32(0),
    int16(-1),
  ]);
  const columns = { v: 'float8', present: 'jsonb', data: 'bytea' } as const;
  const expected = [{ v: 42, present: [2], data: blob.toString('hex') }, { v: 42, present: null, data: '' }];
  for (const size of [1, 3, 7, 64, 999, stream.length]) {
    const chunks: Buffer[] = [];
    for (let at = 0; at < stream.length; at += size) chunks.push(stream.subarray(at, at + size));
    const rows = parseBinaryCopy<{ v: number; present: unknown; data: Buffer }>(chunks, columns);
    assert.deepEqual(rows.map((r) => ({ ...r, data: r.data.toString('hex') })), expected, `chunks of ${size}`);
  }
  assert.throws(() => parseBinaryCopy([stream.subarray(0, 40)], columns), /ended early/);
});

test('PostgreSQL: a binary read that fails rejects with PostgreSQL\'s error, and the pool goes on', async () => {
  const scratch = await createTestDatabase();
  try {
    const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 });
    try {
      await assert.rejects(db.query('SELECT x FROM nowhere', [], { binary: { x: 'float8' } }), (err: Error & { code?: string }) => err.code === '42P01');
      assert.deepEqual(await db.query('SELECT 1 AS n'), [{ n: 1 }]);
    } finally {
      await db.close();
    }
  } finally {
    await scratch.drop();
  }
});
