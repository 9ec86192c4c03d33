// The process: read the configuration, build the app, listen, close with grace on SIGTERM/SIGINT.
import { buildApp } from './app.ts';
import { ConfigError, loadConfig, type Config } from './config.ts';

export async function startServer(config: Config, opts: { migrate?: boolean } = {}) {
  const app = await buildApp({
    config,
    // The embedded database is this process's own: migrate it. Replicas on PostgreSQL run `migrate` once
    // (docker-compose's one-shot service); ASGD_MIGRATE=true makes a replica do it too (it takes a lock).
    migrate: opts.migrate ?? !config.databaseUrl,
    logger: {
      level: config.logLevel,
      redact: { paths: ['req.headers.authorization', 'headers.authorization'], censor: '[redacted]' },
      ...(process.stdout.isTTY && { transport: { target: 'pino-pretty' } }),
    },
  });
  let closing = false;
  const shutdown = async (signal: string) => {
    if (closing) return;
    closing = true;
    app.log.info({ signal }, 'closing: finishing in-flight requests');
    // Stops accepting, lets in-flight steps finish and commit, writes shutdown snapshots, closes the pool.
    const timer = setTimeout(() => {
      app.log.error('graceful shutdown timed out');
      process.exit(1);
    }, 60_000);
    timer.unref();
    try {
      await app.close();
      process.exit(0);
    } catch (err) {
      app.log.error({ err }, 'error while closing');
      process.exit(1);
    }
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
  await app.listen({ host: config.host, port: config.port });
  return app;
}

const isMain = import.meta.url === `file://${process.argv[1]}`;
if (isMain) {
  try {
    const config = loadConfig();
    await startServer(config, { migrate: process.env.ASGD_MIGRATE ? process.env.ASGD_MIGRATE === 'true' : undefined });
  } catch (err) {
    if (err instanceof ConfigError) {
      console.error(`asgd-serve: ${err.message}`);
      process.exit(2);
    }
    throw err;
  }
}
