// A base URL that cannot work (no scheme, another scheme, not a URL) is refused by the constructor at once,
// with a message naming it and what is expected, instead of a minute of retries; a connection failure's
// message says why (the cause under Node's "fetch failed"), and a failure no retry can mend is not retried.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import test from 'node:test';
import { ASGDClient, ConnectionFailed } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';

test('a malformed base URL is a TypeError at construction, naming the URL and the expected form', () => {
  const cases: [string, RegExp][] = [
    ['localhost:8530', /has no scheme.*did you mean "http:\/\/localhost:8530"/],
    ['127.0.0.1:8530', /has no scheme.*did you mean "http:\/\/127\.0\.0\.1:8530"/],
    ['[::1]:8530/', /has no scheme/],
    ['htp://127.0.0.1:8530', /has the scheme "htp"/],
    ['ftp://example.com', /has the scheme "ftp"/],
    ['not a url', /is not a URL/],
    ['', /is not a URL/],
    ['http://user:secret@127.0.0.1:8530', /credentials/],
    ['http://127.0.0.1:8530/?x=1', /query/],
  ];
  for (const [url, reason] of cases) {
    const started = Date.now();
    assert.throws(() => new ASGDClient(url), (err: unknown) => {
      assert.ok(err instanceof TypeError, `${url}: ${String(err)}`);
      assert.ok(err.message.includes(JSON.stringify(url)), `${url}: the message names the URL: ${err.message}`);
      assert.match(err.message, /http:\/\/host:port/, `${url}: the message says what is expected`);
      assert.match(err.message, reason);
      return true;
    });
    assert.ok(Date.now() - started < 100, `${url}: refused at once`);
    assert.throws(() => new RemoteASGD({ client: url, session: 's' }), TypeError, `${url}: RemoteASGD with a URL too`);
  }
  // What works: http and https, a trailing slash, a path prefix.
  assert.equal(new ASGDClient('http://127.0.0.1:8530/').http.baseUrl, 'http://127.0.0.1:8530');
  assert.equal(new ASGDClient('https://asgd.example.com/prefix').http.baseUrl, 'https://asgd.example.com/prefix');
  assert.equal(new ASGDClient('http://[::1]:8530').http.baseUrl, 'http://[::1]:8530');
});

test('a refused connection names its cause; a cause without a code is named by its message', async () => {
  // A port that was free a moment ago: nothing listens there.
  const server = net.createServer().listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((r) => server.close(r));
  const refused = await new ASGDClient(`http://127.0.0.1:${port}`, { retryBudgetMs: 300 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.ok(refused instanceof ConnectionFailed, String(refused));
  assert.match(refused.message, new RegExp(`ECONNREFUSED 127\\.0\\.0\\.1:${port}`));
  assert.equal(refused.code, 'ECONNREFUSED', 'the system code, for a program to test');

  // Node's fetch: TypeError('fetch failed') whose cause says why, with or without a code.
  const failing = (cause: unknown): typeof fetch => async () => {
    throw new TypeError('fetch failed', { cause });
  };
  const socket = await new ASGDClient('http://127.0.0.1:8530', { fetch: failing(new Error('other side closed')), retryBudgetMs: 0 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.ok(socket instanceof ConnectionFailed);
  assert.match(socket.message, /fetch failed: other side closed \(after 1 attempt\(s\)\)$/);
  assert.equal(socket.code, 'CONNECTION_FAILED', 'no code among the causes');
  const both = new AggregateError([
    Object.assign(new Error('connect ECONNREFUSED ::1:8530'), { code: 'ECONNREFUSED' }),
    Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:8530'), { code: 'ECONNREFUSED' }),
  ], '');
  Object.assign(both, { code: 'ECONNREFUSED' });
  const aggregate = await new ASGDClient('http://localhost:8530', { fetch: failing(both), retryBudgetMs: 0 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.ok(aggregate instanceof ConnectionFailed);
  assert.match(aggregate.message, /connect ECONNREFUSED ::1:8530: connect ECONNREFUSED 127\.0\.0\.1:8530/);
  const coded = await new ASGDClient('http://h:1', { fetch: failing(Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' })), retryBudgetMs: 0 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.match((coded as Error).message, /fetch failed: socket hang up \(ECONNRESET\)/);
  assert.equal((coded as ConnectionFailed).code, 'ECONNRESET');
  assert.equal((aggregate as ConnectionFailed).code, 'ECONNREFUSED');
});

test('a failure no retry can mend (a port fetch refuses) fails at once, not after the retry budget', async () => {
  const started = Date.now();
  // Port 10080 is on fetch's list of bad ports: undici refuses it before connecting.
  const err = await new ASGDClient('http://127.0.0.1:10080', { retryBudgetMs: 10_000 }).step('s', { w: [1] }, { format: 'json' }).then(() => null, (e: unknown) => e);
  assert.ok(err instanceof ConnectionFailed && err.attempts === 1, String(err));
  assert.match(err.message, /bad port/);
  assert.ok(Date.now() - started < 2_000, `failed after ${Date.now() - started} ms`);
});
