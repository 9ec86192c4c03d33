// The snapshot resource: take one now (optionally pinned), list, read one, pin or unpin.
import { errors } from '../errors.ts';
import { checkIfMatch, consistentRead, mustFind, type SessionContext } from './context.ts';
import type { History } from './history.ts';
import * as repo from './repository.ts';
import type { SessionRecord, SnapshotRecord } from './repository.ts';
import { metaOf, type SnapshotWriter } from './snapshot-writer.ts';

export function createSnapshots(ctx: SessionContext, history: History, writer: SnapshotWriter) {
  const { db, mutex, hooks } = ctx;

  async function snapshotNow(name: string, pinned: boolean, ifMatch: number | null = null): Promise<SnapshotRecord> {
    return mutex.run(name, async () => {
      // Read and written in two transactions: the write holds the session's row (a DELETE on another
      // replica waits for it; one that came first makes this read again, and find the name gone or another
      // session's), checks that the copy is still of the database's history (after a restore or a failover
      // nothing of the old one is written) and reads again when it is not.
      for (let attempt = 1; ; attempt++) {
        const { session, entry } = await consistentRead(db, async (q) => {
          const session = await mustFind(q, name);
          checkIfMatch(ifMatch, session.version); // a snapshot of the version the caller saw, or none
          return { session, entry: await history.currentState(q, session) };
        });
        // Written from the state itself: this process's steps of the session wait for the lock held here.
        const meta = metaOf(entry.state);
        const parts = entry.state.tensorViews();
        const snapshot = await db.transaction(async (tx) => {
          if (!(await repo.holdSession(tx, session.id)) || !(await repo.ofHistory(tx, session.id, meta.version, meta.stamps))) return null;
          let snapshot = await writer.write(tx, session.id, meta, parts, 'manual', pinned);
          if (!snapshot) {
            // One already exists at this version: it is the same state, now the caller's (pinned if asked).
            const existing = (await repo.findSnapshotAtOrBelow(tx, session.id, meta.version))!;
            snapshot = (pinned && !existing.pinned) || existing.reason === 'hyperparameters' ? (await repo.claimSnapshot(tx, session.id, existing.id, pinned))! : existing;
          }
          entry.lastSnapshotVersion = Math.max(entry.lastSnapshotVersion, meta.version);
          await repo.pruneHistory(tx, session.id);
          return snapshot;
        });
        if (snapshot) {
          hooks?.snapshotted?.(name, 'manual');
          return snapshot;
        }
        if (attempt >= 3) throw errors.unavailable(`the session "${name}" changed while its snapshot was taken (deleted and created again, or its history moved by a database restore or failover); try again`);
      }
    });
  }

  async function list(name: string): Promise<{ session: SessionRecord; snapshots: SnapshotRecord[] }> {
    const session = await mustFind(db, name);
    return { session, snapshots: await repo.listSnapshots(db, session.id) };
  }

  async function get(name: string, id: number): Promise<{ session: SessionRecord; snapshot: SnapshotRecord }> {
    const session = await mustFind(db, name);
    const snapshot = await repo.findSnapshot(db, session.id, id);
    if (!snapshot) throw errors.snapshotNotFound(String(id));
    return { session, snapshot };
  }

  async function pin(name: string, id: number, pinned: boolean, ifMatch: number | null = null): Promise<SnapshotRecord> {
    const session = await mustFind(db, name);
    checkIfMatch(ifMatch, session.version); // If-Match: the session's version, as on every route of a session
    const snapshot = await repo.setSnapshotPinned(db, session.id, id, pinned);
    if (!snapshot) throw errors.snapshotNotFound(String(id));
    return snapshot;
  }

  return { snapshotNow, list, get, pin };
}
