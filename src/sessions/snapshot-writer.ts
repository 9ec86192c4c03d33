// Writing snapshots: synchronously for changes that are not steps (create, load_state_dict, restore, fork,
// a manual snapshot), in the background every `snapshotEvery` steps, and for every moved copy at shutdown.
import type { Queryable } from '../db/database.ts';
import type { GroupSpec, ScalarStateRow } from '../db/schema.ts';
import type { CacheEntry } from './cache.ts';
import type { SessionContext } from './context.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import { snapshotInterval } from './retention.ts';
import { snapshotChecksum, type SessionState } from './state.ts';

/**
 * Scheduled snapshots go by slot: versions 1..every are slot 0 (the snapshot at creation), every+1..2*every
 * slot 1, and so on. A slot is the same in every process, so the processes can agree that one snapshot
 * covers it (the first version of a slot a process is current at), however their caches interleave.
 */
const slotOf = (version: number, every: number) => Math.floor((version - 1) / every);
const slotStart = (version: number, every: number) => slotOf(version, every) * every + 1;
/** A snapshot is due when the version is in a later slot than the last snapshot this process wrote or loaded. */
const snapshotDue = (version: number, lastSnapshotVersion: number, every: number) => slotOf(version, every) > slotOf(lastSnapshotVersion, every);

/** What a snapshot records besides its tensors. */
export interface SnapshotMeta {
  version: number;
  step: number;
  groups: GroupSpec[];
  scalars: ScalarStateRow[];
}

export const metaOf = (state: SessionState): SnapshotMeta => ({ version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() });

export type SnapshotWriter = ReturnType<typeof createSnapshotWriter>;

export function createSnapshotWriter(ctx: SessionContext) {
  const { db, log, hooks, cache } = ctx;
  const pending = new Set<Promise<void>>();
  let closing = false;

  /** Writes a snapshot in `q`'s transaction (null when one exists at that version already). */
  async function write(q: Queryable, sessionId: number, meta: SnapshotMeta, bytes: Buffer, reason: string, pinned = false): Promise<SnapshotRecord | null> {
    const chunks: Buffer[] = [];
    for (let at = 0; at < bytes.byteLength; at += repo.CHUNK_BYTES) chunks.push(bytes.subarray(at, Math.min(bytes.byteLength, at + repo.CHUNK_BYTES)));
    const checksum = snapshotChecksum(chunks, meta.groups, meta.scalars);
    return repo.insertSnapshot(db, q, { sessionId, version: meta.version, step: meta.step, reason, pinned, groups: meta.groups, scalars: meta.scalars, checksum }, bytes);
  }

  /** The state as a snapshot, in `q`'s transaction. */
  function writeState(q: Queryable, sessionId: number, state: SessionState, reason: string): Promise<SnapshotRecord | null> {
    return write(q, sessionId, metaOf(state), state.tensorBytes(), reason);
  }

  /** True when a scheduled snapshot is due at `version` (default: the copy's) for this process's copy. */
  function due(session: SessionRecord, entry: CacheEntry, version = entry.state.version): boolean {
    return snapshotDue(version, entry.lastSnapshotVersion, snapshotInterval(session));
  }

  /**
   * Copies the state now and writes it as a snapshot in the background (one transaction: all or nothing),
   * unless a process already wrote one in this version's slot (repo.claimSnapshotSlot): every process
   * that is current when a slot begins schedules one, exactly one is written. Not once shutdown began, nor
   * for a copy no longer cached.
   */
  function inBackground(session: SessionRecord, entry: CacheEntry, reason: string): void {
    if (closing || cache.get(session.id) !== entry) return;
    const { state } = entry;
    const meta = metaOf(state);
    const bytes = state.tensorBytes();
    entry.lastSnapshotVersion = meta.version;
    const job = (async () => {
      try {
        const written = await db.transaction(async (tx) => {
          if (!(await repo.claimSnapshotSlot(tx, session.id, slotStart(meta.version, snapshotInterval(session))))) return false;
          const snapshot = await write(tx, session.id, meta, bytes, reason);
          if (snapshot) await repo.pruneHistory(tx, session.id, session.keepSnapshots);
          return snapshot !== null;
        });
        if (!written) {
          log.debug({ session: session.name, version: meta.version }, 'snapshot slot already taken by another process');
          return;
        }
        hooks?.snapshotted?.(session.name, reason);
        log.info({ session: session.name, version: meta.version, step: meta.step, reason }, 'snapshot written');
      } catch (err) {
        // Not fatal: the log still holds every step; the next step schedules another attempt.
        entry.lastSnapshotVersion = Math.min(entry.lastSnapshotVersion, meta.version - snapshotInterval(session));
        log.warn({ err, session: session.name, version: meta.version }, 'background snapshot failed');
      }
    })();
    pending.add(job);
    void job.finally(() => pending.delete(job));
  }

  /** Waits for the background snapshots under way. */
  async function settle(): Promise<void> {
    await Promise.allSettled([...pending]);
  }

  /** Graceful shutdown: no new background snapshots; wait for those under way; snapshot every copy that moved. */
  async function shutdown(): Promise<void> {
    closing = true;
    await settle();
    for (const [id, entry] of cache.entries()) {
      if (entry.state.version <= entry.lastSnapshotVersion) continue;
      try {
        await db.transaction(async (tx) => {
          const rows = await tx.query<{ version: number }>('SELECT version::float8 AS version FROM sessions WHERE id = $1', [id]);
          if (!rows.length || rows[0].version !== entry.state.version) return; // another process moved on
          await writeState(tx, id, entry.state, 'shutdown');
        });
      } catch (err) {
        log.warn({ err, sessionId: id }, 'shutdown snapshot failed');
      }
    }
  }

  return { write, writeState, due, inBackground, settle, shutdown };
}
