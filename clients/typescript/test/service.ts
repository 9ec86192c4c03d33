// A live service for the client's tests: the repository's own test support (real src/server.ts processes
// on a scratch PostgreSQL database, its deterministic rng) and the torch reference, imported from the
// repository root rather than copied.
import type { TestContext } from 'node:test';
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
 * `processes` service processes (default one) on a fresh PostgreSQL database, and a client of the first;
 * all end with the test. `env` goes to every process.
 */
export async function liveService(t: TestContext, options: TransportOptions = {}, env: Record<string, string> = {}, processes = 1) {
  const cluster = await Cluster.start(t, { processes, env });
  const first = cluster.processes[0];
  const service: Service = { url: first.url, kill: () => first.kill(), start: () => cluster.restart(0) };
  return { cluster, service, url: first.url, urls: cluster.processes.map((p) => p.url), client: new ASGDClient(first.url, options) };
}

let counter = 0;
/** A session name unique within the test run. */
export const uniqueName = (prefix: string): string => `${prefix}-${process.pid}-${++counter}`;
