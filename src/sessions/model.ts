// Shapes the domain answers with that the HTTP layer documents as they are: one definition, a TypeBox
// schema (for validation and the OpenAPI document) with its static type.
import { Type, type Static } from 'typebox';

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
