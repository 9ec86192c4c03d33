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

/** `parts` (bytes in order) cut into chunks of at most `size` bytes: views, a copy only where a chunk spans two parts. */
function chunksOf(parts: readonly Buffer[], size: number): Buffer[] {
  const chunks: Buffer[] = [];
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  for (const part of parts) {
    let at = 0;
    while (at < part.byteLength) {
      const take = Math.min(size - pendingBytes, part.byteLength - at);
      const piece = part.subarray(at, at + take);
      at += take;
      if (pendingBytes === 0 && take === size) {
        chunks.push(piece);
        continue;
      }
      pending.push(piece);
      pendingBytes += take;
      if (pendingBytes === size) {
        chunks.push(Buffer.concat(pending, size));
        pending = [];
        pendingBytes = 0;
      }
    }
  }
  if (pendingBytes) chunks.push(pending.length === 1 ? pending[0] : Buffer.concat(pending, pendingBytes));
  return chunks;
}

export function createSnapshotWriter(ctx: SessionContext) {
  const { db, log, hooks, cache } = ctx;
  const pending = new Set<Promise<void>>();
  let closing = false;

  /**
   * Writes a snapshot in `q`'s transaction (null when one exists at that version already) from `parts`, the
   * tensor bytes in order (params then ax), cut into chunks of CHUNK_BYTES: views of the parts, a copy only
   * for a chunk that spans two of them.
   */
  async function write(q: Queryable, sessionId: number, meta: SnapshotMeta, parts: readonly Buffer[], reason: string, pinned = false): Promise<SnapshotRecord | null> {
    const chunks = chunksOf(parts, repo.CHUNK_BYTES);
    const checksum = snapshotChecksum(chunks, meta.groups, meta.scalars);
    return repo.insertSnapshot(db, q, { sessionId, version: meta.version, step: meta.step, reason, pinned, groups: meta.groups, scalars: meta.scalars, checksum }, chunks);
  }

  /** The state as a snapshot, in `q`'s transaction, written from the state itself (the caller holds it still). */
  function writeState(q: Queryable, sessionId: number, state: SessionState, reason: string): Promise<SnapshotRecord | null> {
    return write(q, sessionId, metaOf(state), state.tensorViews(), reason);
  }

  /** True when a scheduled snapshot is due at `version` (default: the copy's) for this process's copy. */
  function due(session: SessionRecord, entry: CacheEntry, version = entry.state.version): boolean {
    return snapshotDue(version, entry.lastSnapshotVersion, snapshotInterval(session));
  }

  /**
   * Writes a snapshot of this process's copy in the background (one transaction: all or nothing), unless a
   * process already wrote one in this version's slot (repo.claimSnapshotSlot): every process that is current
   * when a slot begins schedules one, exactly one is written. A state up to `snapshotCopyLimitBytes` is
   * copied now and written while steps go on; a bigger one is written from the state itself under the
   * session's lock in this process (its steps wait; no second copy of a large model), at the version it has
   * then. Not once shutdown began, nor for a copy no longer cached.
   */
  function inBackground(session: SessionRecord, entry: CacheEntry, reason: string): void {
    if (closing || cache.get(session.id) !== entry) return;
    const { state } = entry;
    entry.lastSnapshotVersion = state.version;
    const scheduled = state.version;
    const inPlace = state.layout.numel * 8 > ctx.snapshotCopyLimitBytes;
    const copied = inPlace ? null : { meta: metaOf(state), parts: [state.tensorBytes()] };
    const job = async () => {
      // In place: the state as it is now that this job holds the lock (steps may have moved it since).
      if (!copied && (closing || cache.get(session.id) !== entry)) return;
      const { meta, parts } = copied ?? { meta: metaOf(state), parts: state.tensorViews() };
      try {
        const written = await db.transaction(async (tx) => {
          if (!(await repo.claimSnapshotSlot(tx, session.id, slotStart(meta.version, snapshotInterval(session))))) return false;
          const snapshot = await write(tx, session.id, meta, parts, reason);
          if (snapshot) await repo.pruneHistory(tx, session.id, session.keepSnapshots);
          return snapshot !== null;
        });
        if (!written) {
          log.debug({ session: session.name, version: meta.version }, 'snapshot slot already taken by another process');
          return;
        }
        entry.lastSnapshotVersion = Math.max(entry.lastSnapshotVersion, meta.version);
        hooks?.snapshotted?.(session.name, reason);
        log.info({ session: session.name, version: meta.version, step: meta.step, reason, inPlace }, 'snapshot written');
      } catch (err) {
        // Not fatal: the log still holds every step; the next step schedules another attempt.
        entry.lastSnapshotVersion = Math.min(entry.lastSnapshotVersion, scheduled - snapshotInterval(session));
        // The session deleted meanwhile (its row gone, the snapshot's foreign key fails): nothing is lost.
        if ((err as { code?: unknown }).code === '23503') log.debug({ session: session.name, version: meta.version }, 'session deleted before its background snapshot was written');
        else log.warn({ err, session: session.name, version: meta.version }, 'background snapshot failed');
      }
    };
    const running = inPlace ? ctx.mutex.run(session.name, job) : job();
    pending.add(running);
    void running.finally(() => pending.delete(running));
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
        const rows = await db.query<{ name: string }>('SELECT name FROM sessions WHERE id = $1', [id]);
        if (!rows.length) continue;
        // Under the session's lock: the snapshot is written from the state itself, which no step may move meanwhile.
        await ctx.mutex.run(rows[0].name, () => db.transaction(async (tx) => {
          const current = await tx.query<{ version: number }>('SELECT version::float8 AS version FROM sessions WHERE id = $1', [id]);
          if (!current.length || current[0].version !== entry.state.version || cache.get(id) !== entry) return; // moved on, or gone
          await writeState(tx, id, entry.state, 'shutdown');
        }));
      } catch (err) {
        log.warn({ err, sessionId: id }, 'shutdown snapshot failed');
      }
    }
  }

  return { write, writeState, due, inBackground, settle, shutdown };
}
