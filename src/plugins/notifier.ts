// The version notifier as a named plugin: LISTEN from start to close; waiters and event streams are
// released before the server closes its connections (preClose), the listener is closed before the pool.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import { createVersionNotifier, type VersionNotifier } from '../sessions/notifier.ts';

declare module 'fastify' {
  interface FastifyInstance {
    versions: VersionNotifier;
  }
}

/** Per process: a waiting read or a stream holds a socket and a few hundred bytes; these bound both. */
export const MAX_WAITERS = 10_000;
export const MAX_STREAMS = 1_000;
/** Event streams one stored token may hold on one process: a read token cannot take every slot. */
export const MAX_STREAMS_PER_TOKEN = MAX_STREAMS / 10;

export default fp(
  async function notifierPlugin(fastify: FastifyInstance) {
    const notifier = createVersionNotifier({ db: fastify.db, log: fastify.log, maxWaiters: MAX_WAITERS, maxStreams: MAX_STREAMS });
    await notifier.start();
    fastify.decorate('versions', notifier);
    fastify.addHook('preClose', async () => notifier.release());
    fastify.addHook('onClose', async () => notifier.close());
  },
  { name: 'notifier', dependencies: ['db'] },
);
