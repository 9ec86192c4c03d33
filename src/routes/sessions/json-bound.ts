// JSON bodies of a session's tensors (a step's gradients, PUT params) bounded by the session's size before
// they are read whole and parsed: parsing JSON holds the event loop (a 256 MiB step to a 9-parameter session:
// 19 s and 2.6 GB), and a step token may send them. The session is looked up first where this process does
// not hold it (a cold replica, an evicted session): an unknown name is a 404 before its body is read.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { errors } from '../../errors.ts';
import { bodyStage, boundJsonKeys } from '../../plugins/content-types.ts';
import { NAME_PATTERN, SESSION_NAME_RULE } from '../../sessions/spec.ts';

/**
 * The most bytes a JSON body of a session's tensors of `numel` elements in `params` parameters can need: 64 a
 * number (a double's longest text, its comma, and the indentation of a pretty-printed nested list), 1 KiB a
 * parameter (its name, shape and brackets), and 1 MiB for the rest (metrics, param_groups, base_version).
 */
export function jsonTensorsLimit(numel: number, params: number): number {
  return 64 * numel + 1024 * params + 1024 * 1024;
}

/**
 * The most bytes a file (safetensors, torch.save) of a session's tensors of `numel` elements in `params`
 * parameters can need: 8 a number (float64 too, so that such a file reaches the reader that names its
 * dtype), 4 KiB a parameter (its name, header or pickle entry, a zip record's headers and alignment), and
 * 1 MiB for the rest.
 */
export function fileTensorsLimit(numel: number, params: number): number {
  return 8 * numel + 4096 * params + 1024 * 1024;
}

/** Below this, a body is not worth a lookup: every session's bound is above it. */
const FLOOR = Math.min(jsonTensorsLimit(0, 0), fileTensorsLimit(0, 0));

/**
 * The size of the session a request of `/:name` names, from this process's copy or else looked up (an
 * unknown name: 404 SESSION_NOT_FOUND), while its body waits unread.
 */
async function sessionSize(fastify: FastifyInstance, request: FastifyRequest, payload: NodeJS.ReadableStream): Promise<{ numel: number; params: number }> {
  const name = (request.params as { name: string }).name;
  // The path is checked by the route's schema after the body: here, before the lookup, a name no session
  // can have is refused as that check refuses it (a review: a NUL reached PostgreSQL, 400 BAD_REQUEST).
  if (!NAME_PATTERN.test(name)) throw errors.invalidPart('params', 'name', `must be ${SESSION_NAME_RULE}`);
  const cached = fastify.sessions.cachedSize(name);
  if (cached !== null) return cached;
  // The body's stream (metrics' byte counter, for a chunked one) may fail while the session is looked up:
  // a client that breaks off its chunks, or hangs up. Nothing reads it yet, so its error is heard here and
  // passed on (found by a review: unheard, it ended the process).
  let failed: unknown = null;
  const onError = (err: unknown) => (failed ??= err);
  payload.on('error', onError);
  let size: { numel: number; params: number };
  try {
    size = sizeOf(await fastify.sessions.get(name)); // unknown: 404
  } finally {
    payload.removeListener('error', onError);
  }
  if (failed !== null) throw failed;
  return size;
}

/** A body worth a lookup of its session before it is read: above the floor, or of no announced length. */
const large = (request: FastifyRequest) => {
  const declared = request.headers['content-length'];
  return declared === undefined || Number(declared) > FLOOR;
};

/**
 * A preParsing hook for a route of `/:name` taking a file (a state_dict, a checkpoint): a large body to a
 * session that does not exist is a 404 before it is read (an operator's review: 858 MB read, then refused).
 */
export function sessionBeforeBody(fastify: FastifyInstance) {
  return async (request: FastifyRequest, _reply: unknown, payload: NodeJS.ReadableStream): Promise<NodeJS.ReadableStream> => {
    if (large(request)) await sessionSize(fastify, request, payload);
    return payload;
  };
}

/**
 * A preParsing hook for a route of `/:name` taking a session's tensors: bodies above the session's bound
 * are refused with 413 before they are read (`what`: "a JSON step", `tensors`: "gradients"; files: `file`,
 * "a file of gradients"), and a large body to a session that does not exist with 404. A file's bound is
 * looser than JSON's (fileTensorsLimit); without it a step token could have 1 GiB bodies held in memory
 * for a session of six numbers (found by a hostile review: 400 MB held at once by two such steps).
 */
export function jsonBoundBySession(fastify: FastifyInstance, what: string, tensors: string, file: { what: string; hint: string }) {
  return async (request: FastifyRequest, reply: FastifyReply, payload: NodeJS.ReadableStream): Promise<NodeJS.ReadableStream> => {
    // With a Content-Length the body is what it announces (the body reader holds it to that): checked here,
    // the payload left as it is (untouched, so that a 100 Continue is only sent once the body is wanted).
    if (!large(request)) return payload;
    const size = await sessionSize(fastify, request, payload);
    const declared = request.headers['content-length'];
    if (!/^application\/json\b/i.test(request.headers['content-type'] ?? '')) {
      const limit = fileTensorsLimit(size.numel, size.params);
      const tooLarge = () => errors.fileTensorsTooLarge(file.what, limit, size.numel, size.params, file.hint);
      if (declared !== undefined) {
        // As the route's own body limit answers (Fastify closes the connection after a body parser's error): the
        // file, up to a GiB, is not read to keep the connection, which closes lingering (app.ts) so that the client
        // still reads the 413 while it sends; a client that stops sending is cut after 5 s.
        if (Number(declared) > limit) {
          reply.header('connection', 'close');
          throw tooLarge();
        }
        return payload;
      }
      return boundedStream(payload, limit, tooLarge);
    }
    const limit = jsonTensorsLimit(size.numel, size.params);
    // And its keys: a tensor as {"shape", "data", "dtype"} and its name, a group's hyperparameters (a group
    // a parameter at most), metrics: a step token cannot make the parser build millions of keys in a body
    // its size bound lets through (3 million in a 40 MB step held the event loop 40 s: a hostile review).
    boundJsonKeys(request, 12 * size.params + 4096);
    const tooLarge = () => errors.jsonTensorsTooLarge(what, tensors, limit, size.numel);
    if (declared !== undefined) {
      if (Number(declared) > limit) throw tooLarge();
      return payload;
    }
    return boundedStream(payload, limit, tooLarge);
  };
}

function sizeOf(session: { numel: number; params: readonly unknown[] }): { numel: number; params: number } {
  return { numel: session.numel, params: session.params.length };
}

/** `payload` passed through until more than `limit` bytes have come, then failed with `tooLarge()`. */
function boundedStream(payload: NodeJS.ReadableStream, limit: number, tooLarge: () => Error): NodeJS.ReadableStream {
  let seen = 0;
  return bodyStage(payload, {
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length;
      if (seen > limit) callback(tooLarge());
      else callback(null, chunk);
    },
  });
}
