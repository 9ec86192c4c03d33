// What an operator reads: request lines at a level per route (ASGD_LOG_REQUESTS), no key written twice on a
// line, the client's X-Request-Id kept, the start-up banner, and GET / pointing at the docs and dashboard.
import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { connect } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { test, type TestContext } from 'node:test';
import { buildApp, loggerOptions } from '../../src/app.ts';
import { databaseLocation, startupBanner } from '../../src/banner.ts';
import { ConfigError, loadConfig } from '../../src/config.ts';
import { LINKS, prefersHtml } from '../../src/routes/root/index.ts';
import pg from 'pg';
import { createTestDatabase, testConfig, TEST_DB_KIND } from '../helper.ts';
import { createSession, gradBody } from './support.ts';

interface Line { raw: string; entry: Record<string, unknown> }

async function loggedApp(t: TestContext, env: Record<string, string> = {}) {
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const raw of String(chunk).split('\n').filter(Boolean)) lines.push({ raw, entry: JSON.parse(raw) });
      done();
    },
  });
  const config = testConfig({ ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'info', ASGD_HEALTH_CHECK_INTERVAL_MS: '0', ...env });
  const app = await buildApp({ config, migrate: true, logger: { level: 'info', stream } });
  t.after(() => app.close());
  await app.ready();
  return { app, lines };
}

const requestLines = (lines: Line[], url: string) =>
  lines.filter((l) => l.entry.msg === 'incoming request' || l.entry.msg === 'request completed').filter((l) => {
    const id = l.entry.reqId;
    return lines.some((other) => other.entry.reqId === id && (other.entry.req as { url?: string } | undefined)?.url === url) || (l.entry.req as { url?: string } | undefined)?.url === url;
  });

/** Keys a raw JSON line holds more than once (JSON.parse keeps only the last). */
function duplicateKeys(raw: string): string[] {
  const counts = new Map<string, number>();
  for (const m of raw.matchAll(/[{,]"([^"]+)":/g)) counts.set(m[1], (counts.get(m[1]) ?? 0) + 1);
  return [...counts].filter(([, n]) => n > 1).map(([key]) => key);
}

test('ASGD_LOG_REQUESTS=auto (the default): step and params requests log at debug unless they fail; other routes at info; no line repeats a key', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t);
  await createSession(app, 'quiet', {});
  const stepped = await app.inject({ method: 'POST', url: '/v1/sessions/quiet/step', payload: gradBody(1) });
  assert.equal(stepped.statusCode, 200, stepped.body);
  assert.equal((await app.inject({ url: '/v1/sessions/quiet/params' })).statusCode, 200);
  const bad = await app.inject({ method: 'POST', url: '/v1/sessions/quiet/step', payload: { grads: { w: ['x'] } } });
  assert.equal(bad.statusCode, 400);
  assert.equal((await app.inject({ url: '/v1/sessions/quiet' })).statusCode, 200);

  assert.deepEqual(requestLines(lines, '/v1/sessions/quiet/params'), [], 'a successful params read writes no request line at info');
  const stepIds = new Set([stepped.headers['x-request-id'], bad.headers['x-request-id']]);
  const stepLines = lines.filter((l) => stepIds.has(l.entry.reqId as string) && /request/.test(String(l.entry.msg)));
  assert.deepEqual(stepLines.map((l) => [l.entry.reqId, l.entry.msg, (l.entry.res as { statusCode?: number } | undefined)?.statusCode]), [[bad.headers['x-request-id'], 'request completed', 400]],
    'of the two steps only the failed one has a request line: its completion');
  // That line says what the request was and who sent it, as the incoming line it stands for would have.
  const failed = stepLines[0].entry.req as { method?: string; url?: string; remoteAddress?: string };
  assert.deepEqual([failed.method, failed.url, typeof failed.remoteAddress], ['POST', '/v1/sessions/quiet/step', 'string']);
  assert.deepEqual(lines.filter((l) => l.entry.msg === 'stepped'), [], 'nor a stepped line: a training loop steps many times a second');
  const read = requestLines(lines, '/v1/sessions/quiet').map((l) => l.entry.msg);
  assert.deepEqual(read, ['incoming request', 'request completed'], 'other routes log both lines at info');
  // Probes and scrapes (every few seconds, all day) are quiet too.
  for (const url of ['/healthz', '/readyz', '/metrics']) {
    assert.equal((await app.inject({ url })).statusCode, 200, url);
    assert.deepEqual(requestLines(lines, url), [], `${url} writes no request line at info`);
  }
  for (const line of lines) assert.deepEqual(duplicateKeys(line.raw), [], line.raw);
});

test('a wrong path (404) and a wrong method (405) log a line with their code, as every other refusal does', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t);
  const missing = await app.inject({ url: '/v1/nowhere' });
  assert.equal(missing.statusCode, 404);
  const wrong = await app.inject({ method: 'DELETE', url: '/v1/sessions' });
  assert.equal(wrong.statusCode, 405);
  const coded = (id: unknown) => lines.filter((l) => l.entry.reqId === id && typeof l.entry.code === 'string').map((l) => [l.entry.level, l.entry.code, l.entry.statusCode, l.entry.msg]);
  assert.deepEqual(coded(missing.headers['x-request-id']), [[30, 'ROUTE_NOT_FOUND', 404, JSON.parse(missing.body).message]]);
  assert.deepEqual(coded(wrong.headers['x-request-id']), [[30, 'METHOD_NOT_ALLOWED', 405, JSON.parse(wrong.body).message]]);
});

test('a client that hangs up in the middle of its upload is no error of the service: no error line, no 5xx counted', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t);
  await createSession(app, 'cut', {});
  await app.listen({ port: 0, host: '127.0.0.1' });
  const { port } = app.server.address() as AddressInfo;
  for (const path of ['/v1/sessions/cut/step', '/v1/sessions/cut/state_dict']) {
    await new Promise<void>((resolve, reject) => {
      const socket = connect(port, '127.0.0.1', () => {
        socket.write(`${path.endsWith('step') ? 'POST' : 'PUT'} ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"grads": {"w": [`);
        setTimeout(() => socket.destroy(), 100);
      });
      socket.on('close', () => resolve());
      socket.on('error', reject);
    });
  }
  // The server sees the hang-up a moment later.
  for (let i = 0; i < 50 && !lines.some((l) => /closed|aborted/i.test(String(l.entry.msg))); i++) await new Promise((r) => setTimeout(r, 20));
  const errorLines = lines.filter((l) => Number(l.entry.level) >= 50);
  assert.deepEqual(errorLines.map((l) => l.raw), []);
  const metrics = (await app.inject({ url: '/metrics' })).body;
  assert.deepEqual(metrics.split('\n').filter((l) => l.startsWith('asgd_http_requests_total') && /status_code="5/.test(l)), []);
  assert.ok(lines.some((l) => /closed the connection/.test(String(l.entry.msg))), 'an info line says the client went away');
});

test('ASGD_LOG_REQUESTS: all, errors and none; a bad value is refused naming the variable', { timeout: 120_000 }, async (t) => {
  const count = async (mode: string) => {
    const { app, lines } = await loggedApp(t, { ASGD_LOG_REQUESTS: mode });
    await createSession(app, 's', {});
    await app.inject({ method: 'POST', url: '/v1/sessions/s/step', payload: gradBody(1) });
    await app.inject({ url: '/v1/sessions/nope' });
    return lines.filter((l) => /^(incoming request|request completed|stepped)$/.test(String(l.entry.msg)))
      .map((l) => `${l.entry.msg}${l.entry.res ? ` ${(l.entry.res as { statusCode: number }).statusCode}` : ''}${l.entry.msg === 'stepped' ? ` ${l.entry.step}` : ''}`);
  };
  assert.deepEqual(await count('all'), ['incoming request', 'request completed 201', 'incoming request', 'stepped 1', 'request completed 200', 'incoming request', 'request completed 404']);
  assert.deepEqual(await count('errors'), ['request completed 404']);
  const errorsOnly = await loggedApp(t, { ASGD_LOG_REQUESTS: 'errors' });
  assert.equal((await errorsOnly.app.inject({ url: '/v1/sessions/nope' })).statusCode, 404);
  const completed = errorsOnly.lines.find((l) => l.entry.msg === 'request completed')!;
  assert.deepEqual([(completed.entry.req as { method: string }).method, (completed.entry.req as { url: string }).url], ['GET', '/v1/sessions/nope']);
  assert.deepEqual(await count('none'), []);
  assert.throws(() => loadConfig({ ASGD_LOG_REQUESTS: 'some' }), (err: Error) => err instanceof ConfigError && /ASGD_LOG_REQUESTS must be one of all, auto, errors, none/.test(err.message));
});

test('an incoming X-Request-Id is kept as the request id (on the answer and every line); an unusable one is replaced', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t, { ASGD_LOG_REQUESTS: 'all' });
  const kept = await app.inject({ url: '/v1/sessions/none-such', headers: { 'x-request-id': 'trace-4bf92f3577b34da6.a3ce929d0e0e4736' } });
  assert.equal(kept.headers['x-request-id'], 'trace-4bf92f3577b34da6.a3ce929d0e0e4736');
  const mine = lines.filter((l) => l.entry.reqId === 'trace-4bf92f3577b34da6.a3ce929d0e0e4736').map((l) => l.entry.msg);
  assert.equal(mine[0], 'incoming request');
  assert.equal(mine.at(-1), 'request completed');
  assert.ok(mine.length >= 3, 'the error line too');
  for (const bad of ['has spaces in it', 'x'.repeat(129), '', 'a"b', 'line\u0001break', '-starts-with-dash']) {
    const res = await app.inject({ url: '/healthz', headers: { 'x-request-id': bad } });
    assert.match(String(res.headers['x-request-id']), /^[0-9a-f-]{36}$/, `${JSON.stringify(bad)} is replaced by a new id`);
  }
  assert.match(String((await app.inject({ url: '/healthz' })).headers['x-request-id']), /^[0-9a-f-]{36}$/);
});

test('a request\'s completion line names the token that made it (id and name, never the secret); none for a refused token or without auth', { timeout: 120_000 }, async (t) => {
  const ADMIN = 'an-admin-token-for-the-log-test';
  const { app, lines } = await loggedApp(t, { ASGD_ADMIN_TOKEN: ADMIN, ASGD_LOG_REQUESTS: 'all' });
  const admin = { authorization: `Bearer ${ADMIN}` };
  const made = await app.inject({ method: 'POST', url: '/v1/tokens', headers: admin, payload: { name: 'trainer-7', scope: 'read' } });
  assert.equal(made.statusCode, 201, made.body);
  const { id, token } = made.json();
  const completion = (reqId: unknown) => lines.find((l) => l.entry.reqId === reqId && l.entry.msg === 'request completed')?.entry;

  const read = await app.inject({ url: '/v1/sessions', headers: { authorization: `Bearer ${token}` } });
  assert.equal(read.statusCode, 200);
  assert.deepEqual([completion(read.headers['x-request-id'])?.tokenId, completion(read.headers['x-request-id'])?.tokenName], [id, 'trainer-7']);
  // Forbidden (a read token creating a session): the line says who was refused.
  const forbidden = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { authorization: `Bearer ${token}` }, payload: { name: 'x', params: [{ name: 'w', shape: [1], data: [0] }] } });
  assert.equal(forbidden.statusCode, 403);
  assert.equal(completion(forbidden.headers['x-request-id'])?.tokenId, id);
  assert.equal(completion(made.headers['x-request-id'])?.tokenId, 'admin');
  // A token the service does not accept is no one.
  const refused = await app.inject({ url: '/v1/sessions', headers: { authorization: 'Bearer asgd_nosuch_secret' } });
  assert.equal(refused.statusCode, 401);
  const line = completion(refused.headers['x-request-id']);
  assert.ok(line && !('tokenId' in line) && !('tokenName' in line), JSON.stringify(line));
  for (const l of lines) assert.ok(!l.raw.includes(token) && !l.raw.includes(ADMIN), `a secret in ${l.raw}`);

  // Without auth nobody is named.
  const open = await loggedApp(t, { ASGD_LOG_REQUESTS: 'all' });
  const anon = await open.app.inject({ url: '/v1/sessions' });
  const anonLine = open.lines.find((l) => l.entry.reqId === anon.headers['x-request-id'] && l.entry.msg === 'request completed')?.entry;
  assert.ok(anonLine && !('tokenId' in anonLine), JSON.stringify(anonLine));
});

test('GET /: JSON links for API clients, an HTML page for browsers, no token needed', { timeout: 120_000 }, async (t) => {
  const { app } = await loggedApp(t, { ASGD_ADMIN_TOKEN: 'an-admin-token-for-the-root-test' });
  for (const accept of [undefined, '*/*', 'application/json', 'application/json, text/html;q=0.9']) {
    const res = await app.inject({ url: '/', headers: accept ? { accept } : {} });
    assert.equal(res.statusCode, 200, `${accept}: ${res.body}`);
    assert.match(String(res.headers['content-type']), /^application\/json/);
    const body = res.json();
    assert.equal(body.name, 'asgd-serve');
    assert.match(body.version, /^\d+\.\d+\.\d+/);
    assert.equal(body.links.docs, '/docs');
    assert.equal(body.links.dashboard, '/ui');
    assert.equal(res.headers.vary, 'Accept');
  }
  const browser = await app.inject({ url: '/', headers: { accept: 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8' } });
  assert.equal(browser.statusCode, 200);
  assert.match(String(browser.headers['content-type']), /^text\/html/);
  for (const href of Object.values(LINKS)) assert.ok(browser.body.includes(`href="${href}"`), href);
  // The links lead somewhere: the docs, the OpenAPI document and health answer without a token.
  for (const path of [LINKS.docs, LINKS.openapi, LINKS.health]) {
    const res = await app.inject({ url: path });
    assert.ok(res.statusCode === 200 || res.statusCode === 302, `${path}: ${res.statusCode}`);
  }
  assert.equal(prefersHtml('application/json;q=0.5, text/html;q=0.6'), true);
  assert.equal(prefersHtml('text/html;q=0, */*'), false);
});

test('the start-up banner: version, database and where, auth, URL, docs; never the database password', () => {
  const pglite = startupBanner(loadConfig({ ASGD_DATA_DIR: 'rel/dir' }), 'http://127.0.0.1:8080', '/ui');
  assert.deepEqual(pglite.fields.database, { kind: 'pglite', dataDir: `${process.cwd()}/rel/dir` });
  assert.equal(pglite.fields.auth, 'off');
  assert.equal(pglite.fields.docs, 'http://127.0.0.1:8080/docs');
  assert.match(pglite.message, /^asgd-serve \d+\.\d+\.\d+\S* listening on http:\/\/127\.0\.0\.1:8080 \| database: embedded PGlite in \/.*rel\/dir \(no fsync: kept through a killed process, not a power cut\) \| auth: off .*\| docs: http:\/\/127\.0\.0\.1:8080\/docs \| dashboard: http:\/\/127\.0\.0\.1:8080\/ui$/);

  // Bound to every interface (HOST=0.0.0.0): the links are the loopback ones, and the line says what was bound
  // (an operator's review: http://0.0.0.0:… is no address a client can use).
  const everywhere = startupBanner(loadConfig({ ASGD_DATA_DIR: 'rel/dir' }), 'http://127.0.0.1:8080', '/ui', '0.0.0.0 (every interface)');
  assert.equal(everywhere.fields.url, 'http://127.0.0.1:8080');
  assert.match(everywhere.message, / listening on 0\.0\.0\.0 \(every interface\), port 8080: here http:\/\/127\.0\.0\.1:8080 \| /);

  const pg = startupBanner(loadConfig({ DATABASE_URL: 'postgres://asgd:s3cret-pw@db.internal:6543/training?sslmode=require', ASGD_ADMIN_TOKEN: 'x'.repeat(20) }), 'http://127.0.0.1:1', '/ui');
  assert.deepEqual(pg.fields.database, { kind: 'postgres', host: 'db.internal', port: 6543, database: 'training', user: 'asgd' });
  assert.equal(pg.fields.auth, 'on');
  assert.match(pg.message, /database: PostgreSQL asgd@db\.internal:6543\/training/);
  assert.ok(!JSON.stringify(pg).includes('s3cret'), 'no password');
  assert.deepEqual(databaseLocation({ databaseUrl: 'postgresql:///asgd?host=/var/run/postgresql', dataDir: '' }), { kind: 'postgres', host: '/var/run/postgresql', port: 5432, database: 'asgd', user: null });
  assert.deepEqual(databaseLocation({ databaseUrl: 'postgres://alice:secret@/asgd?host=%2Fvar%2Frun%2Fpostgresql', dataDir: '' }), { kind: 'postgres', host: '/var/run/postgresql', port: 5432, database: 'asgd', user: 'alice' });
  assert.equal(databaseLocation({ databaseUrl: null, dataDir: 'memory://' }).kind, 'pglite');
});

test('a credential a client put in the query (token=...) is not logged; the rest of the URL is', { timeout: 120_000 }, async (t) => {
  const lines: Line[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const raw of String(chunk).split('\n').filter(Boolean)) lines.push({ raw, entry: JSON.parse(raw) });
      done();
    },
  });
  const config = testConfig({ ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'info', ASGD_HEALTH_CHECK_INTERVAL_MS: '0', ASGD_LOG_REQUESTS: 'all' });
  const app = await buildApp({ config, migrate: true, logger: loggerOptions(config, { stream }) });
  t.after(() => app.close());
  await app.inject({ url: '/v1/sessions?token=s3cret-token-value-0123&limit=5' });
  await app.inject({ url: '/v1/sessions?limit=5&access_token=another-s3cret' });
  assert.ok(!lines.some((l) => l.raw.includes('s3cret')), 'no secret on any line');
  const urls = lines.map((l) => (l.entry.req as { url?: string } | undefined)?.url).filter(Boolean);
  assert.ok(urls.includes('/v1/sessions?token=[redacted]&limit=5'), urls.join(' '));
  assert.ok(urls.includes('/v1/sessions?limit=5&access_token=[redacted]'), urls.join(' '));
});

test('ASGD_METRICS_REQUIRE_TOKEN=true without auth warns at start that /metrics is open', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t, { ASGD_METRICS_REQUIRE_TOKEN: 'true' });
  assert.ok(lines.some((l) => l.entry.level === 40 && /ASGD_METRICS_REQUIRE_TOKEN=true has no effect without ASGD_ADMIN_TOKEN/.test(String(l.entry.msg))), 'a warning');
  assert.equal((await app.inject({ url: '/metrics' })).statusCode, 200, 'open, as the warning says');
  const { lines: quiet } = await loggedApp(t, {});
  assert.ok(!quiet.some((l) => /ASGD_METRICS_REQUIRE_TOKEN/.test(String(l.entry.msg))), 'no warning when not asked for');
});

test('a retried step answered with its first answer is logged as replayed, not as a second step', { timeout: 120_000 }, async (t) => {
  const { app, lines } = await loggedApp(t, { ASGD_LOG_REQUESTS: 'all' });
  await createSession(app, 's', {});
  for (let i = 0; i < 2; i++) {
    const r = await app.inject({ method: 'POST', url: '/v1/sessions/s/step', headers: { 'idempotency-key': 'once' }, payload: gradBody(1) });
    assert.equal(r.statusCode, 200, r.body);
  }
  assert.deepEqual(lines.filter((l) => l.entry.msg === 'stepped' || l.entry.msg === 'replayed').map((l) => `${l.entry.msg} ${l.entry.version}`), ['stepped 2', 'replayed 2']);
});

test('a start that migrates says how many migrations it applied; one with nothing pending says nothing of it', async (t) => {
  // Found by an operator's review: serve logged nothing when it migrated, and `migrate` said "applied 10 of
  // 10" when nothing was pending.
  const dir = mkdtempSync(join(tmpdir(), 'asgd-migrated-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const migrated = (lines: Line[]) => lines.filter((l) => /^database migrated: /.test(String(l.entry.msg)));
  const first = await loggedApp(t, { ASGD_DATA_DIR: dir });
  const said = migrated(first.lines);
  assert.equal(said.length, 1, first.lines.map((l) => l.raw).join('\n'));
  assert.match(String(said[0].entry.msg), /^database migrated: \d+ migrations applied \(ASGD_MIGRATE\)$/);
  assert.ok(Number(said[0].entry.applied) >= 10);
  await first.app.close();
  const second = await loggedApp(t, { ASGD_DATA_DIR: dir });
  assert.deepEqual(migrated(second.lines), []);
});

test('on PostgreSQL without autovacuum, a start warns that deleted rows are never reclaimed', { skip: TEST_DB_KIND !== 'postgres' && 'a PostgreSQL setting', timeout: 120_000 }, async (t) => {
  // Found by a soak review: on a server with autovacuum off the database went from 7 MB to 816 MB in 4 minutes.
  const db = await createTestDatabase();
  const admin = new pg.Client({ connectionString: db.url });
  await admin.connect();
  const { rows: [setting] } = await admin.query("SELECT current_setting('autovacuum') AS autovacuum, current_setting('track_counts') AS track_counts");
  await admin.end();
  const off = setting.autovacuum !== 'on' || setting.track_counts !== 'on';
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const raw of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(raw));
      done();
    },
  });
  const app = await buildApp({ config: testConfig({ DATABASE_URL: db.url, LOG_LEVEL: 'info' }), migrate: true, logger: { level: 'info', stream } });
  t.after(async () => {
    await app.close();
    await db.drop();
  });
  await app.ready();
  const warned = () => lines.some((l) => l.level === 40 && /without autovacuum/.test(String(l.msg)));
  for (let i = 0; i < 40 && !warned(); i++) await new Promise((r) => setTimeout(r, 50));
  assert.equal(warned(), off, `autovacuum ${setting.autovacuum}, track_counts ${setting.track_counts}`);
});
