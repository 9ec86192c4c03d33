// A session's decoded state at one version: parameters, ASGD state, hyperparameters, in kernel memory.
import { createHash } from 'node:crypto';
import type { GroupSpec, ParamSpec, ScalarStateRow } from '../db/schema.ts';
import { initialState } from '../optim/asgd.ts';
import type { AsgdHyperparameters, AsgdKernel, AsgdScalarState, KernelArena, KernelOptions } from '../optim/types.ts';
import { copyInSlices, hashInSlices } from './slices.ts';
import { groupIndexOf, kernelHyperparameters, numelOf } from './spec.ts';

export interface Layout {
  readonly params: readonly ParamSpec[];
  readonly offsets: readonly number[];
  readonly numels: readonly number[];
  readonly numel: number;
  readonly index: ReadonlyMap<string, number>;
}

export function layoutOf(params: readonly ParamSpec[]): Layout {
  const offsets: number[] = [];
  const numels: number[] = [];
  let numel = 0;
  for (const p of params) {
    offsets.push(numel);
    const n = numelOf(p.shape);
    numels.push(n);
    numel += n;
  }
  return { params, offsets, numels, numel, index: new Map(params.map((p, i) => [p.name, i])) };
}

export class SessionState {
  readonly layout: Layout;
  readonly arena: KernelArena;
  version: number;
  /**
   * The stamp of the commit that made `version` (SessionRecord.stamp), when this is a process's copy of the
   * session's current state; null while unknown (a copy with no stamp is not trusted: repo.ofHistory).
   */
  stamp: string | null = null;
  /** A later stamp of the session row at this same version (a settings change moves it), checked once against the history. */
  rowStamp: string | null = null;

  /** Whether the session row's stamp is one this copy is known to match (no database read). */
  stampedAs(stamp: string): boolean {
    return this.stamp === stamp || this.rowStamp === stamp;
  }

  /**
   * The stamps this copy is known by, for repo.ofHistory: its own and the row's later one (a copy rebuilt
   * after a settings change is stamped with that change's stamp, which the next change moves: the row's
   * stamp then is the one that still shows the copy is of the history; found by a review: a manual
   * snapshot answered 503 until the next step).
   */
  stamps(): string[] {
    return [this.stamp, this.rowStamp].filter((s): s is string => s !== null);
  }

  /** The copy now holds the version the session row stamped `stamp` holds. */
  setStamp(stamp: string | null): void {
    this.stamp = stamp;
    this.rowStamp = null;
  }
  step: number;
  private groupsValue!: GroupSpec[];
  private groupOf!: Int32Array;
  private hyper!: AsgdHyperparameters[];
  /** Per parameter: ASGD's step/eta/mu, or null before its first step (PyTorch creates state lazily). */
  scalars: (AsgdScalarState | null)[];

  constructor(layout: Layout, arena: KernelArena, version: number, step: number, groups: GroupSpec[], scalars: ScalarStateRow[]) {
    this.layout = layout;
    this.arena = arena;
    this.version = version;
    this.step = step;
    this.groups = groups;
    this.scalars = scalars.map((s) => (s ? { ...s } : null));
  }

  get groups(): GroupSpec[] {
    return this.groupsValue;
  }

  set groups(groups: GroupSpec[]) {
    this.groupsValue = groups;
    this.groupOf = groupIndexOf(groups, this.layout.params.length);
    this.hyper = groups.map(kernelHyperparameters);
  }

  get byteSize(): number {
    return this.layout.numel * 8;
  }

  param(i: number): Float32Array {
    return this.arena.params.subarray(this.layout.offsets[i], this.layout.offsets[i] + this.layout.numels[i]);
  }

  ax(i: number): Float32Array {
    return this.arena.ax.subarray(this.layout.offsets[i], this.layout.offsets[i] + this.layout.numels[i]);
  }

  grad(i: number): Float32Array {
    return this.arena.grads.subarray(this.layout.offsets[i], this.layout.offsets[i] + this.layout.numels[i]);
  }

  /**
   * One optimizer.step(): the parameters in `present` (ascending indices) have their gradients in
   * arena.grads; the others have none and are skipped, as PyTorch skips `p.grad is None`.
   */
  applyStep(present: readonly number[], kernel: AsgdKernel, options: KernelOptions): void {
    for (const i of present) {
      const group = this.groupOf[i];
      let state = this.scalars[i];
      if (state === null) {
        // torch/optim/asgd.py: state is created at a parameter's first step with a gradient.
        state = initialState(this.groupsValue[group].lr) as AsgdScalarState;
        this.scalars[i] = state;
        this.ax(i).fill(0);
      }
      kernel.step(this.param(i), this.grad(i), this.ax(i), state, this.hyper[group], options);
    }
    this.step += 1;
    this.version += 1;
  }

  scalarRows(): ScalarStateRow[] {
    return this.scalars.map((s) => (s ? { step: s.step, eta: s.eta, mu: s.mu } : null));
  }

  /** Params and ax as they are in the arena (no copy): valid until the state next changes. */
  tensorViews(): Buffer[] {
    const { params, ax } = this.arena;
    return [Buffer.from(params.buffer, params.byteOffset, params.byteLength), Buffer.from(ax.buffer, ax.byteOffset, ax.byteLength)];
  }

  /**
   * Params then ax as bytes, copied a slice at a time (the copy is what a background snapshot writes while
   * stepping goes on): the caller holds the session's lock until it is done.
   */
  async tensorBytes(): Promise<Buffer> {
    const n = this.layout.numel;
    const out = Buffer.allocUnsafe(n * 8);
    const view = new Float32Array(out.buffer, out.byteOffset, n * 2);
    await copyInSlices(view, this.arena.params, 0);
    await copyInSlices(view, this.arena.ax, n);
    return out;
  }

  /** Loads params and ax from snapshot bytes (params then ax). */
  loadTensorBytes(bytes: Buffer): void {
    const n = this.layout.numel;
    if (bytes.byteLength !== n * 8) throw new Error(`snapshot holds ${bytes.byteLength} bytes, expected ${n * 8}`);
    const aligned = bytes.byteOffset % 4 === 0 ? bytes : Buffer.from(bytes);
    const view = new Float32Array(aligned.buffer, aligned.byteOffset, n * 2);
    this.arena.params.set(view.subarray(0, n));
    this.arena.ax.set(view.subarray(n));
  }
}

/**
 * JSON with object keys sorted at every level (jsonb does not keep key order; a request's hash is the same
 * however its keys were ordered). `negativeZero`: -0 is written `-0` (a request's hash: a tensor's -0.0 and 0
 * are other float32 values, found by a hostile review), not as JSON.stringify's 0 (snapshot checksums keep
 * that form). A list of numbers (a gradient's data) is written at once, as JSON.stringify does.
 */
export function canonicalJson(value: unknown, negativeZero = false): string {
  if (Array.isArray(value)) {
    if (typeof value[0] === 'number' && !(negativeZero && hasNegativeZero(value))) return JSON.stringify(value);
    return `[${value.map((v) => canonicalJson(v === undefined ? null : v, negativeZero)).join(',')}]`;
  }
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v, negativeZero)}`).join(',')}}`;
  }
  return negativeZero && Object.is(value, -0) ? '-0' : (JSON.stringify(value) ?? 'null');
}

/** Whether a list holds -0 (a plain loop: a gradient of 1e7 elements, many of them 0, is scanned in ~10 ms). */
function hasNegativeZero(values: unknown[]): boolean {
  for (let i = 0; i < values.length; i++) if (values[i] === 0 && Object.is(values[i], -0)) return true;
  return false;
}

/** Whether a parsed JSON value holds -0 anywhere. */
export function holdsNegativeZero(value: unknown): boolean {
  if (Array.isArray(value)) return typeof value[0] === 'number' ? hasNegativeZero(value) : value.some(holdsNegativeZero);
  if (value !== null && typeof value === 'object') return Object.values(value).some(holdsNegativeZero);
  return Object.is(value, -0);
}

/**
 * A snapshot's checksum: sha256 over the tensor bytes, fed in order (`update`, a chunk at a time: a load
 * hashes each chunk as it arrives), then the canonical JSON of groups and scalar state (`digest`).
 */
export class SnapshotHash {
  readonly #hash = createHash('sha256');

  update(chunk: Uint8Array): void {
    this.#hash.update(chunk);
  }

  /** Hashes `chunks` in order, letting other work run between slices (a model's tensors take 0.1-0.2 s a GB). */
  async updateAll(chunks: readonly Uint8Array[]): Promise<void> {
    for (const [i, chunk] of chunks.entries()) await hashInSlices(this.#hash, chunk, i === 0);
  }

  digest(groups: GroupSpec[], scalars: ScalarStateRow[]): string {
    this.#hash.update(canonicalJson({ groups, scalars }));
    return this.#hash.digest('hex');
  }
}

/** The checksum of a snapshot's tensor bytes (`chunks`, in order) with its groups and scalar state. */
export async function snapshotChecksum(chunks: readonly Uint8Array[], groups: GroupSpec[], scalars: ScalarStateRow[]): Promise<string> {
  const hash = new SnapshotHash();
  await hash.updateAll(chunks);
  return hash.digest(groups, scalars);
}
