// Reading a session's state as a consistent view: the current version from this process's copy (no
// database read beyond the session row when the copy is current), an older version or a snapshot rebuilt.
import type { ParamSpec } from '../db/schema.ts';
import { ApiError, errors } from '../errors.ts';
import { consistentRead, mustFind, type SessionContext } from './context.ts';
import type { History } from './history.ts';
import type { StateView } from './model.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';
import { KeyedMutex } from './mutex.ts';
import { copyOf } from './slices.ts';
import type { SessionState } from './state.ts';

/** A view of the state without copying its tensors: valid until the state next changes. */
function liveView(name: string, state: SessionState): StateView {
  return {
    session: name,
    version: state.version,
    step: state.step,
    params: state.layout.params as ParamSpec[],
    layout: state.layout,
    groups: state.groups,
    scalars: state.scalarRows(),
    paramData: state.arena.params,
    axData: state.arena.ax,
  };
}

/** A view that owns copies of the tensors (made a slice at a time: the caller holds the session's lock, or owns the state). */
async function copyView(name: string, params: ParamSpec[], state: SessionState): Promise<StateView> {
  const view = liveView(name, state);
  return { ...view, params, paramData: await copyOf(state.arena.params), axData: await copyOf(state.arena.ax) };
}

/**
 * The last copy of each state at its version, while some reader still holds it: readers of one version share
 * one copy. Thirty slow clients downloading a 30-million-parameter session made thirty copies (0.9 GB to
 * 4.3 GB, found by a review); now they hold one, freed once the last of them is done (a weak reference).
 */
const sharedCopies = new WeakMap<SessionState, { version: number; stamp: string; view: WeakRef<StateView> }>();

async function sharedCopyView(name: string, current: SessionRecord, state: SessionState): Promise<StateView> {
  const last = sharedCopies.get(state);
  const kept = last && last.version === state.version && last.stamp === current.stamp ? last.view.deref() : undefined;
  if (kept) return kept;
  const view = await copyView(name, current.params, state);
  sharedCopies.set(state, { version: state.version, stamp: current.stamp, view: new WeakRef(view) });
  return view;
}

export type Reads = ReturnType<typeof createReads>;

export function createReads(ctx: SessionContext, history: History) {
  const { db, cache, mutex } = ctx;
  const rebuilds = new KeyedMutex();

  /** The session's row, and this process's copy when the row says it is current (one read, no transaction). */
  async function currentCopy(name: string): Promise<{ current: SessionRecord; state: SessionState | null }> {
    const current = await mustFind(db, name);
    const cached = cache.get(current.id);
    const known = cached && cached.state.version === current.version && cached.state.stampedAs(current.stamp);
    return { current, state: known ? cache.touch(cached).state : null };
  }

  /**
   * An older version rebuilt from the database alone, or null when `version` is the current one. A state of
   * its own, not this process's copy: no need of the session's lock, which the session's steps wait for (a
   * security review: thirty ?version= reads of a big session, 0.33 s each in turn under that lock, held a
   * step for 10 s). Such rebuilds of one session still go one at a time (their own lock): each holds a
   * whole state.
   */
  async function olderView(name: string, version: number): Promise<StateView | null> {
    return rebuilds.run(name, () => consistentRead(db, async (q) => {
      const session = await mustFind(q, name);
      if (version > session.version || version < 1) throw errors.versionNotAvailable(version, await repo.snapshotVersion(q, session.id, 'min'), session.version);
      if (version === session.version) return null;
      const { state } = await history.buildState(q, session, version);
      try {
        return await copyView(name, session.params, state);
      } finally {
        state.arena.release();
      }
    }));
  }

  /** A consistent copy of the state at `version` (default: current). */
  async function view(name: string, version?: number | null): Promise<StateView> {
    for (;;) {
      if (version != null) {
        const older = await olderView(name, version);
        if (older) return older;
      }
      const got = await mutex.run(name, async () => {
        // The common case, a copy that is current, needs one read and no transaction. A version asked for
        // that is no longer the current one (a step came between) is an older one: rebuilt, above.
        const { current, state } = await currentCopy(name);
        if (version != null && version !== current.version) return null;
        if (state) return sharedCopyView(name, current, state);
        return consistentRead(db, async (q) => {
          const session = await mustFind(q, name);
          if (version != null && version !== session.version) return null;
          return copyView(name, session.params, (await history.currentState(q, session)).state);
        });
      });
      if (got) return got;
    }
  }

  /**
   * Calls `fn` with the state at version `at` (null: the current one) under the session's lock held by the caller: this process's copy
   * itself when it is there (no read, no copy), else the copy caught up from the log, else a rebuild.
   */
  async function withStateAt(name: string, at: number | null, fn: (view: StateView) => void, live?: SessionState): Promise<void> {
    // The copy a batch just stepped (the caller vouches for it: current when the batch committed).
    if (live && at !== null && live.version === at && cache.byName(name)?.state === live) {
      fn(liveView(name, live));
      return;
    }
    // This process's copy only where the session row (version and stamp) says it is current.
    const { current, state: copy } = await currentCopy(name);
    if (copy && (at === null || at === current.version)) {
      fn(liveView(name, copy));
      return;
    }
    await consistentRead(db, async (q) => {
      const session = await mustFind(q, name);
      const version = at ?? session.version;
      if (version > session.version || version < 1) throw errors.versionNotAvailable(version, await repo.snapshotVersion(q, session.id, 'min'), session.version);
      if (version === session.version) {
        fn(liveView(name, (await history.currentState(q, session)).state));
        return;
      }
      const { state } = await history.buildState(q, session, version);
      try {
        fn(liveView(name, state));
      } finally {
        state.arena.release();
      }
    });
  }

  /**
   * withStateAt the version of a step's answer. The step is committed: when its version can no longer be
   * read (a retry, with the same Idempotency-Key, of a step older than what is kept; or, on a process whose
   * copy was behind, another process's load or restore that pruned the log in the moment between this
   * step's commit and its answer), the answer gets the current state, whose version the parameters say
   * (params_version), rather than a 404 that would read as "not applied".
   */
  async function withAnswerState(name: string, answer: { version: number }, fn: (view: StateView) => void, live?: SessionState): Promise<void> {
    try {
      await withStateAt(name, answer.version, fn, live);
    } catch (err) {
      if (!(err instanceof ApiError && err.code === 'VERSION_NOT_AVAILABLE')) throw err;
      await withStateAt(name, null, fn);
    }
  }

  /** A snapshot's state as a view (read and checked, not cached). */
  async function snapshotView(name: string, id: number): Promise<StateView> {
    const { session, state } = await consistentRead(db, async (q) => {
      const session = await mustFind(q, name);
      const snapshot = await repo.findSnapshot(q, session.id, id);
      if (!snapshot) throw errors.snapshotNotFound(String(id));
      return { session, state: await history.loadSnapshot(q, snapshot, session) };
    });
    try {
      return await copyView(name, session.params, state);
    } finally {
      state.arena.release();
    }
  }

  return { view, withStateAt, withAnswerState, snapshotView };
}
