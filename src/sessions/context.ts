// What every session module shares: the database, the kernel, this process's cache and lock, and the
// few checks each operation starts with.
import type { FastifyBaseLogger } from 'fastify';
import type { Database, Queryable } from '../db/database.ts';
import type { DiskRoom } from '../db/disk-room.ts';
import { errors } from '../errors.ts';
import type { AsgdKernel, KernelOptions } from '../optim/types.ts';
import type { StateCache } from './cache.ts';
import type { KeyedMutex } from './mutex.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';
import type { StateView } from './model.ts';
import type { SessionState } from './state.ts';

export interface SessionHooks {
  stepped?(session: string, seconds: number, lockWaitSeconds: number): void;
  /** A batch of `steps` steps committed as one statement (group commit). */
  committed?(session: string, steps: number): void;
  snapshotted?(session: string, reason: string): void;
  /** A replay point (replay-points.ts) written by this process. */
  replayPointWritten?(session: string): void;
  /** Steps replayed from the log to bring a state to a version (a copy caught up, or a state rebuilt). */
  replayed?(session: string, steps: number): void;
}

export interface SessionContext {
  db: Database;
  kernel: AsgdKernel;
  kernelOptions: KernelOptions;
  log: FastifyBaseLogger;
  hooks: SessionHooks | undefined;
  idempotencyWindowSeconds: number;
  /** How long a step batch may wait for clients about to step again (linger.ts); 0: never. */
  stepLingerMs: number;
  /** Background snapshots of a bigger state (params + ax) are written in place under `mutex` instead of from a copy. */
  snapshotCopyLimitBytes: number;
  /** The embedded database's disk guard: background snapshots and replay points without room are not written. */
  diskRoom?: DiskRoom | null;
  /** ASGD_REPLAY_BOUND_BYTES: the log bytes between replay points (replay-points.ts); 0: none written. */
  replayBoundBytes: number;
  cache: StateCache;
  /** One operation per session at a time in this process (across processes the row lock orders them). */
  mutex: KeyedMutex;
}

export async function mustFind(q: Queryable, name: string, lock = false): Promise<SessionRecord> {
  const session = await repo.findSession(q, name, lock);
  if (!session) throw errors.sessionNotFound(name);
  return session;
}

export function checkIfMatch(ifMatch: number | null | undefined, version: number): void {
  if (ifMatch !== null && ifMatch !== undefined && ifMatch !== version) throw errors.versionMismatch(ifMatch, version);
}

/**
 * Reads that rebuild state outside a step's row lock (a copy gone or behind, an old version, a snapshot)
 * run as one consistent read: a snapshot found there keeps its chunks, and the log after it, even when
 * another process writes a newer snapshot and prunes them meanwhile (else: a 503 SNAPSHOT_UNAVAILABLE or
 * a 404 VERSION_NOT_AVAILABLE for the current version, under nothing worse than frequent snapshots).
 */
export function consistentRead<T>(db: Database, fn: (q: Queryable) => Promise<T>): Promise<T> {
  return db.transaction(fn, { consistentRead: true });
}

/** What the rounds of sessions with aggregation (rounds.ts) use of the session modules (service.ts `roundHost`): the lock, the cached state, the snapshots. */
export interface RoundHost {
  /** Runs `fn` under the session's lock in this process (the cached state is stepped and read under it). */
  run<T>(name: string, fn: () => Promise<T>): Promise<T>;
  /** This process's copy of the session's state at its current version (caught up or rebuilt). */
  currentState(q: Queryable, session: SessionRecord): Promise<{ state: SessionState }>;
  /** Drops this process's copy (a transaction failed after the kernel ran on it). */
  forget(sessionId: number): void;
  /** Calls `fn` with the state at an answer's version (reads.withAnswerState); the caller holds the session's lock. */
  withAnswerState(name: string, answer: { version: number }, fn: (view: StateView) => void): Promise<void>;
  applyStep(state: SessionState, present: readonly number[]): void;
  /**
   * After a round's step committed: the step metrics, and a background snapshot when one is due; resolves
   * once its copy is made (the caller holds the session's lock until then).
   */
  afterStep(session: SessionRecord, entry: { state: SessionState }, seconds: number, lockWaitSeconds: number): Promise<void>;
  /**
   * A contribution of the session waits here for its round (a worker is mid-round): while its round is open
   * the idle-session sweep passes the session over, until the returned release is called.
   */
  holdOpen(name: string): () => void;
  idempotencyWindowSeconds: number;
}
