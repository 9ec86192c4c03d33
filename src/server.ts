// The process: read the configuration, build the app, listen, close with grace on SIGTERM/SIGINT.
import { buildApp, loggerOptions } from './app.ts';
import { ConfigError, isLoopback, loadConfig, type Config } from './config.ts';
import { KernelUnavailableError } from './optim/index.ts';

export async function startServer(config: Config, opts: { migrate?: boolean } = {}) {
  const app = await buildApp({
    config,
    // Pending migrations are applied at start unless ASGD_MIGRATE=false: replicas on PostgreSQL take an
    // advisory lock, so any number can start at once; docker-compose also runs `migrate` once before them.
    migrate: opts.migrate ?? config.migrateOnStart ?? true,
    logger: loggerOptions(config),
  });
  if (!config.adminToken && !isLoopback(config.host)) {
    app.log.warn({ host: config.host }, 'ASGD_ALLOW_INSECURE: listening beyond loopback WITHOUT authentication');
  }
  let closing = false;
  const shutdown = async (signal: string) => {
    if (closing) return;
    closing = true;
    app.log.info({ signal }, 'closing: finishing in-flight requests');
    // Stops accepting (new requests on open connections get 503), lets in-flight steps finish and commit,
    // writes shutdown snapshots, closes the pool. A second signal does not cut this short; the timer does.
    const timer = setTimeout(() => {
      app.log.error({ timeoutMs: config.shutdownTimeoutMs }, 'graceful shutdown timed out');
      process.exit(1);
    }, config.shutdownTimeoutMs);
    timer.unref();
    try {
      await app.close();
      app.log.info('closed');
      process.exit(0);
    } catch (err) {
      app.log.error({ err }, 'error while closing');
      process.exit(1);
    }
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
  try {
    await app.listen({ host: config.host, port: config.port });
  } catch (err) {
    await app.close(); // e.g. EADDRINUSE: release the database before the process reports and exits
    throw err;
  }
  return app;
}

const isMain = import.meta.url === `file://${process.argv[1]}`;
if (isMain) {
  try {
    await startServer(loadConfig());
  } catch (err) {
    if (err instanceof ConfigError || err instanceof KernelUnavailableError) {
      console.error(`asgd-serve: ${err.message}`);
      process.exit(2);
    }
    throw err;
  }
}
