// The session domain's facade: route -> here -> kernel and db. It wires the modules, each one job:
//   cache.ts            this process's decoded copies, bounded in bytes
//   history.ts          state at a version: snapshot load and replay of the step log
//   snapshot-writer.ts  writing snapshots (synchronous, scheduled in the background, at shutdown)
//   steps.ts            the step protocols, with the durability model at its top
//   reads.ts            consistent views of the state (current, older versions, snapshots)
//   changes.ts          changes that are not steps: create, delete, load, restore, fork
//   load-plan.ts        checking a state_dict / model against a session before loading
//   snapshots.ts        the snapshot resource
// and answers the reads that need no state here.
import type { FastifyBaseLogger } from 'fastify';
import type { Database } from '../db/database.ts';
import type { DiskRoom } from '../db/disk-room.ts';
import type { AsgdKernel, KernelOptions } from '../optim/types.ts';
import { errors } from '../errors.ts';
import { StateCache } from './cache.ts';
import { createChanges } from './changes.ts';
import { checkIfMatch, mustFind, type RoundHost, type SessionContext, type SessionHooks } from './context.ts';
import { BATCH as EXPIRY_BATCH, sweepIdleSessions, SWEEP_ROUNDS } from './expiry.ts';
import { createHistory } from './history.ts';
import { CountedHolds, KeyedMutex } from './mutex.ts';
import { createReads } from './reads.ts';
import * as repo from './repository.ts';
import { entriesWithin } from './series.ts';
import type { SessionRecord } from './repository.ts';
import { createSnapshotWriter } from './snapshot-writer.ts';
import { createSnapshots } from './snapshots.ts';
import { createSteps } from './steps.ts';
import { assertNoOpenRound, deleteContributions } from './rounds-repository.ts';
import { sessionStorage, storageOfSessions, type SessionStorage } from './storage.ts';

export interface SessionServiceOptions {
  db: Database;
  kernel: AsgdKernel;
  kernelOptions: KernelOptions;
  log: FastifyBaseLogger;
  cacheBytes: number;
  /** ASGD_CACHE_SESSIONS (default 4096). */
  cacheSessions?: number;
  snapshotCopyLimitBytes?: number;
  /** The embedded database's disk guard (src/db/disk-room.ts). */
  diskRoom?: DiskRoom | null;
  /** ASGD_REPLAY_BOUND_BYTES (default 64 MiB; 0: no replay points). */
  replayBoundBytes?: number;
  idempotencyWindowSeconds: number;
  /** How long a step batch may wait for clients about to step again (linger.ts); 0 (the default here): never. */
  stepLingerMs?: number;
  hooks?: SessionHooks;
}

export function createSessionService(options: SessionServiceOptions) {
  const { db, log } = options;
  const ctx: SessionContext = {
    db, kernel: options.kernel, kernelOptions: options.kernelOptions, log, hooks: options.hooks,
    idempotencyWindowSeconds: options.idempotencyWindowSeconds,
    stepLingerMs: options.stepLingerMs ?? 0,
    snapshotCopyLimitBytes: options.snapshotCopyLimitBytes ?? 256 * 1024 * 1024,
    diskRoom: options.diskRoom ?? null,
    replayBoundBytes: options.replayBoundBytes ?? 64 * 1024 * 1024,
    cache: new StateCache(options.kernel, options.cacheBytes, options.cacheSessions ?? 4096),
    mutex: new KeyedMutex(),
  };
  const { cache } = ctx;
  const history = createHistory(ctx);
  const writer = createSnapshotWriter(ctx);
  const reads = createReads(ctx, history);
  const steps = createSteps(ctx, history, writer, reads);
  const changes = createChanges(ctx, history, writer, reads);
  const snapshots = createSnapshots(ctx, history, writer);

  async function updateSettings(
    name: string,
    patch: Partial<Pick<SessionRecord, 'snapshotEvery' | 'keepSnapshots' | 'maxStaleness' | 'keepLogBytes' | 'expireAfterIdleS' | 'aggregation'>>,
    ifMatch: number | null = null,
  ): Promise<SessionRecord> {
    const { before, after } = await db.transaction(async (tx) => {
      const session = await mustFind(tx, name, true);
      checkIfMatch(ifMatch, session.version); // under the row lock
      // A round left open by workers that went away: said how to void it (a review found no way out said).
      if (patch.aggregation !== undefined) {
        await assertNoOpenRound(tx, session, 'aggregation', ', or void it: a restore of a snapshot, or a load of the state (PUT state_dict), makes a new version, at which its contributions no longer count');
        // Contributions of rounds voided at earlier versions (a load, a restore, PUT params) went only when the
        // next contribution came: with aggregation removed, never (a review: up to 1024 gradients kept for good).
        await deleteContributions(tx, session.id, session.version, false);
      }
      return { before: session, after: await repo.updateSessionSettings(tx, session.id, { ...session, ...patch }) };
    });
    // The change moves the row's stamp, not its version: this process's copy, current before it, stays
    // current (else the next step here took it for another history's and caught it up or rebuilt it first).
    const entry = cache.get(before.id);
    if (entry && entry.state.version === before.version && entry.state.stampedAs(before.stamp)) entry.state.rowStamp = after.stamp;
    return after;
  }

  /**
   * The session's parameter names (its layout's index), to bound and check an upload before it is parsed:
   * from this process's copy when it has one, else (`load`: the body is large enough for it to matter) from
   * the database. `id` says which session they are of: a copy may be of a session since deleted and created
   * again under the same name elsewhere, so a refusal made with them is checked against the database.
   */
  async function parameterNames(name: string, load: boolean): Promise<{ id: number; names: ReadonlyMap<string, unknown>; cached: boolean } | null> {
    const entry = cache.byName(name);
    if (entry) return { id: cache.idOf(entry.state), names: entry.state.layout.index, cached: true };
    if (!load) return null;
    const session = await mustFind(db, name);
    return { id: session.id, names: new Map(session.params.map((p, i) => [p.name, i])), cached: false };
  }

  /** The size of a session this process holds decoded (elements, parameters), or null: no lookup is made. */
  function cachedSize(name: string): { numel: number; params: number } | null {
    const entry = cache.byName(name);
    return entry ? { numel: entry.state.layout.numel, params: entry.state.layout.numels.length } : null;
  }

  /** The training series (one point per step) after `afterVersion`, oldest first. */
  async function series(name: string, afterVersion: number, limit: number): Promise<{ session: SessionRecord; points: repo.HistoryPoint[]; more: boolean }> {
    const session = await mustFind(db, name);
    // A point of a step that set hyperparameters lists every group's: a page stays within GROUP_ENTRIES_PER_ANSWER.
    return { session, ...await repo.readHistory(db, session.id, afterVersion, limit, entriesWithin(limit, session.groups.length)) };
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

  /** What the session stores, in bytes as PostgreSQL counts them (storage.ts). */
  async function storage(name: string): Promise<SessionStorage> {
    const session = await mustFind(db, name);
    const figures = await sessionStorage(db, session.id);
    if (!figures) throw errors.sessionNotFound(name);
    return figures;
  }

  /**
   * Deletes the sessions idle beyond their expire_after_idle_s (expiry.ts), EXPIRY_BATCH a transaction, so that
   * a backlog goes in one sweep; their cached copies go too.
   */
  async function sweepExpired(): Promise<string[]> {
    const gone: { id: number; name: string }[] = [];
    for (let round = 0; round < SWEEP_ROUNDS; round++) {
      const batch = await sweepIdleSessions(db, [...heldOpen.keys()]);
      for (const { id, name } of batch) cache.forgetName(name, id);
      gone.push(...batch);
      if (batch.length < EXPIRY_BATCH) break;
    }
    if (gone.length) log.info({ count: gone.length, sessions: gone.slice(0, 20).map((g) => g.name) }, 'expired idle sessions deleted');
    return gone.map((g) => g.name);
  }

  /**
   * Forgets the copies of sessions that are gone from the database: deleted, or expired, by another process
   * (this process forgets its own at once). Each held its state and its WebAssembly memory (V8 reserves
   * some 8 GiB of address space for each) until the cache's bounds evicted it: found by a soak review, two
   * replicas' caches grew by 7-13 copies a minute while the database held 6-9 sessions. Returns how many.
   */
  async function forgetGone(): Promise<number> {
    const known = cache.knownIds();
    if (known.length === 0) return 0;
    const present = new Set((await db.query<{ id: number }>('SELECT id::float8 AS id FROM sessions WHERE id = ANY($1::bigint[])', [known])).map((r) => r.id));
    const gone = new Set(known.filter((id) => !present.has(id)));
    cache.forgetIds(gone);
    return gone.size;
  }

  /** What the rounds of sessions with `aggregation` (rounds.ts) use of the session modules. */
  /** Sessions with contributions waiting here for their round, and how many (RoundHost.holdOpen). */
  const heldOpen = new CountedHolds<string>();
  const roundHost: RoundHost = {
    run: (name, fn) => ctx.mutex.run(name, fn),
    currentState: history.currentStateLocked, // under the row lock, in the round's transaction
    forget: (id) => cache.forget(id),
    withAnswerState: reads.withAnswerState,
    applyStep: (state, present) => state.applyStep(present, ctx.kernel, ctx.kernelOptions),
    async afterStep(session, entry, seconds, lockWaitSeconds) {
      options.hooks?.stepped?.(session.name, seconds, lockWaitSeconds);
      const cached = cache.get(session.id);
      if (cached !== entry) return;
      if (writer.due(session, cached)) await writer.inBackground(session, cached, 'auto');
      else if (writer.pointDue(session, cached, cached.state.version - 1, cached.state.version)) await writer.pointInBackground(session, cached);
    },
    holdOpen: (name) => heldOpen.hold(name),
    idempotencyWindowSeconds: options.idempotencyWindowSeconds,
  };

  return {
    roundHost,
    create: changes.create,
    get: (name: string) => mustFind(db, name),
    parameterNames,
    cachedSize,
    list: (after: string | null, limit: number, only: readonly string[] | null = null, search: string | null = null) => repo.listSessions(db, after, limit, only, search),
    remove: changes.remove,
    updateSettings,
    step: steps.step,
    view: reads.view,
    load: changes.load,
    history: series,
    latestChange,
    snapshotNow: snapshots.snapshotNow,
    listSnapshots: snapshots.list,
    getSnapshot: snapshots.get,
    pinSnapshot: snapshots.pin,
    snapshotView: reads.snapshotView,
    setHyperparameters: changes.setHyperparameters,
    restore: changes.restore,
    fork: changes.fork,
    /** Graceful shutdown: the background snapshots finish, every copy that moved is written, the copies go. */
    close: async () => {
      await writer.shutdown();
      cache.clear();
    },
    pruneIdempotency: () => repo.pruneIdempotencyKeys(db, options.idempotencyWindowSeconds),
    storage,
    /** Several sessions' stored bytes at once (the list's ?storage=true), by session id. */
    storageOfMany: (sessions: SessionRecord[]) => storageOfSessions(db, sessions.map((x) => x.id)),
    sweepExpired,
    forgetGone,
    /** For tests and metrics: how many sessions and bytes this process holds decoded. */
    cacheStats: () => cache.stats(),
    /** Drops this process's decoded copies (tests use it to force a rebuild from snapshot + log). */
    dropCache: () => cache.clear(),
    pendingSnapshots: () => writer.settle(),
  };
}

export type SessionService = ReturnType<typeof createSessionService>;
