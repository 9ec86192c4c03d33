// This process's decoded copies of sessions' state, bounded in bytes (least recently used go first).
// A copy is never ahead of the database: the step code keeps that promise, this file keeps the books.
import type { GroupSpec, ParamSpec, ScalarStateRow } from '../db/schema.ts';
import type { AsgdKernel } from '../optim/types.ts';
import { SessionState, layoutOf } from './state.ts';

export interface CacheEntry {
  state: SessionState;
  /** The newest version this process wrote or loaded a snapshot at (scheduled snapshots go by it). */
  lastSnapshotVersion: number;
  lastUsed: number;
  /**
   * The slot whose scheduled snapshot failed here on a database error (a connection terminated, say): the
   * next step in that slot tries once more, rather than leave the slot without one.
   */
  retrySlot?: number;
  /** The slot last tried again: a second failure in it waits for the next slot. */
  retriedSlot?: number;
}

/**
 * Bytes a cached session is counted for: params, ax and the gradient buffer (float32 each), plus what each
 * parameter costs besides its elements (its name, shape and views: ~440 bytes measured with 100,000
 * one-element parameters) and each session (its memory's first pages, its objects).
 */
const PER_PARAM_BYTES = 512;
const PER_SESSION_BYTES = 64 * 1024;
const bytesOf = (state: SessionState) => state.layout.numel * 12 + state.layout.numels.length * PER_PARAM_BYTES + PER_SESSION_BYTES;

export class StateCache {
  readonly #entries = new Map<number, CacheEntry>();
  readonly #ids = new WeakMap<SessionState, number>();
  /** Session name -> id of the sessions this process has loaded: a hint, checked by the statement that uses it. */
  readonly #hints = new Map<string, number>();
  readonly #kernel: AsgdKernel;
  readonly #budget: number;
  readonly #maxSessions: number;
  #bytes = 0;

  constructor(kernel: AsgdKernel, budgetBytes: number, maxSessions = 4096) {
    this.#kernel = kernel;
    this.#budget = budgetBytes;
    this.#maxSessions = maxSessions;
  }

  /**
   * A new state in a fresh kernel arena, owned by session `session.id` (not cached until remembered). The
   * session's name now hints at this id (byName).
   */
  create(session: { id: number; name: string; params: ParamSpec[] }, version: number, step: number, groups: GroupSpec[], scalars: ScalarStateRow[]): SessionState {
    const layout = layoutOf(session.params);
    const state = new SessionState(layout, this.#kernel.createArena(layout.numel), version, step, groups, scalars);
    this.#ids.set(state, session.id);
    this.#hints.set(session.name, session.id);
    return state;
  }

  /** The session id a state belongs to. */
  idOf(state: SessionState): number {
    return this.#ids.get(state)!;
  }

  get(id: number): CacheEntry | undefined {
    return this.#entries.get(id);
  }

  /** The cached entry of a session by name, when this process has loaded it (the id is a hint: check it). */
  byName(name: string): CacheEntry | undefined {
    const id = this.#hints.get(name);
    return id === undefined ? undefined : this.#entries.get(id);
  }

  hint(name: string, id: number): void {
    this.#hints.set(name, id);
  }

  /** Forgets a session's copy and its name hint (deleted, or created again under the same name elsewhere). */
  forgetName(name: string, id: number): void {
    this.forget(id);
    this.#hints.delete(name);
  }

  touch(entry: CacheEntry): CacheEntry {
    entry.lastUsed = Date.now();
    return entry;
  }

  /**
   * Caches `state` as its session's copy (replacing another), then evicts the least used beyond the byte
   * budget or the session count (never this one).
   */
  remember(state: SessionState, lastSnapshotVersion: number): CacheEntry {
    const id = this.idOf(state);
    const old = this.#entries.get(id);
    if (old && old.state !== state) this.forget(id);
    if (!old || old.state !== state) this.#bytes += bytesOf(state);
    const entry: CacheEntry = { state, lastSnapshotVersion, lastUsed: Date.now() };
    this.#entries.set(id, entry);
    const over = () => this.#bytes > this.#budget || this.#entries.size > this.#maxSessions;
    if (over()) {
      const byAge = [...this.#entries.entries()].sort((a, b) => a[1].lastUsed - b[1].lastUsed);
      for (const [other, e] of byAge) {
        if (!over()) break;
        if (e.state !== state) this.forget(other);
      }
    }
    return entry;
  }

  /** Drops a session's copy and releases its arena. */
  forget(id: number): void {
    const entry = this.#entries.get(id);
    if (!entry) return;
    this.#entries.delete(id);
    this.#bytes -= bytesOf(entry.state);
    entry.state.arena.release();
  }

  /** Forgets the copies of these sessions, and the names that point at them (deleted by another process). */
  forgetIds(ids: ReadonlySet<number>): void {
    for (const id of ids) this.forget(id);
    for (const [name, id] of this.#hints) if (ids.has(id)) this.#hints.delete(name);
  }

  /** The sessions this process holds a copy of or knows a name of, by id. */
  knownIds(): number[] {
    return [...new Set([...this.#entries.keys(), ...this.#hints.values()])];
  }

  entries(): [number, CacheEntry][] {
    return [...this.#entries.entries()];
  }

  clear(): void {
    for (const id of [...this.#entries.keys()]) this.forget(id);
  }

  stats(): { sessions: number; bytes: number } {
    return { sessions: this.#entries.size, bytes: this.#bytes };
  }
}
