// The command line: `asgd-serve [serve|migrate] [--flag value ...]`. Every flag mirrors an environment
// variable of src/config.ts (--data-dir is ASGD_DATA_DIR, --host is HOST); a flag overrides its variable.
// `asgd-serve sessions|tokens ...` are the operator commands against a running service (src/cli/ops.ts).
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { ConfigError, loadConfig } from './config.ts';
import { KernelUnavailableError } from './optim/index.ts';
import { openDatabase, type MigrationCount } from './db/database.ts';
import { describeDbFailure } from './db/errors.ts';
import { databaseTarget, untilConnected } from './db/wait.ts';
import { OPS_COMMANDS, runOps, type OpsIo } from './cli/ops.ts';
import { exitOnSignalWhile } from './signals.ts';

interface Flag {
  env: string;
  help: string;
  /** A switch: `--flag` alone means true (`--flag=false` to turn it off). */
  boolean?: boolean;
  value?: string;
}

/** Every variable src/config.ts reads, in the order `--help` lists them (a test keeps this complete). */
export const FLAGS: Flag[] = [
  { env: 'HOST', value: 'addr', help: 'address to listen on (default 127.0.0.1; anything but loopback needs --admin-token)' },
  { env: 'PORT', value: 'n', help: 'port to listen on (default 8080)' },
  { env: 'DATABASE_URL', value: 'url', help: 'PostgreSQL connection string; unset: embedded PGlite in --data-dir' },
  { env: 'ASGD_DATA_DIR', value: 'dir', help: 'embedded database directory (default .data/pglite; memory:// for a throwaway one)' },
  { env: 'ASGD_DB_POOL_SIZE', value: 'n', help: 'PostgreSQL connections per process (default 10)' },
  { env: 'ASGD_DB_START_TIMEOUT_MS', value: 'ms', help: 'how long start-up waits for a PostgreSQL that refuses connections (starting, down) (default 60000; 0: fail at once)' },
  { env: 'ASGD_DB_TIMEOUT_MS', value: 'ms', help: 'a statement PostgreSQL leaves silent this long fails with 503, its connection dropped (default 30000; 0: never)' },
  { env: 'ASGD_MIGRATE', boolean: true, help: 'apply pending migrations when serving (default: true; replicas take a lock)' },
  { env: 'LOG_LEVEL', value: 'level', help: 'fatal, error, warn, info (default), debug, trace or silent' },
  { env: 'ASGD_LOG_REQUESTS', value: 'which', help: 'request lines at info: all, auto (default: all but step and params), errors, none' },
  { env: 'ASGD_ADMIN_TOKEN', value: 'token', help: 'admin bearer token, 16-512 visible ASCII characters (prefer the variable: flags show in ps)' },
  { env: 'ASGD_ADMIN_TOKEN_PREVIOUS', value: 'token', help: 'during a rotation, the old admin token, also accepted (prefer the variable)' },
  { env: 'ASGD_ALLOW_INSECURE', boolean: true, help: 'allow a non-loopback --host without a token' },
  { env: 'ASGD_ALLOWED_HOSTS', value: 'names', help: 'with auth off, host names a request\'s Host may carry besides loopback ones (comma-separated, no ports)' },
  { env: 'ASGD_TRUST_PROXY', value: 'v', help: 'trust X-Forwarded-For from: true, a hop count, or addresses/CIDRs (default false)' },
  { env: 'ASGD_CORS_ORIGINS', value: 'origins', help: 'browser origins allowed to call the API (CORS): https://host[:port],… or * (default off)' },
  { env: 'ASGD_BODY_LIMIT_STEP', value: 'bytes', help: 'largest step body (default 1 GiB)' },
  { env: 'ASGD_BODY_LIMIT_CREATE', value: 'bytes', help: 'largest create / state_dict / checkpoint body (default 2 GiB)' },
  { env: 'ASGD_BODY_LIMIT_DEFAULT', value: 'bytes', help: 'largest body of other routes (default 1 MiB)' },
  { env: 'ASGD_BODY_LIMIT_JSON', value: 'bytes', help: 'largest JSON body on any route (default 256 MiB, at most 512 MiB; use safetensors beyond)' },
  { env: 'ASGD_BODY_IN_FLIGHT_BYTES', value: 'bytes', help: 'request body bytes (of bodies over 1 MiB) one process receives and holds at once, 503 beyond (default 1 GiB; 0: no bound)' },
  { env: 'ASGD_JSON_IN_FLIGHT_BYTES', value: 'bytes', help: 'JSON body bytes (of bodies over 1 MiB) one process parses and holds at once, 503 beyond (default 512 MiB; 0: no bound)' },
  { env: 'ASGD_REQUEST_TIMEOUT_MS', value: 'ms', help: 'time to receive a whole request (default 300000; 0 = none)' },
  { env: 'ASGD_MAX_CONNECTIONS', value: 'n', help: 'open connections a process accepts, event streams included (default 4096); more are closed' },
  { env: 'ASGD_RATE_LIMIT_PER_MINUTE', value: 'n', help: 'requests a minute per token (or client address); unset = no limit' },
  { env: 'ASGD_MAX_EVENT_LOOP_DELAY_MS', value: 'ms', help: 'answer 503 while the event loop lags more (default 0 = off; else at least 100)' },
  { env: 'ASGD_MAX_HEAP_USED_BYTES', value: 'bytes', help: 'answer 503 while the heap is larger (default 0 = off; else at least 128 MiB)' },
  { env: 'ASGD_MAX_RSS_BYTES', value: 'bytes', help: 'answer 503 while the RSS is larger (default 0 = off)' },
  { env: 'ASGD_HEALTH_CHECK_INTERVAL_MS', value: 'ms', help: 'database probe interval; 503 while it fails (default 5000; 0 = off)' },
  { env: 'ASGD_METRICS_REQUIRE_TOKEN', boolean: true, help: '/metrics needs a read token (default: open)' },
  { env: 'ASGD_SHUTDOWN_TIMEOUT_MS', value: 'ms', help: 'grace for in-flight requests after SIGTERM (default 60000)' },
  { env: 'ASGD_SNAPSHOT_EVERY', value: 'n', help: 'default snapshot interval of new sessions, in steps (default 100)' },
  { env: 'ASGD_KEEP_SNAPSHOTS', value: 'n', help: 'default snapshots kept per session (default 10)' },
  { env: 'ASGD_KEEP_LOG_BYTES', value: 'bytes', help: 'default byte bound on a new session\'s step log (default 4 GiB; 0 or none = no bound)' },
  { env: 'ASGD_EXPIRE_AFTER_IDLE_S', value: 's', help: 'default: delete a new session after this many idle seconds (unset = never)' },
  { env: 'ASGD_SWEEP_INTERVAL_MS', value: 'ms', help: 'how often to look for idle sessions to delete (default 60000; 0 = never)' },
  { env: 'ASGD_VACUUM_INTERVAL_MS', value: 'ms', help: 'embedded database: how often tables with many dead rows are vacuumed (default 60000; 0 = never)' },
  { env: 'ASGD_IDEMPOTENCY_WINDOW_SECONDS', value: 's', help: 'how long Idempotency-Key answers are kept (default 86400)' },
  { env: 'ASGD_STEP_LINGER_US', value: 'us', help: 'how long a batch of steps may wait for clients about to step again (default 2000; 0 = never)' },
  { env: 'ASGD_WORKER_ORDER_WAIT_MS', value: 'ms', help: 'how long a step that names its worker waits at most for that worker\'s earlier steps (default 2000; 0 = no ordering)' },
  { env: 'ASGD_KERNEL', value: 'auto|wasm-fma|wasm|js', help: 'optimizer kernel (default auto: wasm-fma where its self-test passes, else wasm)' },
  { env: 'ASGD_FMA', value: 'true|false', help: 'fused multiply-add as PyTorch on AVX2 (default true)' },
  { env: 'ASGD_CACHE_BYTES', value: 'bytes', help: 'decoded session state kept in memory (default 4 GiB)' },
  { env: 'ASGD_CACHE_SESSIONS', value: 'n', help: 'sessions kept decoded in memory at most (default 4096, at most 10000: each reserves ~8 GiB of address space)' },
  { env: 'ASGD_MIN_FREE_BYTES', value: 'bytes', help: 'embedded database: writes are refused (507) while its disk has less free than this plus the write (default 64 MiB)' },
  { env: 'ASGD_SNAPSHOT_COPY_LIMIT_BYTES', value: 'bytes', help: 'background snapshots of a bigger state are written from it, its steps waiting, not from a copy (default 256 MiB)' },
  { env: 'ASGD_REPLAY_BOUND_BYTES', value: 'bytes', help: 'a process taking a session over replays at most this much logged gradient, or four states\' worth (unlogged replay points; 0: off; default 64 MiB on PostgreSQL, off on the embedded database)' },
];

export const flagName = (env: string) => `--${env.replace(/^ASGD_/, '').toLowerCase().replace(/_/g, '-')}`;

const COMMANDS = ['serve', 'migrate'] as const;
type Command = (typeof COMMANDS)[number];

export function usage(): string {
  const rows = FLAGS.map((f) => [`${flagName(f.env)}${f.boolean ? '' : ` <${f.value ?? 'value'}>`}`, `${f.help} [${f.env}]`]);
  const width = Math.max(...rows.map(([flag]) => flag.length)) + 2;
  return [
    'Usage: asgd-serve [serve|migrate] [options]',
    '       asgd-serve sessions|tokens COMMAND [options]   (see asgd-serve sessions --help)',
    '',
    'Commands:',
    '  serve      listen for HTTP requests (the default)',
    '  migrate    apply the database migrations and exit (run once before starting replicas)',
    '  sessions   ls, show, rm, snapshot, download, import, restore, fork: against a running service (--url, --token)',
    '  tokens     ls, create, revoke: against a running service',
    '',
    'Options (each overrides the environment variable in brackets):',
    ...rows.map(([flag, help]) => `  ${flag.padEnd(width)}${help}`),
    `  ${'--help'.padEnd(width)}show this help`,
    `  ${'--version'.padEnd(width)}print the version`,
    '',
  ].join('\n');
}

export class UsageError extends Error {}

/** The command and the environment the flags make (flags win over `env`). */
export function parseArgs(argv: string[], env: Record<string, string | undefined>): { command: Command | 'help' | 'version'; env: Record<string, string | undefined> } {
  const byName = new Map(FLAGS.map((f) => [flagName(f.env), f]));
  const out = { ...env };
  let command: Command | 'help' | 'version' | null = null;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--help' || arg === '-h') return { command: 'help', env: out };
    if (arg === '--version') return { command: 'version', env: out };
    if (!arg.startsWith('--')) {
      if (command !== null) throw new UsageError(`unexpected argument ${JSON.stringify(arg)}`);
      if (!(COMMANDS as readonly string[]).includes(arg)) throw new UsageError(`unknown command ${JSON.stringify(arg)} (use serve, migrate, sessions or tokens)`);
      command = arg as Command;
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq === -1 ? arg : arg.slice(0, eq);
    const flag = byName.get(name);
    if (!flag) throw new UsageError(`unknown option ${name}`);
    let value: string | undefined = eq === -1 ? undefined : arg.slice(eq + 1);
    if (value === undefined) {
      // A switch alone is true; `--migrate false` (the value as the next word) is read as --migrate=false.
      if (flag.boolean) value = i + 1 < argv.length && /^(true|false)$/i.test(argv[i + 1]) ? argv[++i] : 'true';
      else if (i + 1 < argv.length) value = argv[++i];
      else throw new UsageError(`${name} needs a value`);
    }
    out[flag.env] = value;
  }
  return { command: command ?? 'serve', env: out };
}

function version(): string {
  return (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

/** Runs a command; resolves to an exit code, or null while `serve` keeps the process running. */
export async function main(
  argv: string[],
  env: Record<string, string | undefined> = process.env,
  io: OpsIo = process,
): Promise<number | null> {
  // Options before the command (`asgd-serve --url U sessions ls`): the operator commands take theirs after
  // their own name; moved there, as a user means them.
  const opsAt = argv.findIndex((a) => (OPS_COMMANDS as readonly string[]).includes(a));
  // (Not when the word may be an option's value: `--data-dir sessions` serves from ./sessions.)
  const valueOf = (i: number) => i > 0 && argv[i - 1].startsWith('--') && !argv[i - 1].includes('=');
  if (opsAt > 0 && !valueOf(opsAt) && argv.slice(0, opsAt).every((a, i) => a.startsWith('--') || valueOf(i))) {
    argv = [argv[opsAt], ...argv.slice(opsAt + 1, opsAt + 2), ...argv.slice(0, opsAt), ...argv.slice(opsAt + 2)];
  }
  if ((OPS_COMMANDS as readonly string[]).includes(argv[0])) {
    // Questions and progress only when a person is there: stdin and stderr on a terminal.
    const interactive = io.interactive ?? (io === process && Boolean(process.stdin.isTTY && process.stderr.isTTY));
    return runOps(argv, env, { stdout: io.stdout, stderr: io.stderr, confirm: io.confirm, stdoutStream: io.stdoutStream, interactive });
  }
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs(argv, env);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`asgd-serve: ${err.message}\n\n${usage()}`);
    return 2;
  }
  if (parsed.command === 'help') {
    io.stdout.write(usage());
    return 0;
  }
  if (parsed.command === 'version') {
    io.stdout.write(`${version()}\n`);
    return 0;
  }
  try {
    const config = loadConfig(parsed.env);
    if (parsed.command === 'migrate') {
      let counted: MigrationCount;
      let applied: number;
      // As `serve` while it starts: as PID 1 (the compose file's one-shot migrate service) a signal has no
      // default effect, and `docker compose stop` waited out its grace period.
      const stopped = exitOnSignalWhile('migrating: stopped; the next migrate applies what this one did not', (line) => io.stderr.write(`${line}\n`));
      const db = await openDatabase({
        databaseUrl: config.databaseUrl, dataDir: config.dataDir, poolSize: 1,
        onWarning: (message) => io.stderr.write(`asgd-serve: ${message}\n`),
      });
      try {
        // As `serve` does at start: a PostgreSQL still starting (a host reboot starts everything at once) is
        // waited for, up to ASGD_DB_START_TIMEOUT_MS, saying so every 5 s.
        applied = await untilConnected(() => db.migrate(), {
          waitMs: config.databaseUrl ? config.dbStartTimeoutMs : 0,
          onWait: (err, waitedMs) => io.stderr.write(`asgd-serve: waiting for PostgreSQL at ${databaseTarget(config.databaseUrl)} (${describeDbFailure(err)}); ${Math.round(waitedMs / 1000)} s so far, up to ${Math.round(config.dbStartTimeoutMs / 1000)} s (ASGD_DB_START_TIMEOUT_MS)\n`),
        });
        counted = await db.ready();
      } finally {
        stopped();
        await db.close();
      }
      const where = config.databaseUrl ? 'PostgreSQL' : `embedded database in ${config.dataDir}`;
      // A database a newer build migrated (its warning is on stderr): this build applied nothing.
      io.stdout.write(counted.applied > counted.expected
        ? `asgd-serve: nothing to apply (${where}): the database has ${counted.applied} migrations, this build knows ${counted.expected}\n`
        : applied === 0 ? `asgd-serve: nothing to apply (${where}): all ${counted.expected} migrations were applied before\n`
        : `asgd-serve: migrations applied (${where}): ${applied} now, ${counted.applied} of ${counted.expected} in all\n`);
      return 0;
    }
    const { startServer } = await import('./server.ts');
    await startServer(config);
    return null;
  } catch (err) {
    if (err instanceof ConfigError || err instanceof KernelUnavailableError) {
      io.stderr.write(`asgd-serve: ${err.message}\n`);
      return 2;
    }
    // Where it was connecting to, when that is PostgreSQL (a bare "Connection terminated" names nothing).
    const target = databaseTarget(parsed.env.DATABASE_URL ?? null);
    io.stderr.write(`asgd-serve: ${parsed.command} failed${target ? ` (PostgreSQL at ${target})` : ''}: ${describeDbFailure(err)}\n`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const code = await main(process.argv.slice(2));
  if (code !== null) process.exitCode = code;
}
