// Changes that are not steps: create, delete, load a state_dict or checkpoint, restore a snapshot, fork.
// Each is one transaction under the session's row lock that writes its new version as a snapshot.
import type { Queryable } from '../db/database.ts';
import { ApiError, errors } from '../errors.ts';
import type { History } from './history.ts';
import { checkIfMatch, mustFind, type SessionContext } from './context.ts';
import { assertNoOpenRound, findKeyAnswer } from './rounds-repository.ts';
import { checkModel, planLoad } from './load-plan.ts';
import type { CreateInput, LoadedParams, LoadedStateDict } from './model.ts';
import type { Reads } from './reads.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';
import type { SnapshotWriter } from './snapshot-writer.ts';
import { copyInSlices } from './slices.ts';
import type { SessionState } from './state.ts';
import { applyHyperDelta, groupHyperparameters, parseStepHyper } from './step-input.ts';
import { checkGroupsOnStates } from './spec.ts';

/**
 * A change sent with an Idempotency-Key (PUT params/state_dict/checkpoint, PATCH param_groups, a restore):
 * its answer is kept with the commit, so that a retry after a lost answer (same key, same request) gets
 * that answer instead of applying the change again over whatever was acknowledged meanwhile (a second
 * load or restore would undo other workers' steps). `answer` is the first answer's body.
 */
export interface ChangeKey<T> {
  key: string;
  requestHash: string;
  answer(result: T): Record<string, unknown>;
}

/** The first answer to a change's Idempotency-Key (nothing was done again), and the session now. */
export interface Replayed {
  replayed: Record<string, unknown>;
  session: SessionRecord;
}

/** A fork's settings: each one not given is the source session's. */
export interface ForkTarget {
  name: string;
  snapshotId?: number | null;
  snapshotEvery?: number;
  keepSnapshots?: number;
  maxStaleness?: number | null;
  keepLogBytes?: number | null;
  expireAfterIdleS?: number | null;
  /** If-Match: the source's version (the state forked when no snapshot is named; else the session's now). */
  ifMatch?: number | null;
}

export function createChanges(ctx: SessionContext, history: History, writer: SnapshotWriter, reads: Reads) {
  const { db, cache, mutex } = ctx;
  /** Counts a snapshot a change wrote, once its transaction has committed. */
  const written = <T>(name: string, reason: string, result: T): T => {
    ctx.hooks?.snapshotted?.(name, reason);
    return result;
  };

  /**
   * Runs `fn` in a transaction on the locked session; when it fails after it began changing this process's
   * copy (it calls `touch`), the copy is dropped: it may be ahead of the database. With a key, a retry of a
   * change already made gets its first answer (looked up under the lock, before If-Match: the version has
   * moved since), a key of another request IDEMPOTENCY_KEY_REUSED, and a new one's answer is saved with it.
   */
  async function changeLocked<T>(
    name: string, ifMatch: number | null | undefined, fn: (tx: Queryable, session: SessionRecord, touch: () => void) => Promise<T>, key?: ChangeKey<T>,
  ): Promise<T | Replayed> {
    return mutex.run(name, async () => {
      let touched: number | null = null;
      try {
        return await db.transaction(async (tx) => {
          const session = await mustFind(tx, name, true);
          if (key) {
            const known = await findKeyAnswer(tx, session.id, key.key, ctx.idempotencyWindowSeconds);
            if (known) {
              if (known.requestHash !== key.requestHash) throw errors.idempotencyKeyReused();
              return { replayed: known.response, session };
            }
          }
          checkIfMatch(ifMatch, session.version);
          const result = await fn(tx, session, () => (touched = session.id));
          // An expired key's row is replaced: the request is new again.
          if (key) await repo.saveIdempotentAnswer(tx, session.id, key.key, key.requestHash, key.answer(result));
          touched = null;
          return result;
        });
      } finally {
        if (touched !== null) cache.forget(touched);
      }
    });
  }

  async function create(input: CreateInput): Promise<SessionRecord> {
    return mutex.run(input.name, async () => {
      const numel = input.data.reduce((a, d) => a + d.length, 0);
      return db.transaction(async (tx) => {
        const row = await repo.insertSession(tx, {
          name: input.name, params: input.params, groups: input.groups, numel, step: 0,
          snapshotEvery: input.snapshotEvery, keepSnapshots: input.keepSnapshots, maxStaleness: input.maxStaleness,
          keepLogBytes: input.keepLogBytes, expireAfterIdleS: input.expireAfterIdleS, aggregation: input.aggregation,
        });
        if (!row) throw errors.sessionExists(input.name);
        const state = cache.create(row, row.version, 0, input.groups, input.params.map(() => null));
        state.setStamp(row.stamp);
        for (const [i, d] of input.data.entries()) await copyInSlices(state.param(i), d);
        await writer.writeState(tx, row.id, state, 'create');
        cache.forget(row.id);
        cache.remember(state, row.version);
        return row;
      }).then((row) => written(input.name, 'create', row));
    });
  }

  async function remove(name: string, ifMatch?: number | null): Promise<void> {
    await changeLocked(name, ifMatch, async (tx, session) => {
      await repo.deleteSession(tx, name);
      // Version 0: the session is gone (waiters and event streams of this name end).
      await repo.notifyVersion(tx, name, 0, 0);
      cache.forget(session.id);
    });
  }

  /**
   * Replaces the optimizer state (and the parameters, when given) as a new version, with the semantics of
   * Optimizer.load_state_dict: hyperparameters come from the loaded groups. Written as a snapshot.
   * Parameters alone (no stateDict) leave the optimizer state, hyperparameters and step as they are, as
   * editing a model's weights leaves torch.optim.ASGD's state. `paramsField` names them in messages.
   * Parameters alone that equal the session's bit for bit change nothing: the session as it is, no new
   * version (so that workers of a round making the same edit, a clamp, do not void each other's
   * contributions with versions that change nothing).
   */
  async function load(
    name: string,
    input: { stateDict?: LoadedStateDict; params?: LoadedParams; step?: number; paramsField?: string },
    opts: { ifMatch?: number | null; reason: string; key?: ChangeKey<SessionRecord> },
  ): Promise<SessionRecord | Replayed> {
    let changed = true;
    const session = await changeLocked(name, opts.ifMatch, async (tx, session, touch) => {
      const entry = await history.currentStateLocked(tx, session);
      const { state } = entry;
      const plan = input.stateDict ? planLoad(session, input.stateDict) : null;
      if (input.params) checkModel(session, state.layout, input.params, input.paramsField);
      if (!plan && input.step === undefined && input.params && sameParams(state, input.params)) {
        changed = false;
        return session;
      }
      touch();
      if (input.params) for (const [pname, t] of input.params) state.param(state.layout.index.get(pname)!).set(t.data);
      if (plan) {
        state.groups = plan.groups;
        state.scalars = plan.scalars;
        for (let i = 0; i < plan.ax.length; i++) {
          const ax = plan.ax[i];
          if (ax) state.ax(i).set(ax);
          else state.ax(i).fill(0);
        }
      }
      // The session's step counts optimizer.step() calls. A checkpoint says it; a loaded state_dict holds it
      // as its parameters' step (the most any took; 0 for an optimizer that has not stepped), as a checkpoint
      // downloaded afterwards says it.
      if (input.step !== undefined) state.step = input.step;
      else if (plan) state.step = Math.round(plan.scalars.reduce((most, s) => Math.max(most, s?.step ?? 0), 0));
      state.version = session.version + 1;
      // A state_dict or checkpoint replaces the state: gradients computed before it are of another history.
      // Parameters alone (PUT params: a worker's edit, a clamp) keep the history: other workers' steps go on.
      await commitState(tx, session, state, opts.reason, plan !== null);
      entry.lastSnapshotVersion = state.version;
      return mustFind(tx, name);
    }, opts.key);
    return changed && !isReplayed(session) ? written(name, opts.reason, session) : session;
  }

  /**
   * Sets hyperparameters of the groups without a step (what a scheduler did after the last step, before a
   * checkpoint or a snapshot): a new version, written as a snapshot (reason 'hyperparameters'), like a load
   * of the same state with other group values. `raw` is a step's param_groups (one object per group, only
   * the keys that change), checked as a step's are. Nothing to change: the session as it is, no new version.
   */
  async function setHyperparameters(name: string, raw: unknown, ifMatch: number | null, key?: ChangeKey<SessionRecord>): Promise<SessionRecord | Replayed> {
    let changed = false;
    const session = await changeLocked(name, ifMatch, async (tx, session, touch) => {
      const delta = parseStepHyper(raw, session.groups);
      const next = delta ? applyHyperDelta(session.groups, delta) : session.groups;
      if (JSON.stringify(next) === JSON.stringify(session.groups)) return session;
      // A new version would void the open round's contributions (made at this one): refused as PATCH of
      // aggregation is; the change goes with a step of the next round instead.
      if (session.aggregation) await assertNoOpenRound(tx, session, 'param_groups', ', or send them with a contribution (its param_groups)');
      const entry = await history.currentStateLocked(tx, session);
      const { state } = entry;
      if (delta) checkGroupsOnStates(next, state, 'param_groups', (g) => delta[g]);
      touch();
      // Changes in a row with no step between: the one before is superseded (no version after it was built
      // on it), so its snapshot goes; a worker changing lr every epoch leaves one such snapshot, not one a call.
      await repo.deleteSupersededSnapshot(tx, session.id, session.version, 'hyperparameters');
      state.groups = next; // the state's groups are the session's
      state.version = session.version + 1;
      // Not a scheduled snapshot (keep_snapshots does not count it, the next change may replace it), unless
      // this version opens a snapshot slot: then it is the slot's (steps schedule one only when a step opens
      // the slot, and this one left it to the next slot: a review).
      const scheduled = await writer.claimsOpenedSlot(tx, session, session.version, state.version);
      await commitState(tx, session, state, 'hyperparameters', false, scheduled ? 'auto' : 'hyperparameters');
      if (scheduled) entry.lastSnapshotVersion = state.version;
      changed = true;
      return mustFind(tx, name);
    }, key);
    return changed && !isReplayed(session) ? written(name, 'hyperparameters', session) : session;
  }

  /**
   * A change that is not a step (a load, a restore, hyperparameters) committed as the session's next
   * version: written as a snapshot, its group values recorded when they changed, the session advanced and
   * announced, snapshots beyond keep_snapshots pruned. `state` already holds the new version.
   */
  async function commitState(tx: Queryable, session: SessionRecord, state: SessionState, reason: string, replaced = false, snapshotReason = reason): Promise<void> {
    await writer.writeState(tx, session.id, state, snapshotReason);
    await recordGroupChange(tx, session, state, reason);
    state.setStamp(await repo.advanceSession(tx, session.id, state.version, state.step, state.groups, replaced));
    await repo.notifyVersion(tx, session.name, state.version, state.step);
    await repo.pruneHistory(tx, session.id);
  }

  /**
   * A change that is not a step and sets the groups' hyperparameters to other values: kept (group_changes)
   * so that the values every step ran with stay known (the dashboard's charts of lr, eta and mu).
   */
  async function recordGroupChange(tx: Queryable, before: SessionRecord, state: SessionState, reason: string): Promise<void> {
    const after = groupHyperparameters(state.groups);
    if (JSON.stringify(after) === JSON.stringify(groupHyperparameters(before.groups))) return;
    await repo.insertGroupChange(tx, before.id, state.version, state.step, reason, after);
  }

  /** Rolls the session back to a snapshot's state, as a new version. */
  async function restore(name: string, id: number, ifMatch?: number | null, key?: ChangeKey<SessionRecord>): Promise<SessionRecord | Replayed> {
    const restored = await changeLocked(name, ifMatch, async (tx, session, touch) => {
      const snapshot = await repo.findSnapshot(tx, session.id, id);
      if (!snapshot) throw errors.snapshotNotFound(String(id));
      touch();
      cache.forget(session.id);
      let state;
      try {
        state = await history.loadSnapshot(tx, snapshot, session);
      } catch (err) {
        // Retention on another process (a background snapshot's, which takes no session lock) deleted the
        // snapshot while its chunks were read: the restore lost that race, as one a moment later would have.
        if (err instanceof ApiError && err.code === 'SNAPSHOT_UNAVAILABLE' && !(await repo.findSnapshot(tx, session.id, id))) throw errors.snapshotNotFound(String(id));
        throw err;
      }
      state.version = session.version + 1;
      await commitState(tx, session, state, 'restore', true);
      cache.remember(state, state.version);
      return mustFind(tx, name);
    }, key);
    return isReplayed(restored) ? restored : written(name, 'restore', restored);
  }

  /** A new session starting from a snapshot of another (or its current state). */
  async function fork(sourceName: string, target: ForkTarget): Promise<SessionRecord> {
    const source = target.snapshotId != null ? await reads.snapshotView(sourceName, target.snapshotId) : await reads.view(sourceName);
    const sourceSession = await mustFind(db, sourceName);
    checkIfMatch(target.ifMatch, target.snapshotId != null ? sourceSession.version : source.version);
    return mutex.run(target.name, async () =>
      db.transaction(async (tx) => {
        const row = await repo.insertSession(tx, {
          name: target.name, params: source.params, groups: source.groups, numel: source.layout.numel, step: source.step,
          snapshotEvery: target.snapshotEvery ?? sourceSession.snapshotEvery,
          keepSnapshots: target.keepSnapshots ?? sourceSession.keepSnapshots,
          maxStaleness: target.maxStaleness !== undefined ? target.maxStaleness : sourceSession.maxStaleness,
          keepLogBytes: target.keepLogBytes !== undefined ? target.keepLogBytes : sourceSession.keepLogBytes,
          expireAfterIdleS: target.expireAfterIdleS !== undefined ? target.expireAfterIdleS : sourceSession.expireAfterIdleS,
          aggregation: sourceSession.aggregation,
        });
        if (!row) throw errors.sessionExists(target.name);
        const state = cache.create(row, row.version, source.step, source.groups, source.scalars);
        state.setStamp(row.stamp);
        await copyInSlices(state.arena.params, source.paramData);
        await copyInSlices(state.arena.ax, source.axData);
        await writer.writeState(tx, row.id, state, 'fork');
        cache.forget(row.id);
        cache.remember(state, row.version);
        return row;
      }).then((row) => written(target.name, 'fork', row)),
    );
  }

  return { create, remove, load, setHyperparameters, restore, fork };
}

export function isReplayed(result: object): result is Replayed {
  return 'replayed' in result;
}

/** True when every parameter given equals the state's, bit for bit (-0 is not 0; a NaN only its own payload). */
function sameParams(state: SessionState, params: LoadedParams): boolean {
  for (const [pname, t] of params) {
    const mine = state.param(state.layout.index.get(pname)!);
    if (!Buffer.from(mine.buffer, mine.byteOffset, mine.byteLength).equals(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))) return false;
  }
  return true;
}
