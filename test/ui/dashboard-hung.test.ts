// The dashboard in a real browser against a replica that hangs (a process stopped with SIGSTOP, a network
// black hole): the connections stay up and nothing comes. The events stream is taken for dropped after its
// idle timeout (the live light goes off and the page reconnects with Last-Event-ID), and a read that gets no
// answer fails after its timeout instead of holding the page. The page's timeouts are shortened through
// window.asgdTimeouts (ui/js/api.js TIMEOUTS).
import assert from 'node:assert/strict';
import { createServer, request as httpRequest, type ServerResponse } from 'node:http';
import { test, type TestContext } from 'node:test';
import type { Page } from 'playwright-core';
import { buildTestApp } from '../helper.ts';
import { chromiumMissing, launch, listen, newPage, screenshot } from './browser.ts';

const skip = chromiumMissing() ?? false;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const PARAMS = [{ name: 'w', shape: [2], data: [0.1, 0.2] }];
const GRAD = { w: [0.5, -0.25] };

/**
 * A replica between the browser and the service that can hang. `freeze()`: the open event streams never
 * carry another byte and every new request is held unanswered, the connections up (as SIGSTOP, or a black
 * hole); `thaw()`: requests made from then on pass again. `hold(re)`: only requests whose path matches are
 * held. The streams get a keep-alive comment every 200 ms (the service's every 15 s, KEEP_ALIVE_MS, is too
 * slow for a test with a short idle timeout). Records the Last-Event-ID of each events request.
 */
async function hangingReplica(t: TestContext, target: string) {
  let frozen = false;
  let holding: RegExp | null = null;
  const held = new Set<ServerResponse>();
  const heldPaths: string[] = [];
  const streams = new Set<{ dead: boolean }>();
  const events: (string | undefined)[] = [];
  const server = createServer((req, res) => {
    const path = req.url ?? '/';
    if (frozen || holding?.test(path)) {
      held.add(res);
      heldPaths.push(path);
      return;
    }
    const isEvents = /\/events(\?|$)/.test(path);
    if (isEvents) events.push(req.headers['last-event-id'] as string | undefined);
    const upstream = httpRequest(target + path, { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      if (!isEvents || answer.statusCode !== 200) {
        answer.pipe(res);
        return;
      }
      res.flushHeaders();
      const stream = { dead: false };
      streams.add(stream);
      let atBoundary = true;
      answer.on('data', (chunk: Buffer) => {
        if (stream.dead) return;
        res.write(chunk);
        atBoundary = chunk.toString().endsWith('\n\n');
      });
      answer.on('end', () => !stream.dead && res.end());
      const keepAlive = setInterval(() => !stream.dead && atBoundary && res.write(': keep-alive\n\n'), 200);
      res.on('close', () => {
        clearInterval(keepAlive);
        streams.delete(stream);
        answer.destroy();
      });
    });
    upstream.on('error', () => res.destroy());
    req.pipe(upstream);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => {
    for (const res of held) res.destroy();
    server.closeAllConnections();
    server.close(resolve);
  }));
  const address = server.address();
  assert.ok(address && typeof address === 'object');
  return {
    url: `http://127.0.0.1:${address.port}`,
    events,
    /** The paths of the requests held so far. */
    heldPaths,
    freeze() {
      frozen = true;
      for (const stream of streams) stream.dead = true;
    },
    thaw() {
      frozen = false;
    },
    hold(re: RegExp | null) {
      holding = re;
    },
  };
}

async function setup(t: TestContext, timeouts: { eventsIdleMs: number; readMs: number }) {
  const { app } = await buildTestApp(t);
  const base = await listen(app);
  const api = async (method: string, path: string, body?: unknown): Promise<any> => {
    const response = await fetch(base + path, { method, headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const text = await response.text();
    assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
    return JSON.parse(text);
  };
  const replica = await hangingReplica(t, base);
  const browser = await launch(t);
  const log: string[] = [];
  t.after(() => { if (log.length) console.log(log.join('\n')); });
  const page = await newPage(browser, log);
  await page.addInitScript((value) => { (window as any).asgdTimeouts = value; }, timeouts);
  return { api, replica, page };
}

const live = (page: Page) => page.evaluate(() => {
  const el = document.getElementById('live');
  return { text: el?.textContent ?? '', green: el?.classList.contains('on') ?? false };
});
const stepCard = (page: Page) => page.textContent('[data-card=step] b');

test('a hung replica: the silent event stream turns the live light off within the idle timeout; the page reconnects with Last-Event-ID and catches up', { skip }, async (t) => {
  const IDLE = 1500;
  const { api, replica, page } = await setup(t, { eventsIdleMs: IDLE, readMs: 3000 });
  await api('POST', '/v1/sessions', { name: 'hung', params: PARAMS });
  await api('POST', '/v1/sessions/hung/step', { grads: GRAD });
  await page.goto(`${replica.url}/ui/#/s/hung`);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  // A step the page hears through the stream: it then has version 3.
  await api('POST', '/v1/sessions/hung/step', { grads: GRAD });
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '2');

  // The control: a quiet stream with keep-alives stays live past the idle timeout, on one connection.
  await sleep(2 * IDLE);
  assert.equal((await live(page)).green, true, (await live(page)).text);
  assert.equal(replica.events.length, 1, `events requests: ${JSON.stringify(replica.events)}`);

  // The replica hangs; the session moves on elsewhere (another replica).
  replica.freeze();
  const frozeAt = Date.now();
  await api('POST', '/v1/sessions/hung/step', { grads: GRAD });
  await api('POST', '/v1/sessions/hung/step', { grads: GRAD });
  await page.waitForFunction(() => !document.getElementById('live')?.classList.contains('on'), undefined, { timeout: IDLE + 3000 });
  const offAfter = Date.now() - frozeAt;
  // Silence counts from the last byte: a keep-alive (every 200 ms) may have come just before the freeze.
  assert.ok(offAfter >= IDLE - 400, `the light went off ${offAfter} ms after the stream went silent, before the idle timeout`);
  assert.match((await live(page)).text, /not live: the service stopped answering/);
  await screenshot(page, 'session-hung-replica', 160);

  // It answers again: live, with the steps made meanwhile, resumed after the version the page had.
  replica.thaw();
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'), undefined, { timeout: 10_000 });
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '4', undefined, { timeout: 5000 });
  assert.equal(await stepCard(page), '4');
  const reconnects = replica.events.slice(1);
  assert.ok(reconnects.length >= 1, 'reconnected');
  // The last event's id: its version, and which session of the name it was.
  assert.ok(reconnects.every((id) => /^3@\d+$/.test(String(id))), `Last-Event-ID of the reconnections: ${JSON.stringify(reconnects)}`);
});

test('a read that never gets an answer fails after the read timeout and says so; the next refresh catches up', { skip }, async (t) => {
  const READ = 1500;
  const { api, replica, page } = await setup(t, { eventsIdleMs: 60_000, readMs: READ });
  await api('POST', '/v1/sessions', { name: 'slow', params: PARAMS });
  await page.goto(`${replica.url}/ui/#/s/slow`);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  assert.equal(await stepCard(page), '0');

  // The session's own read hangs (the stream still works): a step's refresh waits on it.
  replica.hold(/^\/v1\/sessions\/slow(\?|$)/);
  await api('POST', '/v1/sessions/slow/step', { grads: GRAD });
  await page.waitForFunction(() => /no answer within 1\.5 s/.test(document.querySelector('#app .error')?.textContent ?? ''), undefined, { timeout: READ + 3000 });

  // Answered again: the next step's refresh runs (it was not left waiting behind the hung one).
  replica.hold(null);
  await api('POST', '/v1/sessions/slow/step', { grads: GRAD });
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '2', undefined, { timeout: 5000 });
  assert.equal(await page.textContent('#app .error'), '');
});

test('the sessions list against a service that does not answer: one read at a time, and the page says so', { skip }, async (t) => {
  // Found by a review: the list started a read every 3 s without waiting for the last one, so ten hung at
  // once (more than a browser's six connections to a host), and each timeout was dropped as superseded:
  // the page never said anything and showed the old figures as current.
  const READ = 7000;
  const { api, replica, page } = await setup(t, { eventsIdleMs: 60_000, readMs: READ });
  await api('POST', '/v1/sessions', { name: 'listed', params: PARAMS });
  await page.goto(`${replica.url}/ui/#/`);
  await page.waitForSelector('#sessions tr[data-session=listed]');
  replica.hold(/^\/v1\/sessions\?/);
  const heldBefore = replica.heldPaths.length;
  await page.waitForFunction(() => /The service has not answered for \d+ s/.test(document.querySelector('.toolbar .muted')?.textContent ?? ''), undefined, { timeout: 10_000 });
  await page.waitForFunction(() => /^Could not list sessions: .*no answer within 7 s/.test(document.querySelector('.toolbar .muted')?.textContent ?? ''), undefined, { timeout: 10_000 });
  await screenshot(page, 'sessions-hung', 160);
  const held = replica.heldPaths.length - heldBefore;
  assert.ok(held >= 1 && held <= 2, `${held} list reads went out while the service hung (one at a time)`);
  // It answers again: the list is read and the message goes.
  replica.hold(null);
  await api('POST', '/v1/sessions/listed/step', { grads: GRAD });
  await page.waitForFunction(() => document.querySelector('#sessions tr[data-session=listed] td:nth-child(2)')?.textContent === '1', undefined, { timeout: 10_000 });
  assert.equal(await page.textContent('.toolbar .muted'), '');
});

test('a session page against reads that get no answer keeps one snapshots read and one norms read of its own waiting, not one a tick', { skip, timeout: 120_000 }, async (t) => {
  // Found by a review: while the service hung, the page started a snapshots read every 5 s and a norms read
  // every 10 s without waiting for the last (six waiting at once), and each one's timeout counted as one
  // more failure, so the retry waited 30 s where the README says 1, 2, 4 … s.
  const { api, replica, page } = await setup(t, { eventsIdleMs: 60_000, readMs: 60_000 });
  await api('POST', '/v1/sessions', { name: 'held', params: PARAMS });
  await page.goto(`${replica.url}/ui/#/s/held`);
  await page.waitForFunction(() => document.getElementById('live')?.classList.contains('on'));
  // The snapshots reads get no answer; the rest passes, so the page follows the steps and its ticker wants
  // the snapshots of each new version.
  // (Counted as the page makes them: Chromium holds a second GET of a URL until the first is answered, so
  // fewer reach the service, but each waits in the page and times out there.)
  replica.hold(/^\/v1\/sessions\/held\/snapshots(\?|$)/);
  const reads: string[] = [];
  page.on('request', (r) => { if (/\/snapshots$/.test(new URL(r.url()).pathname)) reads.push(r.url()); });
  for (let k = 0; k < 5; k++) {
    await api('POST', '/v1/sessions/held/step', { grads: GRAD });
    await sleep(5000);
  }
  await page.waitForFunction(() => document.querySelector('[data-card=step] b')?.textContent === '5');
  assert.equal(reads.length, 1, `snapshots reads made while one waited: ${reads.length}`);
});
