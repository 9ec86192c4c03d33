// Expect: 100-continue, as curl sends it for a large body: the service answers 100 only when the route reads
// the body. A request it refuses on its headers gets the refusal instead of a 100 (the client never uploads
// the body) and the connection closes; the session is unchanged.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { buildTestApp } from '../helper.ts';
import { ADMIN, asAdmin, createSession, gradBody } from './support.ts';

interface Conversation {
  socket: Socket;
  /** Resolves with everything read so far once `done(text)` holds, or the connection closes. */
  until(done: (text: string) => boolean): Promise<string>;
  closed: Promise<void>;
}

function open(port: number): Conversation {
  const socket = connect(port, '127.0.0.1');
  socket.setTimeout(10_000, () => socket.destroy());
  let text = '';
  let waiter: (() => void) | null = null;
  const closed = new Promise<void>((resolve) => socket.on('close', () => { waiter?.(); resolve(); }));
  socket.on('error', () => {});
  socket.on('data', (d) => { text += d.toString('latin1'); waiter?.(); });
  return {
    socket,
    closed,
    until: (done) => new Promise((resolve) => {
      const check = () => {
        if (done(text) || socket.destroyed) { waiter = null; resolve(text); }
      };
      waiter = check;
      check();
    }),
  };
}

/** A whole answer (head and a Content-Length body) is in `text` after `from`. */
const answered = (from = 0) => (text: string) => {
  const rest = text.slice(from);
  const head = rest.indexOf('\r\n\r\n');
  if (head < 0) return false;
  const length = Number(/\r\ncontent-length: *(\d+)/i.exec(rest.slice(0, head))?.[1] ?? 0);
  return rest.length >= head + 4 + length;
};

function stepHead(headers: Record<string, string | number>, path = '/v1/sessions/expecting/step'): string {
  return `POST ${path} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n${Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('')}\r\n`;
}

test('Expect: 100-continue: 100 once the body is wanted, then the step; a request refused on its headers gets the refusal, never a 100', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_BODY_LIMIT_STEP: '4096' } });
  await createSession(app, 'expecting');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const versionNow = async () => (await app.inject({ url: '/v1/sessions/expecting', headers: asAdmin })).json().version as number;
  const before = await versionNow();
  const body = JSON.stringify(gradBody(1));

  // Accepted: the 100 comes before any body byte is sent; the body then steps the session, keep-alive stays.
  const good = open(port);
  good.socket.write(stepHead({ Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) }));
  const interim = await good.until((text) => text.includes('\r\n\r\n'));
  assert.match(interim, /^HTTP\/1\.1 100 Continue\r\n\r\n$/);
  good.socket.write(body);
  const final = await good.until(answered(interim.length));
  const finalHead = final.slice(interim.length);
  assert.match(finalHead, /^HTTP\/1\.1 200 /);
  assert.doesNotMatch(finalHead, /\r\nconnection: close/i);
  assert.equal(JSON.parse(finalHead.slice(finalHead.indexOf('\r\n\r\n') + 4)).version, before + 1);
  good.socket.destroy();

  const refused: [string, Record<string, string | number>, number, string, string?][] = [
    ['a wrong token', { Authorization: 'Bearer wrong-token-0123456789abcdef', 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) }, 401, 'UNAUTHORIZED'],
    // Refused on the request line: a misspelt query parameter, a name no session can have (a review: after the upload).
    ['a misspelt query parameter', { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) }, 400, 'INVALID_QUERY', '/v1/sessions/expecting/step?base_versoin=3'],
    ['a malformed session name', { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json', 'Content-Length': 2_000_000 }, 400, 'INVALID_PATH', '/v1/sessions/bad%00name/step'],
    ['a content coding', { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json', 'Content-Encoding': 'gzip', 'Content-Length': 64 }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ['a body over the limit', { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'application/json', 'Content-Length': 1_000_000 }, 413, 'BODY_TOO_LARGE'],
    ['an unsupported media type', { Authorization: `Bearer ${ADMIN}`, 'Content-Type': 'text/csv', 'Content-Length': 64 }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
  ];
  for (const [what, headers, status, code, path] of refused) {
    const c = open(port);
    c.socket.write(stepHead(headers, path)); // no body: the client waits for the 100
    const text = await c.until(answered());
    assert.match(text, new RegExp(`^HTTP/1\\.1 ${status} `), `${what}: ${text.slice(0, 80)}`);
    const head = text.slice(0, text.indexOf('\r\n\r\n'));
    assert.match(head, /\r\nconnection: close/i, `${what}: the connection closes`);
    assert.equal(JSON.parse(text.slice(head.length + 4)).code, code, what);
    await c.closed; // closed by the service, without the body ever being sent
  }
  assert.equal(await versionNow(), before + 1, 'only the accepted step changed the session');
});

test('Expect: 100-continue with a body of 1 MiB or more: a session that does not exist, or a JSON body over its session\'s bound, is refused before the 100', async (t) => {
  // The body budget's counter (bodies of 1 MiB or more) read the request at once, which sent the 100: curl
  // then uploaded the whole body before its 404 or 413.
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  await createSession(app, 'expecting');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const head = (path: string, type: string, length: number) =>
    `${path.endsWith('step') ? 'POST' : 'PUT'} ${path} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: ${type}\r\nContent-Length: ${length}\r\n\r\n`;
  for (const [path, type, status, code] of [
    ['/v1/sessions/nosuch/step', 'application/x-safetensors', 404, 'SESSION_NOT_FOUND'],
    ['/v1/sessions/nosuch/state_dict', 'application/octet-stream', 404, 'SESSION_NOT_FOUND'],
    ['/v1/sessions/expecting/step', 'application/json', 413, 'BODY_TOO_LARGE'],
    // A file over its session's bound (8 bytes an element, 4 KiB a parameter, 1 MiB): 8 MiB of gradients for a
    // session of six numbers was read whole before its 400 (a hostile review: 400 MB held by two such steps).
    ['/v1/sessions/expecting/step', 'application/x-safetensors', 413, 'BODY_TOO_LARGE'],
    ['/v1/sessions/expecting/step', 'application/octet-stream', 413, 'BODY_TOO_LARGE'],
    ['/v1/sessions/expecting/params', 'application/x-safetensors', 413, 'BODY_TOO_LARGE'],
    // A file type the route does not take (PUT checkpoint takes torch.save and JSON): 415 before the body.
    ['/v1/sessions/expecting/checkpoint', 'application/x-safetensors', 415, 'UNSUPPORTED_MEDIA_TYPE'],
  ] as const) {
    const c = open(port);
    c.socket.write(head(path, type, 8 * 1024 * 1024));
    const text = await c.until(answered());
    assert.match(text, new RegExp(`^HTTP/1\\.1 ${status} `), `${path}: ${text.slice(0, 80)}`);
    assert.equal(JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)).code, code, path);
    await c.closed;
  }
  const tooLarge = await app.inject({ method: 'POST', url: '/v1/sessions/expecting/step', headers: { ...asAdmin, 'content-type': 'application/x-safetensors' }, payload: Buffer.alloc(2 * 1024 * 1024) });
  assert.equal(tooLarge.statusCode, 413);
  assert.match(tooLarge.json().message, /^body: a file of gradients of this session \(\d+ elements in \d+ parameters?\) takes at most \d+ bytes/);
  // And a large body that is wanted still gets its 100 (a file within its session's bound, over the 1 MiB below which no session is looked up).
  const c = open(port);
  c.socket.write(head('/v1/sessions/expecting/params', 'application/x-safetensors', 1024 * 1024 + 4096));
  assert.match(await c.until((text) => text.includes('\r\n\r\n')), /^HTTP\/1\.1 100 Continue\r\n\r\n$/);
  c.socket.destroy();
});
