// /readyz polled while PostgreSQL hangs (its process stopped, a dead route): one probe query at a time on the
// probe's connection. Each poll queued a query of its own behind the one PostgreSQL did not answer, and pg
// warned, once a process, that a query was sent while one ran (an operator's review; pg 9 makes it an
// error). Its own file: the warning comes once a process, and this test is the process's only one.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, TEST_DB_KIND } from '../helper.ts';
import { proxiedDatabase } from './db-proxy.ts';

test('readiness polled while the database hangs: each poll 503 at its deadline, one probe query in flight, no "already executing a query"; ready again once it answers', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('PostgreSQL over TCP');
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(w.message);
  process.on('warning', onWarning);
  t.after(() => process.off('warning', onWarning));
  const { url, proxy } = await proxiedDatabase(t);
  const { app } = await buildTestApp(t, { databaseUrl: url.toString(), env: { ASGD_DB_TIMEOUT_MS: '60000', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  assert.equal((await app.inject({ url: '/readyz' })).statusCode, 200);
  proxy.mode = 'black-hole';
  for (let i = 0; i < 3; i++) {
    const started = Date.now();
    const res = await app.inject({ url: '/readyz' });
    assert.equal(res.statusCode, 503, res.body);
    assert.ok(Date.now() - started < 4_000, `answered after ${Date.now() - started} ms`);
  }
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(warnings.filter((w) => /already executing a query/.test(w)), []);
  // The probe's connection stays silent until ASGD_DB_TIMEOUT_MS; the database back, a new one answers.
  proxy.mode = 'pass';
  proxy.dropAll();
  let ready = 0;
  for (let i = 0; i < 50 && ready !== 200; i++) {
    ready = (await app.inject({ url: '/readyz' })).statusCode;
    if (ready !== 200) await new Promise((resolve) => setTimeout(resolve, 200));
  }
  assert.equal(ready, 200);
});
