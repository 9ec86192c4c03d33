// Shared pieces of the benchmarks: databases made and dropped per run, server processes on loopback,
// a keep-alive HTTP client, safetensors bodies, medians, and the shape of a result.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { connect, createServer, type Socket } from 'node:net';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { createScratchDatabase } from '../test/support/scratch-db.ts';
import { openDatabase } from '../src/db/database.ts';
import { streamToBuffer, writeSafetensors, type Tensor } from '../src/formats/index.ts';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const PG_ADMIN_URL = process.env.ASGD_BENCH_PG ?? 'postgres://postgres@127.0.0.1:5432/postgres';

/** One benchmark's figure against its baseline. */
export interface BenchResult {
  key: string;
  title: string;
  /** What was measured, with its unit ("41.2 ms/step"). */
  figure: string;
  baseline: string;
  /** figure / baseline, in the direction the target reads (time ratio or throughput ratio). */
  ratio: number;
  target: { op: '<=' | '>='; value: number } | null;
  /** Further lines for RESULTS.md (details, secondary figures). */
  notes: string[];
}

export const holds = (r: BenchResult) => (r.target === null ? null : r.target.op === '<=' ? r.ratio <= r.target.value : r.ratio >= r.target.value);

export function describe(r: BenchResult): string {
  const verdict = r.target === null ? 'no target' : `target ${r.target.op} ${r.target.value}x: ${holds(r) ? 'holds' : 'MISSES'}`;
  return `${r.title}: ${r.figure} vs ${r.baseline} = ${r.ratio.toFixed(2)}x (${verdict})`;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export const mean = (values: number[]) => values.reduce((a, b) => a + b, 0) / values.length;
export const ms = (seconds: number) => `${(seconds * 1000).toFixed(1)} ms`;
export const now = () => performance.now() / 1000;

export function isMain(url: string): boolean {
  return Boolean(process.argv[1]) && fileURLToPath(url) === process.argv[1];
}

// ---- databases -------------------------------------------------------------------------------------

export interface BenchDatabase {
  url: string;
  drop(): Promise<void>;
}

/** A fresh PostgreSQL database with the service's migrations applied. */
export async function createDatabase(): Promise<BenchDatabase> {
  const scratch = await createScratchDatabase(PG_ADMIN_URL, 'asgd_bench');
  const db = await openDatabase({ databaseUrl: scratch.url, dataDir: '', poolSize: 2 });
  await db.migrate();
  await db.close();
  return scratch;
}

export async function createDataDir(): Promise<{ dir: string; drop(): void }> {
  const dir = mkdtempSync(join(tmpdir(), 'asgd-bench-pglite-'));
  const db = await openDatabase({ databaseUrl: null, dataDir: dir, poolSize: 1 });
  await db.migrate();
  await db.close();
  return { dir, drop: () => rmSync(dir, { recursive: true, force: true }) };
}

// ---- server processes ------------------------------------------------------------------------------

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as { port: number }).port;
      server.close(() => resolve(port));
    });
  });
}

export interface ServerProcess {
  url: string;
  pid: number;
  child: ChildProcess;
  /** Peak resident set of the process so far, bytes (VmHWM). */
  peakRss(): number;
  /** SIGTERM (graceful: shutdown snapshots) or SIGKILL (a crash: nothing more is written). */
  stop(signal?: 'SIGTERM' | 'SIGKILL'): Promise<void>;
}

/** The malloc settings `npm start` runs the service with (its script in package.json; the Docker image sets the same). */
const START_SCRIPT: string = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).scripts.start;
const MALLOC_TUNABLES = /GLIBC_TUNABLES:-([^}]+)\}/.exec(START_SCRIPT)?.[1] ?? '';
/** The V8 flags `npm start` runs the service with (the Docker image sets the same). */
const NODE_OPTIONS = /NODE_OPTIONS="([^"$]+?) \$\{NODE_OPTIONS:-\}"/.exec(START_SCRIPT)?.[1] ?? '';

/**
 * `node src/server.ts` on a free loopback port (one process: its pid is the server's). BENCH_SERVER_ARGS
 * (space-separated) adds node arguments to every server a benchmark starts, for example
 * `BENCH_SERVER_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof"` to profile them (written when they stop).
 */
export async function startServer(env: Record<string, string>, nodeArgs: string[] = []): Promise<ServerProcess> {
  const port = await freePort();
  let stderr = '';
  const extra = process.env.BENCH_SERVER_ARGS?.split(' ').filter(Boolean) ?? [];
  // BENCH_SERVER_ENV="ASGD_STEP_LINGER_US=0 LOG_LEVEL=warn": settings for every server a bench starts (the
  // servers get a fixed environment, not this process's), for A/B runs of one switch.
  const extraEnv = Object.fromEntries((process.env.BENCH_SERVER_ENV?.split(' ').filter(Boolean) ?? []).map((kv) => [kv.split('=')[0], kv.split('=').slice(1).join('=')]));
  const child = spawn(process.execPath, [...nodeArgs, ...extra, join(ROOT, 'src', 'server.ts')], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', HOST: '127.0.0.1', PORT: String(port), GLIBC_TUNABLES: MALLOC_TUNABLES, NODE_OPTIONS, ...env, ...extraEnv },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr!.on('data', (chunk) => (stderr = (stderr + chunk).slice(-4000)));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`server exited (${child.exitCode}): ${stderr}`);
    try {
      if ((await request(url, 'GET', '/healthz')).status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`server did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    pid: child.pid!,
    child,
    peakRss: () => peakRssOf(child.pid!),
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

/** VmHWM of a live process, bytes. */
export function peakRssOf(pid: number | 'self'): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1]);
  return kb * 1024;
}

/**
 * Seconds of each of `count` bare durable writes of `bytes` bytes of bytea (one autocommit INSERT each, into a
 * column stored like step_log's grads), after `warmup` untimed ones: the least a step that logs those bytes costs.
 */
export async function bareWrites(url: string, bytes: number, opts: { count: number; warmup?: number }): Promise<number[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query('CREATE TABLE bare_writes (b bytea)');
    await client.query('ALTER TABLE bare_writes ALTER COLUMN b SET STORAGE EXTERNAL');
    const data = Buffer.alloc(bytes, 7);
    for (let i = 0; i < (opts.warmup ?? 0); i++) await client.query('INSERT INTO bare_writes VALUES ($1)', [data]);
    const times: number[] = [];
    for (let i = 0; i < opts.count; i++) {
      const start = now();
      await client.query('INSERT INTO bare_writes VALUES ($1)', [data]);
      times.push(now() - start);
    }
    return times;
  } finally {
    await client.query('DROP TABLE IF EXISTS bare_writes');
    await client.end();
  }
}

/** The machine's busy and total CPU seconds so far (all cores), from /proc/stat. */
export function machineCpu(): { busy: number; total: number } {
  const [, ...ticks] = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/);
  const t = ticks.map(Number);
  const total = t.reduce((a, b) => a + b, 0);
  return { busy: (total - t[3] - t[4]) / 100, total: total / 100 }; // idle and iowait are not busy
}

/** A process's name and CPU seconds (user + system; with `children`, also of the children it waited for), from /proc/<pid>/stat. */
function procStat(pid: number | string, children = false): { name: string; cpu: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.split(') ')[1].split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]) + (children ? Number(fields[13]) + Number(fields[14]) : 0);
  return { name: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')), cpu: ticks / 100 }; // clock ticks (USER_HZ = 100)
}

/** CPU seconds (user + system) a live process has used. */
export const cpuSecondsOf = (pid: number): number => procStat(pid).cpu;

/** CPU seconds all PostgreSQL processes on this machine have used (its backends come and go: summed by name). */
export function postgresCpuSeconds(): number {
  let total = 0;
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const { name, cpu } = procStat(pid, true);
      if (name === 'postgres') total += cpu;
    } catch {
      // gone meanwhile
    }
  }
  return total;
}

// ---- HTTP ------------------------------------------------------------------------------------------

export const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

export interface Answer {
  status: number;
  body: Buffer;
  json<T = Record<string, unknown>>(): T;
}

export function request(base: string, method: string, path: string, opts: { headers?: Record<string, string>; body?: Buffer | string } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${base}${path}`, { method, agent, headers: opts.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks);
        resolve({ status: res.statusCode ?? 0, body, json: () => JSON.parse(body.toString('utf8')) });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    if (opts.body !== undefined) req.end(opts.body);
    else req.end();
  });
}

/** Like `request`, but anything other than `expected` is an error that shows the answer. */
export async function call(base: string, method: string, path: string, opts: { headers?: Record<string, string>; body?: Buffer | string } = {}, expected = 200): Promise<Answer> {
  const answer = await request(base, method, path, opts);
  if (answer.status !== expected) throw new Error(`${method} ${path}: ${answer.status} ${answer.body.toString('utf8').slice(0, 500)}`);
  return answer;
}

export const SAFETENSORS = { 'content-type': 'application/x-safetensors' };

/**
 * A load generator's connection, as wrk keeps them: one keep-alive socket, each request a prebuilt buffer
 * written at once, the answer framed by its Content-Length and checked only for its status. On this
 * 2-core machine the load generator shares the cores with the servers and PostgreSQL: Node's http client
 * costs about 0.5 ms of CPU a request, this about a tenth of that.
 */
export class RawConnection {
  private socket: Socket;
  private buffered: Buffer = Buffer.alloc(0);
  private waiting: { resolve: (status: number) => void; reject: (err: Error) => void } | null = null;
  private failed: Error | null = null;

  private constructor(socket: Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    const fail = (err: Error) => {
      this.failed ??= err;
      this.waiting?.reject(err);
      this.waiting = null;
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('connection closed')));
  }

  static open(base: string): Promise<RawConnection> {
    const { hostname, port } = new URL(base);
    return new Promise((resolve, reject) => {
      const socket = connect({ host: hostname, port: Number(port) }, () => resolve(new RawConnection(socket)));
      socket.once('error', reject);
    });
  }

  /** A request's bytes: head and body in one buffer. */
  static requestBytes(base: string, method: string, path: string, headers: Record<string, string>, body: Buffer): Buffer {
    const { host } = new URL(base);
    const head = [`${method} ${path} HTTP/1.1`, `host: ${host}`, ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`), `content-length: ${body.length}`, '', ''].join('\r\n');
    return Buffer.concat([Buffer.from(head, 'latin1'), body]);
  }

  /** Sends one request (one at a time on a connection) and resolves with the answer's status once its body has arrived. */
  send(bytes: Buffer): Promise<number> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
      this.socket.write(bytes);
    });
  }

  private onData(chunk: Buffer): void {
    this.buffered = this.buffered.length ? Buffer.concat([this.buffered, chunk]) : chunk;
    const end = this.buffered.indexOf('\r\n\r\n');
    if (end < 0) return;
    const head = this.buffered.toString('latin1', 0, end);
    const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(head)?.[1] ?? NaN);
    if (!Number.isFinite(length)) {
      this.socket.destroy(new Error(`an answer without Content-Length: ${head.slice(0, 200)}`));
      return;
    }
    if (this.buffered.length < end + 4 + length) return;
    this.buffered = this.buffered.subarray(end + 4 + length);
    const status = Number(head.slice(9, 12));
    const waiting = this.waiting;
    this.waiting = null;
    waiting?.resolve(status);
  }

  close(): void {
    this.socket.destroy();
  }
}


// ---- tensors ---------------------------------------------------------------------------------------

export function randomFloats(n: number, seed: number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = ((x >>> 0) / 2 ** 32 - 0.5) * scale;
  }
  return out;
}

/** A model of `numel` float32 parameters split into `parts` flat tensors p0, p1, … */
export function modelSpec(numel: number, parts: number): { name: string; numel: number }[] {
  const base = Math.floor(numel / parts);
  return Array.from({ length: parts }, (_, i) => ({ name: `p${i}`, numel: i === parts - 1 ? numel - base * (parts - 1) : base }));
}

export function safetensorsOf(spec: { name: string; numel: number }[], seed: number, scale: number, metadata?: Record<string, string>): Buffer {
  const tensors: [string, Tensor][] = spec.map((p, i) => [p.name, { dtype: 'float32', shape: [p.numel], data: randomFloats(p.numel, seed * 1000 + i + 1, scale) }]);
  return streamToBuffer(writeSafetensors(tensors, metadata));
}

/** Creates a session from a safetensors body (the `asgd` metadata entry carries the options). */
export async function createSession(
  base: string,
  name: string,
  spec: { name: string; numel: number }[],
  options: Record<string, unknown> = {},
): Promise<void> {
  const body = safetensorsOf(spec, 1, 1, { asgd: JSON.stringify({ name, hyperparameters: { lr: 0.01, t0: 1, weight_decay: 1e-4 }, ...options }) });
  await call(base, 'POST', '/v1/sessions', { headers: SAFETENSORS, body }, 201);
}

// ---- the machine -----------------------------------------------------------------------------------

export function machine(): Record<string, string> {
  const cpu = /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpus()[0]?.model ?? 'unknown';
  return {
    cpu,
    cores: String(cpus().length),
    memory: `${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
    node: process.version,
  };
}

export async function postgresVersion(): Promise<string> {
  const c = new pg.Client({ connectionString: PG_ADMIN_URL });
  await c.connect();
  try {
    const rows = await c.query<{ v: string; fsync: string; sc: string }>("SELECT version() AS v, current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS sc");
    const { v, fsync, sc } = rows.rows[0];
    return `${v.split(' on ')[0]} (fsync ${fsync}, synchronous_commit ${sc})`;
  } finally {
    await c.end();
  }
}
