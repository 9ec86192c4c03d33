// The per-request log lines ("incoming request", "request completed") at a level chosen per route: a
// training loop steps and reads params many times a second, and two info lines for each would bury
// everything else. ASGD_LOG_REQUESTS (config.logRequests) says which go out at info; the rest are written
// at debug. Fastify's other lines (stream errors, …) are unchanged. Also the request id: a client's or
// proxy's X-Request-Id is kept when it is a sane one, so its lines can be joined with theirs.
import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { LogController, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Config } from './config.ts';

/**
 * The routes called all the time: a training loop's on every step, a probe's and a scraper's every few
 * seconds (an image's HEALTHCHECK and a Prometheus scrape came to ~25k info lines a day a replica).
 */
const PER_STEP_ROUTE = /^\/v1\/sessions\/:name\/(step|params)$|^\/(healthz|readyz|livez|metrics)$/;
/** An id a proxy or client may send (UUIDs, trace ids, nginx's $request_id): no spaces, no control characters. */
const REQUEST_ID = /^[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}$/;

/** fastify's genReqId: the incoming X-Request-Id when it is one, else a new UUID. */
export function requestId(req: IncomingMessage): string {
  const incoming = req.headers['x-request-id'];
  return typeof incoming === 'string' && REQUEST_ID.test(incoming) ? incoming : randomUUID();
}

type Level = 'info' | 'debug';

/** The level of a request's lines under ASGD_LOG_REQUESTS `mode`, given its route and, when known, its answer's status. */
export function requestLogLevel(mode: Config['logRequests'], routeUrl: string, status?: number): Level {
  const failed = status !== undefined && status >= 400;
  switch (mode) {
    case 'all':
      return 'info';
    case 'none':
      return 'debug';
    case 'errors':
      return failed ? 'info' : 'debug';
    case 'auto':
      return failed || !PER_STEP_ROUTE.test(routeUrl) ? 'info' : 'debug';
  }
}

export class RequestLogController extends LogController {
  readonly mode: Config['logRequests'];

  constructor(mode: Config['logRequests']) {
    super();
    this.mode = mode;
  }

  /** Whether this request's lines go out at info (else debug), given its answer's status when known. */
  level(request: FastifyRequest, status?: number): Level {
    return requestLogLevel(this.mode, request.routeOptions.url ?? '', status);
  }

  override incomingRequest(request: FastifyRequest): void {
    request.log[this.level(request)]({ req: request }, 'incoming request');
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    const who = tokenOf(request);
    const level = error ? 'error' : this.level(request, reply.statusCode);
    // A request whose incoming line went at debug and whose completion goes out (it failed) says what it was
    // and who sent it on that line: method, URL, client address (an operator's review: a 401 of an unknown
    // client, or a step's 503 in an outage, was logged with neither).
    const req = level !== 'debug' && this.level(request) === 'debug' ? { req: request } : {};
    if (error) reply.log.error({ ...req, res: reply, err: error, responseTime: reply.elapsedTime, ...who }, 'request errored');
    else reply.log[level]({ ...req, res: reply, responseTime: reply.elapsedTime, ...who }, 'request completed');
  }
}

/**
 * Which token made the request, for the completion line: its id and name (never its secret), so that an
 * operator can tell which worker or person did what. Nothing without auth, or before a token was accepted.
 */
function tokenOf(request: FastifyRequest): { tokenId?: string; tokenName?: string } {
  const auth = request.auth;
  if (!auth || auth.tokenId === 'anonymous') return {};
  return { tokenId: auth.tokenId, tokenName: auth.name };
}
