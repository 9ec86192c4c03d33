// Synchronous rounds (issue 13): in a session with `aggregation`, a step request is a contribution to the
// round open at the session's version, and the round's combined gradient (aggregation.ts) becomes one
// ordinary float32 step.
//
// Durability: a contribution is stored in PostgreSQL (round_contributions) under the session row lock,
// after the checks, and committed before its request waits; any replica may store the next one. A round
// steps in one transaction under the row lock (read its contributions, combine, log the step, advance,
// step_history with the round's record, NOTIFY, save the answers of keyed contributions, delete the round),
// taken by the contribution that completes it, or by a process that holds a waiting request of the round
// when its timeout passes (a timer), or by a retried request that finds it due. A request is answered 200
// only from committed rows (the round's step_history row or a saved Idempotency-Key answer); until then it
// waits on the version notifier (LISTEN asgd_versions) and, after `wait` seconds, answers 202 (pending): the
// client re-POSTs with the same Idempotency-Key and no second contribution is stored. A process that dies
// mid-round loses nothing stored; a round's transaction that dies with it rolls back whole.
import type { FastifyBaseLogger } from 'fastify';
import type { Database, Queryable } from '../db/database.ts';
import type { Aggregation, GroupSpec, HyperDelta, RoundRecord } from '../db/schema.ts';
import { errors } from '../errors.ts';
import { AggregatedSession, averageMetrics, byWorker, contributionCombiner, roundDue, type RoundTally } from './aggregation.ts';
import { decodeGradients, packGradients, type GradientInput } from './gradients.ts';
import { checkIfMatch, type RoundHost } from './context.ts';
import type { VersionNotifier } from './notifier.ts';
import * as repo from './repository.ts';
import type { SessionRecord } from './repository.ts';
import * as store from './rounds-repository.ts';
import type { OpenRound } from './rounds-repository.ts';
import { sameRequest, type StepAnswer, type StepOptions } from './model.ts';
import type { SessionState } from './state.ts';
import { applyHyperDelta, baseVersionTooNew, groupHyperparameters, parseStepHyper } from './step-input.ts';

export interface RoundHooks {
  closed?(session: string, contributions: number, waitSeconds: number, timedOut: boolean): void;
}

export interface ContributionOptions extends StepOptions {
  /** The contributing worker (required in a session with aggregation). */
  worker?: string | null;
  /** Samples behind the gradient (counts toward aggregation.target_samples). */
  samples?: number | null;
  /** Seconds to wait for the round to step before answering 202. */
  waitSeconds?: number;
  /** Ends the wait early (the client went away). */
  signal?: AbortSignal;
}

/** The open round as answers show it. */
export interface RoundStatus {
  version: number;
  contributions: number;
  samples: number | null;
  workers: string[];
  age_s: number;
}

export type StepResult = { status: 200; answer: StepAnswer } | { status: 202; round: RoundStatus };

export const DEFAULT_WAIT_SECONDS = 60;

export const roundStatus = (round: OpenRound): RoundStatus => ({
  version: round.version, contributions: round.contributions, samples: round.samples, workers: round.workers, age_s: round.ageSeconds,
});

const tallyOf = (round: OpenRound): RoundTally => ({ contributions: round.contributions, samples: round.samples ?? 0, ageSeconds: round.ageSeconds });

/**
 * Two contributions' param_groups agree when the groups they make step the same (what the round's step
 * applies); one without any agrees with all. Whether a value is an int does not count (5 and 5.0: a
 * JavaScript worker and a Python one); the round's step takes the kinds of one of them.
 */
function sameEffect(groups: readonly GroupSpec[], a: HyperDelta | null, b: HyperDelta | null): boolean {
  const canonical = (delta: HyperDelta | null) => JSON.stringify(applyHyperDelta(groups, delta ?? []).map((g) => ({
    lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weight_decay, maximize: g.maximize,
  })));
  return canonical(a) === canonical(b);
}

/** A contribution stored and its round still open. */
interface Pending {
  sessionId: number;
  version: number;
  aggregation: Aggregation;
  ageSeconds: number;
  replayed: boolean;
}

type Stored = { kind: 'plain' } | { kind: 'answered'; answer: StepAnswer } | ({ kind: 'pending' } & Pending);

/** A round's step, committed: what the answers and the after-commit work need. */
interface Closed {
  session: SessionRecord;
  entry: { state: SessionState };
  answer: StepAnswer;
  waitSeconds: number;
}

export interface RoundServiceOptions {
  db: Database;
  /** The plain step (sessions without aggregation) and what rounds use of the session modules. */
  sessions: { step(name: string, input: GradientInput, opts?: StepOptions): Promise<StepAnswer>; roundHost: RoundHost };
  versions: VersionNotifier;
  log: FastifyBaseLogger;
  hooks?: RoundHooks;
}

export function createRoundService(options: RoundServiceOptions) {
  const { db, sessions, versions, log, hooks } = options;
  const host = sessions.roundHost;
  /** Sessions this process has seen with aggregation: their requests skip the plain step's attempt. A hint. */
  const aggregated = new Set<string>();
  /** Per session: the timer of its open round's timeout, armed while this process holds waiting requests of it. */
  const timers = new Map<string, { version: number; holders: number; timer: NodeJS.Timeout | null }>();
  let closing = false;

  /** A step request: an ordinary step, or in a session with aggregation a contribution that waits for its round. */
  async function step(name: string, input: GradientInput, opts: ContributionOptions = {}): Promise<StepResult> {
    // Each pass settles on what the session is under its row lock; only a PATCH of aggregation racing this
    // request sends it round again.
    for (let attempt = 0; attempt < 3; attempt++) {
      if (!aggregated.has(name)) {
        try {
          return { status: 200, answer: await sessions.step(name, input, opts) };
        } catch (err) {
          if (!(err instanceof AggregatedSession)) throw err;
          aggregated.add(name);
        }
      }
      const result = await contribute(name, input, opts);
      if (result) return result;
      aggregated.delete(name); // aggregation was removed meanwhile: an ordinary step after all
    }
    throw errors.unavailable('aggregation: the session\'s aggregation changed while this request ran; retry');
  }

  /** null: the session has no aggregation (any more). */
  async function contribute(name: string, input: GradientInput, opts: ContributionOptions): Promise<StepResult | null> {
    const stored = await storeContribution(name, input, opts);
    if (stored.kind === 'plain') return null;
    const answered = stored.kind === 'answered' ? stored.answer : await awaitRound(name, stored, opts);
    if (!('session' in answered)) return { status: 202, round: answered };
    const encodeAt = opts.encodeAt;
    if (encodeAt) await host.run(name, () => host.withAnswerState(name, answered, (view) => encodeAt(view, answered)));
    return { status: 200, answer: answered };
  }

  /**
   * Under the session's lock and row lock, one transaction: the Idempotency-Key's earlier answer or stored
   * contribution, else the checks, the contribution stored, and the round's step when it completes it.
   */
  async function storeContribution(name: string, input: GradientInput, opts: ContributionOptions): Promise<Stored> {
    const queued = process.hrtime.bigint();
    return host.run(name, async () => {
      const started = process.hrtime.bigint();
      let touched: number | null = null;
      let closed: Closed | null = null;
      const closeNow = async (tx: Queryable, session: SessionRecord, timedOut: boolean) => {
        closed = await closeRound(tx, session, timedOut, (id) => (touched = id));
        return closed;
      };
      try {
        const stored = await db.transaction(async (tx): Promise<Stored> => {
          const session = await repo.findSession(tx, name, true);
          if (!session) throw errors.sessionNotFound(name);
          const aggregation = session.aggregation;
          if (!aggregation) return { kind: 'plain' };
          const key = opts.idempotencyKey ?? null;
          if (key !== null) {
            const previous = await store.findKeyAnswer(tx, session.id, key, host.idempotencyWindowSeconds);
            if (previous) {
              if (!sameRequest(previous.requestHash, opts.requestHash ?? '', opts)) throw errors.idempotencyKeyReused();
              return { kind: 'answered', answer: { ...(previous.response as unknown as StepAnswer), replayed: true } };
            }
            const mine = await store.findContributionByKey(tx, session.id, key);
            if (mine) {
              if (!sameRequest(mine.requestHash, opts.requestHash ?? null, opts)) throw errors.idempotencyKeyReused();
              if (mine.version === session.version) {
                // Stored by an earlier request with this key: wait again, or step the round if its timeout made it due.
                const round = await store.readRound(tx, session.id, session.version);
                const due = roundDue(aggregation, tallyOf(round));
                if (due.due) return { kind: 'answered', answer: { ...(await closeNow(tx, session, due.timedOut)).answer, replayed: true } };
                return { kind: 'pending', sessionId: session.id, version: session.version, aggregation, ageSeconds: round.ageSeconds, replayed: true };
              }
              // Its round is gone without stepping (a load or restore moved the version): refused as stale below.
            }
          }
          const worker = opts.worker ?? null;
          const baseVersion = opts.baseVersion ?? null;
          if (baseVersion === null) throw errors.invalidBody('base_version: is required in a session with aggregation (the version the gradient was computed at)');
          if (worker === null) throw errors.invalidBody('worker: is required in a session with aggregation (the contributing worker\'s id, 1-128 of A-Za-z0-9._-)');
          checkIfMatch(opts.ifMatch, session.version);
          if (baseVersion > session.version) throw baseVersionTooNew(baseVersion, session.version, opts.baseVersionFrom);
          if (baseVersion < session.version) {
            // As a plain step's: a gradient of a state since replaced (a load, a restore, the name deleted and
            // created again) says where (replaced_at), so that a worker tells it from a round it was late for.
            const historyFrom = await store.historyFrom(tx, session.id);
            if (baseVersion < historyFrom) throw errors.gradientOfReplacedState(baseVersion, historyFrom, session.version, 0);
            throw errors.staleContribution(baseVersion, session.version);
          }
          const samples = opts.samples ?? null;
          if (aggregation.target_samples !== undefined && samples === null) throw errors.invalidBody('samples: is required in a session with aggregation.target_samples');
          const { state } = await host.currentState(tx, session);
          const decoded = decodeGradients(input, state); // validates everything before anything is written
          const hyper = parseStepHyper(opts.paramGroups, state.groups, 'param_groups', state);
          opts.beforeWrite?.(state.layout);
          const round = await store.readRound(tx, session.id, session.version);
          if (round.workers.includes(worker)) throw errors.duplicateContribution(worker, session.version);
          // A contribution without param_groups takes the round's (one worker may own the schedule, as the
          // README advises); those that carry some must agree in effect.
          if (hyper !== null && round.hyper !== null && !sameEffect(state.groups, hyper, round.hyper)) throw errors.roundConflict(session.version);
          await store.deleteContributions(tx, session.id, session.version, false); // void ones of earlier versions
          await store.insertContribution(db, tx, session.id, session.version, {
            worker, samples, present: decoded.present, grads: packGradients(state, decoded), gradDtype: decoded.dtype, hyper,
            metrics: opts.metrics ?? null, idempotencyKey: key, requestHash: key === null ? null : (opts.requestHash ?? null),
          });
          const tally: RoundTally = {
            contributions: round.contributions + 1,
            samples: (round.samples ?? 0) + (samples ?? 0),
            ageSeconds: round.contributions === 0 ? 0 : round.ageSeconds,
          };
          const due = roundDue(aggregation, tally);
          if (due.due) return { kind: 'answered', answer: (await closeNow(tx, session, due.timedOut)).answer };
          return { kind: 'pending', sessionId: session.id, version: session.version, aggregation, ageSeconds: tally.ageSeconds, replayed: false };
        });
        touched = null;
        if (closed) await afterClose(closed, started, queued);
        return stored;
      } finally {
        // The round's transaction did not commit after the kernel ran: this process's copy is ahead of the database.
        if (touched !== null) host.forget(touched);
      }
    });
  }

  /**
   * The round's step, in the caller's transaction (row lock held, under the session's lock): the mean of its
   * contributions logged as an ordinary float32 step with base_version = the round's version.
   */
  async function closeRound(tx: Queryable, session: SessionRecord, timedOut: boolean, ranKernel: (sessionId: number) => void): Promise<Closed> {
    const entry = await host.currentState(tx, session);
    const { state } = entry;
    // In worker order: the queries sort by bytes (COLLATE "C"), and so does byWorker, whatever the database's collation.
    const rows = (await store.readContributions(tx, session.id, session.version)).sort(byWorker);
    // The gradients a page at a time, added in that order as they come.
    const combiner = contributionCombiner(state);
    for (let from = 0; from < rows.length; from += store.GRADIENT_PAGE) {
      combiner.add((await store.readContributionGradients(tx, session.id, session.version, from)).sort(byWorker));
    }
    const present = combiner.finish();
    const hyper = rows.find((r) => r.hyper !== null)?.hyper ?? null;
    const reported = rows.filter((r) => r.samples !== null);
    const record: RoundRecord = {
      contributions: rows.length,
      samples: reported.length ? reported.reduce((a, r) => a + r.samples!, 0) : null,
      timed_out: timedOut,
    };
    const version = session.version + 1;
    await store.insertRoundStep(db, tx, session.id, { version, present, grads: packGradients(state, { present, dtype: 'float32', bits: null }), hyper });
    ranKernel(session.id);
    if (hyper) state.groups = applyHyperDelta(state.groups, hyper);
    host.applyStep(state, present);
    state.setStamp(await repo.advanceSession(tx, session.id, state.version, state.step, hyper ? state.groups : undefined));
    await repo.insertHistory(tx, {
      sessionId: session.id, version: state.version, step: state.step, staleness: 0, metrics: averageMetrics(rows),
      hyper: hyper ? groupHyperparameters(state.groups) : null, round: record,
    });
    await repo.notifyVersion(tx, session.name, state.version, state.step);
    const answer: StepAnswer = { session: session.name, step: state.step, version: state.version, staleness: 0, round: { version: session.version, ...record } };
    for (const r of rows) if (r.idempotencyKey !== null) await repo.saveIdempotentAnswer(tx, session.id, r.idempotencyKey, r.requestHash ?? '', { ...answer });
    await store.deleteContributions(tx, session.id, session.version, true);
    return { session, entry, answer, waitSeconds: Math.max(0, ...rows.map((r) => r.ageSeconds)) };
  }

  async function afterClose(closed: Closed, started: bigint, queued: bigint): Promise<void> {
    const done = process.hrtime.bigint();
    await host.afterStep(closed.session, closed.entry, Number(done - started) / 1e9, Number(started - queued) / 1e9);
    const { round } = closed.answer;
    hooks?.closed?.(closed.session.name, round!.contributions, closed.waitSeconds, round!.timed_out);
    log.debug({ session: closed.session.name, version: closed.answer.version, contributions: round!.contributions, timedOut: round!.timed_out }, 'round stepped');
  }

  /** The round at `version` if it is due (its timeout passed): its step. Called by this process's timers. */
  async function closeIfDue(name: string, version: number): Promise<number | null> {
    const queued = process.hrtime.bigint();
    return host.run(name, async () => {
      const started = process.hrtime.bigint();
      let touched: number | null = null;
      let closed: Closed | null = null;
      try {
        const early = await db.transaction(async (tx) => {
          const session = await repo.findSession(tx, name, true);
          if (!session?.aggregation || session.version !== version) return null;
          const round = await store.readRound(tx, session.id, version);
          const due = roundDue(session.aggregation, tallyOf(round));
          if (!due.due) return round.contributions > 0 ? (session.aggregation.timeout_s ?? 0) - round.ageSeconds : null;
          closed = await closeRound(tx, session, due.timedOut, (id) => (touched = id));
          return null;
        });
        touched = null;
        if (closed) await afterClose(closed, started, queued);
        // Seconds until the timeout by the database's clock when the timer fired early; null: nothing to wait for.
        return early !== null && early > 0 ? early : null;
      } finally {
        if (touched !== null) host.forget(touched);
      }
    });
  }

  /**
   * Holds the timer of the round's timeout while a request of it waits in this process: the first holder
   * arms it (at the first contribution + timeout_s), the last one to leave clears it.
   */
  function holdTimer(name: string, pending: Pending): () => void {
    const timeout = pending.aggregation.timeout_s;
    if (timeout === undefined || closing) return () => {};
    let entry = timers.get(name);
    if (entry && entry.version > pending.version) return () => {};
    if (!entry || entry.version < pending.version) {
      if (entry?.timer) clearTimeout(entry.timer);
      entry = { version: pending.version, holders: 0, timer: null };
      timers.set(name, entry);
      arm(name, entry, timeout - pending.ageSeconds);
    }
    const held = entry;
    held.holders++;
    return () => {
      held.holders--;
      if (held.holders > 0 || timers.get(name) !== held) return;
      if (held.timer) clearTimeout(held.timer);
      timers.delete(name);
    };
  }

  function arm(name: string, entry: { version: number; holders: number; timer: NodeJS.Timeout | null }, seconds: number): void {
    // A few milliseconds late rather than early: the database's clock decides.
    entry.timer = setTimeout(() => {
      entry.timer = null;
      closeIfDue(name, entry.version).then(
        (early) => {
          if (early !== null && entry.holders > 0 && timers.get(name) === entry && !closing) arm(name, entry, early);
        },
        (err) => {
          log.warn({ err, session: name, version: entry.version }, 'could not step a round after its timeout; trying again');
          if (entry.holders > 0 && timers.get(name) === entry && !closing) arm(name, entry, 1);
        },
      );
    }, Math.max(0, Math.ceil(seconds * 1000)) + 5);
  }

  /** How long a session stays mid-round (RoundHost.holdOpen) after a contribution's request ended. */
  const HOLD_OPEN_AFTER_MS = DEFAULT_WAIT_SECONDS * 1000;

  /**
   * Waits for the round of a stored contribution to step (announced on the version notifier), at most the
   * request's `wait`: its answer, or the open round's status (202).
   */
  async function awaitRound(name: string, pending: Pending, opts: ContributionOptions): Promise<StepAnswer | RoundStatus> {
    const deadline = Date.now() + (opts.waitSeconds ?? DEFAULT_WAIT_SECONDS) * 1000;
    const signal = opts.signal ?? new AbortController().signal;
    const release = holdTimer(name, pending);
    // A worker mid-round is no idle session: not swept while it waits here (holdOpen), nor, on PostgreSQL,
    // by another process while this one holds the session's listening lease (expiry.ts).
    const unhold = host.holdOpen(name);
    try {
      for (;;) {
        const remaining = deadline - Date.now();
        // Registered before the read: a step committed in between wakes it.
        const waiter = remaining > 0 && !signal.aborted && !versions.stats().closed ? versions.waitFor(name, pending.version, remaining, signal) : null;
        try {
          if (waiter) await versions.listening(name);
          const answer = await roundAnswer(name, pending);
          if (answer) return answer;
          if (!waiter) {
            const round = await store.readRound(db, pending.sessionId, pending.version);
            // This contribution is stored: its round empty means it stepped (or a load voided it) since the read above.
            if (round.contributions === 0) return (await roundAnswer(name, pending)) ?? roundStatus(round);
            return roundStatus(round);
          }
          await waiter.ready;
        } finally {
          waiter?.cancel();
        }
      }
    } finally {
      // Answered pending (202), the worker sends it again at once: still mid-round for a while.
      setTimeout(unhold, HOLD_OPEN_AFTER_MS).unref();
      release();
    }
  }

  /** The answer of a stored contribution once its round stepped (from committed rows), or null while it is open. */
  async function roundAnswer(name: string, pending: Pending): Promise<StepAnswer | null> {
    const outcome = await store.readRoundOutcome(db, pending.sessionId, pending.version);
    if (!outcome) throw errors.sessionNotFound(name);
    if (outcome.version === pending.version) return null;
    if (outcome.round === null || outcome.step === null) throw errors.staleContribution(pending.version, outcome.version); // a load or restore, not the round
    return {
      session: outcome.name, step: outcome.step, version: pending.version + 1, staleness: 0, round: { version: pending.version, ...outcome.round },
      ...(pending.replayed && { replayed: true }),
    };
  }

  /** The open rounds of sessions (at each one's version), for session answers. */
  async function openRounds(list: readonly SessionRecord[]): Promise<Map<number, RoundStatus>> {
    const rounds = await store.readOpenRounds(db, list.filter((s) => s.aggregation !== null));
    return new Map([...rounds].map(([id, round]) => [id, roundStatus(round)]));
  }

  async function openRound(session: SessionRecord): Promise<RoundStatus | null> {
    return (await openRounds([session])).get(session.id) ?? null;
  }

  function close(): void {
    closing = true;
    for (const entry of timers.values()) if (entry.timer) clearTimeout(entry.timer);
    timers.clear();
  }

  return { step, openRound, openRounds, close };
}

export type RoundService = ReturnType<typeof createRoundService>;
