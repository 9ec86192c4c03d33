// The dashboard at /ui: static files from ui/ and the chart library from its npm package, read once at
// start, compressed once when first asked for in that encoding (brotli and gzip, on libuv's thread pool; a
// replica whose dashboard is never opened never compresses) and served from memory. Nothing is fetched
// from elsewhere, so the page works offline. The files are public like /docs; the data they show needs a token (the page
// asks for one when the API answers 401).
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, extname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { brotliCompress, constants as zlib, gzip } from 'node:zlib';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import type { FastifyReply, FastifyRequest } from 'fastify';
import { Type } from 'typebox';
import { errors } from '../../errors.ts';
import { ACCESS, ifNoneMatchTags } from '../common.ts';

export const UI_ROOT = fileURLToPath(new URL('../../../ui/', import.meta.url));

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
};

const brotliAsync = promisify(brotliCompress);
const gzipAsync = promisify(gzip);

export interface UiAsset {
  type: string;
  etag: string;
  identity: Buffer;
  /**
   * The file compressed, made off the main thread at the first request for that encoding and kept (brotli at
   * quality 11 of every file had taken 300-440 ms of each start-up's main thread).
   */
  encoded(encoding: 'br' | 'gzip'): Promise<Buffer>;
}

function asset(path: string): UiAsset {
  const identity = readFileSync(path);
  const type = TYPES[extname(path)] ?? 'application/octet-stream';
  const made: { br?: Promise<Buffer>; gzip?: Promise<Buffer> } = {};
  const compress = (encoding: 'br' | 'gzip') => encoding === 'br'
    ? brotliAsync(identity, { params: { [zlib.BROTLI_PARAM_QUALITY]: 11, [zlib.BROTLI_PARAM_SIZE_HINT]: identity.length } })
    : gzipAsync(identity, { level: 9 });
  return {
    type,
    // Weak: the same tag stands for the file in each content coding (identity, gzip, br), which are not the
    // same bytes (RFC 9110 8.8.1: a strong tag names one representation's bytes; found by a review).
    etag: `W/"${createHash('sha256').update(identity).digest('base64url').slice(0, 22)}"`,
    identity,
    encoded(encoding) {
      let pending = made[encoding];
      if (!pending) {
        pending = made[encoding] = compress(encoding);
        pending.catch(() => delete made[encoding]); // a failure (out of memory) is that request's 500; the next one tries again
      }
      return pending;
    },
  };
}

function walk(dir: string): string[] {
  return readdirSync(dir).flatMap((entry) => {
    const path = join(dir, entry);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

/** Every file the dashboard serves, by its path under /ui/. */
export function loadUiAssets(root = UI_ROOT): Map<string, UiAsset> {
  const assets = new Map<string, UiAsset>();
  for (const path of walk(root)) {
    if (!(extname(path) in TYPES)) continue; // tsconfig.json and the like are for the type checker only
    assets.set(relative(root, path).split(sep).join('/'), asset(path));
  }
  // The chart library, from its npm package (uPlot: small, fast, canvas-based).
  const uplot = dirname(createRequire(import.meta.url).resolve('uplot'));
  assets.set('vendor/uPlot.esm.js', asset(join(uplot, 'uPlot.esm.js')));
  assets.set('vendor/uPlot.min.css', asset(join(uplot, 'uPlot.min.css')));
  return assets;
}

/** If-None-Match against a file's tag (RFC 9110 13.1.2): weak comparison, a list, or "*". */
export function etagMatches(header: string | string[] | undefined, etag: string): boolean {
  const tags = ifNoneMatchTags(header);
  if (tags === null || tags === '*') return tags === '*';
  return tags.includes(etag.replace(/^W\//, ''));
}

/** The content coding to send for an Accept-Encoding header: br, then gzip, each only with a q above 0. */
export function pickEncoding(header: string | undefined): 'br' | 'gzip' | null {
  const q = new Map<string, number>();
  for (const part of String(header ?? '').split(',').slice(0, 64)) {
    const [coding, ...params] = part.trim().toLowerCase().split(';');
    const weight = params.map((p) => /^\s*q=([0-9.]+)\s*$/.exec(p)?.[1]).find((v) => v !== undefined);
    if (coding) q.set(coding, weight === undefined ? 1 : Number(weight));
  }
  const wanted = (coding: string) => (q.get(coding) ?? (q.has(coding) ? 0 : q.get('*') ?? 0)) > 0;
  return wanted('br') ? 'br' : wanted('gzip') ? 'gzip' : null;
}

/**
 * The dashboard's Content-Security-Policy: its own files only (the import map, its one inline script, by
 * its hash), requests to this origin only, and no framing by any page (clickjacking of Restore, Fork and
 * Pin; found by a review).
 */
export function uiContentSecurityPolicy(indexHtml: string): string {
  const inline = [...indexHtml.matchAll(/<script\b[^>]*>([\s\S]*?)<\/script>/g)].map((m) => m[1]).filter((body) => body.trim() !== '');
  const hashes = inline.map((body) => `'sha256-${createHash('sha256').update(body).digest('base64')}'`);
  return [
    "default-src 'none'", `script-src 'self' ${hashes.join(' ')}`.trim(), "style-src 'self'", "img-src 'self' data:", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
  ].join('; ');
}

async function send(request: FastifyRequest, reply: FastifyReply, file: UiAsset, csp: string) {
  reply.header('content-type', file.type);
  reply.header('etag', file.etag);
  // Revalidate every time (a 304 is cheap): a new deploy is seen at once, without versioned file names.
  reply.header('cache-control', 'no-cache');
  reply.header('vary', 'accept-encoding');
  reply.header('x-content-type-options', 'nosniff');
  reply.header('content-security-policy', csp);
  reply.header('x-frame-options', 'DENY'); // for browsers without frame-ancestors
  if (etagMatches(request.headers['if-none-match'], file.etag)) return reply.status(304).send();
  const encoding = pickEncoding(request.headers['accept-encoding']);
  if (encoding) reply.header('content-encoding', encoding);
  return reply.send(encoding ? await file.encoded(encoding) : file.identity);
}

const uiRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const assets = loadUiAssets();
  const index = assets.get('index.html');
  if (!index) throw new Error(`the dashboard's index.html is missing from ${UI_ROOT}`);
  const csp = uiContentSecurityPolicy(index.identity.toString('utf8'));
  const config = ACCESS.public;
  const schema = { hide: true };
  // Relative, so that behind a reverse proxy's path prefix (/asgd/ui) the browser stays under it (/asgd/ui/).
  fastify.get('/ui', { config, schema }, async (_request, reply) => reply.redirect('ui/', 302));
  fastify.get('/ui/', { config, schema }, async (request, reply) => send(request, reply, index, csp));
  fastify.get('/ui/*', { config, schema: { ...schema, params: Type.Object({ '*': Type.String() }) } }, async (request, reply) => {
    const path = request.params['*'];
    const file = assets.get(path);
    if (!file) throw errors.routeNotFound('GET', `/ui/${path.slice(0, 200)}`);
    return send(request, reply, file, csp);
  });
};

export default uiRoutes;
