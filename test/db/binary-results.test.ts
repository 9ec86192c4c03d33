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

test('a COPY stream\'s rows are handed over as each arrives whole, before the rest of the stream', async () => {
  const { BinaryCopyParser } = await import('../../src/db/binary-results.ts');
  const int32 = (n: number) => { const b = Buffer.alloc(4); b.writeInt32BE(n); return b; };
  const int16 = (n: number) => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b; };
  const row = (n: number, bytes: number) => Buffer.concat([int16(2), int32(4), int32(n), int32(bytes), Buffer.alloc(bytes, n)]);
  const stream = Buffer.concat([Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1'), int32(0), int32(0), row(1, 300), row(2, 0), row(3, 5000), int16(-1)]);
  const seen: { n: number; bytes: number; pushed: number }[] = [];
  let pushed = 0;
  const parser = new BinaryCopyParser<{ n: number; data: Buffer }>({ n: 'int4', data: 'bytea' }, (r) => {
    assert.ok(r.data.every((b) => b === r.n));
    seen.push({ n: r.n, bytes: r.data.byteLength, pushed });
  });
  const size = 100;
  for (let at = 0; at < stream.length; at += size) {
    pushed = Math.min(stream.length, at + size);
    parser.push(stream.subarray(at, at + size));
  }
  parser.end();
  // Each row is handed over by the push that completes it: 19 header bytes, then 14 + its bytes a row.
  const ends = [19 + 14 + 300, 19 + 14 + 300 + 14, 19 + 14 + 300 + 14 + 14 + 5000];
  assert.deepEqual(seen, [1, 2, 3].map((n, i) => ({ n, bytes: [300, 0, 5000][i], pushed: Math.min(stream.length, Math.ceil(ends[i] / size) * size) })));
  // A second stream after the trailer, or a stream cut short, is refused.
  assert.throws(() => parser.push(Buffer.from([0])), /after the end/);
  const cut = new BinaryCopyParser({ n: 'int4', data: 'bytea' }, () => {});
  cut.push(stream.subarray(0, 200));
  assert.throws(() => cut.end(), /ended early/);
});

for (const kind of ['PGlite', 'PostgreSQL'] as const) {
  test(`${kind}: rows read with onRow arrive in order; when onRow throws, the query rejects with its error and the connection goes on`, async () => {
    const scratch = kind === 'PostgreSQL' ? await createTestDatabase() : null;
    const db = await openDatabase({ databaseUrl: scratch?.url ?? null, dataDir: 'memory://', poolSize: 1 });
    try {
      await db.query('CREATE TABLE s_t (id int8, data bytea)');
      for (let i = 1; i <= 5; i++) await db.query(`INSERT INTO s_t VALUES ($1, ${db.byteaParam(2)})`, [i, db.byteaValue(Buffer.alloc(300_000, i))]);
      const ids: number[] = [];
      const rows = await db.query('SELECT id, data FROM s_t WHERE id > $1 ORDER BY id', [0], {
        binary: { id: 'int8', data: 'bytea' },
        onRow: (row: { id: number; data: Buffer }) => {
          assert.ok(row.data.byteLength === 300_000 && row.data.every((b) => b === row.id));
          ids.push(row.id);
        },
      });
      assert.deepEqual(rows, []);
      assert.deepEqual(ids, [1, 2, 3, 4, 5]);
      await db.transaction(async (tx) => {
        const got: number[] = [];
        await assert.rejects(tx.query('SELECT id, data FROM s_t WHERE id > $1 ORDER BY id', [0], {
          binary: { id: 'int8', data: 'bytea' },
          onRow: (row: { id: number }) => {
            got.push(row.id);
            if (row.id === 2) throw new Error('refused at 2');
          },
        }), /refused at 2/);
        assert.deepEqual(got, [1, 2]); // nothing handed over after the error
        // The same connection, in the same transaction, reads on.
        assert.deepEqual(await tx.query('SELECT count(*)::int AS n FROM s_t'), [{ n: 5 }]);
      });
    } finally {
      await db.close();
      await scratch?.drop();
    }
  });
}

test('PostgreSQL: rows whose own work (onRow) outlasts ASGD_DB_TIMEOUT_MS are no silence of the database\'s: the read is not cancelled', async () => {
  // Found by a review: the silence watch counted a replayed step's time as the database's, and cancelled the
  // COPY while PostgreSQL was still sending (rows of 20 MB: it was).
  const scratch = await createTestDatabase();
  const setup = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 });
  await setup.query("CREATE TABLE s_u AS SELECT g::int8 AS id, convert_to(repeat('x', 20000000), 'UTF8') AS data FROM generate_series(1, 4) g");
  await setup.close();
  // 1 s, not shorter: it is also the time a connection may take to open (200 ms was too short in a CI run).
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1, silenceTimeoutMs: 1_000 });
  try {
    const busy = (ms: number) => { const end = Date.now() + ms; while (Date.now() < end); };
    const got: number[] = [];
    await db.query('SELECT id, data FROM s_u WHERE id > $1 ORDER BY id', [0], {
      binary: { id: 'int8', data: 'bytea' },
      onRow: (row: { id: number }) => { got.push(row.id); busy(1500); },
    });
    assert.deepEqual(got, [1, 2, 3, 4]);
    assert.deepEqual(await db.query('SELECT 1 AS n'), [{ n: 1 }]);
  } finally {
    await db.close();
    await scratch.drop();
  }
});
