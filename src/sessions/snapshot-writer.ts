// Writing snapshots: synchronously for changes that are not steps (create, load_state_dict, restore, fork,
// a manual snapshot), in the background every `snapshotEvery` steps, and for every moved copy at shutdown;
// and replay points (replay-points.ts) in the background between scheduled snapshots.
import type { Queryable } from '../db/database.ts';
import { isUnanswered } from '../db/errors.ts';
import type { GroupSpec, ScalarStateRow } from '../db/schema.ts';
import type { DiskShort } from '../db/disk-room.ts';
import { errors } from '../errors.ts';
import type { CacheEntry } from './cache.ts';
import type { SessionContext } from './context.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import { dropReplayPointsBelow, insertReplayPoint, replayPointDue, replayPointInterval } from './replay-points.ts';
import { snapshotInterval } from './retention.ts';
import { copyInSlices } from './slices.ts';
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

/**
 * The embedded database's disk without room for a whole state (`parts`): it takes about twice its bytes
 * there, the table's and the WAL's. A fork, a restore or a load has a small body, so the request's guard
 * (twice the body) let them through, and PGlite met a full disk mid-write (found by an operator's review).
 */
function roomShort(ctx: SessionContext, parts: readonly Buffer[]): DiskShort | null {
  return ctx.diskRoom?.(2 * parts.reduce((n, p) => n + p.length, 0)) ?? null;
}

/** What a snapshot records besides its tensors. */
export interface SnapshotMeta {
  version: number;
  step: number;
  groups: GroupSpec[];
  scalars: ScalarStateRow[];
  /** The copy's stamps (SessionState.stamps): a copy not of the database's history is not written. */
  stamps: string[];
}

export const metaOf = (state: SessionState): SnapshotMeta => ({ version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows(), stamps: state.stamps() });

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

/** `parts` as stored (chunks of CHUNK_BYTES) and their checksum with `meta`'s groups and scalars: a snapshot's or a replay point's. */
async function chunked(meta: SnapshotMeta, parts: readonly Buffer[]): Promise<{ chunks: Buffer[]; checksum: string }> {
  const chunks = chunksOf(parts, repo.CHUNK_BYTES);
  return { chunks, checksum: await snapshotChecksum(chunks, meta.groups, meta.scalars) };
}

export function createSnapshotWriter(ctx: SessionContext) {
  const { db, log, hooks, cache } = ctx;
  const pending = new Set<Promise<void>>();
  let closing = false;

  /**
   * Writes a snapshot in `q`'s transaction (null when one exists at that version already) from `parts`, the
   * tensor bytes in order (params then ax), cut into chunks of CHUNK_BYTES: views of the parts, a copy only
   * for a chunk that spans two of them. The session's replay points below it go: the snapshot supersedes them.
   */
  async function write(q: Queryable, sessionId: number, meta: SnapshotMeta, parts: readonly Buffer[], reason: string, pinned = false): Promise<SnapshotRecord | null> {
    const short = roomShort(ctx, parts);
    // A snapshot already at this version (a manual one asked for again, to pin it) writes no state.
    if (short && (await repo.snapshotVersion(q, sessionId, 'max')) !== meta.version) throw errors.insufficientStorage(`writing the session's whole state (${reason})`, short, 'ASGD_MIN_FREE_BYTES and twice the state written, its table and its WAL');
    const { chunks, checksum } = await chunked(meta, parts);
    const snapshot = await repo.insertSnapshot(db, q, { sessionId, version: meta.version, step: meta.step, reason, pinned, groups: meta.groups, scalars: meta.scalars, checksum }, chunks);
    if (snapshot) await dropReplayPointsBelow(q, sessionId, meta.version);
    return snapshot;
  }

  /** The state as a snapshot, in `q`'s transaction, written from the state itself (the caller holds it still). */
  function writeState(q: Queryable, sessionId: number, state: SessionState, reason: string): Promise<SnapshotRecord | null> {
    return write(q, sessionId, metaOf(state), state.tensorViews(), reason);
  }

  /**
   * True when a scheduled snapshot is due at `version` (default: the copy's) for this process's copy. Given
   * `previous`, the version before the batch that took the session to `version`: only when that batch
   * crossed into a new slot (one batch in all processes does), or when the slot before this one has no
   * snapshot this process knows of (the one whose batch crossed it did not write it). Without it, every
   * process stepping the session caught its copy up from the log and tried to claim every slot.
   */
  function due(session: SessionRecord, entry: CacheEntry, version = entry.state.version, previous?: number): boolean {
    const every = snapshotInterval(session);
    if (!snapshotDue(version, entry.lastSnapshotVersion, every)) return false;
    if (previous === undefined || entry.retrySlot === slotOf(version, every)) return true;
    return slotOf(version, every) > slotOf(previous, every) || slotOf(version, every) >= slotOf(entry.lastSnapshotVersion, every) + 2;
  }

  /**
   * In `q`'s transaction, for a change that is not a step taking the session from `previous` to `version`:
   * true when `version` opens a snapshot slot that has no scheduled snapshot yet (claimed, as
   * inBackground claims one), so that the change's snapshot is the slot's. Steps schedule a slot's
   * snapshot only when a step opens the slot.
   */
  async function claimsOpenedSlot(q: Queryable, session: SessionRecord, previous: number, version: number): Promise<boolean> {
    const every = snapshotInterval(session);
    return slotOf(version, every) > slotOf(previous, every) && repo.claimSnapshotSlot(q, session.id, slotStart(version, every), every);
  }

  /** What this process learned of the session's newest snapshot (written by any process): a slot it covers is not due here. */
  function known(entry: CacheEntry, newestSnapshot: number | null): void {
    if (newestSnapshot !== null && newestSnapshot > entry.lastSnapshotVersion) entry.lastSnapshotVersion = newestSnapshot;
  }

  /** Steps between the session's replay points, or null: off, or no shorter than its snapshot interval. */
  function pointInterval(session: SessionRecord): number | null {
    const interval = replayPointInterval(session, ctx.replayBoundBytes);
    return interval !== null && interval < snapshotInterval(session) ? interval : null;
  }

  /**
   * True when a replay point is due for a batch that took the session from `previous` to `version`: the
   * batch crossed a multiple of the interval (one batch in all processes does) and this process knows of no
   * snapshot at that version.
   */
  function pointDue(session: SessionRecord, entry: CacheEntry, previous: number, version: number): boolean {
    const interval = pointInterval(session);
    return interval !== null && replayPointDue(previous, version, interval) && entry.lastSnapshotVersion < version;
  }

  /**
   * Writes a snapshot of this process's copy in the background (one transaction: all or nothing), unless a
   * process already wrote one in this version's slot (repo.claimSnapshotSlot): every process that is current
   * when a slot begins schedules one, exactly one is written. A state up to `snapshotCopyLimitBytes` is
   * copied now and written while steps go on; a bigger one is written from the state itself under the
   * session's lock in this process (its steps wait; no second copy of a large model), at the version it has
   * then. Not once shutdown began, nor for a copy no longer cached.
   */
  function inBackground(session: SessionRecord, entry: CacheEntry, reason: string): Promise<void> {
    if (closing || cache.get(session.id) !== entry) return Promise.resolve();
    const scheduled = entry.state.version;
    const every = snapshotInterval(session);
    const slot = slotOf(scheduled, every);
    entry.lastSnapshotVersion = scheduled;
    if (entry.retrySlot === slot) {
      entry.retrySlot = undefined;
      entry.retriedSlot = slot;
    }
    return background(session, entry, 'snapshot', async (tx, meta, parts) => {
      if (!(await repo.claimSnapshotSlot(tx, session.id, slotStart(meta.version, every), every))) {
        log.debug({ session: session.name, version: meta.version }, 'snapshot slot already taken by another process');
        return false;
      }
      const snapshot = await write(tx, session.id, meta, parts, reason);
      if (!snapshot) return false;
      await repo.pruneHistory(tx, session.id);
      return true;
    }, (meta, inPlace) => {
      entry.lastSnapshotVersion = Math.max(entry.lastSnapshotVersion, meta.version);
      hooks?.snapshotted?.(session.name, reason);
      log.info({ session: session.name, version: meta.version, step: meta.step, reason, inPlace }, 'snapshot written');
    }, (databaseError) => {
      // The next slot schedules another attempt; after a database error, also the next step in this one (once).
      entry.lastSnapshotVersion = Math.min(entry.lastSnapshotVersion, scheduled - every);
      if (databaseError && entry.retriedSlot !== slot) entry.retrySlot = slot;
    });
  }

  /** Writes a replay point of this process's copy in the background, as inBackground writes a snapshot. */
  function pointInBackground(session: SessionRecord, entry: CacheEntry): Promise<void> {
    return background(session, entry, 'replay point', async (tx, meta, parts, axFromParams) => {
      const { chunks, checksum } = await chunked(meta, parts);
      const point = { sessionId: session.id, version: meta.version, step: meta.step, groups: meta.groups, scalars: meta.scalars, checksum, axFromParams };
      return (await insertReplayPoint(db, tx, point, chunks)) !== null;
    }, (meta, inPlace) => {
      hooks?.replayPointWritten?.(session.name);
      log.debug({ session: session.name, version: meta.version, step: meta.step, inPlace }, 'replay point written');
    }, () => {}, true);
  }

  /**
   * Runs `persist` in one transaction in the background with this process's copy: a state up to
   * `snapshotCopyLimitBytes` copied now (steps go on), a bigger one under the session's lock (its steps
   * wait; no second copy of a large model), at the version it has then. Not once shutdown began, nor for a
   * copy no longer cached. A failure is not fatal: the log still holds every step. Resolves once the copy is
   * made (a slice at a time: the caller holds the session's lock until then), not when it is written.
   */
  async function background(
    session: SessionRecord, entry: CacheEntry, what: string,
    persist: (tx: Queryable, meta: SnapshotMeta, parts: readonly Buffer[], axFromParams: boolean) => Promise<boolean>,
    done: (meta: SnapshotMeta, inPlace: boolean) => void,
    failed: (databaseError: boolean) => void,
    axFromParams = false,
  ): Promise<void> {
    if (closing || cache.get(session.id) !== entry) return;
    const { state } = entry;
    const inPlace = state.layout.numel * 8 > ctx.snapshotCopyLimitBytes;
    /** The tensors to write: params then ax, or params alone when `axFromParams` allows it and ax equals them bit for bit. */
    const capture = async (copy: boolean) => {
      const meta = metaOf(state);
      const [params, ax] = state.tensorViews();
      const same = axFromParams && params.equals(ax);
      if (!copy) return { meta, parts: same ? [params] : [params, ax], same };
      if (!same) return { meta, parts: [await state.tensorBytes()], same };
      const bytes = Buffer.allocUnsafe(params.byteLength);
      await copyInSlices(bytes, params);
      return { meta, parts: [bytes], same };
    };
    type Captured = Awaited<ReturnType<typeof capture>>;
    const job = async (copied: Captured | null) => {
      // In place: the state as it is now that this job holds the lock (steps may have moved it since).
      if (!copied && (closing || cache.get(session.id) !== entry)) return;
      const { meta, parts, same } = copied ?? (await capture(false));
      const short = roomShort(ctx, parts);
      if (short) {
        failed(false);
        log.warn({ session: session.name, version: meta.version, free: short.free, needed: short.needed }, `background ${what} not written: the embedded database's disk is nearly full (ASGD_MIN_FREE_BYTES); the log holds every step`);
        return;
      }
      try {
        const written = await db.transaction(async (tx) => {
          // A copy that is not of the database's history (restored or failed over since) writes nothing.
          if (!(await repo.ofHistory(tx, session.id, meta.version, meta.stamps))) {
            // Nothing at its version is kept to tell by when another process's newer snapshot pruned the log
            // there: moot (a review found this warned 20 times in 20 s on three replicas). A copy of another
            // history (a database restored from a backup and stepped past this version again) is dropped here
            // at debug too once a newer snapshot exists; currentState logs it when the copy is next used.
            const newest = await repo.snapshotVersion(tx, session.id, 'max');
            if (newest !== null && newest > meta.version) {
              log.debug({ session: session.name, version: meta.version, newest }, `background ${what} not written: a newer snapshot (another process's) supersedes it`);
            } else {
              log.warn({ session: session.name, version: meta.version }, `background ${what} not written: this process's copy is not of the database's history`);
            }
            return false;
          }
          return persist(tx, meta, parts, same);
        });
        if (written) done(meta, inPlace);
      } catch (err) {
        failed(true);
        // The session deleted meanwhile (its row gone, the foreign key fails): nothing is lost.
        if ((err as { code?: unknown }).code === '23503') log.debug({ session: session.name, version: meta.version }, `session deleted before its background ${what} was written`);
        else log.warn({ err, session: session.name, version: meta.version }, `background ${what} failed`);
      }
    };
    // Pending from the start, the copy included: a shutdown that begins while the copy is made waits for the
    // write (it was added once the copy was made: a shutdown then neither waited for it nor wrote its own).
    let copyMade!: () => void;
    const made = new Promise<void>((resolve) => (copyMade = resolve));
    const running = (async () => {
      let copied: Captured | null = null;
      try {
        copied = inPlace ? null : await capture(true);
      } catch (err) {
        log.warn({ err, session: session.name }, `background ${what} not written: its copy failed`);
        return;
      } finally {
        copyMade();
      }
      await (inPlace ? ctx.mutex.run(session.name, () => job(null)) : job(copied));
    })();
    pending.add(running);
    void running.finally(() => pending.delete(running));
    return made;
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
        const written = await ctx.mutex.run(rows[0].name, () => db.transaction(async (tx) => {
          const current = await tx.query<{ version: number }>('SELECT version::float8 AS version FROM sessions WHERE id = $1', [id]);
          if (!current.length || current[0].version !== entry.state.version || cache.get(id) !== entry) return; // moved on, or gone
          // The same version number in another history (the database restored or failed over): not this copy's to write.
          if (!(await repo.ofHistory(tx, id, entry.state.version, entry.state.stamps()))) {
            log.warn({ sessionId: id, version: entry.state.version }, 'shutdown snapshot not written: this process\'s copy is not of the database\'s history');
            return;
          }
          // One at this version already (a change of hyperparameters wrote it): nothing to write.
          if ((await repo.snapshotVersion(tx, id, 'max')) === entry.state.version) return false;
          return (await writeState(tx, id, entry.state, 'shutdown')) !== null;
        }));
        // As background snapshots are (after the commit): an operator reading a shutdown's log sees what it wrote.
        if (written) log.info({ session: rows[0].name, version: entry.state.version, reason: 'shutdown' }, 'snapshot written');
      } catch (err) {
        // The database unreachable, or silent for ASGD_DB_TIMEOUT_MS (the statement cancelled, or its
        // connection dropped): the next session's would wait as long again, each, within
        // ASGD_SHUTDOWN_TIMEOUT_MS; the log holds every step, so none is tried.
        if (isUnanswered(err)) {
          log.warn({ err, sessionId: id }, 'shutdown snapshots not written: the database does not answer (the log holds every step)');
          return;
        }
        log.warn({ err, sessionId: id }, 'shutdown snapshot failed');
      }
    }
  }

  return { write, writeState, due, known, claimsOpenedSlot, pointDue, inBackground, pointInBackground, settle, shutdown };
}
