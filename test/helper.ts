// One helper that builds the app for a test and closes it, against a real PostgreSQL database made for
// the test (created and dropped here) or, with ASGD_TEST_DB=pglite, an embedded in-memory PGlite.
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, type TestContext } from 'node:test';
import pg from 'pg';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../src/app.ts';
import { makeMemoryTemplate, useMemoryTemplate } from '../src/db/database.ts';
import { loadConfig, type Config } from '../src/config.ts';
import { createScratchDatabase, type ScratchDatabase } from './support/scratch-db.ts';

/** Admin connection to the machine's PostgreSQL (trust auth); override with ASGD_TEST_PG. */
export const PG_ADMIN_URL = process.env.ASGD_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const TEST_DB_KIND = process.env.ASGD_TEST_DB === 'pglite' ? 'pglite' : 'postgres';

let pgliteTemplate: Promise<void> | null = null;

/**
 * On PGlite, each test's memory:// database starts from a copy of an initialised one kept in the system's
 * temporary directory (one a PGlite version), as the first test process made it: initdb costs 2.4 s of CPU
 * a database, a copy 0.9 s; the embedded database's test run made ~150 of them.
 */
function usePgliteTemplate(): Promise<void> {
  pgliteTemplate ??= (async () => {
    const version = JSON.parse(readFileSync(new URL('../node_modules/@electric-sql/pglite/package.json', import.meta.url), 'utf8')).version as string;
    const path = join(tmpdir(), `asgd-test-pglite-${version}.tar`);
    let bytes: Buffer;
    try {
      bytes = readFileSync(path);
    } catch {
      bytes = Buffer.from(await (await makeMemoryTemplate()).arrayBuffer());
      // Written whole under another name first: a test process reading it never sees half of it.
      const partial = `${path}.${process.pid}`;
      writeFileSync(partial, bytes);
      renameSync(partial, path);
    }
    useMemoryTemplate(new Blob([new Uint8Array(bytes.buffer as ArrayBuffer, bytes.byteOffset, bytes.byteLength)]));
  })();
  return pgliteTemplate;
}

/**
 * A database named for the test file's run (asgd_test_<tag>_<hex>, the tag from scripts/run-tests.mjs, else
 * this process's id): what a file that crashed or was stopped left behind, the runner drops once the file's
 * process has ended.
 */
export function createTestDatabase(): Promise<ScratchDatabase> {
  const tag = /^[a-z0-9]{1,24}$/.test(process.env.ASGD_TEST_DB_TAG ?? '') ? process.env.ASGD_TEST_DB_TAG : `p${process.pid}`;
  return createScratchDatabase(PG_ADMIN_URL, `asgd_test_${tag}`);
}

/*
 * The test app's PostgreSQL databases are reused within a test file: when a test ends, its database's tables
 * are emptied and it serves the file's next test; the file's databases are dropped when it ends. PostgreSQL
 * 15's DROP DATABASE waits for a checkpoint of the whole server (every dirty page of every database, the
 * other test file's too: 0.1-0.9 s here, and each makes the pages written after it log whole again), and a
 * new database is migrated (13 migrations): both were paid by each of some 450 tests. A database is reused
 * only when nothing but rows changed: no connection is left on it, and its catalogue (tables, columns,
 * indexes, constraints, privileges, settings, sequences, migrations) is what it was once migrated.
 */
const reusable: ScratchDatabase[] = [];
const madeHere = new Set<ScratchDatabase>();
const inUseElsewhere = new Set<ScratchDatabase>();
let migratedShape: string | null = null;

const SHAPE_SQL = `
SELECT md5(string_agg(x, '|' ORDER BY x)) AS shape FROM (
  SELECT 'c:' || table_schema || '.' || table_name || '.' || column_name || ':' || data_type || ':' || coalesce(column_default, '') || ':' || is_nullable
    FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
  UNION ALL SELECT 'i:' || schemaname || '.' || indexname || ':' || indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL SELECT 'k:' || conrelid::regclass::text || '.' || conname || ':' || pg_get_constraintdef(oid) FROM pg_constraint
    WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL SELECT 't:' || tgrelid::regclass::text || '.' || tgname || ':' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL SELECT 'r:' || c.oid::regclass::text || ':' || c.relkind::text || ':' || c.relpersistence::text || ':' || coalesce(c.relacl::text, '') || ':' || coalesce(c.reloptions::text, '') || ':' || pg_get_userbyid(c.relowner)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  UNION ALL SELECT 'n:' || nspname || ':' || coalesce(nspacl::text, '') || ':' || pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  UNION ALL SELECT 'f:' || p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL SELECT 'q:' || schemaname || '.' || sequencename || ':' || coalesce(last_value::text, 'fresh') FROM pg_sequences
  UNION ALL SELECT 's:' || coalesce(array_to_string(setconfig, ','), '') FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION ALL SELECT 'd:' || datconnlimit || ':' || datallowconn || ':' || coalesce(datacl::text, '') || ':' || pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()
  UNION ALL SELECT 'a:' || a.attrelid::regclass::text || '.' || a.attname || ':' || format_type(a.atttypid, a.atttypmod) || ':' || a.attstorage::text || ':' || coalesce(a.attcompression::text, '') || ':' || coalesce(a.attacl::text, '') || ':' || a.attisdropped::text
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attnum > 0 AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  UNION ALL SELECT 'u:' || ev_class::regclass::text || '.' || rulename || ':' || pg_get_ruledef(oid) FROM pg_rewrite
    WHERE ev_class IN (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
  UNION ALL SELECT 'y:' || polrelid::regclass::text || '.' || polname || ':' || coalesce(pg_get_expr(polqual, polrelid), '') || ':' || coalesce(pg_get_expr(polwithcheck, polrelid), '') FROM pg_policy
  UNION ALL SELECT 'w:' || c.oid::regclass::text || ':' || c.relrowsecurity::text || ':' || c.relforcerowsecurity::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  UNION ALL SELECT 'e:' || t.oid::regtype::text || ':' || t.typtype::text || ':' || coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = t.oid), '')
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  UNION ALL SELECT 'b:' || p.oid::regprocedure::text || ':' || md5(p.prosrc) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL SELECT 'g:' || coalesce(defaclacl::text, '') FROM pg_default_acl
  UNION ALL SELECT 'x:' || extname || ':' || extversion FROM pg_extension
  UNION ALL SELECT 'v:' || evtname FROM pg_event_trigger
  UNION ALL SELECT 'l:' || count(*) FROM pg_largeobject_metadata
  UNION ALL SELECT 'o:' || setrole::text || ':' || coalesce(array_to_string(setconfig, ','), '') FROM pg_db_role_setting WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
  UNION ALL SELECT 'm:' || count(*) || ':' || coalesce(md5(string_agg(hash || ':' || created_at, ',' ORDER BY id)), '') FROM drizzle.__drizzle_migrations
) AS catalogue(x)`;

/** `fn` with a connection of its own to the database at `url`, closed after it. */
export async function onDatabase<T>(url: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

// When the file's last test has ended (a hook of the file's root: this module is imported by test files
// only): its databases, reused or not (a test that built its app without a context dropped none before).
after(async () => {
  for (const db of madeHere) await db.drop();
});

async function acquireTestDatabase(): Promise<{ db: ScratchDatabase; fresh: boolean }> {
  // Those another app still used when their test ended (closed by a later hook of that test) first.
  for (const db of [...inUseElsewhere]) {
    if (!inUseElsewhere.delete(db)) continue; // taken by an acquire running beside this one
    const state = await emptied(db);
    if (state === 'in use') inUseElsewhere.add(db);
    if (state === 'kept') reusable.push(db);
    if (state === 'changed') await dropTestDatabase(db);
  }
  const db = reusable.pop();
  if (db) return { db, fresh: false };
  const made = await createTestDatabase();
  madeHere.add(made);
  return { db: made, fresh: true };
}

/** Empties a database no one else is connected to; 'kept' when its catalogue is as migrated. */
async function emptied(db: ScratchDatabase): Promise<'kept' | 'in use' | 'changed'> {
  return onDatabase(db.url, async (client) => {
    const others = await client.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()');
    if (others.rows[0].n > 0) return 'in use';
    // A prepared transaction holds its locks with no connection: TRUNCATE would wait for it.
    const prepared = await client.query('SELECT count(*)::int AS n FROM pg_prepared_xacts WHERE database = current_database()');
    if (prepared.rows[0].n > 0) return 'changed';
    const tables = await client.query("SELECT string_agg(format('%I.%I', schemaname, tablename), ', ') AS list FROM pg_tables WHERE schemaname = 'public'");
    if (tables.rows[0].list) await client.query(`TRUNCATE ${tables.rows[0].list} RESTART IDENTITY CASCADE`);
    const { rows } = await client.query(SHAPE_SQL);
    return migratedShape !== null && rows[0].shape === migratedShape ? 'kept' as const : 'changed' as const;
  }).catch(() => 'changed' as const);
}

async function dropTestDatabase(db: ScratchDatabase): Promise<void> {
  madeHere.delete(db);
  await db.drop();
}

/** A database whose app has closed: emptied and kept for the file's next test, or dropped now. */
async function releaseTestDatabase(db: ScratchDatabase): Promise<void> {
  const state = await emptied(db);
  if (process.env.POOL_DEBUG) console.error('POOL', db.url.slice(-12), state);
  if (state === 'kept') reusable.push(db);
  else if (state === 'in use') inUseElsewhere.add(db);
  else await dropTestDatabase(db);
}

export function testConfig(overrides: Record<string, string> = {}): Config {
  return loadConfig({ LOG_LEVEL: 'silent', ...overrides });
}

export interface TestApp {
  app: FastifyInstance;
  config: Config;
  databaseUrl: string | null;
}

/**
 * Builds the app on an empty database; closes it when the test ends, and empties the database for the file's
 * next test or drops it.
 * `databaseUrl` reuses an existing database (for several apps on one database, as several processes).
 */
/**
 * `config`: settings put over what the environment gives, past its checks (a heap bound of 1 byte, which
 * the service refuses at start, to put a test app under pressure at once).
 */
export async function buildTestApp(t: TestContext | null, opts: { env?: Record<string, string>; databaseUrl?: string; config?: Partial<Config> } = {}): Promise<TestApp> {
  let databaseUrl: string | null = opts.databaseUrl ?? null;
  let own: { db: ScratchDatabase; fresh: boolean } | null = null;
  if (!databaseUrl && TEST_DB_KIND === 'postgres') {
    own = await acquireTestDatabase();
    databaseUrl = own.db.url;
  }
  if (!databaseUrl) await usePgliteTemplate();
  const config = {
    ...testConfig({
      ...(databaseUrl ? { DATABASE_URL: databaseUrl } : { ASGD_DATA_DIR: 'memory://' }),
      ...opts.env,
    }),
    ...opts.config,
  };
  const app = await buildApp({ config, migrate: true, logger: process.env.TEST_LOG ? { level: process.env.TEST_LOG } : false });
  await app.ready();
  // The catalogue of a database just migrated: what one emptied after its test must still have to be reused.
  if (own?.fresh && migratedShape === null) migratedShape = await onDatabase(own.db.url, async (client) => (await client.query(SHAPE_SQL)).rows[0].shape as string);
  const close = async () => {
    await app.close();
    if (own) await releaseTestDatabase(own.db);
  };
  if (t) t.after(close);
  return { app, config, databaseUrl };
}

/** A small deterministic pseudo-random source for test data. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296 - 0.5;
  };
}

export function randomData(n: number, seed: number, scale = 1): number[] {
  const r = rng(seed);
  return Array.from({ length: n }, () => Math.fround(r() * scale));
}

export const bits = (a: ArrayLike<number>): number[] => Array.from(new Uint32Array(Float32Array.from(a).buffer));
