// A page on another origin calls the API from a real browser (headless Chromium): with ASGD_CORS_ORIGINS
// naming the page's origin, a step with a bearer token, Idempotency-Key and If-Match goes through (after
// the browser's preflight) and the page reads ETag, X-Request-Id and the error codes; without it the
// browser refuses every answer to the page.
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';
import { test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { buildTestApp } from '../helper.ts';
import { chromiumMissing, launch, newPage } from './browser.ts';

const ADMIN = 'admin-token-for-the-cors-browser-test';
const skip = chromiumMissing() ?? false;

async function listen(app: FastifyInstance): Promise<string> {
  await app.listen({ port: 0, host: '127.0.0.1' });
  return `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
}

/** What the page does, as a training script in a browser would: create, step twice (once retried), read. */
async function trainFromPage({ api, token }: { api: string; token: string }) {
  const auth = { authorization: `Bearer ${token}` };
  const json = { ...auth, 'content-type': 'application/json' };
  // Each call bounded: a request that never ends fails the test, saying which, instead of holding the run
  // (seen once in CI: this test waited 21 minutes).
  let at = 'create';
  const bounded = () => AbortSignal.timeout(30_000);
  try {
    const created = await fetch(`${api}/v1/sessions`, { method: 'POST', headers: json, body: JSON.stringify({ name: 'browser', params: [{ name: 'w', shape: [2], data: [1, 2] }] }), signal: bounded() });
    const step = () => fetch(`${api}/v1/sessions/browser/step`, {
      method: 'POST', headers: { ...json, 'idempotency-key': 'page-step-1', 'if-match': '"1"' }, body: JSON.stringify({ grads: { w: [0.5, -0.5] } }), signal: bounded(),
    });
    at = 'step';
    const first = await step();
    at = 'step again';
    const retried = await step();
    at = 'read without a token';
    const anonymous = await fetch(`${api}/v1/sessions/browser`, { signal: bounded() });
    // The event stream as the TypeScript client resumes it (Last-Event-ID): its first event is the version.
    at = 'events';
    const stop = new AbortController();
    const events = await fetch(`${api}/v1/sessions/browser/events`, { headers: { ...auth, 'last-event-id': '1' }, signal: AbortSignal.any([stop.signal, bounded()]) });
    const reader = events.body!.getReader();
    let text = '';
    while (!/\nid: \d+/.test(text)) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    stop.abort();
    return {
      created: created.status, etag: first.headers.get('etag'), requestId: first.headers.get('x-request-id'), step: (await first.json()).step,
      retried: [retried.status, (await retried.json()).step], anonymous: [anonymous.status, (await anonymous.json()).code, anonymous.headers.get('www-authenticate')],
      resumed: [events.status, /\nid: (\d+)/.exec(text)?.[1] ?? text],
    };
  } catch (err) {
    return { failed: String(err), at };
  }
}

test('a page on another origin trains through the API with ASGD_CORS_ORIGINS, and cannot without it', { skip, timeout: 180_000 }, async (t) => {
  const pages = createServer((_req, res) => res.end('<!doctype html><title>trainer</title>'));
  pages.listen(0, '127.0.0.1');
  await once(pages, 'listening');
  t.after(() => pages.close());
  const pageOrigin = `http://127.0.0.1:${(pages.address() as { port: number }).port}`;

  // The browser first: its close (an after hook) then runs before the apps', which would wait for a
  // connection the browser still held.
  const browser = await launch(t);
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_CORS_ORIGINS: pageOrigin } });
  const { app: closed } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  const [api, closedApi] = [await listen(app), await listen(closed)];

  const log: string[] = [];
  const page = await newPage(browser, log);
  await page.goto(pageOrigin);
  const open = await page.evaluate(trainFromPage, { api, token: ADMIN });
  assert.deepEqual({ ...open, requestId: typeof open.requestId }, {
    created: 201, etag: '"2"', requestId: 'string', step: 1, retried: [200, 1],
    anonymous: [401, 'UNAUTHORIZED', 'Bearer realm="asgd-serve"'], resumed: [200, '2'],
  }, log.join('\n'));
  assert.equal((await app.inject({ url: '/v1/sessions/browser', headers: { authorization: `Bearer ${ADMIN}` } })).json().step, 1, 'the retry did not step twice');

  // The control: the same page against a service without CORS gets no answer at all.
  const refused = await page.evaluate(trainFromPage, { api: closedApi, token: ADMIN });
  assert.match(String(refused.failed), /Failed to fetch/);
  assert.equal((await closed.inject({ url: '/v1/sessions/browser', headers: { authorization: `Bearer ${ADMIN}` } })).statusCode, 404, 'the preflight stopped the create');
});
