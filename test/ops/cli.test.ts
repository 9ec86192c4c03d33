// The commands the Dockerfile and docker-compose.yml run, run here the same way: bin/asgd-serve.mjs
// migrate, bin/asgd-serve.mjs serve, bin/healthcheck.mjs.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect, createServer, type AddressInfo } from 'node:net';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { buildTestApp, createTestDatabase, TEST_DB_KIND } from '../helper.ts';
import { FLAGS, flagName, parseArgs } from '../../src/cli.ts';
import { PyDict, readTorchSave, torchSaveToBuffer } from '../../src/formats/index.ts';
import { assertFails as assertFailsAs, BIN, runMain, runProcess, type Run } from '../support/cli.ts';
import { spawnService, waitFor } from './processes.ts';
import { ADMIN, asAdmin, gradBody, sessionBody } from './support.ts';

const run = runProcess;
const runHere = (argv: string[], env: Record<string, string> = {}) => runMain(argv, { env });

test('--help lists a flag for every variable src/config.ts reads; 0.0.0.0 without a token is refused with exit code 2', async () => {
  const source = readFileSync('src/config.ts', 'utf8');
  const read = new Set([...source.matchAll(/env(?:\.|, ')([A-Z][A-Z0-9_]+)/g)].map((m) => m[1]));
  assert.ok(read.size >= 25, [...read].join());
  const flagged = new Set(FLAGS.map((f) => f.env));
  for (const key of read) assert.ok(flagged.has(key), `${key} has no CLI flag: add it to FLAGS in src/cli.ts`);
  for (const key of flagged) assert.ok(read.has(key), `${key} is a flag but config.ts does not read it`);

  // The real executable, as a container runs it.
  const [help, fromEnv, fromFlag] = await Promise.all([
    run([BIN, '--help']),
    run([BIN], { HOST: '0.0.0.0' }),
    run([BIN, 'serve', '--host', '0.0.0.0'], { HOST: '127.0.0.1' }),
  ]);
  assert.equal(help.code, 0, help.stderr);
  for (const f of FLAGS) assert.match(help.stdout, new RegExp(`${flagName(f.env)}\\b.*\\[${f.env}\\]`));
  assert.match(help.stdout, /serve .*\n.*migrate/);
  for (const r of [fromEnv, fromFlag]) {
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /refusing to listen on 0\.0\.0\.0 without authentication: set ASGD_ADMIN_TOKEN/);
  }
});

test('flags override the environment; bad flags and values exit 2', async () => {
  const { command, env } = parseArgs(['migrate', '--host', '0.0.0.0', '--allow-insecure', '--port=9', '--fma=false'], { HOST: '127.0.0.1', PORT: '1' });
  assert.equal(command, 'migrate');
  assert.deepEqual([env.HOST, env.PORT, env.ASGD_ALLOW_INSECURE, env.ASGD_FMA], ['0.0.0.0', '9', 'true', 'false']);
  assert.equal(parseArgs([], {}).command, 'serve');
  // A switch's value may be the next word (`--migrate false`); a command after a switch is still the command.
  assert.deepEqual(parseArgs(['--migrate', 'false', '--fma', 'TRUE'], {}).env, { ASGD_MIGRATE: 'false', ASGD_FMA: 'TRUE' });
  assert.deepEqual([parseArgs(['--allow-insecure', 'migrate'], {}).command, parseArgs(['--allow-insecure', 'migrate'], {}).env.ASGD_ALLOW_INSECURE], ['migrate', 'true']);
  assert.throws(() => parseArgs(['--port'], {}), /needs a value/);
  assert.throws(() => parseArgs(['start'], {}), /unknown command/);
  const shortToken = await runHere(['--host', '0.0.0.0', '--admin-token', 'too-short']);
  assert.equal(shortToken.code, 2);
  assert.match(shortToken.stderr, /ASGD_ADMIN_TOKEN must be at least 16 characters/);
  const unknownFlag = await runHere(['serve', '--no-such-flag']);
  assert.equal(unknownFlag.code, 2);
  assert.match(unknownFlag.stderr, /unknown option --no-such-flag/);
  const badPort = await runHere(['--port', 'eighty']);
  assert.equal(badPort.code, 2);
  assert.match(badPort.stderr, /PORT must be a whole number/);
  const unreachable = await runHere(['migrate', '--database-url', 'postgres://postgres@127.0.0.1:1/none'], { ASGD_DB_START_TIMEOUT_MS: '0' });
  assert.equal(unreachable.code, 1);
  assert.match(unreachable.stderr, /migrate failed \(PostgreSQL at 127\.0\.0\.1:1\/none\): /);
});

test('migrate waits for a PostgreSQL that is not up yet (ASGD_DB_START_TIMEOUT_MS), saying so, and gives up after it', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('runs against PostgreSQL');
  const db = await createTestDatabase();
  t.after(() => db.drop());
  // A port where nothing listens yet; after 1.5 s a forwarder to the real PostgreSQL opens there.
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as AddressInfo).port;
  await new Promise((resolve) => probe.close(resolve));
  const target = new URL(db.url);
  const late = new URL(db.url);
  late.port = String(port);
  const forwarder = createServer((socket) => {
    const upstream = connect(Number(target.port || 5432), target.hostname);
    socket.pipe(upstream).pipe(socket);
    socket.on('error', () => upstream.destroy());
    upstream.on('error', () => socket.destroy());
  });
  t.after(() => new Promise((resolve) => forwarder.close(resolve)));
  const opened = setTimeout(() => forwarder.listen(port, '127.0.0.1'), 1500);
  t.after(() => clearTimeout(opened));
  const started = Date.now();
  const migrated = await runHere(['migrate', '--database-url', late.href], { ASGD_DB_START_TIMEOUT_MS: '20000' });
  assert.equal(migrated.code, 0, migrated.stderr);
  assert.ok(Date.now() - started >= 1400, 'it waited for the database');
  assert.match(migrated.stderr, new RegExp(`waiting for PostgreSQL at 127\\.0\\.0\\.1:${port}/`));
  assert.match(migrated.stdout, /migrations applied \(PostgreSQL\)/);

  // Nothing comes: it gives up after the wait, with the reason.
  const gaveUp = Date.now();
  const never = await runHere(['migrate', '--database-url', 'postgres://postgres@127.0.0.1:1/none'], { ASGD_DB_START_TIMEOUT_MS: '1200' });
  assert.equal(never.code, 1);
  assert.ok(Date.now() - gaveUp >= 1100, 'waited before giving up');
  assert.match(never.stderr, /migrate failed/);
});

test('over a Unix socket (DATABASE_URL host=<directory>): migrate waits for a PostgreSQL that is not up yet, and a request while it is down is 503, not 500', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('runs against PostgreSQL');
  // PostgreSQL removes its socket file while it is down: a connect fails with ENOENT, which was taken for a
  // bug (500, no Retry-After: the Python client gave up) and ended a start at once (an operator's review).
  const db = await createTestDatabase();
  t.after(() => db.drop());
  const dir = await mkdtemp(join(tmpdir(), 'asgd-socket-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const target = new URL(db.url);
  const socketPort = 6543;
  const viaSocket = `postgres://postgres@/${target.pathname.slice(1)}?host=${encodeURIComponent(dir)}&port=${socketPort}`;
  // PostgreSQL at the socket, through a forwarder: "down" is the forwarder closed (Node removes its socket
  // file) with the connections it carried cut.
  const carried = new Set<import('node:net').Socket>();
  const forwarder = createServer((socket) => {
    const upstream = connect(Number(target.port || 5432), target.hostname);
    carried.add(socket);
    socket.on('close', () => carried.delete(socket));
    socket.pipe(upstream).pipe(socket);
    socket.on('error', () => upstream.destroy());
    upstream.on('error', () => socket.destroy());
    socket.on('close', () => upstream.destroy());
  });
  const goDown = () => {
    forwarder.close();
    for (const socket of carried) socket.destroy();
  };
  t.after(goDown);
  const opened = setTimeout(() => forwarder.listen(join(dir, `.s.PGSQL.${socketPort}`)), 1500);
  t.after(() => clearTimeout(opened));
  const started = Date.now();
  const migrated = await runHere(['migrate', '--database-url', viaSocket], { ASGD_DB_START_TIMEOUT_MS: '20000' });
  assert.equal(migrated.code, 0, migrated.stderr);
  assert.ok(Date.now() - started >= 1400, 'it waited for the socket');
  assert.match(migrated.stderr, /waiting for PostgreSQL/);

  // Serving over the socket; then PostgreSQL "goes down" (its socket file gone): a request is 503 with
  // Retry-After, the database unreachable, until it is back.
  const { app } = await buildTestApp(t, { databaseUrl: viaSocket, env: { ASGD_HEALTH_CHECK_INTERVAL_MS: '0' } });
  const created = await app.inject({ method: 'POST', url: '/v1/sessions', payload: { name: 'sock', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
  assert.equal(created.statusCode, 201, created.body);
  goDown();
  const down = await app.inject({ method: 'POST', url: '/v1/sessions/sock/step', payload: { grads: { w: [0.5, 0.5] } } });
  assert.equal(down.statusCode, 503, down.body);
  assert.ok(down.headers['retry-after'], 'with Retry-After');
  assert.match(down.json().message, /database/i, down.body);
  // Back: the step goes through.
  await new Promise<void>((resolve) => forwarder.listen(join(dir, `.s.PGSQL.${socketPort}`), resolve));
  const up = await app.inject({ method: 'POST', url: '/v1/sessions/sock/step', payload: { grads: { w: [0.5, 0.5] } } });
  assert.equal(up.statusCode, 200, up.body);
});

test('migrate, then serve: ready, guarded, healthy, and a clean exit on SIGTERM (the compose sequence)', async (t) => {
  if (TEST_DB_KIND !== 'postgres') return t.skip('runs against PostgreSQL');
  const db = await createTestDatabase();
  t.after(() => db.drop());

  const migrated = await run([BIN, 'migrate'], { DATABASE_URL: db.url });
  assert.equal(migrated.code, 0, migrated.stderr);
  assert.match(migrated.stdout, /migrations applied \(PostgreSQL\): (\d+) now, \1 of \1 in all\n$/);
  const again = await runHere(['migrate', '--database-url', db.url]);
  assert.equal(again.code, 0, 'migrating twice is harmless');
  assert.equal(again.stdout, `asgd-serve: nothing to apply (PostgreSQL): all ${migrated.stdout.match(/(\d+) now/)![1]} migrations were applied before\n`);
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  const tables = (await client.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")).rows.map((r) => r.tablename);
  // A database a newer build migrated: migrate says it applied nothing (and warns), not "migrations applied".
  const known = Number(migrated.stdout.match(/(\d+) now/)![1]);
  await client.query("INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ('from-a-newer-build', 99999999999999)");
  const newer = await runHere(['migrate', '--database-url', db.url]);
  assert.equal(newer.code, 0, newer.stderr);
  assert.equal(newer.stdout, `asgd-serve: nothing to apply (PostgreSQL): the database has ${known + 1} migrations, this build knows ${known}\n`);
  assert.match(newer.stderr, /a newer asgd-serve migrated it/);
  await client.query("DELETE FROM drizzle.__drizzle_migrations WHERE hash = 'from-a-newer-build'");
  await client.end();
  assert.ok(['sessions', 'snapshots', 'step_log', 'tokens'].every((name) => tables.includes(name)), tables.join());

  const child = spawn(process.execPath, [BIN, 'serve', '--port', '0', '--log-level', 'info'], {
    env: { PATH: process.env.PATH ?? '', DATABASE_URL: db.url, ASGD_ADMIN_TOKEN: ADMIN, HOST: '127.0.0.1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line: ${output} ${stderr}`)), 30_000);
    child.stdout.on('data', (d) => {
      output += d;
      const m = /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(output);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
  });
  const base = `http://127.0.0.1:${port}`;
  assert.equal((await fetch(`${base}/healthz`)).status, 200);
  assert.equal((await fetch(`${base}/readyz`)).status, 200);
  assert.equal((await fetch(`${base}/v1/sessions`)).status, 401);
  assert.equal((await fetch(`${base}/v1/sessions`, { headers: { authorization: `Bearer ${ADMIN}` } })).status, 200);
  const healthy = await run(['bin/healthcheck.mjs'], { PORT: String(port) });
  assert.equal(healthy.code, 0, healthy.stderr);

  child.kill('SIGTERM');
  assert.equal(await exited, 0, stderr);
  assert.match(output, /"msg":"closing: finishing in-flight requests"/);
  assert.match(output, /"msg":"closed"/);
  assert.ok(!output.includes(ADMIN), 'the admin token is not logged');
  const down = await run(['bin/healthcheck.mjs'], { PORT: String(port) });
  assert.equal(down.code, 1);
  assert.match(down.stderr, /ECONNREFUSED/);
});

test('a process warning (node-postgres says one about sslmode) is one JSON log line, not multi-line text on stderr', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'asgd-warn-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  // A module that says a two-line warning, as node-postgres does, when the test asks (SIGUSR2), after start.
  const say = encodeURIComponent('process.on("SIGUSR2", () => process.emitWarning("SECURITY WARNING: first line\\nsecond line", "SecurityWarning"))');
  const server = spawnService(process.execPath, [BIN, 'serve', '--port', '0', '--log-level', 'info'],
    { ASGD_DATA_DIR: dir, HOST: '127.0.0.1', NODE_OPTIONS: `--import=data:text/javascript,${say}` });
  t.after(() => server.child.kill('SIGKILL'));
  await server.banner();
  server.child.kill('SIGUSR2');
  await waitFor('the warning', () => server.output().includes('SecurityWarning'), 30_000);
  server.child.kill('SIGTERM');
  assert.equal(await server.exited, 0, server.output());
  // stdout and stderr together: every line is a JSON log line, one of them the warning, whole.
  const lines = server.output().trim().split('\n').map((line) => JSON.parse(line) as { level: number; msg: string; warning?: { name: string; message: string } });
  const warned = lines.filter((l) => l.warning);
  assert.equal(warned.length, 1, server.output());
  assert.equal(warned[0].level, 40);
  assert.equal(warned[0].msg, 'SecurityWarning: SECURITY WARNING: first line');
  assert.deepEqual(warned[0].warning, { name: 'SecurityWarning', message: 'SECURITY WARNING: first line\nsecond line' });
});

// ---- the operator's write commands: sessions import, restore, fork ------------------------------------------
// Against the app listening on a port of this process, on its own database; the commands run through main()
// as the executable runs them (one of them through the executable itself).
describe('sessions import, restore and fork', () => {
  let app: FastifyInstance;
  let url: string;
  let dir: string;
  let dropDb: (() => Promise<void>) | null = null;

  /** A session made from support.ts's body (w [3, 4], b [4]), stepped `steps` times. */
  async function makeSession(name: string, seed: number, steps: number): Promise<void> {
    const created = await app.inject({ method: 'POST', url: '/v1/sessions', headers: asAdmin, payload: sessionBody(name, seed) });
    assert.equal(created.statusCode, 201, created.body);
    for (let k = 0; k < steps; k++) {
      const res = await app.inject({ method: 'POST', url: `/v1/sessions/${name}/step`, headers: asAdmin, payload: gradBody(seed * 10 + k) });
      assert.equal(res.statusCode, 200, res.body);
    }
  }

  async function read<T = Record<string, unknown>>(path: string): Promise<T> {
    const res = await app.inject({ method: 'GET', url: path, headers: asAdmin });
    assert.equal(res.statusCode, 200, res.body);
    return res.json() as T;
  }
  const params = async (name: string) => (await read<{ params: unknown }>(`/v1/sessions/${name}/params`)).params;
  const stateDict = (name: string) => read(`/v1/sessions/${name}/state_dict`);
  const session = (name: string) => read<{ version: number; step: number; keep_snapshots: number; max_staleness: number | null }>(`/v1/sessions/${name}`);

  /** main() in this process, as a script runs it (or on a terminal, with `answer` to its question). */
  const ops = (args: string[], opts: { interactive?: boolean; answer?: string } = {}) => runMain(args, { ...opts, env: { ASGD_URL: url, ASGD_TOKEN: ADMIN } });

  async function download(name: string, flags: string[], file: string): Promise<string> {
    const path = join(dir, file);
    const r = await ops(['sessions', 'download', name, ...flags, '-o', path]);
    assert.equal(r.code, 0, r.stderr);
    return path;
  }

  /** A failure: the exit code, one line on stderr naming the problem, no stack trace, nothing on stdout. */
  const assertFails = (r: Run, code: number, message: RegExp) => assertFailsAs(r, code, message, { oneLine: true });


  before(async () => {
    const db = TEST_DB_KIND === 'postgres' ? await createTestDatabase() : null;
    dropDb = db ? db.drop : null;
    ({ app } = await buildTestApp(null, { env: { ASGD_ADMIN_TOKEN: ADMIN }, databaseUrl: db?.url }));
    url = await app.listen({ port: 0, host: '127.0.0.1' });
    dir = await mkdtemp(join(tmpdir(), 'asgd-cli-writes-'));
    await makeSession('source', 1, 3);
  });

  after(async () => {
    await app?.close();
    await dropDb?.();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('import: a state_dict downloaded as .pt from another session becomes the target\'s; the parameters stay', async () => {
    await makeSession('target', 5, 1);
    const [targetParams, targetVersion] = [await params('target'), (await session('target')).version];
    assert.notDeepEqual(await stateDict('target'), await stateDict('source'), 'control: the two differ before');
    const file = await download('source', ['--what', 'state_dict', '--format', 'pt'], 'source-sd.pt');

    const stale = await ops(['sessions', 'import', 'target', file, '--if-match', String(targetVersion - 1)]);
    assertFails(stale, 1, /VERSION_MISMATCH/);
    assert.equal((await session('target')).version, targetVersion, 'a refused import changes nothing');

    const r = await ops(['sessions', 'import', 'target', file, '--if-match', String(targetVersion)]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `loaded state_dict from ${file} into target: version ${targetVersion + 1} (step 3)\n`);
    assert.deepEqual(await stateDict('target'), await stateDict('source'));
    assert.deepEqual(await params('target'), targetParams, 'a state_dict leaves the parameters alone (it went to PUT state_dict)');

    // The service's safetensors layout of a state_dict, through the executable, for a script (--json).
    await makeSession('target-st', 6, 2);
    const st = await download('source', ['--what', 'state_dict', '--format', 'safetensors'], 'source-sd.safetensors');
    const viaBin = await run([BIN, 'sessions', 'import', 'target-st', st, '--json'], { ASGD_URL: url, ASGD_TOKEN: ADMIN });
    assert.equal(viaBin.code, 0, viaBin.stderr);
    const answer = JSON.parse(viaBin.stdout);
    assert.equal(answer.name, 'target-st');
    assert.equal(answer.version, (await session('target-st')).version);
    assert.deepEqual(await stateDict('target-st'), await stateDict('source'));
  });

  test('import: a checkpoint replaces parameters and optimizer state; parameters files go to PUT params', async () => {
    await makeSession('restored', 7, 0);
    assert.notDeepEqual(await params('restored'), await params('source'), 'control');
    const checkpoint = await download('source', ['--format', 'pt'], 'source-checkpoint.pt');
    const r = await ops(['sessions', 'import', 'restored', checkpoint]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^loaded checkpoint from ${checkpoint} into restored: version 2 \\(step 3\\)\n$`));
    assert.deepEqual(await params('restored'), await params('source'));
    assert.deepEqual(await stateDict('restored'), await stateDict('source'));
    assert.equal((await session('restored')).step, 3);

    // Parameters: safetensors, a .pt model state_dict, and JSON as download writes it (with session, version, step beside them).
    for (const [i, flags] of [['--format', 'safetensors'], ['--format', 'pt', '--what', 'params'], ['--format', 'json', '--what', 'params']].entries()) {
      const name = `weights-${i}`;
      await makeSession(name, 20 + i, 1);
      const before = await stateDict(name);
      const file = await download('source', flags, `source-params-${i}`);
      const loaded = await ops(['sessions', 'import', name, file]);
      assert.equal(loaded.code, 0, loaded.stderr);
      assert.match(loaded.stdout, /^loaded params from .* version 3 \(step 1\)\n$/, flags.join(' '));
      assert.deepEqual(await params(name), await params('source'), flags.join(' '));
      assert.deepEqual((await stateDict(name)).param_groups, before.param_groups, 'the optimizer state stays');
    }
    // --what says which route: a checkpoint's JSON sent as a checkpoint.
    await makeSession('forced', 30, 0);
    const json = await download('source', ['--format', 'json'], 'source-checkpoint.json');
    const forced = await ops(['sessions', 'import', 'forced', json, '--what', 'checkpoint']);
    assert.equal(forced.code, 0, forced.stderr);
    assert.deepEqual(await params('forced'), await params('source'));
    // PyTorch's tutorial layout in a torch.save file ({model_state_dict, optimizer_state_dict, epoch, loss,
    // and here step}) is a checkpoint too.
    await makeSession('tutorial', 31, 0);
    const saved = readTorchSave(await readFile(checkpoint)) as PyDict;
    const tutorial = join(dir, 'tutorial-checkpoint.pt');
    await writeFile(tutorial, torchSaveToBuffer(new PyDict([
      ['epoch', 4n], ['model_state_dict', saved.get('model')!], ['optimizer_state_dict', saved.get('optimizer')!], ['loss', 0.25], ['step', saved.get('step')!],
    ])));
    const fromTutorial = await ops(['sessions', 'import', 'tutorial', tutorial]);
    assert.equal(fromTutorial.code, 0, fromTutorial.stderr);
    assert.match(fromTutorial.stdout, /^loaded checkpoint from .*tutorial-checkpoint\.pt into tutorial: version 2 \(step 3\)\n$/);
    assert.deepEqual(await params('tutorial'), await params('source'));
    assert.deepEqual(await stateDict('tutorial'), await stateDict('source'));
  });

  test('import: bad input is a usage error naming it; the service\'s refusals print its code', async () => {
    const sd = await download('source', ['--what', 'state_dict', '--format', 'pt'], 'errors-sd.pt');
    const before = await session('source');
    assertFails(await ops(['sessions', 'import', 'source']), 2, /sessions import: missing FILE/);
    assertFails(await ops(['sessions', 'import']), 2, /sessions import: missing NAME FILE/);
    assertFails(await ops(['sessions', 'import', 'source', join(dir, 'no-such.pt')]), 2, /cannot read .*no-such\.pt: no such file/);
    await mkdir(join(dir, 'a-dir'));
    assertFails(await ops(['sessions', 'import', 'source', join(dir, 'a-dir')]), 2, /cannot read .*a-dir: it is a directory/);
    assertFails(await ops(['sessions', 'import', 'source', sd, '--what', 'weights']), 2, /--what must be one of checkpoint, state_dict, params/);
    assertFails(await ops(['sessions', 'import', 'source', sd, '--if-match', 'latest']), 2, /--if-match: must be a whole number/);
    const files: [string, string | Buffer, RegExp][] = [
      ['empty.pt', '', /empty\.pt is empty/],
      ['notes.txt', 'not a model\n', /notes\.txt is not a torch\.save file, safetensors or JSON/],
      ['broken.pt', Buffer.concat([Buffer.from('PK\x03\x04'), Buffer.alloc(60, 7)]), /broken\.pt is not a readable torch\.save file: /],
      ['other.json', '{"weights": [1, 2]}', /cannot tell what .*other\.json holds \(an object with keys weights\): pass --what checkpoint\|state_dict\|params/],
      ['bad.json', '{"state": ', /bad\.json is not valid JSON/],
      ['array.json', ' [1, 2]', /array\.json holds a JSON array, not an object \(a state_dict, a checkpoint or \{"params": \.\.\.\}\)/],
    ];
    for (const [name, content, message] of files) {
      await writeFile(join(dir, name), content);
      assertFails(await ops(['sessions', 'import', 'source', join(dir, name)]), 2, message);
    }
    assertFails(await ops(['sessions', 'import', 'source', join(dir, 'notes.txt'), '--what', 'checkpoint']), 2, /not a torch\.save file, safetensors or JSON/);
    assert.equal((await session('source')).version, before.version, 'nothing was loaded');

    assertFails(await ops(['sessions', 'import', 'nowhere', sd]), 3, /^asgd-serve: session "nowhere" does not exist \(SESSION_NOT_FOUND\)\n$/);
    // A state_dict of other parameters: refused by the service, its code printed (400: a usage error).
    const small = await app.inject({ method: 'POST', url: '/v1/sessions', headers: asAdmin, payload: { name: 'small', params: [{ name: 'w', shape: [2], data: [1, 2] }] } });
    assert.equal(small.statusCode, 201, small.body);
    assertFails(await ops(['sessions', 'import', 'small', sd]), 2, /doesn.t match the size of optimizer.s group \(2 ids; the session.s group has 1\) \(STATE_DICT_MISMATCH\)\n$/);
  });

  test('restore: asks on a terminal, needs --yes in a script, and brings the snapshot\'s parameters back', async () => {
    await makeSession('rollback', 40, 2);
    const snap = await ops(['sessions', 'snapshot', 'rollback', '--json']);
    assert.equal(snap.code, 0, snap.stderr);
    const { id, version: snapVersion } = JSON.parse(snap.stdout) as { id: number; version: number };
    const atSnapshot = await params('rollback');
    const stateAtSnapshot = await stateDict('rollback');
    for (let k = 0; k < 2; k++) assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/rollback/step', headers: asAdmin, payload: gradBody(90 + k) })).statusCode, 200);
    const stepped = await params('rollback');
    assert.notDeepEqual(stepped, atSnapshot, 'control: the steps moved the parameters');
    const current = await session('rollback');

    assertFails(await ops(['sessions', 'restore', 'rollback', '--snapshot', String(id)]), 2, /not on a terminal: pass --yes/);
    const declined = await ops(['sessions', 'restore', 'rollback', '--snapshot', String(id)], { interactive: true, answer: 'n' });
    assert.equal(declined.code, 2);
    assert.equal(declined.stderr, 'not restored\n');
    assert.equal(declined.asked[0], `Restore session "rollback" (version ${current.version}, step ${current.step}) to snapshot ${id} (version ${snapVersion}, step 2)? Its state becomes a new version. [y/N] `);
    assert.deepEqual(await params('rollback'), stepped, 'declined: unchanged');

    const confirmed = await ops(['sessions', 'restore', 'rollback', '--snapshot', String(id)], { interactive: true, answer: 'y' });
    assert.equal(confirmed.code, 0, confirmed.stderr);
    assert.equal(confirmed.stdout, `restored rollback to snapshot ${id} (version ${snapVersion}): version ${current.version + 1} (step 2)\n`);
    assert.deepEqual(await params('rollback'), atSnapshot, 'the snapshot\'s exact values');
    assert.deepEqual(await stateDict('rollback'), stateAtSnapshot);

    const scripted = await ops(['sessions', 'restore', 'rollback', '--snapshot', String(id), '--yes', '--json', '--if-match', String(current.version + 1)]);
    assert.equal(scripted.code, 0, scripted.stderr);
    assert.equal(JSON.parse(scripted.stdout).version, current.version + 2);
    assertFails(await ops(['sessions', 'restore', 'rollback', '--snapshot', String(id), '--yes', '--if-match', '1']), 1, /VERSION_MISMATCH/);

    assertFails(await ops(['sessions', 'restore', 'rollback', '--yes']), 2, /say which snapshot with --snapshot ID/);
    assertFails(await ops(['sessions', 'restore', 'rollback', '--version', '2', '--yes']), 2, /restores snapshots, not versions/);
    assertFails(await ops(['sessions', 'restore', 'rollback', '--snapshot', '999999', '--yes']), 3, /\(SNAPSHOT_NOT_FOUND\)/);
    assertFails(await ops(['sessions', 'restore', 'nowhere', '--snapshot', String(id), '--yes']), 3, /session "nowhere" does not exist \(SESSION_NOT_FOUND\)/);
  });

  test('fork: a new session with the source\'s parameters, from its current state or a snapshot', async () => {
    const r = await ops(['sessions', 'fork', 'source', 'copy']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'forked source into copy: version 1, step 3, 2 tensors, 16 elements\n');
    assert.deepEqual(await params('copy'), await params('source'));
    assert.deepEqual(await stateDict('copy'), await stateDict('source'));

    const snap = JSON.parse((await ops(['sessions', 'snapshot', 'source', '--json'])).stdout) as { id: number };
    const atSnapshot = await params('source');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/sessions/source/step', headers: asAdmin, payload: gradBody(77) })).statusCode, 200);
    const fromSnapshot = await ops(['sessions', 'fork', 'source', 'copy-2', '--snapshot', String(snap.id), '--keep-snapshots', '3', '--max-staleness', '4', '--json']);
    assert.equal(fromSnapshot.code, 0, fromSnapshot.stderr);
    assert.equal(JSON.parse(fromSnapshot.stdout).name, 'copy-2');
    assert.deepEqual(await params('copy-2'), atSnapshot);
    assert.notDeepEqual(await params('copy-2'), await params('source'), 'control: the source stepped on');
    const settings = await session('copy-2');
    assert.deepEqual([settings.keep_snapshots, settings.max_staleness], [3, 4]);

    assertFails(await ops(['sessions', 'fork', 'source', 'copy']), 1, /session "copy" already exists \(SESSION_EXISTS\)/);
    assertFails(await ops(['sessions', 'fork', 'nowhere', 'copy-3']), 3, /\(SESSION_NOT_FOUND\)/);
    assertFails(await ops(['sessions', 'fork', 'source']), 2, /sessions fork: missing NEW_NAME/);
    assertFails(await ops(['sessions', 'fork', 'source', 'copy-3', '--version', '2']), 2, /forks the current state or a snapshot/);
    assertFails(await ops(['sessions', 'fork', 'source', 'copy-3', '--max-staleness', 'some']), 2, /--max-staleness: must be a whole number >= 0 or none/);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/sessions/copy-3', headers: asAdmin })).statusCode, 404);
  });

  test('help and the unknown-command message list import, restore and fork', async () => {
    const help = await ops(['sessions', '--help']);
    assert.equal(help.code, 0);
    for (const line of [/sessions import NAME FILE \[--what checkpoint\|state_dict\|params\] \[--if-match VERSION\]/, /sessions restore NAME --snapshot ID \[--yes\]/, /sessions fork NAME NEW_NAME \[--snapshot ID\]/]) {
      assert.match(help.stdout, line);
    }
    const unknown = await ops(['sessions', 'upload', 'x']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /unknown command "upload" \(ls, show, rm, snapshot, download, import, restore, fork\)/);
    assert.match((await runHere(['--help'])).stdout, /sessions\s+ls, show, rm, snapshot, download, import, restore, fork:/);
  });
});
