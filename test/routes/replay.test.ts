// A retried step (same Idempotency-Key) that asks for the parameters, after the versions up to its own were
// pruned: the step stands, and the answer is its first answer, with the parameters now and their version.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { readSafetensors } from '../../src/formats/index.ts';
import { buildTestApp } from '../helper.ts';
import { ADMIN, asAdmin, gradBody, sessionBody } from '../ops/support.ts';

test('a retried step whose version is no longer kept answers 200 replayed, with the current parameters and params_version', async (t) => {
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: ADMIN } });
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', headers: asAdmin, payload: { ...sessionBody('kept', 3), snapshot_every: 2, keep_snapshots: 1 } });
  assert.equal(created.statusCode, 201, created.body);
  const keyed = (key: string, accept = 'application/json') => app.inject({
    method: 'POST', url: '/v1/sessions/kept/step?return=params', headers: { ...asAdmin, 'idempotency-key': key, accept }, payload: gradBody(7),
  });
  const first = await keyed('k-json');
  assert.equal(first.statusCode, 200, first.body);
  const firstSt = await keyed('k-st', 'application/x-safetensors');
  assert.equal(firstSt.statusCode, 200, firstSt.body);
  const { version } = first.json();
  assert.equal(first.json().params_version, undefined, 'a fresh answer has no params_version');
  for (let k = 0; k < 8; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/kept/step', headers: asAdmin, payload: gradBody(k) })).statusCode, 200);
  // Pruned: the versions of both keyed steps can no longer be read.
  const old = await app.inject({ url: `/v1/sessions/kept/params?version=${version}`, headers: asAdmin });
  assert.equal(old.statusCode, 404, old.body);
  const before = await app.inject({ url: '/v1/sessions/kept/state_dict', headers: asAdmin });
  const current = (await app.inject({ url: '/v1/sessions/kept/params', headers: asAdmin })).json();

  const again = await keyed('k-json');
  assert.equal(again.statusCode, 200, again.body);
  const answer = again.json();
  assert.equal(answer.replayed, true);
  assert.equal(answer.version, version, 'the step\'s own version');
  assert.equal(answer.step, first.json().step);
  assert.equal(answer.params_version, current.version);
  assert.deepEqual(answer.params, current.params, 'the parameters now');

  const againSt = await keyed('k-st', 'application/x-safetensors');
  assert.equal(againSt.statusCode, 200, againSt.body);
  const meta = readSafetensors(againSt.rawPayload).metadata;
  assert.equal(meta.get('replayed'), 'true');
  assert.equal(meta.get('version'), String(version + 1));
  assert.equal(meta.get('params_version'), String(current.version));

  // Nothing was stepped again.
  const after = await app.inject({ url: '/v1/sessions/kept/state_dict', headers: asAdmin });
  assert.equal(after.body, before.body);
  assert.equal(after.headers.etag, before.headers.etag);
});
