// Stored bytes in /metrics, and the idle-session sweeper.
//
// Cardinality: a per-session gauge for every session would make thousands of series (and the figures
// take a scan of every session's log rows), so /metrics carries the totals over all sessions plus
// per-session series for the STORAGE_TOP_SESSIONS largest only: the ones an operator acts on. The
// figures are computed on scrape, at most once every STORAGE_TTL_MS (several scrapers, or one
// scraping often, cost one query per interval), and a scrape waits for them at most SCRAPE_WAIT_MS.
// GET /v1/sessions/{name} has any one session's figures.
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

/** How long a scrape waits for figures being computed before it serves the last ones (a scrape must not time out with the database). */
const SCRAPE_WAIT_MS = 2_000;

export default fp(
  async function storagePlugin(fastify: FastifyInstance, opts: { config: Config }) {
    // The last figures computed, served until newer ones are: a database that hangs or is down (found by an
    // operator's review: every scrape then took the connect timeout, 10 s, Prometheus' whole scrape timeout,
    // and the gauges read 0 sessions) leaves them as they were, with their age in
    // asgd_storage_figures_age_seconds; before any, the gauges are NaN (no alert on "fell to 0" fires).
    let last: { at: number; figures: Figures } | null = null;
    let computing: { started: number; waited: Promise<unknown> } | null = null;
    let failing = false;
    // Sessions deleted (by any process) after the figures were computed leave the per-session series at once.
    const deleted = new Map<string, number>();
    const stopListening = fastify.versions.onDeleted((name) => deleted.set(name, Date.now()));
    fastify.addHook('onClose', async () => { stopListening(); });
    const refresh = (): Promise<unknown> => {
      if (computing) return computing.waited;
      const started = Date.now();
      const pending = allSessionStorage(fastify.db).then((all) => {
        const totals = { log: 0, snapshots: 0, replay_points: 0, other: 0 };
        for (const s of all) {
          totals.log += s.log_bytes;
          totals.snapshots += s.snapshot_bytes;
          totals.replay_points += s.replay_point_bytes;
          totals.other += s.other_bytes;
        }
        last = { at: started, figures: { totals, sessions: all.length, top: all.slice(0, STORAGE_TOP_SESSIONS) } };
        for (const [name, at] of deleted) if (at < started) deleted.delete(name);
        if (failing) fastify.log.info('storage figures for /metrics computed again');
        failing = false;
      }, (err) => {
        if (!failing) fastify.log.warn({ err }, 'storage figures for /metrics failed; serving the last ones (asgd_storage_figures_age_seconds) until they can be computed');
        failing = true;
      }).finally(() => { computing = null; });
      let timer: NodeJS.Timeout | undefined;
      const waited = Promise.race([pending, new Promise((resolve) => { timer = setTimeout(resolve, SCRAPE_WAIT_MS); })]).finally(() => clearTimeout(timer));
      computing = { started, waited };
      return waited;
    };
    const figures = async (): Promise<Figures | null> => {
      const stale = !last || Date.now() - last.at > STORAGE_TTL_MS;
      // While the probe finds the database down, no query is sent (each would wait for a connection).
      if (stale && fastify.databaseHealth?.up !== false) await refresh();
      if (!last) return null;
      const f = last.figures;
      return deleted.size === 0 ? f : { ...f, top: f.top.filter((s) => !deleted.has(s.name)) };
    };
    const kindOf = (s: SessionStorage, kind: (typeof KINDS)[number]) =>
      kind === 'log' ? s.log_bytes : kind === 'snapshots' ? s.snapshot_bytes : kind === 'replay_points' ? s.replay_point_bytes : s.other_bytes;

    const registers = [fastify.metrics];
    new Gauge({
      name: 'asgd_storage_bytes', help: 'Bytes stored for all sessions, by kind (log, snapshots, replay_points, other; their sum is the total); NaN before the first figures', labelNames: ['kind'], registers,
      async collect() {
        const f = await figures();
        for (const kind of KINDS) this.set({ kind }, f ? f.totals[kind] : NaN);
      },
    });
    new Gauge({
      name: 'asgd_storage_sessions', help: 'Sessions stored; NaN before the first figures', registers,
      async collect() {
        this.set((await figures())?.sessions ?? NaN);
      },
    });
    new Gauge({
      name: 'asgd_storage_figures_age_seconds',
      help: `Age of the storage figures served (recomputed at most every ${STORAGE_TTL_MS / 1000} s; older while the database cannot be asked); NaN before the first`,
      registers,
      async collect() {
        await figures();
        this.set(last ? (Date.now() - last.at) / 1000 : NaN);
      },
    });
    new Gauge({
      name: 'asgd_session_storage_bytes',
      help: `Bytes stored per session, by kind, for the ${STORAGE_TOP_SESSIONS} sessions that store the most (recomputed at most every ${STORAGE_TTL_MS / 1000} s)`,
      labelNames: ['session', 'kind'], registers,
      async collect() {
        const f = await figures();
        this.reset(); // sessions deleted, or no longer among the largest, lose their series
        if (f) for (const s of f.top) for (const kind of KINDS) this.set({ session: s.name, kind }, kindOf(s, kind));
      },
    });
    new Gauge({
      name: 'asgd_session_log_steps', help: `Steps in the log, for the ${STORAGE_TOP_SESSIONS} sessions that store the most`, labelNames: ['session'], registers,
      async collect() {
        const f = await figures();
        this.reset();
        if (f) for (const s of f.top) this.set({ session: s.name }, s.log_steps);
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
