// The API's shapes, taken from the generated OpenAPI types (src/generated/openapi.ts, regenerated from
// openapi/openapi.json by `npm run generate`; a test keeps it fresh), plus the few this client adds.
import type { paths } from './generated/openapi.ts';
import type { Tensor, TensorInput, TensorLike } from './tensors.ts';

type JsonOf<T> = T extends { content: { 'application/json': infer J } } ? J : never;
type RequestJson<T> = T extends { requestBody?: infer B } ? JsonOf<NonNullable<B>> : never;
type QueryOf<T> = T extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;

export type Session = JsonOf<paths['/v1/sessions/{name}']['get']['responses'][200]>;
export type SessionList = JsonOf<paths['/v1/sessions']['get']['responses'][200]>;
export type CreateSessionRequest = RequestJson<paths['/v1/sessions']['post']>;
export type PatchSessionRequest = RequestJson<paths['/v1/sessions/{name}']['patch']>;
/** Per group, the hyperparameters that change (PATCH .../param_groups, a step's param_groups). */
export type GroupHyperparameters = RequestJson<paths['/v1/sessions/{name}/param_groups']['patch']>['param_groups'][number];
export type ForkRequest = RequestJson<paths['/v1/sessions/{name}/fork']['post']>;
export type Snapshot = JsonOf<paths['/v1/sessions/{name}/snapshots/{id}']['get']['responses'][200]>;
export type SnapshotList = JsonOf<paths['/v1/sessions/{name}/snapshots']['get']['responses'][200]>;
export type CreateTokenRequest = RequestJson<paths['/v1/tokens']['post']>;
export type CreatedToken = JsonOf<paths['/v1/tokens']['post']['responses'][201]>;
export type TokenList = JsonOf<paths['/v1/tokens']['get']['responses'][200]>;
/** GET /v1/tokens/self: the token of the request ({id, name, scope, sessions, auth}). */
export type OwnToken = JsonOf<paths['/v1/tokens/self']['get']['responses'][200]>;
/** GET /v1/sessions query: {limit, after, search, figures, storage}. */
export type ListSessionsOptions = QueryOf<paths['/v1/sessions']['get']>;
/** GET .../norms: per parameter the L2 norms of its values and of ax, and ASGD's step, eta, mu (non-finite values as "NaN", "Infinity", "-Infinity"). */
export type Norms = JsonOf<paths['/v1/sessions/{name}/norms']['get']['responses'][200]>;
/** GET .../hyperparameters: the steps that changed hyperparameters, and every group's values at the first version. */
export type HyperparameterChanges = JsonOf<paths['/v1/sessions/{name}/hyperparameters']['get']['responses'][200]>;
/** The formats GET .../snapshots/{id}/state_dict answers in ('json' | 'pt' | 'safetensors'). */
export type StateDictFormat = NonNullable<QueryOf<paths['/v1/sessions/{name}/snapshots/{id}/state_dict']['get']>['format']>;
/** The formats GET .../snapshots/{id}/checkpoint answers in ('pt' | 'json': no safetensors). */
export type CheckpointFormat = NonNullable<QueryOf<paths['/v1/sessions/{name}/snapshots/{id}/checkpoint']['get']>['format']>;
export type StepAnswerJson = JsonOf<paths['/v1/sessions/{name}/step']['post']['responses'][200]>;
/** A state_dict as PUT .../state_dict takes it (what torch's state_dict() is, as JSON; the GET answer is one). */
export type StateDictJson = RequestJson<paths['/v1/sessions/{name}/state_dict']['put']>;
/** GET .../state_dict as JSON: {state: {id: {step, eta, mu, ax}}, param_groups: [...]}, typed. */
export type StateDict = JsonOf<paths['/v1/sessions/{name}/state_dict']['get']['responses'][200]>;
/**
 * What a change answers (PATCH .../param_groups, PUT .../params, .../state_dict, .../checkpoint, a restore):
 * the session as it left it, with `replayed: true` when it was a retry of a change (same Idempotency-Key).
 */
export type SessionChange = JsonOf<paths['/v1/sessions/{name}/param_groups']['patch']['responses'][200]>;
export type ParamGroup = Session['param_groups'][number];
export type Hyperparameters = NonNullable<CreateSessionRequest['hyperparameters']>;
/** A session's synchronous rounds: {contributions?, timeout_s?, min_contributions?, target_samples?}. */
export type Aggregation = NonNullable<Session['aggregation']>;

/** A session to create; parameter data may be a Float32Array. */
export type CreateSessionSpec = Omit<CreateSessionRequest, 'params'> & {
  params: ({ name: string } & TensorInput)[];
};

/** Hyperparameters one step may set for a group; they stay the group's values afterwards. */
export type StepParamGroup = Partial<Pick<ParamGroup, 'lr' | 'lambd' | 'alpha' | 't0' | 'weight_decay' | 'maximize'>>;

export type ReturnKind = 'none' | 'params' | 'averaged';

export interface StepOptions {
  /** The version the gradient was computed from (the service's staleness check; required with aggregation). */
  baseVersion?: number;
  /**
   * This worker's id (like session names) in a session with `aggregation`: the step is then a contribution to
   * the open round at `baseVersion`, answered once the round has stepped. Checked and otherwise ignored
   * without aggregation.
   */
  worker?: string;
  /** How many samples the gradient was computed from (an integer >= 1; `aggregation.target_samples` counts them). */
  samples?: number;
  /**
   * Seconds the service holds the request for its round (`?wait=`, 0..3600, fractions too; 0 answers at once;
   * its default is 60) before it answers 202 pending; the client then sends the same request again with the
   * same Idempotency-Key.
   */
  wait?: number;
  /** Give up waiting for the round after this long (RoundPending; the contribution stays). Default: no limit. */
  maxWaitMs?: number;
  /**
   * Whether the service may hold the request for a round (default: when `worker` or `wait` is given). Each
   * attempt's timeout is then `timeoutMs` on top of that hold, and the retry budget starts once it has
   * passed, so a connection lost late in a hold is still retried.
   */
  held?: boolean;
  /** Apply only if the session is at this version (412 VersionMismatch otherwise). */
  ifMatch?: number;
  /** Defaults to a fresh random key, so that a retry never steps twice; pass null to send none. */
  idempotencyKey?: string | null;
  /** Answer with the parameters (or averaged parameters) at the new version: one request per training step. */
  return?: ReturnKind;
  /** One object per session group, in the session's group order. */
  paramGroups?: StepParamGroup[];
  /** Up to 32 finite numbers kept with the step (loss, samples, ...). */
  metrics?: Record<string, number>;
  /** 'safetensors' (default) sends the gradients as a binary file; 'json' as numbers. */
  format?: 'json' | 'safetensors';
  /** Gradient dtype on the wire with safetensors (F16/BF16 halve the bytes; rounded to nearest even). */
  dtype?: 'F32' | 'F16' | 'BF16';
  retryBudgetMs?: number;
  /**
   * Ends the call (its retries, a wait for its round) when aborted: it rejects with the signal's reason. A
   * step whose request went out may have been applied: send it again with its `idempotencyKey` to know
   * (the service applies it once and answers as it answered the first).
   */
  signal?: AbortSignal;
}

export interface StepResult {
  session: string;
  step: number;
  version: number;
  staleness: number;
  /** true when an Idempotency-Key repeat was answered with the first answer. */
  replayed?: boolean;
  /** In a session with aggregation: the round this step closed. */
  round?: RoundAnswer;
  /** With return=params|averaged: the tensors at `version` (at `paramsVersion` when that is given). */
  params?: Record<string, Tensor>;
  /** Only for a replayed step whose version the service no longer keeps: the version of `params` (the current one). */
  paramsVersion?: number;
  /**
   * With return=params|averaged: every group's hyperparameters after the step (as the session's
   * `param_groups`), so a worker learns the lr another worker set. Both formats carry them.
   */
  param_groups?: StepAnswerGroup[];
  /** The Idempotency-Key the step was sent with. */
  idempotencyKey?: string;
  /** Attempts it took (with a round: every request until it stepped). */
  attempts: number;
}

export type Gradients = Record<string, TensorLike>;

/** A group's hyperparameters in a step's answer: {lr, lambd, alpha, t0, weight_decay, maximize}. */
export type StepAnswerGroup = NonNullable<StepAnswerJson['param_groups']>[number];

/** The round a step closed (in a session with aggregation): {version, contributions, samples, timed_out}. */
export type RoundAnswer = NonNullable<StepAnswerJson['round']>;
/** An open round as session answers and 202 pending answers show it: {version, contributions, samples, workers, age_s}. */
export type RoundStatus = NonNullable<Session['round']>;
/** The 202 answer of a contribution whose round is still open. */
export type PendingAnswer = JsonOf<paths['/v1/sessions/{name}/step']['post']['responses'][202]>;

export interface ParamsResult {
  session: string;
  version: number;
  step: number;
  averaged: boolean;
  params: Record<string, Tensor>;
}

export interface ReadOptions {
  /** Read the state at an older version. */
  version?: number;
  format?: 'json' | 'safetensors';
  /** Ends the read (its retries and waits) when aborted: it rejects with the signal's reason. */
  signal?: AbortSignal;
  /** This read's retry budget in milliseconds (default: the client's `retryBudgetMs`). */
  retryBudgetMs?: number;
}

export type MetricsPage = JsonOf<paths['/v1/sessions/{name}/metrics']['get']['responses'][200]>;

export interface MetricsOptions {
  /** Points after this version (poll with the last page's `next_after_version`). */
  afterVersion?: number;
  /** At most this many steps (the service's default 1000); not with `maxPoints`. */
  limit?: number;
  /** The whole series after `afterVersion` in at most this many points: buckets (mean, min, max) when there are more steps (`downsampled`). */
  maxPoints?: number;
}
export type MetricPoint = MetricsPage['points'][number];

export interface HyperparameterChangesOptions {
  /** Changes after this version (poll with the last page's `next_after_version`). */
  afterVersion?: number;
  /** At most this many changes (the service's default 1000); not with `maxPoints`. */
  limit?: number;
  /**
   * The whole history after `afterVersion` in one answer: every change when there are at most this many, else
   * (`downsampled`) the changes fitted to the buckets of `metrics(name, {maxPoints})`; `total_changes` counts them all.
   */
  maxPoints?: number;
}

/** One event of GET .../events: a new version (`kind` "step" with its staleness and metrics, or "load", "restore", "create", …). */
export interface VersionEvent {
  event: 'version';
  version: number;
  step: number;
  /** When the version was committed (ISO 8601). */
  time: string;
  kind: string;
  staleness?: number;
  metrics?: Record<string, number>;
}

/** The session was deleted: the last event of the stream. */
export interface DeletedEvent {
  event: 'deleted';
  session: string;
  /**
   * true when another session of this name was created after the one followed was deleted (another
   * session: none of its versions were yielded as this one's); absent otherwise.
   */
  replaced?: boolean;
}

export type SessionEvent = VersionEvent | DeletedEvent;

export interface EventsOptions {
  /** The version you have: a newer one is sent at once (default: the session's current version, so only later ones come). */
  afterVersion?: number;
  /** Ends the stream (the iterator returns). */
  signal?: AbortSignal;
  /**
   * Silence (no event, no keep-alive, no answer to the request) after which the connection counts as dropped
   * and is opened again, resuming after the last version received, within the retry budget. The service
   * sends a keep-alive every 15 s; default 35 000 (two missed ones). `Infinity`: wait forever.
   */
  idleTimeoutMs?: number;
}
