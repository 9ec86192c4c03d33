// Real service processes for the process-level tests (the data-directory lock, npm start and signals):
// spawned as an operator would, their output collected, their start-up banner read for the URL.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { freePort } from '../support/ports.ts';

export interface ServiceRun {
  child: ChildProcess;
  /** stdout and stderr, as written so far. */
  output(): string;
  /** Resolves with the exit code (or the signal's name) once the process has ended. */
  exited: Promise<number | string>;
  /** The banner's fields once it has been written, e.g. `url`. */
  banner(timeoutMs?: number): Promise<{ url: string; database: Record<string, unknown>; version: string; auth: string; docs: string; dashboard: string; msg: string }>;
}

/** `command args` with PATH (the pinned Node first, as under npm) plus `env`. */
export function spawnService(command: string, args: string[], env: Record<string, string>): ServiceRun {
  const child = spawn(command, args, { env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  child.stdout!.on('data', (d) => { text += d; });
  child.stderr!.on('data', (d) => { text += d; });
  const exited = new Promise<number | string>((resolve) => child.on('close', (code, signal) => resolve(code ?? signal ?? 'unknown')));
  return {
    child,
    output: () => text,
    exited,
    async banner(timeoutMs = 120_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        for (const line of text.split('\n')) {
          if (!line.startsWith('{')) continue;
          const entry = JSON.parse(line) as Record<string, unknown>;
          if (typeof entry.url === 'string' && entry.database) return entry as unknown as Awaited<ReturnType<ServiceRun['banner']>>;
        }
        if (child.exitCode !== null || child.signalCode !== null) throw new Error(`the service ended before its banner:\n${text}`);
        if (Date.now() > deadline) throw new Error(`no start-up banner within ${timeoutMs} ms:\n${text}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

export { freePort };

/**
 * The service started as `command args` on a free port (PORT is set here), once it serves: its start-up
 * banner (logged at info) says so, with the URL and the server's pid.
 */
export async function startServer(command: string, args: string[], env: Record<string, string>) {
  const port = await freePort();
  const run = spawnService(command, args, { ...env, PORT: String(port) });
  const banner = await run.banner() as Awaited<ReturnType<ServiceRun['banner']>> & { pid: number };
  return { run, port, url: banner.url, pid: banner.pid };
}

/** Whether something accepts TCP connections on the port. */
export function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** Whether a process with this pid runs (an exited one nobody has reaped yet, a zombie, does not). */
export function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1][0] !== 'Z';
  } catch {
    return false;
  }
}

export async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs: number): Promise<number> {
  const start = Date.now();
  for (;;) {
    if (await check()) return Date.now() - start;
    if (Date.now() - start > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
