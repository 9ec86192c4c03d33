// The step protocol: group commit.
//
// Durability model: steps on one session that wait in this process (a batch about to start waits a moment
// for clients about to step again: linger.ts) are committed as one batch, one
// statement (repo.appendSteps): under the session's row lock it logs their gradients (and the
// hyperparameters they set) to the step log as versions v+1..v+n in arrival order, writes each one's row of
// step_history and, with an Idempotency-Key, its answer, bumps the version once and, while a process waits
// for the session's versions (notifier.ts), NOTIFYs asgd_versions per version; every request is answered after that commit, with its own version. Across processes the
// row lock orders the batches. Full snapshots (params + optimizer state) are written every `snapshotEvery`
// steps off the request path, and synchronously for changes that are not steps (create, load_state_dict,
// restore, fork). The state at version v is the newest snapshot at or below v with the logged steps after
// it replayed; the kernel is deterministic, so the replay is bit-exact. A process keeps decoded state in
// memory: the kernel runs after the commit, step by step in the batch's order, on a copy that was at the
// version before the batch; a copy left behind by other processes catches up from the log when next read.
// No copy is ever ahead of the database, and none is served or stepped at a version other than the one it
// claims.
import { errors } from '../errors.ts';
import { AggregatedSession } from './aggregation.ts';
import type { CacheEntry } from './cache.ts';
import { consistentRead, mustFind, type SessionContext } from './context.ts';
import { decodeGradients, packGradients, unpackGradients, type GradientInput } from './gradients.ts';
import type { History } from './history.ts';
import { Linger } from './linger.ts';
import { sameRequest, type StepAnswer, type StepOptions } from './model.ts';
import type { Reads } from './reads.ts';
import * as repo from './repository.ts';
import type { SnapshotWriter } from './snapshot-writer.ts';
import type { SessionState } from './state.ts';
import { applyHyperDelta, baseVersionTooNew, parseStepHyper } from './step-input.ts';

/**
 * A batch holds at most this many steps and about this many bytes of gradients (each step owns a copy
 * until it commits): the packed gradients are counted as they are decoded, and the batch closes once it
 * passes the bound (the steps left go back to the front of the queue).
 */
const MAX_BATCH_STEPS = 64;
const MAX_BATCH_BYTES = 64 * 1024 * 1024;
/** How often a batch is tried again after a key conflict with a request committed meanwhile. */
const MAX_KEY_RETRIES = 3;

/** A step request waiting in this process for its batch. */
interface Waiting {
  input: GradientInput;
  opts: StepOptions;
  queued: bigint;
  resolve: (answer: StepAnswer) => void;
  reject: (err: unknown) => void;
}

/** A request of the batch being committed, validated and packed. */
interface Prepared extends repo.BatchStep {
  request: Waiting;
}

/** The error of a step refused by the checks at the version it would have been applied to (repo.refusedAt). */
function refusal(opts: StepOptions, version: number, { maxStaleness, historyFrom }: repo.StepChecks): Error {
  if (opts.ifMatch !== null && opts.ifMatch !== undefined && opts.ifMatch !== version) return errors.versionMismatch(opts.ifMatch, version);
  const baseVersion = opts.baseVersion ?? null;
  if (baseVersion !== null && baseVersion > version) {
    return baseVersionTooNew(baseVersion, version, opts.baseVersionFrom);
  }
  if (baseVersion !== null && baseVersion < historyFrom) return errors.gradientOfReplacedState(baseVersion, historyFrom, version, maxStaleness);
  return errors.staleGradient(version - (baseVersion ?? version), maxStaleness ?? 0, version);
}

export function createSteps(ctx: SessionContext, history: History, writer: SnapshotWriter, reads: Reads) {
  const { db, cache, mutex, kernel, kernelOptions, log, hooks } = ctx;
  const queues = new Map<string, Waiting[]>();
  const linger = new Linger(ctx.stepLingerMs);

  /** Queues the step; a batch of the waiting steps of this session runs when the session's lock is free. */
  function step(name: string, input: GradientInput, opts: StepOptions = {}): Promise<StepAnswer> {
    const queued = process.hrtime.bigint();
    return new Promise<StepAnswer>((resolve, reject) => {
      const settled = () => linger.answered(name, opts.client);
      const request: Waiting = {
        input, opts, queued,
        resolve: (answer) => (settled(), resolve(answer)),
        reject: (err) => (settled(), reject(err)),
      };
      enqueue(name, [request], 'back');
      linger.arrived(name, opts.client, queued);
    });
  }

  /**
   * Adds requests to the session's queue: new ones at the back, those taken off for a batch they did not fit
   * in at the front. A queue that exists has its drain scheduled; a new one gets one.
   */
  function enqueue(name: string, requests: Waiting[], end: 'back' | 'front'): void {
    const queue = queues.get(name);
    if (queue) {
      if (end === 'back') queue.push(...requests);
      else queue.unshift(...requests);
      return;
    }
    queues.set(name, [...requests]);
    void mutex.run(name, () => drain(name));
  }

  /** Takes the next batch off the session's queue (in arrival order) and commits it; the rest waits for the lock again. */
  async function drain(name: string): Promise<void> {
    const queue = queues.get(name)!;
    // Clients answered a moment ago and about to step again join this batch rather than start the next one.
    await linger.wait(name, queue[0].queued, () => queue.length, MAX_BATCH_STEPS);
    const batch: Waiting[] = [];
    while (queue.length && batch.length < MAX_BATCH_STEPS) {
      const next = queue[0];
      // A retry of a step in this batch (its Idempotency-Key) waits for the next: it gets the first one's answer.
      if (next.opts.idempotencyKey && batch.some((b) => b.opts.idempotencyKey === next.opts.idempotencyKey)) break;
      batch.push(queue.shift()!);
      // Hyperparameters a step sets end its batch: the steps after it run with them (the statement merges one set).
      if (next.opts.paramGroups !== undefined && next.opts.paramGroups !== null) break;
    }
    if (queue.length) void mutex.run(name, () => drain(name));
    else queues.delete(name);
    await commitBatch(name, batch);
  }

  /** True when the session named `name` is no longer session `id` (gone, or created again): its copy is dropped. */
  async function replacedElsewhere(name: string, id: number): Promise<boolean> {
    const now = await repo.findSession(db, name);
    if (now?.id === id) return false;
    cache.forgetName(name, id);
    return true;
  }

  /**
   * Validates each request against this process's copy (its layout: a bad gradient is refused alone), packs
   * its gradient, commits the batch, runs the kernel and answers. A request is settled once.
   */
  async function commitBatch(name: string, batch: Waiting[], retried = false): Promise<void> {
    const taken = { batch };
    try {
      await prepareAndCommit(name, taken, retried);
    } catch (err) {
      for (const request of taken.batch) request.reject(err); // those answered already keep their answer
    }
  }

  async function prepareAndCommit(name: string, taken: { batch: Waiting[] }, retried: boolean): Promise<void> {
    let { batch } = taken;
    const started = process.hrtime.bigint();
    let entry = cache.byName(name);
    const copied = entry !== undefined; // the name's copy: a hint, of a session that may since be gone or created again elsewhere
    if (!entry) entry = await consistentRead(db, async (q) => history.currentState(q, await mustFind(q, name)));
    const { state } = entry;
    const id = cache.idOf(state);
    let steps: Prepared[] = [];
    let packed = 0;
    const inArenaView = (s: Prepared) => s.grads.buffer === state.arena.grads.buffer;
    let checkedCopy = false;
    for (const [k, request] of batch.entries()) {
      if (steps.length && packed >= MAX_BATCH_BYTES) {
        // Each step of a batch holds its packed gradient until the commit: the rest waits for the next batch.
        enqueue(name, batch.slice(k), 'front');
        batch = taken.batch = batch.slice(0, k);
        break;
      }
      // With every parameter present, a packed gradient is a view of the arena's gradient buffer, which the
      // next request decodes into: the step before keeps its own copy from here on.
      const previous = steps.at(-1);
      if (previous && inArenaView(previous)) previous.grads = Buffer.from(previous.grads);
      try {
        const { opts } = request;
        const decoded = decodeGradients(request.input, state); // validates everything before anything is written
        const hyper = parseStepHyper(opts.paramGroups, state.groups, 'param_groups', state);
        opts.beforeWrite?.(state.layout);
        const grads = packGradients(state, decoded);
        packed += grads.byteLength;
        steps.push({
          request, present: decoded.present, grads, gradDtype: decoded.dtype, hyper, metrics: opts.metrics ?? null,
          ifMatch: opts.ifMatch ?? null, baseVersion: opts.baseVersion ?? null, key: opts.idempotencyKey ?? null, requestHash: opts.requestHash ?? '',
        });
      } catch (err) {
        // Refused by a copy's layout: if the name is now another session's (deleted and created again by
        // another process), the batch goes again with that session's state; nothing is written yet.
        // Checked once, at the batch's first refusal (so no request was refused before it).
        if (copied && !retried && !checkedCopy) {
          checkedCopy = true;
          if (await replacedElsewhere(name, id)) return commitBatch(name, batch, true);
        }
        request.reject(err);
      }
    }
    // A lone step's gradient may still be the arena's (nothing touches it before the kernel runs: answers to
    // retried keys wait until the batch is done); in a batch of several each is unpacked into the arena before
    // its turn, so the last one, too, keeps a copy.
    const last = steps.at(-1);
    const inArena = steps.length === 1 && inArenaView(steps[0]) ? steps[0] : null;
    if (last && last !== inArena && inArenaView(last)) last.grads = Buffer.from(last.grads);
    const replayed: { request: Waiting; result: StepAnswer }[] = [];
    try {
      await commitSteps(name, entry, id, steps, inArena, replayed, started, retried);
    } finally {
      for (const { request, result } of replayed) await answer(name, request, result);
    }
  }

  async function commitSteps(
    name: string, entry: CacheEntry, id: number, steps: Prepared[], inArena: Prepared | null,
    replayed: { request: Waiting; result: StepAnswer }[], started: bigint, retried: boolean,
  ): Promise<void> {
    let conflicts = 0;
    while (steps.length) {
      let appended: repo.AppendedSteps | null;
      try {
        appended = await repo.appendSteps(db, id, name, steps, ctx.idempotencyWindowSeconds, entry.state.groups);
      } catch (err) {
        if (!repo.isKeyConflict(err) || ++conflicts > MAX_KEY_RETRIES) throw err;
        continue; // a key recorded meanwhile by another request: the next try sees its answer
      }
      if (!appended) {
        // Deleted (and perhaps created again under the same name) by another process since this copy was made.
        cache.forgetName(name, id);
        if (retried) throw errors.sessionNotFound(name);
        return commitBatch(name, steps.map((s) => s.request), true);
      }
      if (appended.groupsMoved) {
        // The last step's hyperparameters were checked against this copy's groups, which another process has
        // changed since (a PATCH, another worker's step): nothing was written. The batch goes again on a copy
        // read now, where they are checked against the session's groups (a value valid over the old ones, lr
        // 1e30 with lambd 0, may not be over the new ones).
        cache.forget(id);
        return commitBatch(name, steps.map((s) => s.request), retried);
      }
      if (appended.aggregated) {
        // Nothing written: in a session with aggregation a step request is a contribution (rounds.ts).
        for (const s of steps) s.request.reject(new AggregatedSession(name));
        return;
      }
      if (appended.known.length) {
        // Keys with an answer: a retry gets the first answer (a live key), a reused key its error; an expired
        // key is new again. Nothing was written; the others go again.
        const expired: string[] = [];
        const settled = new Set<number>();
        for (const k of appended.known) {
          const s = steps[k.index];
          if (!k.live) expired.push(s.key!);
          else if (!sameRequest(k.requestHash, s.requestHash, s.request.opts)) {
            s.request.reject(errors.idempotencyKeyReused());
            settled.add(k.index);
          } else {
            settled.add(k.index);
            replayed.push({ request: s.request, result: { ...(k.response as unknown as StepAnswer), replayed: true } });
          }
        }
        if (expired.length) await repo.clearExpiredKeys(db, id, expired, ctx.idempotencyWindowSeconds);
        steps = steps.filter((_, i) => !settled.has(i));
        continue;
      }
      if (!appended.session) {
        // A check failed at a step's position: refuse each step that fails at the position it would have
        // once those before it are refused, try the others again.
        const kept: Prepared[] = [];
        let before = appended.previousVersion;
        for (const s of steps) {
          if (repo.refusedAt(s, before, appended)) s.request.reject(refusal(s.request.opts, before, appended));
          else {
            kept.push(s);
            before += 1;
          }
        }
        if (kept.length === steps.length) throw new Error(`step batch of ${steps.length} refused at version ${appended.previousVersion} with no check failing`);
        steps = kept;
        continue;
      }
      await committed(name, entry, id, steps, appended, inArena, started);
      return;
    }
  }

  /** After the batch's commit: the kernel runs each step in order on a copy that was current, and each request is answered. */
  async function committed(name: string, entry: CacheEntry, id: number, steps: Prepared[], appended: repo.AppendedSteps, inArena: Prepared | null, started: bigint): Promise<void> {
    const session = appended.session!;
    const { state } = entry;
    const first = appended.previousVersion + 1;
    const answers: StepAnswer[] = steps.map((s, i) => ({
      session: name, step: session.step - steps.length + i + 1, version: first + i,
      staleness: s.baseVersion === null ? 0 : first + i - 1 - s.baseVersion,
    }));
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    hooks?.committed?.(name, steps.length);
    // (A copy at that version number with another stamp is not of the database's history: it is not stepped.)
    let current = cache.get(id) === entry && state.version === appended.previousVersion && state.stampedAs(appended.previousStamp);
    if (current) state.setStamp(null);
    for (const [i, s] of steps.entries()) {
      hooks?.stepped?.(name, seconds, Number(started - s.request.queued) / 1e9);
      if (current) {
        try {
          // In step with the database: stays current. The step's hyperparameters first, as a scheduler sets them.
          if (s !== inArena) unpackGradients(state, s.present, s.grads, s.gradDtype);
          if (s.hyper) state.groups = applyHyperDelta(state.groups, s.hyper);
          state.applyStep(s.present, kernel, kernelOptions);
        } catch (err) {
          // The steps are committed; only this process's copy is lost (the next request rebuilds it).
          cache.forget(id);
          current = false;
          log.warn({ err, session: name, version: answers[i].version }, 'could not bring the cached state up to a committed step');
        }
      }
      await answer(name, s.request, answers[i], current ? state : undefined);
    }
    if (current) state.setStamp(session.stamp);
    writer.known(entry, appended.newestSnapshot);
    const pointDue = writer.pointDue(session, entry, appended.previousVersion, session.version);
    const snapshotDue = writer.due(session, entry, session.version, appended.previousVersion);
    let target = entry;
    const now = cache.get(id);
    if (!current && now && now.state.version >= session.version && (pointDue || snapshotDue)) {
      // The copy was brought up to this batch's version or past it while the batch answered (an answer with
      // parameters caught it up, or rebuilt it where the log no longer reached back to the copy this batch
      // began with): that one is written (found by a soak review: such batches took the rebuilt copy for
      // another's and skipped their slot's snapshot).
      target = now;
    } else if (!current && (pointDue || snapshotDue)) {
      // Behind (other steps committed meanwhile) and a snapshot or replay point is due: caught up, these steps
      // included, or rebuilt from the newest stored state where the log no longer reaches back to the copy
      // (keep_log_bytes or keep_snapshots pruned it): dropped instead, the copy left its slot without a
      // snapshot, as the other processes' batches in the slot do not start one (found by a review: slots
      // skipped, the log past keep_log_bytes). Otherwise the copy stays behind and catches up from the log
      // when it is next read (currentState): under several writers one batched read instead of one per step.
      try {
        target = await consistentRead(db, (q) => history.currentState(q, session));
      } catch (err) {
        cache.forget(id);
        log.warn({ err, session: name, version: session.version }, 'could not bring the cached state up to a committed step');
        return;
      }
    }
    if (cache.get(id) !== target || target.state.version < session.version) return;
    // The copy a background write takes is made before the next batch may step the state (this holds the lock).
    if (snapshotDue) await writer.inBackground(session, target, 'auto');
    else if (pointDue) await writer.pointInBackground(session, target);
  }

  /** Answers a committed (or replayed) step, with its state encoded at its version when the request asks for it. */
  async function answer(name: string, request: Waiting, result: StepAnswer, live?: SessionState): Promise<void> {
    try {
      const encodeAt = request.opts.encodeAt;
      if (encodeAt) await reads.withAnswerState(name, result, (view) => encodeAt(view, result), live);
      request.resolve(result);
    } catch (err) {
      request.reject(err);
    }
  }

  return { step };
}
