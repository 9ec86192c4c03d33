// One helper that builds the app for a test and closes it, against a real PostgreSQL database made for
// the test (created and dropped here) or, with ASGD_TEST_DB=pglite, an embedded in-memory PGlite.
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
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

export function createTestDatabase(): Promise<ScratchDatabase> {
  return createScratchDatabase(PG_ADMIN_URL, 'asgd_test');
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
 * Builds the app on a fresh database; closes it and drops the database when the test ends.
 * `databaseUrl` reuses an existing database (for several apps on one database, as several processes).
 */
/**
 * `config`: settings put over what the environment gives, past its checks (a heap bound of 1 byte, which
 * the service refuses at start, to put a test app under pressure at once).
 */
export async function buildTestApp(t: TestContext | null, opts: { env?: Record<string, string>; databaseUrl?: string; config?: Partial<Config> } = {}): Promise<TestApp> {
  let databaseUrl: string | null = opts.databaseUrl ?? null;
  let drop: (() => Promise<void>) | null = null;
  if (!databaseUrl && TEST_DB_KIND === 'postgres') {
    const db = await createTestDatabase();
    databaseUrl = db.url;
    drop = db.drop;
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
  const close = async () => {
    await app.close();
    if (drop) await drop();
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
