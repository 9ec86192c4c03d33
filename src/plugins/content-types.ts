// The body-parser policy, built from the media table (src/routes/media.ts): JSON read as bytes and bounded
// before it becomes a string, files as one bounded Buffer, and every route held to the types it lists.
import fp from 'fastify-plugin';
import { isUtf8 } from 'node:buffer';
import { Transform, type Readable, type TransformOptions } from 'node:stream';
import { errorCodes, type FastifyInstance, type FastifyRequest } from 'fastify';
import type { Config } from '../config.ts';
import { errors, headerText, quoteValue } from '../errors.ts';
import { firstDuplicateKey, jsonTooBigAt, quoteNonFiniteTokens, unstorableText } from '../formats/json-depth.ts';
import { BINARY_MEDIA_TYPES } from '../routes/media.ts';
import { MAX_DIMS, MAX_PARAMS, recordIntegerLiterals } from '../sessions/spec.ts';
import { acceptedTypes, unsupportedMediaType } from './errors.ts';

/** The deepest JSON body any route takes is a state_dict holding a nested-list tensor of 16 dimensions: about 22. */
export const MAX_JSON_DEPTH = 64;

/**
 * Arrays and objects in one JSON body at most. The most a request needs: a checkpoint or state_dict of
 * MAX_PARAMS parameters, each with its model tensor (an object, its shape and data lists) and its state
 * (an object; step, eta and mu as tensor objects; ax): 16 a parameter; 24 leaves room. JSON.parse builds
 * that many in about two seconds here.
 */
export const MAX_JSON_CONTAINERS = 24 * MAX_PARAMS + 1024;

/**
 * Keys of one JSON object at most: one a parameter (a step's grads, a state_dict's state) and room for a
 * group's extra keys; and of a whole body: a checkpoint's parameter takes about 20 (its tensor's, its
 * state's and their tensors').
 */
export const MAX_JSON_OBJECT_KEYS = MAX_PARAMS + 1024;
export const MAX_JSON_KEYS = 32 * MAX_PARAMS + 1024;

/** Keys a request's JSON body may hold in all when fewer than MAX_JSON_KEYS: set by jsonBoundBySession for a session's tensors. */
const jsonKeysOf = new WeakMap<FastifyRequest, number>();
export const boundJsonKeys = (request: FastifyRequest, keys: number): void => void jsonKeysOf.set(request, keys);

/** Bodies whose hyperparameters keep the kind of their numbers (torch's int t0): creation, state_dict loads, hyperparameter changes, and a step's param_groups. */
const LITERAL_ROUTES = new Set(['POST /v1/sessions', 'PUT /v1/sessions/:name/state_dict', 'PUT /v1/sessions/:name/checkpoint', 'PATCH /v1/sessions/:name/param_groups']);
const STEP_ROUTE = 'POST /v1/sessions/:name/step';
/** The key "param_groups" in a JSON text, also with its underscore escaped. */
const PARAM_GROUPS_KEY = /"param(?:_|\\u005[fF])groups"/;
/** Read again (with the literals' text) only up to this size: a bigger body keeps the usual kinds. */
const LITERAL_BODY_BYTES = 1024 * 1024;

/**
 * The body as JSON.parse reads it again with its numbers' source text, recording in integerLiterals which
 * hyperparameters were written as integers (`10`, not `10.0`: Python's json writes an int t0 so), for the
 * routes that store them; `body` itself (already checked, the same content) for the others.
 */
function withIntegerLiterals(request: FastifyRequest, text: string, body: unknown): unknown {
  if (text.length > LITERAL_BODY_BYTES) return body;
  const route = `${request.method} ${request.routeOptions.url}`;
  // A step's body is read again only when it sets hyperparameters (most steps do not; its gradient's numbers
  // make the second reading cost as much as the first).
  if (!LITERAL_ROUTES.has(route) && !(route === STEP_ROUTE && PARAM_GROUPS_KEY.test(text))) return body;
  return JSON.parse(text, recordIntegerLiterals as (key: string, value: unknown) => unknown);
}

/** JSON bodies from this size on count toward ASGD_JSON_IN_FLIGHT_BYTES. */
const COUNTED_JSON_BYTES = 1024 * 1024;
/** Bodies from this size on count toward ASGD_BODY_IN_FLIGHT_BYTES. */
const COUNTED_BODY_BYTES = 1024 * 1024;

const mib = (bytes: number) => `${(bytes / (1024 * 1024)).toFixed(bytes < 10 * 1024 * 1024 ? 1 : 0)} MiB`;

declare module 'fastify' {
  interface FastifyInstance {
    /** Request body bytes held now: counted toward ASGD_BODY_IN_FLIGHT_BYTES, and JSON toward ASGD_JSON_IN_FLIGHT_BYTES. */
    bodiesInFlight(): { bodies: number; json: number };
  }
}

export default fp(
  async function contentTypesPlugin(fastify: FastifyInstance, opts: { config: Config }) {
    const limit = opts.config.bodyLimitJson;
    // Large JSON bodies parsed and held at once, bounded: JSON.parse of a body of floats takes several times
    // its size of heap (the text, then an array of numbers), and six 160 MB creates sent together took the
    // process past V8's heap limit (found by a hostile review). A body is counted once it has arrived whole,
    // before it is parsed (not when its length is announced: two clients announcing 256 MiB and sending
    // nothing would have shut large bodies out), until its answer is sent or its connection closes (a
    // client that gave up on a slow answer got no onResponse, and its share was held for good). A body
    // over the bound waits for none: 503 with Retry-After (the clients retry it); one is always taken.
    const budget = opts.config.jsonInFlightBytes;
    let inFlight = 0;
    const held = new WeakMap<FastifyRequest, number>();
    const hold = (request: FastifyRequest, bytes: number): Error | null => {
      if (budget === 0 || bytes < COUNTED_JSON_BYTES || held.has(request)) return null;
      if (inFlight > 0 && inFlight + bytes > budget) {
        return errors.unavailable(`body: ${mib(bytes)} of JSON while this process holds ${mib(inFlight)} of JSON bodies it is parsing or answering (ASGD_JSON_IN_FLIGHT_BYTES ${mib(budget)}: parsing JSON takes several times its size in memory); retry shortly, or send large tensors as safetensors`, 1);
      }
      inFlight += bytes;
      held.set(request, bytes);
      return null;
    };
    const release = (request: FastifyRequest) => {
      const bytes = held.get(request);
      if (bytes === undefined) return;
      held.delete(request);
      inFlight -= bytes;
    };
    // Request bodies received and held at once, bounded (ASGD_BODY_IN_FLIGHT_BYTES): a body is read whole
    // before its route can look at it (a file's tensor names, a JSON step's session), so twenty 200 MB
    // uploads aimed at a 2-element session held 2.6 GB, and past a container's memory the process is killed
    // (found by a review). Counted as its bytes arrive, for bodies from 1 MiB on, until its answer is sent or
    // its connection closes: what the process really holds (an announced length reserves nothing, so that
    // clients announcing much and sending little shut nobody out). A body that would take the total past
    // the bound while others hold some is refused with 503 and Retry-After, at once when its announced
    // length says so, else when its bytes reach it; one body is always taken (up to its route's limit).
    const bodyBudget = opts.config.bodyInFlightBytes;
    let bodyBytes = 0;
    const bodyBusy = (bytes: number) => errors.unavailable(
      `body: ${mib(bytes)} while this process holds ${mib(bodyBytes)} of request bodies it is receiving or has not answered yet (ASGD_BODY_IN_FLIGHT_BYTES ${mib(bodyBudget)}); retry shortly`, 1);
    fastify.decorate('bodiesInFlight', () => ({ bodies: bodyBytes, json: inFlight }));
    if (bodyBudget > 0) {
      fastify.addHook('preParsing', async (request, reply, payload) => {
        if (request.method === 'GET' || request.method === 'HEAD' || request.method === 'OPTIONS') return payload;
        const chunked = request.headers['transfer-encoding'] !== undefined;
        const declared = chunked ? NaN : Number(request.headers['content-length']);
        if (!chunked && !(declared >= COUNTED_BODY_BYTES)) return payload; // small, or none
        if (declared > 0 && bodyBytes > 0 && bodyBytes + declared > bodyBudget) throw bodyBusy(declared);
        let mine = 0;
        reply.raw.once('close', () => {
          bodyBytes -= mine;
          mine = 0;
        });
        return bodyStage(payload, {
          transform(chunk: Buffer, _encoding, done) {
            const next = mine + chunk.length;
            if (next >= COUNTED_BODY_BYTES && bodyBytes > mine && bodyBytes + chunk.length > bodyBudget) return done(bodyBusy(next));
            mine = next;
            bodyBytes += chunk.length;
            done(null, chunk);
          },
        });
      });
    }
    // Bodies are JSON or files; fastify's default text/plain parser would hand routes a string.
    fastify.removeContentTypeParser('text/plain');
    // JSON arrives as bytes and is bounded before it becomes one string: a text beyond V8's string limit
    // (~512 MiB) would otherwise throw inside the body reader and take the process down.
    const parseJson = fastify.getDefaultJsonParser('error', 'error');
    fastify.removeContentTypeParser('application/json');
    /** Bodies holding text PostgreSQL cannot store (a NUL, an unpaired surrogate): the field's path. */
    const unstorableIn = new WeakMap<object, string>();
    fastify.addHook('preHandler', async (request) => {
      const bad = unstorableIn.get(request);
      if (bad !== undefined) throw errors.invalidBody(`${bad}: text with a NUL character or an unpaired UTF-16 surrogate is not accepted (PostgreSQL stores neither)`);
    });
    /** Whether `text` is JSON as JSON.parse reads it (which takes "__proto__" as a plain key: nothing is polluted). */
    const isJsonText = (text: string): boolean => {
      try {
        JSON.parse(text);
        return true;
      } catch {
        return false;
      }
    };
    fastify.addContentTypeParser('application/json', { parseAs: 'buffer' }, (request, body, done) => {
      const bytes = body as Buffer;
      // No body announced as JSON (clients that set Content-Type on every request) on a route that takes
      // none (DELETE, restore): no body, not 'the body is empty'.
      if (bytes.length === 0 && request.routeOptions.url !== undefined && request.routeOptions.schema?.body === undefined) {
        done(null, undefined);
        return;
      }
      // Nor on a route whose body is optional (POST …/snapshots): as if none was sent (a review: 400 INVALID_JSON).
      if (bytes.length === 0 && ((request.routeOptions.schema?.body as { anyOf?: { type?: unknown }[] } | undefined)?.anyOf ?? []).some((s) => s.type === 'null')) {
        done(null, null);
        return;
      }
      if (bytes.length > limit) {
        done(errors.jsonBodyTooLarge(limit), undefined);
        return;
      }
      // Counted once it is here, before it is parsed.
      const busy = hold(request, bytes.length);
      if (busy) {
        done(busy, undefined);
        return;
      }
      // JSON is UTF-8 (RFC 8259): a body announced in another charset would be misread, not refused.
      const params = mediaTypeParameters(request.headers['content-type'] ?? '');
      if (params instanceof Error) {
        done(params, undefined);
        return;
      }
      const charset = params.get('charset');
      if (charset !== undefined && !/^utf-?8$/i.test(charset)) {
        done(errors.unsupportedMediaType(`application/json; charset=${quoteValue(headerText(charset))}`, 'application/json (UTF-8)'), undefined);
        return;
      }
      // Bytes that are not UTF-8 would become U+FFFD silently (a parameter named "w\xff" stored as "w\ufffd").
      if (!isUtf8(bytes)) {
        done(errors.invalidJson('it is not UTF-8 text'), undefined);
        return;
      }
      // Nesting is bounded before JSON.parse builds anything (formats/json-depth.ts).
      const text = bytes.toString('utf8');
      const big = jsonTooBigAt(text, MAX_JSON_DEPTH, MAX_JSON_CONTAINERS);
      if (big?.kind === 'deep') {
        done(errors.invalidBody(`body: JSON nested deeper than ${MAX_JSON_DEPTH} levels (at character ${big.at}); no request nests that deep (a tensor has at most ${MAX_DIMS} dimensions)`), undefined);
        return;
      }
      if (big?.kind === 'wide') {
        done(errors.invalidBody(`body: JSON with more than ${MAX_JSON_CONTAINERS} arrays and objects (at character ${big.at}); no request needs that many (at most ${MAX_PARAMS} parameters, a few each; a tensor's data is one flat list)`), undefined);
        return;
      }
      // A key given twice: JSON.parse would keep the last (a step of {"grads": A, "grads": B} applied B).
      const keys = Math.min(MAX_JSON_KEYS, jsonKeysOf.get(request) ?? MAX_JSON_KEYS);
      const twice = firstDuplicateKey(text, MAX_JSON_OBJECT_KEYS, keys);
      if (twice?.many) {
        done(errors.invalidBody(`body: JSON with more than ${MAX_JSON_OBJECT_KEYS} keys in one object or ${keys} in all (at character ${twice.at}); no request needs that many (at most ${MAX_PARAMS} parameters)`), undefined);
        return;
      }
      if (twice) {
        done(errors.invalidBody(`body: the key ${JSON.stringify(twice.key.slice(0, 100))} appears twice in one object (at character ${twice.at}); give each key once`), undefined);
        return;
      }
      parseJson(request, text, (err, body) => {
        // Python's json.dumps writes a NaN or an infinity as a bare NaN / Infinity, which is not JSON: read
        // as the strings the API takes for them, so that the field is named (a gradient's 422, a metric's or
        // a hyperparameter's 400) instead of a 400 'not valid JSON' that names nothing.
        const quoted = err ? quoteNonFiniteTokens(text) : null;
        if (quoted !== null) parseJson(request, quoted, done);
        else {
          // Valid JSON whose key would reach an object's prototype once parsed (secure-json-parse refuses it):
          // named, and where, rather than 'not valid JSON'. No field of the API has such a name.
          // __proto__ is refused wherever it is; "constructor" only holding a "prototype" (a parameter may be
          // called constructor): the message names the key that was refused, not the first of the two.
          const at = err ? /"(__proto__)"\s*:/.exec(text) ?? /"(constructor)"\s*:\s*\{[^{}]*"prototype"\s*:/.exec(text) : null;
          if (err && isJsonText(text)) {
            // The key may be spelled with escapes ("\u005f_proto__"): then the message names what it is.
            done(errors.invalidBody(at
              ? `body: the key "${at[1]}" (at character ${at.index}) is not accepted in a JSON body: no field of this API has that name`
              : 'body: a key "__proto__" (or "constructor" holding "prototype"), spelled with \\u escapes, is not accepted in a JSON body: no field of this API has that name'), undefined);
          } else {
            // A NUL or an unpaired surrogate can only come as a \u escape: only then is the value walked.
            // Refused after the route's schema (preHandler below), which names a field it checks with its own code.
            const bad = !err && text.includes('\\u') ? unstorableText(body, '') : null;
            if (bad) unstorableIn.set(request, bad);
            done(err, err ? body : withIntegerLiterals(request, text, body));
          }
        }
      });
    });
    fastify.addHook('preParsing', async (request, reply) => {
      // A file's type the route does not take is a 415 before its body is read, as a type no route takes is
      // (preValidation below checked it once the body was in: a client with Expect: 100-continue got its 100
      // and sent 5 MB of safetensors to PUT checkpoint for a 415; a hostile review).
      if (request.method !== 'GET' && request.method !== 'HEAD' && BINARY_MEDIA_TYPES.includes(request.mediaType ?? '')
        && !acceptedTypes(request).includes(request.mediaType ?? '')) {
        throw unsupportedMediaType(request);
      }
      // Refuse a JSON body announced as too large before reading it.
      if (request.mediaType !== 'application/json') return;
      const announced = Number(request.headers['content-length']);
      if (announced > limit) throw errors.jsonBodyTooLarge(limit);
      // A large one's share (taken by the parser) goes with the response's close: emitted once it is sent
      // (injected ones too) or when the connection ends first. No hook on every other request.
      if (budget > 0 && !(announced < COUNTED_JSON_BYTES)) reply.raw.once('close', () => release(request));
    });
    // Files (torch.save, safetensors) arrive as one Buffer, bounded by the route's bodyLimit; their format's
    // reader in src/formats checks them, not AJV (route schemas key their body schema by media type).
    fastify.addContentTypeParser([...BINARY_MEDIA_TYPES], (request, payload, done) => {
      readBinaryBody(payload, request.headers['content-length'], request.routeOptions.bodyLimit ?? opts.config.bodyLimitDefault, done);
    });
    // A route accepts the media types its schema lists in `consumes` (JSON only when it lists none); the
    // parsers above are global, so without this a file sent to a JSON route would reach its handler.
    fastify.addHook('preValidation', async (request) => {
      if (request.headers['content-type'] === undefined || request.body === undefined) return;
      if (!acceptedTypes(request).includes(request.mediaType ?? '')) throw unsupportedMediaType(request);
      // A route that takes no body (DELETE, restore, …) refuses one rather than act as if it had not seen it;
      // an empty JSON object or null is no body.
      if (request.routeOptions.url !== undefined && request.routeOptions.schema?.body === undefined && !isEmptyJson(request.body)) {
        throw errors.invalidBody(`body: ${request.method} ${request.routeOptions.url ?? ''} takes no body`);
      }
    });
  },
  { name: 'content-types' },
);

function isEmptyJson(body: unknown): boolean {
  return body === null || (typeof body === 'object' && !Buffer.isBuffer(body) && !Array.isArray(body) && Object.keys(body as object).length === 0);
}

/**
 * The parameters of a Content-Type (RFC 9110 section 5.6.6: `; name=token` or `; name="quoted string"`),
 * names lowercased; charset given twice, or a parameter that is neither form, is an error naming the header.
 */
function mediaTypeParameters(header: string): Map<string, string> | Error {
  const params = new Map<string, string>();
  const bad = (why: string) => errors.invalidHeader('Content-Type', why);
  let at = header.indexOf(';');
  if (at < 0) return params;
  const PARAM = /[ \t]*;[ \t]*(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+)|"((?:[^"\\]|\\.)*)"))?[ \t]*/y;
  while (at < header.length) {
    PARAM.lastIndex = at;
    const m = PARAM.exec(header);
    if (!m || m[0].length === 0) return bad(`a parameter is not name=value or name="value" (at ${quoteValue(headerText(header.slice(at, at + 40)))})`);
    at = PARAM.lastIndex;
    if (m[1] === undefined) continue; // an empty parameter (";;", a trailing ";")
    const name = m[1].toLowerCase();
    if (params.has(name)) {
      if (name === 'charset') return bad('charset is given twice');
      continue; // the first of another parameter given twice: none is read
    }
    params.set(name, m[2] ?? m[3].replace(/\\(.)/g, '$1'));
  }
  return params;
}

/**
 * A stage of a body's stream (a byte counter, a bound, the disk guard): `payload` piped through a Transform
 * of `stage`. An error of the stream before goes on through the stage (pipe() does not carry it). The
 * reader that takes the body hears the stage's errors, but a request answered before its body was read (a
 * 404 from a session lookup) leaves the stage unread, and a client that then resets its connection made it
 * emit an error nobody heard, which ended the process (seen once in CI, on a 404 of a chunked step): the
 * stage has a listener of its own. Piped, not pipeline(): a refusal must not destroy the request (its socket
 * carries the answer).
 */
export function bodyStage(payload: NodeJS.ReadableStream, stage: Pick<TransformOptions, 'transform' | 'flush'>): Transform {
  const out = new Transform(stage);
  payload.on('error', (err) => out.destroy(err));
  out.on('error', () => {});
  // Piped once something reads the stage (flowing, or a 'readable' listener), not now: the request's first
  // read sends the 100 Continue a client with Expect: 100-continue waits for (app.ts continueOnRead), and a
  // hook after this one may still refuse the request (a session that does not exist, a JSON body over its
  // session's bound) before the client sends its body. Piped at once, a body of 1 MiB or more got its 100
  // (curl then sent it all) before the 404 or 413.
  let piped = false;
  const start = () => {
    if (piped) return;
    piped = true;
    out.removeListener('newListener', onListener);
    payload.pipe(out);
  };
  const onListener = (event: string | symbol) => {
    if (event === 'readable') start();
  };
  out.on('newListener', onListener);
  out.once('resume', start);
  return out;
}

type Done = (err: Error | null, body?: Buffer) => void;

/**
 * A file body (torch.save, safetensors: up to a GiB of tensors) read straight into one Buffer sized from
 * Content-Length, without Fastify's list of chunks and the concatenation copy at the end: half the peak
 * memory and one pass less over the bytes. Without a Content-Length (chunked), the chunks are joined once.
 * Limits and errors are Fastify's own (413 FST_ERR_CTP_BODY_TOO_LARGE before a byte is read when the
 * announced length is over the route's bodyLimit, 400 FST_ERR_CTP_INVALID_CONTENT_LENGTH when the bytes
 * received differ from it), so the error mapping is unchanged. The Buffer is allocated uninitialised: its
 * pages are backed by memory only as bytes arrive, so a client that announces a large body and sends
 * little holds little.
 */
function readBinaryBody(payload: Readable, contentLength: string | undefined, limit: number, done: Done): void {
  const declared = contentLength === undefined ? NaN : Number(contentLength);
  if (declared > limit) {
    done(new errorCodes.FST_ERR_CTP_BODY_TOO_LARGE());
    return;
  }
  const sized = Number.isSafeInteger(declared) && declared >= 0;
  let target: Buffer | null = null;
  try {
    target = sized ? Buffer.allocUnsafe(declared) : null;
  } catch {
    // Not this much memory to be had (a body limit set beyond it): refused as too large, not a 500.
    done(errors.bodyTooLargeToHold(declared));
    return;
  }
  const chunks: Buffer[] = [];
  let received = 0;
  let finished = false;

  const finish = (err: Error | null, body?: Buffer) => {
    if (finished) return;
    finished = true;
    payload.removeListener('data', onData);
    payload.removeListener('end', onEnd);
    payload.removeListener('error', onError);
    done(err, body);
  };
  function onData(chunk: Buffer | string) {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    if (received + bytes.length > limit) return finish(new errorCodes.FST_ERR_CTP_BODY_TOO_LARGE());
    if (target) {
      if (received + bytes.length > target.length) return finish(new errorCodes.FST_ERR_CTP_INVALID_CONTENT_LENGTH());
      bytes.copy(target, received);
    } else {
      chunks.push(bytes); // a chunk may be a view of the socket's buffer: copied once, by the concat below
    }
    received += bytes.length;
  }
  function onEnd() {
    if (target) {
      if (received !== target.length) return finish(new errorCodes.FST_ERR_CTP_INVALID_CONTENT_LENGTH());
      return finish(null, target);
    }
    finish(null, Buffer.concat(chunks, received));
  }
  function onError(err: Error & { statusCode?: number }) {
    if (!(typeof err.statusCode === 'number' && err.statusCode >= 400)) err.statusCode = 400;
    finish(err);
  }
  payload.on('data', onData);
  payload.on('end', onEnd);
  payload.on('error', onError);
  payload.resume();
}
