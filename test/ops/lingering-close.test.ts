// A refusal sent while the client is still uploading its body (a 413 for a body past its bound) closes the
// connection lingering: the client reads the refusal whatever it does meanwhile. Closed at once, the
// client's next writes met a reset: fetch said EPIPE, requests with a chunked body "Broken pipe", and
// neither saw the 413.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';
import { buildTestApp } from '../helper.ts';
import { ADMIN, asAdmin, createSession } from './support.ts';

async function listening(t: TestContext) {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN, ASGD_BODY_LIMIT_STEP: '100000' } });
  await createSession(app, 'bounded');
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const version = async () => (await app.inject({ url: '/v1/sessions/bounded', headers: asAdmin })).json().version as number;
  return { app, port, version };
}

/** Writes `head`, then `chunks` one after another (waiting for each to drain), then reads; the client's own write errors are kept. */
async function sendAllThenRead(port: number, head: string, chunks: Buffer[]): Promise<{ text: string; writeError: string | null }> {
  // allowHalfOpen: the server's FIN (sent with its answer) does not end this client's sending, as in Python's socket.
  const socket: Socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  let text = '';
  let writeError: string | null = null;
  socket.on('data', (d) => (text += d.toString('latin1')));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.on('error', (err: NodeJS.ErrnoException) => (writeError ??= err.code ?? err.message));
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  const write = (data: string | Buffer) => new Promise<void>((resolve) => {
    if (socket.destroyed) return resolve();
    socket.write(data, () => resolve());
  });
  await write(head);
  for (const chunk of chunks) await write(chunk);
  // Only now does this client read: as Python's requests does with a body it sends in pieces.
  socket.end();
  await closed;
  return { text, writeError };
}

test('a 413 sent while the body is still arriving reaches the client: fetch with a Content-Length body, a chunked body sent whole before reading', async (t) => {
  const { port, version } = await listening(t);
  const before = await version();

  // fetch of a 5 MB file to a step route bounded at 100,000 bytes: refused on its Content-Length.
  for (let i = 0; i < 5; i++) {
    const res = await fetch(`http://127.0.0.1:${port}/v1/sessions/bounded/step`, {
      method: 'POST', body: Buffer.alloc(5_000_000, 1), headers: { ...asAdmin, 'content-type': 'application/x-safetensors' },
    });
    assert.equal(res.status, 413, `attempt ${i + 1}`);
    const body = await res.json() as { code: string; message: string };
    assert.equal(body.code, 'BODY_TOO_LARGE');
    assert.match(body.message, /body/);
  }

  // 8 MB of chunked JSON, refused once 100,000 bytes have arrived; every chunk is written before reading.
  const piece = Buffer.from('0.1,'.repeat(16_384));
  const chunks = [Buffer.from('{"grads":{"w":[')];
  for (let i = 0; i < 128; i++) chunks.push(piece);
  chunks.push(Buffer.from('0.1]}}'));
  const framed = chunks.map((c) => Buffer.concat([Buffer.from(`${c.length.toString(16)}\r\n`), c, Buffer.from('\r\n')]));
  framed.push(Buffer.from('0\r\n\r\n'));
  const head = `POST /v1/sessions/bounded/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`;
  const { text, writeError } = await sendAllThenRead(port, head, framed);
  assert.equal(writeError, null, 'the client wrote its whole body without a reset');
  assert.match(text, /^HTTP\/1\.1 413 /);
  assert.match(text, /"code":"BODY_TOO_LARGE"/);
  assert.match(text, /\r\nconnection: close\r\n/i);

  assert.equal(await version(), before, 'the session is unchanged');
});

test('a connection closing lingering is cut when the app closes: a shutdown does not wait for its client', async (t) => {
  const { app, port } = await listening(t);
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  socket.on('error', () => {});
  let text = '';
  socket.on('data', (d) => (text += d.toString('latin1')));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  // A body that goes on arriving slowly after its 413.
  socket.write(`POST /v1/sessions/bounded/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/x-safetensors\r\nContent-Length: 10000000\r\n\r\n`);
  const trickle = setInterval(() => socket.writable && socket.write(Buffer.alloc(1000)), 50);
  t.after(() => clearInterval(trickle));
  while (!text.includes('\r\n\r\n')) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.match(text, /^HTTP\/1\.1 413 /);
  // Still open past the idle limit (5 s) while the client sends: the server reads and drops what comes.
  await new Promise((resolve) => setTimeout(resolve, 6_000));
  assert.equal(socket.destroyed, false, 'the connection lingers while the client sends');
  const started = Date.now();
  await app.close();
  await closed;
  assert.ok(Date.now() - started < 5_000, `closed in ${Date.now() - started} ms`);
});

test('a lingering connection whose client sends nothing more for 5 s is closed', async (t) => {
  const { app, port } = await listening(t);
  const socket = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  socket.on('error', () => {});
  t.after(() => socket.destroy());
  let text = '';
  socket.on('data', (d) => (text += d.toString('latin1')));
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  socket.write(`POST /v1/sessions/bounded/step HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Type: application/x-safetensors\r\nContent-Length: 10000000\r\n\r\n`);
  socket.write(Buffer.alloc(1000));
  while (!text.includes('\r\n\r\n')) await new Promise((resolve) => setTimeout(resolve, 20));
  const answered = Date.now();
  assert.match(text, /^HTTP\/1\.1 413 /);
  // The client neither sends nor closes (its side stays half-open): the server closes the connection after
  // about 5 s, not the 30 s a sending client may take.
  const connections = () => new Promise<number>((resolve) => app.server.getConnections((err, n) => resolve(err ? -1 : n)));
  while ((await connections()) > 0 && Date.now() - answered < 20_000) await new Promise((resolve) => setTimeout(resolve, 100));
  const after = Date.now() - answered;
  assert.ok(after >= 4_500 && after < 9_000, `closed ${after} ms after the answer`);
});
