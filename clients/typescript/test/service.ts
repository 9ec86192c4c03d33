// A live service for the client's tests: real src/server.ts processes of the repository on a scratch
// PostgreSQL database (the repository's own test support), and the torch reference.
import type { TestContext } from 'node:test';
import { createServer } from 'node:net';
import { once } from 'node:events';
import { PG_ADMIN_URL } from '../../../test/helper.ts';
import { ServiceProcess } from '../../../test/support/cluster.ts';
import { createScratchDatabase } from '../../../test/support/scratch-db.ts';
import { hexOf, runTorchReference, skipWithoutTorch, TORCH_PYTHON } from '../../../test/support/torch.ts';
import { ASGDClient, type TransportOptions } from '../src/index.ts';

export { hexOf, runTorchReference, skipWithoutTorch, TORCH_PYTHON };

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  server.close();
  await once(server, 'close');
  return port;
}

/** A service process (src/server.ts) on its own port, and its restart. */
export class Service {
  readonly process: ServiceProcess;

  constructor(process: ServiceProcess) {
    this.process = process;
  }

  get url(): string {
    return this.process.url;
  }

  /** Starts the process and waits until /readyz answers 200 (the database is reachable). */
  async start(timeoutMs = 120_000): Promise<void> {
    this.process.start();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.process.alive) throw new Error(`the service exited while starting:\n${this.process.log}`);
      try {
        if ((await fetch(`${this.url}/readyz`)).status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`the service was not ready after ${timeoutMs} ms:\n${this.process.log}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** kill -9: no shutdown code runs; the next request finds nothing listening. */
  kill(): Promise<void> {
    return this.process.kill();
  }
}

/** One service process on a fresh PostgreSQL database, and a client of it; all end with the test. */
export async function liveService(t: TestContext, options: TransportOptions = {}, env: Record<string, string> = {}) {
  const db = await createScratchDatabase(PG_ADMIN_URL, 'asgd_tsclient');
  const service = new Service(new ServiceProcess(0, await freePort(), { DATABASE_URL: db.url, ASGD_MIGRATE: 'true', LOG_LEVEL: 'warn', ...env }));
  t.after(async () => {
    await service.kill();
    await db.drop();
  });
  await service.start();
  return { service, url: service.url, client: new ASGDClient(service.url, options) };
}

let counter = 0;
/** A session name unique within the test run. */
export const uniqueName = (prefix: string): string => `${prefix}-${process.pid}-${++counter}`;

/** A deterministic generator (mulberry32): the same numbers on every run. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
