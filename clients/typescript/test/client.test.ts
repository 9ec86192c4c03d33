// Every operation of the client against a live service on PostgreSQL, and errors by class.
import assert from 'node:assert/strict';
import test from 'node:test';
import {
  ASGDClient, BadRequest, decodeSafetensors, Forbidden, IdempotencyKeyReused, NonFiniteGradient, NotFound, SessionExists,
  SessionNotFound, ShapeMismatch, SnapshotNotFound, StaleGradient, Unauthorized, UnknownParameter, VersionMismatch, VersionNotAvailable,
  encodeSafetensors, InvalidHyperparameter,
} from '../src/index.ts';
import { hexOf, liveService, runTorchReference, skipWithoutTorch, uniqueName } from './service.ts';

const w0 = [0.1, 0.2, 0.3, 0.4];
const b0 = [0, 0.5];
const spec = (name: string) => ({
  name,
  params: [{ name: 'w', shape: [2, 2], data: Float32Array.from(w0) }, { name: 'b', shape: [2], data: b0 }],
  hyperparameters: { lr: 0.1, t0: 1 },
});
const g1 = { w: Float32Array.from([0.5, -0.5, 0.25, 1]), b: Float32Array.from([0.1, 0.2]) };
const g2 = { w: { shape: [2, 2], data: Float32Array.from([-0.125, 0.75, 0.5, -1]) }, b: [0.3, -0.1] };

test('the client against a live service', { skip: skipWithoutTorch() }, async (t) => {
  const token = 'admin-token-for-the-client-test-0123456789';
  const { client, url } = await liveService({ token, retryBudgetMs: 10_000 }, { ASGD_ADMIN_TOKEN: token });

  await t.test('sessions: create (JSON and safetensors), list, get, patch, delete', async () => {
    const a = await client.createSession(spec(uniqueName('ops-a')));
    assert.equal(a.version, 1);
    assert.deepEqual(a.params.map((p) => [p.name, p.shape]), [['w', [2, 2]], ['b', [2]]]);
    assert.equal(a.param_groups[0].lr, 0.1);
    const bName = uniqueName('ops-b');
    const b = await client.createSessionFromTensors(bName, { w: { shape: [2, 2], data: Float32Array.from(w0) } }, { hyperparameters: { lr: 0.5 } });
    assert.equal(b.name, bName);
    assert.equal(b.param_groups[0].lr, 0.5);
    const listed = [];
    for await (const s of client.sessions(1)) listed.push(s.name);
    assert.ok(listed.includes(a.name) && listed.includes(bName), `listed ${listed}`);
    const page = await client.listSessions({ limit: 1 });
    assert.equal(page.sessions.length, 1);
    assert.equal((await client.getSession(a.name)).step, 0);
    const patched = await client.patchSession(a.name, { snapshot_every: 7, max_staleness: 3 });
    assert.equal(patched.snapshot_every, 7);
    assert.equal(patched.max_staleness, 3);
    // Hyperparameters without a step: a new version; a stale If-Match is VersionMismatch.
    const retuned = await client.setHyperparameters(a.name, [{ lr: 0.025 }]);
    assert.deepEqual([retuned.param_groups[0].lr, retuned.version, retuned.step], [0.025, patched.version + 1, 0]);
    await assert.rejects(client.setHyperparameters(a.name, [{ lr: 0.5 }], { ifMatch: patched.version }), VersionMismatch);
    assert.equal((await client.getSession(a.name)).param_groups[0].lr, 0.025);
    await assert.rejects(client.deleteSession(bName, { ifMatch: 99 }), VersionMismatch);
    await client.deleteSession(bName, { ifMatch: 1 });
    await assert.rejects(client.getSession(bName), SessionNotFound);
    await assert.rejects(client.createSession(spec(a.name)), SessionExists);
  });

  await t.test('steps in JSON and safetensors equal torch.optim.ASGD bit for bit', async () => {
    const jsonSession = (await client.createSession(spec(uniqueName('step-json')))).name;
    const stSession = (await client.createSession(spec(uniqueName('step-st')))).name;
    const r1 = await client.step(jsonSession, g1, { format: 'json' });
    assert.deepEqual([r1.step, r1.version, r1.staleness], [1, 2, 0]);
    const r2 = await client.step(jsonSession, g2, { format: 'json', baseVersion: 2, ifMatch: 2 });
    assert.deepEqual([r2.step, r2.version], [2, 3]);
    await client.step(stSession, g1);
    await client.step(stSession, g2, { baseVersion: 2 });
    const torch = runTorchReference({
      params: [{ name: 'w', shape: [2, 2], data: w0 }, { name: 'b', shape: [2], data: b0 }],
      defaults: { lr: 0.1, t0: 1 },
      steps: [{ w: [...g1.w], b: [...g1.b] }, { w: [...g2.w.data], b: g2.b }],
    });
    for (const name of [jsonSession, stSession]) {
      for (const format of ['json', 'safetensors'] as const) {
        const p = await client.params(name, { format });
        assert.equal(p.version, 3);
        assert.deepEqual(hexOf(p.params.w.data), torch.params.w, `${name} ${format}`);
        assert.deepEqual(hexOf(p.params.b.data), torch.params.b);
        assert.deepEqual(p.params.w.shape, [2, 2]);
        // The session's order (w, b), as JSON lists them; a safetensors file holds them by name (b, w).
        assert.deepEqual(Object.keys(p.params), ['w', 'b'], `${name} ${format}: the session's order`);
        const ax = await client.params(name, { format, averaged: true });
        assert.deepEqual(Object.keys(ax.params), ['w', 'b']);
        assert.deepEqual(hexOf(ax.params.w.data), torch.averaged.w);
      }
      const older = await client.params(name, { version: 2, format: 'json' });
      assert.equal(older.version, 2);
    }
    await assert.rejects(client.params(jsonSession, { version: 99 }), VersionNotAvailable);
  });

  await t.test('a step answers with the parameters (return=params|averaged), carries hyperparameters and metrics', async () => {
    const name = (await client.createSession(spec(uniqueName('roundtrip')))).name;
    const r1 = await client.step(name, g1, { return: 'params', metrics: { loss: 0.5, samples: 32 } });
    const r2 = await client.step(name, g2, { return: 'averaged', format: 'json', paramGroups: [{ lr: 0.05 }], metrics: { loss: 0.25 } });
    const r3 = await client.step(name, g1, { return: 'params', format: 'json', dtype: 'F32' });
    const torch = runTorchReference({
      params: [{ name: 'w', shape: [2, 2], data: w0 }, { name: 'b', shape: [2], data: b0 }],
      defaults: { lr: 0.1, t0: 1 },
      steps: [{ w: [...g1.w], b: [...g1.b] }],
    });
    assert.deepEqual(hexOf(r1.params!.w.data), torch.params.w);
    assert.deepEqual(r1.params!.w.shape, [2, 2]);
    // The session's order (w, b) from a safetensors answer too, as from params() (a JavaScript user's
    // review: a step's file lists them by name, b first, and they came out so).
    assert.deepEqual(Object.keys(r1.params!), ['w', 'b']);
    assert.deepEqual(Object.keys(r3.params!), ['w', 'b']);
    assert.equal(r1.version, 2);
    const ax = await client.params(name, { averaged: true, version: 3 });
    assert.deepEqual(hexOf(r2.params!.w.data), hexOf(ax.params.w.data));
    const now = await client.params(name);
    assert.deepEqual(hexOf(r3.params!.b.data), hexOf(now.params.b.data));
    assert.equal((await client.getSession(name)).param_groups[0].lr, 0.05, 'the step\'s lr stays the group\'s');
    const page = await client.metrics(name);
    assert.deepEqual(page.points.map((p) => [p.version, p.values]), [[2, { loss: 0.5, samples: 32 }], [3, { loss: 0.25 }], [4, {}]]);
    assert.deepEqual((await client.metrics(name, { afterVersion: 3 })).points.map((p) => p.version), [4]);
    await assert.rejects(client.step(name, g1, { metrics: { 'bad\u0007key': 1 } }), BadRequest);
    await assert.rejects(client.step(name, g1, { paramGroups: [{ lr: -1 }] }), BadRequest);
  });

  await t.test('a step with return=params carries every group\'s hyperparameters (param_groups) in safetensors as in JSON', async () => {
    const name = (await client.createSession({
      ...spec(uniqueName('groups')),
      param_groups: [{ params: ['w'], lr: 0.1, t0: 1 }, { params: ['b'], lr: 0.2, weight_decay: 0.01, maximize: true }],
    })).name;
    // Another worker's step sets group 1's lr; the next steps (sent without param_groups) learn it.
    await client.step(name, g1, { paramGroups: [{}, { lr: 0.05 }], format: 'json' });
    const viaSafetensors = await client.step(name, g1, { return: 'params' });
    const viaJson = await client.step(name, g2, { return: 'params', format: 'json' });
    const averaged = await client.step(name, g1, { return: 'averaged' });
    const expected = [
      { lr: 0.1, lambd: 0.0001, alpha: 0.75, t0: 1, weight_decay: 0, maximize: false },
      { lr: 0.05, lambd: 0.0001, alpha: 0.75, t0: 1, weight_decay: 0.01, maximize: true }, // t0 from the session's hyperparameters
    ];
    assert.deepEqual(viaSafetensors.param_groups, expected);
    assert.deepEqual(viaJson.param_groups, expected);
    assert.deepEqual(averaged.param_groups, expected);
    assert.equal((await client.step(name, g1)).param_groups, undefined, 'without return=params the answer has none');
  });

  await t.test('conditional reads (If-None-Match) and waiting reads (after_version, wait)', async () => {
    const name = (await client.createSession(spec(uniqueName('cond')))).name;
    await client.step(name, g1);
    assert.equal(await client.getSessionIfChanged(name, 2), null);
    assert.equal((await client.getSessionIfChanged(name, 1))!.version, 2);
    assert.equal(await client.paramsIfChanged(name, 2), null);
    assert.equal((await client.paramsIfChanged(name, 1, { format: 'json' }))!.version, 2);
    const started = Date.now();
    assert.equal(await client.waitForParams(name, 2, 1), null);
    assert.ok(Date.now() - started >= 900, 'waited about a second before the 304');
    assert.equal((await client.waitForParams(name, 1, 5))!.version, 2, 'a newer version answers at once');
    const waiting = client.waitForParams(name, 2, 30);
    await new Promise((r) => setTimeout(r, 300));
    const stepped = await client.step(name, g2);
    const woke = await waiting;
    assert.equal(woke!.version, stepped.version);
    assert.equal(woke!.params.w.data.length, 4);

    // A wait longer than the client's timeoutMs is the service's hold, not a silent server (found by a
    // review: each attempt was aborted after timeoutMs and retried, and the documented null never came).
    const short = new ASGDClient(url, { token, timeoutMs: 500, retryBudgetMs: 1_000, logger: null });
    const began = Date.now();
    assert.equal(await short.waitForParams(name, 3, 1.5), null);
    assert.ok(Date.now() - began >= 1_400, `waited the 1.5 s asked for (${Date.now() - began} ms)`);
  });

  await t.test('a retried step whose version is no longer kept: replayed, with the current parameters and paramsVersion', async () => {
    const name = (await client.createSession({ ...spec(uniqueName('replay-gone')), snapshot_every: 2, keep_snapshots: 1 })).name;
    for (const format of ['json', 'safetensors'] as const) {
      const key = `replay-gone-${format}`;
      const first = await client.step(name, g1, { idempotencyKey: key, return: 'params', format });
      assert.equal(first.paramsVersion, undefined);
      for (let k = 0; k < 6; k++) await client.step(name, g2);
      const current = await client.params(name);
      const again = await client.step(name, g1, { idempotencyKey: key, return: 'params', format });
      assert.equal(again.replayed, true, format);
      assert.equal(again.version, first.version, format);
      assert.equal(again.paramsVersion, current.version, format);
      assert.deepEqual(Array.from(again.params!.w.data), Array.from(current.params.w.data), format);
    }
  });

  await t.test('step errors come back as their classes and change nothing', async () => {
    const name = (await client.createSession(spec(uniqueName('errors')))).name;
    await assert.rejects(client.step(name, { w: { shape: [4], data: new Float32Array(4) } }), ShapeMismatch);
    await assert.rejects(client.step(name, { nope: [1] }, { format: 'json' }), UnknownParameter);
    await assert.rejects(client.step(name, { b: [NaN, 0] }, { format: 'json' }), NonFiniteGradient);
    await assert.rejects(client.step(name, g1, { ifMatch: 5 }), (e: unknown) => e instanceof VersionMismatch && e.version === 1);
    const key = 'same-key-1';
    await client.step(name, g1, { idempotencyKey: key });
    await assert.rejects(client.step(name, { b: [1, 1] }, { idempotencyKey: key }), IdempotencyKeyReused);
    const again = await client.step(name, g1, { idempotencyKey: key });
    assert.equal(again.replayed, true);
    await client.patchSession(name, { max_staleness: 0 });
    await client.step(name, g1);
    await assert.rejects(client.step(name, g1, { baseVersion: 1 }), (e: unknown) => e instanceof StaleGradient && e.version === 3);
    await assert.rejects(client.createSession({ name: uniqueName('bad'), params: [{ name: 'w', shape: [1], data: [1] }], hyperparameters: { lr: -1 } }), InvalidHyperparameter);
    await assert.rejects(client.getSession('no-such-session'), (e: unknown) => e instanceof SessionNotFound && e instanceof NotFound && e.status === 404 && e.code === 'SESSION_NOT_FOUND');
    const s = await client.getSession(name);
    assert.equal(s.step, 2);
    assert.equal(s.version, 3);
  });

  await t.test('state_dict and checkpoint: download and upload (JSON, torch.save, safetensors)', async () => {
    const name = (await client.createSession(spec(uniqueName('state')))).name;
    await client.step(name, g1);
    const sd = await client.stateDict(name);
    assert.equal(sd.param_groups.length, 1);
    const pt = await client.stateDictBytes(name, 'pt');
    assert.equal(String.fromCharCode(pt[0], pt[1]), 'PK'); // torch.save's zip
    const st = await client.stateDictBytes(name, 'safetensors');
    assert.ok(decodeSafetensors(st).metadata.param_groups);
    const ckpt = await client.checkpointBytes(name);
    const atCheckpoint = await client.params(name);
    await client.step(name, g2);
    const stepOf = async () => JSON.stringify((await client.stateDict(name)).state);
    const stateAt1 = JSON.stringify(sd.state);
    assert.notEqual(await stepOf(), stateAt1);
    let version = 3;
    for (const [body, format] of [[sd, undefined], [pt, 'pt'], [st, 'safetensors']] as const) {
      await client.step(name, g2);
      const loaded = await client.loadStateDict(name, body, { format, ifMatch: ++version });
      assert.equal(loaded.version, ++version);
      assert.equal(await stepOf(), stateAt1, `the state after loading the ${format ?? 'json'} state_dict`);
    }
    await client.loadCheckpoint(name, ckpt);
    assert.deepEqual(hexOf((await client.params(name)).params.w.data), hexOf(atCheckpoint.params.w.data));
    assert.equal(await stepOf(), stateAt1);
    await assert.rejects(client.loadStateDict(name, { state: {}, param_groups: [] }), BadRequest);
  });

  await t.test('snapshots: create, list, get, pin, download, restore; fork', async () => {
    const name = (await client.createSession(spec(uniqueName('snap')))).name;
    await client.step(name, g1);
    const snap = await client.createSnapshot(name, { pinned: true });
    assert.equal(snap.version, 2);
    assert.equal(snap.pinned, true);
    const list = await client.listSnapshots(name);
    assert.ok(list.snapshots.some((s) => s.id === snap.id));
    assert.equal((await client.getSnapshot(name, snap.id)).checksum, snap.checksum);
    assert.equal((await client.pinSnapshot(name, snap.id, false)).pinned, false);
    const at2 = await client.params(name);
    const sp = await client.snapshotParams(name, snap.id);
    assert.deepEqual(hexOf(sp.params.w.data), hexOf(at2.params.w.data));
    assert.equal(String.fromCharCode(...(await client.snapshotBytes(name, snap.id, 'state_dict')).subarray(0, 2)), 'PK');
    assert.equal(String.fromCharCode(...(await client.snapshotBytes(name, snap.id, 'checkpoint')).subarray(0, 2)), 'PK');
    await client.step(name, g2);
    const restored = await client.restoreSnapshot(name, snap.id);
    assert.equal(restored.step, 1);
    assert.equal(restored.version, 4);
    assert.deepEqual(hexOf((await client.params(name)).params.w.data), hexOf(at2.params.w.data));
    await assert.rejects(client.getSnapshot(name, 999_999), SnapshotNotFound);
    const forked = await client.fork(name, { name: uniqueName('forked'), snapshot: snap.id });
    assert.equal(forked.step, 1);
    assert.deepEqual(hexOf((await client.params(forked.name)).params.w.data), hexOf(at2.params.w.data));
  });

  await t.test('tokens: create, list, use within scope, revoke', async () => {
    const name = (await client.createSession(spec(uniqueName('tok')))).name;
    const made = await client.createToken({ name: 'a worker', scope: 'step', sessions: [name] });
    assert.match(made.token, /^asgd_/);
    assert.ok((await client.listTokens()).tokens.some((x) => x.id === made.id));
    const worker = new ASGDClient(url, { token: made.token, retryBudgetMs: 0 });
    assert.equal((await worker.step(name, g1)).step, 1);
    await assert.rejects(worker.createSnapshot(name), Forbidden);
    await assert.rejects(worker.getSession('other'), Forbidden);
    await client.deleteToken(made.id);
    await assert.rejects(worker.getSession(name), Unauthorized);
    await assert.rejects(new ASGDClient(url).listSessions(), Unauthorized);
  });

  await t.test('the rest of v1: tokens/self, norms, hyperparameter changes, metrics max_points, list options', async () => {
    assert.deepEqual(await client.getOwnToken(), { id: 'admin', name: 'admin', scope: 'admin', sessions: null, auth: true });
    const name = (await client.createSession(spec(uniqueName('rest-of-v1')))).name;
    const made = await client.createToken({ name: 'reader', scope: 'read', sessions: [name] });
    const self = await new ASGDClient(url, { token: made.token }).getOwnToken();
    assert.deepEqual([self.id, self.name, self.scope, self.sessions, self.auth], [made.id, 'reader', 'read', [name], true]);

    const before = await client.norms(name);
    assert.deepEqual([before.session, before.version, before.step], [name, 1, 0]);
    assert.deepEqual(before.params.map((p) => [p.name, p.numel, p.step]), [['w', 4, null], ['b', 2, null]]);
    assert.equal(before.params[1].norm, 0.5);
    // Gradients as {shape, data} with plain numbers, and flat number arrays.
    await client.step(name, { w: { shape: [2, 2], data: [0.5, -0.5, 0.25, 1] }, b: [0.1, 0.2] }, { metrics: { loss: 1 } });
    assert.deepEqual((await client.norms(name)).params.map((p) => p.step), [1, 1]);
    for (let i = 2; i <= 6; i++) await client.step(name, g2, { metrics: { loss: i }, ...(i === 4 && { paramGroups: [{ lr: 0.05 }] }) });

    const changes = await client.hyperparameterChanges(name);
    assert.equal(changes.session, name);
    assert.equal(changes.initial_param_groups![0].lr, 0.1);
    assert.deepEqual(changes.changes.map((c) => [c.version, c.step, c.param_groups[0].lr]), [[5, 4, 0.05]]);
    assert.deepEqual((await client.hyperparameterChanges(name, { afterVersion: 5 })).changes, []);
    // maxPoints (max_points): the whole history in one answer, with how many changes there are.
    const whole = await client.hyperparameterChanges(name, { maxPoints: 2 });
    assert.deepEqual([whole.total_changes, whole.downsampled], [1, false]);
    assert.deepEqual(whole.changes.map((c) => c.version), [5]);

    const all = await client.metrics(name);
    assert.equal(all.points.length, 6);
    const down = await client.metrics(name, { maxPoints: 2 });
    assert.equal(down.downsampled, true);
    assert.equal(down.points.length, 2);
    assert.deepEqual(down.points.map((p) => p.count), [3, 3]);
    assert.deepEqual(down.points.map((p) => [p.min!.loss, p.max!.loss]), [[1, 3], [4, 6]]);

    const other = (await client.createSession(spec(uniqueName('rest-of-v1-other')))).name;
    const found = await client.listSessions({ search: name.toUpperCase(), figures: true, storage: true });
    assert.deepEqual(found.sessions.map((x) => x.name), [name]);
    assert.equal(found.sessions[0].activity!.steps_last_minute, 6);
    assert.ok(found.sessions[0].storage, 'storage was asked for');
    const plain = await client.listSessions({ search: name });
    assert.equal(plain.sessions[0].activity, undefined);
    assert.equal(plain.sessions[0].storage, undefined);
    const listed = [];
    for await (const x of client.sessions({ search: 'rest-of-v1', limit: 1 })) listed.push(x.name);
    assert.deepEqual(listed.sort(), [name, other].sort());

    // A checkpoint is pt or json: the types reject safetensors (test/types), and so does the client at run time.
    await assert.rejects(client.snapshotBytes(name, 1, 'checkpoint', 'safetensors' as 'pt'), RangeError);
  });

  await t.test('flat-array gradients after the session was replaced (by another client) with other shapes take the new shapes', async () => {
    const name = uniqueName('replaced');
    await client.createSession(spec(name));
    await client.step(name, { w: [0.5, -0.5, 0.25, 1], b: [0.1, 0.2] }); // w's shape [2, 2] cached
    const other = new ASGDClient(url, { token, retryBudgetMs: 10_000 });
    await other.deleteSession(name);
    await other.createSession({ name, params: [{ name: 'w', shape: [3], data: [1, 2, 3] }, { name: 'b', shape: [2], data: [0, 0] }], hyperparameters: { lr: 0.5 } });
    const answer = await client.step(name, { w: [1, 1, 1], b: [0, 0] });
    assert.equal(answer.version, 4, 'the new session goes on from the deleted one\'s version 2');
    assert.deepEqual((await client.params(name)).params.w.shape, [3]);
  });

  await t.test('a file the service cannot read is a BadRequest naming the problem', async () => {
    const bytes = encodeSafetensors({ w: { shape: [2, 2], data: new Float32Array(4) } });
    const err = await client.createSessionFromFile('x', bytes.subarray(0, 20), 'safetensors').then(() => null, (e: unknown) => e);
    assert.ok(err instanceof BadRequest, String(err));
    assert.equal(err.status, 400);
  });
});

test('step() with no gradients object says so before any request', async () => {
  const client = new ASGDClient('http://127.0.0.1:9', { logger: null });
  for (const grads of [null, undefined, 5, [1, 2]]) {
    await assert.rejects(client.step('s', grads as never), /^TypeError: grads: must be an object mapping parameter names to gradients/, String(grads));
  }
});
