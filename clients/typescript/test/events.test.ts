// client.events(): the session's versions as they are committed, from another replica's steps, resumed
// after a dropped connection or a silent one (a hung replica), ended by a signal or by the session's deletion.
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import test, { type TestContext } from 'node:test';
import { ASGDClient, ConnectionFailed, SessionNotFound, type SessionEvent } from '../src/index.ts';
import { ownService, uniqueName } from './service.ts';

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
  const { client, urls, cluster } = await ownService(t, { retryBudgetMs: 30_000 }, {}, 2);
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
  // process) with Last-Event-ID 2. As the README says, the service then sends the newest version at once:
  // the three committed meanwhile on the other replica come as one event (5), not replayed; the metrics
  // after version 2 fill the gap.
  await cluster.processes[0].kill();
  for (const loss of [0.25, 0.125, 0.0625]) await other.step(name, { w: [0.3, 0.4] }, { metrics: { loss } });
  await cluster.restart(0);
  const e2 = await next(it, 30_000);
  assert.ok(e2 !== 'end' && e2.event === 'version', JSON.stringify(e2));
  assert.equal(e2.version, 5);
  assert.deepEqual(e2.metrics, { loss: 0.0625 });
  const gap = await client.metrics(name, { afterVersion: 2 });
  assert.deepEqual(gap.points.map((p) => [p.version, p.values.loss]), [[3, 0.25], [4, 0.125], [5, 0.0625]]);

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

  // Deleted and created again under its name while the connection was down, the new one stepped past the
  // old one's version: the iterator says deleted and ends, and yields none of the new session's versions
  // (they count from 1 again: version 4 here is not a step after the 2 received).
  const replaced = uniqueName('events');
  await client.createSession(spec(replaced));
  const follow = client.events(replaced)[Symbol.asyncIterator]();
  const f1 = next(follow);
  await new Promise((r) => setTimeout(r, 500));
  await other.step(replaced, { w: [0.1, 0.2] });
  const v2 = await f1;
  assert.ok(v2 !== 'end' && v2.event === 'version' && v2.version === 2, JSON.stringify(v2));
  await cluster.processes[0].kill();
  await other.deleteSession(replaced);
  await other.createSession(spec(replaced));
  for (let k = 0; k < 3; k++) await other.step(replaced, { w: [0.1, 0.2] });
  await cluster.restart(0);
  // replaced: the service says another session of the name is there now (found by a review: the client dropped it).
  assert.deepEqual(await next(follow, 30_000), { event: 'deleted', session: replaced, replaced: true });
  assert.equal(await next(follow), 'end');

  // Deleted (and not made again) while the connection was down: the reopened stream's 404 is the deletion,
  // yielded as such, not a SessionNotFound thrown out of the loop.
  const plain = uniqueName('events');
  await client.createSession(spec(plain));
  const watch = client.events(plain)[Symbol.asyncIterator]();
  const w1 = next(watch);
  await new Promise((r) => setTimeout(r, 500));
  await other.step(plain, { w: [0.1, 0.2] });
  assert.ok((await w1) !== 'end');
  await cluster.processes[0].kill();
  await other.deleteSession(plain);
  await cluster.restart(0);
  assert.deepEqual(await next(watch, 30_000), { event: 'deleted', session: plain });
  assert.equal(await next(watch), 'end');

  // A session that does not exist: the error, not a stream.
  await assert.rejects(async () => {
    for await (const e of client.events(uniqueName('missing'))) assert.fail(`an event: ${JSON.stringify(e)}`);
  }, SessionNotFound);
});

/**
 * A fake replica on a loopback port: `answer(request, n)` serves the n-th events request (from 1) and may
 * leave it open and silent, as a stopped process whose kernel keeps the TCP connection up. Records each
 * request's Last-Event-ID and whether the client closed it.
 */
async function fakeReplica(t: TestContext, answer: (res: ServerResponse, n: number) => void) {
  const requests: { lastEventId: string | undefined; closed: boolean; at: number }[] = [];
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const seen = { lastEventId: req.headers['last-event-id'] as string | undefined, closed: false, at: Date.now() };
    requests.push(seen);
    res.on('close', () => (seen.closed = true));
    answer(res, requests.length);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve); }));
  const address = server.address();
  assert.ok(address && typeof address === 'object');
  return { url: `http://127.0.0.1:${address.port}`, requests };
}

const sse = (res: ServerResponse) => res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache' });
const version = (v: number) => `id: ${v}\nevent: version\ndata: ${JSON.stringify({ version: v, step: v - 1, time: new Date().toISOString(), kind: 'step' })}\n\n`;

test('events: a stream that goes silent (a hung replica) is opened again after idleTimeoutMs, with Last-Event-ID, and the next version comes', async (t) => {
  const { url, requests } = await fakeReplica(t, (res, n) => {
    sse(res);
    // The first connection: one version, then nothing, the connection left open. The second: the next version.
    res.write(`retry: 2000\n\n${version(n === 1 ? 2 : 3)}`);
  });
  const stop = new AbortController();
  t.after(() => stop.abort());
  const it = new ASGDClient(url, { retryBudgetMs: 5_000 }).events('hung', { signal: stop.signal, idleTimeoutMs: 400 })[Symbol.asyncIterator]();
  const e1 = await next(it, 5_000);
  assert.ok(e1 !== 'end' && e1.event === 'version' && e1.version === 2, JSON.stringify(e1));
  const e2 = await next(it, 5_000);
  assert.ok(e2 !== 'end' && e2.event === 'version' && e2.version === 3, JSON.stringify(e2));
  assert.equal(requests.length, 2);
  assert.equal(requests[1].lastEventId, '2', 'resumed after the last version received');
  assert.ok(requests[1].at - requests[0].at >= 400, `reconnected after ${requests[1].at - requests[0].at} ms of silence, not before`);
  assert.equal(requests[0].closed, true, 'the silent connection was closed');
});

test('events: keep-alives keep a quiet stream open past idleTimeoutMs; a replica that never answers ends in ConnectionFailed', async (t) => {
  // The control: a keep-alive every 100 ms, no event for 3 s (well past the 1 s timeout): one connection. The
  // timeout is ten keep-alives long: a CI machine busy beside other suites once delayed one past 400 ms.
  const quiet = await fakeReplica(t, (res) => {
    sse(res);
    res.write('retry: 2000\n\n');
    const timer = setInterval(() => res.write(': keep-alive\n\n'), 100);
    res.on('close', () => clearInterval(timer));
    setTimeout(() => res.write(version(2)), 3_000);
  });
  const stop = new AbortController();
  t.after(() => stop.abort());
  const it = new ASGDClient(quiet.url).events('quiet', { signal: stop.signal, idleTimeoutMs: 1_000 })[Symbol.asyncIterator]();
  const e = await next(it, 8_000);
  assert.ok(e !== 'end' && e.event === 'version' && e.version === 2, JSON.stringify(e));
  assert.equal(quiet.requests.length, 1, 'no reconnection while keep-alives come');

  // Accepts the connection and never answers (no headers): each attempt is given up after idleTimeoutMs and
  // the iterator throws once the retry budget is spent, rather than waiting forever.
  const mute = await fakeReplica(t, () => {});
  const started = Date.now();
  await assert.rejects(async () => {
    for await (const ev of new ASGDClient(mute.url, { retryBudgetMs: 1_000 }).events('mute', { idleTimeoutMs: 300 })) assert.fail(`an event: ${JSON.stringify(ev)}`);
  }, ConnectionFailed);
  const took = Date.now() - started;
  assert.ok(took >= 600 && took < 5_000, `gave up after ${took} ms`);
  assert.ok(mute.requests.length >= 2, `${mute.requests.length} attempts`);
});

test('events: idleTimeoutMs is a positive number; Infinity waits as long as it takes', async (t) => {
  await assert.rejects(async () => {
    for await (const ev of new ASGDClient('http://127.0.0.1:9').events('x', { idleTimeoutMs: 0 })) assert.fail(`an event: ${JSON.stringify(ev)}`);
  }, RangeError);
  // Headers and the first event after 300 ms of silence: no timer fires early.
  const slow = await fakeReplica(t, (res) => setTimeout(() => {
    sse(res);
    res.write(version(2));
  }, 300));
  const stop = new AbortController();
  t.after(() => stop.abort());
  const e = await next(new ASGDClient(slow.url).events('slow', { signal: stop.signal, idleTimeoutMs: Infinity })[Symbol.asyncIterator](), 5_000);
  assert.ok(e !== 'end' && e.event === 'version' && e.version === 2, JSON.stringify(e));
  assert.equal(slow.requests.length, 1);
});
