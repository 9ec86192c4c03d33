// Helpers shared by the route plugins: headers, session bodies, query parsing.
import { createHash } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Static, TSchema } from 'typebox';
import { errors } from '../errors.ts';
import { ASGD_NUMERIC_KEYS } from '../formats/index.ts';
import type { RouteAccess } from '../plugins/auth.ts';
import { type ChangeKey, isReplayed, type Replayed } from '../sessions/changes.ts';
import type { SessionRecord, SnapshotRecord } from '../sessions/repository.ts';
import type { RoundStatus } from '../sessions/rounds.ts';
import { CountedHolds } from '../sessions/mutex.ts';
import { numelOf, publicGroup } from '../sessions/spec.ts';
import { canonicalJson } from '../sessions/state.ts';
import { contentFormat } from './media.ts';
import type { Session, SessionChange, Snapshot } from './schemas.ts';

/**
 * The access a route needs, as its `config` (src/plugins/auth.ts reads it; a route without one stops the
 * app at start). allSessions: the route creates sessions or manages tokens, so a token limited to some
 * sessions may not use it.
 */
export const ACCESS = {
  public: { scope: 'public', allSessions: false },
  read: { scope: 'read', allSessions: false },
  step: { scope: 'step', allSessions: false },
  admin: { scope: 'admin', allSessions: false },
  adminAllSessions: { scope: 'admin', allSessions: true },
} as const satisfies Record<string, RouteAccess>;

/** An If-Match that names no version of the session: it never matches (412), as RFC 9110 asks. */
const IF_MATCH_NONE = -1;

/**
 * If-Match (RFC 9110 section 13.1.1): a list of entity tags, compared strongly, or "*" (any current
 * state: null, as no header). The service's tags are "<version>"; a weak tag (W/"3") or one that is not
 * a version written as the service writes it ("03", "x") never matches. A bare version (3, no quotes) is
 * taken as "3" (documented). Returns the versions the tags name (none: the header matches no version).
 */
export function ifMatchVersions(request: FastifyRequest): Set<number> | null {
  const raw = request.headers['if-match'];
  if (raw === undefined) return null;
  const value = (Array.isArray(raw) ? raw.join(',') : raw).trim();
  if (value === '*') return null;
  const versions = new Set<number>();
  // Empty list elements are ignored (RFC 9110 section 5.6.1.2: `, "6"` and `"6",` are "6"); a header of nothing else is malformed.
  const tags = value.split(',').map((part) => part.trim()).filter((tag) => tag !== '');
  if (tags.length === 0) throw errors.invalidHeader('If-Match', 'must be a session version as "<version>", a list of entity tags, or *');
  for (const tag of tags) {
    const version = /^(?:"([1-9]\d{0,14}|0)"|([1-9]\d{0,14}|0))$/.exec(tag);
    if (version) versions.add(Number(version[1] ?? version[2]));
    else if (!/^(?:W\/)?"[\x21\x23-\x7e\x80-\xff]*"$/.test(tag)) throw errors.invalidHeader('If-Match', 'must be a session version as "<version>", a list of entity tags, or *');
  }
  return versions;
}

/**
 * If-Match on a change (ifMatchVersions): the version it must apply at, IF_MATCH_NONE (412) for tags that
 * name none, or null. Tags naming two different versions are refused: a step or change applies at one.
 */
export function ifMatchOf(request: FastifyRequest): number | null {
  const versions = ifMatchVersions(request);
  if (versions === null) return null;
  if (versions.size > 1) throw errors.invalidHeader('If-Match', 'names more than one version; a change applies at one');
  return versions.size === 1 ? [...versions][0] : IF_MATCH_NONE;
}

/**
 * The entity tags of an If-None-Match header (RFC 9110 section 13.1.2), for weak comparison: each without
 * its W/ prefix, as sent (quotes kept), at most 64; '*' for "any current state"; null without the header.
 * The API's tags are versions (routes/sessions/conditional.ts), /ui's are file hashes (routes/ui/index.ts).
 */
export function ifNoneMatchTags(header: string | string[] | undefined): string[] | '*' | null {
  if (header === undefined) return null;
  const value = Array.isArray(header) ? header.join(',') : header;
  if (value.trim() === '*') return '*';
  return value.split(',').slice(0, 64).map((tag) => tag.trim().replace(/^W\//, ''));
}

export function idempotencyKeyOf(request: FastifyRequest): string | null {
  const raw = request.headers['idempotency-key'];
  if (raw === undefined) return null;
  const value = Array.isArray(raw) ? raw[0] : raw;
  if (!/^[\x21-\x7e]{1,255}$/.test(value)) throw errors.invalidHeader('Idempotency-Key', 'must be 1-255 visible ASCII characters');
  return value;
}

/**
 * The Idempotency-Key of a change that is not a step (PUT params/state_dict/checkpoint, PATCH param_groups,
 * a restore), or undefined. The request it names: the route and its path parameters, and the body (a
 * file's bytes with its format; JSON as its value, keys in any order, so a retry serialized anew is the
 * same request). A key of another request is IDEMPOTENCY_KEY_REUSED; one of a step too (its hash is other).
 * The answer kept is the session as the change left it (`round`: null, as after any new version), but for
 * its parameters' names and shapes, which never change.
 */
export function changeKeyOf(request: FastifyRequest): ChangeKey<SessionRecord> | undefined {
  const key = idempotencyKeyOf(request);
  if (key === null) return undefined;
  const hash = createHash('sha256').update(`${request.method} ${request.routeOptions.url} ${canonicalJson(request.params ?? {})}\n`);
  const body: unknown = request.body;
  if (Buffer.isBuffer(body)) hash.update(`${contentFormat(request)}\n`).update(body);
  else if (body !== undefined && body !== null) {
    try {
      hash.update(`json\n${canonicalJson(body, true)}`); // -0 as -0: PUT params with 0 and then -0 under one key was answered as a retry (a review)
    } catch {
      // Only nesting deep enough to exhaust the stack fails here; such a body is refused anyway.
      throw errors.invalidBody('nested too deeply');
    }
  }
  // The parameters' names and shapes are the session's for life: kept once, in the session, not with every
  // answer (a worker that clamps its weights after each step sends a PUT params a step).
  return {
    key, requestHash: `change:${hash.digest('hex')}`, answer: (session) => {
      const { params: _params, ...answer } = sessionJson(session, null);
      return answer;
    },
  };
}

/**
 * A change's answer: the session as it left it, with its open round when `roundOf` is given (a change that
 * may leave the version as it was), or a retry's first answer (`replayed`); with its ETag.
 */
export async function changeAnswer(
  reply: FastifyReply, result: SessionRecord | Replayed, roundOf?: (session: SessionRecord) => Promise<RoundStatus | null>,
): Promise<Static<typeof SessionChange>> {
  if (isReplayed(result)) {
    const now = sessionJson(result.session, null);
    const first = result.replayed as Omit<Static<typeof Session>, 'params'>;
    setVersion(reply, first.version);
    return { ...now, ...first, params: now.params, replayed: true };
  }
  setVersion(reply, result.version);
  return sessionJson(result, roundOf ? await roundOf(result) : null);
}

/**
 * The id of the stored token a request came with (a token that can be revoked while the request runs), or
 * null: the admin token from the environment, or auth off, which have no row.
 */
export function storedTokenId(request: FastifyRequest): string | null {
  const id = request.auth?.tokenId;
  return id === undefined || id === 'admin' || id === 'anonymous' ? null : id;
}

/**
 * Slots each stored token holds in one process (event streams, waiting reads): `take` counts one for the
 * request's token, or throws `refused()` when the token holds `limit` already; the release it returns may be
 * called more than once. A request without a stored token (the admin token, auth off) takes none.
 */
export function tokenSlots() {
  const held = new CountedHolds<string>();
  return {
    take(request: FastifyRequest, limit: number, refused: () => Error): () => void {
      const tokenId = storedTokenId(request);
      if (tokenId === null) return () => {};
      if (held.count(tokenId) >= limit) throw refused();
      return held.hold(tokenId);
    },
  };
}

/**
 * A signal that aborts when the client hangs up before its answer is written (at once when it already has:
 * its connection closed while the request was authenticated or looked up, before this listened), for work
 * done only for that answer (a wait, a queued read). `stop()` ends the watch.
 */
export function untilClientGone(request: FastifyRequest, reply: FastifyReply): { signal: AbortSignal; stop(): void } {
  const gone = new AbortController();
  const onClose = () => {
    if (!reply.raw.writableFinished) gone.abort();
  };
  reply.raw.once('close', onClose);
  if (request.raw.destroyed || request.raw.socket?.destroyed) gone.abort();
  return { signal: gone.signal, stop: () => reply.raw.removeListener('close', onClose) };
}

/**
 * For answers held a second or more (a waiting read, a round's contribution): 401 when the stored token the
 * request came with was revoked meanwhile, on any replica, so it gets no data. `since`: when the request was
 * authenticated. The admin token and auth off have no row; event streams check on their own (events.ts).
 */
export async function checkTokenStillActive(fastify: FastifyInstance, request: FastifyRequest, since: number, what: string): Promise<void> {
  const tokenId = storedTokenId(request);
  if (tokenId === null || Date.now() - since < 1000) return;
  if (!(await fastify.tokens.isActive(tokenId))) throw errors.unauthorized(`Authorization: the token was revoked while ${what}`, true);
}

/**
 * The version an answer shows, as its ETag. No cache may keep the answer: a session made again under a name
 * deleted over 30 days before (retired_names) counts its versions from 1 again, so a browser that revalidated a kept answer ("3") would
 * be told 304 and show the old session's state (the TypeScript client reads params with fetch). Clients that
 * hold a version send If-None-Match themselves and still get their 304.
 */
export function setVersion(reply: FastifyReply, version: number): void {
  reply.header('etag', `"${version}"`);
  reply.header('x-session-version', String(version));
  reply.header('cache-control', 'no-store');
}

/** A session as answers show it, with its open round (null for answers that just changed its version: a round is void then). */
export function sessionJson(s: SessionRecord, round: RoundStatus | null): Static<typeof Session> {
  return {
    name: s.name,
    version: s.version,
    step: s.step,
    numel: s.numel,
    params: s.params.map((p) => ({ name: p.name, shape: p.shape, numel: numelOf(p.shape) })),
    param_groups: s.groups.map(publicGroup),
    // In the keys' order, whatever order the changes that made them ints came in (a review).
    int_hyperparameters: s.groups.map((g) => ASGD_NUMERIC_KEYS.filter((k) => g.int_keys?.includes(k))),
    snapshot_every: s.snapshotEvery,
    keep_snapshots: s.keepSnapshots,
    max_staleness: s.maxStaleness,
    keep_log_bytes: s.keepLogBytes,
    expire_after_idle_s: s.expireAfterIdleS,
    aggregation: s.aggregation,
    round,
    created_at: s.createdAt.toISOString(),
    updated_at: s.updatedAt.toISOString(),
  };
}

export function snapshotJson(s: SnapshotRecord): Static<typeof Snapshot> {
  return {
    id: s.id,
    version: s.version,
    step: s.step,
    reason: s.reason,
    pinned: s.pinned,
    byte_size: s.byteSize,
    checksum: `sha256:${s.checksum}`,
    created_at: s.createdAt.toISOString(),
  };
}

/** A whole number from a query string or body field, or null when absent. */
export function optionalWhole(value: unknown, field: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | null {
  if (value === undefined || value === null || value === '') return null;
  const n = typeof value === 'string' && /^\d{1,15}$/.test(value) ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < min || n > max) {
    throw errors.invalidQuery(field, max === Number.MAX_SAFE_INTEGER ? `must be a whole number >= ${min}` : `must be a whole number from ${min} to ${max}`);
  }
  return n;
}

/**
 * The body of a route that takes JSON or a file: a Buffer for a file (its format's reader checks it), else
 * the JSON that AJV checked against `schema` (the route's body.content['application/json'] schema; the type
 * provider cannot infer a body keyed by media type, so the schema is named here once more).
 */
export function jsonOrFile<T extends TSchema>(
  body: unknown, schema: T, absent = (message: string): Error => errors.invalidBody(`body: ${message}`),
): Static<T> | Buffer {
  void schema;
  // No body (and so no Content-Type): AJV checks nothing, as no media type matched.
  if (body === undefined || body === null) throw absent('is required: JSON (Content-Type: application/json) or a file in a format this route takes');
  return body as Static<T> | Buffer;
}

/** A body schema keyed by media type: JSON checked by AJV, the route's other types (files) by their parsers. */
export const jsonBody = <T extends TSchema>(schema: T) => ({ content: { 'application/json': { schema } } });
