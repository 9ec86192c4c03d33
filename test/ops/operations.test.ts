import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { Readable, Writable } from 'node:stream';
import { test, type TestContext } from 'node:test';
import { buildApp } from '../../src/app.ts';
import { streamToBuffer, writeSafetensors } from '../../src/formats/index.ts';
import { buildTestApp, createTestDatabase, testConfig, TEST_DB_KIND } from '../helper.ts';
import { ADMIN, asAdmin, bearer, createSession, createToken, step } from './support.ts';

/** The value of one sample in Prometheus text (0 when absent). */
function sample(text: string, name: string, labels = ''): number {
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels ? `{${labels}}` : ''} `));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** An app on a fresh PostgreSQL database that is not migrated (dropped with the app at the test's end). */
async function unmigratedApp(t: TestContext, healthCheckIntervalMs: number, messages: string[] = []) {
  const db = await createTestDatabase();
  const config = testConfig({ DATABASE_URL: db.url, ASGD_HEALTH_CHECK_INTERVAL_MS: String(healthCheckIntervalMs) });
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split('\n').filter(Boolean)) messages.push(String(JSON.parse(line).msg));
      done();
    },
  });
  const app = await buildApp({ config, migrate: false, logger: { level: 'info', stream } });
  t.after(async () => {
    await app.close();
    await db.drop();
  });
  return app;
}

test('/healthz needs no database; /readyz and the API answer 503 with Retry-After once the database is gone', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('needs a PostgreSQL database to drop');
  const db = await createTestDatabase();
  const { app } = await buildTestApp(null, { databaseUrl: db.url, env: { ASGD_HEALTH_CHECK_INTERVAL_MS: '100' } });
  t.after(async () => {
    await app.close();
    await db.drop();
  });
  assert.deepEqual((await app.inject({ url: '/healthz' })).json(), { status: 'ok' });
  assert.deepEqual((await app.inject({ url: '/readyz' })).json(), { status: 'ready' });
  await createSession(app, 'up', {});

  await db.drop();
  const ready = await app.inject({ url: '/readyz' });
  assert.equal(ready.statusCode, 503, ready.body);
  assert.equal(ready.json().code, 'SERVICE_UNAVAILABLE');
  assert.ok(Number(ready.headers['retry-after']) > 0);
  assert.ok(!/does not exist|asgd_test/.test(ready.body), 'a 5xx body carries no internals');
  assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200, 'liveness does not depend on the database');
  const first = await app.inject({ url: '/v1/sessions/up' });
  assert.equal(first.statusCode, 503, `before the periodic check notices: ${first.body}`);

  // The periodic database check turns the API away until the database is back.
  await new Promise((resolve) => setTimeout(resolve, 400));
  const api = await app.inject({ url: '/v1/sessions/up' });
  assert.equal(api.statusCode, 503, api.body);
  assert.equal(api.json().code, 'SERVICE_UNAVAILABLE');
  assert.ok(Number(api.headers['retry-after']) > 0);
  assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200);
  assert.equal((await app.inject({ url: '/metrics' })).statusCode, 200, 'metrics still answer under pressure');
  assert.equal(sample((await app.inject({ url: '/metrics' })).body, 'asgd_database_up'), 0, 'the metrics say the database is down');
  // Pages that read no database are still served: the links, the API docs, the dashboard's files.
  for (const url of ['/', '/docs/json', '/ui/', '/ui/js/main.js']) assert.equal((await app.inject({ url })).statusCode, 200, url);
});

test('a database that answers but is not migrated: the API and /readyz say so (not "unreachable"); asgd_database_up is 0, then 1 once migrated', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('uses a fresh PostgreSQL database');
  const messages: string[] = [];
  const app = await unmigratedApp(t, 100, messages);
  await new Promise((resolve) => setTimeout(resolve, 300));
  for (const url of ['/readyz', '/v1/sessions']) {
    const res = await app.inject({ url });
    assert.equal(res.statusCode, 503, url);
    assert.match(res.json().message, /the database is not migrated.*asgd-serve migrate/, url);
  }
  assert.equal(sample((await app.inject({ url: '/metrics' })).body, 'asgd_database_up'), 0);
  await app.db.migrate();
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal((await app.inject({ url: '/readyz' })).statusCode, 200);
  assert.equal(sample((await app.inject({ url: '/metrics' })).body, 'asgd_database_up'), 1);
  // The log says what changed: the database was reachable all along (found by a review: "reachable again").
  const said = messages.filter((m) => m.startsWith('database '));
  assert.deepEqual(said, ['database not migrated: answering 503 until it is', 'database migrated: serving again']);
  // What was read of the unmigrated database (a /metrics scrape above) is not kept: storage works now.
  await createSession(app, 'late', {});
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/late/snapshots', payload: {} })).statusCode, 201);
  const late = await app.inject({ url: '/v1/sessions/late' });
  assert.equal(late.statusCode, 200, late.body);
  assert.ok(late.json().storage.total_bytes > 0);
});

test('a database found down is asked again every half second: the API serves as soon as it answers, not at the next periodic check', async (t) => {
  // Found by an operator's review: requests were refused until the next check, up to ASGD_HEALTH_CHECK_INTERVAL_MS
  // (5 s by default) after the database was back. Here the periodic check is a minute apart.
  if (TEST_DB_KIND !== 'postgres') return t.skip('uses a fresh PostgreSQL database');
  const app = await unmigratedApp(t, 60_000);
  let res = await app.inject({ url: '/v1/sessions' });
  for (let i = 0; i < 50 && res.statusCode !== 503; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    res = await app.inject({ url: '/v1/sessions' });
  }
  assert.equal(res.statusCode, 503, 'the first check found it not migrated');
  await app.db.migrate();
  const back = Date.now();
  for (let i = 0; i < 100 && (await app.inject({ url: '/v1/sessions' })).statusCode !== 200; i++) await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal((await app.inject({ url: '/v1/sessions' })).statusCode, 200);
  assert.equal((await app.inject({ url: '/readyz' })).statusCode, 200);
  assert.ok(Date.now() - back < 5_000, `served again ${Date.now() - back} ms after the database was back`);
  await createSession(app, 'back', {});
});

test('/readyz is 503 while the migrations are not applied', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('uses a fresh PostgreSQL database');
  const app = await unmigratedApp(t, 0);
  const res = await app.inject({ url: '/readyz' });
  assert.equal(res.statusCode, 503);
  assert.equal(res.json().code, 'SERVICE_UNAVAILABLE');
});

test('/metrics counts the requests a client closed before their answer ended: an event stream it stopped (200), a long poll it gave up on (499); once each; a body the server cut for its time is its 408', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_REQUEST_TIMEOUT_MS: '1000' } });
  await createSession(app, 'c', {});
  await app.listen({ host: '127.0.0.1', port: 0 });
  const base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
  const stopped = new AbortController();
  const stream = await fetch(`${base}/v1/sessions/c/events`, { signal: stopped.signal });
  assert.equal(stream.status, 200);
  const reader = stream.body!.getReader();
  await reader.read(); // the stream's first event: it is under way
  stopped.abort();
  const gaveUp = new AbortController();
  const poll = fetch(`${base}/v1/sessions/c/params?after_version=100&wait=30`, { signal: gaveUp.signal }).catch(() => null);
  await new Promise((resolve) => setTimeout(resolve, 300));
  gaveUp.abort();
  await poll;
  const done = await fetch(`${base}/v1/sessions/c`);
  assert.equal(done.status, 200);
  let text = '';
  for (let i = 0; i < 50; i++) { // the server sees each close a moment after the client
    text = (await app.inject({ url: '/metrics' })).body;
    if (sample(text, 'asgd_http_requests_total', 'method="GET",route="/v1/sessions/:name/params",status_code="499"') === 1) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="GET",route="/v1/sessions/:name/events",status_code="200"'), 1, 'the stream its client stopped');
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="GET",route="/v1/sessions/:name/params",status_code="499"'), 1, 'the long poll its client gave up on');
  assert.equal(sample(text, 'asgd_http_request_duration_seconds_count', 'method="GET",route="/v1/sessions/:name/params (waiting)"'), 1);
  assert.equal(sample(text, 'asgd_http_request_duration_seconds_count', 'method="GET",route="/v1/sessions/:name/events (stream)"'), 1, 'a stream timed apart');
  assert.equal(sample(text, 'asgd_http_request_duration_seconds_count', 'method="GET",route="/v1/sessions/:name/events"'), 0);
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="GET",route="/v1/sessions/:name",status_code="200"'), 1, 'an answered request once, as before');
  // A step whose body stops arriving: the server answers 408 and cuts the connection (not the client).
  const port = (app.server.address() as { port: number }).port;
  const answer = await new Promise<string>((resolve) => {
    const socket = connect(port, '127.0.0.1', () => socket.write('POST /v1/sessions/c/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"grads":'));
    let got = '';
    socket.on('data', (chunk) => { got += chunk; });
    socket.on('close', () => resolve(got));
    socket.on('error', () => {});
  });
  assert.match(answer, /^HTTP\/1\.1 408 /);
  for (let i = 0; i < 50; i++) {
    text = (await app.inject({ url: '/metrics' })).body;
    if (sample(text, 'asgd_http_requests_total', 'method="POST",route="/v1/sessions/:name/step",status_code="408"') === 1) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="POST",route="/v1/sessions/:name/step",status_code="408"'), 1, 'counted as the 408 the server sent');
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="POST",route="/v1/sessions/:name/step",status_code="499"'), 0, 'not as closed by its client');
});

test('/metrics: step latency and lock wait histograms, per-session counters, HTTP and pool series; one registry per app', async (t) => {
  const { app } = await buildTestApp(t);
  const { app: other } = await buildTestApp(t);
  await createSession(app, 'm', {});
  const before = (await app.inject({ url: '/metrics' })).body;
  assert.equal(sample(before, 'asgd_step_duration_seconds_count'), 0);
  for (let k = 0; k < 3; k++) assert.equal((await step(app, 'm', k, {})).statusCode, 200);
  const snap = await app.inject({ method: 'POST', url: '/v1/sessions/m/snapshots', payload: {} });
  assert.equal(snap.statusCode, 201, snap.body);
  const res = await app.inject({ url: '/metrics' });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers['content-type']), /^text\/plain; version=0\.0\.4/);
  const text = res.body;
  assert.equal(sample(text, 'asgd_step_duration_seconds_count'), 3);
  assert.ok(sample(text, 'asgd_step_duration_seconds_sum') > 0);
  assert.equal(sample(text, 'asgd_step_lock_wait_seconds_count'), 3);
  assert.equal(sample(text, 'asgd_steps_total', 'session="m"'), 3);
  assert.equal(sample(text, 'asgd_snapshots_total', 'reason="manual"'), 1);
  assert.equal(sample(text, 'asgd_snapshots_total', 'reason="create"'), 1);
  assert.doesNotMatch(text, /^asgd_snapshots_total\{session=/m, 'by reason only: no series per session');
  assert.equal(sample(text, 'asgd_http_requests_total', 'method="POST",route="/v1/sessions/:name/step",status_code="200"'), 3);
  assert.ok(sample(text, 'asgd_http_request_bytes_total', 'route="/v1/sessions/:name/step"') > 100);
  assert.ok(sample(text, 'asgd_http_response_bytes_total', 'route="/v1/sessions/:name/step"') > 100);
  // A body sent to no route is answered before it is read, and its bytes still count (a review).
  await app.inject({ method: 'POST', url: '/v1/nothing', headers: { 'content-type': 'application/json' }, payload: '{"a":"0123456789"}' });
  assert.equal(sample((await app.inject({ url: '/metrics' })).body, 'asgd_http_request_bytes_total', 'route="unmatched"'), 18);
  assert.ok(sample(text, 'asgd_db_pool_connections', 'state="total"') >= 1);
  assert.match(text, /^process_cpu_user_seconds_total /m);
  // Every snapshot a change writes is counted: a restore, a state_dict load, a fork (the new session's).
  const snapshotId = (await app.inject({ url: '/v1/sessions/m/snapshots' })).json().snapshots.at(-1).id as number;
  assert.equal((await app.inject({ method: 'POST', url: `/v1/sessions/m/snapshots/${snapshotId}/restore` })).statusCode, 200);
  const sd = (await app.inject({ url: '/v1/sessions/m/state_dict' })).json();
  assert.equal((await app.inject({ method: 'PUT', url: '/v1/sessions/m/state_dict', payload: sd })).statusCode, 200);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/m/fork', payload: { name: 'm2' } })).statusCode, 201);
  const after = (await app.inject({ url: '/metrics' })).body;
  for (const reason of ['restore', 'load_state_dict', 'fork']) assert.equal(sample(after, 'asgd_snapshots_total', `reason="${reason}"`), 1, reason);
  // A waiting read (a long poll) is timed apart from params reads: it lasts as long as it waits.
  assert.equal((await app.inject({ url: '/v1/sessions/m/params' })).statusCode, 200);
  const version = (await app.inject({ url: '/v1/sessions/m' })).json().version;
  assert.equal((await app.inject({ url: `/v1/sessions/m/params?after_version=${version}&wait=0.3` })).statusCode, 304);
  const timed = (await app.inject({ url: '/metrics' })).body;
  assert.equal(sample(timed, 'asgd_http_request_duration_seconds_count', 'method="GET",route="/v1/sessions/:name/params"'), 1);
  assert.equal(sample(timed, 'asgd_http_request_duration_seconds_count', 'method="GET",route="/v1/sessions/:name/params (waiting)"'), 1);
  assert.ok(sample(timed, 'asgd_http_request_duration_seconds_sum', 'method="GET",route="/v1/sessions/:name/params"') < 0.3);
  // Another app in the same process has its own registry.
  assert.equal(sample((await other.inject({ url: '/metrics' })).body, 'asgd_step_duration_seconds_count'), 0);
  // A deleted session's series go away.
  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/m' })).statusCode, 204);
  assert.equal(sample((await app.inject({ url: '/metrics' })).body, 'asgd_steps_total', 'session="m"'), 0);
});

test('/metrics can require a read token not limited to sessions', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_METRICS_REQUIRE_TOKEN: 'true' } });
  assert.equal((await app.inject({ url: '/metrics' })).statusCode, 401);
  assert.equal((await app.inject({ url: '/metrics', headers: bearer(await createToken(app, 'read', ['a'])) })).statusCode, 403);
  assert.equal((await app.inject({ url: '/metrics', headers: bearer(await createToken(app, 'read')) })).statusCode, 200);
  assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200);
});

test('body limits per route answer 413 BODY_TOO_LARGE, for declared and for chunked bodies', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_BODY_LIMIT_STEP: '2048', ASGD_BODY_LIMIT_CREATE: '4096', ASGD_BODY_LIMIT_DEFAULT: '1024' } });
  await createSession(app, 'l', {});
  const big = (n: number) => JSON.stringify({ grads: { b: Array.from({ length: n }, () => 0.125) } });
  const cases: [string, string, string, string, number][] = [
    ['POST', '/v1/sessions/l/step', 'application/json', big(500), 2048],
    ['POST', '/v1/sessions/l/step', 'application/x-safetensors', 'x'.repeat(3000), 2048],
    ['POST', '/v1/sessions', 'application/json', JSON.stringify({ name: 'n', params: [{ name: 'w', shape: [1500], data: Array(1500).fill(0.5) }] }), 4096],
    ['PUT', '/v1/sessions/l/state_dict', 'application/octet-stream', 'x'.repeat(5000), 4096],
    ['PATCH', '/v1/sessions/l', 'application/json', JSON.stringify({ snapshot_every: 5, pad: 'x'.repeat(2000) }), 1024],
  ];
  for (const [method, url, type, payload, limit] of cases) {
    const res = await app.inject({ method: method as 'POST', url, headers: { 'content-type': type }, payload });
    assert.equal(res.statusCode, 413, `${method} ${url} ${type}: ${res.body}`);
    assert.equal(res.json().code, 'BODY_TOO_LARGE');
    const variable = { 2048: 'ASGD_BODY_LIMIT_STEP', 4096: 'ASGD_BODY_LIMIT_CREATE', 1024: 'ASGD_BODY_LIMIT_DEFAULT' }[limit];
    assert.match(res.json().message, new RegExp(`${limit} bytes for this route \\(${variable}\\)$`), 'names the variable that sets it');
    // The same body without a Content-Length (chunked) is cut off at the limit too.
    const chunked = await app.inject({ method: method as 'POST', url, headers: { 'content-type': type }, payload: Readable.from([Buffer.from(payload)]) });
    assert.equal(chunked.statusCode, 413, `chunked ${method} ${url}: ${chunked.body}`);
  }
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/l/step', payload: { grads: { b: [1, 2, 3, 4] } } })).statusCode, 200, 'under the limit is fine');
  assert.equal((await app.inject({ url: '/v1/sessions/l' })).json().version, 2);
  // A file under the limit is read whole, with a Content-Length (into one buffer of that size) and chunked.
  const file = await streamToBuffer(writeSafetensors([['b', { dtype: 'float32', shape: [4], data: Float32Array.of(1, 2, 3, 4) }]]));
  const sized = await app.inject({ method: 'POST', url: '/v1/sessions/l/step', headers: { 'content-type': 'application/x-safetensors' }, payload: file });
  assert.equal(sized.statusCode, 200, sized.body);
  const chunks = [file.subarray(0, 10), file.subarray(10, 50), file.subarray(50)];
  const chunked = await app.inject({ method: 'POST', url: '/v1/sessions/l/step', headers: { 'content-type': 'application/x-safetensors' }, payload: Readable.from(chunks) });
  assert.equal(chunked.statusCode, 200, chunked.body);
  assert.equal((await app.inject({ url: '/v1/sessions/l' })).json().version, 4);
});

test('rate limit per token: 429 RATE_LIMITED with Retry-After; other tokens and health checks are not counted', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_RATE_LIMIT_PER_MINUTE: '5' } });
  const a = bearer(await createToken(app, 'read'));
  const b = bearer(await createToken(app, 'read'));
  for (let i = 0; i < 5; i++) assert.equal((await app.inject({ url: '/v1/sessions', headers: a })).statusCode, 200);
  const limited = await app.inject({ url: '/v1/sessions', headers: a });
  assert.equal(limited.statusCode, 429, limited.body);
  assert.equal(limited.json().code, 'RATE_LIMITED');
  assert.ok(Number(limited.headers['retry-after']) >= 1 && Number(limited.headers['retry-after']) <= 60);
  assert.equal((await app.inject({ url: '/v1/sessions', headers: b })).statusCode, 200, 'another token has its own budget');
  for (let i = 0; i < 10; i++) assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200);

  // Refused requests (403: scope, other sessions) count toward the token's budget too (found by a review:
  // a token limited to one session made 80 refused requests a minute under a limit of 20).
  await createSession(app, 'mine');
  const limited2 = bearer(await createToken(app, 'read', ['mine']));
  const statuses: number[] = [];
  for (let i = 0; i < 3; i++) statuses.push((await app.inject({ url: '/v1/sessions/theirs', headers: limited2 })).statusCode);
  for (let i = 0; i < 2; i++) statuses.push((await app.inject({ method: 'DELETE', url: '/v1/sessions/mine', headers: limited2 })).statusCode);
  statuses.push((await app.inject({ url: '/v1/sessions/theirs', headers: limited2 })).statusCode);
  statuses.push((await app.inject({ url: '/v1/sessions/mine', headers: limited2 })).statusCode);
  assert.deepEqual(statuses, [403, 403, 403, 403, 403, 429, 429]);
  assert.equal((await app.inject({ url: '/v1/sessions/mine', headers: asAdmin })).statusCode, 200, 'nothing was deleted');
});

test('rate limit without a valid token: guesses count per client address, then 429 without a lookup; valid tokens keep their own budget', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_RATE_LIMIT_PER_MINUTE: '5' } });
  const statuses: number[] = [];
  for (let i = 0; i < 4; i++) statuses.push((await app.inject({ url: '/v1/sessions', headers: bearer(`asgd_guess${i}`) })).statusCode);
  statuses.push((await app.inject({ url: '/v1/sessions' })).statusCode); // no token at all counts too
  for (let i = 0; i < 3; i++) statuses.push((await app.inject({ url: '/v1/sessions', headers: bearer(`asgd_more${i}`) })).statusCode);
  assert.deepEqual(statuses, [401, 401, 401, 401, 401, 429, 429, 429]);
  const limited = await app.inject({ url: '/v1/sessions', headers: bearer('asgd_again') });
  assert.equal(limited.json().code, 'RATE_LIMITED');
  assert.ok(Number(limited.headers['retry-after']) >= 1 && Number(limited.headers['retry-after']) <= 60);
  // The admin token from the same address is not a guess.
  assert.equal((await app.inject({ url: '/v1/sessions', headers: bearer(ADMIN) })).statusCode, 200);
  assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200);
});

test('under pressure (heap above the limit) the API answers 503 with Retry-After; liveness and metrics still answer', async (t) => {
  const { app } = await buildTestApp(t, { config: { maxHeapUsedBytes: 1 } });
  await new Promise((resolve) => setTimeout(resolve, 1_200)); // under-pressure samples once a second
  const res = await app.inject({ url: '/v1/sessions' });
  assert.equal(res.statusCode, 503, res.body);
  assert.equal(res.json().code, 'SERVICE_UNAVAILABLE');
  assert.match(res.json().message, /overloaded \(heapUsedBytes\)/);
  assert.ok(Number(res.headers['retry-after']) > 0);
  assert.equal((await app.inject({ url: '/healthz' })).statusCode, 200);
  assert.equal((await app.inject({ url: '/metrics' })).statusCode, 200);
});

test('a create from a file takes ?options= up to its declared 65,536 characters over real HTTP (percent-encoded to ~3x); one more is INVALID_QUERY naming it', async (t) => {
  const { app } = await buildTestApp(t);
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const file = streamToBuffer(writeSafetensors([['w', { dtype: 'float32', shape: [2], data: Float32Array.of(1, 2) }]]));
  // Options as long as allowed: JSON padded with spaces, each sent as %20.
  const options = (length: number) => {
    const json = JSON.stringify({ hyperparameters: { lr: 0.5 } });
    return `${json.slice(0, -1)}${' '.repeat(length - json.length)}}`;
  };
  const create = (name: string, length: number) => fetch(`http://127.0.0.1:${port}/v1/sessions?name=${name}&options=${encodeURIComponent(options(length))}`, {
    method: 'POST', headers: { 'content-type': 'application/x-safetensors' }, body: new Uint8Array(file),
  });
  const ok = await create('long', 65_536);
  assert.equal(ok.status, 201, await ok.clone().text());
  assert.equal((await ok.json()).param_groups[0].lr, 0.5);
  const over = await create('longer', 65_537);
  assert.equal(over.status, 400);
  const body = await over.json();
  assert.equal(body.code, 'INVALID_QUERY');
  assert.match(body.message, /^options/);
  assert.equal((await fetch(`http://127.0.0.1:${port}/v1/sessions/longer`)).status, 404, 'not created');
});

test('ASGD_MAX_CONNECTIONS bounds the open connections: one more is closed as it comes, and served again once one closes', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_MAX_CONNECTIONS: '3' } });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  // Three connections that trickle headers (a slow or hostile client) hold every slot.
  const held = await Promise.all(Array.from({ length: 3 }, () => new Promise<Socket>((resolve) => {
    const socket = connect(port, '127.0.0.1', () => { socket.write('GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: '); resolve(socket); });
    socket.on('error', () => {});
  })));
  try {
    await new Promise((resolve) => setTimeout(resolve, 100));
    await assert.rejects(fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(5000) }), 'the fourth connection is closed');
    held[0].destroy();
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal((await fetch(`http://127.0.0.1:${port}/healthz`, { headers: { connection: 'close' } })).status, 200, 'a slot is free again');
    // The operator sees it: counted in /metrics, with the connections held.
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`, { headers: { connection: 'close' } })).text();
    assert.match(metrics, /^asgd_connections_dropped_total [1-9]/m);
    assert.match(metrics, /^asgd_open_connections [1-3]$/m);
  } finally {
    for (const s of held) s.destroy(); // before the app closes: it waits for its connections
  }
});

test('a request whose body does not arrive in time gets 408 REQUEST_TIMEOUT; oversized headers 431 HEADERS_TOO_LARGE', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_REQUEST_TIMEOUT_MS: '300' } });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const raw = (request: string, wait = 5_000) => new Promise<string>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let answer = '';
    socket.on('data', (d) => { answer += d; });
    socket.on('close', () => resolve(answer));
    socket.on('error', (err) => (answer ? resolve(answer) : reject(err)));
    socket.write(request);
    setTimeout(() => socket.destroy(), wait);
  });
  const slow = await raw('POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name"');
  assert.match(slow, /^HTTP\/1\.1 408 Request Timeout\r\n/);
  assert.match(slow, /\r\nContent-Type: application\/json; charset=utf-8\r\n/);
  assert.equal(JSON.parse(slow.slice(slow.indexOf('\r\n\r\n') + 4)).code, 'REQUEST_TIMEOUT');
  // Headers that never end (each connection may hold up to 256 KiB of them) are dropped as well.
  const trickled = await raw(`GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ${'a'.repeat(100_000)}`);
  assert.match(trickled, /^HTTP\/1\.1 408 /);
  // 64 KiB of headers is taken (a create's ?options= may be that long), 300 KB is not.
  const big = await raw(`GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: ${'a'.repeat(65_536)}\r\n\r\n`);
  assert.match(big, /^HTTP\/1\.1 200/);
  const huge = await raw(`GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\nX-Pad: ${'a'.repeat(300_000)}\r\n\r\n`);
  assert.match(huge, /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/);
  assert.equal(JSON.parse(huge.slice(huge.indexOf('\r\n\r\n') + 4)).code, 'HEADERS_TOO_LARGE');
  assert.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200, 'the server is fine afterwards');
});

test('with no request timeout (ASGD_REQUEST_TIMEOUT_MS=0) headers still have 10 s: a connection trickling them is dropped', async (t) => {
  // Found by an operator's review: 0, set to allow long uploads, took the headers' deadline away too.
  const { app } = await buildTestApp(t, { env: { ASGD_REQUEST_TIMEOUT_MS: '0' } });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const started = Date.now();
  const answer = await new Promise<string>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let text = '';
    socket.on('data', (d) => { text += d; });
    socket.on('error', () => {});
    socket.on('close', () => { clearInterval(trickle); resolve(text); });
    socket.write('GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ');
    const trickle = setInterval(() => socket.writable && socket.write('a'), 500);
    setTimeout(() => socket.destroy(), 30_000);
  });
  assert.match(answer, /^HTTP\/1\.1 408 /);
  assert.ok(Date.now() - started < 25_000, `dropped after ${Date.now() - started} ms`);
});

test('SIGTERM-style close: the request in flight finishes; one that arrives on its connection gets 503 with a code', async (t) => {
  const { app } = await buildTestApp(t);
  await createSession(app, 'closing', {});
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const socket = connect(port, '127.0.0.1');
  let answer = '';
  socket.on('data', (d) => { answer += d; });
  const closed = new Promise((resolve) => socket.on('close', resolve));
  const body = JSON.stringify({ grads: { b: [0.5, 0.5, 0.5, 0.5] } });
  // The step's headers arrive, then the app starts closing, then its body and a second request behind it.
  socket.write(`POST /v1/sessions/closing/step HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`);
  await new Promise((resolve) => setTimeout(resolve, 200));
  const closing = app.close();
  await new Promise((resolve) => setTimeout(resolve, 200));
  socket.write(`${body}GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n`);
  await closed;
  await closing;
  const responses = answer.split(/(?=HTTP\/1\.1 )/);
  assert.equal(responses.length, 2, answer);
  assert.match(responses[0], /^HTTP\/1\.1 200/, 'the step in flight is answered');
  assert.match(responses[0], /"step":1/);
  assert.match(responses[1], /^HTTP\/1\.1 503/);
  assert.match(responses[1], /retry-after: 1/i);
  assert.equal(JSON.parse(responses[1].slice(responses[1].indexOf('\r\n\r\n') + 4)).code, 'SERVICE_UNAVAILABLE');
});

test('SIGTERM-style close: a request already sent on an idle kept-alive connection gets the 503, not a reset', async (t) => {
  const { app } = await buildTestApp(t);
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  // Four kept-alive connections, each idle after one answered request.
  const conns = await Promise.all(Array.from({ length: 4 }, () => new Promise<{ socket: Socket; text: () => string; ended: Promise<string | null> }>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let text = '';
    const ended = new Promise<string | null>((done) => {
      socket.on('error', (err: NodeJS.ErrnoException) => done(err.code ?? 'error'));
      socket.on('close', () => done(null));
    });
    socket.on('data', (d) => {
      text += d;
      if (/\r\n\r\n[\s\S]*\}$/.test(text) && text.split('HTTP/1.1 ').length === 2) resolve({ socket, text: () => text, ended });
    });
    socket.write('GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n');
  })));
  // A client sends on each its next request (in the socket, not yet read by the server) as closing begins.
  for (const c of conns) c.socket.write('GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n');
  const closing = app.close();
  for (const c of conns) {
    assert.equal(await c.ended, null, 'closed cleanly, not reset');
    const responses = c.text().split(/(?=HTTP\/1\.1 )/);
    assert.equal(responses.length, 2, c.text());
    assert.match(responses[1], /^HTTP\/1\.1 503/);
    assert.match(responses[1], /connection: close/i);
    assert.equal(JSON.parse(responses[1].slice(responses[1].indexOf('\r\n\r\n') + 4)).code, 'SERVICE_UNAVAILABLE');
  }
  await closing;
});

test('logs: a request id on every line, the session on session routes, no tokens and no tensors', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(line));
      done();
    },
  });
  const db = TEST_DB_KIND === 'postgres' ? await createTestDatabase() : null;
  const config = testConfig({ ...(db ? { DATABASE_URL: db.url } : { ASGD_DATA_DIR: 'memory://' }), ASGD_ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'info', ASGD_LOG_REQUESTS: 'all' });
  const app = await buildApp({ config, migrate: true, logger: { level: 'info', stream } });
  t.after(async () => {
    await app.close();
    await db?.drop();
  });
  await app.ready();
  const token = await createToken(app, 'step');
  const marker = 0.123456789;
  await createSession(app, 'logged');
  const stepped = await app.inject({ method: 'POST', url: '/v1/sessions/logged/step', headers: bearer(token), payload: { grads: { b: [marker, marker, marker, marker] } } });
  assert.equal(stepped.statusCode, 200, stepped.body);
  const bad = await app.inject({ method: 'POST', url: '/v1/sessions/logged/step', headers: bearer(token), payload: { grads: { b: [marker, 'x', 1, 2] } } });
  assert.equal(bad.statusCode, 400);
  await app.inject({ url: '/v1/sessions/logged/params', headers: bearer(token) });
  app.log.info({ req: { headers: { authorization: `Bearer ${token}` } }, token }, 'a careless line');
  // A token sent without "Bearer " (a common mistake) is no scheme's name to echo (found by a review: the
  // answer, and the log with it, held its first 40 characters); a registered scheme is named.
  for (const authorization of [ADMIN, token, `${ADMIN} extra`]) {
    const res = await app.inject({ url: '/v1/sessions/logged', headers: { authorization } });
    assert.equal(res.statusCode, 401);
    assert.ok(!res.body.includes(authorization.slice(0, 8)), res.body);
    assert.match(res.json().message, /^Authorization: expected "Bearer <token>"/);
  }
  const basic = await app.inject({ url: '/v1/sessions/logged', headers: { authorization: `basic ${Buffer.from('u:p').toString('base64')}` } });
  assert.match(basic.json().message, /^Authorization: the "Basic" scheme is not accepted/);

  const text = lines.map((l) => JSON.stringify(l)).join('\n');
  assert.ok(!text.includes(token) && !text.includes(ADMIN), 'no token is ever logged');
  for (const secret of [ADMIN, token]) assert.ok(!text.includes(secret.slice(0, 12)), `no part of a token is logged: ${secret.slice(0, 12)}`);
  assert.ok(!text.includes('0.123456'), 'no tensor data is logged');
  assert.match(text, /\[redacted\]/);
  const requestLines = lines.filter((l) => l.msg !== 'a careless line' && (l.req || l.res || l.reqId));
  assert.ok(requestLines.length >= 10);
  for (const line of requestLines) assert.equal(typeof line.reqId, 'string', JSON.stringify(line));
  const sessionLines = requestLines.filter((l) => String((l.req as { url?: string })?.url ?? '').startsWith('/v1/sessions/logged'));
  const ids = new Set(sessionLines.map((l) => l.reqId));
  const sessionRequestLines = requestLines.filter((l) => ids.has(l.reqId));
  assert.ok(sessionRequestLines.length >= 6);
  for (const line of sessionRequestLines) assert.equal(line.session, 'logged', JSON.stringify(line));
  assert.equal(stepped.headers['x-request-id'], [...ids][0], 'the answer names its request id');
  assert.ok(lines.some((l) => l.msg === 'stepped' && l.session === 'logged'));
});

test('steps by session: a series for each of the first 100 sessions a process steps, the others counted as session="(other)"; a deleted one frees its place', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  const names = Array.from({ length: 102 }, (_, i) => `c${i}`);
  for (const name of names) {
    await createSession(app, name);
    assert.equal((await step(app, name, 1)).statusCode, 200);
  }
  await step(app, 'c101', 2);
  const metrics = async () => (await app.inject({ url: '/metrics', headers: asAdmin })).body;
  let text = await metrics();
  const series = (body: string) => body.split('\n').filter((l) => l.startsWith('asgd_steps_total{'));
  assert.equal(series(text).length, 101, 'a hundred sessions and (other)');
  assert.equal(sample(text, 'asgd_steps_total', 'session="c0"'), 1);
  assert.equal(sample(text, 'asgd_steps_total', 'session="c99"'), 1);
  assert.equal(sample(text, 'asgd_steps_total', 'session="(other)"'), 3, 'c100 once, c101 twice');
  assert.equal(series(text).some((l) => l.includes('session="c100"')), false);
  // The steps still add up.
  assert.equal(series(text).reduce((n, l) => n + Number(l.split(' ').pop()), 0), 103);
  assert.equal((await app.inject({ method: 'DELETE', url: '/v1/sessions/c5', headers: asAdmin })).statusCode, 204);
  await createSession(app, 'c102');
  assert.equal((await step(app, 'c102', 1)).statusCode, 200);
  text = await metrics();
  assert.equal(sample(text, 'asgd_steps_total', 'session="c102"'), 1, 'the place c5 left');
  assert.equal(series(text).some((l) => l.includes('session="c5"')), false);
});
