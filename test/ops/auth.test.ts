import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { test } from 'node:test';
import { buildTestApp, createTestDatabase, TEST_DB_KIND, testConfig } from '../helper.ts';
import { buildApp } from '../../src/app.ts';
import { ConfigError } from '../../src/config.ts';
import { ADMIN, asAdmin, bearer, createSession, createToken, fillPath, operations, step } from './support.ts';

const RANK: Record<string, number> = { read: 1, step: 2, admin: 3 };

/**
 * The access table, reviewed by hand: a new route fails this test until it is added here (with the scope
 * it should need; "*" = not for tokens limited to a list of sessions).
 */
const EXPECTED: Record<string, string> = {
  'GET /': 'public',
  'GET /healthz': 'public',
  'GET /readyz': 'public',
  'GET /metrics': 'public',
  'POST /v1/tokens': 'admin*',
  'GET /v1/tokens': 'admin*',
  'DELETE /v1/tokens/{id}': 'admin*',
  'POST /v1/sessions': 'admin*',
  'GET /v1/sessions': 'read',
  'GET /v1/sessions/{name}': 'read',
  'PATCH /v1/sessions/{name}': 'admin',
  'DELETE /v1/sessions/{name}': 'admin',
  'POST /v1/sessions/{name}/fork': 'admin*',
  'POST /v1/sessions/{name}/step': 'step',
  'PATCH /v1/sessions/{name}/param_groups': 'step',
  'GET /v1/sessions/{name}/params': 'read',
  'GET /v1/sessions/{name}/metrics': 'read',
  'GET /v1/sessions/{name}/events': 'read',
  'GET /v1/sessions/{name}/state_dict': 'read',
  'PUT /v1/sessions/{name}/params': 'step',
  'PUT /v1/sessions/{name}/state_dict': 'admin',
  'GET /v1/sessions/{name}/checkpoint': 'read',
  'PUT /v1/sessions/{name}/checkpoint': 'admin',
  'POST /v1/sessions/{name}/snapshots': 'admin',
  'GET /v1/sessions/{name}/snapshots': 'read',
  'GET /v1/sessions/{name}/snapshots/{id}': 'read',
  'PATCH /v1/sessions/{name}/snapshots/{id}': 'admin',
  'GET /v1/sessions/{name}/snapshots/{id}/params': 'read',
  'GET /v1/sessions/{name}/snapshots/{id}/state_dict': 'read',
  'GET /v1/sessions/{name}/snapshots/{id}/checkpoint': 'read',
  'POST /v1/sessions/{name}/snapshots/{id}/restore': 'admin',
  'GET /v1/tokens/self': 'read',
  'GET /v1/sessions/{name}/norms': 'read',
  'GET /v1/sessions/{name}/hyperparameters': 'read',
};

test('every route in the OpenAPI document: 401 without a token, 403 below its scope, and its scope gets through', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'sa');
  const snapshot = (await app.inject({ url: '/v1/sessions/sa/snapshots', headers: asAdmin })).json().snapshots[0].id as number;
  const tokens: Record<string, string> = {
    read: await createToken(app, 'read'),
    step: await createToken(app, 'step'),
    admin: await createToken(app, 'admin'),
  };
  const limitedAdmin = await createToken(app, 'admin', ['sa', 'nope']);
  const doc = app.swagger() as { paths: Record<string, Record<string, unknown>> };
  const ops = operations(doc);

  // The document is the whole API: every route the app serves (but HEAD twins, the docs UI and the
  // dashboard's files) is in it.
  const served = new Set(app.routeAccess.filter((r) => r.method !== 'HEAD' && !r.url.startsWith('/docs') && !r.url.startsWith('/ui'))
    .map((r) => `${r.method} ${(r.url.length > 1 ? r.url.replace(/\/$/, '') : r.url).replace(/:(\w+)/g, '{$1}')}`));
  assert.deepEqual([...served].sort(), ops.map((o) => `${o.method} ${o.path}`).sort());

  const table = Object.fromEntries(ops.map((o) => [`${o.method} ${o.path}`, `${o.op['x-scope'] ?? 'public'}${o.op['x-all-sessions'] ? '*' : ''}`]));
  for (const key of Object.keys(table)) assert.ok(key in EXPECTED, `${key} is new: add it to EXPECTED in test/ops/auth.test.ts with the scope it should need`);
  for (const key of Object.keys(EXPECTED)) assert.equal(table[key], EXPECTED[key], key);

  const counts = { open: 0, guarded: 0, forbidden: 0, passed: 0 };
  for (const { method, path, op } of ops) {
    const label = `${method} ${path}`;
    const scope = op['x-scope'];
    const target = fillPath(path, { name: 'sa', id: String(snapshot) });
    const body = op.requestBody ? {} : undefined;
    if (!scope) {
      assert.deepEqual(op.security, [], `${label} declares that it is public`);
      const res = await app.inject({ method: method as 'GET', url: target });
      assert.ok(res.statusCode < 400, `${label} is open: ${res.statusCode}`);
      counts.open++;
      continue;
    }
    assert.deepEqual(op.security, [{ bearerAuth: [] }], `${label} declares the bearer scheme`);
    for (const headers of [{}, { authorization: 'Bearer asgd_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' }, { authorization: `Basic ${ADMIN}` }]) {
      const res = await app.inject({ method: method as 'GET', url: target, headers, ...(body && { payload: body }) });
      assert.equal(res.statusCode, 401, `${label} with ${JSON.stringify(headers)}: ${res.body}`);
      assert.equal(res.json().code, 'UNAUTHORIZED');
      assert.match(String(res.headers['www-authenticate']), /^Bearer realm="asgd-serve"/);
      // RFC 6750 section 3: no token (none, or another scheme's credentials) has no error code; an unknown one is invalid_token.
      assert.equal(/error="invalid_token"/.test(String(res.headers['www-authenticate'])), String(headers.authorization ?? '').startsWith('Bearer'), `${label} with ${JSON.stringify(headers)}: ${res.headers['www-authenticate']}`);
    }
    counts.guarded++;
    for (const [have, token] of Object.entries(tokens).filter(([have]) => RANK[have] < RANK[scope])) {
      const res = await app.inject({ method: method as 'GET', url: target, headers: bearer(token), ...(body && { payload: body }) });
      assert.equal(res.statusCode, 403, `${label} with a ${have} token: ${res.body}`);
      assert.equal(res.json().code, 'FORBIDDEN');
      assert.match(res.json().message, /^Authorization: this route needs a token with scope /, 'the message names the field, as a 401\'s does');
      assert.match(String(res.headers['www-authenticate']), new RegExp(`error="insufficient_scope", scope="${scope}"`));
      counts.forbidden++;
    }
    // The scope it needs gets past auth. A session that does not exist keeps the walk free of side effects.
    const harmless = fillPath(path, { name: 'nope', id: '999999', ...(path.startsWith('/v1/tokens') && { id: '0000000000000000' }) });
    const passed = await app.inject({ method: method as 'GET', url: harmless, headers: bearer(tokens[scope]), ...(body && { payload: body }) });
    assert.ok(![401, 403].includes(passed.statusCode), `${label} with a ${scope} token: ${passed.statusCode} ${passed.body}`);
    assert.ok(passed.statusCode < 500, `${label}: ${passed.body}`);
    // A token limited to sessions may not create sessions or manage tokens, whatever its scope.
    if (op['x-all-sessions']) {
      const res = await app.inject({ method: method as 'GET', url: harmless, headers: bearer(limitedAdmin), ...(body && { payload: body }) });
      assert.equal(res.statusCode, 403, `${label} with a session-limited admin token: ${res.body}`);
      // It has the scope: the challenge says why it is refused, not which scope it needs (a review).
      assert.equal(res.headers['www-authenticate'], 'Bearer realm="asgd-serve", error="insufficient_scope", error_description="this route needs a token not limited to a list of sessions"', label);
    }
    counts.passed++;
  }
  assert.ok(counts.guarded >= 20 && counts.open >= 3, JSON.stringify(counts));
  // HEAD twins of GET routes are guarded too (they are not in the document).
  for (const r of app.routeAccess.filter((r) => r.method === 'HEAD' && r.scope !== 'public')) {
    const res = await app.inject({ method: 'HEAD', url: r.url.replace(':name', 'sa').replace(':id', String(snapshot)) });
    assert.equal(res.statusCode, 401, `HEAD ${r.url}`);
  }
  // The docs UI and the document it shows are open, and so are the dashboard's files (not its data).
  for (const url of ['/docs', '/docs/json', '/docs/static/index.html', '/ui', '/ui/', '/ui/js/main.js', '/ui/vendor/uPlot.esm.js']) {
    const res = await app.inject({ url });
    assert.ok(res.statusCode < 400, `${url}: ${res.statusCode}`);
  }
  assert.equal((await app.inject({ url: '/docs/json' })).json().paths['/v1/sessions/{name}/step'].post['x-scope'], 'step');
  // Nothing the walk did changed session sa.
  const after = await app.inject({ url: '/v1/sessions/sa', headers: asAdmin });
  assert.equal(after.json().version, 1, after.body);
  t.diagnostic(`auth walk: ${JSON.stringify(counts)}`);
});

test('every route declares the access it needs: a route that does not stops the app at start, named', async (t) => {
  const db = TEST_DB_KIND === 'postgres' ? await createTestDatabase() : null;
  if (db) t.after(db.drop);
  for (const [config, error] of [
    [undefined, /route GET \/v1\/sessions\/:name\/forgotten: declare the access it needs in its config/],
    [{ scope: 'root' }, /route GET \/v1\/sessions\/:name\/forgotten: config.scope must be one of public, read, step, admin/],
  ] as const) {
    const app = await buildApp({ config: testConfig(db ? { DATABASE_URL: db.url } : { ASGD_DATA_DIR: 'memory://' }), migrate: false, logger: false });
    // As a new route would be added: in a route plugin, with its schema and handler, and no access of its own.
    void app.register(async (routes) => {
      routes.get('/v1/sessions/:name/forgotten', { ...(config && { config: config as never }), schema: { operationId: 'forgotten' } }, async () => ({ open: true }));
    });
    await assert.rejects(async () => { await app.ready(); }, error);
    await app.close();
  }
});

test('a token limited to session A cannot read, step, restore or list session B', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'sa', asAdmin, 1);
  await createSession(app, 'sb', asAdmin, 2);
  await createSession(app, 'sc', asAdmin, 3);
  const snapB = (await app.inject({ url: '/v1/sessions/sb/snapshots', headers: asAdmin })).json().snapshots[0].id;
  const snapA = (await app.inject({ url: '/v1/sessions/sa/snapshots', headers: asAdmin })).json().snapshots[0].id;
  const stepA = bearer(await createToken(app, 'step', ['sa']));
  const adminA = bearer(await createToken(app, 'admin', ['sa', 'sc']));
  const before = (await app.inject({ url: '/v1/sessions/sb/state_dict', headers: asAdmin })).body;

  const denied = async (method: string, url: string, headers: Record<string, string>, payload?: object) => {
    const res = await app.inject({ method: method as 'GET', url, headers, ...(payload && { payload }) });
    assert.equal(res.statusCode, 403, `${method} ${url}: ${res.body}`);
    assert.equal(res.json().code, 'FORBIDDEN');
    assert.match(res.json().message, /^Authorization: .*(sb|limited)/);
    // Not asked for a scope it has (a review: scope="admin" to an admin token limited to other sessions).
    assert.doesNotMatch(String(res.headers['www-authenticate']), /scope=/, `${method} ${url}`);
    assert.match(String(res.headers['www-authenticate']), /error_description="this (token is limited to other sessions|route needs a token not limited to a list of sessions)"/, `${method} ${url}`);
  };
  await denied('GET', '/v1/sessions/sb', stepA);
  await denied('GET', '/v1/sessions/sb/params', stepA);
  await denied('GET', '/v1/sessions/sb/state_dict', stepA);
  await denied('GET', `/v1/sessions/sb/snapshots/${snapB}/params`, stepA);
  await denied('POST', '/v1/sessions/sb/step', stepA, { grads: { b: [0, 0, 0, 0] } });
  await denied('POST', `/v1/sessions/sb/snapshots/${snapB}/restore`, adminA);
  await denied('DELETE', '/v1/sessions/sb', adminA);
  await denied('POST', '/v1/sessions/sa/fork', adminA, { name: 'sa-copy' });
  await denied('POST', '/v1/sessions', adminA, { name: 'sd', params: [{ name: 'w', shape: [1], data: [1] }] });
  await denied('GET', '/v1/tokens', adminA);

  // Its own session works at its scope.
  assert.equal((await app.inject({ url: '/v1/sessions/sa/params', headers: stepA })).statusCode, 200);
  assert.equal((await step(app, 'sa', 1, stepA)).statusCode, 200);
  const restored = await app.inject({ method: 'POST', url: `/v1/sessions/sa/snapshots/${snapA}/restore`, headers: adminA });
  assert.equal(restored.statusCode, 200, restored.body);
  // The list shows only its sessions, page by page, and never names another in `next`.
  const page1 = (await app.inject({ url: '/v1/sessions?limit=1', headers: adminA })).json();
  assert.deepEqual(page1.sessions.map((s: { name: string }) => s.name), ['sa']);
  assert.equal(page1.next, 'sa');
  const page2 = (await app.inject({ url: '/v1/sessions?limit=1&after=sa', headers: adminA })).json();
  assert.deepEqual(page2.sessions.map((s: { name: string }) => s.name), ['sc']);
  assert.equal(page2.next, null);
  assert.deepEqual((await app.inject({ url: '/v1/sessions', headers: stepA })).json().sessions.map((s: { name: string }) => s.name), ['sa']);
  assert.deepEqual((await app.inject({ url: '/v1/sessions', headers: asAdmin })).json().sessions.map((s: { name: string }) => s.name), ['sa', 'sb', 'sc']);
  assert.equal((await app.inject({ url: '/v1/sessions/sb/state_dict', headers: asAdmin })).body, before, 'session B is untouched');
});

test('tokens: shown once, stored as a sha256 only, listed without secrets, revoked at once', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'sa');
  const created = await app.inject({ method: 'POST', url: '/v1/tokens', headers: asAdmin, payload: { name: 'ci reader', scope: 'read' } });
  assert.equal(created.statusCode, 201, created.body);
  assert.equal(created.headers['cache-control'], 'no-store');
  const { id, token, sessions, scope } = created.json();
  assert.match(token, new RegExp(`^asgd_${id}_[A-Za-z0-9_-]{43}$`));
  assert.equal(sessions, null);
  assert.equal(scope, 'read');

  const rows = await app.db.query<Record<string, unknown>>('SELECT * FROM tokens WHERE id = $1', [id]);
  assert.equal(rows.length, 1);
  assert.equal(rows[0].secret_hash, createHash('sha256').update(token).digest('hex'));
  const secret = token.split('_').slice(2).join('_');
  assert.ok(!JSON.stringify(rows[0]).includes(secret), 'the secret is not stored');

  const listed = await app.inject({ url: '/v1/tokens', headers: asAdmin });
  assert.equal(listed.statusCode, 200);
  assert.ok(!listed.body.includes(secret), 'the list never shows a secret');
  assert.deepEqual(listed.json().tokens.map((x: { id: string; revoked_at: null }) => [x.id, x.revoked_at]), [[id, null]]);

  assert.equal((await app.inject({ url: '/v1/sessions/sa', headers: bearer(token) })).statusCode, 200);
  assert.equal((await app.inject({ url: '/v1/sessions/sa', headers: { authorization: `bearer   ${token}  ` } })).statusCode, 200, 'the scheme is case-insensitive');
  const tampered = token.slice(0, -1) + (token.endsWith('A') ? 'B' : 'A');
  assert.equal((await app.inject({ url: '/v1/sessions/sa', headers: bearer(tampered) })).statusCode, 401, 'right id, wrong secret');

  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${id}`, headers: bearer(token) })).statusCode, 403, 'a read token cannot revoke');
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${id}`, headers: asAdmin })).statusCode, 204);
  const revoked = await app.inject({ url: '/v1/sessions/sa', headers: bearer(token) });
  assert.equal(revoked.statusCode, 401);
  assert.equal(revoked.json().code, 'UNAUTHORIZED');
  assert.match(String(revoked.headers['www-authenticate']), /error="invalid_token"/);
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${id}`, headers: asAdmin })).statusCode, 204, 'revoking twice is fine');
  assert.ok((await app.inject({ url: '/v1/tokens', headers: asAdmin })).json().tokens[0].revoked_at);
  const unknown = await app.inject({ method: 'DELETE', url: '/v1/tokens/0123456789abcdef', headers: asAdmin });
  assert.equal(unknown.statusCode, 404);
  assert.equal(unknown.json().code, 'TOKEN_NOT_FOUND');

  const bad: [unknown, RegExp][] = [
    [{ name: 'x', scope: 'root' }, /scope/],
    [{ name: '', scope: 'read' }, /name/],
    [{ name: 'x', scope: 'read', sessions: [] }, /sessions/],
    [{ name: 'x', scope: 'read', sessions: ['no spaces'] }, /sessions/],
    [{ name: 'x', scope: 'read', sessions: ['a', 'a'] }, /sessions/],
    [{ name: 'x', scope: 'read', admin: true }, /additional|admin/],
    [{ name: 'x\u0000y', scope: 'read' }, /name/],
  ];
  for (const [payload, message] of bad) {
    const res = await app.inject({ method: 'POST', url: '/v1/tokens', headers: asAdmin, payload: payload as object });
    assert.equal(res.statusCode, 400, `${JSON.stringify(payload)}: ${res.body}`);
    assert.equal(res.json().code, 'INVALID_BODY');
    assert.match(res.json().message, message);
  }
  assert.equal((await app.inject({ url: '/v1/tokens', headers: asAdmin })).json().tokens.length, 1, 'no failed create left a token');
  for (const authorization of ['Bearer', 'Bearer ', `Token ${ADMIN}`, `Bearer ${ADMIN} extra`, `Bearer ${'x'.repeat(600)}`, `Bearer ${ADMIN.slice(0, -1)}`]) {
    const res = await app.inject({ url: '/v1/sessions', headers: { authorization } });
    assert.equal(res.statusCode, 401, authorization.slice(0, 40));
  }
});

test('admin token rotation: with ASGD_ADMIN_TOKEN_PREVIOUS both the new and the old token are the admin; without it only the new', async (t) => {
  const NEW = 'new-admin-token-0123456789abcdef';
  const rotating = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: NEW, ASGD_ADMIN_TOKEN_PREVIOUS: ADMIN } });
  for (const token of [NEW, ADMIN]) {
    const made = await rotating.app.inject({ method: 'POST', url: '/v1/tokens', headers: bearer(token), payload: { name: `by-${token.slice(0, 3)}`, scope: 'read' } });
    assert.equal(made.statusCode, 201, made.body);
  }
  assert.equal((await rotating.app.inject({ url: '/v1/sessions', headers: bearer('not-an-admin-token-0123456789') })).statusCode, 401);
  const done = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: NEW } });
  assert.equal((await done.app.inject({ url: '/v1/tokens', headers: bearer(NEW) })).statusCode, 200);
  const old = await done.app.inject({ url: '/v1/tokens', headers: bearer(ADMIN) });
  assert.equal(old.statusCode, 401);
  assert.equal(old.json().code, 'UNAUTHORIZED');
  assert.throws(() => testConfig({ ASGD_ADMIN_TOKEN_PREVIOUS: ADMIN }), /ASGD_ADMIN_TOKEN_PREVIOUS is the old admin token during a rotation: set ASGD_ADMIN_TOKEN/);
  assert.throws(() => testConfig({ ASGD_ADMIN_TOKEN: NEW, ASGD_ADMIN_TOKEN_PREVIOUS: 'short' }), /ASGD_ADMIN_TOKEN_PREVIOUS must be at least 16 characters/);
});

test('without an admin token auth is off, and only loopback is allowed', async (t) => {
  const { app } = await buildTestApp(t);
  assert.equal(app.authEnabled, false);
  assert.equal((await app.inject({ url: '/v1/sessions' })).statusCode, 200);
  assert.equal((await app.inject({ url: '/v1/tokens' })).statusCode, 200);
  assert.throws(() => testConfig({ HOST: '0.0.0.0' }), (err: Error) => err instanceof ConfigError && /refusing to listen on 0\.0\.0\.0/.test(err.message));
  assert.throws(() => testConfig({ HOST: '10.1.2.3' }), ConfigError);
  assert.throws(() => testConfig({ HOST: '0.0.0.0', ASGD_ADMIN_TOKEN: 'short' }), /at least 16/);
  // A token no Authorization header can carry would start a service nobody can administer.
  for (const token of ['correct horse battery staple 42', 'x'.repeat(513), `${'y'.repeat(20)}é`]) {
    assert.throws(() => testConfig({ HOST: '0.0.0.0', ASGD_ADMIN_TOKEN: token }), /ASGD_ADMIN_TOKEN must be at most 512 characters of visible ASCII/);
  }
  assert.equal(testConfig({ ASGD_ADMIN_TOKEN: 'z'.repeat(512) }).adminToken, 'z'.repeat(512));
  assert.equal(testConfig({ HOST: '0.0.0.0', ASGD_ADMIN_TOKEN: ADMIN }).host, '0.0.0.0');
  assert.equal(testConfig({ HOST: '0.0.0.0', ASGD_ALLOW_INSECURE: 'true' }).adminToken, null);
  for (const host of ['127.0.0.1', 'localhost', '::1', '127.9.9.9']) assert.equal(testConfig({ HOST: host }).host, host);
});

test('with auth off, a request addressed to a name that is not loopback is refused (DNS rebinding): 403 HOST_NOT_ALLOWED, nothing created', async (t) => {
  // A web page whose own DNS name is pointed at 127.0.0.1 after it loaded sends that name as Host, and reads
  // the answers as its own origin's: with auth off the service would hand it every session and an admin token.
  const { app } = await buildTestApp(t);
  const as = (host: string, method: 'GET' | 'POST' = 'GET', url = '/v1/sessions', payload?: object) =>
    app.inject({ method, url, headers: { host, ...(payload && { origin: `http://${host}` }) }, ...(payload && { payload }) });
  for (const host of ['evil.example:8080', 'evil.example', 'EVIL.example.:8080', '127.0.0.1.evil.example:8080', 'localhost.evil.example', '[::2]:8080', '10.0.0.5:8080']) {
    for (const [method, url, payload] of [
      ['GET', '/v1/sessions'], ['POST', '/v1/tokens', { name: 'rebind', scope: 'admin' }], ['POST', '/v1/sessions', { name: 'planted', params: [{ name: 'w', shape: [1], data: [1] }] }],
      ['GET', '/metrics'], ['GET', '/v1/sessions/nope/params'],
    ] as const) {
      const res = await as(host, method, url, payload);
      assert.equal(res.statusCode, 403, `${method} ${url} with Host ${host}: ${res.body}`);
      assert.equal(res.json().code, 'HOST_NOT_ALLOWED');
      assert.match(res.json().message, /^Host: "[^"]+" is not a loopback name; with auth off .*ASGD_ALLOWED_HOSTS/);
    }
  }
  // Nothing was made by the refused requests.
  assert.deepEqual((await app.inject({ url: '/v1/sessions' })).json().sessions, []);
  assert.deepEqual((await app.inject({ url: '/v1/tokens' })).json().tokens, []);
  // Loopback names, with or without a port, in any case: served.
  for (const host of ['localhost', 'localhost:8080', 'LOCALHOST:1', 'localhost.:8080', '127.0.0.1:8080', '127.9.9.9', '[::1]:8080', 'dev.localhost:8080']) {
    assert.equal((await as(host)).statusCode, 200, host);
  }
  // A long Host is cut in the message, not echoed whole.
  const long = await as(`${'a'.repeat(5000)}.example`);
  assert.equal(long.statusCode, 403);
  assert.ok(long.json().message.length < 800, long.json().message.length.toString());

  // ASGD_ALLOWED_HOSTS adds names (no ports); others stay refused.
  const named = await buildTestApp(t, { env: { ASGD_ALLOWED_HOSTS: 'devbox, Build.Internal' } });
  for (const host of ['devbox:8080', 'build.internal', 'BUILD.INTERNAL:9']) assert.equal((await named.app.inject({ url: '/v1/sessions', headers: { host } })).statusCode, 200, host);
  assert.equal((await named.app.inject({ url: '/v1/sessions', headers: { host: 'other:8080' } })).statusCode, 403);
  assert.throws(() => testConfig({ ASGD_ALLOWED_HOSTS: 'http://devbox' }), /ASGD_ALLOWED_HOSTS: "http:\/\/devbox" is not a host name/);
  assert.throws(() => testConfig({ ASGD_ALLOWED_HOSTS: 'devbox:8080' }), /ASGD_ALLOWED_HOSTS: "devbox:8080" is not a host name/);

  // A request line in absolute form names its host there, and that one counts (RFC 9112 section 3.2.2), over a
  // loopback Host header (found by a review: served).
  await app.listen({ port: 0, host: '127.0.0.1' });
  const port = (app.server.address() as AddressInfo).port;
  const raw = (target: string) => new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(`GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`));
    let text = '';
    socket.on('data', (chunk) => (text += chunk));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
  for (const target of ['http://evil.example/v1/sessions', 'http://evil.example:8080/metrics', 'http://127.0.0.1.evil.example/v1/tokens']) {
    const answer = await raw(target);
    assert.match(answer, /^HTTP\/1\.1 403 /, `${target}: ${answer.slice(0, 200)}`);
    assert.match(answer, /"code":"HOST_NOT_ALLOWED"/);
  }
  for (const target of ['http://localhost:8080/v1/sessions', 'http://127.0.0.1/v1/sessions']) {
    assert.match(await raw(target), /^HTTP\/1\.1 200 /, target);
  }

  // Made to listen beyond loopback without a token (ASGD_ALLOW_INSECURE): reached by the network's addresses
  // and names; any IP address is answered (no page's DNS name), a name only once listed (found by a review:
  // a page on that network rebinding a name of its own read every session).
  const open = await buildTestApp(t, { env: { HOST: '0.0.0.0', ASGD_ALLOW_INSECURE: 'true', ASGD_ALLOWED_HOSTS: 'trainbox' } });
  for (const host of ['evil.example:8080', 'evil.example', '127.0.0.1.evil.example']) {
    const res = await open.app.inject({ url: '/v1/sessions', headers: { host } });
    assert.equal(res.statusCode, 403, host);
    assert.match(res.json().message, /^Host: "[^"]+" is a name not listed in ASGD_ALLOWED_HOSTS; with auth off .* an IP address/);
  }
  for (const host of ['192.0.2.2:8080', '10.0.0.5', '[2001:db8::1]:8080', '[::1]', 'localhost:8080', 'trainbox:8080', 'TRAINBOX']) {
    assert.equal((await open.app.inject({ url: '/v1/sessions', headers: { host } })).statusCode, 200, host);
  }

  // With auth on the token is what counts: any Host.
  const authed = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  assert.equal((await authed.app.inject({ url: '/v1/sessions', headers: { host: 'evil.example:8080', ...asAdmin } })).statusCode, 200);
  assert.equal((await authed.app.inject({ url: '/v1/sessions', headers: { host: 'evil.example:8080' } })).statusCode, 401);
});

test('an event stream opened with a token ends once the token is revoked, and sends nothing after', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'watched');
  const token = await createToken(app, 'read', ['watched']);
  const id = token.split('_')[1];
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as { port: number };
  const open = (headers: Record<string, string>) => {
    const state = { text: '', ended: false, status: 0 };
    const req = http.get(`http://127.0.0.1:${port}/v1/sessions/watched/events`, { headers }, (res) => {
      state.status = res.statusCode ?? 0;
      res.setEncoding('utf8');
      res.on('data', (chunk) => (state.text += chunk));
      res.on('end', () => (state.ended = true));
      res.on('close', () => (state.ended = true));
    });
    req.on('error', () => (state.ended = true));
    return state;
  };
  const until = async (check: () => boolean, ms = 5000) => {
    const deadline = Date.now() + ms;
    while (!check()) {
      assert.ok(Date.now() < deadline, JSON.stringify(app.versions.stats()));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  const revokedOne = open(bearer(token));
  const adminOne = open(asAdmin);
  await until(() => revokedOne.status === 200 && adminOne.status === 200 && app.versions.stats().streams === 2);
  assert.equal((await step(app, 'watched', 1)).statusCode, 200);
  await until(() => revokedOne.text.includes('event: version') && adminOne.text.includes('event: version'));
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${id}`, headers: asAdmin })).statusCode, 204);
  await new Promise((resolve) => setTimeout(resolve, 1100)); // past the stream's one-second trust in its token
  assert.equal((await step(app, 'watched', 2)).statusCode, 200);
  await until(() => adminOne.text.includes('"version":3'));
  await until(() => revokedOne.ended);
  assert.ok(!revokedOne.text.includes('"version":3'), 'nothing is sent after the revocation');
  await until(() => app.versions.stats().streams === 1);
  const again = open(bearer(token));
  await until(() => again.status !== 0);
  assert.equal(again.status, 401);

  // An idle stream (no step, keep-alives every 15 s) ends within about a second of the revocation too.
  const idleToken = await createToken(app, 'read', ['watched']);
  const idle = open(bearer(idleToken));
  await until(() => idle.status === 200 && app.versions.stats().streams === 2);
  await new Promise((resolve) => setTimeout(resolve, 1100)); // past its first second
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${idleToken.split('_')[1]}`, headers: asAdmin })).statusCode, 204);
  const revokedAt = Date.now();
  await until(() => idle.ended, 6000);
  assert.ok(Date.now() - revokedAt < 4000, `ended ${Date.now() - revokedAt} ms after the revocation`);
  await until(() => app.versions.stats().streams === 1);
});

test('a waiting read (after_version + wait) of a token revoked during its wait answers 401, not the new parameters', async (t) => {
  // Found by a security review: the read delivered the parameters of a step made 6 s after the revocation.
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'waited');
  const token = await createToken(app, 'read', ['waited']);
  const id = token.split('_')[1];
  const waiting = app.inject({ url: '/v1/sessions/waited/params?after_version=1&wait=30', headers: bearer(token) });
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${id}`, headers: asAdmin })).statusCode, 204);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.equal((await step(app, 'waited', 1)).statusCode, 200);
  const res = await waiting;
  assert.equal(res.statusCode, 401, res.body);
  assert.equal(res.json().code, 'UNAUTHORIZED');
  assert.doesNotMatch(res.body, /"params"/);
  // An active token's waiting read gets the new version.
  const other = await createToken(app, 'read', ['waited']);
  const woken = app.inject({ url: '/v1/sessions/waited/params?after_version=2&wait=30', headers: bearer(other) });
  await new Promise((resolve) => setTimeout(resolve, 1200));
  assert.equal((await step(app, 'waited', 2)).statusCode, 200);
  const ok = await woken;
  assert.equal(ok.statusCode, 200, ok.body);
  assert.equal(ok.json().version, 3);
  // A wait that ends with nothing new: 304 for an active token, 401 for one revoked meanwhile (found by a
  // review: it answered 304, with the session's version).
  const quiet = await app.inject({ url: '/v1/sessions/waited/params?after_version=3&wait=1.2', headers: bearer(other) });
  assert.equal(quiet.statusCode, 304);
  const revokedQuiet = app.inject({ url: '/v1/sessions/waited/params?after_version=3&wait=1.5', headers: bearer(other) });
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${other.split('_')[1]}`, headers: asAdmin })).statusCode, 204);
  const ended = await revokedQuiet;
  assert.equal(ended.statusCode, 401, ended.body);
  assert.equal(ended.headers.etag, undefined);
});

test('a contribution held for its round, of a token revoked during the wait, answers 401, not the round\'s parameters', async (t) => {
  // Found by a security review: the held request got the stepped parameters 4 s after the revocation.
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  const created = await app.inject({
    method: 'POST', url: '/v1/sessions', headers: asAdmin,
    payload: { name: 'held', params: [{ name: 'w', shape: [2], data: [0.5, 0.25] }], aggregation: { contributions: 2 } },
  });
  assert.equal(created.statusCode, 201, created.body);
  const contribute = (headers: Record<string, string>, worker: string, wait: number) => app.inject({
    method: 'POST', url: `/v1/sessions/held/step?wait=${wait}&return=params`, headers, payload: { grads: { w: [1, 1] }, base_version: 1, worker },
  });
  const token = await createToken(app, 'step', ['held']);
  const waiting = contribute(bearer(token), 'w0', 30);
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal((await app.inject({ method: 'DELETE', url: `/v1/tokens/${token.split('_')[1]}`, headers: asAdmin })).statusCode, 204);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const closing = await contribute(asAdmin, 'w1', 30);
  assert.equal(closing.statusCode, 200, closing.body);
  assert.ok(closing.json().params, 'the admin\'s contribution closed the round and got its parameters');
  const res = await waiting;
  assert.equal(res.statusCode, 401, res.body);
  assert.equal(res.json().code, 'UNAUTHORIZED');
  assert.doesNotMatch(res.body, /"params"/);
  // The revoked token's contribution was taken: the round stepped with both (version 2).
  assert.equal((await app.inject({ url: '/v1/sessions/held', headers: asAdmin })).json().version, 2);
});
