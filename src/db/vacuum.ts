// The embedded database's vacuum. PGlite is one backend with no autovacuum launcher: the space of the rows
// the service deletes (the log behind each snapshot, pruned snapshots, expired keys) was never reclaimed,
// and a data directory grew at the rate gradients arrived whatever the sessions' bounds (an operator's
// review: 40 MB to 1.5 GB in 3,000 steps of a session that kept 3 MB). This does what autovacuum would:
// now and then, the tables (their TOAST tables included) whose dead rows passed autovacuum's own threshold
// (50 rows plus a fifth of the live ones) are vacuumed, and their space is used again by new rows (the
// files' empty ends are given back too), and the WAL is checkpointed (createUpkeep). PostgreSQL has
// autovacuum and a checkpointer (autovacuum's absence is warned about at start).
import type { Database } from './database.ts';

/** How often the dead rows are looked at. */
export const VACUUM_INTERVAL_MS = 60_000;
/** autovacuum_vacuum_threshold and autovacuum_vacuum_scale_factor's defaults. */
const THRESHOLD_ROWS = 50;
const SCALE_FACTOR = 0.2;

/**
 * The public tables due a vacuum: their own dead rows, or their TOAST table's, over the threshold.
 * A TOAST table is vacuumed with its table.
 */
export async function tablesDue(db: Database): Promise<string[]> {
  const rows = await db.query<{ name: string }>(
    `SELECT DISTINCT c.relname AS name
       FROM pg_class c
       JOIN pg_namespace ns ON ns.oid = c.relnamespace
       JOIN pg_stat_all_tables s ON s.relid = c.oid OR s.relid = c.reltoastrelid
      WHERE ns.nspname = 'public' AND c.relkind = 'r'
        AND s.n_dead_tup > $1::float8 + $2::float8 * s.n_live_tup
      ORDER BY 1`,
    [THRESHOLD_ROWS, SCALE_FACTOR],
  );
  return rows.map((r) => r.name);
}

/**
 * The embedded database's upkeep, run every ASGD_VACUUM_INTERVAL_MS: vacuums the tables due one, then
 * checkpoints when WAL was written since the last checkpoint. PGlite has no checkpointer either: its WAL
 * was never recycled and grew by every byte written (a review: 2.2 GB of pg_wal after 170 steps of a 1e6
 * session, 1.1 GB still after a clean shutdown); checkpointed every interval it holds about one interval's
 * writes.
 */
export function createUpkeep(db: Database): () => Promise<{ tables: string[]; checkpointed: boolean; ms: number }> {
  let checkpointedAt: string | null = null;
  const walPosition = async () => (await db.query<{ lsn: string }>('SELECT pg_current_wal_insert_lsn()::text AS lsn'))[0].lsn;
  return async () => {
    const started = performance.now();
    const tables = await tablesDue(db);
    // One at a time: the backend is the process's only one, and each VACUUM holds it while it runs.
    for (const table of tables) await db.query(`VACUUM "${table.replace(/"/g, '""')}"`);
    const checkpointed = (await walPosition()) !== checkpointedAt;
    if (checkpointed) {
      await db.query('CHECKPOINT');
      // The checkpoint's own record moves the position: read again, so that an idle database is left alone.
      checkpointedAt = await walPosition();
    }
    return { tables, checkpointed, ms: Math.round(performance.now() - started) };
  };
}
