// The session domain's types: the shapes it answers with that the HTTP layer documents as they are (one
// definition, a TypeBox schema for validation and the OpenAPI document, with its static type), and the
// inputs and views the routes and the session modules share.
import { Type, type Static } from 'typebox';
import type { Aggregation, GroupSpec, ParamSpec, ScalarStateRow } from '../db/schema.ts';
import type { Layout } from './state.ts';

export const StepAnswer = Type.Object({
  session: Type.String(),
  step: Type.Integer({ description: 'optimizer.step() calls applied' }),
  version: Type.Integer({ description: 'The session version after this step (also the ETag)' }),
  staleness: Type.Integer({ description: 'Versions between the gradient\'s base_version and the version it was applied to' }),
  replayed: Type.Optional(Type.Boolean({ description: 'true when an Idempotency-Key retry returned the original answer' })),
  round: Type.Optional(Type.Object({
    version: Type.Integer({ description: 'The version the round\'s contributions were computed at (the step made version + 1)' }),
    contributions: Type.Integer({ description: 'Contributions the round\'s step combined' }),
    samples: Type.Union([Type.Integer(), Type.Null()], { description: 'Their samples added up; null when none reported any' }),
    timed_out: Type.Boolean({ description: 'true when the round stepped at its timeout with fewer than aggregation.contributions' }),
  }, { description: 'In a session with aggregation: the round this contribution was part of' })),
}, { title: 'StepAnswer', examples: [{ session: 'mnist-run-1', step: 42, version: 43, staleness: 0 }] });
export type StepAnswer = Static<typeof StepAnswer>;

// ---- domain types the routes and the session modules share -----------------------------------------


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

/** A model's parameters to load (load_checkpoint), by name. */
export type LoadedParams = Map<string, { shape: number[] | null; data: Float32Array }>;

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

/** Where a step's base_version was given: the query, the JSON body, or a safetensors body's __metadata__. */
export type BaseVersionFrom = 'query' | 'body' | '__metadata__';

export interface StepOptions {
  ifMatch?: number | null;
  idempotencyKey?: string | null;
  requestHash?: string;
  /**
   * The hashes earlier releases took of this request (a JSON step's), computed when a key's recorded hash is
   * not requestHash: an answer recorded before an upgrade (or by an older replica in a rolling one) still
   * answers its retry.
   */
  olderRequestHashes?: () => string[];
  baseVersion?: number | null;
  /** Where base_version came from: its 409 BASE_VERSION_AHEAD when it is newer than the session names it there. */
  baseVersionFrom?: BaseVersionFrom;
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
  /**
   * Who sends the step, the same across its steps: batches may wait for clients that step back to back
   * (linger.ts). The worker id when the request names one (a pipelined RemoteASGD sends its steps over two
   * connections), else the connection.
   */
  client?: object | string;
}

/** Whether a key's recorded hash is this request's: its hash now, or one an earlier release took (StepOptions.olderRequestHashes). */
export function sameRequest(recorded: string | null, hash: string | null, opts: StepOptions): boolean {
  return recorded === hash || (recorded !== null && (opts.olderRequestHashes?.().includes(recorded) ?? false));
}
