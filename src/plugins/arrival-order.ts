// A worker's pipelined steps in the order they arrived (src/sessions/arrival-order.ts). Registered before
// load shedding and auth: its onRequest hook takes the place before any hook waits on the database, so the
// places follow the order in which the requests' headers were read. A route opts in with
// `config: { workerOrder: true }`; its request's place is `request.workerPlace`.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import type { Config } from '../config.ts';
import { ArrivalOrder, type Place } from '../sessions/arrival-order.ts';
import { NAME_PATTERN } from '../sessions/spec.ts';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route's requests that name a `worker` in the query keep that worker's order (POST .../step). */
    workerOrder?: boolean;
  }
  interface FastifyRequest {
    /** Its place in its worker's line; null when the request names no worker in its query (or the route does not order). */
    workerPlace: Place | null;
  }
  interface FastifyInstance {
    arrivalOrder: ArrivalOrder;
  }
}

export default fp(
  async function arrivalOrderPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const order = new ArrivalOrder(opts.config.workerOrderWaitMs);
    fastify.decorate('arrivalOrder', order);
    fastify.decorateRequest('workerPlace', null);
    fastify.addHook('onRequest', async (request, reply) => {
      if (!request.routeOptions.config.workerOrder) return;
      const name = (request.params as { name?: unknown } | null)?.name;
      const worker = (request.query as { worker?: unknown } | null)?.worker;
      // Unchecked yet: the route's schema refuses a bad name or worker later; neither is a key here then.
      if (typeof name !== 'string' || typeof worker !== 'string' || !NAME_PATTERN.test(name) || !NAME_PATTERN.test(worker)) return;
      const place = order.take(name, worker);
      request.workerPlace = place;
      // Whatever ends the request (an answer, an error before the handler, the client gone) frees the line.
      reply.raw.once('close', place.leave);
    });
  },
  { name: 'arrival-order' },
);
