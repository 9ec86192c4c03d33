// The listening lease (src/sessions/notifier.ts) with its timing shortened: a process that keeps waiting for a
// session keeps its lease past the lease's length (renewed), so its steps stay announced; once nobody waits,
// the lease lapses and steps are no longer announced. An event stream or a dashboard stays open for minutes,
// longer than one lease.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createVersionNotifier, type VersionSignal } from '../../src/sessions/notifier.ts';
import { buildTestApp, TEST_DB_KIND } from '../helper.ts';

const skip = TEST_DB_KIND !== 'postgres' && 'the lease is PostgreSQL-only (PGlite always announces)';
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test('a lease held by a subscriber is renewed past its length; without subscribers it lapses and steps go unannounced', { skip, timeout: 60_000 }, async (t) => {
  const { app } = await buildTestApp(t);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'leased', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
  assert.equal(created.statusCode, 201, created.body);
  const step = async (g: number) => {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/leased/step', payload: { grads: { w: [g, 1] } } });
    assert.equal(res.statusCode, 200, res.body);
    return res.json().version as number;
  };
  const held = async () => (await app.db.query<{ held: boolean | null }>("SELECT listened_until > now() AS held FROM sessions WHERE name = 'leased'"))[0].held === true;

  // A second notifier on the app's database, as another process would have, with a 1 s lease.
  const notifier = createVersionNotifier({
    db: app.db, log: app.log, maxWaiters: 10, maxStreams: 10, lease: { seconds: 1, renewBeforeSeconds: 0.6, checkMs: 100 },
  });
  await notifier.start();
  t.after(() => notifier.close());
  const heard: VersionSignal[] = [];
  const unsubscribe = notifier.subscribe('leased', (signal) => heard.push(signal));
  await notifier.listening('leased');
  assert.ok(await held());

  await sleep(2_500); // two and a half lease lengths
  assert.ok(await held(), 'renewed while a subscriber is there');
  const v = await step(0.5);
  const deadline = Date.now() + 5_000;
  while (!heard.some((s) => s?.version === v)) {
    assert.ok(Date.now() < deadline, `the step of version ${v} was not announced: ${JSON.stringify(heard)}`);
    await sleep(20);
  }

  unsubscribe();
  await sleep(1_800); // the renewal drops the name; the lease runs out
  assert.equal(await held(), false, 'lapsed once nobody waits');
  // Listening again without a lease (subscribe alone): the next step is not announced.
  const later: VersionSignal[] = [];
  const stop = notifier.subscribe('leased', (signal) => later.push(signal));
  t.after(stop);
  await step(0.25);
  await sleep(300);
  assert.deepEqual(later, [], 'a step nobody holds a lease for is not announced');
});
