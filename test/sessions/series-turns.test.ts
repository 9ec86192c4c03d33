// Downsampled reads take turns in a process (series.ts): two at once, sixteen waiting at most, and a read
// whose client is gone leaves the queue and is never run (a review: reads abandoned after 3 s still ran,
// 18 s each, ahead of the dashboard's).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Database } from '../../src/db/database.ts';
import { createMetricNames, DOWNSAMPLED_READS_AT_ONCE, DOWNSAMPLED_READS_QUEUED, downsampledSeries } from '../../src/sessions/series.ts';

test('downsampled reads: two run at once, sixteen wait, more are 503 TOO_MANY_WAITERS; one whose client is gone is not run', async () => {
  const released: (() => void)[] = [];
  let ran = 0;
  // A database whose series is long enough to be read in buckets, and whose bucket reads wait to be let go.
  const db = {
    kind: 'postgres',
    query: async () => [{ n: 1000, first: 1, last: 1000 }],
    transaction: async () => {
      ran++;
      await new Promise<void>((resolve) => released.push(resolve));
      throw new Error('done');
    },
  } as unknown as Database;
  const names = createMetricNames();
  const read = (signal?: AbortSignal) => downsampledSeries(db, names, 1, 0, 10, signal);
  const running = Array.from({ length: DOWNSAMPLED_READS_AT_ONCE }, () => read().catch((err: Error) => err.message));
  const gone = new AbortController();
  const abandoned = read(gone.signal).catch((err: Error) => err.message);
  const queued = Array.from({ length: DOWNSAMPLED_READS_QUEUED - 1 }, () => read().catch((err: Error) => err.message));
  await new Promise((r) => setImmediate(r));
  await assert.rejects(read(), (err: Error & { code?: string }) => err.code === 'TOO_MANY_WAITERS' && /^downsampled metrics reads/.test(err.message));
  gone.abort(new Error('client gone'));
  assert.equal(await abandoned, 'client gone');
  assert.equal(ran, DOWNSAMPLED_READS_AT_ONCE);
  // Each read let go passes its turn on; the abandoned one is never run.
  while (released.length) {
    released.shift()!();
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.deepEqual(await Promise.all([...running, ...queued]), Array(DOWNSAMPLED_READS_AT_ONCE + DOWNSAMPLED_READS_QUEUED - 1).fill('done'));
  assert.equal(ran, DOWNSAMPLED_READS_AT_ONCE + DOWNSAMPLED_READS_QUEUED - 1);
});
