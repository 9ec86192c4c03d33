// The retry rules on a local stand-in server: 503 answers are retried (Retry-After honoured) for any
// method, a silent server counts as a lost answer (retried only when repeatable), and the budget ends it.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import test from 'node:test';
import { ASGDClient, ConnectionFailed, ServiceUnavailable } from '../src/index.ts';

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
  let calls = 0;
  const url = await standIn(t, () => {
    calls++; // and never answer
  });
  const write = await new ASGDClient(url, { timeoutMs: 200, retryBudgetMs: 5_000 }).step('s', { w: [1] }, { format: 'json', idempotencyKey: null }).then(() => null, (e: unknown) => e);
  assert.ok(write instanceof ConnectionFailed && write.attempts === 1, String(write));
  calls = 0;
  const read = await new ASGDClient(url, { timeoutMs: 200, retryBudgetMs: 1_000 }).getSession('s').then(() => null, (e: unknown) => e);
  assert.ok(read instanceof ConnectionFailed && read.attempts > 1, String(read));
  assert.equal(calls, read.attempts);
});
