// A TCP proxy between the service and PostgreSQL that can stop answering without closing the connection
// (a network black hole, a hung server), for the tests of a silent database.
import { once } from 'node:events';
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { TestContext } from 'node:test';
import { createTestDatabase } from '../helper.ts';

export type Mode = 'pass' | 'drop-replies' | 'black-hole';

/**
 * A TCP proxy to PostgreSQL. 'drop-replies': what the service sends reaches PostgreSQL, its answers vanish;
 * 'black-hole': nothing gets through either way, not even a FIN. The sockets stay open (no FIN, no RST), as
 * behind a dead route; a side the service destroys is closed on the other side too.
 */
export async function startProxy(target: { host: string; port: number }): Promise<{ port: number; mode: Mode; server: Server; dropAll(): void; stop(): void }> {
  const sockets = new Set<Socket>();
  const state = {
    port: 0, mode: 'pass' as Mode, server: null as unknown as Server,
    /** Resets every connection (as a route that came back answers a dead connection's packets): new ones go through. */
    dropAll() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    /** Destroys every connection (half-open ones keep the process alive otherwise) and closes the server. */
    stop() {
      for (const s of sockets) s.destroy();
      state.server.close();
    },
  };
  // Half-open allowed: a FIN the service sends into the black hole is not answered by one (a dead route
  // answers nothing).
  state.server = createServer({ allowHalfOpen: true }, (client) => {
    const upstream = connect({ port: target.port, host: target.host, allowHalfOpen: true });
    sockets.add(client).add(upstream);
    client.on('data', (chunk) => {
      if (state.mode !== 'black-hole') upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (state.mode === 'pass') client.write(chunk);
    });
    client.on('end', () => {
      if (state.mode === 'pass') upstream.end();
    });
    upstream.on('end', () => {
      if (state.mode === 'pass') client.end();
    });
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('close', close).on('error', close);
    upstream.on('close', close).on('error', close);
  });
  state.server.listen(0, '127.0.0.1');
  await once(state.server, 'listening');
  state.port = (state.server.address() as { port: number }).port;
  return state;
}

/** A fresh database reached through the proxy (both gone when the test ends): its URL and the proxy. */
export async function proxiedDatabase(t: TestContext) {
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const url = new URL(db.url);
  const proxy = await startProxy({ host: url.hostname, port: Number(url.port || 5432) });
  t.after(() => proxy.stop());
  url.port = String(proxy.port);
  return { url, proxy };
}
