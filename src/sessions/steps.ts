// The step protocols.
//
// Durability model: a step writes the gradient (and the hyperparameters it sets) to the step log, its row
// of step_history, bumps the version and NOTIFYs asgd_versions under the session's row lock, as one
// statement (repo.appendStep) or, with an Idempotency-Key, one transaction that also records the answer;
// the answer comes after the commit. Full snapshots (params + optimizer state) are
// written every `snapshotEvery` steps off the request path, and synchronously for changes that are not
// steps (create, load_state_dict, restore, fork). The state at version v is the newest snapshot at or
// below v with the logged steps after it replayed; the kernel is deterministic, so the replay is
// bit-exact. A process keeps decoded state in memory: a plain step runs the kernel after its commit, on
// a copy that was at the version before it; a copy left behind by other processes catches up from the
// log when next read; a keyed step that fails after the kernel ran drops the copy. No copy is ever ahead
// of the database, and none is served or stepped at a version other than the one it claims.
import { errors } from '../errors.ts';
import type { CacheEntry } from './cache.ts';
import { consistentRead, mustFind, type SessionContext } from './context.ts';
import { decodeGradients, packGradients, type GradientInput } from './gradients.ts';
import type { History } from './history.ts';
import type { StepAnswer, StepOptions } from './model.ts';
import type { Reads } from './reads.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';
import type { SnapshotWriter } from './snapshot-writer.ts';
import { applyHyperDelta, groupHyperparameters, parseStepHyper } from './step-input.ts';

type StepOutcome = { answer: StepAnswer; snapshot: { session: SessionRecord; entry: CacheEntry } | null };

/** The errors of a step refused by the checks on the locked version, in the order they are checked; its staleness. */
function checkStep(version: number, maxStaleness: number | null, opts: StepOptions): number {
  if (opts.ifMatch !== null && opts.ifMatch !== undefined && opts.ifMatch !== version) throw errors.versionMismatch(`"${opts.ifMatch}"`, version);
  const baseVersion = opts.baseVersion ?? null;
  if (baseVersion !== null && baseVersion > version) {
    throw errors.invalidBody(`base_version: ${baseVersion} is newer than the session's version ${version}`);
  }
  const staleness = baseVersion === null ? 0 : version - baseVersion;
  if (maxStaleness !== null && staleness > maxStaleness) throw errors.staleGradient(staleness, maxStaleness, version);
  return staleness;
}

export function createSteps(ctx: SessionContext, history: History, writer: SnapshotWriter, reads: Reads) {
  const { db, cache, mutex, kernel, kernelOptions, log, hooks } = ctx;

  async function step(name: string, input: GradientInput, opts: StepOptions = {}): Promise<StepAnswer> {
    const queued = process.hrtime.bigint();
    return mutex.run(name, async () => {
      const started = process.hrtime.bigint();
      // An Idempotency-Key needs its lookup and its answer under the row lock: a transaction. Every other
      // step is one statement, with the row lock held for that statement and its commit only.
      const { answer, snapshot } = opts.idempotencyKey ? await lockedStep(name, input, opts) : await appendedStep(name, input, opts);
      const done = process.hrtime.bigint();
      hooks?.stepped?.(name, Number(done - started) / 1e9, Number(started - queued) / 1e9);
      if (opts.encodeAt) await reads.withStateAt(name, answer.version, (view) => opts.encodeAt!(view, answer));
      if (snapshot) writer.inBackground(snapshot.session, snapshot.entry, 'auto');
      return answer;
    });
  }

  /**
   * A step as one statement (repo.appendStep). The gradient is validated against this process's copy of the
   * session first (its layout); the kernel runs after the commit, when the copy was at the version before
   * this step. A copy is never ahead of the database, so a failed statement leaves nothing to undo.
   */
  async function appendedStep(name: string, input: GradientInput, opts: StepOptions, retried = false): Promise<StepOutcome> {
    let entry = cache.byName(name);
    if (!entry) entry = await consistentRead(db, async (q) => history.currentState(q, await mustFind(q, name)));
    const { state } = entry;
    const id = cache.idOf(state);
    const decoded = decodeGradients(input, state); // validates everything before anything is written
    const { present } = decoded;
    const hyper = parseStepHyper(opts.paramGroups, state.groups);
    opts.beforeWrite?.(state.layout);
    const grads = packGradients(state, decoded);
    const appended = await repo.appendStep(db, db, id, { present, grads, gradDtype: decoded.dtype, hyper, metrics: opts.metrics ?? null }, { ifMatch: opts.ifMatch ?? null, baseVersion: opts.baseVersion ?? null });
    if (!appended) {
      // Deleted (and perhaps created again under the same name) by another process since this copy was made.
      cache.forgetName(name, id);
      if (retried) throw errors.sessionNotFound(name);
      return appendedStep(name, input, opts, true);
    }
    const staleness = checkStep(appended.previousVersion, appended.maxStaleness, opts);
    const session = appended.session!;
    let current = false;
    if (cache.get(id) === entry) {
      try {
        if (state.version === appended.previousVersion) {
          // In step with the database: stays current. The step's hyperparameters first, as a scheduler sets them.
          if (hyper) state.groups = applyHyperDelta(state.groups, hyper);
          state.applyStep(present, kernel, kernelOptions);
        } else if (writer.due(session, entry, session.version)) {
          // Behind (other steps committed meanwhile) and a snapshot is due: catch up, this step included.
          if (!(await history.replay(db, state, session.version))) cache.forget(id);
        }
        // Otherwise the copy stays behind and catches up from the log when it is next read (currentState):
        // under several writers that is one batched read instead of one per step.
        current = cache.get(id) === entry && state.version === session.version;
      } catch (err) {
        // The step is committed; only this process's copy is lost (the next request rebuilds it).
        cache.forget(id);
        log.warn({ err, session: name, version: session.version }, 'could not bring the cached state up to a committed step');
      }
    }
    const answer: StepAnswer = { session: name, step: session.step, version: session.version, staleness };
    return { answer, snapshot: current && writer.due(session, entry) ? { session, entry } : null };
  }

  /** A step with an Idempotency-Key: a transaction under the row lock (lookup, checks, log, answer). */
  async function lockedStep(name: string, input: GradientInput, opts: StepOptions): Promise<StepOutcome> {
    let touched: number | null = null;
    let snapshot: StepOutcome['snapshot'] = null;
    try {
      const answer = await db.transaction(async (tx) => {
        const session = await mustFind(tx, name, true);
        if (opts.idempotencyKey) {
          const previous = await repo.findIdempotentAnswer(tx, session.id, opts.idempotencyKey, ctx.idempotencyWindowSeconds);
          if (previous) {
            if (previous.requestHash !== opts.requestHash) throw errors.idempotencyKeyReused();
            return { ...(previous.response as unknown as StepAnswer), replayed: true };
          }
        }
        const staleness = checkStep(session.version, session.maxStaleness, opts);
        const baseVersion = opts.baseVersion ?? null;
        const entry = await history.currentState(tx, session);
        const { state } = entry;
        const decoded = decodeGradients(input, state); // validates everything before anything moves
        const { present } = decoded;
        const hyper = parseStepHyper(opts.paramGroups, state.groups);
        opts.beforeWrite?.(state.layout);
        const version = session.version + 1;
        await repo.insertStep(db, tx, session.id, { version, present, grads: packGradients(state, decoded), gradDtype: decoded.dtype, hyper }, baseVersion);
        touched = session.id;
        if (hyper) state.groups = applyHyperDelta(state.groups, hyper);
        state.applyStep(present, kernel, kernelOptions);
        await repo.advanceSession(tx, session.id, state.version, state.step, hyper ? state.groups : undefined);
        await repo.insertHistory(tx, {
          sessionId: session.id, version: state.version, step: state.step, staleness, metrics: opts.metrics ?? null,
          hyper: hyper ? groupHyperparameters(state.groups) : null,
        });
        await repo.notifyVersion(tx, name, state.version, state.step);
        const result: StepAnswer = { session: name, step: state.step, version: state.version, staleness };
        if (opts.idempotencyKey) await repo.saveIdempotentAnswer(tx, session.id, opts.idempotencyKey, opts.requestHash ?? '', { ...result });
        if (writer.due(session, entry)) snapshot = { session, entry };
        return result;
      });
      touched = null;
      return { answer, snapshot };
    } finally {
      // The transaction did not commit after the kernel ran: this process's copy is ahead of the database.
      if (touched !== null) cache.forget(touched);
    }
  }

  return { step };
}
