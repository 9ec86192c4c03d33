// The environment is checked once at start: a value the service cannot use stops it, naming the variable.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError, loadConfig } from '../src/config.ts';
import { databaseTarget } from '../src/db/wait.ts';

test('durations a Node timer cannot wait (over 2^31 - 1 ms, which fire after 1 ms) are refused, naming the variable', () => {
  for (const key of ['ASGD_SWEEP_INTERVAL_MS', 'ASGD_HEALTH_CHECK_INTERVAL_MS', 'ASGD_SHUTDOWN_TIMEOUT_MS', 'ASGD_REQUEST_TIMEOUT_MS', 'ASGD_MAX_EVENT_LOOP_DELAY_MS']) {
    assert.throws(() => loadConfig({ [key]: '2147483648' }), (err: Error) => err instanceof ConfigError && err.message.startsWith(`${key} must be between`), key);
    assert.doesNotThrow(() => loadConfig({ [key]: '2147483647' }), key);
  }
  // Found by an operator's review: 5 ms failed every start as "waiting for PostgreSQL", the database healthy.
  assert.throws(() => loadConfig({ ASGD_DB_TIMEOUT_MS: '5' }), (err: Error) => err instanceof ConfigError && /^ASGD_DB_TIMEOUT_MS must be 0 \(no timeout\) or at least 100, got 5/.test(err.message));
  for (const ok of ['0', '100', '30000']) assert.equal(loadConfig({ ASGD_DB_TIMEOUT_MS: ok }).dbTimeoutMs, Number(ok));
  // No grace at all is not a shutdown: SIGKILL is that.
  assert.throws(() => loadConfig({ ASGD_SHUTDOWN_TIMEOUT_MS: '0' }), /ASGD_SHUTDOWN_TIMEOUT_MS must be between 1 and/);
});

test('ASGD_TRUST_PROXY takes IP addresses and CIDRs, a hop count or a boolean; anything else is refused', () => {
  assert.deepEqual(loadConfig({ ASGD_TRUST_PROXY: '10.0.0.0/8, ::1, 192.168.1.7, fd00::/8' }).trustProxy, ['10.0.0.0/8', '::1', '192.168.1.7', 'fd00::/8']);
  assert.equal(loadConfig({ ASGD_TRUST_PROXY: '1' }).trustProxy, 1);
  assert.equal(loadConfig({ ASGD_TRUST_PROXY: 'true' }).trustProxy, true);
  for (const bad of ['abc', '100', '10.0.0.0/33', '::1/129', '10.0.0.1/8/8', '999.1.1.1']) {
    assert.throws(() => loadConfig({ ASGD_TRUST_PROXY: bad }), /: ASGD_TRUST_PROXY: .* is not an IP address or CIDR/, bad);
  }
});

test('HOST as a URL writes an IPv6 address ([::1]) is listened on as the address', () => {
  assert.equal(loadConfig({ HOST: '[::1]' }).host, '::1');
  assert.equal(loadConfig({ HOST: '::1' }).host, '::1');
});

test("DATABASE_URL's sslmode is one node-postgres knows; another is refused naming it (it was taken as TLS on)", () => {
  assert.throws(() => loadConfig({ DATABASE_URL: 'postgres://u:secret@db/x?sslmode=bogus' }),
    (err: Error) => err instanceof ConfigError && /^DATABASE_URL's sslmode must be one of disable, prefer, require, verify-ca, verify-full, no-verify; it is "bogus"$/.test(err.message));
  for (const mode of ['disable', 'require', 'verify-full', 'no-verify']) {
    assert.equal(loadConfig({ DATABASE_URL: `postgres://db/x?sslmode=${mode}` }).databaseUrl, `postgres://db/x?sslmode=${mode}`);
  }
});

test('DATABASE_URL must be a PostgreSQL URL; the message names the variable and never repeats the value (a password)', () => {
  for (const bad of ['notaurl', 'mysql://u:secret@127.0.0.1/db', 'http://u:secret@h/db', 'postgres://', 'postgres://u:secret@/db', 'postgres://u:secret@/db?host=']) {
    assert.throws(() => loadConfig({ DATABASE_URL: bad }), (err: Error) => err instanceof ConfigError && /^DATABASE_URL must/.test(err.message) && !err.message.includes('secret'), bad);
  }
  for (const good of ['postgres://u:p@127.0.0.1:5432/db', 'postgresql://h/db?sslmode=require', 'socket:/var/run/postgresql?db=x', '/var/run/postgresql db',
    'postgres://u@/db?host=/var/run/postgresql', 'postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql&sslmode=disable']) {
    assert.equal(loadConfig({ DATABASE_URL: good }).databaseUrl, good);
  }
  assert.equal(loadConfig({ DATABASE_URL: '  ' }).databaseUrl, null);
  // Log lines name the target, never the password: libpq's socket form names the socket directory.
  assert.equal(databaseTarget('postgres://u:secret@/db?host=%2Ftmp%2Fpg'), '/tmp/pg/db');
  assert.equal(databaseTarget('postgres://u:secret@h:6543/db'), 'h:6543/db');
});

test('replay points: 64 MiB of log on PostgreSQL, off on the embedded database, as set when set; a bad value is refused', () => {
  assert.equal(loadConfig({ DATABASE_URL: 'postgres://127.0.0.1/x' }).replayBoundBytes, 64 * 1024 * 1024);
  assert.equal(loadConfig({}).replayBoundBytes, 0);
  assert.equal(loadConfig({ ASGD_REPLAY_BOUND_BYTES: '1048576' }).replayBoundBytes, 1048576);
  assert.equal(loadConfig({ DATABASE_URL: 'postgres://127.0.0.1/x', ASGD_REPLAY_BOUND_BYTES: '0' }).replayBoundBytes, 0);
  assert.throws(() => loadConfig({ ASGD_REPLAY_BOUND_BYTES: '-1' }), (err: Error) => err instanceof ConfigError && err.message.startsWith('ASGD_REPLAY_BOUND_BYTES'));
});

test('HOST must be an IP address or a host name: refused at start, naming HOST, before the database is touched', () => {
  for (const good of ['0.0.0.0', '127.0.0.1', '::', 'localhost', 'asgd.internal', 'my-host.example.com.']) {
    const admin = { ASGD_ADMIN_TOKEN: 'x'.repeat(16) };
    assert.equal(loadConfig({ HOST: good, ...admin }).host, good);
  }
  for (const bad of ['not a host!', '999.1.1.1', '1.2.3', 'host_name', '-lead.example', 'a'.repeat(64), 'http://h', 'h:8080']) {
    assert.throws(() => loadConfig({ HOST: bad, ASGD_ADMIN_TOKEN: 'x'.repeat(16) }), (err: Error) => err instanceof ConfigError && err.message.startsWith('HOST must be'), bad);
  }
});

test('defaults of session settings hold the bounds the API holds them to; the Idempotency-Key window at most ten years', () => {
  const cases: [string, string, string][] = [
    ['ASGD_SNAPSHOT_EVERY', '1000000', '1000001'], ['ASGD_KEEP_SNAPSHOTS', '100000', '100001'],
    ['ASGD_EXPIRE_AFTER_IDLE_S', '2147483647', '2147483648'], ['ASGD_IDEMPOTENCY_WINDOW_SECONDS', '315360000', '300000000000'],
  ];
  for (const [key, highest, over] of cases) {
    assert.doesNotThrow(() => loadConfig({ [key]: highest }), key);
    assert.throws(() => loadConfig({ [key]: over }), (err: Error) => err instanceof ConfigError && err.message.startsWith(`${key} must be between`), key);
  }
});

test('ASGD_MIN_FREE_BYTES is 0 or at least two 16 MiB WAL segments: a lower guard let the embedded database hang out of room (an operator\'s review)', () => {
  for (const value of ['1', '1048576', String(32 * 1024 * 1024 - 1)]) {
    assert.throws(() => loadConfig({ ASGD_MIN_FREE_BYTES: value }), (err: Error) => err instanceof ConfigError && /^ASGD_MIN_FREE_BYTES must be 0 \(no guard\) or at least 33554432 /.test(err.message), value);
  }
  assert.equal(loadConfig({ ASGD_MIN_FREE_BYTES: '0' }).minFreeBytes, 0);
  assert.equal(loadConfig({ ASGD_MIN_FREE_BYTES: String(32 * 1024 * 1024) }).minFreeBytes, 32 * 1024 * 1024);
  assert.equal(loadConfig({}).minFreeBytes, 64 * 1024 * 1024);
});
