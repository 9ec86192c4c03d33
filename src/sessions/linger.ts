// How long a batch waits for the clients that are about to step again (adaptive group commit).
//
// A process commits the steps waiting for a session as one batch as soon as its lock is free (steps.ts).
// Clients that step back to back then split into cohorts: while one batch commits, the clients it will
// answer are not queued, so the next batch holds only those that arrived meanwhile, and every batch pays
// the statement, the commit and the lock handoff for a part of the clients. Measured with 16 clients over
// 3 processes: 2.8 steps a commit where each process serves 5-6 clients.
//
// This is PostgreSQL's commit_delay/commit_siblings, keyed on clients rather than transactions: each
// client that steps a session here (its worker id when its steps name one, else its connection) is
// remembered with how soon after an answer it has sent its next step (a moving average). A batch about to
// start waits, at most `lingerMs` after its first request arrived, while some client answered lately is
// expected back within that time: one whose usual return is under RETURN_FACTOR lingers, is not yet
// overdue and has no other step queued or committing. Never waited for: a lone client, clients that think
// longer than that between steps, clients that stopped, and pipelined clients. RemoteASGD(pipeline=True)
// sends step k+1 (over a second connection, naming its worker) before it reads the answer to step k: a
// batch holding k+1 would only wait for k+2 while the worker waits for k+1 (one such worker, measured:
// 3.4-3.8 ms a step with the wait, 2.6-2.7 without). `lingerMs` 0 turns it off.

/** A client (worker id or connection) seen stepping one session in this process. */
interface Peer {
  /** When its last step was answered (hrtime ns), or null while one of its steps is queued or committing. */
  answeredAt: bigint | null;
  /**
   * Its steps queued or committing. A pipelined client (RemoteASGD(pipeline=True)) sends its next step
   * before it reads the answer to the one before: answered with another step of its own still in flight,
   * it is not a client about to come back, and a batch holding its step must not wait for its next one
   * (that one follows the answer to this batch: waiting only delays both).
   */
  inFlight: number;
  /** Moving average of the time from an answer to its next step (ns), or null before one. */
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
  private readonly sessions = new Map<string, Map<object | string, Peer>>();
  private readonly wakers = new Map<string, () => void>();
  private lastSweep = 0n;

  /** `clock`: monotonic nanoseconds (tests give their own). */
  constructor(lingerMs: number, clock: () => bigint = process.hrtime.bigint) {
    this.lingerNs = Math.round(lingerMs * 1e6);
    this.clock = clock;
  }

  /** A step of `client` on `name` was queued: its return time is learned, and a batch waiting for it is woken. */
  arrived(name: string, client: object | string | undefined, at: bigint): void {
    if (this.lingerNs > 0 && client) {
      let peers = this.sessions.get(name);
      if (!peers) this.sessions.set(name, (peers = new Map()));
      const peer = peers.get(client);
      if (!peer) peers.set(client, { answeredAt: null, inFlight: 1, returnNs: null });
      else {
        if (peer.answeredAt !== null) {
          const gap = Number(at - peer.answeredAt);
          peer.returnNs = peer.returnNs === null ? gap : (1 - WEIGHT) * peer.returnNs + WEIGHT * gap;
        }
        peer.answeredAt = null;
        peer.inFlight += 1;
      }
    }
    this.wakers.get(name)?.();
  }

  /** A step of `client` on `name` was answered (or refused). */
  answered(name: string, client: object | string | undefined): void {
    if (this.lingerNs <= 0 || !client) return;
    const peer = this.sessions.get(name)?.get(client);
    if (!peer) return;
    peer.inFlight = Math.max(0, peer.inFlight - 1);
    if (peer.inFlight === 0) peer.answeredAt = this.clock();
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
