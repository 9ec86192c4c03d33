// Names that cannot be a path segment ('', '.', '..': fetch drops dot segments, so '.' would have read the
// session list, and `norms('.')` a session called "norms") and worker ids the service refuses are refused by
// the client before any request is sent, as the Python client does.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import test from 'node:test';
import { ASGDClient } from '../src/index.ts';
import { RemoteASGD } from '../src/tfjs.ts';

test("'', '.' and '..' as a session name are a RangeError naming it, and no request is sent", async (t) => {
  const seen: string[] = [];
  const server = createServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ statusCode: 404, code: 'SESSION_NOT_FOUND', error: 'Not Found', message: 'nope' }));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  const client = new ASGDClient(`http://127.0.0.1:${(server.address() as AddressInfo).port}`);
  for (const name of ['', '.', '..']) {
    const calls: [string, () => Promise<unknown>][] = [
      ['getSession', () => client.getSession(name)],
      ['norms', () => client.norms(name)],
      ['metrics', () => client.metrics(name)],
      ['step', () => client.step(name, { w: { shape: [1], data: [1] } })],
      ['deleteSession', () => client.deleteSession(name)],
    ];
    for (const [method, call] of calls) {
      await assert.rejects(call(), (err: unknown) => {
        assert.ok(err instanceof RangeError, `${method}(${JSON.stringify(name)}): ${String(err)}`);
        assert.ok(err.message.includes(`session name ${JSON.stringify(name)}`), err.message);
        return true;
      });
    }
  }
  assert.deepEqual(seen, [], 'nothing reached the service');
  // A name the service takes goes out (and its answer comes back as usual).
  await assert.rejects(client.getSession('a.b'), /nope/);
  assert.deepEqual(seen, ['GET /v1/sessions/a.b']);
});

test('RemoteASGD refuses a worker id the service would refuse, at construction', () => {
  for (const worker of ['bad worker', '', 'x'.repeat(129), 'é']) {
    assert.throws(() => new RemoteASGD({ client: 'http://127.0.0.1:1', session: 's', worker }), (err: unknown) => {
      assert.ok(err instanceof RangeError, String(err));
      assert.match(err.message, /worker must be 1-128 characters of A-Za-z0-9\._-/);
      assert.ok(err.message.includes(JSON.stringify(worker)));
      return true;
    });
  }
  assert.equal(new RemoteASGD({ client: 'http://127.0.0.1:1', session: 's', worker: 'rank-0.a_b' }).worker, 'rank-0.a_b');
  assert.match(new RemoteASGD({ client: 'http://127.0.0.1:1', session: 's' }).worker, /^js-[0-9a-f]{12}$/);
});
