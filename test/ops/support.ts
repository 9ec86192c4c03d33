// Shared by the operations tests: an admin token, auth headers, small sessions, the OpenAPI operations.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { randomData } from '../helper.ts';

/** The malloc settings `npm start` sets unless the environment has its own (its script in package.json). */
export const startScriptTunables = (): string | undefined =>
  /GLIBC_TUNABLES:-([^}]+)\}/.exec(JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).scripts.start)?.[1];

/** The V8 flags `npm start` puts before any NODE_OPTIONS of the environment's (its script in package.json). */
export const startScriptNodeOptions = (): string | undefined =>
  /NODE_OPTIONS="([^"$]+?) \$\{NODE_OPTIONS:-\}"/.exec(JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).scripts.start)?.[1];

export const ADMIN = 'admin-token-for-tests-0123456789';
export const bearer = (token: string) => ({ authorization: `Bearer ${token}` });
export const asAdmin = bearer(ADMIN);

export function sessionBody(name: string, seed = 1) {
  return {
    name,
    params: [
      { name: 'w', shape: [3, 4], data: randomData(12, seed) },
      { name: 'b', shape: [4], data: randomData(4, seed + 1) },
    ],
    hyperparameters: { lr: 0.05, t0: 2 },
  };
}

export const gradBody = (seed: number) => ({ grads: { w: randomData(12, 100 + seed), b: randomData(4, 200 + seed) } });

export async function createSession(app: FastifyInstance, name: string, headers: Record<string, string> = asAdmin, seed = 1): Promise<void> {
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', headers, payload: sessionBody(name, seed) });
  assert.equal(res.statusCode, 201, res.body);
}

export async function step(app: FastifyInstance, name: string, seed: number, headers: Record<string, string> = asAdmin) {
  return app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, headers, payload: gradBody(seed) });
}

export async function createToken(app: FastifyInstance, scope: string, sessions: string[] | null = null, name = `${scope}-token`): Promise<string> {
  const res = await app.inject({ method: 'POST', url: '/v1/tokens', headers: asAdmin, payload: { name, scope, sessions } });
  assert.equal(res.statusCode, 201, res.body);
  return res.json().token as string;
}

export interface Operation {
  method: string;
  /** OpenAPI path, e.g. /v1/sessions/{name}/step */
  path: string;
  op: {
    security?: unknown[];
    'x-scope'?: string;
    'x-all-sessions'?: boolean;
    requestBody?: { content: Record<string, unknown> };
    parameters?: { in: string; name: string }[];
    responses: Record<string, { content?: Record<string, unknown> }>;
  };
}

export const METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'];

export function operations(doc: { paths: Record<string, Record<string, unknown>> }): Operation[] {
  const out: Operation[] = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (METHODS.includes(method)) out.push({ method: method.toUpperCase(), path, op: op as Operation['op'] });
    }
  }
  return out;
}

export const fillPath = (path: string, values: Record<string, string>) =>
  path.replace(/\{(\w+)\}/g, (_, key: string) => encodeURIComponent(values[key] ?? `missing-${key}`));
