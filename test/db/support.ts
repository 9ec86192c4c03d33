// What the tests of two processes on one session share: a session of one 8-element parameter `w`, its
// steps by seed, and its parameters as float32 bits.
import assert from 'node:assert/strict';
import type { FastifyInstance } from 'fastify';
import { bits, randomData } from '../helper.ts';

export const N = 8;

/** One step of `name` with the gradient of `seed`; its version. */
export async function step(app: FastifyInstance, name: string, seed: number): Promise<number> {
  const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, payload: { grads: { w: randomData(N, seed) } } });
  assert.equal(res.statusCode, 200, res.body);
  return res.json().version;
}

/** The parameters of `name` (at `version`, else the current ones) as their version and w's bits. */
export async function params(app: FastifyInstance, name: string, version?: number): Promise<{ version: number; w: number[] }> {
  const res = await app.inject({ url: `/v1/sessions/${name}/params${version ? `?version=${version}` : ''}` });
  assert.equal(res.statusCode, 200, res.body);
  const body = res.json();
  return { version: body.version, w: bits(body.params.w.data) };
}
