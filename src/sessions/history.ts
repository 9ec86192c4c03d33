// A session's state at a version, from its history: the newest snapshot at or below it, with the logged
// steps after it replayed (the kernel is deterministic, so the replay is bit-exact).
import type { Queryable } from '../db/database.ts';
import { errors } from '../errors.ts';
import type { CacheEntry } from './cache.ts';
import type { SessionContext } from './context.ts';
import { unpackGradients } from './gradients.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import type { SessionState } from './state.ts';
import { snapshotChecksum } from './state.ts';
import { applyHyperDelta } from './step-input.ts';
import type { ParamSpec } from '../db/schema.ts';

export type History = ReturnType<typeof createHistory>;

/** Bytes of logged float32 gradients one read of the log brings in while replaying, and its bound in steps. */
const REPLAY_PAGE_BYTES = 64 * 1024 * 1024;
const MAX_REPLAY_PAGE_STEPS = 1024;

export function createHistory(ctx: SessionContext) {
  const { cache, kernel, kernelOptions } = ctx;

  /** A snapshot's state, read chunk by chunk straight into a new arena and checked against its checksum. */
  async function loadSnapshot(q: Queryable, snapshot: SnapshotRecord, session: { id: number; name: string; params: ParamSpec[] }): Promise<SessionState> {
    const state = cache.create(session, snapshot.version, snapshot.step, snapshot.groups, snapshot.scalars);
    const n = state.layout.numel;
    const total = n * 8;
    if (snapshot.byteSize !== total) throw new Error(`snapshot ${snapshot.id} holds ${snapshot.byteSize} bytes, expected ${total}`);
    const paramBytes = new Uint8Array(state.arena.params.buffer, state.arena.params.byteOffset, n * 4);
    const axBytes = new Uint8Array(state.arena.ax.buffer, state.arena.ax.byteOffset, n * 4);
    const seen: Buffer[] = [];
    let at = 0;
    const chunks = await repo.readSnapshotChunks(q, snapshot.id, (seq, data) => {
      // Copy the chunk into params (first half) and ax (second half) as it arrives.
      let offset = 0;
      while (offset < data.byteLength) {
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
      seen.push(data);
      if (seen.length !== seq + 1) throw new Error(`snapshot ${snapshot.id}: chunk ${seq} out of order`);
    });
    if (chunks !== snapshot.chunkCount || at !== total) {
      state.arena.release();
      throw errors.snapshotUnavailable(snapshot.id);
    }
    const checksum = snapshotChecksum(seen, snapshot.groups, snapshot.scalars);
    if (checksum !== snapshot.checksum) {
      state.arena.release();
      throw new Error(`snapshot ${snapshot.id} of session ${session.id} fails its checksum`);
    }
    return state;
  }

  /**
   * Replays the logged steps in (state.version, target]; false when the log has a gap (pruned). The log is
   * read in pages of about REPLAY_PAGE_BYTES of float32 gradients: 16 steps of a 1e6-parameter model, all of
   * a small model's steps since its last snapshot in one read.
   */
  async function replay(q: Queryable, state: SessionState, target: number): Promise<boolean> {
    const page = Math.max(1, Math.min(MAX_REPLAY_PAGE_STEPS, Math.floor(REPLAY_PAGE_BYTES / (4 * Math.max(1, state.layout.numel)))));
    while (state.version < target) {
      const entries = await repo.readSteps(q, cache.idOf(state), state.version, target, page);
      if (entries.length === 0) return false;
      for (const entry of entries) {
        if (entry.version !== state.version + 1) return false;
        unpackGradients(state, entry.present, entry.grads, entry.gradDtype ?? 'float32');
        if (entry.hyper) state.groups = applyHyperDelta(state.groups, entry.hyper);
        state.applyStep(entry.present, kernel, kernelOptions);
      }
    }
    return true;
  }

  /** The session's state at `version`, built from the newest snapshot at or below it and the log (not cached). */
  async function buildState(q: Queryable, session: SessionRecord, version: number): Promise<{ state: SessionState; snapshotVersion: number }> {
    const snapshot = await repo.findSnapshotAtOrBelow(q, session.id, version);
    if (!snapshot) throw errors.versionNotAvailable(version, await repo.oldestSnapshotVersion(q, session.id), session.version);
    const state = await loadSnapshot(q, snapshot, session);
    if (!(await replay(q, state, version))) {
      state.arena.release();
      throw errors.versionNotAvailable(version, await repo.oldestSnapshotVersion(q, session.id), session.version);
    }
    return { state, snapshotVersion: snapshot.version };
  }

  /** This process's copy brought to the session's current version (caught up from the log, or rebuilt). */
  async function currentState(q: Queryable, session: SessionRecord): Promise<CacheEntry> {
    cache.hint(session.name, session.id);
    const cached = cache.get(session.id);
    if (cached && cached.state.version === session.version) return cache.touch(cached);
    if (cached && cached.state.version < session.version) {
      try {
        if (await replay(q, cached.state, session.version)) return cache.touch(cached);
      } catch (err) {
        cache.forget(session.id);
        throw err;
      }
    }
    cache.forget(session.id);
    const { state, snapshotVersion } = await buildState(q, session, session.version);
    return cache.remember(state, snapshotVersion);
  }

  return { loadSnapshot, replay, buildState, currentState };
}
