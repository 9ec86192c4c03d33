// GET /v1/sessions/:name/norms: per parameter, the L2 norm of the parameters and of ASGD's average `ax`,
// with its step/eta/mu, computed on demand at the current version from the state this process holds in
// memory (one pass over the floats, no snapshot read when the copy is current). The dashboard polls it.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ACCESS, setVersion } from '../common.ts';
import { ConditionalReadHeaders, errorResponses, NameParams, NotModified } from '../schemas.ts';
import { answeredNotModified, checkIfMatchRead } from './conditional.ts';
import type { StateView } from '../../sessions/model.ts';
import { jsonScalar } from '../../sessions/tensors.ts';

/** A float64 that may not be finite (a diverged run): a number, or "NaN", "Infinity", "-Infinity" as in tensor data. */
const Float = (description: string) => Type.Union([Type.Number(), Type.Literal('NaN'), Type.Literal('Infinity'), Type.Literal('-Infinity')], { description });
const NONFINITE = ' ("NaN", "Infinity" or "-Infinity" when not finite)';

const ParamNorm = Type.Object({
  name: Type.String(),
  numel: Type.Integer(),
  norm: Float(`L2 norm of the parameter (float64 sum of squares of its float32 values)${NONFINITE}`),
  ax_norm: Float(`L2 norm of ASGD's averaged parameter ax, as params?averaged=true reads it (a parameter that has not stepped averages to itself)${NONFINITE}`),
  step: Type.Union([Float('ASGD\'s per-parameter step'), Type.Null()], { description: `ASGD's per-parameter step; null before its first step${NONFINITE}` }),
  eta: Type.Union([Float('eta'), Type.Null()], { description: `ASGD's eta; null before the first step${NONFINITE}` }),
  mu: Type.Union([Float('mu'), Type.Null()], { description: `ASGD's mu; null before the first step${NONFINITE}` }),
});

const NormsAnswer = Type.Object({
  session: Type.String(),
  version: Type.Integer(),
  step: Type.Integer(),
  params: Type.Array(ParamNorm),
});

/** L2 norm in float64 of `data[offset, offset + n)`. */
export function l2(data: Float32Array, offset: number, n: number): number {
  let sum = 0;
  for (let i = offset, end = offset + n; i < end; i++) sum += data[i] * data[i];
  return Math.sqrt(sum);
}

export function normsOf(view: StateView) {
  return {
    session: view.session,
    version: view.version,
    step: view.step,
    params: view.params.map((p, i) => {
      const offset = view.layout.offsets[i];
      const numel = view.layout.numels[i];
      const scalars = view.scalars[i];
      return {
        name: p.name,
        numel,
        norm: jsonScalar(l2(view.paramData, offset, numel)),
        // As ?averaged=true reads it: a parameter that has not stepped (no state, as in PyTorch) averages to itself.
        ax_norm: jsonScalar(l2(scalars ? view.axData : view.paramData, offset, numel)),
        step: scalars ? jsonScalar(scalars.step) : null,
        eta: scalars ? jsonScalar(scalars.eta) : null,
        mu: scalars ? jsonScalar(scalars.mu) : null,
      };
    }),
  };
}

const normRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  fastify.get('/:name/norms', {
    config: ACCESS.read,
    schema: {
      operationId: 'getNorms',
      summary: 'Norms of the parameters and of ax, at the current version',
      description: 'Computed on demand from the current state (not sampled at snapshots): per parameter the L2 norm of its values and of ASGD\'s average ax, with its step, eta and mu.',
      tags: ['state'],
      params: NameParams,
      headers: ConditionalReadHeaders,
      response: { 200: NormsAnswer, 304: NotModified, ...errorResponses(400, 401, 403, 404, 412) },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    // Its ETag is the version it was computed at: If-None-Match and If-Match as on GET params.
    if (await answeredNotModified(fastify, request, reply, name, null)) return reply;
    const view = await fastify.sessions.view(name);
    await checkIfMatchRead(fastify, request, name, view.version);
    setVersion(reply, view.version);
    return normsOf(view);
  });
};

export default normRoutes;
