// The Bind message with large Buffer values written as they are (src/db/bind.ts): byte for byte what
// pg's own serializer writes, the large values not copied, and PostgreSQL stores what was sent.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { bindParts, type BindConfig } from '../../src/db/bind.ts';
import { openDatabase } from '../../src/db/database.ts';
import { createTestDatabase, TEST_DB_KIND } from '../helper.ts';

/** pg's own mapping of JavaScript values to parameters (numbers and arrays to text, Buffers as they are). */
const { prepareValue } = (pg as unknown as { utils: { prepareValue(v: unknown): unknown } }).utils;

/** A deterministic generator (xorshift32), so that a failure can be run again. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function bytes(rand: () => number, n: number): Buffer {
  const out = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rand() * 256);
  return out;
}

test('bindParts: the same bytes as pg-protocol\'s Bind, for any mix of NULLs, numbers, text, arrays and Buffers small and large', () => {
  const fixed: BindConfig[] = [
    {},
    { portal: '', statement: '', values: [] },
    { statement: 'step_append_1', values: [null, undefined, 1, 'a'] },
    { portal: 'p', statement: 'naïve_名前', binary: true, values: [Buffer.alloc(0), Buffer.alloc(64 * 1024 - 1, 7), Buffer.alloc(64 * 1024, 9)] },
    { values: ['x'.repeat(70_000), 'é'.repeat(40_000), [1, 2, null], { a: 1 }, true, 2.5e-7] },
  ];
  const rand = random(12345);
  const generated: BindConfig[] = Array.from({ length: 300 }, () => {
    const values = Array.from({ length: Math.floor(rand() * 9) }, () => {
      const r = rand();
      if (r < 0.15) return null;
      if (r < 0.3) return rand() * 1e9 - 5e8;
      if (r < 0.45) return 'ü'.repeat(Math.floor(rand() * (rand() < 0.2 ? 50_000 : 20)));
      if (r < 0.55) return [Math.floor(rand() * 10), 'b'];
      return bytes(rand, rand() < 0.3 ? 65_536 + Math.floor(rand() * 5000) : Math.floor(rand() * 200));
    });
    return { portal: rand() < 0.5 ? '' : 'portal', statement: rand() < 0.5 ? '' : `s${Math.floor(rand() * 100)}`, binary: rand() < 0.5, values };
  });
  for (const [i, config] of [...fixed, ...generated].entries()) {
    const withMapper = { ...config, valueMapper: prepareValue };
    const expected = serialize.bind(withMapper as Parameters<typeof serialize.bind>[0]);
    assert.ok(Buffer.concat(bindParts(withMapper)).equals(expected), `config ${i}: the message differs from pg-protocol's`);
  }
});

test('bindParts: a Buffer value of 64 KiB or more is one of the parts itself (not copied); smaller ones are joined', () => {
  const large = Buffer.alloc(4_000_000, 3);
  const small = Buffer.alloc(100, 4);
  const parts = bindParts({ statement: 's', values: [small, large, 'text', null], valueMapper: prepareValue });
  assert.equal(parts.length, 3, 'the framing before the large value, the value, the rest');
  assert.equal(parts[1], large);
  assert.ok(!parts.includes(small));
});

test('a pooled connection sends large bytea and text parameters that PostgreSQL stores exactly', { skip: TEST_DB_KIND !== 'postgres' && 'PostgreSQL only (PGlite does not use pg)' }, async (t) => {
  const scratch = await createTestDatabase();
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2 });
  t.after(async () => {
    await db.close();
    await scratch.drop();
  });
  await db.query('CREATE TABLE blobs (id int PRIMARY KEY, data bytea NOT NULL, note text NOT NULL, n int)');
  const rand = random(99);
  const data = bytes(rand, 3_000_001);
  const note = 'ß'.repeat(100_000);
  await db.query('INSERT INTO blobs VALUES ($1, $2, $3, $4)', [1, data, note, null], { name: 'insert_blob' });
  await db.query('INSERT INTO blobs VALUES ($1, $2, $3, $4)', [2, Buffer.alloc(0), '', 7], { name: 'insert_blob' });
  const rows = await db.query<{ id: number; md5: string; len: number; note_ok: boolean; n: number | null }>(
    'SELECT id, md5(data) AS md5, length(data) AS len, note = $1 AS note_ok, n FROM blobs ORDER BY id', [note]);
  assert.deepEqual(rows, [
    { id: 1, md5: createHash('md5').update(data).digest('hex'), len: data.length, note_ok: true, n: null },
    { id: 2, md5: createHash('md5').update(Buffer.alloc(0)).digest('hex'), len: 0, note_ok: false, n: 7 },
  ]);
});
