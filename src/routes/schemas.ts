// JSON Schemas of the API (TypeBox): validation of every request part and the OpenAPI document's shared
// components. A schema with a `title` becomes components.schemas.<title> and is referenced by $ref
// (src/plugins/swagger.ts). Tensor data is not validated element by element here (a gradient can hold
// millions of numbers): the domain reads it once, naming the element at fault.
import { Type, type TSchema } from 'typebox';
import type { ErrorCode } from '../errors.ts';
import { ASGD_DEFAULTS } from '../optim/types.ts';
import { MAX_ROUND_CONTRIBUTIONS, MAX_ROUND_TIMEOUT_S } from '../sessions/aggregation.ts';
import { SESSION_NAME_RULE, SESSION_NAME_SOURCE, SETTING_LIMITS } from '../sessions/spec.ts';
import { StepAnswer } from '../sessions/model.ts';

/** Session settings are int4 columns; these bounds keep them there (and sane). */
export { SETTING_LIMITS };

export { StepAnswer };

/** A field whose failures carry a more specific code than the request part's (src/plugins/errors.ts). */
export const withCode = <T extends TSchema>(schema: T, code: ErrorCode): T => ({ ...schema, 'x-error-code': code });

// ---- path parameters: a malformed one is INVALID_PATH on every route -------------------------------------
export const SessionName = Type.String({ pattern: `^${SESSION_NAME_SOURCE}$`, 'x-rule': SESSION_NAME_RULE, description: `Session name: ${SESSION_NAME_RULE}`, examples: ['mnist-run-1'] });
/** A session name in a body that names a new session: INVALID_NAME, as the domain says. */
export const NewSessionName = withCode(SessionName, 'INVALID_NAME');
export const NameParams = Type.Object({ name: SessionName });
export const SnapshotParams = Type.Object({ name: SessionName, id: Type.String({ pattern: '^[1-9][0-9]{0,14}$', 'x-rule': 'a snapshot id: a whole number from 1, of at most 15 digits, written in decimal (no leading zero)', description: 'Snapshot id', examples: ['3'] }) });

// ---- headers and query parameters shared by several routes -----------------------------------------------
const IfMatch = Type.String({ maxLength: 1024, description: 'Apply only at this version: "<version>", compared strongly (a weak W/"<version>" never matches; * matches any); 412 VERSION_MISMATCH otherwise', examples: ['"42"'] });
export const IfMatchHeaders = Type.Object({ 'if-match': Type.Optional(IfMatch) });
export const StepHeaders = Type.Object({
  'if-match': Type.Optional(IfMatch),
  'idempotency-key': Type.Optional(Type.String({ pattern: '^[\\x21-\\x7e]{1,255}$', 'x-rule': '1-255 visible ASCII characters', description: 'A retry with the same key returns the first answer and does not step twice' })),
});
/** Headers of a change that is not a step: a version condition and a key that makes a retry safe. */
export const ChangeHeaders = Type.Object({
  'if-match': Type.Optional(IfMatch),
  'idempotency-key': Type.Optional(Type.String({
    pattern: '^[\\x21-\\x7e]{1,255}$', 'x-rule': '1-255 visible ASCII characters',
    description: 'A retry with the same key and request gets the first answer (replayed: true) and does not make the change again over what came after it',
  })),
});
export const Version = Type.String({ pattern: '^[1-9][0-9]{0,14}$', 'x-rule': 'a whole number from 1, of at most 15 digits, written in decimal', description: 'Read the state at this version (rebuilt from a snapshot and the step log)' });

// ---- tensors and hyperparameters ---------------------------------------------------------------------------
const DATA_DESCRIPTION = 'Flat row-major float32 values; "NaN", "Infinity", "-Infinity" for non-finite values';
const TensorData = Type.Array(Type.Union([Type.Number(), Type.String()]), { description: DATA_DESCRIPTION });
export const Tensor = Type.Object({
  shape: Type.Array(Type.Integer({ minimum: 0 }), { description: 'Dimensions, row-major' }),
  data: TensorData,
}, { title: 'Tensor', description: 'A float32 tensor', examples: [{ shape: [2], data: [0.5, -1.25] }] });
/** A tensor in a request: structure checked here, shape and values by the domain (INVALID_TENSOR, …). */
export const TensorIn = Type.Object({
  shape: withCode(Type.Array(Type.Unknown(), { description: 'Dimensions, row-major' }), 'INVALID_TENSOR'),
  data: withCode(Type.Array(Type.Unknown(), { description: DATA_DESCRIPTION }), 'INVALID_TENSOR'),
  dtype: Type.Optional(withCode(Type.String({ description: 'float32 (the default and only one)' }), 'INVALID_TENSOR')),
}, { description: 'A float32 tensor {"shape", "data"}' });

const hyper = (description: string, value: TSchema) => Type.Optional(withCode({ ...value, description }, 'INVALID_HYPERPARAMETER'));
const flag = (key: string) => Type.Optional(withCode(Type.Unknown({ description: `Accepted as PyTorch writes it (null or false): the service computes the single-tensor CPU path; ${key}=true is refused` }), 'INVALID_HYPERPARAMETER'));
const foreachFlag = Type.Optional(withCode(Type.Unknown({ description: 'true, false or null (PyTorch\'s None), kept for the state_dict; the step is the single-tensor CPU path\'s whatever its value (torch 2.x\'s foreach=True path differs in the last bits: README)' }), 'INVALID_HYPERPARAMETER'));
/** The hyperparameter fields: types checked here, ranges by the domain as torch.optim.ASGD checks them (its messages). */
const HyperparameterFields = {
  lr: hyper(`Learning rate (default ${ASGD_DEFAULTS.lr})`, Type.Number()),
  lambd: hyper(`Decay term (default ${ASGD_DEFAULTS.lambd})`, Type.Number()),
  alpha: hyper(`Power for eta update (default ${ASGD_DEFAULTS.alpha})`, Type.Number()),
  t0: hyper(`Point at which to start averaging (default ${ASGD_DEFAULTS.t0})`, Type.Number()),
  weight_decay: hyper(`L2 penalty (default ${ASGD_DEFAULTS.weightDecay})`, Type.Number()),
  maximize: hyper(`Maximize the objective (default ${ASGD_DEFAULTS.maximize})`, Type.Boolean()),
  foreach: foreachFlag,
  differentiable: flag('differentiable'),
  capturable: flag('capturable'),
};
export const Hyperparameters = withCode(Type.Object(HyperparameterFields, {
  title: 'Hyperparameters', description: 'torch.optim.ASGD hyperparameters', additionalProperties: false, examples: [{ lr: 0.01, t0: 100 }],
}), 'INVALID_HYPERPARAMETER');
/** A param group of a create request: parameter names and the hyperparameters that differ from the defaults. */
export const ParamGroupIn = withCode(Type.Object({
  params: Type.Array(Type.String(), { minItems: 1, description: 'Names of the group\'s parameters' }),
  param_names: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 1024 }), {
    description: 'As torch (2.6 on) keeps them for an optimizer made from model.named_parameters(): one name for each of `params`, served back in the state_dict',
  })),
  ...HyperparameterFields,
}, { additionalProperties: false }), 'INVALID_PARAM_GROUPS');

export const ParamGroup = Type.Object({
  lr: Type.Number(), lambd: Type.Number(), alpha: Type.Number(), t0: Type.Number(), weight_decay: Type.Number(),
  foreach: Type.Union([Type.Boolean(), Type.Null()]), maximize: Type.Boolean(), differentiable: Type.Boolean(), capturable: Type.Boolean(),
  params: Type.Array(Type.Integer(), { description: 'Indices of the group\'s parameters, in session order' }),
  param_names: Type.Optional(Type.Array(Type.String(), { description: 'As torch (2.6 on) keeps them for an optimizer made from model.named_parameters(): one name for each of `params`; present when the session was given them' })),
}, { title: 'ParamGroup', additionalProperties: true, description: 'A param group as torch.optim.ASGD.state_dict() writes it' });

// ---- sessions and snapshots ---------------------------------------------------------------------------------
export const SessionSettings = {
  snapshot_every: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.snapshot_every, description: 'Write a snapshot every this many versions' })),
  keep_snapshots: Type.Optional(Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_snapshots, description: 'Unpinned snapshots kept' })),
  max_staleness: Type.Optional(Type.Union([Type.Integer({ minimum: 0, maximum: SETTING_LIMITS.max_staleness }), Type.Null()], { description: 'Refuse gradients more than this many versions old (null: any)' })),
  keep_log_bytes: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.keep_log_bytes }), Type.Null()], {
    description: 'Byte bound on the step log: a snapshot is taken and older log dropped to stay under it (null: no bound)',
  })),
  expire_after_idle_s: Type.Optional(Type.Union([Type.Integer({ minimum: 1, maximum: SETTING_LIMITS.expire_after_idle_s }), Type.Null()], {
    description: 'Delete the session after this many seconds without a step or a write; reads do not count (null: never)',
  })),
};

/** Synchronous rounds: types and ranges here, the rules between the keys in src/sessions/aggregation.ts. */
export const Aggregation = Type.Object({
  contributions: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_ROUND_CONTRIBUTIONS, description: 'A round steps once this many workers contributed (K)' })),
  timeout_s: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: MAX_ROUND_TIMEOUT_S, description: 'Above 0. After this many seconds from its first contribution a round steps with what it has, if at least min_contributions' })),
  min_contributions: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_ROUND_CONTRIBUTIONS, description: 'With timeout_s: the fewest contributions a round steps with (1..K; default K)' })),
  target_samples: Type.Optional(Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER, description: 'A round steps once its contributions\' samples add up to this (each contribution then needs samples)' })),
}, {
  title: 'Aggregation',
  additionalProperties: false,
  description: 'Synchronous rounds: a step request is a contribution (worker, base_version); a round\'s mean gradient is one step. Needs contributions or target_samples.',
  examples: [{ contributions: 3, timeout_s: 30, min_contributions: 2 }],
});

/** The open round of a session with aggregation. */
export const RoundStatus = Type.Object({
  version: Type.Integer({ description: 'The version the round\'s contributions were computed at (the session\'s version)' }),
  contributions: Type.Integer(),
  samples: Type.Union([Type.Integer(), Type.Null()], { description: 'The contributions\' samples added up; null when none reported any' }),
  workers: Type.Array(Type.String(), { description: 'Worker ids that contributed, ascending (byte order)' }),
  age_s: Type.Number({ description: 'Seconds since the round\'s first contribution' }),
}, { title: 'Round', description: 'The open round: contributions at the session\'s version so far' });

export const SessionStorage = Type.Object({
  log_bytes: Type.Integer({ description: 'The step log (gradients), as PostgreSQL stores it' }),
  log_steps: Type.Integer({ description: 'Steps in the log' }),
  snapshot_bytes: Type.Integer({ description: 'Snapshots with their tensor chunks' }),
  snapshots: Type.Integer(),
  replay_point_bytes: Type.Integer({ description: 'The replay point (an unlogged copy of a recent state that bounds what a process taking the session over replays; ASGD_REPLAY_BOUND_BYTES)' }),
  other_bytes: Type.Integer({ description: 'The session row, Idempotency-Key answers, per-step history, an open round\'s contributions' }),
  total_bytes: Type.Integer(),
}, { title: 'SessionStorage', description: 'Bytes the session stores: the sum of pg_column_size over its rows plus 24 bytes a row (GET of one session, and the list with ?storage=true)' });

export const Session = Type.Object({
  name: Type.String(),
  version: Type.Integer({ description: 'Bumped by every change (step, load, restore); also the ETag' }),
  step: Type.Integer({ description: 'optimizer.step() calls applied' }),
  numel: Type.Integer(),
  params: Type.Array(Type.Object({ name: Type.String(), shape: Type.Array(Type.Integer()), numel: Type.Integer() })),
  param_groups: Type.Array(ParamGroup),
  int_hyperparameters: Type.Array(Type.Array(Type.String()), {
    description: 'For each group, its hyperparameters that are Python ints, as torch keeps them (t0=10 stays an int; weight_decay=0 is torch\'s int default); the others are floats, which JSON writes alike when whole (10.0 as 10). A state_dict\'s JSON writes each number in its kind',
  }),
  snapshot_every: Type.Integer(),
  keep_snapshots: Type.Integer(),
  max_staleness: Type.Union([Type.Integer(), Type.Null()]),
  keep_log_bytes: Type.Union([Type.Integer(), Type.Null()], { description: 'Byte bound on the step log; null: none (keep_snapshots still bounds it)' }),
  expire_after_idle_s: Type.Union([Type.Integer(), Type.Null()], { description: 'Deleted after this many seconds without a step or a write; null: never' }),
  aggregation: Type.Union([Aggregation, Type.Null()], { description: 'Synchronous rounds; null: every step request is its own step' }),
  round: Type.Union([RoundStatus, Type.Null()], { description: 'The open round (contributions at the current version); null when none' }),
  created_at: Type.String({ format: 'date-time' }),
  updated_at: Type.String({ format: 'date-time' }),
  storage: Type.Optional(SessionStorage),
}, { title: 'Session' });

/** The answer of a change a retry with its Idempotency-Key answers again (a load, a restore, PATCH param_groups). */
export const SessionChange = Type.Object({
  ...Session.properties,
  replayed: Type.Optional(Type.Boolean({ description: 'true when a change sent again with its Idempotency-Key got the first answer (the session as that change left it; nothing was done again)' })),
}, { title: 'SessionChange', description: 'The session as the change left it' });

export const Snapshot = Type.Object({
  id: Type.Integer(), version: Type.Integer(), step: Type.Integer(),
  reason: Type.String({ description: 'What wrote it: create, fork, step (every snapshot_every versions, or the step log\'s byte bound), manual (POST …/snapshots), hyperparameters (PATCH …/param_groups), load_state_dict, load_checkpoint, load_params (the PUTs), restore, shutdown' }),
  pinned: Type.Boolean(),
  byte_size: Type.Integer(), checksum: Type.String({ description: 'sha256:<hex> of the snapshot\'s bytes' }), created_at: Type.String({ format: 'date-time' }),
}, { title: 'Snapshot' });

// ---- state: parameters, state_dict, checkpoint (JSON forms) --------------------------------------------------
export const NamedTensors = Type.Record(Type.String(), Tensor, { title: 'NamedTensors', description: 'Tensors by parameter name (a model state_dict)' });
export const Params = Type.Object({
  session: Type.String(), version: Type.Integer(), step: Type.Integer(), averaged: Type.Boolean({ description: 'true: ASGD\'s averages (ax)' }),
  params: NamedTensors,
}, { title: 'Params' });
export const StateDict = Type.Object({
  state: Type.Record(Type.String(), Type.Object({
    step: Type.Union([Type.Number(), Type.String()]), eta: Type.Union([Type.Number(), Type.String()]), mu: Type.Union([Type.Number(), Type.String()]), ax: Tensor,
  }), { description: 'Per-parameter state by parameter index (absent for a parameter that never stepped)' }),
  param_groups: Type.Array(ParamGroup),
}, { title: 'StateDict', description: 'torch.optim.ASGD.state_dict() as JSON' });
export const Checkpoint = Type.Object({ model: NamedTensors, optimizer: StateDict, step: Type.Integer({ minimum: 0 }) }, { title: 'Checkpoint' });

/**
 * What a step (or PATCH .../param_groups) sets in one group: only the keys that change. The faults carry the
 * codes a create request's groups answer for the same fault (hyper: a value of the wrong type
 * INVALID_HYPERPARAMETER; ranges by the domain), a group that is not an object (and, from the domain, an
 * unknown key or a wrong count) INVALID_PARAM_GROUPS.
 */
const GroupHyperparameters = withCode(Type.Object({
  lr: hyper('The group\'s learning rate from this step on', Type.Number()),
  lambd: hyper('Its decay term', Type.Number()),
  alpha: hyper('Its power for the eta update', Type.Number()),
  t0: hyper('Its point at which to start averaging', Type.Number()),
  weight_decay: hyper('Its L2 penalty', Type.Number()),
  maximize: hyper('Whether it maximizes the objective', Type.Boolean()),
  foreach: hyper('torch\'s flag, kept in the group as given (the step is the single-tensor path whatever it says)', Type.Union([Type.Boolean(), Type.Null()])),
  differentiable: hyper('torch\'s flag: false or null (the service has no differentiable step)', Type.Union([Type.Boolean(), Type.Null()])),
  capturable: hyper('torch\'s flag: false or null (the service has no CUDA-graph step)', Type.Union([Type.Boolean(), Type.Null()])),
}, { description: 'Hyperparameters of one group for this step and after it (only the keys that change are needed; any other key is refused)' }), 'INVALID_PARAM_GROUPS');
/** The `param_groups` of a step or of PATCH .../param_groups: one object per session group. */
export const GroupChanges = (description: string, options: { minItems?: number } = {}) =>
  withCode(Type.Array(GroupHyperparameters, { ...options, description }), 'INVALID_PARAM_GROUPS');

// ---- errors -------------------------------------------------------------------------------------------------
export const ErrorBody = Type.Object(
  { statusCode: Type.Integer(), code: Type.String({ description: 'Stable; the codes each status can carry are listed with the response' }), error: Type.String(), message: Type.String({ description: 'Starts with the field at fault' }) },
  { title: 'Error', additionalProperties: true, description: 'Every error: a stable code and a message that names the field', examples: [{ statusCode: 404, code: 'SESSION_NOT_FOUND', error: 'Not Found', message: 'session "nope" does not exist' }] },
);

/** 304: the client's copy (If-None-Match, or after_version when no newer one came) is current; ETag names the version. */
export const NotModified = Type.Null({ description: 'Not modified: the version in the ETag is the one you have' });
/** If-None-Match: "<version>" on a read: 304 while the session is at that version. */
const IfNoneMatchHeaders = Type.Object({ 'if-none-match': Type.Optional(Type.String({ maxLength: 1024, description: '"<version>": 304 while the session is at that version' })) });
/** A read's conditions: If-None-Match as above; If-Match: "<version>": 412 unless the version read is that one. */
export const ConditionalReadHeaders = Type.Object({
  ...IfNoneMatchHeaders.properties,
  'if-match': Type.Optional(Type.String({ maxLength: 1024, description: '"<version>": answer only if the version read is this one (where the route takes ?version=, the version asked for), else 412 VERSION_MISMATCH' })),
});

export const errorResponses = (...codes: number[]) => Object.fromEntries(codes.map((c) => [c, ErrorBody]));

/** A binary body or answer (a file) in the OpenAPI document. */
export const Binary = Type.String({ format: 'binary' });
