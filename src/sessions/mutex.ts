// In-process bookkeeping per key. KeyedMutex: one step (or read of decoded state) per session at a time in this
// process. Across processes the session row lock serialises; this keeps a process from parking several
// pooled connections on the same row lock and from reading an arena while it is being stepped.
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();

  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const current = new Promise<void>((resolve) => (release = resolve));
    const tail = previous.then(() => current);
    this.tails.set(key, tail);
    await previous;
    try {
      return await fn();
    } finally {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }
}

/**
 * How many holds each key has in this process (a session's contributions waiting for their round, a token's
 * open event streams or waiting reads). `hold` counts one more and returns its release, which counts it off
 * once however often it is called; a key whose last hold is released is forgotten.
 */
export class CountedHolds<K> {
  private readonly counts = new Map<K, number>();

  count(key: K): number {
    return this.counts.get(key) ?? 0;
  }

  keys(): IterableIterator<K> {
    return this.counts.keys();
  }

  hold(key: K): () => void {
    this.counts.set(key, this.count(key) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = this.count(key) - 1;
      if (left > 0) this.counts.set(key, left);
      else this.counts.delete(key);
    };
  }
}
