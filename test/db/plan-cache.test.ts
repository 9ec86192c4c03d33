// The service's PostgreSQL connections use generic plans for their prepared statements (withGenericPlans):
// the step statement is planned once per connection, not on every execution. Options already in
// DATABASE_URL are kept, and a plan_cache_mode given there wins.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { openDatabase, withGenericPlans } from '../../src/db/database.ts';
import * as repo from '../../src/sessions/repository.ts';
import { createTestDatabase } from '../helper.ts';

test('withGenericPlans adds the setting to the startup options and keeps what the URL has', () => {
  const options = (url: string) => new URL(withGenericPlans(url)).searchParams.get('options');
  assert.equal(options('postgres://u@db:5432/asgd'), '-c plan_cache_mode=force_generic_plan');
  assert.equal(options('postgresql://u:p%40ss@db/asgd?sslmode=require&options=-c%20search_path%3Dx'), '-c search_path=x -c plan_cache_mode=force_generic_plan');
  assert.equal(new URL(withGenericPlans('postgres://u:p%40ss@db/asgd?sslmode=require')).password, 'p%40ss');
  assert.equal(new URL(withGenericPlans('postgres://u:p%40ss@db/asgd?sslmode=require')).searchParams.get('sslmode'), 'require');
  for (const untouched of ['postgres://u@db/asgd?options=-c%20plan_cache_mode%3Dauto', 'not a url', 'mysql://db/x']) assert.equal(withGenericPlans(untouched), untouched);
});

test('withGenericPlans: libpq\'s Unix-socket URL (credentials, no host), which WHATWG\'s URL refuses, gets the setting too', () => {
  // Found by an operator's review: the README's own socket form went without generic plans. Read back as pg does.
  const parse = (url: string) => (new pg.Client({ connectionString: url }) as unknown as { connectionParameters: { options?: string; host: string } }).connectionParameters;
  const options = (url: string) => parse(withGenericPlans(url)).options;
  assert.equal(options('postgres://postgres@/asgd?host=/var/run/postgresql'), '-c plan_cache_mode=force_generic_plan');
  assert.equal(parse(withGenericPlans('postgres://postgres@/asgd?host=/var/run/postgresql')).host, '/var/run/postgresql');
  assert.equal(options('postgres://u@/asgd?host=/tmp&options=-c%20statement_timeout%3D5s'), '-c statement_timeout=5s -c plan_cache_mode=force_generic_plan');
  assert.equal(options('postgres://u@/asgd'), '-c plan_cache_mode=force_generic_plan');
  assert.equal(withGenericPlans('postgres://u@/asgd?options=-c%20plan_cache_mode%3Dauto'), 'postgres://u@/asgd?options=-c%20plan_cache_mode%3Dauto');
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

test('PostgreSQL, generic plans: a step looks its Idempotency-Key up with one index probe, however many keys its session holds', async () => {
  const scratch = await createTestDatabase();
  try {
    const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 1 }); // one connection: one plan, its statistics
    try {
      await db.migrate();
      const session = await repo.insertSession(db, {
        name: 'keyed', params: [{ name: 'w', shape: [4], numel: 4, offset: 0 }] as never, groups: [{ lr: 0.01, lambd: 1e-4, alpha: 0.75, t0: 1e6, weight_decay: 0, maximize: false, int_keys: [], params: [0] }] as never,
        numel: 4, step: 0, snapshotEvery: 100, keepSnapshots: 10, maxStaleness: null,
      });
      assert.ok(session);
      const step = (key: string): repo.BatchStep => ({
        present: [0], grads: Buffer.alloc(16), gradDtype: 'float32' as never, hyper: null, metrics: null, ifMatch: null, baseVersion: null, key, requestHash: key,
      });
      // Planned while the session holds no key (as a training run's first step is), then 3,000 keys recorded.
      assert.ok((await repo.appendSteps(db, session.id, session.name, [step('first'), step('second')], 86_400))?.session);
      await db.query("INSERT INTO idempotency_keys (session_id, key, request_hash, response) SELECT $1, 'k' || i, 'h', '{}' FROM generate_series(1, 3000) i", [session.id]);
      const indexReads = async () => {
        await db.query('SELECT pg_stat_force_next_flush()');
        await db.query('SELECT 1'); // the flush happens when this connection goes idle
        const [r] = await db.query<{ n: number }>("SELECT coalesce(sum(idx_tup_read), 0)::float8 AS n FROM pg_stat_user_indexes WHERE relname = 'idempotency_keys'");
        return r.n;
      };
      const before = await indexReads();
      const appended = await repo.appendSteps(db, session.id, session.name, [step('next'), step('k17')], 86_400);
      const read = (await indexReads()) - before;
      assert.deepEqual(appended?.known.map((k) => k.index), [1], 'the batch finds the key recorded before');
      assert.ok(read <= 4, `the statement read ${read} index entries of idempotency_keys for a batch of 2 keys`);
    } finally {
      await db.close();
    }
  } finally {
    await scratch.drop();
  }
});

test('PostgreSQL: the service names its connections (application_name asgd-serve); a name in the URL wins', async () => {
  const scratch = await createTestDatabase();
  try {
    const names = async (url: string) => {
      const db = await openDatabase({ databaseUrl: url, dataDir: '', poolSize: 2 });
      try {
        return (await db.transaction((tx) => tx.query<{ name: string }>("SELECT current_setting('application_name') AS name")))[0].name;
      } finally {
        await db.close();
      }
    };
    assert.equal(await names(scratch.url), 'asgd-serve');
    const url = new URL(scratch.url);
    url.searchParams.set('application_name', 'trainer-7');
    assert.equal(await names(url.toString()), 'trainer-7');
  } finally {
    await scratch.drop();
  }
});
