// One worker's steps reach its session's queue in the order their requests arrived at this process.
//
// RemoteASGD(pipeline=True) sends step k+1 over a second connection as soon as step k is sent, before it
// reads k's answer. The two requests then pass through this process's asynchronous stages side by side (a
// stored API token looked up in the database, the body read, the session's parameter names looked up), and
// k+1 could finish them first and be committed before k: the session would then apply the worker's
// hyperparameter changes (a scheduler's lr, sent with the step that follows the change) one step late and
// record its metrics out of order. A step whose query names its `worker` takes a place in that worker's
// line on its session when its request arrives (the first onRequest hook, in the order the requests'
// headers were read) and joins the session's queue only once the worker's earlier steps in this process
// have joined it or ended, or after `maxWaitMs` (a request whose body stalls holds the next one that long
// at most).
//
// This orders one process's requests only: steps of one worker spread over several replicas are ordered by
// the session's row lock, as they reach it (README, "Routing by session").

/** A step's place in its worker's line. */
export interface Place {
  /** Resolves once the steps before it in the line have joined the queue or ended (or after the wait's bound). */
  turn(): Promise<void>;
  /** This step joined the session's queue or ended: the next one may go. Idempotent. */
  leave(): void;
}

interface Entry {
  /** Its request went past its turn (joined the queue or is about to), or ended. */
  left: boolean;
  /** Its turn came (the one before it gone, or the wait's bound passed). */
  turned: boolean;
  /** `gone` resolved: the steps after it may go. */
  done: boolean;
  gone: Promise<void>;
}

const NO_WAIT: Place = { turn: () => Promise.resolve(), leave: () => {} };

export class ArrivalOrder {
  /** Per session and worker: the newest place taken (its predecessors are chained through their promises). */
  private readonly tails = new Map<string, Entry>();

  private readonly maxWaitMs: number;

  /** `maxWaitMs`: how long a step waits at most for the worker's earlier ones; 0 turns the ordering off. */
  constructor(maxWaitMs: number) {
    this.maxWaitMs = maxWaitMs;
  }

  /** Places taken and not yet left, for tests. */
  get lines(): number {
    return this.tails.size;
  }

  /** Takes the next place in `worker`'s line on session `name` (call in the order the requests arrived). */
  take(name: string, worker: string): Place {
    if (this.maxWaitMs <= 0) return NO_WAIT;
    const key = `${name}\u0000${worker}`;
    const before = this.tails.get(key);
    let release!: () => void;
    const entry: Entry = { left: false, turned: false, done: false, gone: new Promise<void>((resolve) => (release = resolve)) };
    this.tails.set(key, entry);
    const maxWaitMs = this.maxWaitMs;
    const finish = () => {
      entry.done = true;
      release();
      if (this.tails.get(key) === entry) this.tails.delete(key);
    };
    return {
      turn(): Promise<void> {
        if (!before || before.done) {
          entry.turned = true;
          return Promise.resolve();
        }
        let timer: NodeJS.Timeout | undefined;
        const bound = new Promise<void>((resolve) => (timer = setTimeout(resolve, maxWaitMs)));
        return Promise.race([before.gone, bound]).finally(() => {
          clearTimeout(timer);
          entry.turned = true;
        });
      },
      leave: () => {
        if (entry.left) return;
        entry.left = true;
        // Ended before its turn came (its client gone while it waited, refused before its handler): the steps
        // after it still wait for the ones before it, or a third step could overtake the first (found by a
        // review: A stalled, B dropped while waiting, C went at once).
        if (entry.turned || !before || before.done) finish();
        else void before.gone.then(finish);
      },
    };
  }
}
