// Conditional and waiting reads: If-None-Match: "<version>" answers 304 while the session (or the
// version asked for) is that version; `after_version` + `wait` holds a read of the parameters until a
// newer version commits on any replica (the notifier hears it), else answers 304 when the wait ends.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { errors } from '../../errors.ts';
import { checkTokenStillActive, ifMatchVersions, ifNoneMatchTags, setVersion, tokenSlots, untilClientGone } from '../common.ts';
import { maxWaitsPerToken } from '../../plugins/notifier.ts';

/** Waiting reads each stored token holds in each app (process), bounded by maxWaitsPerToken. */
const waitsOf = new WeakMap<FastifyInstance, ReturnType<typeof tokenSlots>>();

export const MAX_WAIT_SECONDS = 60;

/**
 * If-None-Match (RFC 9110 section 13.1.2): weak comparison, so W/"3" and "3" are alike; a list matches
 * when any tag does; "*" matches any current state. Tags this service did not send never match.
 */
export function noneMatch(request: FastifyRequest, version: number): boolean {
  const tags = ifNoneMatchTags(request.headers['if-none-match']);
  if (tags === null || tags === '*') return tags === '*';
  return tags.some((tag) => {
    // Entity tags are opaque strings: "3" (or W/"3"), not "03", an unquoted 3 or an unbalanced "3.
    return tag === `"${version}"`;
  });
}

export function sendNotModified(reply: FastifyReply, version: number) {
  setVersion(reply, version);
  return reply.code(304).send();
}

/**
 * If-Match on a read (RFC 9110 section 13.1.1, evaluated before If-None-Match): the answer's tag is
 * "<version>" of the version read (`target`); a tag that is not it is 412 VERSION_MISMATCH, whose body
 * carries that version. Returns the version the tag names, or null without the header ("*" too).
 */
export function readIfMatch(request: FastifyRequest, target: number, current = target): number | null {
  const versions = ifMatchVersions(request);
  if (versions === null) return null;
  if (!versions.has(target)) {
    const expected = versions.size ? Math.min(...versions) : -1;
    // Of an older version (?version=): said as such; the body and the ETag carry the session's version, as on every 412.
    throw target === current ? errors.versionMismatch(expected, current) : errors.readVersionMismatch(expected, target, current);
  }
  return target;
}

/** Whether the request has a condition on the version (If-Match or If-None-Match). */
export const conditional = (request: FastifyRequest): boolean => request.headers['if-none-match'] !== undefined || request.headers['if-match'] !== undefined;

/**
 * A read whose answer is of `version` (a session, its series, its norms; an older one with ?version=, the
 * session being at `current`): 412 for an If-Match that does not name it; true when a 304 was sent for an
 * If-None-Match that does.
 */
export function notModifiedAt(request: FastifyRequest, reply: FastifyReply, version: number, current = version): boolean {
  readIfMatch(request, version, current);
  if (!noneMatch(request, version)) return false;
  sendNotModified(reply, version);
  return true;
}

/**
 * For GET params/state_dict/checkpoint with If-Match or If-None-Match: true when a 304 was sent (the state
 * at the version asked for, or the current one, is the one the client holds). If-Match is checked here
 * first (an early 412, no state built) and again on the state read (checkIfMatchRead): a step may commit in
 * between. One small read.
 */
export async function answeredNotModified(fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, name: string, version: number | null): Promise<boolean> {
  if (!conditional(request)) return false;
  const session = await fastify.sessions.get(name);
  const target = version ?? session.version;
  if (target > session.version) return false; // the read refuses a version not reached yet
  return notModifiedAt(request, reply, target, session.version);
}

/**
 * If-Match against the state a read built (the current one may have moved on since answeredNotModified):
 * 412 rather than an answer of a version the tags do not name. Pinning the read to the tag's version
 * instead would rebuild a version that a load or a snapshot's retention may have pruned meanwhile (found
 * by a review: a 404 for a version current a moment before).
 */
export async function checkIfMatchRead(fastify: FastifyInstance, request: FastifyRequest, name: string, version: number): Promise<void> {
  if (request.headers['if-match'] === undefined) return;
  const versions = ifMatchVersions(request);
  if (versions === null || versions.has(version)) return;
  readIfMatch(request, version, (await fastify.sessions.get(name)).version);
}

/**
 * `after_version` (+ `wait` seconds): returns when the session is past `afterVersion` (the caller then
 * answers as usual), or sends a 304 with the current version and returns false when the wait ends first.
 * The waiter is registered before the version is read, so a commit in between is not missed; a client
 * that disconnects releases it at once.
 */
export async function waitPastVersion(
  fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, name: string, afterVersion: number, waitSeconds: number,
): Promise<boolean> {
  if (waitSeconds > MAX_WAIT_SECONDS) throw errors.invalidQuery('wait', `at most ${MAX_WAIT_SECONDS} seconds`);
  // One stored token may hold a quarter of the process's waiting reads (a read token could take them all).
  let slots = waitsOf.get(fastify);
  if (!slots) waitsOf.set(fastify, (slots = tokenSlots()));
  const perToken = maxWaitsPerToken(fastify.server.maxConnections);
  const release = slots.take(request, perToken, () => errors.tooManyStreams(perToken, 'waiting reads', 'a quarter'));
  try {
    return await waitPast(fastify, request, reply, name, afterVersion, waitSeconds);
  } finally {
    release();
  }
}

async function waitPast(
  fastify: FastifyInstance, request: FastifyRequest, reply: FastifyReply, name: string, afterVersion: number, waitSeconds: number,
): Promise<boolean> {
  // Also a client gone before the wait began (its connection closed while its token was looked up): the
  // wait held its slots for all its seconds (a review: 8 requests sent and dropped at once locked a token
  // out for a minute).
  const gone = untilClientGone(request, reply);
  const began = Date.now();
  const deadline = began + waitSeconds * 1000;
  // A stored token revoked during the wait gets no data: it is asked again before a newer version is
  // answered, once the wait has lasted a second (the request itself was authenticated when it came).
  const newer = async (): Promise<true> => {
    await checkTokenStillActive(fastify, request, began, 'this read waited');
    return true;
  };
  // Nor the version a 304 carries after the wait (found by a review: a revoked token's wait ended in 304).
  const notModified = async (version: number): Promise<false> => {
    await checkTokenStillActive(fastify, request, began, 'this read waited');
    await sendNotModified(reply, version);
    return false;
  };
  try {
    for (;;) {
      const remaining = deadline - Date.now();
      const waiter = remaining > 0 && !gone.signal.aborted ? fastify.versions.waitFor(name, afterVersion, remaining, gone.signal) : null;
      try {
        if (waiter) await fastify.versions.listening(name);
        const session = await fastify.sessions.get(name);
        if (session.version > afterVersion) return newer();
        if (!waiter) return notModified(session.version);
        await waiter.ready;
      } finally {
        waiter?.cancel();
      }
      // Woken: a newer version, a deletion, a listener reset, the timeout, a disconnect or shutdown. Read again.
      const closing = fastify.versions.stats().closed;
      // At shutdown the connection must not stay open idle after this answer: the server closes idle
      // connections once, when it starts closing, and would otherwise wait out their keep-alive.
      if (closing) reply.header('connection', 'close');
      if (gone.signal.aborted || closing) {
        const session = await fastify.sessions.get(name);
        if (session.version > afterVersion) return newer();
        // Shutting down: the wait was cut short, which a 304 would pass off as "nothing new in `wait`
        // seconds"; a 503 sends the client to wait again (on another replica), as every request refused at shutdown.
        if (!gone.signal.aborted) throw errors.unavailable(`shutting down: the wait for a version after ${afterVersion} was cut short; wait again`);
        return notModified(session.version);
      }
    }
  } finally {
    gone.stop();
  }
}
