// Writes openapi/openapi.json from the routes: `npm run openapi`. test/openapi.test.ts fails while the
// committed file differs from what the routes generate, so run this after changing a route.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { buildApp } from '../src/app.ts';
import { loadConfig } from '../src/config.ts';

export const OPENAPI_FILE = join(dirname(fileURLToPath(import.meta.url)), '..', 'openapi', 'openapi.json');

/**
 * The OpenAPI document of a default configuration (so it does not depend on who runs this). The database
 * is only opened, never read: an in-memory PGlite by default; tests pass their PostgreSQL to save PGlite's start-up.
 */
export async function generateOpenApi(databaseUrl: string | null = null): Promise<Record<string, unknown>> {
  const config = loadConfig({
    LOG_LEVEL: 'silent',
    ASGD_HEALTH_CHECK_INTERVAL_MS: '0',
    ...(databaseUrl ? { DATABASE_URL: databaseUrl, ASGD_DB_POOL_SIZE: '1' } : { ASGD_DATA_DIR: 'memory://' }),
  });
  const app = await buildApp({ config, migrate: false, logger: false });
  try {
    await app.ready();
    // A JSON round trip: the file holds exactly what JSON can say (no undefined, no symbols).
    return JSON.parse(JSON.stringify(app.swagger())) as Record<string, unknown>;
  } finally {
    await app.close();
  }
}

export const serialize = (doc: unknown) => `${JSON.stringify(doc, null, 2)}\n`;

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const doc = await generateOpenApi();
  mkdirSync(dirname(OPENAPI_FILE), { recursive: true });
  writeFileSync(OPENAPI_FILE, serialize(doc));
  console.log(`wrote ${OPENAPI_FILE} (${Object.keys(doc.paths as object).length} paths)`);
}
