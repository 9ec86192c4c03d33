// The retry rules on a local stand-in server: 503 answers are retried (Retry-After honoured) for any
// method, a silent server counts as a lost answer (retried only when repeatable), and the budget ends it;
// a contribution's 202 pending is sent again, byte for byte with the same key, until its round answers.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import test from 'node:test';
import { ASGDClient, ConnectionFailed, encodeSafetensors, ServiceError, ServiceUnavailable } from '../src/index.ts';

async function standIn(t: test.TestContext, handler: http.RequestListener) {
  const server = http.createServer(handler);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  return `http://127.0.0.1:${(server.address() as { port: number }).port}`;
}

test('503 answers are retried within the budget, for a POST without a key too', async (t) => {
  let calls = 0;
  const url = await standIn(t, (req, res) => {
    calls++;
    if (calls < 3) return res.writeHead(503, { 'content-type': 'application/json', 'retry-after': '0' }).end(JSON.stringify({ statusCode: 503, code: 'SERVICE_UNAVAILABLE', message: 'database unreachable' }));
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ session: 's', step: 1, version: 2, staleness: 0 }));
  });
  const r = await new ASGDClient(url).step('s', { w: [1] }, { format: 'json', idempotencyKey: null });
  assert.deepEqual([r.version, r.attempts, calls], [2, 3, 3]);
  calls = 0;
  const budgetEnds = await new ASGDClient(url, { retryBudgetMs: 50 }).listSessions().then(() => null, (e: unknown) => e);
  assert.ok(budgetEnds instanceof ServiceUnavailable && budgetEnds.code === 'SERVICE_UNAVAILABLE', String(budgetEnds));
});

test('a server that never answers: one attempt per timeout; a read is sent again, a keyless write is not', async (t) => {
  // Counted by method: on a loaded machine the write's request can reach the server after the client gave
  // it up (seen in a CI run: 4 calls counted for the read's 3 attempts).
  const calls = { POST: 0, GET: 0 };
  const url = await standIn(t, (req) => {
    calls[req.method as 'POST' | 'GET']++; // and never answer
  });
  const write = await new ASGDClient(url, { timeoutMs: 200, retryBudgetMs: 5_000 }).step('s', { w: [1] }, { format: 'json', idempotencyKey: null }).then(() => null, (e: unknown) => e);
  assert.ok(write instanceof ConnectionFailed && write.attempts === 1, String(write));
  const read = await new ASGDClient(url, { timeoutMs: 200, retryBudgetMs: 1_000 }).getSession('s').then(() => null, (e: unknown) => e);
  assert.ok(read instanceof ConnectionFailed && read.attempts > 1, String(read));
  // Each attempt reached the server (the last one may still be on its way when the client gives up).
  const deadline = Date.now() + 5_000;
  while (calls.GET < read.attempts && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.equal(calls.GET, read.attempts);
  assert.ok(calls.POST <= 1, `the keyless write reached the server ${calls.POST} times`);
});

test('a 202 pending is sent again with the same key and body; the round in a safetensors answer is read', async (t) => {
  const sent: { url: string; key: string | undefined; body: Buffer }[] = [];
  const url = await standIn(t, async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    sent.push({ url: req.url!, key: req.headers['idempotency-key'] as string | undefined, body: Buffer.concat(chunks) });
    const round = { version: 4, contributions: 1, samples: 8, workers: ['w0'], age_s: 0.5 };
    if (sent.length < 3) return res.writeHead(202, { 'content-type': 'application/json' }).end(JSON.stringify({ pending: true, round }));
    const metadata = { session: 's', version: '5', step: '4', staleness: '0', round: JSON.stringify({ version: 4, contributions: 2, samples: 16, timed_out: false }) };
    res.writeHead(200, { 'content-type': 'application/x-safetensors' }).end(encodeSafetensors({ w: { shape: [1], data: Float32Array.from([0.5]) } }, metadata));
  });
  const r = await new ASGDClient(url).step('s', { w: { shape: [1], data: Float32Array.from([1]) } }, { baseVersion: 4, worker: 'w0', samples: 8, wait: 2, return: 'params' });
  assert.deepEqual([r.version, r.attempts, r.round, Array.from(r.params!.w.data)], [5, 3, { version: 4, contributions: 2, samples: 16, timed_out: false }, [0.5]]);
  assert.equal(sent.length, 3);
  assert.ok(sent[0].key && sent.every((s) => s.key === sent[0].key && s.url === sent[0].url && s.body.equals(sent[0].body)), 'the same request each time');
  assert.deepEqual(Object.fromEntries(new URL(sent[0].url, url).searchParams), { return: 'params', wait: '2', base_version: '4', worker: 'w0', samples: '8' });
  await assert.rejects(new ASGDClient(url).step('s', { w: [1] }, { worker: 'w0', idempotencyKey: null }), RangeError, 'a contribution without a key could not be sent again');
});

test('a Retry-After past the retry budget ends the retries at once; one within it is waited for', async (t) => {
  let calls = 0;
  let after = '20';
  const url = await standIn(t, (req, res) => {
    calls++;
    if (calls === 1) return res.writeHead(429, { 'content-type': 'application/json', 'retry-after': after }).end(JSON.stringify({ statusCode: 429, code: 'RATE_LIMITED', message: 'too many requests' }));
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ sessions: [], next: null }));
  });
  const started = Date.now();
  const refused = await new ASGDClient(url, { retryBudgetMs: 15_000, logger: null }).listSessions().then(() => null, (e: unknown) => e);
  assert.ok(refused instanceof ServiceError && refused.code === 'RATE_LIMITED', String(refused));
  assert.equal(calls, 1, 'not sent again before the service said it would take it');
  assert.ok(Date.now() - started < 5_000, `${Date.now() - started} ms`);
  calls = 0;
  after = '1';
  const listed = await new ASGDClient(url, { retryBudgetMs: 15_000, logger: null }).listSessions();
  assert.deepEqual([listed.sessions, calls], [[], 2]);
  // As an HTTP-date (RFC 9110 10.2.3; a proxy may send one), the same (a JavaScript user's review: a date
  // was taken for no Retry-After, and retried at the back-off's pace).
  calls = 0;
  after = new Date(Date.now() + 20_000).toUTCString();
  const dated = Date.now();
  const refusedByDate = await new ASGDClient(url, { retryBudgetMs: 15_000, logger: null }).listSessions().then(() => null, (e: unknown) => e);
  assert.ok(refusedByDate instanceof ServiceError && refusedByDate.code === 'RATE_LIMITED', String(refusedByDate));
  assert.ok(calls === 1 && Date.now() - dated < 5_000, `${calls} calls in ${Date.now() - dated} ms`);
  calls = 0;
  after = new Date(Date.now() + 2_000).toUTCString(); // whole seconds: 1-2 s from now
  const waited = Date.now();
  await new ASGDClient(url, { retryBudgetMs: 15_000, logger: null }).listSessions();
  assert.equal(calls, 2);
  assert.ok(Date.now() - waited >= 900, `sent again after ${Date.now() - waited} ms`);
});

test('in a browser: a bare "Failed to fetch" from another origin names ASGD_CORS_ORIGINS; a create sent with sendAgain is retried', async (t) => {
  Object.defineProperty(globalThis, 'location', { value: { origin: 'http://page.example:4811', href: 'http://page.example:4811/index.html' }, configurable: true });
  t.after(() => delete (globalThis as { location?: unknown }).location);
  const failing: typeof fetch = async () => {
    throw new TypeError('Failed to fetch'); // what Chromium's fetch rejects with: no cause, no code
  };
  const other = await new ASGDClient('http://asgd.example:8080', { fetch: failing, retryBudgetMs: 0 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.ok(other instanceof ConnectionFailed, String(other));
  assert.match(other.message, /Failed to fetch \(a network error, or the service at http:\/\/asgd\.example:8080 refused this page's origin http:\/\/page\.example:4811: is it in the service's ASGD_CORS_ORIGINS\?/);
  const same = await new ASGDClient('/asgd', { fetch: failing, retryBudgetMs: 0 }).getSession('x').then(() => null, (e: unknown) => e);
  assert.ok(same instanceof ConnectionFailed && !same.message.includes('ASGD_CORS_ORIGINS'), String(same));

  // A create whose answer is lost once: not sent again by default (it may have landed), sent again with sendAgain.
  let posts = 0;
  const losesFirst: typeof fetch = async (input, init) => {
    if (init?.method === 'POST' && posts++ === 0) throw new TypeError('Failed to fetch');
    return new Response(JSON.stringify({ name: 's', version: 1 }), { status: 201, headers: { 'content-type': 'application/json' } });
  };
  const spec = { name: 's', params: [{ name: 'w', shape: [1], data: [1] }] };
  const once = await new ASGDClient('http://asgd.example:8080', { fetch: losesFirst, retryBudgetMs: 5_000, logger: null }).createSession(spec).then(() => null, (e: unknown) => e);
  assert.ok(once instanceof ConnectionFailed && once.attempts === 1, String(once));
  posts = 0;
  const created = await new ASGDClient('http://asgd.example:8080', { fetch: losesFirst, retryBudgetMs: 5_000, logger: null }).createSession(spec, { sendAgain: true });
  assert.deepEqual([created.version, posts], [1, 2]);
});
