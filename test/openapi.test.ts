// openapi/openapi.json is generated from the routes (npm run openapi) and must be fresh; the document must
// say what the routes do: their errors, their access, and the media types they really accept and answer.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { generateOpenApi, OPENAPI_FILE } from '../scripts/openapi.ts';
import { CODES } from '../src/errors.ts';
import { buildTestApp, PG_ADMIN_URL, TEST_DB_KIND } from './helper.ts';
import { createSession, fillPath, operations, type Operation } from './ops/support.ts';

const MEDIA = ['application/json', 'application/octet-stream', 'application/vnd.pytorch', 'application/x-safetensors', 'application/safetensors', 'text/plain'];

test('openapi/openapi.json is what the routes generate (run `npm run openapi` after changing a route)', async () => {
  const committed = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  const fresh = await generateOpenApi(TEST_DB_KIND === 'postgres' ? PG_ADMIN_URL : null);
  const differences = diff(committed, fresh, '');
  assert.deepEqual(differences, [], 'openapi/openapi.json is stale: run `npm run openapi` and commit it');
  assert.deepEqual(committed, fresh);
});

/** A local $ref resolved in the document (other values as they are). */
function resolve(doc: unknown, value: unknown): unknown {
  const ref = (value as { $ref?: unknown } | undefined)?.$ref;
  if (typeof ref !== 'string') return value;
  assert.ok(ref.startsWith('#/'), ref);
  return resolve(doc, ref.slice(2).split('/').reduce((at: unknown, key) => (at as Record<string, unknown> | undefined)?.[key.replace(/~1/g, '/').replace(/~0/g, '~')], doc));
}

/** JSON pointers where two documents differ (the first few). */
function diff(a: unknown, b: unknown, at: string, out: string[] = []): string[] {
  if (out.length >= 10) return out;
  if (a && b && typeof a === 'object' && typeof b === 'object' && Array.isArray(a) === Array.isArray(b)) {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    for (const key of keys) diff((a as Record<string, unknown>)[key], (b as Record<string, unknown>)[key], `${at}/${key.replace(/~/g, '~0').replace(/\//g, '~1')}`, out);
  } else if (JSON.stringify(a) !== JSON.stringify(b)) out.push(at || '/');
  return out;
}

test('every operation documents its errors and its access', async (t) => {
  const doc = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  assert.equal(doc.openapi, '3.0.3');
  assert.ok(doc.info.title && doc.info.version);
  assert.deepEqual(doc.components.securitySchemes.bearerAuth, { type: 'http', scheme: 'bearer', description: doc.components.securitySchemes.bearerAuth.description });
  const tags = new Set(doc.tags.map((tag: { name: string }) => tag.name));
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: 'an-admin-token-for-openapi' } });
  const access = new Map(app.routeAccess.map((r) => [`${r.method} ${(r.url.length > 1 ? r.url.replace(/\/$/, '') : r.url).replace(/:(\w+)/g, '{$1}')}`, r]));

  const operationIds = new Set<string>();
  for (const { method, path, op } of operations(doc) as (Operation & { op: { tags?: string[]; summary?: string; operationId?: string } })[]) {
    const label = `${method} ${path}`;
    assert.ok(op.summary, `${label} has a summary`);
    assert.ok(op.tags?.length && op.tags.every((tag) => tags.has(tag)), `${label} has declared tags`);
    const route = access.get(label);
    assert.ok(route, `${label} is a route of the app`);
    // Access: a security requirement exactly where the route needs a token.
    assert.ok(typeof op.operationId === 'string' && /^[a-z][A-Za-z]+$/.test(op.operationId), `${label} has an operationId`);
    assert.ok(!operationIds.has(op.operationId), `${label}: operationId ${op.operationId} is unique`);
    operationIds.add(op.operationId);
    if (route.scope === 'public') assert.deepEqual(op.security, [], label);
    else {
      assert.deepEqual(op.security, [{ bearerAuth: [] }], label);
      assert.equal(op['x-scope'], route.scope, label);
    }
    // Errors: what auth, limits, validation and lookups can answer.
    const expected = new Set<number>();
    if (route.scope !== 'public') [401, 403, 429].forEach((s) => expected.add(s));
    // With auth off, a Host that is not a loopback name is refused on every route, open ones included
    // (found by a review: /healthz, /readyz, /metrics and / did not list it); /metrics may require a token.
    expected.add(403);
    if (path === '/metrics') expected.add(401);
    if (op.parameters?.length || op.requestBody) expected.add(400);
    if (op.requestBody) [413, 415].forEach((s) => expected.add(s));
    if (op.parameters?.some((p) => p.in === 'path')) expected.add(404);
    if (path.startsWith('/v1/')) expected.add(503);
    for (const status of expected) {
      const response = resolve(doc, op.responses[String(status)]) as { content?: Record<string, { schema: unknown }> } | undefined;
      assert.ok(response, `${label} documents ${status}`);
      const schema = resolve(doc, response.content?.['application/json']?.schema) as { properties?: Record<string, { enum?: string[] }>; required?: string[] } | undefined;
      assert.ok(schema?.properties?.code && schema.required?.includes('code'), `${label} ${status} is an error body with a code`);
      // The codes the status can carry are listed, and each is one of the catalogue's with that status.
      const codes = schema.properties.code.enum ?? [];
      assert.ok(codes.length > 0, `${label} ${status} lists its codes`);
      for (const code of codes) assert.equal(CODES[code as keyof typeof CODES]?.status, status, `${label} ${status}: ${code}`);
      if (status === 403) assert.ok(codes.includes('HOST_NOT_ALLOWED'), `${label} 403 lists HOST_NOT_ALLOWED`);
    }
    assert.ok(Object.keys(op.responses).some((s) => /^2\d\d$/.test(s)), `${label} documents its success`);
  }
});

test('the media types each operation documents are the ones it accepts and answers', async (t) => {
  const doc = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  const { app } = await buildTestApp(t);
  await createSession(app, 'p', {});
  const snapshot = (await app.inject({ url: '/v1/sessions/p/snapshots' })).json().snapshots[0].id;
  let probes = 0;
  for (const { method, path, op } of operations(doc)) {
    const label = `${method} ${path}`;
    if (op.requestBody) {
      const documented = Object.keys(op.requestBody.content);
      assert.ok(documented.includes('application/json'), label);
      // A body that is no valid anything, to a session that does not exist: nothing can change.
      const url = fillPath(path, { name: 'nope', id: '999999' });
      for (const type of MEDIA) {
        const res = await app.inject({ method: method as 'POST', url, headers: { 'content-type': type }, payload: Buffer.from('\x00\x01 not a file {') });
        probes++;
        assert.ok(res.statusCode >= 400 && res.statusCode < 500, `${label} ${type}: ${res.statusCode} ${res.body}`);
        if (documented.includes(type)) assert.notEqual(res.statusCode, 415, `${label} documents ${type} but answers 415: ${res.body}`);
        else {
          assert.equal(res.statusCode, 415, `${label} accepts ${type} but does not document it: ${res.body}`);
          assert.equal(res.json().code, 'UNSUPPORTED_MEDIA_TYPE');
          // The answer names the type that was sent and the ones the route takes.
          assert.ok(res.json().message.startsWith(`Content-Type: ${type} is not accepted here; use application/json`), res.body);
        }
      }
    }
    const ok = op.responses['200']?.content;
    if (method === 'GET' && ok && /\/(params|state_dict|checkpoint)$/.test(path)) {
      const documented = Object.keys(ok);
      assert.ok(documented.includes('application/octet-stream'), `${label} lists torch.save`);
      const url = fillPath(path, { name: 'p', id: String(snapshot) });
      for (const type of ['application/json', 'application/octet-stream', 'application/x-safetensors']) {
        const res = await app.inject({ url, headers: { accept: type } });
        probes++;
        if (documented.includes(type)) {
          assert.equal(res.statusCode, 200, `${label} documents ${type}: ${res.body.slice(0, 200)}`);
          assert.equal(String(res.headers['content-type']).split(';')[0], type, label);
        } else {
          assert.equal(res.statusCode, 406, `${label} answers ${type} but does not document it`);
        }
      }
    }
  }
  assert.ok(probes >= 60, `${probes} probes`);
  t.diagnostic(`media probes: ${probes}`);
});

test('the committed document passes an OpenAPI linter (redocly, recommended rules): no errors, no warnings', () => {
  // Offline: no telemetry, no update check. Accepted findings are listed, with why, in .redocly.lint-ignore.yaml.
  const run = spawnSync(join('node_modules', '.bin', 'redocly'), ['lint', OPENAPI_FILE, '--format=json'], {
    encoding: 'utf8',
    env: { ...process.env, REDOCLY_TELEMETRY: 'off', REDOCLY_SUPPRESS_UPDATE_NOTICE: 'true', CI: 'true' },
    timeout: 120_000,
  });
  const report = JSON.parse(run.stdout) as { totals: { errors: number; warnings: number }; problems: { ruleId: string; message: string; location: { pointer: string }[] }[] };
  const problems = report.problems.map((p) => `${p.ruleId}: ${p.message} at ${p.location[0]?.pointer}`);
  assert.deepEqual(problems, []);
  assert.deepEqual([report.totals.errors, report.totals.warnings], [0, 0]);
  assert.equal(run.status, 0, run.stderr);
});

test('shared shapes are components referenced by $ref; tensor answers are typed', () => {
  const doc = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  for (const name of ['Session', 'Snapshot', 'StepAnswer', 'Tensor', 'Params', 'StateDict', 'Checkpoint', 'Hyperparameters', 'ParamGroup', 'Error400', 'Error404']) {
    assert.ok(doc.components.schemas[name], `components.schemas.${name}`);
  }
  const text = JSON.stringify(doc.paths);
  // The error body is written once per status, not once per operation.
  assert.equal((text.match(/"statusCode"/g) ?? []).length, 0, 'no inline error bodies in paths');
  const json = (path: string) => doc.paths[path].get.responses['200'].content['application/json'].schema.$ref;
  assert.equal(json('/v1/sessions/{name}/params'), '#/components/schemas/Params');
  assert.equal(json('/v1/sessions/{name}/state_dict'), '#/components/schemas/StateDict');
  assert.equal(json('/v1/sessions/{name}/checkpoint'), '#/components/schemas/Checkpoint');
  assert.equal(doc.paths['/v1/sessions/{name}/step'].post.responses['200'].content['application/json'].schema.$ref, '#/components/schemas/StepAnswer');
  assert.deepEqual(doc.components.schemas.Params.properties.params, { $ref: '#/components/schemas/NamedTensors' });
  assert.deepEqual(doc.components.schemas.NamedTensors.additionalProperties, { $ref: '#/components/schemas/Tensor' });
});

test('the headers the document declares on each answer are sent, and the API headers sent are declared', async (t) => {
  const doc = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  type Response = { $ref?: string; headers?: Record<string, unknown> };
  const byId = new Map(operations(doc).map((o) => [(o.op as { operationId?: string }).operationId as string, o.op.responses as Record<string, Response>]));
  const API_HEADERS = ['etag', 'x-session-version', 'x-session-step', 'location', 'cache-control', 'content-disposition', 'retry-after', 'www-authenticate', 'x-request-id'];
  const declaredFor = (operationId: string, status: number): string[] => {
    const responses = byId.get(operationId);
    assert.ok(responses, operationId);
    let response = responses[String(status)] ?? responses.default;
    assert.ok(response, `${operationId} ${status} is declared`);
    if (!responses[String(status)]) assert.ok((doc.components.schemas.ErrorOther.properties.statusCode.enum as number[]).includes(status), `${operationId} ${status}: neither listed nor a status of the default answer`);
    if (response.$ref) response = doc.components.responses[response.$ref.split('/').pop()!] as Response;
    return Object.keys(response.headers ?? {}).map((h) => h.toLowerCase());
  };
  let checked = 0;
  const check = (operationId: string, res: { statusCode: number; headers: Record<string, unknown>; body: string }, file = false) => {
    const declared = declaredFor(operationId, res.statusCode);
    for (const name of declared) {
      if (name === 'content-disposition' && !file) continue; // file answers only
      assert.ok(res.headers[name] !== undefined, `${operationId} ${res.statusCode}: ${name} declared, not sent (${res.body.slice(0, 120)})`);
    }
    for (const name of API_HEADERS) if (res.headers[name] !== undefined) assert.ok(declared.includes(name), `${operationId} ${res.statusCode}: ${name} sent, not declared`);
    checked++;
  };
  const { app } = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: 'admin-token-for-tests-0123456789' } });
  const admin = { authorization: 'Bearer admin-token-for-tests-0123456789' };
  const call = async (operationId: string, req: { method?: string; url: string; payload?: unknown; headers?: Record<string, string> }, file = false) => {
    const res = await app.inject({ method: (req.method ?? 'GET') as 'GET', url: req.url, payload: req.payload as string, headers: { ...admin, ...req.headers } });
    check(operationId, res, file);
    return res;
  };
  const params = [{ name: 'w', shape: [3], data: [0.1, 0.2, 0.3] }];
  const grads = { grads: { w: [1, 2, 3] } };
  for (const [id, url] of [['index', '/'], ['liveness', '/healthz'], ['readiness', '/readyz'], ['metrics', '/metrics']]) await call(id, { url });
  const token = (await call('createToken', { method: 'POST', url: '/v1/tokens', payload: { scope: 'read', name: 'reader' } })).json();
  await call('listTokens', { url: '/v1/tokens' });
  await call('getOwnToken', { url: '/v1/tokens/self' });
  await call('createSession', { method: 'POST', url: '/v1/sessions', payload: { name: 's', params } });
  await call('listSessions', { url: '/v1/sessions' });
  await call('getSession', { url: '/v1/sessions/s' });
  await call('getSession', { url: '/v1/sessions/s', headers: { 'if-none-match': '"1"' } });
  await call('updateSession', { method: 'PATCH', url: '/v1/sessions/s', payload: { snapshot_every: 50 } });
  await call('forkSession', { method: 'POST', url: '/v1/sessions/s/fork', payload: { name: 's2' } });
  await call('step', { method: 'POST', url: '/v1/sessions/s/step', payload: grads });
  await call('step', { method: 'POST', url: '/v1/sessions/s/step?return=params', payload: grads, headers: { accept: 'application/x-safetensors' } }, true);
  for (const [id, what] of [['getParams', 'params'], ['getStateDict', 'state_dict'], ['getCheckpoint', 'checkpoint']]) {
    await call(id, { url: `/v1/sessions/s/${what}?format=json` });
    await call(id, { url: `/v1/sessions/s/${what}?format=pt` }, true);
    await call(id, { url: `/v1/sessions/s/${what}`, headers: { 'if-none-match': '"3"' } });
  }
  const current = (path: string) => app.inject({ url: `/v1/sessions/s/${path}`, headers: admin }).then((r) => r.json());
  await call('loadParams', { method: 'PUT', url: '/v1/sessions/s/params', payload: { params: (await current('params')).params } });
  await call('loadStateDict', { method: 'PUT', url: '/v1/sessions/s/state_dict', payload: await current('state_dict') });
  await call('loadCheckpoint', { method: 'PUT', url: '/v1/sessions/s/checkpoint', payload: await current('checkpoint?format=json') });
  const snapshot = (await call('createSnapshot', { method: 'POST', url: '/v1/sessions/s/snapshots', payload: {} })).json().id;
  await call('listSnapshots', { url: '/v1/sessions/s/snapshots' });
  await call('getSnapshot', { url: `/v1/sessions/s/snapshots/${snapshot}` });
  await call('pinSnapshot', { method: 'PATCH', url: `/v1/sessions/s/snapshots/${snapshot}`, payload: { pinned: true } });
  for (const [id, what] of [['getSnapshotParams', 'params'], ['getSnapshotStateDict', 'state_dict'], ['getSnapshotCheckpoint', 'checkpoint']]) {
    await call(id, { url: `/v1/sessions/s/snapshots/${snapshot}/${what}?format=json` });
    await call(id, { url: `/v1/sessions/s/snapshots/${snapshot}/${what}?format=safetensors`.replace('checkpoint?format=safetensors', 'checkpoint?format=pt') }, true);
  }
  await call('restoreSnapshot', { method: 'POST', url: `/v1/sessions/s/snapshots/${snapshot}/restore` });
  for (const [id, what] of [['getNorms', 'norms'], ['getHyperparameterChanges', 'hyperparameters'], ['getMetrics', 'metrics']]) await call(id, { url: `/v1/sessions/s/${what}` });
  await call('getEvents', { method: 'HEAD', url: '/v1/sessions/s/events' });
  // errors: 401, 403, 404, 412 and the default (405)
  await call('getSession', { url: '/v1/sessions/s', headers: { authorization: 'Bearer not-a-token-at-all' } });
  await call('deleteSession', { method: 'DELETE', url: '/v1/sessions/s', headers: { authorization: `Bearer ${token.token}` } });
  await call('getSession', { url: '/v1/sessions/nope' });
  await call('updateSession', { method: 'PATCH', url: '/v1/sessions/s', payload: {}, headers: { 'if-match': '"99"' } });
  await call('getSession', { method: 'DELETE', url: '/v1/sessions/s/step' });
  await call('deleteSession', { method: 'DELETE', url: '/v1/sessions/s2' });
  await call('revokeToken', { method: 'DELETE', url: `/v1/tokens/${token.id}` });

  // 429 and 503 (Retry-After): a rate limit of one request a minute; a heap limit every process is over.
  const limited = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: 'admin-token-for-tests-0123456789', ASGD_RATE_LIMIT_PER_MINUTE: '1' } });
  await limited.app.inject({ url: '/v1/sessions', headers: admin });
  const tooMany = await limited.app.inject({ url: '/v1/sessions', headers: admin });
  assert.equal(tooMany.statusCode, 429);
  check('listSessions', tooMany);
  const overloaded = await buildTestApp(t, { env: { ASGD_ADMIN_TOKEN: 'admin-token-for-tests-0123456789' }, config: { maxHeapUsedBytes: 1_000_000 } });
  // The guard samples the heap every second or so: the first requests may still pass.
  let refused = await overloaded.app.inject({ url: '/v1/sessions', headers: admin });
  for (let i = 0; i < 50 && refused.statusCode !== 503; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    refused = await overloaded.app.inject({ url: '/v1/sessions', headers: admin });
  }
  assert.equal(refused.statusCode, 503);
  check('listSessions', refused);
  const index = await overloaded.app.inject({ url: '/' });
  assert.equal(index.statusCode, 503);
  check('index', index);
  assert.ok(checked >= 50, `${checked} answers checked`);
});

test('a step\'s and PATCH param_groups\' group lists every key the service takes there (torch\'s flags too)', () => {
  // An API review: foreach, differentiable and capturable were taken (foreach changed the group) but not
  // documented, so a client generated from the document could not send them.
  const doc = JSON.parse(readFileSync(OPENAPI_FILE, 'utf8'));
  const groupOf = (path: string, method: string, media = 'application/json') => {
    const body = resolve(doc, doc.paths[path][method].requestBody) as { content: Record<string, { schema: unknown }> };
    const schema = resolve(doc, body.content[media].schema) as { properties: Record<string, unknown> };
    const list = resolve(doc, schema.properties.param_groups) as { items: unknown };
    return Object.keys((resolve(doc, list.items) as { properties: Record<string, unknown> }).properties).sort();
  };
  const keys = ['alpha', 'capturable', 'differentiable', 'foreach', 'lambd', 'lr', 'maximize', 't0', 'weight_decay'];
  assert.deepEqual(groupOf('/v1/sessions/{name}/step', 'post'), keys);
  assert.deepEqual(groupOf('/v1/sessions/{name}/param_groups', 'patch'), keys);
});
