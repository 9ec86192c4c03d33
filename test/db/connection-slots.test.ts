// PostgreSQL out of connection slots: a pool that has connections waits for them, it does not fail requests.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import pg from 'pg';
import { buildTestApp, PG_ADMIN_URL, randomData, TEST_DB_KIND } from '../helper.ts';

test('with a CONNECTION LIMIT below the pool size, concurrent requests wait for the pool\'s connections instead of answering 503', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL only');
  const admin = new pg.Client({ connectionString: PG_ADMIN_URL });
  await admin.connect();
  const suffix = randomBytes(4).toString('hex');
  const role = `asgd_slots_${suffix}`;
  const database = `asgd_slots_${suffix}`;
  // A role (not a superuser: limits do not bind those) allowed 4 connections, owning its database.
  await admin.query(`CREATE ROLE ${role} LOGIN CONNECTION LIMIT 4`);
  await admin.query(`CREATE DATABASE ${database} OWNER ${role}`);
  t.after(async () => {
    await admin.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`);
    await admin.query(`DROP ROLE IF EXISTS ${role}`);
    await admin.end();
  });
  const url = new URL(PG_ADMIN_URL);
  url.username = role;
  url.pathname = `/${database}`;
  // Pool size 10 against 4 slots (one of them the readiness probe's when it runs; probes are off here).
  const { app } = await buildTestApp(t, { databaseUrl: url.toString(), env: { ASGD_DB_POOL_SIZE: '10', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  const params = [{ name: 'w', shape: [64], data: randomData(64, 1) }];
  for (let s = 0; s < 8; s++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: `s${s}`, params } })).statusCode, 201);
  // 8 sessions stepped and read at once, several times: more statements in flight than there are slots.
  const answers = await Promise.all(Array.from({ length: 48 }, (_, i) => i % 2
    ? app.inject({ method: 'POST', url: `/v1/sessions/s${Math.floor(i / 2) % 8}/step`, payload: { grads: { w: randomData(64, 100 + i) } } })
    : app.inject({ url: `/v1/sessions/s${Math.floor(i / 2) % 8}/state_dict` })));
  const failed = answers.filter((r) => r.statusCode !== 200).map((r) => r.body);
  assert.deepEqual(failed, []);
  const { rows } = await admin.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1', [role]);
  assert.ok(rows[0].n <= 4, `${rows[0].n} connections`);
  for (let s = 0; s < 8; s++) assert.equal((await app.inject({ url: `/v1/sessions/s${s}` })).json().version, 4);
});
