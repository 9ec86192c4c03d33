// A live service for the client's tests: the repository's own test support (real src/server.ts processes
// on a scratch PostgreSQL database, its deterministic rng) and the torch reference, imported from the
// repository root rather than copied.
import { after, type TestContext } from 'node:test';
import { rng } from '../../../test/helper.ts';
import { Cluster } from '../../../test/support/cluster.ts';
import { hexOf, runTorchReference, skipWithoutTorch, TORCH_PYTHON } from '../../../test/support/torch.ts';
import { ASGDClient, type TransportOptions } from '../src/index.ts';

export { hexOf, rng, runTorchReference, skipWithoutTorch, TORCH_PYTHON };

/** One service process, kill -9 and start again on its port (the database stays). */
export interface Service {
  readonly url: string;
  kill(): Promise<void>;
  start(): Promise<void>;
}

/**
 * `processes` service processes (default one) on a fresh PostgreSQL database, and a client of the first,
 * the test's own: they end with it. For a test that kills or restarts a process or looks into the database.
 */
export async function ownService(t: TestContext, options: TransportOptions = {}, env: Record<string, string> = {}, processes = 1) {
  const cluster = await Cluster.start(t, { processes, env });
  const first = cluster.processes[0];
  const service: Service = { url: first.url, kill: () => first.kill(), start: () => cluster.restart(0) };
  return { cluster, service, url: first.url, urls: cluster.processes.map((p) => p.url), client: new ASGDClient(first.url, options) };
}

/** Service processes shared by the tests of one file (by env and count), closed when its tests end. */
const shared = new Map<string, Promise<{ url: string; urls: string[] }>>();
const closing: (() => unknown)[] = [];
after(async () => {
  for (const close of closing) await close();
});

/**
 * `processes` service processes (default one) on a PostgreSQL database, and a client of the first, shared
 * by the tests of a file that ask for the same `env` and count (a start costs about 5 s: 34 starts were a
 * third of this suite's time). Each test names its sessions its own (uniqueName). `env` goes to every process.
 */
export async function liveService(options: TransportOptions = {}, env: Record<string, string> = {}, processes = 1) {
  const key = JSON.stringify([env, processes]);
  let live = shared.get(key);
  if (!live) {
    live = Cluster.start({ after: (fn: () => unknown) => closing.push(fn) } as unknown as TestContext, { processes, env })
      .then((cluster) => ({ url: cluster.processes[0].url, urls: cluster.processes.map((p) => p.url) }));
    shared.set(key, live);
    live.catch(() => shared.delete(key)); // a start that failed is not kept: the next test tries again
  }
  const { url, urls } = await live;
  return { url, urls, client: new ASGDClient(url, options) };
}

let counter = 0;
/** A session name unique within the test run. */
export const uniqueName = (prefix: string): string => `${prefix}-${process.pid}-${++counter}`;
