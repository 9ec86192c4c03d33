#!/usr/bin/env node
// Container HEALTHCHECK: exit 0 when GET /healthz on this host answers 200 within 3 s. Plain node (no
// curl in node:24-slim, no start-up cost of the app every few seconds). Reads HOST and PORT like the
// service does: a service bound to one interface's address is not reachable on 127.0.0.1.
const port = process.env.PORT || '8080';
const host = (process.env.HOST?.trim() || '127.0.0.1').replace(/^\[(.*)\]$/, '$1');
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
