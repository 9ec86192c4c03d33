// What every session module shares: the database, the kernel, this process's cache and lock, and the
// few checks each operation starts with.
import type { FastifyBaseLogger } from 'fastify';
import type { Database, Queryable } from '../db/database.ts';
import { errors } from '../errors.ts';
import type { AsgdKernel, KernelOptions } from '../optim/types.ts';
import type { StateCache } from './cache.ts';
import type { KeyedMutex } from './mutex.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';

export interface SessionHooks {
  stepped?(session: string, seconds: number, lockWaitSeconds: number): void;
  /** A batch of `steps` steps committed as one statement (group commit). */
  committed?(session: string, steps: number): void;
  snapshotted?(session: string, reason: string): void;
}

export interface SessionContext {
  db: Database;
  kernel: AsgdKernel;
  kernelOptions: KernelOptions;
  log: FastifyBaseLogger;
  hooks: SessionHooks | undefined;
  idempotencyWindowSeconds: number;
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
  if (ifMatch !== null && ifMatch !== undefined && ifMatch !== version) throw errors.versionMismatch(`"${ifMatch}"`, version);
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
