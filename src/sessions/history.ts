// A session's state at a version, from its history: the newest snapshot at or below it, with the logged
// steps after it replayed (the kernel is deterministic, so the replay is bit-exact).
import type { Queryable } from '../db/database.ts';
import { isDbError } from '../db/errors.ts';
import { ApiError, errors } from '../errors.ts';
import type { CacheEntry } from './cache.ts';
import type { SessionContext } from './context.ts';
import { unpackGradients } from './gradients.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import { findReplayPointAtOrBelow, readReplayPointChunks, replayPointInterval, type ReplayPointRecord } from './replay-points.ts';
import { copyInSlices } from './slices.ts';
import { SnapshotHash, type SessionState } from './state.ts';
import { applyHyperDelta } from './step-input.ts';
import type { ParamSpec } from '../db/schema.ts';

export type History = ReturnType<typeof createHistory>;

/** What loading a stored state reads of its row: a snapshot's or a replay point's. */
type StoredState = SnapshotRecord | ReplayPointRecord;

/** Bytes of logged float32 gradients one read of the log brings in while replaying, and its bound in steps. */
const REPLAY_PAGE_BYTES = 64 * 1024 * 1024;
const MAX_REPLAY_PAGE_STEPS = 1024;

/** How often a locked build is tried (currentStateLocked): each retry follows another process's snapshot. */
const LOCKED_BUILD_ATTEMPTS = 4;

export function createHistory(ctx: SessionContext) {
  const { cache, kernel, kernelOptions } = ctx;

  /** A snapshot's state, read chunk by chunk straight into a new arena and checked against its checksum. */
  function loadSnapshot(q: Queryable, snapshot: SnapshotRecord, session: { id: number; name: string; params: ParamSpec[] }): Promise<SessionState> {
    return loadStored(q, snapshot, session, (onChunk) => repo.readSnapshotChunks(q, snapshot.id, onChunk), `snapshot ${snapshot.id}`);
  }

  /** A stored state (a snapshot or a replay point) read chunk by chunk by `read` into a new arena, checked against its checksum. */
  async function loadStored(
    q: Queryable, stored: StoredState, session: { id: number; name: string; params: ParamSpec[] },
    read: (onChunk: (seq: number, data: Buffer) => void) => Promise<number>, what: string,
  ): Promise<SessionState> {
    const state = cache.create(session, stored.version, stored.step, stored.groups, stored.scalars);
    const n = state.layout.numel;
    const axFromParams = 'axFromParams' in stored && stored.axFromParams;
    const total = axFromParams ? n * 4 : n * 8;
    if (stored.byteSize !== total) throw new Error(`${what} holds ${stored.byteSize} bytes, expected ${total}`);
    const paramBytes = new Uint8Array(state.arena.params.buffer, state.arena.params.byteOffset, n * 4);
    const axBytes = new Uint8Array(state.arena.ax.buffer, state.arena.ax.byteOffset, n * 4);
    // Each chunk is hashed as it arrives (none is kept for a checksum at the end: a model's size of memory).
    const hash = new SnapshotHash();
    let chunks = 0;
    let at = 0;
    try {
      await read((seq, data) => {
        // Copy the chunk into params (first half) and ax (second half) as it arrives.
        let offset = 0;
        while (offset < data.byteLength) {
          if (at === total) throw new Error(`${what} holds more than its ${total} bytes`);
          if (at < n * 4) {
            const take = Math.min(data.byteLength - offset, n * 4 - at);
            paramBytes.set(data.subarray(offset, offset + take), at);
            offset += take;
            at += take;
          } else {
            const take = Math.min(data.byteLength - offset, total - at);
            axBytes.set(data.subarray(offset, offset + take), at - n * 4);
            offset += take;
            at += take;
          }
        }
        hash.update(data);
        if (++chunks !== seq + 1) throw new Error(`${what}: chunk ${seq} out of order`);
      });
    } catch (err) {
      state.arena.release();
      throw err;
    }
    if (chunks !== stored.chunkCount || at !== total) {
      state.arena.release();
      if ('reason' in stored) throw errors.snapshotUnavailable(stored.id);
      throw new Error(`${what} holds ${chunks} of its ${stored.chunkCount} chunks`);
    }
    const checksum = hash.digest(stored.groups, stored.scalars);
    if (checksum !== stored.checksum) {
      state.arena.release();
      throw new Error(`${what} of session ${session.id} fails its checksum`);
    }
    if (axFromParams) await copyInSlices(state.arena.ax, state.arena.params);
    return state;
  }

  /**
   * Replays the logged steps in (state.version, target]; false when the log has a gap (pruned). The log is
   * read in pages of about REPLAY_PAGE_BYTES of float32 gradients: 16 steps of a 1e6-parameter model, all of
   * a small model's steps since its last snapshot in one read.
   */
  async function replay(q: Queryable, state: SessionState, target: number, name?: string): Promise<boolean> {
    const page = Math.max(1, Math.min(MAX_REPLAY_PAGE_STEPS, Math.floor(REPLAY_PAGE_BYTES / (4 * Math.max(1, state.layout.numel)))));
    const from = state.version;
    try {
      while (state.version < target) {
        // Each step is applied as it arrives, while PostgreSQL sends the next.
        let gap = false;
        const read = await repo.readSteps(q, cache.idOf(state), state.version, target, page, (entry) => {
          if (gap || entry.version !== state.version + 1) {
            gap = true;
            return;
          }
          unpackGradients(state, entry.present, entry.grads, entry.gradDtype);
          if (entry.hyper) state.groups = applyHyperDelta(state.groups, entry.hyper);
          state.applyStep(entry.present, kernel, kernelOptions);
        });
        if (read === 0 || gap) return false;
      }
      return true;
    } finally {
      if (name !== undefined && state.version > from) ctx.hooks?.replayed?.(name, state.version - from);
    }
  }

  /**
   * The session's state at `version`, not cached: from its newest replay point at or below it when that is
   * newer than the newest snapshot there (replay-points.ts), else from that snapshot, with the log after it
   * replayed. A replay point that cannot be read whole (deleted meanwhile outside a consistent read, emptied
   * by a crash of PostgreSQL, failing its checksum) is passed over for the snapshot; so is one whose log
   * after it has a gap.
   */
  async function buildState(q: Queryable, session: SessionRecord, version: number): Promise<{ state: SessionState; snapshotVersion: number }> {
    // A change of hyperparameters whose snapshot the next one replaced: that one's state, its own groups.
    const replaced = version < session.version ? await repo.findReplacedVersion(q, session.id, version) : null;
    if (replaced) {
      const state = await loadSnapshot(q, replaced.snapshot, session);
      state.version = version;
      state.groups = replaced.groups;
      return { state, snapshotVersion: version };
    }
    const snapshot = await repo.findSnapshotAtOrBelow(q, session.id, version);
    if (!snapshot) throw errors.versionNotAvailable(version, await repo.snapshotVersion(q, session.id, 'min'), session.version);
    const point = await findReplayPointAtOrBelow(q, session.id, version);
    if (point && point.version > snapshot.version) {
      const what = `replay point ${point.id} (version ${point.version})`;
      let state: SessionState | null = null;
      try {
        state = await loadStored(q, point, session, (onChunk) => readReplayPointChunks(q, point.id, onChunk), what);
        if (await replay(q, state, version, session.name)) return { state, snapshotVersion: snapshot.version };
        ctx.log.warn({ session: session.name, version, point: point.version }, 'the log after a replay point has a gap; reading from the snapshot');
      } catch (err) {
        // A database error leaves the transaction unusable: no fallback in it.
        if (isDbError(err)) {
          state?.arena.release();
          throw err;
        }
        ctx.log.warn({ err, session: session.name, version }, `${what} could not be read; reading from the snapshot`);
      }
      state?.arena.release();
    }
    const state = await loadSnapshot(q, snapshot, session);
    if (!(await replay(q, state, version, session.name))) {
      state.arena.release();
      throw errors.versionNotAvailable(version, await repo.snapshotVersion(q, session.id, 'min'), session.version);
    }
    return { state, snapshotVersion: snapshot.version };
  }

  /**
   * This process's copy brought to the session's current version: caught up from the log, or rebuilt
   * (buildState) when there is none, or when it is a replay interval or more behind and a snapshot or
   * replay point newer than it saves replaying two states' worth of log or more.
   */
  async function currentState(q: Queryable, session: SessionRecord): Promise<CacheEntry> {
    cache.hint(session.name, session.id);
    const cached = cache.get(session.id);
    if (cached && cached.state.version === session.version) {
      if (cached.state.stampedAs(session.stamp)) return cache.touch(cached);
      // Another stamp at the same version: a settings change since (the row's stamp moved, the version did
      // not), or another history that reached the same version number.
      if (await repo.ofHistory(q, session.id, cached.state.version, cached.state.stamps())) {
        cached.state.rowStamp = session.stamp;
        return cache.touch(cached);
      }
    }
    if (cached && cached.state.version < session.version && !(await newerBaseWorthIt(q, session, cached.state.version))) {
      try {
        if (await catchUp(q, cached.state, session)) return cache.touch(cached);
      } catch (err) {
        cache.forget(session.id);
        throw err;
      }
    }
    if (cached && cached.state.version >= session.version) warnOtherHistory(session, cached.state);
    cache.forget(session.id);
    const { state, snapshotVersion } = await buildState(q, session, session.version);
    state.setStamp(session.stamp);
    return cache.remember(state, snapshotVersion);
  }

  /**
   * currentState in a transaction that holds the session's row lock under READ COMMITTED (a load, a PATCH of
   * param_groups, a round's step), not in one consistent read (consistentRead): the state is built in
   * several statements, and another process's background snapshot prunes what it supersedes without the row
   * lock, so the snapshot or the log one statement found can be gone at the next (found by a review: with
   * three replicas about one load in a few hundred answered 404 VERSION_NOT_AVAILABLE for the current
   * version, or 503 SNAPSHOT_UNAVAILABLE). Each statement sees what has committed: built again, it starts
   * from the snapshot that pruned them.
   */
  async function currentStateLocked(q: Queryable, session: SessionRecord): Promise<CacheEntry> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await currentState(q, session);
      } catch (err) {
        const code = err instanceof ApiError ? err.code : null;
        if (attempt >= LOCKED_BUILD_ATTEMPTS || (code !== 'VERSION_NOT_AVAILABLE' && code !== 'SNAPSHOT_UNAVAILABLE')) throw err;
        ctx.log.info({ session: session.name, version: session.version, code }, 'the stored state changed while it was read (another process wrote a snapshot): reading it again');
      }
    }
  }

  /**
   * Brings this process's copy up to `session` (its row as read in `q`) from the log, when the copy is of the
   * database's history (repo.ofHistory): false when it is not, or the log has a gap; the caller rebuilds.
   */
  async function catchUp(q: Queryable, state: SessionState, session: SessionRecord): Promise<boolean> {
    if (!(await repo.ofHistory(q, session.id, state.version, state.stamps()))) {
      warnOtherHistory(session, state);
      return false;
    }
    state.setStamp(null); // moving: a copy part of the way there is stamped by nothing
    if (!(await replay(q, state, session.version, session.name))) return false;
    state.setStamp(session.stamp);
    return true;
  }

  /**
   * A copy whose version's commit the database does not hold as this process knew it. Said at warn where it
   * is sure to be another history (the copy is ahead of the database: a restore or a failover took the
   * session back), else at debug: a settings change since also moves the session's stamp, and a log row
   * pruned since leaves nothing to tell by (the copy is rebuilt either way); a replica behind a session
   * that keeps little log does so many times a second, as normal catch-up (at info it read like an
   * incident: an operator's review).
   */
  function warnOtherHistory(session: SessionRecord, state: SessionState): void {
    if (state.stamp === null) return;
    const fields = { session: session.name, version: state.version, databaseVersion: session.version };
    if (state.version > session.version) {
      ctx.log.warn(fields, 'this process\'s copy of the session is ahead of the database (restored from a backup, or failed over?): rebuilt from the database');
    } else {
      ctx.log.debug(fields, 'this process\'s copy of the session is not at a commit the database holds (a restore or failover, a settings change, or its log pruned): rebuilt from the database');
    }
  }

  /** True when a copy at `copyVersion` is a replay interval or more behind and a stored state 4+ steps newer than it exists. */
  async function newerBaseWorthIt(q: Queryable, session: SessionRecord, copyVersion: number): Promise<boolean> {
    const interval = replayPointInterval(session, ctx.replayBoundBytes);
    if (interval === null || session.version - copyVersion < interval) return false;
    const [snapshot, point] = await Promise.all([repo.findSnapshotAtOrBelow(q, session.id, session.version), findReplayPointAtOrBelow(q, session.id, session.version)]);
    return Math.max(snapshot?.version ?? 0, point?.version ?? 0) >= copyVersion + 4;
  }

  return { loadSnapshot, replay, buildState, currentState, currentStateLocked, catchUp };
}
