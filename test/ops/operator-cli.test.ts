// The operator CLI (`asgd-serve sessions|tokens ...`) against a live service: a server process on a
// scratch PostgreSQL database, the commands run as a script runs them (bin/asgd-serve.mjs) and, for the
// cases a terminal needs (the question of rm, progress), in this process through main().
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { assertFails, BIN, runMain, runProcess, type HereOptions } from '../support/cli.ts';
import { readZip } from '../../src/formats/zip.ts';
import { ServiceProcess } from '../support/cluster.ts';
import { createTestDatabase, randomData } from '../helper.ts';
import { ADMIN } from './support.ts';
import { freePort } from '../support/ports.ts';

let service: ServiceProcess;
let dir: string;
let dropDb: () => Promise<void>;

async function api(method: string, path: string, body?: unknown, token = ADMIN): Promise<Response> {
  return fetch(`${service.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined && { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

before(async () => {
  const db = await createTestDatabase();
  dropDb = db.drop;
  dir = await mkdtemp(join(tmpdir(), 'asgd-cli-'));
  service = new ServiceProcess(0, await freePort(), { DATABASE_URL: db.url, ASGD_ADMIN_TOKEN: ADMIN, LOG_LEVEL: 'warn' });
  service.start();
  const deadline = Date.now() + 120_000;
  for (;;) {
    const ready = await fetch(`${service.url}/readyz`).then((r) => r.ok, () => false);
    if (ready) break;
    if (!service.alive || Date.now() > deadline) throw new Error(`the service did not start:\n${service.log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  for (const [name, n] of [['alpha', 300], ['beta', 8]] as const) {
    const res = await api('POST', '/v1/sessions', { name, params: [{ name: 'w', shape: [n], data: randomData(n, 3) }], snapshot_every: 2 });
    assert.equal(res.status, 201, await res.text());
  }
  for (let k = 0; k < 3; k++) {
    const res = await api('POST', '/v1/sessions/alpha/step', { grads: { w: randomData(300, 10 + k) } });
    assert.equal(res.status, 200, await res.text());
  }
});

after(async () => {
  await service?.stop();
  await dropDb?.();
  await rm(dir, { recursive: true, force: true });
});

/** The real executable, as a script runs it: no terminal. */
const cli = (args: string[], env: Record<string, string> = {}) => runProcess([BIN, ...args], { ASGD_URL: service.url, ASGD_TOKEN: ADMIN, ...env });

/** main() in this process, as on a terminal when `interactive`. */
const here = (args: string[], opts: HereOptions = {}) => runMain(args, { ...opts, env: { ASGD_URL: service.url, ASGD_TOKEN: ADMIN, ...opts.env } });

/** A torch.save file's entries but its random serialization id (PyTorch writes a new one each save); other files as they are. */
function comparable(file: Buffer): unknown {
  if (file.readUInt32LE(0) !== 0x04034b50) return file.toString('base64');
  const zip = readZip(file);
  return [...zip.entries.keys()].filter((name) => !name.endsWith('/serialization_id')).map((name) => [name, zip.read(name).toString('base64')]);
}


test('sessions ls and show: readable tables, --json for scripts', async () => {
  const ls = await cli(['sessions', 'ls']); // the real executable; the rest runs main() in this process
  assert.equal(ls.code, 0, ls.stderr);
  assert.match(ls.stdout, /^NAME\s+VERSION\s+STEP\s+PARAMS\s+STORED/);
  assert.match(ls.stdout, /^alpha\s+4\s+3\s+300\s+\d+(\.\d)? KiB/m);
  assert.match(ls.stdout, /^beta\s+1\s+0\s+8\s/m);
  const json = JSON.parse((await here(['sessions', 'ls', '--json'])).stdout);
  assert.deepEqual(json.sessions.map((s: { name: string }) => s.name), ['alpha', 'beta']);
  const stored = (await (await api('GET', '/v1/sessions/alpha')).json()).storage;
  assert.deepEqual(json.sessions[0].storage, stored, 'the list\'s figures are those of GET session');
  // The API's URL (…/v1, as the docs write it) is the service's: not doubled into /v1/v1.
  for (const url of [`${service.url}/v1`, `${service.url}/v1/`]) {
    const viaApi = await here(['sessions', 'ls', '--json', '--url', url]);
    assert.equal(viaApi.code, 0, viaApi.stderr);
    assert.deepEqual(JSON.parse(viaApi.stdout).sessions.map((s: { name: string }) => s.name), ['alpha', 'beta']);
  }
  const limited = JSON.parse((await here(['sessions', 'ls', '--limit', '1', '--json'])).stdout);
  assert.deepEqual(limited.sessions.map((s: { name: string }) => s.name), ['alpha']);

  const show = await here(['sessions', 'show', 'alpha']);
  assert.equal(show.code, 0, show.stderr);
  assert.match(show.stdout, /^version:\s+4$/m);
  assert.match(show.stdout, /^parameters:\s+1 tensor, 300 elements$/m);
  assert.match(show.stdout, /^rounds:\s+off \(every step request is its own step\)$/m);
  assert.match(show.stdout, /^keep log bytes:\s+4\.0 GiB$/m);
  assert.match(show.stdout, /^stored:\s+.*log .* \(3 steps\), snapshots .* \(2\)/m);
  assert.match(show.stdout, /^SNAPSHOT\s+VERSION\s+STEP\s+REASON\s+PINNED\s+SIZE\s+AGE$/m);
  assert.match(show.stdout, /^\s*\d+\s+3\s+2\s+auto\s+no\s/m);
  const showJson = JSON.parse((await here(['sessions', 'show', 'alpha', '--json'])).stdout);
  assert.equal(showJson.version, 4);
  assert.deepEqual(showJson.storage, stored);
  assert.equal(showJson.snapshots.length, 2);

  // A session with rounds: its settings and its open round, who contributed (a review: a round left open by
  // workers that went away was seen only with --json).
  const made = await api('POST', '/v1/sessions', { name: 'gamma', params: [{ name: 'w', shape: [2], data: [1, 2] }], aggregation: { contributions: 3, timeout_s: 600, min_contributions: 2 } });
  assert.equal(made.status, 201, await made.text());
  const held = await api('POST', '/v1/sessions/gamma/step?wait=0', { grads: { w: [0.5, 0.5] }, worker: 'w1', base_version: 1 });
  assert.equal(held.status, 202, await held.text());
  const round = await here(['sessions', 'show', 'gamma']);
  assert.match(round.stdout, /^rounds:\s+a round steps at 3 contributions or 600 s with at least 2; open at version 1: 1 contribution \(w1\), first \d+s ago$/m);
  assert.equal((await api('DELETE', '/v1/sessions/gamma')).status, 204);
});

test('sessions snapshot and download: the files the API serves, written whole', async () => {
  const snap = await cli(['sessions', 'snapshot', 'alpha', '--pin', '--json']);
  assert.equal(snap.code, 0, snap.stderr);
  const taken = JSON.parse(snap.stdout);
  assert.equal(taken.pinned, true);
  assert.equal(taken.version, 4);
  // beta is at its creation's version, whose snapshot the creation wrote: that one is answered, and said.
  const plain = await here(['sessions', 'snapshot', 'beta']);
  assert.match(plain.stdout, /^snapshot \d+ of beta at version 1 \(step 0\), the one already at this version \(create\)\n$/);
  assert.equal((await here(['sessions', 'snapshot', 'beta'])).stdout, plain.stdout, 'the same one again');

  const cases: [string[], string][] = [
    [['--format', 'pt'], '/v1/sessions/alpha/checkpoint?format=pt'],
    [['--format', 'json'], '/v1/sessions/alpha/checkpoint?format=json'],
    [['--format', 'safetensors'], '/v1/sessions/alpha/params?format=safetensors'],
    [['--format', 'pt', '--what', 'state_dict'], '/v1/sessions/alpha/state_dict?format=pt'],
    [['--format', 'json', '--what', 'params', '--version', '2'], '/v1/sessions/alpha/params?format=json&version=2'],
    [['--format', 'pt', '--snapshot', String(taken.id)], `/v1/sessions/alpha/snapshots/${taken.id}/checkpoint?format=pt`],
  ];
  for (const [i, [flags, route]] of cases.entries()) {
    const file = join(dir, `dl-${i}`);
    const r = i === 0 ? await cli(['sessions', 'download', 'alpha', ...flags, '-o', file]) : await here(['sessions', 'download', 'alpha', ...flags, '-o', file]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '', 'no progress when stderr is not a terminal');
    assert.match(r.stdout, new RegExp(`^wrote ${file}: `));
    const expected = Buffer.from(await (await api('GET', route)).arrayBuffer());
    assert.ok(expected.length > 100);
    assert.deepEqual(comparable(await readFile(file)), comparable(expected), `${flags.join(' ')}: the bytes of GET ${route}`);
    await assert.rejects(stat(`${file}.part`), 'no partial file left');
  }
  // To standard output, and with progress when on a terminal.
  const piped = await here(['sessions', 'download', 'alpha', '--format', 'safetensors', '-o', '-']);
  assert.equal(piped.code, 0, piped.stderr);
  assert.ok(piped.piped.equals(Buffer.from(await (await api('GET', '/v1/sessions/alpha/params?format=safetensors')).arrayBuffer())));
  const shown = await here(['sessions', 'download', 'alpha', '--format', 'pt', '-o', join(dir, 'tty.pt')], { interactive: true });
  assert.equal(shown.code, 0, shown.stderr);
  assert.match(shown.stderr, /^\r\d+(\.\d)? (B|KiB) of .* \(100%\) *\n$/s);

  // Refused downloads leave nothing behind.
  const missing = join(dir, 'missing.pt');
  assertFails(await here(['sessions', 'download', 'alpha', '--format', 'pt', '--snapshot', '999999', '-o', missing]), 3, /snapshot .*999999/);
  await assert.rejects(stat(missing));
  await assert.rejects(stat(`${missing}.part`));
  assertFails(await here(['sessions', 'download', 'alpha', '--format', 'pt', '--version', '99', '-o', missing]), 3, /VERSION_NOT_AVAILABLE/);
  assertFails(await here(['sessions', 'download', 'alpha', '-o', missing]), 2, /--format must be one of pt, safetensors, json/);
  assertFails(await here(['sessions', 'download', 'alpha', '--format', 'pt']), 2, /-o FILE/);
  assertFails(await here(['sessions', 'download', 'alpha', '--format', 'safetensors', '--what', 'checkpoint', '-o', missing]), 2, /checkpoint is a torch.save file/);
  assertFails(await here(['sessions', 'download', 'alpha', '--format', 'pt', '-o', join(dir, 'no-such-dir', 'f.pt')]), 1, /cannot write [^ ]*no-such-dir\/f\.pt \(written first as [^)]*f\.pt\.part\): ENOENT/);
});

test('sessions rm asks on a terminal, needs --yes in a script, and deletes', async () => {
  const create = await api('POST', '/v1/sessions', { name: 'doomed', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  assert.equal(create.status, 201);
  assertFails(await cli(['sessions', 'rm', 'doomed']), 2, /not on a terminal: pass --yes/);
  const declined = await here(['sessions', 'rm', 'doomed'], { interactive: true, answer: 'n' });
  assert.equal(declined.code, 2);
  assert.match(declined.asked[0], /^Delete session "doomed" \(version 1, .* with its snapshots and log\)\? This cannot be undone\. \[y\/N\] $/);
  assert.equal((await api('GET', '/v1/sessions/doomed')).status, 200, 'still there');
  const confirmed = await here(['sessions', 'rm', 'doomed'], { interactive: true, answer: 'y' });
  assert.equal(confirmed.code, 0, confirmed.stderr);
  assert.equal(confirmed.stdout, 'deleted session doomed\n');
  assert.equal((await api('GET', '/v1/sessions/doomed')).status, 404);
  const again = await api('POST', '/v1/sessions', { name: 'doomed', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  assert.equal(again.status, 201);
  const scripted = await here(['sessions', 'rm', 'doomed', '--yes', '--json']);
  assert.equal(scripted.code, 0, scripted.stderr);
  assert.deepEqual(JSON.parse(scripted.stdout), { deleted: 'doomed' });
  assertFails(await here(['sessions', 'rm', 'doomed', '-y']), 3, /session "doomed" does not exist \(SESSION_NOT_FOUND\)/);
});

test('sessions rm --if-match deletes only that version; after its question only the version it named; an option a command does not take is refused', async () => {
  // Found by a review: the CLI had one option table for every command, so rm --if-match 99 deleted a session
  // at version 1 (the header was never sent), and show --version 2 showed the current version.
  const create = await api('POST', '/v1/sessions', { name: 'guarded', params: [{ name: 'w', shape: [2], data: [1, 2] }] });
  assert.equal(create.status, 201);
  assertFails(await cli(['sessions', 'rm', 'guarded', '--yes', '--if-match', '99']), 1, /If-Match: expected "99", the session is at version 1/);
  assert.equal((await api('GET', '/v1/sessions/guarded')).status, 200, 'still there');
  assertFails(await cli(['sessions', 'show', 'guarded', '--version', '2']), 2, /unknown option --version for sessions show/);
  assertFails(await cli(['sessions', 'import', 'guarded', 'x.pt', '--snapshot', '1']), 2, /unknown option --snapshot for sessions import \(it takes --what, --if-match\)/);
  assertFails(await cli(['tokens', 'revoke', '0123456789abcdef', '--all']), 2, /unknown option --all for tokens revoke/);
  // An empty --sessions list is the CLI's to refuse (it sent it, and showed the service's 400 with the usage).
  assertFails(await cli(['tokens', 'create', 'e', '--scope', 'read', '--sessions', ',']), 2, /^asgd-serve: tokens create: --sessions must name at least one session/, { oneLine: true });
  // A step while the question is asked: the version asked about is gone, so nothing is deleted.
  const raced = await here(['sessions', 'rm', 'guarded'], {
    interactive: true, answer: 'y',
    whileAsked: async () => assert.equal((await api('POST', '/v1/sessions/guarded/step', { grads: { w: [0.5, 0.5] } })).status, 200),
  });
  assert.equal(raced.code, 1, raced.stderr);
  assert.match(raced.stderr, /If-Match: expected "1", the session is at version 2/);
  assert.equal((await api('GET', '/v1/sessions/guarded')).status, 200, 'not deleted');
  const exact = await cli(['sessions', 'rm', 'guarded', '--yes', '--if-match', '2']);
  assert.equal(exact.code, 0, exact.stderr);
  assert.equal((await api('GET', '/v1/sessions/guarded')).status, 404);
});

test('options given before the command (asgd-serve --url U sessions ls) are the command\'s', async () => {
  // Found by a review: they were taken for the server's, and answered "unknown option --url" with its help.
  const listed = await runProcess([BIN, '--url', service.url, '--token', ADMIN, 'sessions', 'ls', '--json'], {});
  assert.equal(listed.code, 0, listed.stderr);
  assert.ok(JSON.parse(listed.stdout).sessions.some((x: { name: string }) => x.name === 'alpha'), listed.stdout);
  const shown = await runProcess([BIN, `--url=${service.url}`, 'sessions', 'show', 'alpha', '--json'], { ASGD_TOKEN: ADMIN });
  assert.equal(shown.code, 0, shown.stderr);
  assert.equal(JSON.parse(shown.stdout).name, 'alpha');
});

test('tokens ls, create and revoke; a token\'s scope is what the CLI can do', async () => {
  const created = await cli(['tokens', 'create', 'ci-reader', '--scope', 'read', '--sessions', 'alpha']);
  assert.equal(created.code, 0, created.stderr);
  const secret = created.stdout.trim();
  assert.match(secret, /^asgd_[0-9a-f]{16}_\S+$/, 'the secret alone on stdout');
  assert.match(created.stderr, /scope read, sessions alpha; the secret is shown only now/);
  const id = /^asgd_([0-9a-f]{16})_/.exec(secret)![1];
  const ls = await here(['tokens', 'ls']);
  assert.match(ls.stdout, /^ID\s+NAME\s+SCOPE\s+SESSIONS\s+CREATED\s+REVOKED$/m);
  assert.match(ls.stdout, new RegExp(`^${id}\\s+ci-reader\\s+read\\s+alpha\\s`, 'm'));
  assert.ok(!ls.stdout.includes(secret.slice(24)), 'never the secret');

  const asReader = { env: { ASGD_TOKEN: secret } };
  assert.equal((await here(['sessions', 'show', 'alpha'], asReader)).code, 0);
  assert.deepEqual(JSON.parse((await here(['sessions', 'ls', '--json'], asReader)).stdout).sessions.map((s: { name: string }) => s.name), ['alpha']);
  assertFails(await here(['sessions', 'rm', 'alpha', '--yes'], asReader), 4, /FORBIDDEN/);
  assertFails(await here(['tokens', 'ls'], asReader), 4, /FORBIDDEN/);

  const revoked = await here(['tokens', 'revoke', id]);
  assert.equal(revoked.code, 0, revoked.stderr);
  assert.equal(revoked.stdout, `revoked token ${id}\n`);
  assert.doesNotMatch((await here(['tokens', 'ls'])).stdout, new RegExp(id));
  const all = JSON.parse((await here(['tokens', 'ls', '--all', '--json'])).stdout);
  assert.ok(all.tokens.some((t: { id: string; revoked_at: string | null }) => t.id === id && t.revoked_at !== null));
  assertFails(await here(['sessions', 'show', 'alpha'], asReader), 4, /the token was refused/);
  assertFails(await here(['tokens', 'revoke', '0123456789abcdef']), 3, /TOKEN_NOT_FOUND/);
  assertFails(await here(['tokens', 'revoke', 'nope']), 2, /not a token id/);
  assertFails(await here(['tokens', 'create', 'x', '--scope', 'root']), 2, /--scope must be read, step or admin/);
});

test('errors: unknown session, bad or missing token, unreachable service, bad usage', async () => {
  assertFails(await cli(['sessions', 'show', 'nope']), 3, /^asgd-serve: session "nope" does not exist \(SESSION_NOT_FOUND\)\n$/);
  assertFails(await here(['sessions', 'snapshot', 'nope']), 3, /SESSION_NOT_FOUND/);
  assertFails(await cli(['sessions', 'ls'], { ASGD_TOKEN: 'not-the-token-at-all' }), 4, /^asgd-serve: the token was refused .*\(UNAUTHORIZED\)\n$/);
  assertFails(await here(['sessions', 'ls'], { env: { ASGD_TOKEN: '' } }), 4, /needs a token: pass --token or set ASGD_TOKEN/);
  assert.equal((await here(['sessions', 'ls', '--token', ADMIN], { env: { ASGD_TOKEN: 'wrong-token-wrong-token' } })).code, 0, '--token wins over ASGD_TOKEN');
  const closed = await freePort();
  assertFails(await cli(['sessions', 'ls', '--url', `http://127.0.0.1:${closed}`]), 5, new RegExp(`^asgd-serve: cannot reach http://127.0.0.1:${closed} \\(ECONNREFUSED\\)`));
  assertFails(await here(['tokens', 'ls'], { env: { ASGD_URL: `http://127.0.0.1:${closed}` } }), 5, /cannot reach/);
  assertFails(await here(['sessions', 'ls', '--url', 'ftp://example']), 2, /--url: "ftp:\/\/example" is not an http/);
  // Another HTTP server (a static file server, a proxy's page): its 404 is "not an asgd-serve", not "not found".
  const other = createHttpServer((req, res) => res.writeHead(404, { 'content-type': 'text/html' }).end('<h1>File not found</h1>'));
  other.listen(0, '127.0.0.1');
  await once(other, 'listening');
  try {
    const port = (other.address() as { port: number }).port;
    assertFails(await cli(['sessions', 'ls', '--url', `http://127.0.0.1:${port}`]), 5, /answered HTTP 404 Not Found without an asgd-serve error code: is it an asgd-serve\? \(--url or ASGD_URL\)\n$/);
    assertFails(await cli(['sessions', 'show', 'alpha', '--url', `http://127.0.0.1:${port}`]), 5, /is it an asgd-serve\?/);
  } finally {
    other.close();
  }
  const unknown = await cli(['sessions', 'ls', '--colour']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /^asgd-serve: unknown option --colour\n\nUsage: asgd-serve sessions\|tokens/);
  assertFails(await here(['sessions', 'show']), 2, /sessions show: missing NAME/);
  assertFails(await here(['sessions', 'show', 'a', 'b']), 2, /unexpected argument "b"/);
  assertFails(await here(['sessions', 'ls', '--limit', 'lots']), 2, /--limit: must be a whole number/);
  assert.equal((await here(['sessions', 'frobnicate'])).code, 2);
  const help = await here(['sessions', '--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Exit codes: 0 ok, 1 .* 2 usage .* 3 not found .* 4 authentication .* 5 unreachable/s);
  const top = await cli(['--help']);
  assert.match(top.stdout, /sessions\s+ls, show, rm, snapshot, download/);
});

test('an empty ASGD_URL (ASGD_URL= in an .env file) is unset: the default url, as an empty ASGD_TOKEN is', async () => {
  const r = await here(['sessions', 'ls'], { env: { ASGD_URL: '' } });
  assert.doesNotMatch(r.stderr, /is not an http/);
  if (r.code !== 0) assert.match(r.stderr, /127\.0\.0\.1:8080/);
});

test('a hostile or broken server: no endless paging, no unbounded read, no terminal escapes, exit 5 for answers of another shape', async () => {
  // Found by a security review of the CLI against a fake server.
  let trickle: NodeJS.Timeout | undefined;
  const fake = createHttpServer((req, res) => {
    const url = req.url ?? '';
    const json = (status: number, body: unknown) => res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    if (url.startsWith('/v1/sessions?')) return json(200, { sessions: [], next: 'a' }); // a cursor that never moves on
    if (url === '/v1/sessions/evil') return json(400, { code: 'X\u001b[2J', message: '\u001b[2J\u001b[31mPWNED\u001b]0;evil title\u0007 \r overwritten' });
    if (url === '/v1/sessions/null') return json(200, { name: 'null', params: null, param_groups: null });
    if (url === '/v1/sessions/null/snapshots') return json(200, { snapshots: [] });
    if (url === '/v1/sessions/huge') {
      // 80 MiB of JSON, more than any answer the CLI reads
      res.writeHead(200, { 'content-type': 'application/json' });
      const chunk = Buffer.alloc(1024 * 1024, 0x20);
      let sent = 0;
      const more = () => {
        while (sent < 80) {
          sent++;
          if (!res.write(chunk)) return void res.once('drain', more);
        }
        res.end('{}');
      };
      return more();
    }
    if (url.startsWith('/v1/sessions/slow/')) {
      // an error whose body trickles: one byte a second, never ending
      res.writeHead(500, { 'content-type': 'application/json' });
      trickle = setInterval(() => res.write(' '), 1000);
      return;
    }
    json(404, { code: 'SESSION_NOT_FOUND', message: 'no' });
  });
  fake.listen(0, '127.0.0.1');
  await once(fake, 'listening');
  const url = `http://127.0.0.1:${(fake.address() as { port: number }).port}`;
  try {
    const ls = await here(['sessions', 'ls'], { env: { ASGD_URL: url } });
    assertFails(ls, 5, /next page does not move on/);
    const evil = await here(['sessions', 'show', 'evil'], { env: { ASGD_URL: url } });
    assert.equal(evil.code, 2);
    assert.doesNotMatch(evil.stderr, /[\u0000-\u0009\u000b-\u001f\u007f]/, 'no control characters but the final newline');
    assert.match(evil.stderr, /\\u001b\[2J\\u001b\[31mPWNED/);
    assertFails(await here(['sessions', 'show', 'null'], { env: { ASGD_URL: url } }), 5, /not what an asgd-serve sends/);
    assertFails(await here(['sessions', 'show', 'huge'], { env: { ASGD_URL: url } }), 5, /more than 64 MiB of JSON/);
    const began = Date.now();
    const slow = await here(['sessions', 'download', 'slow', '--format', 'pt', '--what', 'checkpoint', '--output', join(dir, 'slow.pt')], { env: { ASGD_URL: url } });
    assert.equal(slow.code, 1, slow.stderr);
    assert.ok(Date.now() - began < 30_000, `the error body is waited for 10 s at most (${Date.now() - began} ms)`);
  } finally {
    clearInterval(trickle);
    fake.closeAllConnections();
    fake.close();
  }
});
