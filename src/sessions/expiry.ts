// Expiry of idle sessions (expire_after_idle_s). Any replica may run the sweep; a transaction-scoped
// advisory lock lets one at a time do the work (the others skip that round), and FOR UPDATE SKIP LOCKED
// passes over a session a step or a write holds locked: it is not idle.
//
// Idle means no change since the later of updated_at (bumped by every step, state load, restore and
// settings change), the newest snapshot (a manual snapshot is an operator's write) and the newest
// contribution to a round (src/sessions/rounds.ts); and a session whose round is open (contributions at its
// version) while a process waits on it (a worker's held contribution keeps the listening lease,
// sessions.listened_until) is not idle either: its workers are in the middle of a round, re-sending their
// contribution, which writes nothing new (a slow round outlived expire_after_idle_s and was deleted under
// them: found by a review). Reads (params,
// state_dict, checkpoints, downloads, listing) do not count: a session only read is still idle.
//
// A deleted session is announced as DELETE /v1/sessions/{name} announces it (version 0 on asgd_versions,
// at commit): its waiters and event streams end, and every process drops what it keeps about it.
import type { Database } from '../db/database.ts';
import { RETIRE_NAMES_SQL, RETIRED_NAME_DAYS, VERSION_CHANNEL } from './repository.ts';

/** pg_try_advisory_xact_lock key, next to the migration lock's (src/db/database.ts). */
const SWEEP_LOCK = 7_142_053_312;

/**
 * At most this many sessions are deleted a transaction (each delete takes its log and snapshots with it); a
 * sweep goes on with another while the last one was full, up to SWEEP_ROUNDS of them.
 */
export const BATCH = 100;
export const SWEEP_ROUNDS = 100;

/**
 * Deletes up to BATCH idle sessions; `busy`: the names of sessions whose workers this process knows are
 * mid-round (a contribution waits here, or did a moment ago: on the embedded database no lease says so),
 * passed over while their round is open.
 */
export async function sweepIdleSessions(db: Database, busy: readonly string[] = []): Promise<{ id: number; name: string }[]> {
  return db.transaction(async (tx) => {
    const [lock] = await tx.query<{ got: boolean }>('SELECT pg_try_advisory_xact_lock($1::bigint) AS got', [SWEEP_LOCK]);
    if (!lock?.got) return [];
    // Names kept longer than RETIRED_NAME_DAYS are forgotten (a session made under one then counts from 1).
    await tx.query(`DELETE FROM retired_names WHERE retired_at < now() - make_interval(days => ${RETIRED_NAME_DAYS})`);
    const gone = await tx.query<{ id: number; name: string }>(
      `WITH gone AS (DELETE FROM sessions WHERE id IN (
         SELECT s.id FROM sessions s
         WHERE s.expire_after_idle_s IS NOT NULL
           AND greatest(s.updated_at, (SELECT max(created_at) FROM snapshots p WHERE p.session_id = s.id),
                        (SELECT max(created_at) FROM round_contributions c WHERE c.session_id = s.id))
               < now() - make_interval(secs => s.expire_after_idle_s)
           AND NOT ((s.name = ANY($1::text[]) OR coalesce(s.listened_until >= now(), false))
                    AND EXISTS (SELECT 1 FROM round_contributions c WHERE c.session_id = s.id AND c.version = s.version))
         ORDER BY s.updated_at
         LIMIT ${BATCH}
         FOR UPDATE SKIP LOCKED)
       RETURNING id, name, version), retired AS (${RETIRE_NAMES_SQL})
       SELECT id::float8 AS id, name FROM gone`,
      [busy],
    );
    if (gone.length > 0) {
      await tx.query(`SELECT pg_notify($1, name || ':0:0') FROM unnest($2::text[]) AS name`, [VERSION_CHANNEL, gone.map((g) => g.name)]);
    }
    return gone;
  });
}
