// Several real service processes (src/server.ts as child processes, HTTP on loopback) on one PostgreSQL
// database made for the test, and an HTTP client that retries elsewhere the way a careful client would:
// on connection errors and 503s, with the same Idempotency-Key, within a deadline.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { chown, mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import type { TestContext } from 'node:test';
import pg from 'pg';
import { freePort } from './ports.ts';
import { createScratchDatabase } from './scratch-db.ts';
import { PG_ADMIN_URL } from '../helper.ts';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const SERVER = fileURLToPath(new URL('../../src/server.ts', import.meta.url));

/** Every child still running, killed when this test process exits for any reason. */
const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---- HTTP ----------------------------------------------------------------------------------------

export interface HttpResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  /** The body parsed as JSON (undefined when it is not JSON). */
  body: any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

/** The request never got an HTTP answer: refused, reset, closed before the answer, or timed out. */
export class ConnectionError extends Error {
  readonly code: string;

  constructor(code: string, message: string) {
    super(message);
    this.code = code;
    this.name = 'ConnectionError';
  }
}

export interface RequestOptions {
  method?: string;
  json?: unknown;
  headers?: Record<string, string>;
  timeoutMs?: number;
}

export function httpRequest(agent: http.Agent, baseUrl: string, path: string, opts: RequestOptions = {}): Promise<HttpResponse> {
  const payload = opts.json === undefined ? null : Buffer.from(JSON.stringify(opts.json));
  const url = new URL(path, baseUrl);
  return new Promise((resolve, reject) => {
    const req = http.request(
      url,
      {
        method: opts.method ?? (payload ? 'POST' : 'GET'),
        agent,
        headers: { ...(payload && { 'content-type': 'application/json', 'content-length': String(payload.length) }), ...opts.headers },
        timeout: opts.timeoutMs ?? 30_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (err: NodeJS.ErrnoException) => reject(new ConnectionError(err.code ?? 'ERESPONSE', err.message)));
        res.on('end', () => {
          if (!res.complete) return reject(new ConnectionError('EINCOMPLETE', 'the connection closed during the answer'));
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown;
          try {
            body = text ? JSON.parse(text) : undefined;
          } catch {
            body = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, body });
        });
      },
    );
    req.on('timeout', () => req.destroy(new ConnectionError('ETIMEDOUT', `no answer from ${url.host} in time`)));
    req.on('error', (err: NodeJS.ErrnoException) =>
      reject(err instanceof ConnectionError ? err : new ConnectionError(err.code ?? 'ECONNECTION', `${url.host}: ${err.message}`)),
    );
    req.end(payload ?? undefined);
  });
}

// ---- processes -----------------------------------------------------------------------------------

export class ServiceProcess {
  child: ChildProcess | null = null;
  /** Resolves with the exit of the current child; a restart replaces it, so keep the one of the child you signalled. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> = Promise.resolve({ code: null, signal: null });
  private output = '';
  /** How many times a child of this slot exited without the test asking (a crash). */
  unexpectedExits = 0;
  private expectExit = false;

  readonly index: number;
  readonly port: number;
  private readonly env: Record<string, string>;

  constructor(index: number, port: number, env: Record<string, string>) {
    this.index = index;
    this.port = port;
    this.env = env;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get alive(): boolean {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The last lines the process wrote (its warnings and errors), for failure messages. */
  get log(): string {
    return this.output.slice(-6000);
  }

  start(): void {
    if (this.alive) throw new Error(`process ${this.index} is already running`);
    this.expectExit = false;
    const child = spawn(process.execPath, [SERVER], {
      cwd: ROOT,
      env: { ...process.env, ...this.env, PORT: String(this.port), HOST: '127.0.0.1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString('utf8')).slice(-20_000);
    };
    child.stdout!.on('data', keep);
    child.stderr!.on('data', keep);
    running.add(child);
    this.child = child;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        running.delete(child);
        if (!this.expectExit) this.unexpectedExits++;
        resolve({ code, signal });
      });
    });
  }

  /**
   * Polls GET /v1/sessions until it answers 200 (with the admin token when the process has one); fails at
   * once if the process exits. Generous: three processes loading the app at once take a few seconds on
   * 2 idle cores, many more on a busy machine.
   */
  async waitReady(agent: http.Agent, timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const token = this.env.ASGD_ADMIN_TOKEN;
    const headers = token ? { authorization: `Bearer ${token}` } : undefined;
    for (;;) {
      if (!this.alive) throw new Error(`process ${this.index} exited while starting:\n${this.log}`);
      try {
        const res = await httpRequest(agent, this.url, '/v1/sessions?limit=1', { timeoutMs: 2_000, headers });
        if (res.status === 200) return;
      } catch (err) {
        if (!(err instanceof ConnectionError)) throw err;
      }
      if (Date.now() > deadline) throw new Error(`process ${this.index} not ready after ${timeoutMs} ms:\n${this.log}`);
      await sleep(100);
    }
  }

  /** Sends a signal the test means (SIGTERM, SIGKILL); the exit that follows is not counted as a crash. */
  signal(signal: NodeJS.Signals): void {
    if (!this.alive) return;
    this.expectExit = true;
    this.child!.kill(signal);
  }

  /** SIGTERM and the exit code, or SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 30_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (!this.alive) return this.exited;
    this.signal('SIGTERM');
    const timer = setTimeout(() => this.child?.kill('SIGKILL'), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** kill -9: no shutdown code runs, open transactions die with the connections. */
  async kill(): Promise<void> {
    if (!this.alive) return;
    this.signal('SIGKILL');
    await this.exited;
  }
}

// ---- retrying client -------------------------------------------------------------------------------

export interface ClientStats {
  requests: number;
  retries: number;
  connectionErrors: number;
  /** Connection errors by their code (ECONNREFUSED: nothing listens; ECONNRESET, EINCOMPLETE: the answer was lost). */
  connectionCodes: Record<string, number>;
  /** 503 answers, by their `code` ("(none)" for a 503 without one). */
  unavailable: Record<string, number>;
  /** Answers a retrying client must never see: anything but 2xx, a 503 or a connection error. */
  unexpected: { status: number; text: string; process: number }[];
  /** 200 answers to a step that said `replayed: true` (an Idempotency-Key retry found the first answer). */
  replayed: number;
}

export const newStats = (): ClientStats => ({ requests: 0, retries: 0, connectionErrors: 0, connectionCodes: {}, unavailable: {}, unexpected: [], replayed: 0 });

export const count503 = (stats: ClientStats): number => Object.values(stats.unavailable).reduce((a, b) => a + b, 0);

export interface RetryOptions extends RequestOptions {
  /** Index of the process to try first; later attempts go round the others. */
  prefer?: number;
  /** Retry on `prefer` only (a read that must come from that process; it may answer 503 a while after an outage). */
  only?: boolean;
  /** Give up (throw) after this long; bounded loops only. */
  deadlineMs?: number;
  /** Statuses that end the loop as an answer besides 2xx (e.g. 404, 422 when a test expects them). */
  accept?: number[];
  /** At most this many attempts (1: a write without an Idempotency-Key, which must not be sent twice). */
  attempts?: number;
}

/**
 * Sends a request to one process, and on a connection error or a 503 to the next (after a short pause),
 * until an answer arrives or the deadline passes. Only safe for reads and for writes that carry an
 * Idempotency-Key: a lost answer may belong to a request that was applied.
 */
export async function requestWithRetry(cluster: Cluster, stats: ClientStats, path: string, opts: RetryOptions = {}): Promise<HttpResponse & { process: number }> {
  const deadline = Date.now() + (opts.deadlineMs ?? 60_000);
  let at = opts.prefer ?? 0;
  let last = '';
  for (let attempt = 0; ; attempt++) {
    if (attempt > 0) {
      // A process that died unasked is a failure of its own: no point in retrying around it.
      if (cluster.crashes() > 0) throw new Error(`${opts.method ?? 'GET'} ${path}: a service process crashed\n${cluster.describe()}`);
      if (attempt >= (opts.attempts ?? Infinity)) throw new Error(`${opts.method ?? 'GET'} ${path}: failed (${last}) and may not be sent again`);
      stats.retries++;
      if (!opts.only) at++;
      if (Date.now() > deadline) throw new Error(`${opts.method ?? 'GET'} ${path}: no answer after ${attempt} attempts (last: ${last})\n${cluster.describe()}`);
      // Every process was tried once: wait a little longer before the next round (a database restart).
      await sleep(opts.only || attempt % cluster.processes.length === 0 ? 200 : 20);
    }
    const target = cluster.processes[at % cluster.processes.length];
    stats.requests++;
    let res: HttpResponse;
    try {
      res = await httpRequest(cluster.agent, target.url, path, opts);
    } catch (err) {
      if (!(err instanceof ConnectionError)) throw err;
      last = `process ${target.index}: ${err.message}`;
      stats.connectionErrors++;
      stats.connectionCodes[err.code] = (stats.connectionCodes[err.code] ?? 0) + 1;
      continue;
    }
    if (res.status === 503) {
      const code = typeof res.body?.code === 'string' ? res.body.code : '(none)';
      stats.unavailable[code] = (stats.unavailable[code] ?? 0) + 1;
      last = `process ${target.index}: 503 ${res.text.slice(0, 200)}`;
      continue;
    }
    if ((res.status >= 200 && res.status < 300) || opts.accept?.includes(res.status)) return { ...res, process: target.index };
    stats.unexpected.push({ status: res.status, text: res.text.slice(0, 300), process: target.index });
    const log = res.status >= 500 ? `\nprocess ${target.index} logged:\n${target.log.slice(-3000)}` : '';
    throw new Error(`${opts.method ?? 'GET'} ${path} on process ${target.index}: unexpected ${res.status} ${res.text.slice(0, 300)}${log}`);
  }
}

// ---- the cluster ---------------------------------------------------------------------------------

/** A fresh database on the server at `adminUrl`, and its drop (WITH FORCE: the killed processes' sessions may linger). */
const createDatabase = (adminUrl: string) => createScratchDatabase(adminUrl, 'asgd_cluster');

export interface ClusterOptions {
  processes?: number;
  env?: Record<string, string>;
  /** The server to make the database on (default: the machine's, PG_ADMIN_URL). */
  postgres?: PrivatePostgres;
}

export class Cluster {
  readonly agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
  private admin: pg.Pool | null = null;

  readonly databaseUrl: string;
  private readonly dropDatabase: () => Promise<void>;
  readonly processes: ServiceProcess[];

  private constructor(databaseUrl: string, dropDatabase: () => Promise<void>, processes: ServiceProcess[]) {
    this.databaseUrl = databaseUrl;
    this.dropDatabase = dropDatabase;
    this.processes = processes;
  }

  /** A database, `processes` service processes on it (all ready), and their cleanup when the test ends. */
  static async start(t: TestContext, opts: ClusterOptions = {}): Promise<Cluster> {
    const db = opts.postgres
      ? { ...(await createDatabase(opts.postgres.adminUrl)), drop: () => opts.postgres!.destroy() } // the whole server goes
      : await createDatabase(PG_ADMIN_URL);
    const env = { DATABASE_URL: db.url, ASGD_MIGRATE: 'true', LOG_LEVEL: 'warn', ...opts.env };
    const ports = [];
    for (let i = 0; i < (opts.processes ?? 3); i++) ports.push(await freePort());
    const cluster = new Cluster(db.url, db.drop, ports.map((port, i) => new ServiceProcess(i, port, env)));
    t.after(() => cluster.close());
    // All at once: the migrations run under an advisory lock, so one process applies them and the others find them applied.
    const began = Date.now();
    for (const p of cluster.processes) p.start();
    await Promise.all(cluster.processes.map((p) => p.waitReady(cluster.agent)));
    console.log(`cluster: ${cluster.processes.length} service processes ready in ${((Date.now() - began) / 1000).toFixed(1)} s`);
    return cluster;
  }

  /** Starts a stopped or killed process again on its port. */
  async restart(index: number): Promise<void> {
    const p = this.processes[index];
    p.start();
    await p.waitReady(this.agent);
  }

  /** SQL on the test's database (for invariants HTTP cannot show, e.g. the chunks behind each snapshot). */
  async sql<R = Record<string, unknown>>(text: string, params: unknown[] = []): Promise<R[]> {
    if (!this.admin) {
      this.admin = new pg.Pool({ connectionString: this.databaseUrl, max: 2 });
      this.admin.on('error', () => {}); // a database restart drops idle connections; the next query reconnects
    }
    return (await this.admin.query(text, params)).rows as R[];
  }

  /** Which processes run, which crashed, and the crashed ones' last output: for failure messages. */
  describe(): string {
    return this.processes
      .map((p) => `process ${p.index}: ${p.alive ? 'running' : 'not running'}, ${p.unexpectedExits} crash(es)${p.unexpectedExits ? `\n${p.log}` : ''}`)
      .join('\n');
  }

  /** Crashes so far: a child that exited without the test asking it to. */
  crashes(): number {
    return this.processes.reduce((a, p) => a + p.unexpectedExits, 0);
  }

  async close(): Promise<void> {
    await Promise.all(this.processes.map((p) => p.kill()));
    this.agent.destroy();
    await this.admin?.end().catch(() => {});
    await this.dropDatabase();
  }
}

// ---- a PostgreSQL of the test's own -------------------------------------------------------------------

const run = promisify(execFile);

function postgresBinDir(): string | null {
  if (process.env.ASGD_TEST_PG_BIN) return process.env.ASGD_TEST_PG_BIN;
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return null;
  const versions = readdirSync(root).filter((v) => existsSync(join(root, v, 'bin', 'initdb'))).sort((a, b) => Number(b) - Number(a));
  return versions.length ? join(root, versions[0], 'bin') : null;
}

/**
 * A throwaway PostgreSQL server (initdb in a temporary directory, its own port, trust auth) that a test
 * may stop and start under load without disturbing anything else on the machine. As root it runs as the
 * `postgres` user (the server refuses root).
 */
export class PrivatePostgres {
  private readonly bin: string;
  readonly dataDir: string;
  readonly port: number;
  private readonly owner: { uid: number; gid: number } | null;

  private constructor(bin: string, dataDir: string, port: number, owner: { uid: number; gid: number } | null) {
    this.bin = bin;
    this.dataDir = dataDir;
    this.port = port;
    this.owner = owner;
  }

  get adminUrl(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  /** The server, started; or a reason to skip when this machine has no PostgreSQL binaries. */
  static async create(t: TestContext): Promise<PrivatePostgres | string> {
    const bin = postgresBinDir();
    if (!bin) return 'no PostgreSQL server binaries (set ASGD_TEST_PG_BIN)';
    let owner: { uid: number; gid: number } | null = null;
    if (process.getuid?.() === 0) {
      const id = (args: string[]) => run('id', [...args, 'postgres']).then((r) => Number(r.stdout.trim()));
      owner = { uid: await id(['-u']), gid: await id(['-g']) };
    }
    const dataDir = await mkdtemp(join(tmpdir(), 'asgd-pg-'));
    if (owner) await chown(dataDir, owner.uid, owner.gid);
    const server = new PrivatePostgres(bin, dataDir, await freePort(), owner);
    t.after(() => server.destroy());
    await server.pg('initdb', ['-D', dataDir, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--locale=C', '--no-sync']);
    await server.start();
    return server;
  }

  private pg(tool: string, args: string[]) {
    return run(join(this.bin, tool), args, { ...(this.owner ?? {}), cwd: this.dataDir, timeout: 60_000 });
  }

  async start(): Promise<void> {
    const options = `-p ${this.port} -k ${this.dataDir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100`;
    await this.pg('pg_ctl', ['-D', this.dataDir, '-l', join(this.dataDir, 'server.log'), '-o', options, '-w', '-t', '60', 'start']);
  }

  /** "fast": open transactions are rolled back and every connection is terminated (57P01), as a restart does. */
  async stop(): Promise<void> {
    await this.pg('pg_ctl', ['-D', this.dataDir, '-m', 'fast', '-w', '-t', '60', 'stop']);
  }

  async destroy(): Promise<void> {
    await this.pg('pg_ctl', ['-D', this.dataDir, '-m', 'immediate', '-w', 'stop']).catch(() => {});
    await rm(this.dataDir, { recursive: true, force: true });
  }
}
