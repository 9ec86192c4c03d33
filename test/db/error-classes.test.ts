// What a database error means for a request (src/db/errors.ts): retry, unavailable, a bad value, or a bug.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import type { FastifyRequest } from 'fastify';
import { classifyDbError, describeDbFailure } from '../../src/db/errors.ts';
import { toApiError } from '../../src/plugins/errors.ts';
import { createTestDatabase } from '../helper.ts';

test('a statement PostgreSQL refuses as a protocol violation (08P01) is a bug of ours, not a database to retry', async (t) => {
  const db = await createTestDatabase();
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  t.after(async () => {
    await client.end();
    await db.drop();
  });
  // Five values bound to a statement that names four: what a metrics read once sent.
  const err = await client.query('SELECT $1::int + $2::int + $3::int + $4::int', [1, 2, 3, 4, 5]).then(() => null, (e: unknown) => e);
  assert.equal((err as { code?: string } | null)?.code, '08P01');
  assert.equal(classifyDbError(err), null);
  // Connection trouble stays retryable.
  assert.equal(classifyDbError({ code: '08006', severity: 'FATAL', message: 'connection failure' }), 'retryable');
  assert.equal(classifyDbError({ code: 'ECONNRESET', message: 'read ECONNRESET' }), 'retryable');
  assert.equal(classifyDbError({ code: '22003', severity: 'ERROR', message: 'out of range' }), 'bad-value');
});

test('a failed migration statement that starts with a blank line is named by its first line that says something', () => {
  // Found by an operator's review: "… does not exist (SQLSTATE 42P01) while running " and nothing more.
  const failed = Object.assign(new Error('Failed query: \n\nCREATE TABLE "replay_points" (\n  "session_id" bigint)\nparams: '), {
    cause: Object.assign(new Error('relation "public.sessions" does not exist'), { code: '42P01', severity: 'ERROR' }),
  });
  assert.equal(describeDbFailure(failed), 'relation "public.sessions" does not exist (SQLSTATE 42P01) while running CREATE TABLE "replay_points" (');
  // And a wrapped refusal is classified as its cause is (drizzle wraps PostgreSQL's error).
  assert.equal(classifyDbError(Object.assign(new Error('Failed query: SELECT 1'), { cause: { code: '42501', severity: 'ERROR', message: 'permission denied' } })), 'unavailable');
});

test('the embedded database\'s file errors (no message, an errno) are named, not "[object Object]"', () => {
  // What PGlite threw on a first start in a full file system (found by an operator's review).
  const full = Object.assign(Object.create(null), { name: 'ErrnoError', errno: 51 });
  assert.equal(describeDbFailure(full), 'the embedded database could not write its files in ASGD_DATA_DIR: ENOSPC (no space left on device)');
  assert.match(describeDbFailure({ name: 'ErrnoError', errno: 69 }), /EROFS \(read-only file system\)/);
  assert.match(describeDbFailure({ name: 'ErrnoError', errno: 7 }), /file system error 7/);
});

test('sslmode=prefer against a PostgreSQL without TLS: the failure says node-postgres does not fall back, and what to set', async (t) => {
  // What node-postgres throws (pg-connection-string takes prefer as verify-full); libpq users expect a fallback.
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const client = new pg.Client({ connectionString: `${db.url}?sslmode=disable` });
  await client.connect();
  const ssl = (await client.query<{ ssl: string }>('SHOW ssl')).rows[0].ssl;
  await client.end();
  if (ssl === 'on') return t.skip('this PostgreSQL has TLS');
  const refused = new pg.Client({ connectionString: `${db.url}?sslmode=prefer` });
  const err = await refused.connect().then(() => null, (e: unknown) => e);
  await refused.end().catch(() => {});
  assert.ok(err, 'refused');
  assert.match(describeDbFailure(err), /^The server does not support SSL connections: DATABASE_URL's sslmode asks for TLS .* use sslmode=disable$/);
});

test('a database out of disk (SQLSTATE 53100) is 507 INSUFFICIENT_STORAGE, not a 503 that says to retry shortly', () => {
  // Found by an operator's review: a fork that filled the embedded database's disk answered "retry shortly".
  const full = { code: '53100', severity: 'ERROR', message: 'could not extend file "base/5/16412": No space left on device' };
  const api = toApiError(full, {} as FastifyRequest);
  assert.equal(api.statusCode, 507);
  assert.equal(api.code, 'INSUFFICIENT_STORAGE');
  assert.match(api.message, /disk is full \(SQLSTATE 53100\): nothing of this request was committed/);
  assert.equal(api.headers?.['retry-after'], '60');
});
