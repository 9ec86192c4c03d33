// client.events(): the session's versions as they are committed, from another replica's steps, resumed
// after a dropped connection, ended by a signal or by the session's deletion.
import assert from 'node:assert/strict';
import test from 'node:test';
import { ASGDClient, SessionNotFound, type SessionEvent } from '../src/index.ts';
import { liveService, uniqueName } from './service.ts';

const spec = (name: string) => ({ name, params: [{ name: 'w', shape: [2], data: [0.5, -0.5] }], hyperparameters: { lr: 0.1 } });

/** The next event of `it` within `ms`. */
async function next(it: AsyncIterator<SessionEvent>, ms = 10_000): Promise<SessionEvent | 'end'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    const r = await Promise.race([it.next(), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no event within ${ms} ms`)), ms)))]);
    return r.done ? 'end' : r.value;
  } finally {
    clearTimeout(timer);
  }
}

test('events: versions from another replica, resumed after a restart, ended by the deletion or a signal', async (t) => {
  const { client, urls, cluster } = await liveService(t, { retryBudgetMs: 30_000 }, {}, 2);
  const other = new ASGDClient(urls[1], { retryBudgetMs: 30_000 });
  const name = uniqueName('events');
  await client.createSession(spec(name));

  const stop = new AbortController();
  const it = client.events(name, { signal: stop.signal })[Symbol.asyncIterator]();
  const first = next(it);
  // The stream is open once the service has answered its headers; a step on the other replica then shows.
  await new Promise((r) => setTimeout(r, 500));
  await other.step(name, { w: [0.1, 0.2] }, { metrics: { loss: 0.5 } });
  const e1 = await first;
  assert.ok(e1 !== 'end' && e1.event === 'version', JSON.stringify(e1));
  assert.equal(e1.version, 2);
  assert.equal(e1.step, 1);
  assert.equal(e1.kind, 'step');
  assert.deepEqual(e1.metrics, { loss: 0.5 });
  assert.ok(!Number.isNaN(Date.parse(e1.time)));

  // The process serving the stream is killed: the iterator opens the stream again (on the restarted
  // process) and resumes after version 2, so the step committed meanwhile on the other replica comes.
  await cluster.processes[0].kill();
  await other.step(name, { w: [0.3, 0.4] }, { metrics: { loss: 0.25 } });
  await cluster.restart(0);
  const e2 = await next(it, 30_000);
  assert.ok(e2 !== 'end' && e2.event === 'version', JSON.stringify(e2));
  assert.equal(e2.version, 3);
  assert.deepEqual(e2.metrics, { loss: 0.25 });

  // The session is deleted: a last event, and the iterator ends.
  await other.deleteSession(name);
  const gone = await next(it);
  assert.deepEqual(gone, { event: 'deleted', session: name });
  assert.equal(await next(it), 'end');
  stop.abort();

  // afterVersion: a version above it is sent at once; a signal ends the iteration.
  const again = uniqueName('events');
  await client.createSession(spec(again));
  await other.step(again, { w: [0.1, 0.2] });
  const abort = new AbortController();
  const resumed = client.events(again, { afterVersion: 1, signal: abort.signal })[Symbol.asyncIterator]();
  const r1 = await next(resumed);
  assert.ok(r1 !== 'end' && r1.event === 'version' && r1.version === 2, JSON.stringify(r1));
  const pending = next(resumed);
  abort.abort();
  assert.equal(await pending, 'end');

  // A session that does not exist: the error, not a stream.
  await assert.rejects(async () => {
    for await (const e of client.events(uniqueName('missing'))) assert.fail(`an event: ${JSON.stringify(e)}`);
  }, SessionNotFound);
});
