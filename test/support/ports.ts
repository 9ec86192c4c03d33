// Ports for the service processes and PostgreSQL servers the tests start.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';

/** The kernel's range of ephemeral ports (the local ports of outgoing connections); Linux's default if unknown. */
function ephemeralRange(): [number, number] {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (low > 0 && high >= low) return [low, high];
  } catch {
    // not Linux: its default
  }
  return [32768, 60999];
}

function listens(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * A loopback port nothing listens on right now, below the ephemeral range. A port the system picks (listen
 * on 0) is an ephemeral one: while a process on it is down (killed, restarting), a client retrying it can be
 * given that very port as its own and connect to itself (TCP's simultaneous open), and the process started
 * again on it cannot listen (EADDRINUSE: seen in CI, a cluster test's kill -9 and restart); an outgoing
 * connection elsewhere can hold it too.
 */
export async function freePort(): Promise<number> {
  const [low] = ephemeralRange();
  const top = Math.min(low, 65536) - 1;
  const bottom = Math.max(1024, top - 16_000);
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = bottom + Math.floor(Math.random() * (top - bottom + 1));
    if (await listens(port)) return port;
  }
  throw new Error(`no free port found in ${bottom}-${top}`);
}
