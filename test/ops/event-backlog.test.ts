// An event stream's client that stops reading: what waits for it in this process is bounded (events were
// written regardless and kept in memory: 100 such streams held 400 MB after 1,500 steps). PostgreSQL only:
// it takes 1,500 steps, and the embedded database adds nothing here.
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { test } from 'node:test';
import { buildTestApp, randomData } from '../helper.ts';

const params = [{ name: 'w', shape: [5], data: randomData(5, 1) }];
type App = Awaited<ReturnType<typeof buildTestApp>>['app'];
async function setup(app: App, name: string) {
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name, params } })).statusCode, 201);
}
const step = (app: App, name: string, k: number, extra: Record<string, unknown> = {}) =>
  app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: randomData(5, 10 + k) }, ...extra } });

test('an event stream whose client stops reading holds a bounded backlog: it gets the newest version once it reads again, not every event queued in memory', async (t) => {
  const { app } = await buildTestApp(t);
  await app.listen({ port: 0, host: '127.0.0.1' });
  const port = (app.server.address() as { port: number }).port;
  await setup(app, 'slow');
  const sockets: Socket[] = [];
  app.server.on('connection', (socket) => sockets.push(socket));
  // A client with a small receive buffer (the kernel then takes little of the backlog) that reads nothing
  // until told to, then reads until it has the version it is told and says how many bytes came.
  const { spawn } = await import('node:child_process');
  const reader = spawn('python3', ['-c', `
import socket, sys, re
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); s.connect(("127.0.0.1", ${port}))
s.sendall(b"GET /v1/sessions/slow/events HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
print("open", flush=True)
want = sys.stdin.readline().strip()
got = b""; s.settimeout(30)
while ("id: %s@" % want).encode() not in got:
    chunk = s.recv(65536)
    if not chunk: break
    got += chunk
print(len(got), flush=True)
`], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.after(() => reader.kill());
  const lines: string[] = [];
  reader.stdout.on('data', (d) => lines.push(...String(d).split('\n').filter(Boolean)));
  // Generous: CI runs two test files at once on two cores.
  const until = async (check: () => boolean) => {
    for (const end = Date.now() + 30_000; !check(); await new Promise((r) => setTimeout(r, 20))) if (Date.now() > end) throw new Error(`timed out: ${lines}`);
  };
  await until(() => lines.includes('open') && app.versions.stats().streams === 1);
  // 1,500 steps whose events are about 4.5 KB each (32 metrics with long names): 6.8 MB of events, more
  // than the kernel takes for a client that reads nothing (it grows the connection's send buffer to 4 MB).
  const metrics = Object.fromEntries(Array.from({ length: 32 }, (_, i) => [`m${String(i).padStart(2, '0')}${'x'.repeat(110)}`, i]));
  for (let k = 0; k < 1500; k++) assert.equal((await step(app, 'slow', k, { metrics })).statusCode, 200);
  // What waits in this process for the client: bounded (the events written regardless were all kept).
  const unsent = Math.max(...sockets.map((socket) => socket.writableLength));
  assert.ok(unsent < 160_000, `${unsent} bytes of events wait in memory for a client that reads nothing`);
  const version = (await app.inject({ url: '/v1/sessions/slow' })).json().version;
  reader.stdin.write(`${version}\n`);
  await until(() => lines.length === 2);
  // Reading again, it gets the newest version (after what the kernel held, up to a few MB, and the backlog).
  assert.ok(Number(lines[1]) > 0, `the client got ${lines[1]} bytes`);
});
