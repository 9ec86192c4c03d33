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

/**
 * Per process: a waiting read or a stream holds a socket and a few hundred bytes; these bound both. Waiting
 * reads are held to half of ASGD_MAX_CONNECTIONS besides, so that they are refused (503 TOO_MANY_WAITERS)
 * while the other requests still get a connection (a hostile review: 4,100 waits took all 4,096
 * connections, and every other client's step was reset at connect).
 */
export const MAX_WAITERS = 10_000;
export const maxWaiters = (maxConnections: number): number => Math.max(1, Math.min(MAX_WAITERS, Math.floor(maxConnections / 2)));
/** Waiting reads one stored token may hold on one process: a quarter of them. */
export const maxWaitsPerToken = (maxConnections: number): number => Math.max(1, Math.floor(maxWaiters(maxConnections) / 4));
export const MAX_STREAMS = 1_000;
/** Event streams one stored token may hold on one process: a read token cannot take every slot. */
export const MAX_STREAMS_PER_TOKEN = MAX_STREAMS / 10;

export default fp(
  async function notifierPlugin(fastify: FastifyInstance, opts: { maxConnections: number }) {
    const notifier = createVersionNotifier({ db: fastify.db, log: fastify.log, maxWaiters: maxWaiters(opts.maxConnections), maxStreams: MAX_STREAMS });
    await notifier.start();
    fastify.decorate('versions', notifier);
    fastify.addHook('preClose', async () => notifier.release());
    fastify.addHook('onClose', async () => notifier.close());
  },
  { name: 'notifier', dependencies: ['db'] },
);
