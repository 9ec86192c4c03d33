// Synchronous rounds as a named plugin (src/sessions/rounds.ts): contributions wait on the version notifier;
// the timers of rounds' timeouts stop when the app closes (waiting requests are released by the notifier's
// preClose and answer 202, so their clients re-POST to another replica).
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import { createRoundService, type RoundHooks, type RoundService } from '../sessions/rounds.ts';

declare module 'fastify' {
  interface FastifyInstance {
    rounds: RoundService;
    roundHooks: RoundHooks;
  }
}

export default fp(
  async function roundsPlugin(fastify: FastifyInstance) {
    const hooks: RoundHooks = {};
    fastify.decorate('roundHooks', hooks);
    const rounds = createRoundService({
      db: fastify.db,
      sessions: fastify.sessions,
      versions: fastify.versions,
      log: fastify.log,
      hooks: { closed: (...args) => hooks.closed?.(...args) },
    });
    fastify.decorate('rounds', rounds);
    fastify.addHook('preClose', async () => rounds.close());
  },
  { name: 'rounds', dependencies: ['db', 'sessions', 'notifier'] },
);
