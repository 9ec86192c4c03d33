// If-Match on every route that changes a session, and no body where a route takes none: a request whose
// precondition or body the route does not honour is refused, never carried out as if it had none.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { buildTestApp, randomData } from '../helper.ts';

const params = [{ name: 'w', shape: [3], data: randomData(3, 1) }];

async function setup(t: Parameters<typeof buildTestApp>[0]) {
  const { app } = await buildTestApp(t);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'p', params } })).statusCode, 201);
  assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/p/step', payload: { grads: { w: [0.1, 0.2, 0.3] } } })).statusCode, 200); // version 2
  return app;
}

test('If-Match on PATCH session, fork, PATCH snapshot and POST snapshots: 412 at another version, nothing changed; applied at this one', async (t) => {
  const app = await setup(t);
  const before = (await app.inject({ url: '/v1/sessions/p' })).json();
  const stale = { 'if-match': '"1"' };
  const cases = [
    { method: 'PATCH', url: '/v1/sessions/p', payload: { max_staleness: 3 } },
    { method: 'POST', url: '/v1/sessions/p/fork', payload: { name: 'f' } },
    { method: 'POST', url: '/v1/sessions/p/fork', payload: { name: 'f', snapshot: 1 } },
    { method: 'PATCH', url: '/v1/sessions/p/snapshots/1', payload: { pinned: true } },
    { method: 'POST', url: '/v1/sessions/p/snapshots', payload: { pinned: true } },
  ] as const;
  for (const c of cases) {
    const res = await app.inject({ ...c, headers: stale });
    assert.equal(res.statusCode, 412, `${c.method} ${c.url}: ${res.body}`);
    assert.equal(res.json().code, 'VERSION_MISMATCH');
    assert.match(res.json().message, /^If-Match: expected "1", the session is at version 2$/);
  }
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p' })).json(), before);
  assert.equal((await app.inject({ url: '/v1/sessions/f' })).statusCode, 404);
  assert.equal((await app.inject({ url: '/v1/sessions/p/snapshots/1' })).json().pinned, false);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p/snapshots' })).json().snapshots.map((x: { version: number }) => x.version), [1], 'no snapshot taken');
  for (const c of cases.slice(0, 2).concat(cases.slice(3))) {
    const res = await app.inject({ ...c, headers: { 'if-match': '"2"' } });
    assert.ok(res.statusCode === 200 || res.statusCode === 201, `${c.method} ${c.url}: ${res.body}`);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).json().max_staleness, 3);
  assert.equal((await app.inject({ url: '/v1/sessions/f' })).statusCode, 200);
  assert.equal((await app.inject({ url: '/v1/sessions/p/snapshots/1' })).json().pinned, true);
  assert.deepEqual((await app.inject({ url: '/v1/sessions/p/snapshots' })).json().snapshots.map((x: { version: number; pinned: boolean }) => [x.version, x.pinned]), [[2, true], [1, true]]);
});

test('If-Match: an unbalanced quote is refused, tags are compared strongly; If-None-Match takes a list of tags', async (t) => {
  const app = await setup(t);
  for (const tag of ['"2', '2"', 'W/"2', '"2"x']) {
    const res = await app.inject({ method: 'POST', url: '/v1/sessions/p/step', headers: { 'if-match': tag }, payload: { grads: { w: [0.1, 0.2, 0.3] } } });
    assert.equal(res.statusCode, 400, `${tag}: ${res.body}`);
    assert.equal(res.json().code, 'INVALID_HEADER');
  }
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).json().version, 2, 'not stepped');
  for (const tag of ['"2"', '2', 'W/"7", "2"', 'W/"2", "2"', '"x", "2"']) {
    const res = await app.inject({ method: 'PATCH', url: '/v1/sessions/p', headers: { 'if-match': tag }, payload: { snapshot_every: 50 } });
    assert.equal(res.statusCode, 200, `${tag}: ${res.body}`);
  }
  // Strong comparison (RFC 9110 section 13.1.1): a weak tag, a version not as the service writes it, or
  // any other tag never matches: 412, the session unchanged. Tags naming two versions are refused.
  for (const tag of ['W/"2"', '"02"', '"2.0"', '"x"', '""', 'W/"2", "03"']) {
    const res = await app.inject({ method: 'PATCH', url: '/v1/sessions/p', headers: { 'if-match': tag }, payload: { snapshot_every: 7 } });
    assert.equal(res.statusCode, 412, `${tag}: ${res.body}`);
    assert.equal(res.json().code, 'VERSION_MISMATCH');
    assert.equal(res.headers.etag, '"2"');
    assert.match(res.json().message, /^If-Match: expected a tag that is none of this session's versions .*, the session is at version 2$/);
  }
  // Empty list elements are ignored (RFC 9110 section 5.6.1.2, a review); a header of nothing else is malformed.
  for (const tag of [', ,', ' ']) {
    const empty = await app.inject({ method: 'GET', url: '/v1/sessions/p', headers: { 'if-match': tag } });
    assert.equal(empty.statusCode, 400, `${JSON.stringify(tag)}: ${empty.body}`);
    assert.equal(empty.json().code, 'INVALID_HEADER');
  }
  for (const tag of [', "2"', '"2",', ' , "2" , ']) assert.equal((await app.inject({ method: 'GET', url: '/v1/sessions/p', headers: { 'if-match': tag } })).statusCode, 200, tag);
  const two = await app.inject({ method: 'PATCH', url: '/v1/sessions/p', headers: { 'if-match': '"2", "3"' }, payload: { snapshot_every: 7 } });
  assert.equal(two.statusCode, 400, two.body);
  assert.match(two.json().message, /^If-Match: /);
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).json().snapshot_every, 50, 'unchanged by the refused changes');
  const list = Array.from({ length: 30 }, (_, i) => `"${i + 100}"`).concat('"2"').join(', ');
  assert.equal((await app.inject({ url: '/v1/sessions/p/params', headers: { 'if-none-match': list } })).statusCode, 304);
});

test('a route that takes no body refuses one (DELETE, restore), and does nothing; an empty object is no body', async (t) => {
  const app = await setup(t);
  for (const [method, url] of [['DELETE', '/v1/sessions/p'], ['POST', '/v1/sessions/p/snapshots/1/restore']] as const) {
    const res = await app.inject({ method, url, headers: { 'content-type': 'application/json' }, payload: '{"x":1}' });
    assert.equal(res.statusCode, 400, `${method} ${url}: ${res.body}`);
    assert.equal(res.json().code, 'INVALID_BODY');
    assert.match(res.json().message, /^body: .* takes no body$/);
  }
  assert.equal((await app.inject({ url: '/v1/sessions/p' })).json().version, 2, 'neither deleted nor restored');
  const restored = await app.inject({ method: 'POST', url: '/v1/sessions/p/snapshots/1/restore', headers: { 'content-type': 'application/json' }, payload: '{}' });
  assert.equal(restored.statusCode, 200, restored.body);
  // No body at all, announced as JSON (clients that set Content-Type on every request): no body.
  const again = await app.inject({ method: 'POST', url: '/v1/sessions/p/snapshots/1/restore', headers: { 'content-type': 'application/json' } });
  assert.equal(again.statusCode, 200, again.body);
  // A route whose body is optional takes none announced as JSON as none (a review: POST …/snapshots said 400 INVALID_JSON).
  const snapshot = await app.inject({ method: 'POST', url: '/v1/sessions/p/snapshots', headers: { 'content-type': 'application/json' } });
  assert.equal(snapshot.statusCode, 201, snapshot.body);
  assert.equal(snapshot.json().pinned, false);
  const deleted = await app.inject({ method: 'DELETE', url: '/v1/sessions/p', headers: { 'content-type': 'application/json' } });
  assert.equal(deleted.statusCode, 204, deleted.body);
  // A route that takes a body still says an empty one is not JSON.
  const create = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { 'content-type': 'application/json' } });
  assert.equal(create.statusCode, 400);
  assert.equal(create.json().code, 'INVALID_JSON');
});
