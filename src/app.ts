// The whole service as one Fastify plugin. It never listens: src/server.ts does, tests inject.
import { createRequire } from 'node:module';
import { STATUS_CODES, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { Server as NetServer, type Socket } from 'node:net';
import { finished, Readable } from 'node:stream';
import fp from 'fastify-plugin';
import { AjvCompiler } from '@fastify/ajv-compiler';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions, type RouteOptions } from 'fastify';
import type { Config } from './config.ts';
import { errors, headerText, quoteValue, type ApiError } from './errors.ts';
import type { Database } from './db/database.ts';
import errorsPlugin, { ERROR_CODE_KEYWORD, errorBody, RULE_KEYWORD } from './plugins/errors.ts';
import { SESSION_NAME_SOURCE } from './sessions/spec.ts';
import contentTypesPlugin from './plugins/content-types.ts';
import corsPlugin from './plugins/cors.ts';
import dbPlugin from './plugins/db.ts';
import arrivalOrderPlugin from './plugins/arrival-order.ts';
import sessionsPlugin from './plugins/sessions.ts';
import notifierPlugin from './plugins/notifier.ts';
import roundsPlugin from './plugins/rounds.ts';
import limitsPlugin from './plugins/limits.ts';
import authPlugin from './plugins/auth.ts';
import swaggerPlugin from './plugins/swagger.ts';
import metricsPlugin, { noteCut } from './plugins/metrics.ts';
import storagePlugin from './plugins/storage.ts';
import { RequestLogController, requestId } from './request-log.ts';
import healthRoutes from './routes/health/index.ts';
import rootRoutes from './routes/root/index.ts';
import uiRoutes from './routes/ui/index.ts';
import tokenRoutes from './routes/tokens/index.ts';
import sessionRoutes from './routes/sessions/index.ts';
import { refuseUnacceptableJson } from './routes/media.ts';

export interface AppOptions {
  config: Config;
  /** Apply migrations at start-up. */
  migrate?: boolean;
  database?: Database;
  logger?: FastifyServerOptions['logger'];
}

type OnSend = (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: (err: Error | null, payload?: unknown) => void) => void;

/**
 * The HEAD routes Fastify makes from GET routes answer the GET's headers with a Content-Length of the body
 * they drop, and 0 when there is none. Two answers have no such length: a 304 (RFC 9110 section 8.6: a
 * Content-Length on it must be the length of the 200 it stands for, so it is left out, as GET leaves it out)
 * and an event stream (open-ended: its GET has none). For those two the header is removed; the rest is
 * Fastify's handler, which stays the last of the route's onSend hooks.
 */
function headersOfHead(route: RouteOptions): void {
  if (route.method !== 'HEAD' || route.onSend === undefined) return;
  const hooks = (Array.isArray(route.onSend) ? route.onSend : [route.onSend]) as OnSend[];
  const fastifys = hooks.at(-1)!;
  if (fastifys.name !== 'headRouteOnSendHandler') return; // a HEAD route declared as such: its own hooks
  const ours: OnSend = (request, reply, payload, done) => {
    const streamed = String(reply.getHeader('content-type') ?? '').startsWith('text/event-stream');
    if (reply.statusCode !== 304 && !streamed) return fastifys(request, reply, payload, done);
    if (payload instanceof Readable) payload.resume();
    reply.removeHeader('content-length');
    done(null, null);
  };
  route.onSend = [...hooks.slice(0, -1), ours] as RouteOptions['onSend'];
}

export async function app(fastify: FastifyInstance, opts: AppOptions): Promise<void> {
  const { config } = opts;

  // Every response says which request it was (the same id is on every log line of the request). Once the
  // app is closing (SIGTERM), requests that still arrive on open connections are turned away with a code,
  // so that clients and load balancers retry elsewhere; the ones in flight finish.
  let closing = false;
  fastify.addHook('preClose', async () => {
    closing = true;
  });

  // Order matters: the limits' onRequest hook sheds load before auth touches the database; auth's onRoute
  // hook must see every route, and swagger's collector every route after it.
  await fastify.register(errorsPlugin);
  fastify.addHook('onRequest', inTurn);
  fastify.addHook('onRoute', headersOfHead);
  fastify.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
    // No answer is to be read as another type than it says (a JSON error echoing a name, a file download).
    reply.header('x-content-type-options', 'nosniff');
  });
  fastify.addHook('onSend', dropUnreadBody);
  // Before load shedding, the database's health gate and auth: a browser's preflight carries no token.
  await fastify.register(corsPlugin, { config });
  // After CORS's hook: a page on an allowed origin reads these refusals too (a 503 while shutting down, a
  // 415 for a Content-Encoding); before, the browser saw a network error it cannot retry a write after.
  fastify.addHook('onRequest', async (request, reply) => {
    if (closing) {
      reply.header('connection', 'close');
      throw errors.unavailable('the server is shutting down; retry on another replica', 1);
    }
    refuseUnreadable(request, reply);
    refuseUnacceptableJson(request);
  });
  await fastify.register(contentTypesPlugin, { config });
  await fastify.register(dbPlugin, { config, migrate: opts.migrate ?? false, database: opts.database });
  await fastify.register(sessionsPlugin, { config });
  // Before the hooks that wait on the database (limits, auth): a worker's steps keep their arrival order.
  await fastify.register(arrivalOrderPlugin, { config });
  await fastify.register(notifierPlugin, { maxConnections: config.maxConnections });
  await fastify.register(roundsPlugin);
  await fastify.register(limitsPlugin, { config });
  await fastify.register(authPlugin, { config });
  await fastify.register(swaggerPlugin);
  await fastify.register(metricsPlugin, { config });
  await fastify.register(storagePlugin, { config });
  await fastify.register(uiRoutes);
  await fastify.register(healthRoutes);
  await fastify.register(rootRoutes);
  await fastify.register(tokenRoutes, { prefix: '/v1/tokens' });
  await fastify.register(sessionRoutes, { prefix: '/v1/sessions', config });
  // After the other plugins' preClose hooks (held round contributions and waiting reads are let go first).
  fastify.addHook('preClose', async () => stopAccepting(fastify.server));
}

/** How long kept-alive connections stay open at close, for the requests already on their way on them. */
const IDLE_CLOSE_GRACE_MS = 100;

/**
 * Stops accepting connections, and only then, after a moment, lets fastify close the idle kept-alive ones
 * (Node's server.close() closes them at once). A connection looks idle while a request its client has just
 * sent is still in the socket, unread (sent as closing began, or while a step kept the event loop busy):
 * closed then, the client met a reset and could not tell whether its request was applied. During the pause
 * each such request is read and answered 503 with Connection: close (the onRequest hook above).
 */
async function stopAccepting(server: Server): Promise<void> {
  stopLingering(server);
  if (!server.listening) return;
  // net's close, not http's: the listening socket only (fastify's server.close() later closes the idle connections).
  NetServer.prototype.close.call(server);
  const open = await new Promise<number>((resolve) => server.getConnections((err, count) => resolve(err ? 1 : count)));
  if (open === 0) return;
  await new Promise((resolve) => setTimeout(resolve, IDLE_CLOSE_GRACE_MS));
  // A poll of the sockets after the pause, should a busy event loop have run the timer first.
  await new Promise((resolve) => setImmediate(resolve));
}

/** Never logged: credentials (tokens travel in the Authorization header). Tensors are never logged at all. */
export const REDACTED_PATHS = ['req.headers.authorization', 'req.headers.cookie', 'headers.authorization', 'authorization', 'token'];

/** pino options for the service: level from config, credentials redacted, pretty only on a terminal. */
export function loggerOptions(config: Config, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    level: config.logLevel,
    // pino-pretty is a dev dependency: a production image run with a terminal (docker run -t) logs JSON.
    ...(process.stdout.isTTY && hasPinoPretty() && { transport: { target: 'pino-pretty' } }),
    ...extra,
    redact: { paths: REDACTED_PATHS, censor: '[redacted]' },
    serializers: { req: requestForLog },
  };
}

/** Query parameters that carry a credential when a client puts one in the URL (the API never reads it there). */
const SECRET_QUERY = /([?&](?:token|access_token|api_key|apikey|password|secret)=)[^&#]*/gi;

/** A URL as logged: a credential in its query is replaced (tokens are never logged). */
export const redactUrl = (url: string): string => url.replace(SECRET_QUERY, '$1[redacted]');

/** Fastify's request fields for the log, with the URL's credentials redacted. */
function requestForLog(req: FastifyRequest) {
  return { method: req.method, url: redactUrl(req.url), host: req.host, remoteAddress: req.ip, remotePort: req.socket?.remotePort };
}

function hasPinoPretty(): boolean {
  try {
    createRequire(import.meta.url).resolve('pino-pretty');
    return true;
  } catch {
    return false;
  }
}

/**
 * Headers that must come once: Node keeps the first of several in `headers`, and a proxy in front may act on
 * the last (another token, another body type): refused instead of guessing. Their display names.
 */
const SINGLE_HEADERS = new Map([
  ['host', 'Host'], ['authorization', 'Authorization'], ['content-type', 'Content-Type'], ['content-length', 'Content-Length'],
  ['idempotency-key', 'Idempotency-Key'], ['last-event-id', 'Last-Event-ID'],
]);

/** The first header of SINGLE_HEADERS a request sent more than once (raw header names, in order), or null. */
function repeatedHeader(raw: string[]): string | null {
  const seen = new Set<string>();
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i].toLowerCase();
    if (!SINGLE_HEADERS.has(name)) continue;
    if (seen.has(name)) return SINGLE_HEADERS.get(name)!;
    seen.add(name);
  }
  return null;
}

/** How each connection's latest answer went, once sent: whether it went whole and closed the connection. */
interface Answered {
  whole: boolean;
  closes: boolean;
}
const latestAnswer = new WeakMap<Socket, Promise<Answered>>();
/** Requests waiting in inTurn on each connection. */
const waitingOn = new WeakMap<Socket, number>();
/**
 * Pipelined requests one connection may have waiting: beyond, the connection is cut. A waiting request
 * writes nothing, so Node's own bound (it stops reading a connection whose queued answers fill its buffer)
 * never came: 100,000 pipelined requests behind an event stream held 500 MB (found by a review).
 */
const MAX_WAITING_PER_CONNECTION = 16;

/**
 * Pipelined requests (sent on a connection before the one before them is answered) are handled in turn:
 * Node dispatches the next one while the answer before it is being made, and when that answer closed the
 * connection (a body that could not be parsed, a repeated header) the next one ran and committed with no
 * answer, so that its client's retry applied a step twice (found by a hostile-input review; RFC 9112
 * section 9.6: nothing after a close is processed). Each waits for the answer before it, and is not handled
 * when that answer closed the connection or was never sent whole (its own answer could not be sent either).
 * Clients that do not pipeline (browsers, fetch, requests) never wait here. Only two flags of an answer are
 * kept (not the request, whose body may be large, for as long as its connection idles).
 */
async function inTurn(request: FastifyRequest, reply: FastifyReply): Promise<void> {
  const socket = request.raw.socket;
  if (!socket) return;
  const before = latestAnswer.get(socket);
  const res = reply.raw;
  latestAnswer.set(socket, new Promise<Answered>((resolve) => {
    finished(res, () => resolve({
      whole: res.writableFinished,
      // As the reply set it: Node's response keeps shouldKeepAlive true and ends the connection after it.
      closes: !res.shouldKeepAlive || /(^|,)\s*close\s*(,|$)/i.test(String(reply.getHeader('connection') ?? '')),
    }));
  }));
  if (before === undefined) return;
  const waiting = (waitingOn.get(socket) ?? 0) + 1;
  if (waiting > MAX_WAITING_PER_CONNECTION) {
    socket.destroy();
    throw errors.unavailable(`more than ${MAX_WAITING_PER_CONNECTION} requests pipelined on one connection: it was closed`, 1);
  }
  waitingOn.set(socket, waiting);
  let answered: Answered;
  try {
    answered = await before;
  } finally {
    waitingOn.set(socket, (waitingOn.get(socket) ?? 1) - 1);
  }
  // destroyed: the parser met bytes that are no request after this one, and the error's answer took its place.
  if (!answered.whole || answered.closes || socket.destroyed) {
    reply.header('connection', 'close');
    throw errors.unavailable('a request sent before this one on its connection closed the connection: this one was not handled; send it again', 1);
  }
}

/**
 * An answer sent before its request's body was read whole (refused by its Content-Length, its session, a
 * bound met while reading): the rest of the body is read and dropped as it arrives, so that the connection
 * carries the client's next request. Node drops an unread body itself, but not one a hook has begun to read
 * (the byte counters of the metrics and of the body bounds pipe it): that connection then read nothing more,
 * and the next request on it hung until the connection was cut (found by an API review: a 413 for a JSON
 * step over its session's bound, then GET /healthz on the same connection: reset after 73 s). A body that
 * never ends is cut by the request timeout, as before.
 */
async function dropUnreadBody(request: FastifyRequest, _reply: FastifyReply, payload: unknown): Promise<unknown> {
  const raw = request.raw;
  if (!raw.complete && !raw.destroyed) {
    raw.unpipe();
    raw.removeAllListeners('data');
    raw.resume();
    // Until the body has ended, a request timeout is about a request answered already: no 408 (clientErrorHandler).
    const socket = raw.socket as AnsweringSocket | null;
    if (socket) {
      socket[answeredUnread] = true;
      raw.once('end', () => (socket[answeredUnread] = false));
      lingerOnClose(socket);
    }
  }
  return payload;
}

/**
 * A connection whose answer closes it before its request's body was read whole (a 413 for a body past its
 * bound, a body that could not be parsed: Fastify answers every body parser's error with Connection: close)
 * is closed lingering, as nginx's lingering_close: the answer and a FIN go out, and what the client still
 * sends is read and dropped until it closes its side, for at most LINGER_MS and LINGER_BYTES, and while it
 * sends something at least every LINGER_IDLE_MS. Closed at
 * once, the client's next writes met a reset, and clients that send the whole body before they read
 * (requests with a chunked body) or that stop at a write error (fetch: EPIPE; this service's TypeScript
 * client then uploaded the body again, four times) never read the 413 (found by a hostile-input review).
 */
const LINGER_MS = 30_000;
const LINGER_BYTES = 256 * 1024 * 1024;
/** A lingering connection whose client sends nothing for this long is cut (nginx's lingering_timeout). */
const LINGER_IDLE_MS = 5_000;
/** Each server's connections closing lingering now; null once it closes (a shutdown does not wait for their clients). */
const lingering = new WeakMap<NetServer, Set<Socket> | null>();

function lingerOnClose(socket: Socket): void {
  socket.destroySoon = function lingeringClose(this: Socket & { server?: NetServer }) {
    if (this.writable) this.end();
    if (this.destroyed) return;
    const server = this.server;
    let open = server ? lingering.get(server) : null;
    if (server && open === undefined) lingering.set(server, (open = new Set()));
    if (!open) {
      // The app is closing: the answer is flushed, then the connection is cut.
      if (this.writableFinished) this.destroy();
      else this.once('finish', () => this.destroy());
      return;
    }
    // What the client sends goes on to the HTTP parser: the rest of the refused body is dropped with it
    // (dropUnreadBody), and a request after it is not handled (inTurn: the request before it closed the
    // connection). ASGD_REQUEST_TIMEOUT_MS, when shorter, still cuts a body that has not ended.
    // One timer for the three bounds: the time, the bytes dropped, the client's silence.
    const readBefore = this.bytesRead;
    const startedAt = Date.now();
    let read = readBefore;
    let readAt = startedAt;
    const check = setInterval(() => {
      const now = Date.now();
      if (this.bytesRead !== read) {
        read = this.bytesRead;
        readAt = now;
      }
      if (now - startedAt > LINGER_MS || read - readBefore > LINGER_BYTES || now - readAt > LINGER_IDLE_MS) this.destroy();
    }, 100);
    check.unref();
    open.add(this);
    this.once('close', () => {
      clearInterval(check);
      open.delete(this);
    });
  };
}

/** At close: the connections closing lingering are cut, and the ones that would start lingering are closed at once. */
function stopLingering(server: NetServer): void {
  for (const socket of lingering.get(server) ?? []) socket.destroy();
  lingering.set(server, null);
}

/** On a connection: its request was answered before its body was read whole, and the rest is being dropped. */
const answeredUnread = Symbol('answeredUnread');
type AnsweringSocket = Socket & { [answeredUnread]?: boolean };

/**
 * What the app refuses before any route reads a request: an HTTP/1.1 request without one Host (RFC 9112
 * section 3.2), a body in a content coding, a transfer coding other than chunked.
 */
function refuseUnreadable(request: FastifyRequest, reply: FastifyReply): void {
  // RFC 9112 section 3.2: an HTTP/1.1 request without Host (or with several) is a 400.
  const host = request.raw.headers.host;
  if (request.raw.httpVersion === '1.1' && host === undefined) {
    reply.header('connection', 'close');
    throw errors.invalidHeader('Host', 'is required in HTTP/1.1');
  }
  // The asterisk-form target (RFC 9112 section 3.2.4) names no resource: not the root document.
  if (request.raw.url === '*') throw errors.invalidUrl('path: "*" names no resource of this service');
  const repeated = repeatedHeader(request.raw.rawHeaders);
  if (repeated !== null) {
    reply.header('connection', 'close');
    throw errors.invalidHeader(repeated, 'must be sent once');
  }
  // Bodies are read as they come: a compressed one would be misread (a gzipped JSON step as bad JSON, a
  // header length of 8e18 in a gzipped safetensors file), and a coding the service does not apply must
  // not be ignored (RFC 9110 section 8.4).
  const contentEncoding = request.headers['content-encoding'];
  const hasBody = request.headers['transfer-encoding'] !== undefined || Number(request.headers['content-length'] ?? 0) > 0;
  if (hasBody && contentEncoding !== undefined && !/^\s*(identity)?\s*$/i.test(contentEncoding)) throw errors.unsupportedContentEncoding(quoteValue(headerText(contentEncoding)));
  // Node's parser takes chunked as the last coding and ignores those before it (gzip, chunked).
  const transferEncoding = request.headers['transfer-encoding'];
  if (transferEncoding !== undefined && !/^\s*chunked\s*$/i.test(transferEncoding)) {
    reply.header('connection', 'close');
    throw errors.invalidHeader('Transfer-Encoding', `${quoteValue(headerText(transferEncoding))} is not supported (only chunked)`);
  }
}

/** The request line and headers a request may have: 256 KiB (?options= of 65,536 characters percent-encoded, and the rest). */
const MAX_HEADER_BYTES = 256 * 1024;

const SESSION_PATH = new RegExp(`^/v1/sessions/(${SESSION_NAME_SOURCE})(?:[/?]|$)`);

/** A framework-level error (bad URL, oversized headers, timeouts) in the API's error shape. */
const errorText = (api: ApiError): string => JSON.stringify(errorBody(api));

/** The API error for an HTTP parse error of Node's parser (llhttp's code), naming what was wrong where it can. */
function parseError(err: Error & { code?: string; reason?: string }): ApiError {
  switch (err.code) {
    case 'ERR_HTTP_REQUEST_TIMEOUT': return errors.requestTimeout();
    case 'HPE_HEADER_OVERFLOW': return errors.headersTooLarge();
    case 'HPE_INVALID_CONTENT_LENGTH':
    case 'HPE_UNEXPECTED_CONTENT_LENGTH':
      // llhttp's reason tells a Content-Length sent twice ("Duplicate Content-Length") from one beside Transfer-Encoding.
      return /transfer-encoding/i.test(err.reason ?? '') || (err.code === 'HPE_UNEXPECTED_CONTENT_LENGTH' && !/duplicate/i.test(err.reason ?? ''))
        ? errors.invalidHeader('Content-Length', 'may not be sent with Transfer-Encoding')
        : errors.invalidHeader('Content-Length', 'must be one whole number of bytes, sent once');
    case 'HPE_INVALID_TRANSFER_ENCODING':
      return /content-length/i.test(err.reason ?? '')
        ? errors.invalidHeader('Transfer-Encoding', 'may not be sent with Content-Length')
        : errors.invalidHeader('Transfer-Encoding', 'only chunked is supported, as the last coding and once');
    case 'HPE_INVALID_CHUNK_SIZE':
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW': return errors.badRequest('body: the chunked encoding is not valid (a chunk size line)');
    case 'HPE_INVALID_HEADER_TOKEN': return errors.badRequest('headers: a header line is not a valid "Name: value" line');
    case 'HPE_INVALID_METHOD': return errors.badRequest('method: not a valid HTTP method');
    case 'HPE_INVALID_URL': return errors.invalidUrl('path: is not a valid request target');
    case 'HPE_INVALID_VERSION': return errors.badRequest('the request line: the version must be HTTP/1.0 or HTTP/1.1');
    default: return errors.badRequest(`the request is not valid HTTP/1.1${err.reason ? ` (${err.reason.replace(/[^\x20-\x7e]/g, '?')})` : ''}`);
  }
}

const clientErrored = Symbol('asgd.clientErrored');

/** An error in the API's shape as the bytes of a whole HTTP/1.1 answer that closes the connection, for a socket Node gave no response object for. */
function rawErrorResponse(api: ApiError, headers = ''): string {
  const body = errorText(api);
  return `HTTP/1.1 ${api.statusCode} ${STATUS_CODES[api.statusCode] ?? 'Error'}\r\n${headers}Content-Length: ${Buffer.byteLength(body)}\r\nContent-Type: application/json; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n${body}`;
}

/**
 * A request Node's parser could not read, or one that timed out: its error in the API's shape, then the
 * connection closes. A request read before it on the same connection (pipelined, or bytes after a body
 * that Content-Length did not count) may still be running; it is answered first: a step committed must
 * not be answered with the next request's 400.
 */
function clientErrorHandler(this: FastifyInstance, err: Error & { code?: string; reason?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const marked = socket as Socket & { [clientErrored]?: true; _httpMessage?: ServerResponse | null };
  if (marked[clientErrored]) return; // the parser reports again on later bytes: one answer
  marked[clientErrored] = true;
  const api = parseError(err);
  this.log.debug({ err, code: api.code }, 'client error');
  const close = () => {
    if (socket.destroyed) return;
    if (socket.writable) {
      noteCut(socket, api.statusCode);
      socket.write(rawErrorResponse(api));
    }
    socket.destroy(err);
  };
  // The request that timed out was answered (before its body was read whole: dropUnreadBody): a 408 would
  // be a second answer to it, read as the answer to the client's next request (found by a review).
  if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' && (socket as AnsweringSocket)[answeredUnread]) {
    socket.destroy(err);
    return;
  }
  const inFlight = marked._httpMessage;
  // A request that timed out while an answer before it is still being made (it waits its turn: inTurn): its
  // 408 would be read as that answer. The connection is cut instead; the client sends both again.
  if (inFlight && !inFlight.writableFinished && err.code === 'ERR_HTTP_REQUEST_TIMEOUT' && inFlight.req?.complete) {
    socket.destroy(err);
    return;
  }
  // Only a request read whole: one whose body is still being read is the request the error is about. Every
  // request read whole before the bad bytes is answered first, in turn (a pipelined one behind the answer in
  // flight too: answered 400 in its place, it would have committed unanswered), then the error.
  if (inFlight && !inFlight.writableFinished && inFlight.req?.complete && err.code !== 'ERR_HTTP_REQUEST_TIMEOUT') {
    socket.pause(); // nothing more is read: what follows the bad bytes is not a request
    const afterAnswers = () => {
      const pending = marked._httpMessage;
      if (pending && !pending.writableFinished && !pending.destroyed && pending.req?.complete) {
        finished(pending, () => afterAnswers());
        return;
      }
      close();
    };
    afterAnswers();
    return;
  }
  close();
}

/**
 * Expect: 100-continue (RFC 9110 section 10.1.1): the 100 goes out when a route begins to read the body, not
 * when the headers arrive (Node's default). A request refused on its headers (401, 404, 413, 415, 400) gets
 * that answer instead and the client does not send the body, a 200 MB gradient for a wrong token, say. Such
 * an answer closes the connection: the body the client may still send is not a next request.
 */
function continueOnRead(this: Server, request: IncomingMessage, response: ServerResponse): void {
  const keepAlive = response.shouldKeepAlive;
  response.shouldKeepAlive = false;
  const onListener = (event: string | symbol) => {
    if (event !== 'data' && event !== 'readable') return;
    request.off('newListener', onListener);
    if (response.headersSent) return;
    response.shouldKeepAlive = keepAlive;
    response.writeContinue();
  };
  request.on('newListener', onListener);
  this.emit('request', request, response);
}

const MAX_PARAM_LENGTH = 512;
const validatorFactory = AjvCompiler();

/** An API path's trailing slashes dropped (`/v1/sessions/x/params/?a=1` → `/v1/sessions/x/params?a=1`); other URLs as they are. Linear: no regex to backtrack over a 256 KiB URL. */
export function withoutTrailingSlash(url: string): string {
  // The path starts after the authority in the absolute form a proxy may send (GET http://host/v1/...).
  const absolute = /^https?:\/\/[^/?#]*/i.exec(url);
  const start = absolute ? absolute[0].length : 0;
  if (!url.startsWith('/v1/', start)) return url;
  let end = start;
  while (end < url.length && url[end] !== '?' && url[end] !== '#') end++;
  let cut = end;
  while (cut > start + 4 && url.charCodeAt(cut - 1) === 47) cut--;
  return cut === end ? url : url.slice(0, cut) + url.slice(end);
}

/** Answers built whole from this size on are watched for a client that takes none of them (guardStalledSend). */
const GUARDED_ANSWER_BYTES = 256 * 1024;

/**
 * Destroys the connection of an answer that makes no progress for `ms`. Node's socket timeout counts a write
 * the kernel is still taking, bit by bit (libuv's write queue shrinking), as progress: a client that reads
 * slowly goes on, one that reads nothing is cut. The keep-alive timer the server sets when the answer ends
 * replaces this one.
 */
function guardStalledSend(res: ServerResponse, ms: number, log: FastifyBaseLogger): void {
  const socket = res.socket;
  if (!socket || typeof socket.setTimeout !== 'function') return; // an injected request's has none
  const stalled = () => {
    log.warn({ stalledMs: ms, bytesWritten: socket.bytesWritten }, 'the client took none of the answer for ASGD_REQUEST_TIMEOUT_MS; closing the connection');
    socket.destroy();
  };
  socket.setTimeout(ms);
  socket.on('timeout', stalled);
  const done = () => socket.off('timeout', stalled);
  res.once('finish', done);
  res.once('close', done);
}

/** Builds the app (not listening). */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const { config } = opts;
  // A logger given as options still gets the redaction; `false` and ready-made pino instances pass through.
  const logger = opts.logger === undefined ? loggerOptions(config)
    : opts.logger && typeof opts.logger === 'object' && !('child' in opts.logger) ? { ...opts.logger, redact: { paths: REDACTED_PATHS, censor: '[redacted]' } }
    : opts.logger;
  const fastify = Fastify({
    logger,
    bodyLimit: config.bodyLimitDefault,
    requestTimeout: config.requestTimeoutMs,
    // Node 20 only enforces the request timeout when the server is constructed with it (fastify sets it
    // afterwards), and checks it on an interval (30 s by default): keep that a fraction of the timeout.
    http: {
      requestTimeout: config.requestTimeoutMs,
      // Headers come at once from any client: a connection that trickles them (up to MAX_HEADER_BYTES each)
      // holds their memory only this long, also with no request timeout (0: a review found headers sent a
      // byte a second still taken after 75 s).
      headersTimeout: config.requestTimeoutMs > 0 ? Math.min(10_000, config.requestTimeoutMs) : 10_000,
      // A request without Host is refused by the app (onRequest, in the API's error shape), not by Node's bare 400.
      requireHostHeader: false,
      // Node's 16 KiB would refuse (431) a create from a file whose ?options= (declared up to 65,536
      // characters: the param_groups of a large model name every parameter) is percent-encoded to 3x.
      maxHeaderSize: MAX_HEADER_BYTES,
      // How often Node checks those deadlines: a quarter of the shorter (the headers' 10 s), not 30 s.
      connectionsCheckingInterval: Math.max(100, Math.floor(Math.min(10_000, config.requestTimeoutMs || 120_000) / 4)),
    },
    // A hop count is valid at runtime (fastify's trust-proxy); the typings only list the other forms.
    trustProxy: config.trustProxy as Exclude<Config['trustProxy'], number>,
    genReqId: requestId,
    // Request lines at a level per route (ASGD_LOG_REQUESTS).
    logController: new RequestLogController(config.logRequests),
    // Lines about a session's routes carry its name (set before the first line of the request is written).
    childLoggerFactory: (parent, bindings, childOpts, rawReq) => {
      const session = SESSION_PATH.exec(rawReq.url ?? '')?.[1];
      return parent.child(session ? { ...bindings, session } : bindings, childOpts);
    },
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    // The API's paths with a trailing slash are the same paths (/v1/sessions/ already was, as a prefix's
    // root; /v1/sessions/x/params/ was a 404). The dashboard's /ui/ keeps its slash: its links are relative.
    rewriteUrl: (req) => withoutTrailingSlash(req.url ?? '/'),
    frameworkErrors: (err, _request, reply) => {
      const api = err.code === 'FST_ERR_MAX_PARAM_LENGTH' ? errors.uriTooLong(MAX_PARAM_LENGTH) : errors.invalidUrl('path: is not a valid URL (bad percent-encoding)');
      void (reply as FastifyReply).code(api.statusCode).header('content-type', 'application/json').header('x-content-type-options', 'nosniff').send(errorText(api));
    },
    clientErrorHandler,
    // `x-error-code` and `x-rule` are annotations: a field's own error code, its pattern in words (src/plugins/errors.ts).
    ajv: { customOptions: { coerceTypes: 'array', removeAdditional: false, allErrors: false, keywords: [ERROR_CODE_KEYWORD, RULE_KEYWORD] } },
    // Query strings, path parameters and headers are text and are coerced to their schema's types; JSON
    // bodies have types of their own, so {"name": true} is a 400, not a session called "true".
    schemaController: {
      compilersFactory: {
        buildValidator: (externalSchemas, ajvOptions) => {
          const options = ajvOptions as { customOptions: Record<string, unknown> };
          const coercing = validatorFactory(externalSchemas, options);
          const strict = validatorFactory(externalSchemas, { ...options, customOptions: { ...options.customOptions, coerceTypes: false } });
          return (route) => (route.httpPart === 'body' ? strict(route) : coercing(route));
        },
      },
    },
    // Requests during shutdown get a 503 with a code from the app's onRequest hook instead of fastify's bare one.
    return503OnClosing: false,
    // Opening the embedded database (PGlite compiles PostgreSQL to WebAssembly) and migrating it can take
    // well over fastify's default 10 s on a busy machine.
    pluginTimeout: 120_000,
  });
  // An Expect other than 100-continue: Node answers a bare 417 unless someone listens for it.
  // Each connection may hold up to MAX_HEADER_BYTES of headers being read, and an event stream or keep-alive
  // connection some memory: bounded in number, past which Node closes new connections as they come.
  fastify.server.maxConnections = config.maxConnections;
  fastify.server.on('checkExpectation', (request: IncomingMessage, response: ServerResponse) => {
    const body = errorText(errors.invalidHeader('Expect', `${quoteValue(headerText(request.headers.expect))} is not supported (only 100-continue)`));
    response.writeHead(400, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-content-type-options': 'nosniff', connection: 'close' });
    response.end(body);
  });
  fastify.server.on('checkContinue', continueOnRead);
  // CONNECT (a proxy's tunnel): Node hands it to 'connect' listeners, and with none closes the connection
  // with no answer at all (a hostile review). No route has it: a 405 in the API's shape, then the close.
  fastify.server.on('connect', (request: IncomingMessage, socket: Socket) => {
    const allowed = ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'PATCH', 'POST', 'PUT'];
    socket.on('error', () => {});
    socket.end(rawErrorResponse(errors.methodNotAllowed('CONNECT', headerText(request.url ?? '').slice(0, 200), allowed), `Allow: ${allowed.join(', ')}\r\n`));
  });
  // A streamed answer (a .pt or safetensors download) that a client stops reading held its copy of the state
  // for as long as the connection lived (found by a review: five clients that never read pinned 1.2 GB):
  // one that takes none of it for ASGD_REQUEST_TIMEOUT_MS is cut. So is a large answer built whole (JSON
  // parameters, a step's returned parameters): twenty clients that never read a 78 MB JSON answer held
  // 1.9 GB past the timeout (found by another). Small answers fit the socket's buffers: not watched.
  if (config.requestTimeoutMs > 0) {
    fastify.addHook('onSend', async (request, reply, payload) => {
      const large = payload instanceof Readable || ((Buffer.isBuffer(payload) || typeof payload === 'string') && payload.length >= GUARDED_ANSWER_BYTES);
      if (large) guardStalledSend(reply.raw, config.requestTimeoutMs, request.log);
      return payload;
    });
  }
  // fastify-plugin: the app's decorations (db, sessions) are visible on the instance tests hold.
  await fastify.register(fp(app, { name: 'asgd-serve' }), opts);
  return fastify;
}
