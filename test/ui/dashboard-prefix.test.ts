// The dashboard behind a reverse proxy that mounts the service under a path prefix (/asgd/ on the proxy is
// / on the service), as the CLI and the clients already allow: the page, its scripts, its API reads, the
// live event stream and a download all go through the prefix.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import { test } from 'node:test';
import { buildTestApp } from '../helper.ts';
import { chromiumMissing, client, launch, listen, newPage } from './browser.ts';

const skip = chromiumMissing() ?? false;
const PREFIX = '/asgd';

/** A reverse proxy: <PREFIX>/x to the service's /x (streamed both ways); anything else is the proxy's own 404. */
async function prefixProxy(target: string, seen: string[]): Promise<{ url: string; close(): void }> {
  const server = http.createServer((req, res) => {
    seen.push(req.url!);
    if (!req.url!.startsWith(`${PREFIX}/`) && req.url !== PREFIX) return res.writeHead(404, { 'content-type': 'text/plain' }).end('not under the prefix');
    const upstream = http.request(new URL(req.url!.slice(PREFIX.length) || '/', target), { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode!, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

test('dashboard under a proxy\'s path prefix: the list, a session\'s charts, live steps and a download, every request under the prefix', { skip }, async (t) => {
  const { app } = await buildTestApp(t);
  const base = await listen(app);
  const api = client(base);
  await api('POST', '/v1/sessions', { name: 'prefixed', params: [{ name: 'w', shape: [2], data: [0.5, -0.5] }], hyperparameters: { lr: 0.1 } });
  for (const loss of [1.5, 1.25, 1]) await api('POST', '/v1/sessions/prefixed/step', { grads: { w: [0.25, 0.5] }, metrics: { loss } });

  const seen: string[] = [];
  const proxy = await prefixProxy(base, seen);
  t.after(() => proxy.close());
  const browser = await launch(t);
  const log: string[] = [];
  const page = await newPage(browser, log);
  t.after(() => { if (log.length) console.log(log.join('\n')); });

  await page.goto(`${proxy.url}${PREFIX}/ui`); // redirected to <PREFIX>/ui/
  assert.equal(new URL(page.url()).pathname, `${PREFIX}/ui/`);
  await page.waitForSelector('tr[data-session="prefixed"]');
  await page.click('tr[data-session="prefixed"] a');
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[1]?.length === 3, undefined, { timeout: 10_000 });
  // Live: the event stream through the proxy brings a new step.
  await api('POST', '/v1/sessions/prefixed/step', { grads: { w: [0.25, 0.5] }, metrics: { loss: 0.75 } });
  await page.waitForFunction(() => (window as any).asgdCharts?.['metric:loss']?.data[1]?.at(-1) === 0.75, undefined, { timeout: 10_000 });
  // A download (fetched with the tab's token, then handed to the browser).
  const [file] = await Promise.all([page.waitForEvent('download'), page.locator('tr[data-snapshot] button:text-is("safetensors")').first().click()]);
  assert.match(file.suggestedFilename(), /^prefixed-v\d+\.safetensors$/);
  assert.ok(seen.some((u) => /^\/asgd\/v1\/sessions\/prefixed\/snapshots\/\d+\/params\?format=safetensors$/.test(u)), seen.join(', '));

  const outside = seen.filter((u) => !u.startsWith(`${PREFIX}/`) && u !== PREFIX);
  assert.deepEqual(outside, [], 'every request the page made stayed under the prefix');
  for (const expected of [`${PREFIX}/ui/js/main.js`, `${PREFIX}/ui/vendor/uPlot.esm.js`, `${PREFIX}/v1/sessions/prefixed/events`]) {
    assert.ok(seen.some((u) => u.startsWith(expected)), `${expected} requested (${seen.join(', ')})`);
  }
  assert.deepEqual(log.filter((l) => l.startsWith('pageerror')), []);
});
