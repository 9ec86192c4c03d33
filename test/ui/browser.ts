// Headless Chromium for the dashboard's tests: Debian's /usr/bin/chromium driven by playwright-core (no
// browser download). Without Chromium the tests skip with a message, except in CI, where they fail.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, type TestContext } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { chromium, type Browser, type BrowserContext, type Page } from 'playwright-core';
import { buildTestApp } from '../helper.ts';

export const CHROMIUM = process.env.ASGD_CHROMIUM ?? '/usr/bin/chromium';
export const ARTIFACTS = join(process.cwd(), 'test-artifacts', 'ui');

/** Why the browser tests cannot run here, or null when they can. Throws in CI (they must run there). */
export function chromiumMissing(): string | null {
  if (existsSync(CHROMIUM)) return null;
  const message = `${CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run the dashboard's browser tests`;
  if (process.env.CI) throw new Error(message);
  return message;
}

/** One Chromium for the tests of a file (a launch took about a CPU-second; the UI tests launched 70). */
let shared: Promise<Browser> | null = null;
after(async () => {
  await (await shared?.catch(() => null))?.close();
});

/**
 * The file's browser, for this test: the contexts (and so the pages) the test opens in it are closed when
 * the test ends, as the test's own browser was; each is as separate from the others as another browser's
 * (its own cookies, storage and cache). A browser that crashed is launched again for the next test.
 */
export async function launch(t: TestContext): Promise<Browser> {
  shared ??= chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  let browser: Browser;
  try {
    browser = await shared;
  } catch (err) {
    shared = null;
    throw err;
  }
  if (!browser.isConnected()) {
    shared = null;
    return launch(t);
  }
  const contexts: BrowserContext[] = [];
  t.after(() => Promise.all(contexts.map((c) => c.close().catch(() => {}))));
  return new Proxy(browser, {
    get(target, key) {
      if (key === 'newContext') {
        return async (...args: Parameters<Browser['newContext']>) => {
          const context = await target.newContext(...args);
          contexts.push(context);
          return context;
        };
      }
      if (key === 'close') return async () => Promise.all(contexts.map((c) => c.close()));
      const value = Reflect.get(target, key, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

/** A page that fails the test on a script error and keeps the console for the failure message. */
export async function newPage(browser: Browser, log: string[]): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('console', (m) => log.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
  return page;
}

/** The whole page, or the top `height` pixels of it. */
export async function screenshot(page: Page, name: string, height?: number): Promise<string> {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path, ...(height ? { clip: { x: 0, y: 0, width: page.viewportSize()?.width ?? 1280, height } } : { fullPage: true }) });
  return path;
}

/** Starts `app` listening on a loopback port; its base URL. */
export async function listen(app: FastifyInstance): Promise<string> {
  await app.listen({ port: 0, host: '127.0.0.1' });
  const address = app.server.address();
  assert.ok(address && typeof address === 'object');
  return `http://127.0.0.1:${address.port}`;
}

/** A test's app listening on a port, a browser page (its console and errors in `log`, printed at the end) and an API client. */
export async function openDashboard(t: TestContext) {
  const { app } = await buildTestApp(t);
  const base = await listen(app);
  const browser = await launch(t);
  const log: string[] = [];
  t.after(() => { if (log.length) console.log(log.join('\n')); });
  return { app, base, api: client(base), browser, log, page: await newPage(browser, log) };
}

/** A client of the API over HTTP, as a training script would be. */
export function client(base: string) {
  return async (method: string, path: string, body?: unknown): Promise<any> => {
    const response = await fetch(base + path, {
      method,
      headers: body !== undefined ? { 'content-type': 'application/json' } : {},
      ...(body !== undefined && { body: JSON.stringify(body) }),
    });
    const text = await response.text();
    assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
}

/** Requests the page sends to the API, as paths with their query. */
export function recordRequests(page: Page): string[] {
  const seen: string[] = [];
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (url.pathname.startsWith('/v1/')) seen.push(url.pathname + url.search);
  });
  return seen;
}

/** The live indicator: its text and whether it is green. */
export const liveState = (page: Page) => page.evaluate(() => {
  const el = document.getElementById('live');
  return { text: el?.textContent ?? '', green: el?.classList.contains('on') ?? false };
});

/**
 * Waits until the session page shows `version`; on timeout the error says what the page showed (its
 * version, live indicator, error line) and which requests it made meanwhile, so that a failure in CI can
 * be told apart: a lost event, a read that hung, a read that failed.
 */
export async function waitForVersion(page: Page, version: number, timeout: number): Promise<void> {
  const asked: string[] = [];
  const onRequest = (r: { url(): string }) => asked.push(`${new Date().toISOString().slice(11, 23)} ${new URL(r.url()).pathname}${new URL(r.url()).search}`);
  const onFinished = (r: { url(): string }) => asked.push(`${new Date().toISOString().slice(11, 23)} done ${new URL(r.url()).pathname}`);
  page.on('request', onRequest);
  page.on('requestfinished', onFinished);
  try {
    await page.waitForFunction((v) => document.getElementById('app')?.dataset.version === String(v), version, { timeout });
  } catch (err) {
    const shown = await page.evaluate(() => ({
      version: document.getElementById('app')?.dataset.version,
      live: document.getElementById('live')?.textContent,
      error: document.querySelector('#app p.error')?.textContent,
    })).catch(() => null);
    throw new Error(`the page did not reach version ${version} in ${timeout} ms: it shows ${JSON.stringify(shown)}; requests meanwhile:\n${asked.join('\n')}`, { cause: err });
  } finally {
    page.off('request', onRequest);
    page.off('requestfinished', onFinished);
  }
}
