// What the cluster tests share: one small model, seeded gradients, clients that step with an
// Idempotency-Key and retry elsewhere, the checks on acknowledged versions, and the single-process replay.
import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { bits, buildTestApp, randomData } from '../helper.ts';
import { requestWithRetry, type Cluster, type ClientStats } from '../support/cluster.ts';

/** Small t0 so that averaging (ax, eta, mu) starts early; weight decay so that it enters every step. */
export const HYPERPARAMETERS = { lr: 0.05, lambd: 1e-3, alpha: 0.75, t0: 20, weight_decay: 0.01 };

export function sessionBody(name: string, extra: Record<string, unknown> = {}) {
  return {
    name,
    params: [
      { name: 'w', shape: [16, 8], data: randomData(128, 11) },
      { name: 'b', shape: [8], data: randomData(8, 12) },
    ],
    hyperparameters: HYPERPARAMETERS,
    ...extra,
  };
}

/** The gradient client `client` sends as its `k`-th step (JSON, seeded: the same on every run). */
export function gradientOf(client: number, k: number): { w: { shape: number[]; data: number[] }; b: number[] } {
  const seed = 100_000 + client * 1_000 + k;
  return { w: { shape: [16, 8], data: randomData(128, seed, 0.5) }, b: randomData(8, seed + 500_000, 0.5) };
}

export interface Ack {
  client: number;
  k: number;
  key: string | null;
  grads: ReturnType<typeof gradientOf>;
  version: number;
  step: number;
  replayed: boolean;
  process: number;
}

export interface LoadOptions {
  session: string;
  clients: number;
  steps: number;
  /** The process client `c` sends its `k`-th step to first (it retries on the others). */
  target: (client: number, k: number) => number;
  /** Called after every acknowledged step (tests kill or stop processes from here). */
  onAck?: (ack: Ack, acked: number) => void | Promise<void>;
  /**
   * true (default): every step carries an Idempotency-Key and is retried until acknowledged. false: no key,
   * one attempt (a step without a key must not be sent twice), so any error fails the load. A function
   * decides per client.
   */
  idempotent?: boolean | ((client: number) => boolean);
  /** Pause between a client's steps, so that a load lasts long enough for what a test does meanwhile. */
  pauseMs?: number;
  deadlineMs?: number;
}

/** `clients` concurrent clients, each sending `steps` steps one after another; every step is retried until acknowledged. */
export async function runLoad(cluster: Cluster, stats: ClientStats, opts: LoadOptions): Promise<Ack[]> {
  const acks: Ack[] = [];
  const nonce = Math.random().toString(36).slice(2, 8);
  const client = async (c: number) => {
    for (let k = 0; k < opts.steps; k++) {
      const grads = gradientOf(c, k);
      const idempotent = typeof opts.idempotent === 'function' ? opts.idempotent(c) : (opts.idempotent ?? true);
      const key = idempotent ? `${opts.session}-${nonce}-c${c}-k${k}` : null;
      const res = await requestWithRetry(cluster, stats, `/v1/sessions/${opts.session}/step`, {
        method: 'POST',
        json: { grads },
        ...(key && { headers: { 'idempotency-key': key } }),
        prefer: opts.target(c, k),
        deadlineMs: opts.deadlineMs ?? 60_000,
        ...(!idempotent && { attempts: 1 }),
      });
      assert.equal(res.status, 200, res.text);
      const answer = res.body as { session: string; step: number; version: number; staleness: number; replayed?: boolean };
      assert.equal(answer.session, opts.session, res.text);
      assert.ok(Number.isSafeInteger(answer.version) && answer.version >= 2, res.text);
      assert.equal(answer.staleness, 0, res.text);
      if (answer.replayed) stats.replayed++;
      const ack: Ack = { client: c, k, key, grads, version: answer.version, step: answer.step, replayed: answer.replayed === true, process: res.process };
      acks.push(ack);
      await opts.onAck?.(ack, acks.length);
      if (opts.pauseMs) await new Promise((resolve) => setTimeout(resolve, opts.pauseMs));
    }
  };
  await Promise.all(Array.from({ length: opts.clients }, (_, c) => client(c)));
  return acks;
}

/**
 * Every acknowledged step holds its own version, the versions run from `first` without a gap, and each
 * answer's step count is its place in that order: no step lost, none applied twice.
 */
export function assertVersionsExactlyOnce(acks: Ack[], first: number, stepsBefore = 0): Ack[] {
  const ordered = [...acks].sort((a, b) => a.version - b.version);
  const versions = ordered.map((a) => a.version);
  assert.deepEqual(versions, Array.from({ length: acks.length }, (_, i) => first + i), 'acknowledged versions are consecutive and each appears once');
  ordered.forEach((a, i) => assert.equal(a.step, stepsBefore + i + 1, `version ${a.version} answered step ${a.step}`));
  return ordered;
}

/** What "the same state" means: step count, parameters and their averages as float32 bits, the whole state_dict. */
export interface StateFingerprint {
  step: number;
  params: Record<string, number[]>;
  averaged: Record<string, number[]>;
  stateDict: unknown;
}

const bitsOfParams = (params: Record<string, { data: number[] }>) =>
  Object.fromEntries(Object.entries(params).map(([name, t]) => [name, bits(t.data)]));

/** The session's state as process `index` answers it. */
export async function fingerprintOn(cluster: Cluster, stats: ClientStats, session: string, index: number): Promise<StateFingerprint> {
  const get = async (path: string) => {
    // From that process only: after a database outage its health probe may hold it at 503 for a moment.
    const res = await requestWithRetry(cluster, stats, path, { prefer: index, only: true });
    assert.equal(res.process, index, `process ${index} answered ${path}`);
    return res.body;
  };
  const params = await get(`/v1/sessions/${session}/params`);
  const averaged = await get(`/v1/sessions/${session}/params?averaged=true`);
  const stateDict = await get(`/v1/sessions/${session}/state_dict`);
  return { step: params.step, params: bitsOfParams(params.params), averaged: bitsOfParams(averaged.params), stateDict };
}

export async function fingerprintInProcess(app: FastifyInstance, session: string): Promise<StateFingerprint> {
  const params = (await app.inject({ url: `/v1/sessions/${session}/params` })).json();
  const averaged = (await app.inject({ url: `/v1/sessions/${session}/params?averaged=true` })).json();
  const stateDict = (await app.inject({ url: `/v1/sessions/${session}/state_dict` })).json();
  return { step: params.step, params: bitsOfParams(params.params), averaged: bitsOfParams(averaged.params), stateDict };
}

/** One process, one client: the session created alike and the gradients stepped in the given order. */
export async function replayAlone(t: TestContext, body: ReturnType<typeof sessionBody>, ordered: { grads: unknown }[]): Promise<StateFingerprint> {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: body });
  assert.equal(created.statusCode, 201, created.body);
  for (const { grads } of ordered) {
    const res = await app.inject({ method: 'POST', url: `/v1/sessions/${body.name}/step`, payload: { grads } });
    assert.equal(res.statusCode, 200, res.body);
  }
  return fingerprintInProcess(app, body.name);
}

export function assertSameState(actual: StateFingerprint, expected: StateFingerprint, what: string): void {
  assert.equal(actual.step, expected.step, `${what}: step`);
  assert.deepEqual(actual.params, expected.params, `${what}: parameters (float32 bits)`);
  assert.deepEqual(actual.averaged, expected.averaged, `${what}: averaged parameters (float32 bits)`);
  assert.deepEqual(actual.stateDict, expected.stateDict, `${what}: state_dict`);
}

/** Every listed snapshot is whole: its chunks add up in the database, and it downloads (the checksum is verified on load). */
export async function assertSnapshotsComplete(cluster: Cluster, stats: ClientStats, session: string): Promise<number> {
  const list = await requestWithRetry(cluster, stats, `/v1/sessions/${session}/snapshots`);
  const snapshots = list.body.snapshots as { id: number; version: number }[];
  assert.ok(snapshots.length > 0, 'the session has snapshots');
  const rows = await cluster.sql<{ id: number; ok: boolean }>(
    `SELECT s.id::float8 AS id, (count(c.seq) = s.chunk_count AND coalesce(sum(length(c.data)), 0) = s.byte_size) AS ok
       FROM snapshots s JOIN sessions n ON n.id = s.session_id LEFT JOIN snapshot_chunks c ON c.snapshot_id = s.id
      WHERE n.name = $1 GROUP BY s.id`,
    [session],
  );
  assert.deepEqual(rows.filter((r) => !r.ok), [], 'every snapshot row has all its chunks');
  for (const [i, s] of snapshots.entries()) {
    const res = await requestWithRetry(cluster, stats, `/v1/sessions/${session}/snapshots/${s.id}/state_dict`, { prefer: i });
    assert.equal(res.status, 200, `snapshot ${s.id} (version ${s.version}): ${res.text}`);
  }
  return snapshots.length;
}
