// Shapes the domain answers with that the HTTP layer documents as they are: one definition, a TypeBox
// schema (for validation and the OpenAPI document) with its static type.
import { Type, type Static } from 'typebox';

export const StepAnswer = Type.Object({
  session: Type.String(),
  step: Type.Integer({ description: 'optimizer.step() calls applied' }),
  version: Type.Integer({ description: 'The session version after this step (also the ETag)' }),
  staleness: Type.Integer({ description: 'Versions between the gradient\'s base_version and the version it was applied to' }),
  replayed: Type.Optional(Type.Boolean({ description: 'true when an Idempotency-Key retry returned the original answer' })),
}, { title: 'StepAnswer', examples: [{ session: 'mnist-run-1', step: 42, version: 43, staleness: 0 }] });
export type StepAnswer = Static<typeof StepAnswer>;
