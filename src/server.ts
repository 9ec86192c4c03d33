// The process: read the configuration, build the app, listen, close with grace on SIGTERM/SIGINT.
import { realpathSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { buildApp, loggerOptions } from './app.ts';
import { startupBanner } from './banner.ts';
import { ConfigError, isLoopback, loadConfig, type Config } from './config.ts';
import { DataDirLockedError } from './db/data-dir-lock.ts';
import { describeDbFailure } from './db/errors.ts';
import { KernelUnavailableError } from './optim/index.ts';
import { holdProcessWarnings } from './process-warnings.ts';
import { DASHBOARD_PATH } from './routes/root/index.ts';
import { exitOnSignalWhile } from './signals.ts';

const PARENT_CHECK_MS = 1_000;

/** listen() failed: the address is taken, not this machine's, or its name does not resolve. */
export class ListenError extends Error {
  constructor(host: string, port: number, cause: unknown) {
    const code = (cause as { code?: unknown })?.code;
    const why = code === 'EADDRINUSE' ? 'the port is in use (PORT)'
      : code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' || code === 'EAI_AGAIN' ? 'no such address on this machine (HOST)'
      : code === 'EACCES' ? 'not permitted (a port below 1024 needs privileges: PORT)'
      : 'check HOST and PORT';
    super(`cannot listen on ${host}:${port}: ${(cause as Error)?.message ?? String(cause)}; ${why}`, { cause });
    this.name = 'ListenError';
  }
}

/**
 * Lets the V8 heap grow to 4x its live size between full collections (V8 picks about 1.1-2x for a heap this
 * small). A step allocates ~100 KB that dies young, yet it was reclaimed by full collections of the whole
 * ~30 MB heap: measured with one client stepping a 9,610-parameter session, 43 full collections in 3000
 * steps took a third of the server's CPU, and a blocking step took 1.8 ms; with this, 9 and 1.4 ms. The
 * cost is at most a few tens of MB more heap. A --heap-growing-percent given in NODE_OPTIONS or on the
 * command line wins.
 */
export function tuneHeap(): void {
  const given = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(/\s+/)].some((a) => a.startsWith('--heap-growing-percent'));
  if (!given) setFlagsFromString('--heap-growing-percent=300');
}

/** Binds host:port and lets it go again: whether the app's listen can (a race with another process aside). */
function tryListen(host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen({ host: host.replace(/^\[(.*)\]$/, '$1'), port, exclusive: true }, () => probe.close(() => resolve()));
  });
}

/** Addresses that bind every interface, with the loopback address a client on this host connects to. */
const WILDCARDS = new Map([['0.0.0.0', '127.0.0.1'], ['::', '::1'], ['[::]', '::1']]);

export async function startServer(config: Config, opts: { migrate?: boolean } = {}) {
  tuneHeap();
  // A signal while the app is built ends the start (signals.ts). What a start left half done is redone by the next.
  const started = exitOnSignalWhile('starting: stopped before serving');
  // The address first: a port in use or a HOST not of this machine is said at once, not after the database
  // was waited for, opened and migrated (seconds for PGlite's first start; found by an operator's review).
  try {
    await tryListen(config.host, config.port);
  } catch (err) {
    started();
    throw new ListenError(config.host, config.port, err);
  }
  // Warnings said while the app is built (node-postgres reads DATABASE_URL's sslmode) wait for its logger.
  const warnings = holdProcessWarnings();
  let app: Awaited<ReturnType<typeof buildApp>>;
  try {
    app = await buildApp({
      config,
      // Pending migrations are applied at start unless ASGD_MIGRATE=false: replicas on PostgreSQL take an
      // advisory lock, so any number can start at once; docker-compose also runs `migrate` once before them.
      migrate: opts.migrate ?? config.migrateOnStart ?? true,
      logger: loggerOptions(config),
    });
  } catch (err) {
    started();
    warnings.release();
    throw err;
  }
  warnings.logTo(app.log);
  app.addHook('onClose', async () => warnings.release());
  if (!config.adminToken && !isLoopback(config.host)) {
    app.log.warn({ host: config.host, allowedHosts: config.allowedHosts },
      'ASGD_ALLOW_INSECURE: listening beyond loopback WITHOUT authentication; requests are answered when addressed to an IP address, a loopback name or a name in ASGD_ALLOWED_HOSTS (others: 403 HOST_NOT_ALLOWED)');
  }
  // A retry is answered from its key only while the key is kept: a client retries for as long as a request
  // may take, and a minute more (the clients' retry budgets), so a shorter window makes "applied once" depend
  // on when the retry comes (an operator's review: a retry after 3 s was a second step with a 2 s window).
  const retrySpanS = Math.ceil(config.requestTimeoutMs / 1000) + 60;
  if (config.idempotencyWindowSeconds < retrySpanS) {
    app.log.warn({ idempotencyWindowSeconds: config.idempotencyWindowSeconds, requestTimeoutMs: config.requestTimeoutMs },
      `ASGD_IDEMPOTENCY_WINDOW_SECONDS (${config.idempotencyWindowSeconds} s) is shorter than ASGD_REQUEST_TIMEOUT_MS and a minute (${retrySpanS} s): a step or change retried after its key expired is applied again`);
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
  // Handed over on the same listeners: a signal that came while the app was built is not dropped (signals.ts).
  started((signal) => void shutdown(signal));
  watchNpmParent(() => void shutdown('parent exited'));
  try {
    await app.listen({ host: config.host, port: config.port });
  } catch (err) {
    await app.close(); // e.g. EADDRINUSE: release the database before the process reports and exits
    // Said as what it is: a host name that does not resolve is no PostgreSQL failure (describeDbFailure's ENOTFOUND).
    throw new ListenError(config.host, config.port, err);
  }
  const { port } = app.server.address() as AddressInfo;
  // Bound to every interface (0.0.0.0, ::): the banner's links are the loopback ones, which a browser on this
  // host can open (http://0.0.0.0:… is no address to connect to), and it says what was bound.
  const wildcard = WILDCARDS.get(config.host);
  const shown = wildcard ?? config.host;
  const host = shown.includes(':') && !shown.startsWith('[') ? `[${shown}]` : shown;
  const banner = startupBanner(config, `http://${host}:${port}`, DASHBOARD_PATH, wildcard ? `${config.host} (every interface)` : undefined);
  app.log.info(banner.fields, banner.message);
  return app;
}

/**
 * `npm start` runs `exec node src/server.ts`, so npm's child is this process and npm relays SIGTERM and
 * SIGINT to it. If npm itself dies without relaying (kill -9, a crash), this process would go on serving
 * as an orphan holding the port and the data directory: so under `npm start` it leaves when its parent
 * does. Only then: a server started from a shell that later exits (nohup, &) is meant to outlive it.
 */
function watchNpmParent(onOrphaned: () => void): void {
  if (process.env.npm_lifecycle_event !== 'start') return;
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid !== parent) {
      clearInterval(timer);
      onOrphaned();
    }
  }, PARENT_CHECK_MS);
  timer.unref();
}

/** This file is the program node runs, also when it is started through a symlink (/srv/app/current/...). */
function runAsMain(): boolean {
  if (!process.argv[1]) return false;
  try {
    return fileURLToPath(import.meta.url) === realpathSync(process.argv[1]);
  } catch {
    return false;
  }
}

const isMain = runAsMain();
if (isMain) {
  try {
    await startServer(loadConfig());
  } catch (err) {
    if (err instanceof ConfigError || err instanceof KernelUnavailableError) {
      console.error(`asgd-serve: ${err.message}`);
      process.exit(2);
    }
    // One line an operator can act on (the database unreachable or missing, the port taken, ...), not a stack.
    const reason = err instanceof DataDirLockedError ? err.message
      : err instanceof ListenError ? `could not start: ${err.message}`
      : `could not start: ${describeDbFailure(err)}`;
    console.error(`asgd-serve: ${reason}`);
    process.exit(1);
  }
}
