// JSON Schemas shared by the routes, for validation of small inputs and for the OpenAPI document.
// Tensor data is not validated element by element here (a gradient can hold millions of numbers): the
// domain reads it once, naming the element at fault.
import { Type } from 'typebox';

export const SessionName = Type.String({ pattern: '^[A-Za-z0-9._-]{1,128}$', description: 'Session name: 1-128 of A-Za-z0-9._-' });
export const NameParams = Type.Object({ name: SessionName });
export const SnapshotParams = Type.Object({ name: SessionName, id: Type.String({ pattern: '^[0-9]{1,15}$', description: 'Snapshot id' }) });

export const Tensor = Type.Object(
  {
    shape: Type.Array(Type.Integer({ minimum: 0 }), { description: 'Dimensions, row-major' }),
    data: Type.Array(Type.Union([Type.Number(), Type.String()]), { description: 'Flat row-major float32 values; "NaN", "Infinity", "-Infinity" for non-finite values' }),
  },
  { description: 'A float32 tensor', examples: [{ shape: [2], data: [0.5, -1.25] }] },
);

export const Hyperparameters = Type.Object(
  {
    lr: Type.Optional(Type.Number({ minimum: 0, default: 0.01 })),
    lambd: Type.Optional(Type.Number({ minimum: 0, default: 1e-4 })),
    alpha: Type.Optional(Type.Number({ minimum: 0, default: 0.75 })),
    t0: Type.Optional(Type.Number({ default: 1e6 })),
    weight_decay: Type.Optional(Type.Number({ minimum: 0, default: 0 })),
    maximize: Type.Optional(Type.Boolean({ default: false })),
  },
  { description: 'torch.optim.ASGD hyperparameters' },
);

export const ParamGroupOut = Type.Object({
  lr: Type.Number(), lambd: Type.Number(), alpha: Type.Number(), t0: Type.Number(), weight_decay: Type.Number(),
  foreach: Type.Null(), maximize: Type.Boolean(), differentiable: Type.Boolean(), capturable: Type.Boolean(),
  params: Type.Array(Type.Integer()),
}, { additionalProperties: true });

export const SessionStorage = Type.Object({
  log_bytes: Type.Integer({ description: 'The step log (gradients), as PostgreSQL stores it' }),
  log_steps: Type.Integer({ description: 'Steps in the log' }),
  snapshot_bytes: Type.Integer({ description: 'Snapshots with their tensor chunks' }),
  snapshots: Type.Integer(),
  other_bytes: Type.Integer({ description: 'The session row, Idempotency-Key answers, per-step history' }),
  total_bytes: Type.Integer(),
}, { description: 'Bytes the session stores: the sum of pg_column_size over its rows plus 24 bytes a row (GET of one session, and the list with ?storage=true)' });

export const Session = Type.Object({
  name: Type.String(),
  version: Type.Integer({ description: 'Bumped by every change (step, load, restore); also the ETag' }),
  step: Type.Integer({ description: 'optimizer.step() calls applied' }),
  numel: Type.Integer(),
  params: Type.Array(Type.Object({ name: Type.String(), shape: Type.Array(Type.Integer()), numel: Type.Integer() })),
  param_groups: Type.Array(ParamGroupOut),
  snapshot_every: Type.Integer(),
  keep_snapshots: Type.Integer(),
  max_staleness: Type.Union([Type.Integer(), Type.Null()]),
  keep_log_bytes: Type.Union([Type.Integer(), Type.Null()], { description: 'Byte bound on the step log; null: none (keep_snapshots still bounds it)' }),
  expire_after_idle_s: Type.Union([Type.Integer(), Type.Null()], { description: 'Deleted after this many seconds without a step or a write; null: never' }),
  created_at: Type.String({ format: 'date-time' }),
  updated_at: Type.String({ format: 'date-time' }),
  storage: Type.Optional(SessionStorage),
});

export const Snapshot = Type.Object({
  id: Type.Integer(), version: Type.Integer(), step: Type.Integer(), reason: Type.String(), pinned: Type.Boolean(),
  byte_size: Type.Integer(), checksum: Type.String(), created_at: Type.String({ format: 'date-time' }),
});

export const ErrorBody = Type.Object(
  { statusCode: Type.Integer(), code: Type.String(), error: Type.String(), message: Type.String() },
  { additionalProperties: true, description: 'Every error: a stable code and a message that names the field' },
);

export const StepAnswer = Type.Object({
  session: Type.String(), step: Type.Integer(), version: Type.Integer(),
  staleness: Type.Integer({ description: 'Versions between the gradient\'s base_version and the version it was applied to' }),
  replayed: Type.Optional(Type.Boolean({ description: 'true when an Idempotency-Key retry returned the original answer' })),
});

/** 304: the client's copy (If-None-Match, or after_version when no newer one came) is current; ETag names the version. */
export const NotModified = Type.Null({ description: 'Not modified: the version in the ETag is the one you have' });

export const errorResponses = (...codes: number[]) => Object.fromEntries(codes.map((c) => [c, ErrorBody]));

export const VersionHeaders = Type.Object({
  'if-match': Type.Optional(Type.String({ description: 'Apply only at this version: "<version>"; 412 otherwise' })),
});
