// The session domain as a named plugin: one service per process, flushed on close.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import { createSessionService, type SessionService } from '../sessions/service.ts';
import type { SessionHooks } from '../sessions/context.ts';
import { selectKernel } from '../optim/index.ts';
import type { Config } from '../config.ts';

/** How often a process looks for copies it holds of sessions other processes deleted (one small query). */
const FORGET_GONE_MS = 30_000;

declare module 'fastify' {
  interface FastifyInstance {
    sessions: SessionService;
    sessionHooks: SessionHooks;
  }
}

export default fp(
  async function sessionsPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const hooks: SessionHooks = {};
    fastify.decorate('sessionHooks', hooks);
    // Throws KernelUnavailableError (the app does not start) when ASGD_KERNEL=wasm-fma is not exact here.
    const { kernel, reason } = selectKernel(opts.config.kernel);
    // With ASGD_FMA=false every kernel rounds the multiply and the add apart (PyTorch's ATEN_CPU_CAPABILITY=default):
    // the line says so, not only why this kernel was chosen.
    const rounding = opts.config.fma ? '' : '; ASGD_FMA=false: unfused multiply-adds, as PyTorch under ATEN_CPU_CAPABILITY=default';
    fastify.log.info({ kernel: kernel.name, fma: opts.config.fma }, `ASGD kernel: ${kernel.name}, ${reason}${rounding}`);
    const service = createSessionService({
      db: fastify.db,
      kernel,
      kernelOptions: { fma: opts.config.fma },
      log: fastify.log,
      cacheBytes: opts.config.cacheBytes,
      cacheSessions: opts.config.cacheSessions,
      snapshotCopyLimitBytes: opts.config.snapshotCopyLimitBytes,
      diskRoom: fastify.diskRoom,
      replayBoundBytes: opts.config.replayBoundBytes,
      idempotencyWindowSeconds: opts.config.idempotencyWindowSeconds,
      stepLingerMs: opts.config.stepLingerUs / 1000,
      hooks: {
        stepped: (...args) => hooks.stepped?.(...args),
        committed: (...args) => hooks.committed?.(...args),
        snapshotted: (...args) => hooks.snapshotted?.(...args),
        replayPointWritten: (...args) => hooks.replayPointWritten?.(...args),
        replayed: (...args) => hooks.replayed?.(...args),
      },
    });
    fastify.decorate('sessions', service);
    const prune = setInterval(() => {
      service.pruneIdempotency().catch((err) => fastify.log.warn({ err }, 'pruning idempotency keys failed'));
    }, 60_000);
    prune.unref();
    // Copies of sessions another replica deleted (or expired) go within half a minute. The embedded database
    // has one process (its data directory is locked), whose own deletes forget their copies at once.
    const gone = fastify.db.kind === 'pglite' ? undefined : setInterval(() => {
      service.forgetGone().catch((err) => fastify.log.debug({ err }, 'looking for deleted sessions\' copies failed'));
    }, FORGET_GONE_MS);
    gone?.unref();
    // Runs before the db plugin's onClose (hooks run in reverse order of registration).
    fastify.addHook('onClose', async () => {
      clearInterval(prune);
      clearInterval(gone);
      await service.close();
    });
  },
  { name: 'sessions', dependencies: ['db'] },
);
