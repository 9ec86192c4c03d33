// The session domain: create, step, read, restore, snapshot, fork. Route -> here -> kernel and db.
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
import type { FastifyBaseLogger } from 'fastify';
import type { Database, Queryable } from '../db/database.ts';
import type { Aggregation, GroupSpec, ParamSpec, ScalarStateRow } from '../db/schema.ts';
import { errors } from '../errors.ts';
import type { AsgdKernel, KernelOptions } from '../optim/types.ts';
import { AggregatedSession } from './aggregation.ts';
import { decodeGradients, packGradients, unpackGradients, type GradientInput } from './gradients.ts';
import { KeyedMutex } from './mutex.ts';
import type { StepAnswer } from './model.ts';
import { applyHyperDelta, groupHyperparameters, parseStepHyper } from './step-input.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import { snapshotInterval } from './retention.ts';
import { sessionStorage, storageOfSessions, type SessionStorage } from './storage.ts';
import { sweepIdleSessions } from './expiry.ts';
import { SessionState, layoutOf, snapshotChecksum, type Layout } from './state.ts';
import { assertNoOpenRound, type RoundHost } from './rounds.ts';

export interface SessionServiceOptions {
  db: Database;
  kernel: AsgdKernel;
  kernelOptions: KernelOptions;
  log: FastifyBaseLogger;
  cacheBytes: number;
  idempotencyWindowSeconds: number;
  hooks?: SessionHooks;
}

export interface SessionHooks {
  stepped?(session: string, seconds: number, lockWaitSeconds: number): void;
  snapshotted?(session: string, reason: string): void;
}

export interface StepOptions {
  ifMatch?: number | null;
  idempotencyKey?: string | null;
  requestHash?: string;
  baseVersion?: number | null;
  /** The step body's `param_groups` (validated here against the session's groups). */
  paramGroups?: unknown;
  /** The step body's `metrics`, already validated (step-input.ts parseMetrics). */
  metrics?: Record<string, number> | null;
  /**
   * Called once the step is committed with the state at the answered version (an Idempotency-Key retry:
   * the first answer's version), under the session's lock: the view's tensors are this process's copy
   * itself, valid only during the call, so encode them there (one copy, no database read when the copy is
   * current, which it is right after this process's step).
   */
  encodeAt?: (view: StateView, answer: StepAnswer) => void;
  /** Checks of the caller's that need the session's layout (e.g. the answer's size), run before anything is written. */
  beforeWrite?: (layout: Layout) => void;
}

export type { StepAnswer } from './model.ts';

/** A consistent copy of a session's state at one version, for encoders (JSON, torch.save, safetensors). */
export interface StateView {
  session: string;
  version: number;
  step: number;
  params: ParamSpec[];
  layout: Layout;
  groups: GroupSpec[];
  scalars: ScalarStateRow[];
  paramData: Float32Array;
  axData: Float32Array;
}

/** A state_dict to load, already decoded from JSON or a torch.save file (indices as saved). */
export interface LoadedStateDict {
  paramGroups: { params: number[]; hyper: Omit<GroupSpec, 'params'> }[];
  state: Map<number, { step: number; eta: number; mu: number; ax: Float32Array; axShape: number[] | null }>;
}

export interface CreateInput {
  name: string;
  params: ParamSpec[];
  data: Float32Array[];
  groups: GroupSpec[];
  snapshotEvery: number;
  keepSnapshots: number;
  maxStaleness: number | null;
  keepLogBytes: number | null;
  expireAfterIdleS: number | null;
  aggregation: Aggregation | null;
}

interface Cached {
  state: SessionState;
  lastSnapshotVersion: number;
  lastUsed: number;
}

/**
 * Scheduled snapshots go by slot: versions 1..every are slot 0 (the snapshot at creation), every+1..2*every
 * slot 1, and so on. A slot is the same in every process, so the processes can agree that one snapshot
 * covers it (the first version of a slot a process is current at), however their caches interleave.
 */
export const slotOf = (version: number, every: number) => Math.floor((version - 1) / every);
export const slotStart = (version: number, every: number) => slotOf(version, every) * every + 1;
/** A snapshot is due when the version is in a later slot than the last snapshot this process wrote or loaded. */
export const snapshotDue = (version: number, lastSnapshotVersion: number, every: number) => slotOf(version, every) > slotOf(lastSnapshotVersion, every);

export function createSessionService(options: SessionServiceOptions) {
  const { db, kernel, kernelOptions, log, hooks } = options;
  const cache = new Map<number, Cached>();
  const mutex = new KeyedMutex();
  const pendingSnapshots = new Set<Promise<void>>();
  let cachedBytes = 0;
  let closing = false;

  // ---- cache -------------------------------------------------------------------------------------

  function remember(state: SessionState, lastSnapshotVersion: number): void {
    const old = cache.get(stateId(state));
    if (old && old.state !== state) forget(stateId(state));
    if (!old || old.state !== state) cachedBytes += state.layout.numel * 12;
    cache.set(stateId(state), { state, lastSnapshotVersion, lastUsed: Date.now() });
    // Evict least recently used sessions beyond the budget (never the one just used).
    if (cachedBytes > options.cacheBytes) {
      const byAge = [...cache.entries()].sort((a, b) => a[1].lastUsed - b[1].lastUsed);
      for (const [id, entry] of byAge) {
        if (cachedBytes <= options.cacheBytes || entry.state === state) continue;
        forget(id);
      }
    }
  }

  const stateIds = new WeakMap<SessionState, number>();
  /** Session name -> id of the sessions this process has loaded: a hint, checked by the statement that uses it. */
  const sessionIds = new Map<string, number>();
  const stateId = (state: SessionState) => stateIds.get(state)!;

  function forget(id: number): void {
    const entry = cache.get(id);
    if (!entry) return;
    cache.delete(id);
    cachedBytes -= entry.state.layout.numel * 12;
    entry.state.arena.release();
  }

  function newState(session: { id: number; params: ParamSpec[] }, version: number, step: number, groups: GroupSpec[], scalars: ScalarStateRow[]): SessionState {
    const layout = layoutOf(session.params);
    const state = new SessionState(layout, kernel.createArena(layout.numel), version, step, groups, scalars);
    stateIds.set(state, session.id);
    return state;
  }

  // ---- loading and replay --------------------------------------------------------------------------

  async function loadSnapshotInto(q: Queryable, snapshot: SnapshotRecord, session: { id: number; params: ParamSpec[] }): Promise<SessionState> {
    const state = newState(session, snapshot.version, snapshot.step, snapshot.groups, snapshot.scalars);
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

  /** Replays the logged steps in (state.version, target]; false when the log has a gap (pruned). */
  async function replay(q: Queryable, state: SessionState, target: number): Promise<boolean> {
    const BATCH = 16;
    while (state.version < target) {
      const entries = await repo.readSteps(q, stateId(state), state.version, target, BATCH);
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

  /** The session's state at `version`, built from the newest snapshot at or below it and the log. */
  async function buildState(q: Queryable, session: SessionRecord, version: number): Promise<{ state: SessionState; snapshotVersion: number }> {
    const snapshot = await repo.findSnapshotAtOrBelow(q, session.id, version);
    if (!snapshot) throw errors.versionNotAvailable(version, await repo.oldestSnapshotVersion(q, session.id), session.version);
    const state = await loadSnapshotInto(q, snapshot, session);
    if (!(await replay(q, state, version))) {
      state.arena.release();
      throw errors.versionNotAvailable(version, await repo.oldestSnapshotVersion(q, session.id), session.version);
    }
    return { state, snapshotVersion: snapshot.version };
  }

  /** The cached state brought to the session's current version (caught up from the log or rebuilt). */
  async function currentState(q: Queryable, session: SessionRecord): Promise<Cached> {
    sessionIds.set(session.name, session.id);
    const cached = cache.get(session.id);
    if (cached && cached.state.version === session.version) {
      cached.lastUsed = Date.now();
      return cached;
    }
    if (cached && cached.state.version < session.version) {
      try {
        if (await replay(q, cached.state, session.version)) {
          cached.lastUsed = Date.now();
          return cached;
        }
      } catch (err) {
        forget(session.id);
        throw err;
      }
    }
    forget(session.id);
    const { state, snapshotVersion } = await buildState(q, session, session.version);
    remember(state, snapshotVersion);
    return cache.get(session.id)!;
  }

  /**
   * Reads that rebuild state outside a step's row lock (a copy gone or behind, an old version, a snapshot)
   * run as one consistent read: a snapshot found there keeps its chunks, and the log after it, even when
   * another process writes a newer snapshot and prunes them meanwhile (else: a 503 SNAPSHOT_UNAVAILABLE or
   * a 404 VERSION_NOT_AVAILABLE for the current version, under nothing worse than frequent snapshots).
   */
  function consistentRead<T>(fn: (q: Queryable) => Promise<T>): Promise<T> {
    return db.transaction(fn, { consistentRead: true });
  }

  async function mustFind(q: Queryable, name: string, lock = false): Promise<SessionRecord> {
    const session = await repo.findSession(q, name, lock);
    if (!session) throw errors.sessionNotFound(name);
    return session;
  }

  function checkIfMatch(ifMatch: number | null | undefined, session: SessionRecord): void {
    if (ifMatch !== null && ifMatch !== undefined && ifMatch !== session.version) throw errors.versionMismatch(`"${ifMatch}"`, session.version);
  }

  // ---- snapshots -----------------------------------------------------------------------------------

  async function writeSnapshot(
    q: Queryable,
    sessionId: number,
    meta: { version: number; step: number; groups: GroupSpec[]; scalars: ScalarStateRow[] },
    bytes: Buffer,
    reason: string,
    pinned = false,
  ): Promise<SnapshotRecord | null> {
    const chunks: Buffer[] = [];
    for (let at = 0; at < bytes.byteLength; at += repo.CHUNK_BYTES) chunks.push(bytes.subarray(at, Math.min(bytes.byteLength, at + repo.CHUNK_BYTES)));
    const checksum = snapshotChecksum(chunks, meta.groups, meta.scalars);
    return repo.insertSnapshot(db, q, { sessionId, version: meta.version, step: meta.step, reason, pinned, groups: meta.groups, scalars: meta.scalars, checksum }, bytes);
  }

  /**
   * Copies the state now and writes it as a snapshot in the background (one transaction: all or nothing),
   * unless a process already wrote one in this version's slot (repo.claimSnapshotSlot): every process
   * that is current when a slot begins schedules one, exactly one is written.
   */
  function snapshotInBackground(session: SessionRecord, entry: Cached, reason: string): void {
    const { state } = entry;
    const meta = { version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() };
    const bytes = state.tensorBytes();
    entry.lastSnapshotVersion = meta.version;
    const job = (async () => {
      try {
        const written = await db.transaction(async (tx) => {
          if (!(await repo.claimSnapshotSlot(tx, session.id, slotStart(meta.version, snapshotInterval(session))))) return false;
          const snapshot = await writeSnapshot(tx, session.id, meta, bytes, reason);
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
    pendingSnapshots.add(job);
    void job.finally(() => pendingSnapshots.delete(job));
  }

  // ---- operations ----------------------------------------------------------------------------------

  async function create(input: CreateInput): Promise<SessionRecord> {
    return mutex.run(input.name, async () => {
      const numel = input.data.reduce((a, d) => a + d.length, 0);
      const session = await db.transaction(async (tx) => {
        const row = await repo.insertSession(tx, {
          name: input.name, params: input.params, groups: input.groups, numel, step: 0,
          snapshotEvery: input.snapshotEvery, keepSnapshots: input.keepSnapshots, maxStaleness: input.maxStaleness,
          keepLogBytes: input.keepLogBytes, expireAfterIdleS: input.expireAfterIdleS, aggregation: input.aggregation,
        });
        if (!row) throw errors.sessionExists(input.name);
        const state = newState(row, row.version, 0, input.groups, input.params.map(() => null));
        input.data.forEach((d, i) => state.param(i).set(d));
        await writeSnapshot(tx, row.id, { version: row.version, step: 0, groups: input.groups, scalars: state.scalarRows() }, state.tensorBytes(), 'create');
        forget(row.id);
        remember(state, row.version);
        return row;
      });
      return session;
    });
  }

  async function get(name: string): Promise<SessionRecord> {
    return mustFind(db, name);
  }

  async function list(after: string | null, limit: number, only: readonly string[] | null = null, search: string | null = null): Promise<SessionRecord[]> {
    return repo.listSessions(db, after, limit, only, search);
  }

  async function remove(name: string, ifMatch?: number | null): Promise<void> {
    await mutex.run(name, async () => {
      await db.transaction(async (tx) => {
        const session = await mustFind(tx, name, true);
        checkIfMatch(ifMatch, session);
        await repo.deleteSession(tx, name);
        // Version 0: the session is gone (waiters and event streams of this name end).
        await repo.notifyVersion(tx, name, 0, 0);
        forget(session.id);
      });
    });
  }

  async function updateSettings(
    name: string,
    patch: Partial<Pick<SessionRecord, 'snapshotEvery' | 'keepSnapshots' | 'maxStaleness' | 'keepLogBytes' | 'expireAfterIdleS' | 'aggregation'>>,
  ): Promise<SessionRecord> {
    return db.transaction(async (tx) => {
      const session = await mustFind(tx, name, true);
      if (patch.aggregation !== undefined) await assertNoOpenRound(tx, session);
      return repo.updateSessionSettings(tx, session.id, { ...session, ...patch });
    });
  }

  async function step(name: string, input: GradientInput, opts: StepOptions = {}): Promise<StepAnswer> {
    const queued = process.hrtime.bigint();
    return mutex.run(name, async () => {
      const started = process.hrtime.bigint();
      // An Idempotency-Key needs its lookup and its answer under the row lock: a transaction. Every other
      // step is one statement, with the row lock held for that statement and its commit only.
      const { answer, snapshot } = opts.idempotencyKey ? await lockedStep(name, input, opts) : await appendedStep(name, input, opts);
      const done = process.hrtime.bigint();
      hooks?.stepped?.(name, Number(done - started) / 1e9, Number(started - queued) / 1e9);
      if (opts.encodeAt) await withStateAt(name, answer.version, (view) => opts.encodeAt!(view, answer));
      if (snapshot && !closing && cache.get(snapshot.session.id) === snapshot.entry) snapshotInBackground(snapshot.session, snapshot.entry, 'auto');
      return answer;
    });
  }

  type StepOutcome = { answer: StepAnswer; snapshot: { session: SessionRecord; entry: Cached } | null };

  /** The errors of a step refused by the checks on the locked version, in the order they are checked. */
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

  /**
   * A step as one statement (repo.appendStep). The gradient is validated against this process's copy of the
   * session first (its layout); the kernel runs after the commit, when the copy was at the version before
   * this step. A copy is never ahead of the database, so a failed statement leaves nothing to undo.
   */
  async function appendedStep(name: string, input: GradientInput, opts: StepOptions, retried = false): Promise<StepOutcome> {
    const hinted = sessionIds.get(name);
    let entry = hinted === undefined ? undefined : cache.get(hinted);
    if (!entry) entry = await consistentRead(async (q) => currentState(q, await mustFind(q, name)));
    const { state } = entry;
    const id = stateId(state);
    const decoded = decodeGradients(input, state); // validates everything before anything is written
    const { present } = decoded;
    const hyper = parseStepHyper(opts.paramGroups, state.groups);
    opts.beforeWrite?.(state.layout);
    const grads = packGradients(state, decoded);
    const appended = await repo.appendStep(db, db, id, { present, grads, gradDtype: decoded.dtype, hyper, metrics: opts.metrics ?? null }, { ifMatch: opts.ifMatch ?? null, baseVersion: opts.baseVersion ?? null });
    if (!appended) {
      // Deleted (and perhaps created again under the same name) by another process since this copy was made.
      forget(id);
      sessionIds.delete(name);
      if (retried) throw errors.sessionNotFound(name);
      return appendedStep(name, input, opts, true);
    }
    if (appended.aggregated) throw new AggregatedSession(name); // nothing written: a contribution (rounds.ts)
    const staleness = checkStep(appended.previousVersion, appended.maxStaleness, opts);
    const session = appended.session!;
    let current = false;
    if (cache.get(id) === entry) {
      try {
        if (state.version === appended.previousVersion) {
          // In step with the database: stays current. The step's hyperparameters first, as a scheduler sets them.
          if (hyper) state.groups = applyHyperDelta(state.groups, hyper);
          state.applyStep(present, kernel, kernelOptions);
        } else if (snapshotDue(session.version, entry.lastSnapshotVersion, snapshotInterval(session))) {
          // Behind (other steps committed meanwhile) and a snapshot is due: catch up, this step included.
          if (!(await replay(db, state, session.version))) forget(id);
        }
        // Otherwise the copy stays behind and catches up from the log when it is next read (currentState):
        // under several writers that is one batched read instead of one per step.
        current = cache.get(id) === entry && state.version === session.version;
      } catch (err) {
        // The step is committed; only this process's copy is lost (the next request rebuilds it).
        forget(id);
        log.warn({ err, session: name, version: session.version }, 'could not bring the cached state up to a committed step');
      }
    }
    const answer: StepAnswer = { session: name, step: session.step, version: session.version, staleness };
    return { answer, snapshot: current && snapshotDue(state.version, entry.lastSnapshotVersion, snapshotInterval(session)) ? { session, entry } : null };
  }

  /** A step with an Idempotency-Key: a transaction under the row lock (lookup, checks, log, answer). */
  async function lockedStep(name: string, input: GradientInput, opts: StepOptions): Promise<StepOutcome> {
    let touched: number | null = null;
    let snapshot: StepOutcome['snapshot'] = null;
    try {
      const answer = await db.transaction(async (tx) => {
        const session = await mustFind(tx, name, true);
        if (session.aggregation) throw new AggregatedSession(name); // a contribution (rounds.ts)
        if (opts.idempotencyKey) {
          const previous = await repo.findIdempotentAnswer(tx, session.id, opts.idempotencyKey, options.idempotencyWindowSeconds);
          if (previous) {
            if (previous.requestHash !== opts.requestHash) throw errors.idempotencyKeyReused();
            return { ...(previous.response as unknown as StepAnswer), replayed: true };
          }
        }
        const staleness = checkStep(session.version, session.maxStaleness, opts);
        const baseVersion = opts.baseVersion ?? null;
        const entry = await currentState(tx, session);
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
        if (snapshotDue(state.version, entry.lastSnapshotVersion, snapshotInterval(session))) snapshot = { session, entry };
        return result;
      });
      touched = null;
      return { answer, snapshot };
    } finally {
      // The transaction did not commit after the kernel ran: this process's copy is ahead of the database.
      if (touched !== null) forget(touched);
    }
  }

  /** A consistent copy of the state at `version` (default: current). */
  async function view(name: string, version?: number | null): Promise<StateView> {
    return mutex.run(name, async () => {
      // The common case, a copy that is current, needs one read and no transaction.
      const current = await mustFind(db, name);
      const cached = cache.get(current.id);
      if ((version == null || version === current.version) && cached?.state.version === current.version) {
        cached.lastUsed = Date.now();
        return toView(name, current.params, cached.state);
      }
      return consistentRead(async (q) => {
        const session = await mustFind(q, name);
        const target = version ?? session.version;
        if (target > session.version || target < 1) throw errors.versionNotAvailable(target, await repo.oldestSnapshotVersion(q, session.id), session.version);
        let state: SessionState;
        let temporary = false;
        if (target === session.version) {
          state = (await currentState(q, session)).state;
        } else {
          state = (await buildState(q, session, target)).state;
          temporary = true;
        }
        try {
          return toView(name, session.params, state);
        } finally {
          if (temporary) state.arena.release();
        }
      });
    });
  }

  /**
   * Calls `fn` with the state at `version` under the session's lock held by the caller: this process's copy
   * itself when it is there (no read, no copy), else the copy caught up from the log, else a rebuild.
   */
  async function withStateAt(name: string, version: number, fn: (view: StateView) => void): Promise<void> {
    const id = sessionIds.get(name);
    const cached = id === undefined ? undefined : cache.get(id);
    if (cached && cached.state.version === version) {
      fn(liveView(name, cached.state));
      return;
    }
    await consistentRead(async (q) => {
      const session = await mustFind(q, name);
      if (version > session.version || version < 1) throw errors.versionNotAvailable(version, await repo.oldestSnapshotVersion(q, session.id), session.version);
      if (version === session.version) {
        fn(liveView(name, (await currentState(q, session)).state));
        return;
      }
      const { state } = await buildState(q, session, version);
      try {
        fn(liveView(name, state));
      } finally {
        state.arena.release();
      }
    });
  }

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

  function toView(name: string, params: ParamSpec[], state: SessionState): StateView {
    return {
      session: name,
      version: state.version,
      step: state.step,
      params,
      layout: state.layout,
      groups: state.groups,
      scalars: state.scalarRows(),
      paramData: state.arena.params.slice(),
      axData: state.arena.ax.slice(),
    };
  }

  /**
   * Replaces the optimizer state (and the parameters, when given) as a new version, with the semantics of
   * Optimizer.load_state_dict: hyperparameters come from the loaded groups. Written as a snapshot.
   */
  async function load(
    name: string,
    input: { stateDict?: LoadedStateDict; params?: Map<string, { shape: number[] | null; data: Float32Array }>; step?: number },
    opts: { ifMatch?: number | null; reason: string },
  ): Promise<SessionRecord> {
    return mutex.run(name, async () => {
      let touched: number | null = null;
      try {
        return await db.transaction(async (tx) => {
          const session = await mustFind(tx, name, true);
          checkIfMatch(opts.ifMatch, session);
          const entry = await currentState(tx, session);
          const { state } = entry;
          const plan = input.stateDict ? planLoad(session, input.stateDict) : null;
          if (input.params) checkModel(session, state.layout, input.params);
          touched = session.id;
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
          if (input.step !== undefined) state.step = input.step;
          state.version = session.version + 1;
          await writeSnapshot(tx, session.id, { version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() }, state.tensorBytes(), opts.reason);
          await repo.advanceSession(tx, session.id, state.version, state.step, state.groups);
          await repo.notifyVersion(tx, name, state.version, state.step);
          await repo.pruneHistory(tx, session.id, session.keepSnapshots);
          entry.lastSnapshotVersion = state.version;
          const updated = await mustFind(tx, name);
          touched = null;
          return updated;
        });
      } finally {
        if (touched !== null) forget(touched);
      }
    });
  }

  /** A model state_dict must name exactly the session's parameters, with their shapes. */
  function checkModel(session: SessionRecord, layout: Layout, params: Map<string, { shape: number[] | null; data: Float32Array }>): void {
    for (const pname of params.keys()) {
      if (!layout.index.has(pname)) throw errors.unknownParameter(`model.${pname}`, pname);
    }
    session.params.forEach((p, i) => {
      const t = params.get(p.name);
      if (!t) throw errors.stateDictMismatch(`model: parameter ${JSON.stringify(p.name)} is missing`);
      if ((t.shape && (t.shape.length !== p.shape.length || t.shape.some((d, k) => d !== p.shape[k]))) || t.data.length !== layout.numels[i]) {
        throw errors.shapeMismatch(`model.${p.name}`, `expected shape ${JSON.stringify(p.shape)}, got ${t.shape ? JSON.stringify(t.shape) : `${t.data.length} elements`}`);
      }
    });
  }

  /** Validates a loaded state_dict against the session as torch.optim.Optimizer.load_state_dict does, and stricter. */
  function planLoad(session: SessionRecord, sd: LoadedStateDict): { groups: GroupSpec[]; scalars: ScalarStateRow[]; ax: (Float32Array | null)[] } {
    if (sd.paramGroups.length !== session.groups.length) throw errors.stateDictMismatch('loaded state dict has a different number of parameter groups');
    const savedToIndex = new Map<number, number>();
    const groups: GroupSpec[] = [];
    sd.paramGroups.forEach((g, k) => {
      const mine = session.groups[k];
      if (g.params.length !== mine.params.length) throw errors.stateDictMismatch("loaded state dict contains a parameter group that doesn't match the size of optimizer's group");
      g.params.forEach((saved, j) => savedToIndex.set(saved, mine.params[j]));
      groups.push({ ...g.hyper, params: mine.params });
    });
    const scalars: ScalarStateRow[] = session.params.map(() => null);
    const ax: (Float32Array | null)[] = session.params.map(() => null);
    const layout = layoutOf(session.params);
    for (const [saved, s] of sd.state) {
      const i = savedToIndex.get(saved);
      if (i === undefined) continue; // PyTorch keeps state for unknown ids; no parameter would ever use it
      const shape = session.params[i].shape;
      if (s.axShape && (s.axShape.length !== shape.length || s.axShape.some((d, k) => d !== shape[k]))) {
        throw errors.stateDictMismatch(`state.${saved}.ax: shape ${JSON.stringify(s.axShape)} does not match parameter ${JSON.stringify(session.params[i].name)} of shape ${JSON.stringify(shape)}`);
      }
      if (s.ax.length !== layout.numels[i]) {
        throw errors.stateDictMismatch(`state.${saved}.ax: ${s.ax.length} elements, parameter ${JSON.stringify(session.params[i].name)} has ${layout.numels[i]}`);
      }
      scalars[i] = { step: Math.fround(s.step), eta: Math.fround(s.eta), mu: Math.fround(s.mu) };
      ax[i] = s.ax;
    }
    return { groups, scalars, ax };
  }

  async function snapshotNow(name: string, pinned: boolean): Promise<SnapshotRecord> {
    return mutex.run(name, async () => {
      const { session, entry } = await consistentRead(async (q) => {
        const session = await mustFind(q, name);
        return { session, entry: await currentState(q, session) };
      });
      const { state } = entry;
      const meta = { version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() };
      const bytes = state.tensorBytes();
      return db.transaction(async (tx) => {
        let snapshot = await writeSnapshot(tx, session.id, meta, bytes, 'manual', pinned);
        if (!snapshot) {
          // One already exists at this version: it is the same state; pin it if asked.
          const existing = (await repo.findSnapshotAtOrBelow(tx, session.id, meta.version))!;
          snapshot = pinned && !existing.pinned ? (await repo.setSnapshotPinned(tx, session.id, existing.id, true))! : existing;
        }
        entry.lastSnapshotVersion = Math.max(entry.lastSnapshotVersion, meta.version);
        await repo.pruneHistory(tx, session.id, session.keepSnapshots);
        hooks?.snapshotted?.(name, 'manual');
        return snapshot;
      });
    });
  }

  async function listSnapshotsOf(name: string): Promise<{ session: SessionRecord; snapshots: SnapshotRecord[] }> {
    const session = await mustFind(db, name);
    return { session, snapshots: await repo.listSnapshots(db, session.id) };
  }

  async function getSnapshot(name: string, id: number, q: Queryable = db): Promise<{ session: SessionRecord; snapshot: SnapshotRecord }> {
    const session = await mustFind(q, name);
    const snapshot = await repo.findSnapshot(q, session.id, id);
    if (!snapshot) throw errors.snapshotNotFound(String(id));
    return { session, snapshot };
  }

  async function pinSnapshot(name: string, id: number, pinned: boolean): Promise<SnapshotRecord> {
    const session = await mustFind(db, name);
    const snapshot = await repo.setSnapshotPinned(db, session.id, id, pinned);
    if (!snapshot) throw errors.snapshotNotFound(String(id));
    return snapshot;
  }

  async function snapshotView(name: string, id: number): Promise<StateView> {
    const { session, state } = await consistentRead(async (q) => {
      const { session, snapshot } = await getSnapshot(name, id, q);
      return { session, state: await loadSnapshotInto(q, snapshot, session) };
    });
    try {
      return toView(name, session.params, state);
    } finally {
      state.arena.release();
    }
  }

  /** Rolls the session back to a snapshot's state, as a new version. */
  async function restore(name: string, id: number, ifMatch?: number | null): Promise<SessionRecord> {
    return mutex.run(name, async () => {
      let touched: number | null = null;
      try {
        return await db.transaction(async (tx) => {
          const session = await mustFind(tx, name, true);
          checkIfMatch(ifMatch, session);
          const snapshot = await repo.findSnapshot(tx, session.id, id);
          if (!snapshot) throw errors.snapshotNotFound(String(id));
          touched = session.id;
          forget(session.id);
          const state = await loadSnapshotInto(tx, snapshot, session);
          state.version = session.version + 1;
          await writeSnapshot(tx, session.id, { version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() }, state.tensorBytes(), 'restore');
          await repo.advanceSession(tx, session.id, state.version, state.step, state.groups);
          await repo.notifyVersion(tx, name, state.version, state.step);
          await repo.pruneHistory(tx, session.id, session.keepSnapshots);
          remember(state, state.version);
          const updated = await mustFind(tx, name);
          touched = null;
          return updated;
        });
      } finally {
        if (touched !== null) forget(touched);
      }
    });
  }

  /** A new session starting from a snapshot of another (or its current state). */
  async function fork(
    sourceName: string,
    target: {
      name: string; snapshotId?: number | null; snapshotEvery?: number; keepSnapshots?: number; maxStaleness?: number | null;
      keepLogBytes?: number | null; expireAfterIdleS?: number | null;
    },
  ): Promise<SessionRecord> {
    const source = target.snapshotId != null ? await snapshotView(sourceName, target.snapshotId) : await view(sourceName);
    const sourceSession = await mustFind(db, sourceName);
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
        const state = newState(row, row.version, source.step, source.groups, source.scalars);
        state.arena.params.set(source.paramData);
        state.arena.ax.set(source.axData);
        await writeSnapshot(tx, row.id, { version: row.version, step: source.step, groups: source.groups, scalars: source.scalars }, state.tensorBytes(), 'fork');
        forget(row.id);
        remember(state, row.version);
        return row;
      }),
    );
  }

  /** The training series (one point per step) after `afterVersion`, oldest first. */
  async function history(name: string, afterVersion: number, limit: number): Promise<{ session: SessionRecord; points: repo.HistoryPoint[] }> {
    const session = await mustFind(db, name);
    return { session, points: await repo.readHistory(db, session.id, afterVersion, limit) };
  }

  /**
   * What made the session's current version, for event streams: a step (its series point) or a change that
   * is not a step (the reason of the snapshot it wrote: load_state_dict, load_checkpoint, restore, create, fork).
   */
  async function latestChange(name: string): Promise<{ session: SessionRecord; point: repo.HistoryPoint | null; reason: string | null }> {
    const session = await mustFind(db, name);
    const point = await repo.findHistoryPoint(db, session.id, session.version);
    if (point) return { session, point, reason: null };
    const snapshot = await repo.findSnapshotAtOrBelow(db, session.id, session.version);
    return { session, point: null, reason: snapshot?.version === session.version ? snapshot.reason : null };
  }

  /** Oldest and newest version that `?version=` can read. */
  async function versionRange(name: string): Promise<{ oldest: number | null; newest: number }> {
    const session = await mustFind(db, name);
    return { oldest: await repo.oldestSnapshotVersion(db, session.id), newest: session.version };
  }

  /** Graceful shutdown: wait for background snapshots, then snapshot every cached session that moved. */
  async function close(): Promise<void> {
    closing = true;
    await Promise.allSettled([...pendingSnapshots]);
    for (const [id, entry] of [...cache.entries()]) {
      if (entry.state.version <= entry.lastSnapshotVersion) continue;
      try {
        await db.transaction(async (tx) => {
          const rows = await tx.query<{ version: number }>('SELECT version::float8 AS version FROM sessions WHERE id = $1', [id]);
          if (!rows.length || rows[0].version !== entry.state.version) return; // another process moved on
          const { state } = entry;
          await writeSnapshot(tx, id, { version: state.version, step: state.step, groups: state.groups, scalars: state.scalarRows() }, state.tensorBytes(), 'shutdown');
        });
      } catch (err) {
        log.warn({ err, sessionId: id }, 'shutdown snapshot failed');
      }
    }
    for (const id of [...cache.keys()]) forget(id);
  }

  async function pruneIdempotency(): Promise<number> {
    return repo.pruneIdempotencyKeys(db, options.idempotencyWindowSeconds);
  }

  /** What the session stores, in bytes as PostgreSQL counts them (storage.ts). */
  async function storage(name: string): Promise<SessionStorage> {
    const session = await mustFind(db, name);
    const figures = await sessionStorage(db, session.id);
    if (!figures) throw errors.sessionNotFound(name);
    return figures;
  }

  /** Several sessions' stored bytes at once (the list's ?storage=true), by session id. */
  async function storageOfMany(sessions: SessionRecord[]): Promise<Map<number, SessionStorage>> {
    return storageOfSessions(db, sessions.map((x) => x.id));
  }

  /** Deletes the sessions idle beyond their expire_after_idle_s (expiry.ts); their cached copies go too. */
  async function sweepExpired(): Promise<string[]> {
    const gone = await sweepIdleSessions(db);
    for (const { id, name } of gone) {
      forget(id);
      sessionIds.delete(name);
    }
    if (gone.length) log.info({ sessions: gone.map((g) => g.name) }, 'expired idle sessions deleted');
    return gone.map((g) => g.name);
  }

  /** What the rounds of sessions with `aggregation` (rounds.ts) use of this service. */
  const roundHost: RoundHost = {
    run: (name, fn) => mutex.run(name, fn),
    currentState,
    forget,
    withStateAt,
    applyStep: (state, present) => state.applyStep(present, kernel, kernelOptions),
    afterStep(session, entry, seconds, lockWaitSeconds) {
      hooks?.stepped?.(session.name, seconds, lockWaitSeconds);
      const cached = cache.get(session.id);
      if (!closing && cached === entry && snapshotDue(cached.state.version, cached.lastSnapshotVersion, snapshotInterval(session))) snapshotInBackground(session, cached, 'auto');
    },
    idempotencyWindowSeconds: options.idempotencyWindowSeconds,
  };

  return {
    roundHost,
    create, get, list, remove, updateSettings, step, view, load, history, latestChange, snapshotNow, listSnapshots: listSnapshotsOf, getSnapshot,
    pinSnapshot, snapshotView, restore, fork, versionRange, close, pruneIdempotency, storage, storageOfMany, sweepExpired,
    /** For tests and metrics: how many sessions and bytes this process holds decoded. */
    cacheStats: () => ({ sessions: cache.size, bytes: cachedBytes }),
    /** Drops this process's decoded copies (tests use it to force a rebuild from snapshot + log). */
    dropCache: () => [...cache.keys()].forEach(forget),
    pendingSnapshots: () => Promise.allSettled([...pendingSnapshots]).then(() => undefined),
  };
}

export type SessionService = ReturnType<typeof createSessionService>;
