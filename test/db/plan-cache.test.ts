// The service's PostgreSQL connections use generic plans for their prepared statements (withGenericPlans):
// the step statement is planned once per connection, not on every execution. Options already in
// DATABASE_URL are kept, and a plan_cache_mode given there wins.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openDatabase, withGenericPlans } from '../../src/db/database.ts';
import { createTestDatabase } from '../helper.ts';

test('withGenericPlans adds the setting to the startup options and keeps what the URL has', () => {
  const options = (url: string) => new URL(withGenericPlans(url)).searchParams.get('options');
  assert.equal(options('postgres://u@db:5432/asgd'), '-c plan_cache_mode=force_generic_plan');
  assert.equal(options('postgresql://u:p%40ss@db/asgd?sslmode=require&options=-c%20search_path%3Dx'), '-c search_path=x -c plan_cache_mode=force_generic_plan');
  assert.equal(new URL(withGenericPlans('postgres://u:p%40ss@db/asgd?sslmode=require')).password, 'p%40ss');
  assert.equal(new URL(withGenericPlans('postgres://u:p%40ss@db/asgd?sslmode=require')).searchParams.get('sslmode'), 'require');
  for (const untouched of ['postgres://u@db/asgd?options=-c%20plan_cache_mode%3Dauto', 'not a url', 'mysql://db/x']) assert.equal(withGenericPlans(untouched), untouched);
});

test('PostgreSQL: every pooled connection plans generically; the URL can still choose', async () => {
  const scratch = await createTestDatabase();
  try {
    const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 3 });
    try {
      const modes = await Promise.all([1, 2, 3].map(() => db.transaction((tx) => tx.query<{ plan_cache_mode: string }>('SHOW plan_cache_mode'))));
      assert.deepEqual(modes.map((m) => m[0].plan_cache_mode), ['force_generic_plan', 'force_generic_plan', 'force_generic_plan']);
    } finally {
      await db.close();
    }
    const url = new URL(scratch.url);
    url.searchParams.set('options', '-c plan_cache_mode=force_custom_plan');
    const chosen = await openDatabase({ databaseUrl: url.toString(), dataDir: '', poolSize: 1 });
    try {
      assert.equal((await chosen.query<{ plan_cache_mode: string }>('SHOW plan_cache_mode'))[0].plan_cache_mode, 'force_custom_plan');
    } finally {
      await chosen.close();
    }
  } finally {
    await scratch.drop();
  }
});
