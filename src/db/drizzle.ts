// drizzle-orm, loaded through require. Node 24's ESM loader reads drizzle-orm's package.json (179 KB, most
// of it the "exports" map) again for each module it loads from the package: importing drizzle-orm as ES
// modules took 0.4-0.5 s and peaked at 160 MB of heap, which V8 kept committed afterwards (an idle server
// held 290 MB resident). Its CommonJS build is the same code and loads in 80 ms and 12 MB: an idle server
// now holds about half. Types come from the same entry points.
import { createRequire } from 'node:module';

// import.meta.url in Node; drizzle-kit (db:generate) runs schema.ts as CommonJS, where __filename is set.
const load = createRequire(import.meta.url ?? __filename);

export const drizzleOrm = load('drizzle-orm') as typeof import('drizzle-orm');
export const pgCore = load('drizzle-orm/pg-core') as typeof import('drizzle-orm/pg-core');
export const nodePostgres = load('drizzle-orm/node-postgres') as typeof import('drizzle-orm/node-postgres');
export const nodePostgresMigrator = load('drizzle-orm/node-postgres/migrator') as typeof import('drizzle-orm/node-postgres/migrator');

/**
 * PGlite with its drizzle driver and migrator (only a PGlite database loads them). PGlite comes through
 * require too: drizzle's driver requires it, and one copy of it in the process is enough.
 */
export function pgliteDrizzle() {
  return {
    PGlite: (load('@electric-sql/pglite') as typeof import('@electric-sql/pglite')).PGlite,
    drizzle: (load('drizzle-orm/pglite') as typeof import('drizzle-orm/pglite')).drizzle,
    migrate: (load('drizzle-orm/pglite/migrator') as typeof import('drizzle-orm/pglite/migrator')).migrate,
  };
}
