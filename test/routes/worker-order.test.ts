// One worker's steps are committed in the order their requests arrived at the process (src/sessions/arrival-order.ts):
// RemoteASGD(pipeline=True) sends step k+1 on a second connection before it reads step k's answer, and the
// two must not overtake each other on the way to the session's queue. Here the first request's body is held
// back on purpose, so that without the ordering the second would be committed first.
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';
import { buildTestApp, randomData } from '../helper.ts';

const N = 64;

type Setup = Awaited<ReturnType<typeof setup>>;

/** Runs `body` on an app listening on loopback; its connections are closed before the app (it waits for open ones), also when `body` fails. */
async function withApp(t: TestContext, env: Record<string, string>, body: (s: Setup) => Promise<void>): Promise<void> {
  const s = await setup(t, env);
  try {
    await body(s);
  } finally {
    for (const socket of s.sockets) socket.destroy();
  }
}

/** An app listening on loopback with session `s`; `post` sends a step over its own connection, `part` bytes of its body now. */
async function setup(t: TestContext, env: Record<string, string>) {
  const { app } = await buildTestApp(t, { env });
  const base = await app.listen({ host: '127.0.0.1', port: 0 });
  const port = Number(new URL(base).port);
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 's', params: [{ name: 'w', shape: [N], data: randomData(N, 1) }] } });
  assert.equal(created.statusCode, 201, created.body);
  const sockets: Socket[] = [];
  function post(query: string, seed: number, part?: number) {
    const body = Buffer.from(JSON.stringify({ grads: { w: randomData(N, seed) }, metrics: { seed } }));
    const socket = connect(port, '127.0.0.1');
    sockets.push(socket);
    let text = '';
    socket.on('data', (d) => (text += d));
    const answer = new Promise<{ status: number; version: number | null }>((resolve) => socket.on('close', () => {
      const json = text.slice(text.indexOf('\r\n\r\n') + 4);
      resolve({ status: Number(text.split(' ')[1]), version: text ? (JSON.parse(json).version ?? null) : null });
    }));
    socket.write(`POST /v1/sessions/s/step${query} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`);
    socket.write(body.subarray(0, part ?? body.length));
    return { answer, rest: () => socket.write(body.subarray(part ?? body.length)), drop: () => socket.destroy() };
  }
  const version = async () => (await app.inject({ url: '/v1/sessions/s' })).json().version as number;
  /** The step's metrics by version: which seed each version holds. */
  const seeds = async () => ((await app.inject({ url: '/v1/sessions/s/metrics' })).json().points as { version: number; values: { seed: number } }[])
    .map((p) => [p.version, p.values.seed]);
  return { app, post, version, seeds, sockets };
}

/** Whichever comes first: the answer, or `ms` without one (null). */
const within = <T>(promise: Promise<T>, ms: number) => Promise.race([promise, new Promise<null>((r) => setTimeout(() => r(null), ms).unref())]);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('a worker\'s second step, complete first, is committed after its first one whose body was still arriving', async (t) => {
  await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '60000' }, async ({ post, version, seeds }) => {
    const first = post('?worker=w0', 1, 20);
    await sleep(100); // its headers are read
    const second = post('?worker=w0', 2);
    // The second has arrived whole and waits; nothing is committed while the first's body is incomplete.
    assert.equal(await within(second.answer, 500), null, 'the second step was answered before the first one of its worker');
    assert.equal(await version(), 1);
    first.rest();
    assert.deepEqual(await first.answer, { status: 200, version: 2 });
    assert.deepEqual(await second.answer, { status: 200, version: 3 });
    assert.deepEqual(await seeds(), [[2, 1], [3, 2]]);
  });
});

test('the order holds per worker: another worker\'s step, and a step naming no worker, are not held', async (t) => {
  await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '60000' }, async ({ post, seeds }) => {
    const first = post('?worker=w0', 1, 20);
    await sleep(100);
    assert.deepEqual(await within(post('?worker=w1', 2).answer, 20_000), { status: 200, version: 2 });
    assert.deepEqual(await within(post('', 3).answer, 20_000), { status: 200, version: 3 });
    first.rest();
    assert.deepEqual(await first.answer, { status: 200, version: 4 });
    assert.deepEqual(await seeds(), [[2, 2], [3, 3], [4, 1]]);
  });
});

test('a worker\'s step waits at most ASGD_WORKER_ORDER_WAIT_MS for an earlier one, and not at all once that one\'s client is gone', async (t) => {
  await t.test('bounded wait', async (t) => {
    await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '300' }, async ({ post }) => {
      const first = post('?worker=w0', 1, 20);
      await sleep(100);
      assert.deepEqual(await within(post('?worker=w0', 2).answer, 20_000), { status: 200, version: 2 });
      first.rest();
      assert.deepEqual(await first.answer, { status: 200, version: 3 });
    });
  });
  await t.test('the earlier client gone', async (t) => {
    await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '60000' }, async ({ post, version }) => {
      const first = post('?worker=w0', 1, 20);
      await sleep(100);
      const second = post('?worker=w0', 2);
      assert.equal(await within(second.answer, 300), null);
      first.drop();
      assert.deepEqual(await within(second.answer, 20_000), { status: 200, version: 2 });
      assert.equal(await version(), 2, 'the dropped step was not applied');
    });
  });
  await t.test('a step between them gone while it waited: the third still waits for the first', async (t) => {
    // Found by a review: the third step went at once, overtaking the first.
    await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '60000' }, async ({ post, seeds }) => {
      const first = post('?worker=w0', 1, 20);
      await sleep(100);
      const second = post('?worker=w0', 2);
      await sleep(100);
      second.drop();
      await second.answer;
      const third = post('?worker=w0', 3);
      assert.equal(await within(third.answer, 500), null, 'the third step was answered before the first one of its worker');
      first.rest();
      assert.deepEqual(await first.answer, { status: 200, version: 2 });
      const answered = await third.answer;
      assert.equal(answered.status, 200);
      const order = (await seeds()).map(([, seed]) => seed);
      assert.equal(order[0], 1, `applied in the order ${order}`);
      assert.ok(order.indexOf(3) > order.indexOf(1));
      if (order.includes(2)) assert.ok(order.indexOf(2) < order.indexOf(3), `applied in the order ${order}`);
    });
  });
  await t.test('0 turns the ordering off', async (t) => {
    await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '0' }, async ({ post }) => {
      const first = post('?worker=w0', 1, 20);
      await sleep(100);
      assert.deepEqual(await within(post('?worker=w0', 2).answer, 20_000), { status: 200, version: 2 });
      first.rest();
      assert.deepEqual(await first.answer, { status: 200, version: 3 });
    });
  });
});

test('a worker\'s line is left by every way a request ends: refused before its handler, refused by it, answered', async (t) => {
  await withApp(t, { ASGD_WORKER_ORDER_WAIT_MS: '60000' }, async ({ app, post }) => {
    // Refused by the schema (an unknown query key) and by the handler (a gradient of the wrong length).
    assert.equal((await post('?worker=w0&nope=1', 1).answer).status, 400);
    const bad = await app.inject({ method: 'POST', url: '/v1/sessions/s/step?worker=w0', payload: { grads: { w: [1, 2] } } });
    assert.equal(bad.statusCode, 400, bad.body);
    assert.deepEqual(await within(post('?worker=w0', 2).answer, 20_000), { status: 200, version: 2 });
    assert.equal(app.arrivalOrder.lines, 0, 'nothing stays in a line');
  });
});
