// Stored bytes in /metrics, and the idle-session sweeper.
//
// Cardinality: a per-session gauge for every session would make thousands of series (and the figures
// take a scan of every session's log rows), so /metrics carries the totals over all sessions plus
// per-session series for the STORAGE_TOP_SESSIONS largest only: the ones an operator acts on. The
// figures are computed on scrape, at most once every STORAGE_TTL_MS (several scrapers, or one
// scraping often, cost one query per interval). GET /v1/sessions/{name} has any one session's figures.
import fp from 'fastify-plugin';
import type { FastifyInstance } from 'fastify';
import { Gauge } from 'prom-client';
import type { Config } from '../config.ts';
import { allSessionStorage, type SessionStorage } from '../sessions/storage.ts';

export const STORAGE_TOP_SESSIONS = 50;
const STORAGE_TTL_MS = 30_000;
// No kind="total": it is the sum of the three, and a `sum(asgd_storage_bytes)` over the kinds would count it twice.
const KINDS = ['log', 'snapshots', 'replay_points', 'other'] as const;

type Figures = { totals: Record<(typeof KINDS)[number], number>; sessions: number; top: (SessionStorage & { name: string })[] };

export default fp(
  async function storagePlugin(fastify: FastifyInstance, opts: { config: Config }) {
    let cached: { at: number; figures: Promise<Figures> } | null = null;
    // Sessions deleted (by any process) since the figures were computed leave the per-session series at
    // once, not when the figures are next computed.
    const deletedSince = new Set<string>();
    const stopListening = fastify.versions.onDeleted((name) => deletedSince.add(name));
    fastify.addHook('onClose', async () => { stopListening(); });
    const figures = (): Promise<Figures> => {
      if (!cached || Date.now() - cached.at > STORAGE_TTL_MS) {
        deletedSince.clear();
        const pending = allSessionStorage(fastify.db).then((all) => {
          const totals = { log: 0, snapshots: 0, replay_points: 0, other: 0 };
          for (const s of all) {
            totals.log += s.log_bytes;
            totals.snapshots += s.snapshot_bytes;
            totals.replay_points += s.replay_point_bytes;
            totals.other += s.other_bytes;
          }
          return { totals, sessions: all.length, top: all.slice(0, STORAGE_TOP_SESSIONS) };
        });
        cached = { at: Date.now(), figures: pending };
        pending.catch(() => { cached = null; }); // a failed query is retried on the next scrape
      }
      return cached.figures.then((f) => (deletedSince.size === 0 ? f : { ...f, top: f.top.filter((s) => !deletedSince.has(s.name)) }));
    };
    const kindOf = (s: SessionStorage, kind: (typeof KINDS)[number]) =>
      kind === 'log' ? s.log_bytes : kind === 'snapshots' ? s.snapshot_bytes : kind === 'replay_points' ? s.replay_point_bytes : s.other_bytes;

    const registers = [fastify.metrics];
    new Gauge({
      name: 'asgd_storage_bytes', help: 'Bytes stored for all sessions, by kind (log, snapshots, replay_points, other; their sum is the total)', labelNames: ['kind'], registers,
      async collect() {
        const f = await figures().catch(() => null);
        if (f) for (const kind of KINDS) this.set({ kind }, f.totals[kind]);
      },
    });
    new Gauge({
      name: 'asgd_storage_sessions', help: 'Sessions stored', registers,
      async collect() {
        const f = await figures().catch(() => null);
        if (f) this.set(f.sessions);
      },
    });
    new Gauge({
      name: 'asgd_session_storage_bytes',
      help: `Bytes stored per session, by kind, for the ${STORAGE_TOP_SESSIONS} sessions that store the most (recomputed at most every ${STORAGE_TTL_MS / 1000} s)`,
      labelNames: ['session', 'kind'], registers,
      async collect() {
        const f = await figures().catch((err) => {
          fastify.log.warn({ err }, 'storage figures for /metrics failed');
          return null;
        });
        if (!f) return;
        this.reset(); // sessions deleted, or no longer among the largest, lose their series
        for (const s of f.top) for (const kind of KINDS) this.set({ session: s.name, kind }, kindOf(s, kind));
      },
    });
    new Gauge({
      name: 'asgd_session_log_steps', help: `Steps in the log, for the ${STORAGE_TOP_SESSIONS} sessions that store the most`, labelNames: ['session'], registers,
      async collect() {
        const f = await figures().catch(() => null);
        if (!f) return;
        this.reset();
        for (const s of f.top) this.set({ session: s.name }, s.log_steps);
      },
    });

    // Idle expiry: every replica runs the sweep; the advisory lock in sessions/expiry.ts makes it one at a time.
    if (opts.config.sweepIntervalMs > 0) {
      const sweep = setInterval(() => {
        fastify.sessions.sweepExpired().catch((err) => fastify.log.warn({ err }, 'idle-session sweep failed'));
      }, opts.config.sweepIntervalMs);
      sweep.unref();
      fastify.addHook('onClose', async () => clearInterval(sweep));
    }
  },
  { name: 'storage', dependencies: ['db', 'sessions', 'notifier', 'metrics'] },
);
