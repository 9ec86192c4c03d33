#!/usr/bin/env node
// Container HEALTHCHECK: exit 0 when GET /healthz on this host answers 200 within 3 s. Plain node (no
// curl in node:24-slim, no start-up cost of the app every few seconds). Reads PORT like the service does.
const port = process.env.PORT || '8080';
const url = `http://127.0.0.1:${port}/healthz`;
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
