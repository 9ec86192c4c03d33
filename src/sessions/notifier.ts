// Who is waiting for which session's next version in this process: long-polling reads (`after_version`
// + `wait`) and event streams. Fed by the database's NOTIFY on asgd_versions (every process's commits,
// this one's included), so a replica sees another's step as soon as it commits. Bounded: a fixed number
// of waiters and of streams per process, each released on timeout, client disconnect and shutdown.
//
// Steps announce themselves only to those who listen: a step NOTIFYs while its session's row carries a
// listening lease (sessions.listened_until), which a process takes before its first waiter or stream of
// that session reads the version (`listening`) and renews while it has them. Loads, restores, forks,
// rounds and deletions always NOTIFY. The embedded database (one process) needs no lease: it always does.
import type { FastifyBaseLogger } from 'fastify';
import type { Database } from '../db/database.ts';
import type { Listener } from '../db/listener.ts';
import { errors } from '../errors.ts';
import { leaseListening, VERSION_CHANNEL } from './repository.ts';

/** How long a listening lease lasts in the database, when it is renewed, and how often that is checked. */
export interface LeaseTiming {
  seconds: number;
  renewBeforeSeconds: number;
  checkMs: number;
}

/** 120 s, renewed when less than 60 s is left, checked every 20 s. */
export const LEASE: LeaseTiming = { seconds: 120, renewBeforeSeconds: 60, checkMs: 20_000 };

/** A version change as announced: version 0 means the session was deleted; null: anything may have changed (listener reconnected). */
export type VersionSignal = { version: number; step: number } | null;

export interface NotifierOptions {
  db: Database;
  log: FastifyBaseLogger;
  maxWaiters: number;
  maxStreams: number;
  /** The listening lease's timing (tests shorten it). */
  lease?: LeaseTiming;
}

type Subscriber = (signal: VersionSignal) => void;

/** `<session name>:<version>:<step>`; names cannot hold ':' (NAME_PATTERN). */
export function parseVersionPayload(payload: string): { name: string; version: number; step: number } | null {
  const m = /^([A-Za-z0-9._-]{1,128}):(\d{1,15}):(\d{1,15})$/.exec(payload);
  return m ? { name: m[1], version: Number(m[2]), step: Number(m[3]) } : null;
}

export function createVersionNotifier(options: NotifierOptions) {
  const { db, log } = options;
  const timing = options.lease ?? LEASE;
  const subscribers = new Map<string, Set<Subscriber>>();
  /** Told the name of every session deleted by any process (DELETE, the idle sweeper). */
  const deletedListeners = new Set<(name: string) => void>();
  let waiters = 0;
  let streams = 0;
  let listener: Listener | null = null;
  let closed = false;
  /** Called when the process shuts down: waiters answer, streams end. */
  const onClose = new Set<() => void>();
  /** Sessions this process holds a listening lease on: until when (this clock, from before the lease was asked for), or the request under way. */
  const leases = new Map<string, { until: number; pending: Promise<void> | null }>();
  let renewTimer: NodeJS.Timeout | null = null;

  function publish(name: string, signal: VersionSignal): void {
    const set = subscribers.get(name);
    if (!set) return;
    for (const fn of [...set]) fn(signal);
  }

  function subscribe(name: string, fn: Subscriber): () => void {
    let set = subscribers.get(name);
    if (!set) subscribers.set(name, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0 && subscribers.get(name) === set) subscribers.delete(name);
    };
  }

  /** Takes (or extends) the listening lease on `name` in the database; one request at a time per name. */
  function lease(name: string): Promise<void> {
    const held = leases.get(name);
    if (held?.pending) return held.pending;
    const asked = Date.now();
    const pending = leaseListening(db, name, timing.seconds).then(
      (exists) => {
        if (exists) leases.set(name, { until: asked + timing.seconds * 1000, pending: null });
        else leases.delete(name);
      },
      (err: unknown) => {
        if (leases.get(name)?.pending === pending) leases.set(name, { until: held?.until ?? 0, pending: null });
        throw err;
      },
    );
    leases.set(name, { until: held?.until ?? 0, pending });
    return pending;
  }

  /**
   * Resolves once the steps of `name` are announced to this process (its listening lease is held): a waiter
   * or stream registered before this and reading the version after it misses no commit. No database round
   * trip while the lease has more than `renewBeforeSeconds` left.
   */
  function listening(name: string): Promise<void> {
    if (db.kind === 'pglite') return Promise.resolve(); // one process: every step NOTIFYs
    const held = leases.get(name);
    if (held && !held.pending && held.until - Date.now() > timing.renewBeforeSeconds * 1000) return Promise.resolve();
    return lease(name);
  }

  /**
   * Renews the leases of sessions that still have waiters or streams here; drops the others (they lapse in
   * the database). A lease that lapsed (renewal failed, the database was away) may have missed steps: its
   * subscribers are told to read again once it is back.
   */
  async function renewLeases(): Promise<void> {
    for (const [name, held] of [...leases]) {
      if (held.pending) continue;
      if (!subscribers.has(name)) {
        leases.delete(name);
        continue;
      }
      if (held.until - Date.now() > timing.renewBeforeSeconds * 1000) continue;
      const lapsed = held.until <= Date.now();
      try {
        await lease(name);
        if (lapsed) publish(name, null);
      } catch (err) {
        log.warn({ err, session: name }, 'could not renew the listening lease; waiters may see new versions late');
      }
    }
  }

  async function start(): Promise<void> {
    // A database down for a while fails every reconnection attempt (every 2 s): said once, then at debug.
    let failedAttempts = 0;
    listener = await db.listen(VERSION_CHANNEL, {
      onNotify(payload) {
        const parsed = parseVersionPayload(payload);
        if (!parsed) return;
        if (parsed.version === 0) leases.delete(parsed.name); // a session of that name made later has no lease
        publish(parsed.name, { version: parsed.version, step: parsed.step });
        if (parsed.version === 0) for (const fn of deletedListeners) fn(parsed.name);
      },
      onReset() {
        log.info({ failedAttempts }, 'version listener reconnected');
        failedAttempts = 0;
        for (const name of [...subscribers.keys()]) publish(name, null);
      },
      onError(err) {
        if (failedAttempts++ === 0) log.warn({ err }, 'version listener lost its connection; reconnecting (further failures at debug)');
        else log.debug({ err, failedAttempts }, 'version listener: reconnection failed');
      },
    });
    if (db.kind !== 'pglite') {
      renewTimer = setInterval(() => void renewLeases(), timing.checkMs);
      renewTimer.unref();
    }
  }

  /**
   * A wait for `name` to pass `afterVersion`: `ready` resolves on a newer version (or a deletion, or a
   * listener reset: the caller re-reads), after `ms`, when `signal` aborts, or at shutdown. Register it,
   * then await `listening(name)` (steps announced only while a lease is held), then read the current
   * version: no commit falls between the read and the wait.
   */
  function waitFor(name: string, afterVersion: number, ms: number, signal: AbortSignal): { ready: Promise<void>; cancel: () => void } {
    if (closed) return { ready: Promise.resolve(), cancel: () => {} };
    if (waiters >= options.maxWaiters) throw errors.tooManyWaiters('waiting reads', options.maxWaiters);
    waiters++;
    let finish!: () => void;
    const ready = new Promise<void>((resolve) => (finish = resolve));
    let done = false;
    const release = () => {
      if (done) return;
      done = true;
      waiters--;
      clearTimeout(timer);
      unsubscribe();
      signal.removeEventListener('abort', release);
      onClose.delete(release);
      finish();
    };
    const unsubscribe = subscribe(name, (s) => {
      if (s === null || s.version === 0 || s.version > afterVersion) release();
    });
    const timer = setTimeout(release, ms);
    signal.addEventListener('abort', release);
    onClose.add(release);
    if (signal.aborted) release();
    return { ready, cancel: release };
  }

  /** Holds one of the bounded stream slots until `release` (also called at shutdown via `end`); then await `listening(name)` before reading. */
  function openStream(name: string, fn: Subscriber, end: () => void): () => void {
    if (closed) throw errors.unavailable('the server is shutting down; retry on another replica');
    if (streams >= options.maxStreams) throw errors.tooManyWaiters('event streams', options.maxStreams);
    streams++;
    const unsubscribe = subscribe(name, fn);
    let done = false;
    const release = () => {
      if (done) return;
      done = true;
      streams--;
      unsubscribe();
      onClose.delete(shutdown);
    };
    const shutdown = () => {
      release();
      end();
    };
    onClose.add(shutdown);
    return release;
  }

  /** Shutdown: every waiter answers now and every stream ends, so that in-flight requests finish. */
  function release(): void {
    closed = true;
    for (const fn of [...onClose]) fn();
  }

  async function close(): Promise<void> {
    release();
    if (renewTimer) clearInterval(renewTimer);
    renewTimer = null;
    await listener?.close();
    listener = null;
  }

  /** Calls `fn` with the name of each session deleted from now on, by this process or another. */
  function onDeleted(fn: (name: string) => void): () => void {
    deletedListeners.add(fn);
    return () => deletedListeners.delete(fn);
  }

  return { start, subscribe, onDeleted, waitFor, openStream, listening, release, close, stats: () => ({ waiters, streams, closed }) };
}

export type VersionNotifier = ReturnType<typeof createVersionNotifier>;
