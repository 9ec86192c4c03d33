// One owner per embedded data directory. Two processes on one PGlite directory each keep their own copy
// of the database in memory and overwrite each other's files: acknowledged writes are lost. So a process
// that opens a directory holds `asgd-serve.lock` in it for its lifetime, and a second one is refused.
//
// Why a lock file and not an OS lock: Node has no flock/fcntl, and a helper process holding one would be
// a second process to supervise. The file names its holder (pid, host, boot id, pid namespace, the
// process's start time) so that a lock left by a killed process is recognised and taken over:
// - on the same machine (same host, boot and pid namespace) at once: the pid is gone, or is now another
//   process (its start time in /proc differs: pid reuse), or is our own pid (a restarted container);
// - from another machine or container (a shared volume), where the pid means nothing: the holder touches
//   the file every HEARTBEAT_MS, and a file that has not been touched for STALE_AFTER_MS is abandoned.
// Creation is atomic (a complete temporary file hard-linked into place), and a takeover renames the stale
// file away and checks it was the one judged stale, so two processes starting at once cannot both win.
import { randomUUID } from 'node:crypto';
import { linkSync, readFileSync, readlinkSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { Worker } from 'node:worker_threads';

export const LOCK_FILE = 'asgd-serve.lock';
const HEARTBEAT_MS = 5_000;
const STALE_AFTER_MS = 30_000;

export interface LockHolder {
  pid: number;
  host: string;
  bootId: string | null;
  pidNamespace: string | null;
  /** The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells pid reuse apart. */
  processStart: string | null;
  startedAt: string;
  token: string;
}

export class DataDirLockedError extends Error {
  readonly dir: string;
  readonly holder: LockHolder;
  constructor(dir: string, holder: LockHolder, detail = '') {
    super(
      `the data directory ${dir} is in use by another asgd-serve process (pid ${holder.pid} on host ${holder.host}, ` +
        `started ${holder.startedAt})${detail}; stop that process first, or set ASGD_DATA_DIR to another directory`,
    );
    this.dir = dir;
    this.holder = holder;
  }
}

export interface DataDirLock {
  readonly path: string;
  /**
   * Throws DataDirLockLostError once the lock is another process's (taken over while this one stood still
   * past the stale period: a stopped container, a hung volume). Called before each statement: a process that
   * lost its directory must not write to it (the new owner's writes would be lost) nor answer from it.
   */
  assertHeld(): void;
  release(): void;
}

export class DataDirLockLostError extends Error {
  constructor(path: string, holder: LockHolder | null) {
    super(`the data directory lock ${path} is no longer this process's${holder ? ` (pid ${holder.pid} on host ${holder.host} holds it, started ${holder.startedAt})` : ' (it was removed)'}: `
      + 'another process took the directory over while this one did not renew the lock (stopped or hung for the stale period); this process stops without writing to it');
  }
}

export interface LockOptions {
  heartbeatMs?: number;
  staleAfterMs?: number;
  /**
   * Told when the lock's holder runs elsewhere and the wait for its heartbeat (up to staleAfterMs) begins,
   * and when a lock whose holder is gone is taken over.
   */
  onWait?: (message: string) => void;
  /** Told once, when the lock is found to be another process's (DataDirLock.assertHeld throws from then on). */
  onLost?: (error: DataDirLockLostError) => void;
}

const readText = (path: string): string | null => {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return null;
  }
};

function processStart(pid: number): string | null {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === null) return null;
  // The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
}

function pidNamespace(): string | null {
  try {
    return readlinkSync('/proc/self/ns/pid'); // e.g. pid:[4026531836]: pids mean something only within it
  } catch {
    return null;
  }
}

function whoAmI(): LockHolder {
  return {
    pid: process.pid,
    host: hostname(),
    bootId: readText('/proc/sys/kernel/random/boot_id'),
    pidNamespace: pidNamespace(),
    processStart: processStart(process.pid),
    startedAt: new Date(Date.now() - process.uptime() * 1000).toISOString(),
    token: randomUUID(),
  };
}

/** Lock files held by this process: a second open of the same directory here is refused too. */
const heldHere = new Set<string>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false; // EPERM: exists, owned by another user
  }
  // A process killed (kill -9) but not yet reaped by its parent is a zombie: it has exited and holds nothing.
  const stat = readText(`/proc/${pid}/stat`);
  return stat === null || stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
}

/** On this machine: is the recorded holder still running? Decided at once from the process table. */
function holderRunsHere(path: string, holder: LockHolder, me: LockHolder): boolean {
  if (holder.pid === me.pid) return heldHere.has(path);
  if (!alive(holder.pid)) return false;
  const start = processStart(holder.pid);
  return holder.processStart === null || start === null || start === holder.processStart;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Elsewhere: is the holder's heartbeat still beating? Waits at most `staleAfterMs` to find out. */
async function heartbeatAlive(path: string, staleAfterMs: number): Promise<boolean> {
  let first: number;
  try {
    first = statSync(path).mtimeMs;
  } catch {
    return false;
  }
  for (;;) {
    let mtime: number;
    try {
      mtime = statSync(path).mtimeMs;
    } catch {
      return false;
    }
    if (mtime !== first) return true;
    if (Date.now() - mtime > staleAfterMs) return false;
    await sleep(Math.min(1_000, staleAfterMs / 10));
  }
}

function parse(text: string | null): LockHolder | null {
  try {
    const value = JSON.parse(text ?? '') as LockHolder;
    return typeof value?.pid === 'number' && typeof value.token === 'string' ? value : null;
  } catch {
    return null;
  }
}

/** Takes the lock on `dir` (which exists), or throws DataDirLockedError naming the holder. */
export async function lockDataDir(dir: string, options: LockOptions = {}): Promise<DataDirLock> {
  const heartbeatMs = options.heartbeatMs ?? HEARTBEAT_MS;
  const staleAfterMs = options.staleAfterMs ?? STALE_AFTER_MS;
  const absolute = resolve(dir);
  const path = join(absolute, LOCK_FILE);
  const me = whoAmI();
  const record = `${JSON.stringify(me, null, 2)}\n`;

  for (let attempt = 0; attempt < 10; attempt++) {
    const temporary = `${path}.${me.token}.tmp`;
    writeFileSync(temporary, record);
    try {
      linkSync(temporary, path); // fails with EEXIST when held; never shows a half-written file
      unlinkSync(temporary);
      return hold(path, me, heartbeatMs, options.onLost);
    } catch (err) {
      unlinkSync(temporary);
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = parse(readText(path));
    if (holder === null) {
      // Unreadable (not written by this code; or gone meanwhile): taken over unless something renews it.
      if (await heartbeatAlive(path, staleAfterMs)) {
        throw new Error(`the data directory ${absolute} holds a lock file ${LOCK_FILE} that this version cannot read and that is being renewed: another process uses the directory`);
      }
    } else {
      const sameMachine = holder.host === me.host && holder.bootId === me.bootId && holder.pidNamespace === me.pidNamespace;
      if (!sameMachine) {
        options.onWait?.(`the data directory ${absolute} is locked by pid ${holder.pid} on ${holder.host}; waiting up to ${Math.round(staleAfterMs / 1000)} s to see whether it still renews the lock`);
      }
      const running = sameMachine ? holderRunsHere(path, holder, me) : await heartbeatAlive(path, staleAfterMs);
      if (running) {
        throw new DataDirLockedError(absolute, holder, sameMachine ? '' : ` (it renewed the lock within the last ${Math.round(staleAfterMs / 1000)} s)`);
      }
    }
    // Said, as an operator looking at a restart wants to know that the process before did not stop cleanly.
    options.onWait?.(holder === null
      ? `the data directory ${absolute} held a lock file nobody renews: taking it over`
      : holder.host === me.host
        ? `the data directory ${absolute} was locked by pid ${holder.pid} on ${holder.host} (started ${holder.startedAt}), which no longer runs (killed, or its machine restarted): taking the lock over; the database recovers what was committed`
        : `the data directory ${absolute} was locked by pid ${holder.pid} on ${holder.host} (started ${holder.startedAt}), which stopped renewing the lock (gone, hung or cut off from this storage): taking the lock over; the database recovers what was committed`);
    takeOver(path, holder, me.token);
  }
  throw new Error(`could not lock the data directory ${absolute}: the lock file ${path} keeps changing`);
}

/** Moves a stale lock aside, and puts it back if another process replaced it meanwhile (then it is theirs). */
function takeOver(path: string, stale: LockHolder | null, token: string): void {
  const aside = `${path}.${token}.stale`;
  try {
    renameSync(path, aside);
  } catch {
    return; // gone already: someone else took it over; try again
  }
  const moved = parse(readText(aside));
  const same = stale === null ? moved === null : moved?.token === stale.token;
  if (!same) {
    try {
      linkSync(aside, path);
    } catch {
      // a third process holds it now; the next attempt will say so
    }
  }
  unlinkSync(aside);
}

/**
 * The heartbeat, on a thread of its own: the main thread can stand still for longer than the stale period
 * (PGlite's first start of a directory ran 17-34 s without yielding, a review), and a heartbeat on its event
 * loop then went silent while the process was alive and about to write: another machine took the lock over,
 * and both served. The thread renews the file and, once the file is not ours, says so and stops.
 */
const HEARTBEAT_THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const { readFileSync, utimesSync } = require('node:fs');
const { path, token, heartbeatMs } = workerData;
const beat = () => {
  let text = null;
  try { text = readFileSync(path, 'utf8'); } catch {}
  let holder = null;
  try { holder = JSON.parse(text); } catch {}
  if (!holder || holder.token !== token) {
    clearInterval(timer);
    parentPort.postMessage({ holder });
    return;
  }
  try { const now = new Date(); utimesSync(path, now, now); } catch {}
};
const timer = setInterval(beat, heartbeatMs);
`;

function hold(path: string, me: LockHolder, heartbeatMs: number, onLost?: (error: DataDirLockLostError) => void): DataDirLock {
  heldHere.add(path);
  const ours = () => parse(readText(path))?.token === me.token;
  let lostError: DataDirLockLostError | null = null;
  const lose = (holder: LockHolder | null) => {
    if (lostError) return;
    lostError = new DataDirLockLostError(path, holder);
    onLost?.(lostError);
  };
  // Never renews a lock that is no longer ours (removed by hand, or taken over while this process stood
  // still for the whole stale period): that would keep the new owner's lock alive in our name.
  const heartbeat = new Worker(HEARTBEAT_THREAD, { eval: true, workerData: { path, token: me.token, heartbeatMs } });
  heartbeat.on('message', (message: { holder: LockHolder | null }) => lose(message.holder));
  heartbeat.on('error', () => {
    // The thread failed (it should not): assertHeld still finds a lost lock before every statement.
  });
  heartbeat.unref();
  // The file is read before every statement (tens of microseconds; a PGlite step runs for milliseconds):
  // after a stop (SIGSTOP, a paused container) the thread may not have beaten yet when the first request
  // is served.
  const assertHeld = () => {
    if (!lostError) {
      const holder = parse(readText(path));
      if (holder?.token !== me.token) lose(holder);
    }
    if (lostError) throw lostError;
  };
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    void heartbeat.terminate();
    process.removeListener('exit', release);
    heldHere.delete(path);
    try {
      if (ours()) unlinkSync(path);
    } catch {
      // already gone
    }
  };
  // A process.exit() (the shutdown timer, a fatal error) skips close(): the lock still goes with it.
  process.on('exit', release);
  return { path, assertHeld, release };
}
