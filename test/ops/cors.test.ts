// CORS for browser pages on other origins (ASGD_CORS_ORIGINS): off by default; preflights answered without
// a token; every answer to an allowed origin, errors included, names it and exposes what clients read.
import assert from 'node:assert/strict';
import { get, type IncomingMessage } from 'node:http';
import { test } from 'node:test';
import { ConfigError } from '../../src/config.ts';
import { buildTestApp, testConfig } from '../helper.ts';
import { ADMIN, asAdmin, createSession, gradBody } from './support.ts';

const PAGE = 'https://trainer.example:8443';
const preflight = (origin: string, method = 'POST', headers = 'authorization, content-type, idempotency-key, if-match') => ({
  method: 'OPTIONS' as const, url: '/v1/sessions/c/step',
  headers: { origin, 'access-control-request-method': method, 'access-control-request-headers': headers },
});
const list = (value: unknown) => String(value ?? '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);

test('CORS is off unless configured: no CORS headers, and a preflight is a method the path does not have (405)', async (t) => {
  const { app } = await buildTestApp(t);
  await createSession(app, 'c', {});
  const res = await app.inject({ url: '/v1/sessions/c', headers: { origin: PAGE } });
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['access-control-allow-origin'], undefined);
  const pre = await app.inject(preflight(PAGE));
  assert.equal(pre.statusCode, 405);
  assert.equal(pre.json().code, 'METHOD_NOT_ALLOWED');
  assert.equal(pre.headers['access-control-allow-origin'], undefined);
});

test('CORS for listed origins: preflight without a token, the origin and exposed headers on answers and errors, others refused', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_CORS_ORIGINS: `http://localhost:5173, ${PAGE}` } });
  await createSession(app, 'c');

  // The preflight of a step as the TypeScript client sends it: no Authorization header, answered 204.
  const pre = await app.inject(preflight(PAGE));
  assert.equal(pre.statusCode, 204, pre.body);
  assert.equal(pre.headers['access-control-allow-origin'], PAGE);
  for (const method of ['GET', 'POST', 'PUT', 'PATCH', 'DELETE']) assert.ok(list(pre.headers['access-control-allow-methods']).includes(method.toLowerCase()), method);
  for (const header of ['authorization', 'content-type', 'idempotency-key', 'if-match', 'if-none-match']) {
    assert.ok(list(pre.headers['access-control-allow-headers']).includes(header), header);
  }
  assert.ok(Number(pre.headers['access-control-max-age']) > 0);
  assert.ok(list(pre.headers.vary).includes('origin'));

  // The request itself: the origin, and the headers a client reads.
  const step = await app.inject({
    method: 'POST', url: '/v1/sessions/c/step', headers: { ...asAdmin, origin: PAGE, 'idempotency-key': 'k1', 'if-match': '"1"' },
    payload: gradBody(1),
  });
  assert.equal(step.statusCode, 200, step.body);
  assert.equal(step.headers['access-control-allow-origin'], PAGE);
  for (const header of ['etag', 'x-request-id', 'retry-after', 'x-session-version']) assert.ok(list(step.headers['access-control-expose-headers']).includes(header), header);
  assert.equal(step.headers.etag, '"2"');
  // Errors too, so that a page can read the code (and Retry-After, WWW-Authenticate).
  const denied = await app.inject({ url: '/v1/sessions/c', headers: { origin: PAGE } });
  assert.equal(denied.statusCode, 401);
  assert.equal(denied.json().code, 'UNAUTHORIZED');
  assert.equal(denied.headers['access-control-allow-origin'], PAGE);
  assert.ok(list(denied.headers['access-control-expose-headers']).includes('www-authenticate'));
  // A route with its own Vary keeps Origin in it.
  const root = await app.inject({ url: '/', headers: { origin: PAGE, accept: 'application/json' } });
  assert.deepEqual(list(root.headers.vary).sort(), ['accept', 'origin']);

  // Another origin gets nothing: the browser then refuses the answer to the page.
  const other = await app.inject(preflight('https://evil.example'));
  assert.equal(other.headers['access-control-allow-origin'], undefined);
  assert.equal(other.statusCode, 403, 'refused by name, not a 405 that reads as a routing problem');
  assert.equal(other.json().code, 'FORBIDDEN');
  assert.match(other.json().message, /^Origin: "https:\/\/evil\.example" is not one of the origins allowed to call this API \(ASGD_CORS_ORIGINS\)$/);
  assert.equal(other.headers['www-authenticate'], undefined, 'no token would help: no Bearer challenge');
  assert.ok(pre.headers['x-request-id'], 'a preflight says which request it was');
  // A refusal made before any route (a body in a Content-Encoding, a request while shutting down) names
  // the origin too, so the page reads it instead of a network error (found by a review).
  const coded = await app.inject({ method: 'POST', url: '/v1/sessions/c/step', headers: { ...asAdmin, origin: PAGE, 'content-type': 'application/json', 'content-encoding': 'gzip' }, payload: '{}' });
  assert.equal(coded.statusCode, 415, coded.body);
  assert.equal(coded.headers['access-control-allow-origin'], PAGE);
  const otherGet = await app.inject({ url: '/v1/sessions/c', headers: { ...asAdmin, origin: 'https://trainer.example' } });
  assert.equal(otherGet.statusCode, 200);
  assert.equal(otherGet.headers['access-control-allow-origin'], undefined);
  assert.ok(list(otherGet.headers.vary).includes('origin'));
  // A preflight changed nothing.
  assert.equal((await app.inject({ url: '/v1/sessions/c', headers: asAdmin })).json().version, 2);

  // An event stream (written directly, not through fastify's reply) carries the origin too.
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const stream = await new Promise<IncomingMessage>((resolve, reject) => {
    get({ host: '127.0.0.1', port, path: '/v1/sessions/c/events', headers: { ...asAdmin, origin: PAGE } }, resolve).on('error', reject);
  });
  stream.destroy();
  assert.equal(stream.statusCode, 200);
  assert.match(String(stream.headers['content-type']), /^text\/event-stream/);
  assert.equal(stream.headers['access-control-allow-origin'], PAGE);
});

test('ASGD_CORS_ORIGINS=*: any origin, answered as *', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_CORS_ORIGINS: '*', ASGD_ADMIN_TOKEN: 'admin-token-for-the-any-origin-test' } });
  const pre = await app.inject(preflight('http://127.0.0.1:9999', 'PUT'));
  assert.equal(pre.statusCode, 204);
  assert.equal(pre.headers['access-control-allow-origin'], '*');
  const res = await app.inject({ url: '/v1/sessions', headers: { origin: 'https://anywhere.example' } });
  assert.equal(res.headers['access-control-allow-origin'], '*');
  assert.equal(res.headers.vary, undefined);
});

test('ASGD_CORS_ORIGINS=* needs auth: with every request the admin\'s, it would let every web page read, change and delete every session', () => {
  // A security review: a page on any site read the session list and deleted a session.
  assert.throws(() => testConfig({ ASGD_CORS_ORIGINS: '*' }), (err: Error) => err instanceof ConfigError && /^refusing ASGD_CORS_ORIGINS=\* without authentication: .*ASGD_ADMIN_TOKEN/.test(err.message));
  assert.equal(testConfig({ ASGD_CORS_ORIGINS: '*', ASGD_ADMIN_TOKEN: 'admin-token-for-the-any-origin-test' }).corsOrigins, '*');
  assert.equal(testConfig({ ASGD_CORS_ORIGINS: '*', ASGD_ALLOW_INSECURE: 'true' }).corsOrigins, '*');
  // A list names the pages the operator trusts: taken without auth too.
  assert.deepEqual(testConfig({ ASGD_CORS_ORIGINS: 'http://localhost:5173' }).corsOrigins, ['http://localhost:5173']);
});

test('ASGD_CORS_ORIGINS: origins only (scheme://host[:port]), or * alone; default ports as browsers write them', () => {
  assert.equal(testConfig().corsOrigins, null);
  assert.deepEqual(testConfig({ ASGD_CORS_ORIGINS: 'HTTPS://App.Example:443,http://localhost:3000' }).corsOrigins, ['https://app.example', 'http://localhost:3000']);
  for (const bad of ['app.example', 'https://app.example/', 'https://app.example/path', 'ftp://app.example', '*,https://app.example', 'https://*.example']) {
    assert.throws(() => testConfig({ ASGD_CORS_ORIGINS: bad }), (err: Error) => err instanceof ConfigError && /ASGD_CORS_ORIGINS/.test(err.message), bad);
  }
});
