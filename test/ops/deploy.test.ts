// The Dockerfile, docker-compose.yml and nginx config cannot run here (no Docker engine), so they are held
// to what can be checked: they run exactly the commands test/ops/cli.test.ts runs, they only set
// variables the service reads, and their limits agree with the service's.
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { test } from 'node:test';
import { buildApp } from '../../src/app.ts';
import { FLAGS, parseArgs } from '../../src/cli.ts';
import { isLoopback, loadConfig } from '../../src/config.ts';
import { MAX_WAIT_SECONDS } from '../../src/routes/sessions/step.ts';
import { startScriptNodeOptions, startScriptTunables } from './support.ts';

const read = (path: string) => readFileSync(path, 'utf8');
const SERVICE_VARIABLES = new Set(FLAGS.map((f) => f.env));
/** Variables only docker compose itself uses. */
const COMPOSE_ONLY = new Set(['POSTGRES_USER', 'POSTGRES_PASSWORD', 'POSTGRES_DB', 'ASGD_APP_PASSWORD', 'ASGD_PUBLIC_ADDRESS', 'ASGD_PUBLIC_PORT']);
/** A value of docker-compose.yml as compose makes it when .env sets nothing: `${X:-default}` -> default. */
/** A compose value with its ${VAR:-default}s as their defaults and its required ${VAR:?message}s as a stand-in value. */
const withDefaults = (value: string) => value.replace(/\$\{[A-Z_]+:-([^}]*)\}/g, '$1').replace(/\$\{[A-Z_]+:\?[^}]*\}/g, 'required');
/** A service's lines in docker-compose.yml. */
function composeService(compose: string, name: string): string {
  const m = new RegExp(`^  ${name}:\\n((?:    .*\\n|\\n)*)`, 'm').exec(compose);
  assert.ok(m, `service ${name}`);
  return m[1];
}
/** Docker's byte sizes: 512m, 4g, 4GiB. */
function bytesOf(size: string): number {
  const m = /^(\d+)\s*([kmg]?)(?:i?b)?$/i.exec(size.trim());
  assert.ok(m, `a size: ${size}`);
  return Number(m[1]) * 1024 ** ' kmg'.indexOf((m[2] || ' ').toLowerCase());
}
const MiB = 1024 ** 2;

test('the image runs the tested commands as a non-root user, with production dependencies and a node health check', () => {
  const dockerfile = read('Dockerfile');
  const stages = dockerfile.split(/^FROM /m).slice(1);
  assert.ok(stages.length >= 2, 'multi-stage');
  const runtime = stages[stages.length - 1];
  assert.match(runtime, /^node:24-slim\s/);
  assert.match(dockerfile, /npm ci --omit=dev/);
  assert.match(runtime, /^USER node$/m);
  assert.match(runtime, /^HEALTHCHECK .*CMD \["node", "bin\/healthcheck\.mjs"\]$/m);
  // A first start on a fresh embedded data directory logs that it can take up to a minute (src/plugins/db.ts):
  // a replica must not be marked unhealthy, and nginx held back, while it is still initialising.
  const startPeriod = Number(/^HEALTHCHECK .*--start-period=(\d+)s/m.exec(runtime)?.[1]);
  assert.ok(startPeriod >= 90, `start period ${startPeriod} s leaves a one-minute first start little margin`);
  assert.doesNotMatch(dockerfile, /curl|wget/);
  assert.match(runtime, /^ENTRYPOINT \["node", "bin\/asgd-serve\.mjs"\]$/m);
  const cmd = JSON.parse(/^CMD (\[.*\])$/m.exec(runtime)![1]) as string[];
  assert.equal(parseArgs(cmd, {}).command, 'serve');
  // The runtime gets the type-checked sources from the build stage (so the check cannot be skipped).
  assert.match(runtime, /COPY --from=build \/app\/src \.\/src/);
  assert.match(stages[0], /tsc --noEmit/);
  // Every ENV the image sets is a service variable (or glibc's malloc settings, as npm start has them), and
  // the defaults it sets load.
  const { GLIBC_TUNABLES: tunables, NODE_OPTIONS: nodeOptions, ...env } = Object.fromEntries([...runtime.matchAll(/^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$/gm)].map((m) => [m[1], m[2]]));
  assert.deepEqual(Object.keys(env).sort(), ['ASGD_DATA_DIR', 'HOST', 'PORT']);
  assert.equal(tunables, startScriptTunables());
  assert.equal(nodeOptions, startScriptNodeOptions());
  assert.equal(nodeOptions, '--max-semi-space-size=32');
  for (const key of Object.keys(env)) assert.ok(SERVICE_VARIABLES.has(key), key);
  assert.throws(() => loadConfig(env), /refusing to listen on 0\.0\.0\.0/, 'the image needs a token to start');
  assert.equal(loadConfig({ ...env, ASGD_ADMIN_TOKEN: 'x'.repeat(32) }).host, '0.0.0.0');
  const ignored = read('.dockerignore').split('\n');
  for (const path of ['.env', 'node_modules', '.git']) assert.ok(ignored.includes(path), `.dockerignore has ${path}`);
});

test('docker-compose.yml: PostgreSQL 15 with a volume and a health check, a one-shot migrate, three replicas, one port', () => {
  const compose = read('docker-compose.yml');
  const service = (name: string) => {
    const m = new RegExp(`^  ${name}:\\n((?:    .*\\n|\\n)*)`, 'm').exec(compose);
    assert.ok(m, `service ${name}`);
    return m[1];
  };
  const postgres = service('postgres');
  assert.match(postgres, /image: postgres:15\n/);
  assert.match(postgres, /- pgdata:\/var\/lib\/postgresql\/data/);
  assert.match(postgres, /healthcheck:\n\s+test: \["CMD-SHELL", "pg_isready/);
  assert.match(compose, /^volumes:\n  pgdata:/m);

  const migrate = service('migrate');
  assert.equal(parseArgs(JSON.parse(/command: (\[.*\])/.exec(migrate)![1]), {}).command, 'migrate');
  assert.match(migrate, /postgres:\n\s+condition: service_healthy/);
  assert.match(migrate, /restart: "no"/);

  const asgd = service('asgd');
  assert.equal(parseArgs(JSON.parse(/command: (\[.*\])/.exec(asgd)![1]), {}).command, 'serve');
  assert.match(asgd, /replicas: 3\n/);
  assert.match(asgd, /migrate:\n\s+condition: service_completed_successfully/);
  assert.doesNotMatch(asgd, /ports:/, 'replicas are reachable only through the proxy');
  const grace = Number(/stop_grace_period: (\d+)s/.exec(asgd)![1]);
  assert.ok(grace * 1000 > loadConfig({}).shutdownTimeoutMs, 'docker waits longer than the service drains');

  const proxy = service('proxy');
  assert.match(proxy, /image: nginx:1\.(2[8-9]|[3-9]\d)/, 'nginx with `resolve` in upstreams');
  assert.equal((compose.match(/^\s+ports:/gm) ?? []).length, 1, 'one published port');
  // Plain HTTP carries the bearer tokens: by default only this machine reaches it (a TLS terminator forwards).
  const published = /ports:\n\s+- "(.*)"/.exec(proxy)![1];
  assert.match(published, /\$\{ASGD_PUBLIC_PORT:-8080\}:8080$/);
  const [address, port] = withDefaults(published).split(':');
  assert.ok(isLoopback(address), `published on ${address}`);
  assert.equal(port, '8080');

  // Both app services get the shared block: the env file, the database URL and the listen address.
  assert.match(compose, /x-asgd: &asgd\n(?:  .*\n)*  env_file: \.env\n/);
  for (const block of [migrate, asgd]) assert.match(block, /<<: \*asgd/);
  const environment = /x-asgd: &asgd\n(?:  .*\n)*?  environment: &asgd-env\n((?:    .*\n)+)/.exec(compose)![1];
  const variables = [...environment.matchAll(/^    ([A-Z_]+):/gm)].map((m) => m[1]);
  assert.ok(variables.includes('DATABASE_URL') && variables.includes('HOST'));
  // The passwords .env holds for compose are blanked in the containers: a replica's environment must not
  // carry the owner's (superuser) password (found by an operator's review).
  for (const secret of ['POSTGRES_PASSWORD', 'ASGD_APP_PASSWORD']) assert.match(environment, new RegExp(`^    ${secret}: ""$`, 'm'), `${secret} blanked`);
  for (const key of variables) assert.ok(SERVICE_VARIABLES.has(key) || key === 'POSTGRES_PASSWORD' || key === 'ASGD_APP_PASSWORD', `${key} is read by src/config.ts`);

  // Two roles: the replicas log in as asgd_app (made by the init script the postgres image runs on a new
  // volume; test/db/least-privilege.test.ts runs it), migrate as the owner.
  const urlUser = (block: string) => /DATABASE_URL: postgres:\/\/([^:]+):/.exec(block)?.[1];
  assert.equal(urlUser(environment), 'asgd_app');
  assert.match(migrate, /environment:\n\s+<<: \*asgd-env\n/);
  assert.equal(urlUser(migrate), /POSTGRES_USER: (\S+)/.exec(postgres)![1], 'migrate runs as the owner');
  assert.match(postgres, /- \.\/deploy\/postgres-init:\/docker-entrypoint-initdb\.d:ro/);
  assert.match(postgres, /ASGD_APP_PASSWORD: \$\{ASGD_APP_PASSWORD:\?/);
  assert.ok(statSync('deploy/postgres-init/10-serving-role.sh').mode & 0o111, 'the init script is executable');
});

test('docker-compose.yml: every service has a memory limit; a replica with a full cache and the largest body stays under its RSS guard, and the guard under the limit', () => {
  const compose = read('docker-compose.yml');
  const limits = Object.fromEntries(['postgres', 'migrate', 'asgd', 'proxy'].map((name) => {
    const memory = /deploy:\n(?:      .*\n)*?      resources:\n        limits:\n(?:          #.*\n)*          memory: (\S+)\n/.exec(composeService(compose, name));
    assert.ok(memory, `${name} has deploy.resources.limits.memory`);
    return [name, bytesOf(memory[1])];
  }));
  // The service as a replica starts it, with compose's defaults.
  const environment = /x-asgd: &asgd\n(?:  .*\n)*?  environment: &asgd-env\n((?:    .*\n)+)/.exec(compose)![1];
  const env = Object.fromEntries([...environment.matchAll(/^    ([A-Z_]+): (.*)$/gm)].map((m) => [m[1], withDefaults(m[2]).replace(/^"(.*)"$/, '$1')]));
  const config = loadConfig({ ...env, ASGD_ADMIN_TOKEN: 'x'.repeat(32) });
  // Measured (review-ops 14): 197 MB at rest; creating a session of P bytes of parameters peaks about 6 P
  // higher (2.5e7 parameters: 765 MB). A full cache plus the largest body stays under the RSS guard, and the
  // guard (503 to new requests) comes before the container's limit (the kernel kills the replica).
  const atRest = 200 * MiB;
  const peakPerBodyByte = 6;
  assert.ok(config.maxRssBytes > 0, 'ASGD_MAX_RSS_BYTES is on');
  assert.ok(config.maxRssBytes < limits.asgd, 'the RSS guard answers 503 before the memory limit kills');
  const biggestBody = Math.max(config.bodyLimitCreate, config.bodyLimitStep, config.bodyLimitJson);
  assert.ok(atRest + config.cacheBytes + peakPerBodyByte * biggestBody <= config.maxRssBytes,
    `a full cache (${config.cacheBytes / MiB} MiB) and a ${biggestBody / MiB} MiB body fit under ${config.maxRssBytes / MiB} MiB`);
  // .env.example shows the same numbers as compose's defaults (what an operator edits, and scales together).
  const example = Object.fromEntries([...read('.env.example').matchAll(/^# ([A-Z_]+)=(.*)$/gm)].map((m) => [m[1], m[2]]));
  for (const key of ['ASGD_CACHE_BYTES', 'ASGD_MAX_RSS_BYTES', 'ASGD_BODY_LIMIT_CREATE', 'ASGD_BODY_LIMIT_STEP']) {
    assert.equal(example[key], env[key], `.env.example ${key}`);
  }
});

test('.env.example names only variables the service or compose read, and starts nothing without a token', () => {
  const lines = read('.env.example').split('\n');
  const keys = lines.map((l) => /^#?\s?([A-Z][A-Z0-9_]+)=/.exec(l)?.[1]).filter((k): k is string => !!k);
  assert.ok(keys.includes('ASGD_ADMIN_TOKEN') && keys.includes('POSTGRES_PASSWORD') && keys.includes('ASGD_APP_PASSWORD'));
  for (const key of keys) assert.ok(SERVICE_VARIABLES.has(key) || COMPOSE_ONLY.has(key), `${key} is not a variable anything reads`);
  // The committed example holds no secret: an unfilled copy makes the service refuse to start.
  const values = Object.fromEntries(lines.filter((l) => /^[A-Z]/.test(l)).map((l) => l.split('=', 2) as [string, string]));
  assert.equal(values.ASGD_ADMIN_TOKEN, '');
  assert.throws(() => loadConfig({ ...values, HOST: '0.0.0.0' }), /without authentication/);
  assert.ok(read('.gitignore').split('\n').includes('.env'), '.env is never committed');
});

test('nginx: no body limit of its own, timeouts above the service request timeout, all replicas', () => {
  const nginx = read('deploy/nginx.conf');
  assert.match(nginx, /client_max_body_size 0;/);
  assert.match(nginx, /proxy_request_buffering off;/);
  const readTimeout = Number(/proxy_read_timeout (\d+)s;/.exec(nginx)![1]);
  assert.ok(readTimeout * 1000 > loadConfig({}).requestTimeoutMs);
  // A round's contribution is held up to ?wait= seconds, past the request timeout: its route waits longer
  // (a review: nginx's 504 after 310 s where the service answers 202).
  const [, stepLocation, stepTimeout] = /location ~ (\S+) \{[^}]*proxy_read_timeout (\d+)s;/.exec(nginx) ?? [];
  assert.ok(Number(stepTimeout) > MAX_WAIT_SECONDS, `step read timeout ${stepTimeout}`);
  // Every spelling of the step's path the service takes (a trailing slash too: an operator's review), and no other route.
  const stepPath = new RegExp(stepLocation);
  for (const path of ['/v1/sessions/demo/step', '/v1/sessions/demo/step/', '/v1/sessions/a.b_c-1/step']) assert.match(path, stepPath);
  for (const path of ['/v1/sessions/demo/params', '/v1/sessions/demo/step/x', '/v1/sessions/step']) assert.doesNotMatch(path, stepPath);
  assert.match(nginx, /server asgd:8080 resolve;/);
  assert.match(nginx, /resolver 127\.0\.0\.11/);
  assert.doesNotMatch(nginx, /non_idempotent/, 'steps are not replayed by the proxy');
  // The edge proxy replaces a client's X-Forwarded-For, and the service trusts that one hop only.
  assert.match(nginx, /proxy_set_header X-Forwarded-For \$remote_addr;/);
  assert.doesNotMatch(nginx, /proxy_add_x_forwarded_for/);
  assert.match(read('docker-compose.yml'), /ASGD_TRUST_PROXY: "1"/);
  // A shutting-down replica's 503 goes to one other replica; a database outage's (every replica) is not
  // sent round all of them.
  assert.match(nginx, /proxy_next_upstream error timeout http_503;/);
  assert.match(nginx, /proxy_next_upstream_tries 2;/);
});

test('nginx does not pass /metrics to the public port, and the service serves metrics at no other spelling', async (t) => {
  // /metrics names every session and its stored bytes, and is open by default (ASGD_METRICS_REQUIRE_TOKEN).
  const nginx = read('deploy/nginx.conf');
  assert.match(nginx, /location = \/metrics \{\s*return 404;\s*\}/);
  // nginx matches after decoding %XX and merging slashes; the spellings it would still pass on get no metrics.
  const app = await buildApp({ config: loadConfig({ ASGD_DATA_DIR: 'memory://', LOG_LEVEL: 'silent', ASGD_HEALTH_CHECK_INTERVAL_MS: '0' }), migrate: true, logger: false });
  t.after(() => app.close());
  assert.equal((await app.inject({ url: '/metrics' })).statusCode, 200, 'control: the service serves /metrics');
  for (const url of ['/metrics/', '/metrics%2F', '/METRICS', '/metrics;x', '/metrics/x', '/metrics.txt']) {
    const res = await app.inject({ url });
    assert.equal(res.statusCode, 404, url);
    assert.doesNotMatch(res.body, /asgd_/, url);
  }
});

test('Node 24 without a runtime compiler: engines, the pinned runtime, `npm start` execs node, the image takes node_modules from the production install only', () => {
  const pkg = JSON.parse(read('package.json')) as { engines: { node: string }; scripts: Record<string, string>; dependencies: Record<string, string>; devDependencies: Record<string, string> };
  assert.equal(pkg.engines.node, '>=24');
  // npm ci puts Node 24 where npm scripts look first; the image has its own (node:24-slim), so it is a dev dependency.
  assert.match(pkg.devDependencies.node, /^\^?24\./);
  assert.equal(pkg.dependencies.node, undefined);
  // exec: npm's child is the server itself, so the SIGTERM npm relays reaches it (test/ops/npm-start.test.ts).
  assert.match(pkg.scripts.start, /^GLIBC_TUNABLES=\$\{GLIBC_TUNABLES:-[^}]+\} NODE_OPTIONS="--max-semi-space-size=32 \$\{NODE_OPTIONS:-\}" exec node src\/server\.ts$/);
  for (const [name, script] of Object.entries(pkg.scripts)) assert.doesNotMatch(script, /\btsx\b|ts-node/, name);
  assert.ok(!('tsx' in pkg.dependencies) && !('tsx' in pkg.devDependencies));

  const dockerfile = read('Dockerfile');
  const instructions = dockerfile.split('\n').filter((line) => !line.startsWith('#')).join('\n');
  assert.doesNotMatch(instructions, /\btsx\b|ts-node|pino-pretty/);
  const stages = dockerfile.split(/^FROM /m).slice(1);
  for (const stage of stages) assert.match(stage, /^node:24-slim\b/, 'every stage on Node 24');
  const runtime = stages[stages.length - 1];
  const deps = stages.find((s) => /npm ci --omit=dev/.test(s))!;
  const depsName = /^\S+ AS (\w+)/.exec(deps)![1];
  const copies = [...runtime.matchAll(/^COPY (.*)$/gm)].map((m) => m[1]);
  assert.deepEqual(copies.filter((c) => c.includes('node_modules')), [`--from=${depsName} /app/node_modules ./node_modules`], 'node_modules only from the production install');
  assert.doesNotMatch(runtime, /^RUN npm (ci|install)\b/m);
});

test('the README says Compose v2 is needed (v1 rejects the top-level name:) and that npm ci brings Node 24', () => {
  const readme = read('README.md');
  assert.match(read('docker-compose.yml'), /^name: /m);
  assert.match(readme, /Compose v2/);
  assert.match(readme, /Compose v1 .*rejects the file's top-level\s+`name:`/s);
  assert.match(readme, /`npm ci` installs Node 24/);
  assert.doesNotMatch(readme, /\btsx\b/);
});
