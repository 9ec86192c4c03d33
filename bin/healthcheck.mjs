#!/usr/bin/env node
// Container HEALTHCHECK: exit 0 when GET /healthz on this host answers 200 within 3 s. Plain node (no
// curl in node:24-slim, no start-up cost of the app every few seconds). Reads HOST and PORT like the
// service does: a service bound to one interface's address is not reachable on 127.0.0.1. A `--port` or
// `--host` the service was started with (the container's command, PID 1) overrides them, as it does in the
// service (an operator's review: `command: ["serve", "--port", "9090"]` was probed on 8080, the container
// marked unhealthy). ASGD_HEALTHCHECK_PID names another process to read them from (tests).
import { readFileSync } from 'node:fs';

/** The value of `--name` in the service's command line (`--name v` or `--name=v`), if it is asgd-serve's. */
function serviceFlag(name) {
  let argv;
  try {
    argv = readFileSync(`/proc/${process.env.ASGD_HEALTHCHECK_PID || '1'}/cmdline`, 'utf8').split('\0');
  } catch {
    return undefined; // no /proc (not Linux), or not allowed: the environment decides
  }
  const start = argv.findIndex((a) => /(^|\/)(asgd-serve(\.mjs)?|server\.ts|cli\.ts)$/.test(a));
  if (start === -1) return undefined;
  let value;
  for (let i = start + 1; i < argv.length; i++) {
    if (argv[i] === `--${name}` && i + 1 < argv.length) value = argv[++i];
    else if (argv[i].startsWith(`--${name}=`)) value = argv[i].slice(name.length + 3);
  }
  return value;
}

const port = serviceFlag('port') || process.env.PORT || '8080';
const host = (serviceFlag('host')?.trim() || process.env.HOST?.trim() || '127.0.0.1').replace(/^\[(.*)\]$/, '$1');
// A wildcard address is not one to connect to; loopback reaches it (`::` takes IPv4 too in Node).
const target = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host;
const url = `http://${target.includes(':') ? `[${target}]` : target}:${port}/healthz`;
try {
  const res = await fetch(url, { signal: AbortSignal.timeout(3000) });
  if (res.status !== 200) {
    console.error(`healthcheck: ${url} answered ${res.status}`);
    process.exit(1);
  }
} catch (err) {
  console.error(`healthcheck: ${url}: ${err.cause?.code ?? err.message}`);
  process.exit(1);
}
