// How long a batch waits for the clients that are about to step again (adaptive group commit).
//
// A process commits the steps waiting for a session as one batch as soon as its lock is free (steps.ts).
// Clients that step back to back then split into cohorts: while one batch commits, the clients it will
// answer are not queued, so the next batch holds only those that arrived meanwhile, and every batch pays
// the statement, the commit and the lock handoff for a part of the clients. Measured with 16 clients over
// 3 processes: 2.8 steps a commit where each process serves 5-6 clients.
//
// This is PostgreSQL's commit_delay/commit_siblings, keyed on clients rather than transactions: each
// client connection that steps a session here is remembered with how soon after an answer it has sent
// its next step (a moving average). A batch about to start waits, at most `lingerMs` after its first
// request arrived, while some client answered lately is expected back within that time: one whose usual
// return is under `lingerMs` and is not yet overdue. A lone client, clients that think longer than
// `lingerMs` between steps (a training worker's forward and backward pass), and clients that stopped are
// never waited for; `lingerMs` 0 turns it off.

/** A client connection seen stepping one session in this process. */
interface Peer {
  /** When its last step was answered (hrtime ns), or null while one of its steps is queued or committing. */
  answeredAt: bigint | null;
  /** Moving average of the time from an answer to its next step on this connection (ns), or null before one. */
  returnNs: number | null;
}

/** Peers idle for longer than this are forgotten (a closed connection leaves nothing behind for long). */
const FORGET_NS = 2_000_000_000n;
/** Clients that usually step again within this many lingers are waited for (a batch still waits one linger at most). */
const RETURN_FACTOR = 8;
/** Weight of the newest return time in the moving average. */
const WEIGHT = 0.25;

export class Linger {
  readonly lingerNs: number;
  private readonly clock: () => bigint;
  private readonly sessions = new Map<string, Map<object, Peer>>();
  private readonly wakers = new Map<string, () => void>();
  private lastSweep = 0n;

  /** `clock`: monotonic nanoseconds (tests give their own). */
  constructor(lingerMs: number, clock: () => bigint = process.hrtime.bigint) {
    this.lingerNs = Math.round(lingerMs * 1e6);
    this.clock = clock;
  }

  /** A step of `client` on `name` was queued: its return time is learned, and a batch waiting for it is woken. */
  arrived(name: string, client: object | undefined, at: bigint): void {
    if (this.lingerNs > 0 && client) {
      let peers = this.sessions.get(name);
      if (!peers) this.sessions.set(name, (peers = new Map()));
      const peer = peers.get(client);
      if (!peer) peers.set(client, { answeredAt: null, returnNs: null });
      else {
        if (peer.answeredAt !== null) {
          const gap = Number(at - peer.answeredAt);
          peer.returnNs = peer.returnNs === null ? gap : (1 - WEIGHT) * peer.returnNs + WEIGHT * gap;
        }
        peer.answeredAt = null;
      }
    }
    this.wakers.get(name)?.();
  }

  /** A step of `client` on `name` was answered (or refused). */
  answered(name: string, client: object | undefined): void {
    if (this.lingerNs <= 0 || !client) return;
    const peer = this.sessions.get(name)?.get(client);
    if (peer) peer.answeredAt = this.clock();
  }

  /**
   * Waits until no client of `name` is expected back or `lingerNs` after `firstQueued`, whichever comes
   * first; `queued()` is the number of steps waiting, which stops the wait once it reaches `maxSteps`.
   */
  async wait(name: string, firstQueued: bigint, queued: () => number, maxSteps: number): Promise<void> {
    if (this.lingerNs <= 0) return;
    const deadline = firstQueued + BigInt(this.lingerNs);
    for (;;) {
      const now = this.clock();
      if (now >= deadline || queued() >= maxSteps || !this.expected(name, now)) return;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, Math.max(1, Number(deadline - now) / 1e6));
        this.wakers.set(name, done);
        function done() {
          clearTimeout(timer);
          resolve();
        }
      });
      this.wakers.delete(name);
    }
  }

  /** Whether a client of `name` answered lately usually steps again within the linger and is not overdue. */
  private expected(name: string, now: bigint): boolean {
    const peers = this.sessions.get(name);
    if (!peers) return false;
    if (now - this.lastSweep > FORGET_NS) this.sweep(now);
    for (const peer of peers.values()) {
      if (peer.answeredAt === null || peer.returnNs === null || peer.returnNs >= RETURN_FACTOR * this.lingerNs) continue;
      if (Number(now - peer.answeredAt) < 2 * peer.returnNs) return true;
    }
    return false;
  }

  private sweep(now: bigint): void {
    this.lastSweep = now;
    for (const [name, peers] of this.sessions) {
      for (const [client, peer] of peers) if (peer.answeredAt !== null && now - peer.answeredAt > FORGET_NS) peers.delete(client);
      if (!peers.size) this.sessions.delete(name);
    }
  }
}
