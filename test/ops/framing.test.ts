// A request Node's HTTP parser reads whole, followed on the same connection by bytes it cannot read: the
// request is answered as it was handled, then the bad bytes get their error and the connection closes. A
// step committed must not be answered with the next request's 400 (the client would take it as refused).
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { test } from 'node:test';
import { buildTestApp } from '../helper.ts';
import { ADMIN, asAdmin, createSession, gradBody } from './support.ts';

/** Writes `bytes` in one write and reads until the server closes the connection. */
function exchange(port: number, bytes: Buffer | string): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let answer = '';
    socket.on('data', (d) => (answer += d.toString('latin1')));
    socket.on('close', () => resolve(answer));
    socket.on('error', () => resolve(answer));
    socket.setTimeout(10_000, () => socket.destroy());
    socket.write(bytes);
  });
}

/** The status lines and JSON bodies of the answers in `raw`, in order. */
function answers(raw: string): { status: number; body: Record<string, unknown> }[] {
  const out: { status: number; body: Record<string, unknown> }[] = [];
  let rest = raw;
  while (rest.startsWith('HTTP/1.1 ')) {
    const head = rest.indexOf('\r\n\r\n');
    const length = Number(/\r\ncontent-length: *(\d+)/i.exec(rest.slice(0, head))?.[1] ?? 0);
    out.push({ status: Number(rest.slice(9, 12)), body: JSON.parse(rest.slice(head + 4, head + 4 + length)) });
    rest = rest.slice(head + 4 + length);
  }
  return out;
}

test('a step followed on its connection by bytes that are not HTTP is answered 200, then the bytes get their 4xx', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'framed');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const body = JSON.stringify(gradBody(1));
  const stepRequest = `POST /v1/sessions/framed/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
  const followers: [string, string, number, string][] = [
    ['bytes that are no request', '\u0001garbage\r\n\r\n', 400, 'BAD_REQUEST'],
    ['a request line of an unknown version', 'GET /healthz HTTP/9.9\r\nHost: localhost\r\n\r\n', 400, 'BAD_REQUEST'],
    ['a request with oversized headers', `GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ${'a'.repeat(300_000)}\r\n\r\n`, 431, 'HEADERS_TOO_LARGE'],
  ];
  let version = (await app.inject({ url: '/v1/sessions/framed', headers: asAdmin })).json().version as number;
  for (const [what, follower, status, code] of followers) {
    const got = answers(await exchange(port, stepRequest + follower));
    assert.equal(got.length, 2, `${what}: two answers, the step's and the error's`);
    assert.equal(got[0].status, 200, `${what}: ${JSON.stringify(got[0].body)}`);
    assert.equal(got[0].body.version, version + 1, what);
    assert.equal(got[1].status, status, what);
    assert.equal(got[1].body.code, code, what);
    // The step was applied once, as its answer says.
    version += 1;
    assert.equal((await app.inject({ url: '/v1/sessions/framed', headers: asAdmin })).json().version, version, what);
  }
  // A request whose own body is bad still gets its error at once (it is the request the error is about).
  const chunkedBad = `POST /v1/sessions/framed/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n`;
  const bad = answers(await exchange(port, chunkedBad));
  assert.deepEqual(bad.map((a) => [a.status, a.body.code]), [[400, 'BAD_REQUEST']]);
  assert.equal((await app.inject({ url: '/v1/sessions/framed', headers: asAdmin })).json().version, version);
});

test('header values are quoted in messages as the client wrote them (UTF-8), not as latin1 mojibake', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'quoted');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const request = (head: string) => Buffer.from(`${head}Host: x\r\nAuthorization: Bearer ${ADMIN}\r\nConnection: close\r\n\r\n`, 'utf8');
  const cases: [string, string, number, string][] = [
    ['Content-Type', 'POST /v1/sessions/quoted/step HTTP/1.1\r\nContent-Type: tëxt/çsv\r\nContent-Length: 0\r\n', 415, 'tëxt/çsv'],
    ['Accept', 'GET /v1/sessions/quoted/params HTTP/1.1\r\nAccept: äpplication/x\r\n', 406, 'äpplication/x'],
    ['Content-Encoding', 'POST /v1/sessions/quoted/step HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzïp\r\nContent-Length: 2\r\n', 415, 'gzïp'],
  ];
  for (const [header, head, status, shown] of cases) {
    const raw = await exchange(port, request(head));
    const [got] = answers(Buffer.from(raw, 'latin1').toString('utf8'));
    assert.equal(got?.status, status, `${header}: ${raw.slice(0, 200)}`);
    assert.ok(String(got.body.message).includes(shown), `${header}: ${String(got.body.message)}`);
  }
});

test('pipelined requests are handled in turn: after an answer that closes the connection, the next request is not handled (its step is not committed unanswered)', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'piped');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const head = (length: number, extra = '') => `POST /v1/sessions/piped/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\n${extra}Content-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`;
  const body = JSON.stringify(gradBody(1));
  const good = head(Buffer.byteLength(body)) + body;
  const versionNow = async () => (await app.inject({ url: '/v1/sessions/piped', headers: asAdmin })).json().version as number;
  let version = await versionNow();
  // Found by a hostile-input review: the first request's refusal closed the connection, the second was
  // committed all the same and never answered; a client retrying it applied it twice.
  const closers: [string, string, string][] = [
    ['a body that is not JSON', head(5) + '{"gr"', 'INVALID_JSON'],
    ['a header sent twice', head(Buffer.byteLength(body), `Authorization: Bearer ${ADMIN}\r\n`) + body, 'INVALID_HEADER'],
  ];
  for (const [what, first, code] of closers) {
    const got = answers(await exchange(port, first + good + good));
    assert.deepEqual(got.map((a) => [a.status, a.body.code]), [[400, code]], what);
    assert.equal(await versionNow(), version, `${what}: nothing after it was handled`);
  }
  // Two steps pipelined, then bytes that are no request: both steps are answered (and applied once each),
  // then the error; the second step's 400 in its place would have hidden that it committed.
  const both = answers(await exchange(port, good + good + '\u0001garbage\r\n\r\n'));
  assert.deepEqual(both.map((a) => [a.status, a.body.version ?? a.body.code]), [[200, version + 1], [200, version + 2], [400, 'BAD_REQUEST']]);
  version += 2;
  assert.equal(await versionNow(), version);
  // Pipelined requests that keep the connection open are each answered, in order, and applied once each.
  const got = answers(await exchange(port, good + good + good.replace('Content-Type: application/json\r\n', 'Content-Type: application/json\r\nConnection: close\r\n')));
  assert.deepEqual(got.map((a) => [a.status, a.body.version]), [[200, version + 1], [200, version + 2], [200, version + 3]]);
  version += 3;
  assert.equal(await versionNow(), version);
});

test('a connection with more pipelined requests waiting than the bound is cut: they are not parked in memory', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'parked');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  // Behind a read that waits (after_version + wait), 200 requests: 100,000 of them held 500 MB before the bound.
  const version = (await app.inject({ url: '/v1/sessions/parked', headers: asAdmin })).json().version;
  const held = `GET /v1/sessions/parked/params?after_version=${version}&wait=5 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\n\r\n`;
  const health = 'GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n';
  const started = Date.now();
  const raw = await exchange(port, held + health.repeat(200));
  assert.ok(Date.now() - started < 4000, `cut at once, not after the held read (${Date.now() - started} ms)`);
  assert.equal(raw, '', 'nothing answered: the connection was cut');
  // The service goes on.
  assert.equal((await app.inject({ url: '/v1/sessions/parked', headers: asAdmin })).statusCode, 200);
});

/** Writes `bytes` in one write and resolves with the first `n` answers on the connection (or what came in 10 s). */
function firstAnswers(port: number, bytes: Buffer | string, n: number): Promise<{ status: number; body: Record<string, unknown> }[]> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let raw = '';
    const done = () => {
      socket.destroy();
      resolve(answers(raw));
    };
    socket.on('data', (d) => {
      raw += d.toString('latin1');
      if (answers(raw).length >= n) done();
    });
    socket.on('close', done);
    socket.on('error', done);
    socket.setTimeout(10_000, done);
    socket.write(bytes);
  });
}

test('a body refused before it is read (its session\'s bound, an unknown session) leaves the connection to the next request', async (t) => {
  // Found by an API review: a 413 for a JSON step over its session's bound, then GET /healthz on the same
  // connection, which was never answered (reset after 73 s): the body's byte counter had begun to read it,
  // so Node did not drop it, and the connection read nothing more.
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'bounded');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const big = `{"grads":{"w":[${'0.5,'.repeat(400_000)}0.5]}}`; // 1.6 MB: over a small session's bound of about 1 MiB
  const next = 'GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n';
  const cases: [string, string, string, number, string][] = [
    ['a JSON step over its session\'s bound', 'POST', '/v1/sessions/bounded/step', 413, 'BODY_TOO_LARGE'],
    ['PUT params over its session\'s bound', 'PUT', '/v1/sessions/bounded/params', 413, 'BODY_TOO_LARGE'],
    ['a step to no session', 'POST', '/v1/sessions/nowhere/step', 404, 'SESSION_NOT_FOUND'],
  ];
  for (const [what, method, url, status, code] of cases) {
    const request = `${method} ${url} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/json\r\nContent-Length: ${big.length}\r\n\r\n${big}`;
    const got = await firstAnswers(port, request + next, 2);
    assert.equal(got[0]?.status, status, `${what}: ${JSON.stringify(got[0]?.body)}`);
    assert.equal(got[0].body.code, code, what);
    assert.equal(got[1]?.status, 200, `${what}: the next request on the connection is answered`);
    assert.equal(got[1].body.status, 'ok', what);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/bounded', headers: asAdmin })).json().version, 1, 'nothing was applied');

  // A file of gradients over the session's bound, chunked (no length announced): refused while it arrives.
  const file = Buffer.alloc(3 * 1024 * 1024, 7);
  const chunked = `POST /v1/sessions/bounded/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/x-safetensors\r\nTransfer-Encoding: chunked\r\n\r\n`;
  const got = await firstAnswers(port, Buffer.concat([Buffer.from(chunked), Buffer.from(`${file.length.toString(16)}\r\n`), file, Buffer.from('\r\n0\r\n\r\n')]), 1);
  assert.equal(got[0]?.status, 413, JSON.stringify(got[0]?.body));
  assert.equal(got[0].body.code, 'BODY_TOO_LARGE');
  assert.equal((await app.inject({ url: '/v1/sessions/bounded', headers: asAdmin })).json().version, 1, 'nothing was applied');
});

test('a body still arriving after its request was answered, cut by the request timeout: no second answer is written', async (t) => {
  // A review: the 413 for a step over its session's bound, then the rest of the body trickled until the
  // request timeout: a 408 followed the 413 on the connection, an answer to no request.
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_REQUEST_TIMEOUT_MS: '1500' } });
  await createSession(app, 'trickled');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const raw = await new Promise<string>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let got = '';
    socket.on('data', (d) => (got += d.toString('latin1')));
    socket.on('close', () => resolve(got));
    socket.on('error', () => resolve(got));
    socket.setTimeout(10_000, () => socket.destroy());
    socket.write(`POST /v1/sessions/trickled/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{"grads":{"w":[`);
    const trickle = setInterval(() => socket.writable && socket.write('0.5,'), 100);
    socket.on('close', () => clearInterval(trickle));
  });
  const got = answers(raw);
  assert.equal(got.length, 1, `one answer: ${raw.slice(0, 400)}`);
  assert.equal(got[0].status, 413);
  assert.equal(got[0].body.code, 'BODY_TOO_LARGE');
});
