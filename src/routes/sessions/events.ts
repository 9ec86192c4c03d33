// GET /v1/sessions/:name/events: a text/event-stream of the session's new versions (what a dashboard
// plots live), fed by the notifier: `event: version` per new version, coalesced to the latest when they
// come faster than they are read; `: keep-alive` every 15 s; `event: deleted` and the end when the
// session is deleted. `Last-Event-ID` (or ?after_version) resumes: a newer version is sent at once. An
// event's id is `<version>@<session row id>`: a resume of a session that was deleted (and perhaps created
// again under its name: its versions go on from the deleted one's, retired_names, but they are another
// session's) while the client reconnected is told `deleted`, not handed the other session's versions as if
// they followed its own.
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from 'typebox';
import { ApiError, errors } from '../../errors.ts';
import { errorResponses, NameParams } from '../schemas.ts';
import { ACCESS, storedTokenId, tokenSlots } from '../common.ts';
import { requireAccepts } from '../media.ts';
import { MAX_STREAMS_PER_TOKEN } from '../../plugins/notifier.ts';
import type { SessionRecord } from '../../sessions/repository.ts';

export const KEEP_ALIVE_MS = 15_000;
/**
 * What a stream may hold unsent for a client that does not read it: beyond this, no event is written (the
 * newest is sent once the client has taken the rest), and a client that takes nothing of it for
 * STALLED_STREAM_MS is cut. Events written regardless piled up in memory: 100 streams that did not read
 * held 400 MB after 1,500 steps (found by a hostile-input review).
 */
const MAX_UNSENT_BYTES = 64 * 1024;
const STALLED_STREAM_MS = 60_000;
/** How long a token found active is trusted by the streams it opened before one of them asks again. */
const TOKEN_RECHECK_MS = 1000;

/** An `event: version` of the session whose row id is `sessionId`; its id is what a client resumes from. */
const versionEvent = (version: number, sessionId: number, data: object): string =>
  `id: ${version}@${sessionId}\nevent: version\ndata: ${JSON.stringify(data)}\n\n`;

/** The `kind` of a version that is not a step, from the reason of the snapshot it wrote. */
const KIND_OF_REASON: Record<string, string> = { load_state_dict: 'load', load_checkpoint: 'load', load_params: 'load', hyperparameters: 'hyperparameters', restore: 'restore', create: 'create', fork: 'create' };

const eventsRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  /**
   * Whether a stored token is still active, asked at most once a second per token in this process: the
   * streams of one token (a dashboard open in many tabs) share one query. The database away: true (the
   * next check decides).
   */
  const checks = new Map<string, { until: number; active: Promise<boolean> }>();
  const tokenActive = (tokenId: string): Promise<boolean> => {
    const now = Date.now();
    const known = checks.get(tokenId);
    if (known && now < known.until) return known.active;
    for (const [id, check] of checks) if (check.until <= now) checks.delete(id); // only a second's tokens stay
    const active = fastify.tokens.isActive(tokenId).catch(() => true);
    checks.set(tokenId, { until: now + TOKEN_RECHECK_MS, active });
    return active;
  };

  /** Event streams each stored token holds in this process (MAX_STREAMS_PER_TOKEN each). */
  const streams = tokenSlots();

  /**
   * The session's latest change, one read shared by the streams of a session that one signal (one NOTIFY
   * of a commit, delivered to each of them) woke: a thousand streams of one session made a thousand
   * queries a step (steps went from 7 to 286 ms). A read started before a signal is not shared with the
   * streams that signal wakes (it may not see that commit).
   */
  type Change = Awaited<ReturnType<typeof fastify.sessions.latestChange>>;
  const reads = new Map<string, { cause: object; read: Promise<Change> }>();
  const latestChange = (name: string, cause: object): Promise<Change> => {
    const shared = reads.get(name);
    if (shared && shared.cause === cause) return shared.read;
    const entry = { cause, read: fastify.sessions.latestChange(name) };
    reads.set(name, entry);
    const done = () => {
      if (reads.get(name) === entry) reads.delete(name);
    };
    entry.read.then(done, done);
    return entry.read;
  };

  fastify.get('/:name/events', {
    config: ACCESS.read,
    schema: {
      operationId: 'getEvents',
      summary: 'Follow the session\'s versions as server-sent events',
      description: 'text/event-stream. `event: version`, `id: <version>@<n>`, data {"version", "step", "time", "kind": "step"|"load"|"restore"|…, "metrics"?, "staleness"?} ' +
        'for each new version (under load only the latest of several); a `: keep-alive` comment every 15 s; `event: deleted` when the session is deleted. ' +
        '`<n>` tells sessions of one name apart: a session deleted and created again under its name has another. ' +
        'Last-Event-ID (an event\'s id, or a version) or ?after_version=V: a version above V is sent at once; an id of another session of this name (the one followed was deleted meanwhile) is answered `event: deleted`.',
      tags: ['training'],
      params: NameParams,
      querystring: Type.Object({ after_version: Type.Optional(Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'The version you have (as Last-Event-ID)' })) }),
      // NaN: what the TypeScript client before event ids named the session sends back after one (it read the
      // id as a number): taken as a resume from an unknown point, so that such a client still reconnects.
      headers: Type.Object({ 'last-event-id': Type.Optional(Type.String({ pattern: '^(?:[0-9]{1,15}(@[0-9]{1,15})?|NaN)$', 'x-rule': 'an event\'s id (<version>@<n>) or a version: whole numbers written in decimal', description: 'The id of the last event received (or the version you have)' })) }),
      response: {
        200: { description: 'The event stream', content: { 'text/event-stream': { schema: Type.String() } } },
        ...errorResponses(400, 401, 403, 404, 406, 429, 503),
      },
    },
  }, async (request, reply) => {
    const { name } = request.params;
    requireAccepts(request, 'text/event-stream'); // as every route answers an Accept it cannot meet (a hostile review: 200 to Accept: application/json)
    const current: SessionRecord = await fastify.sessions.get(name); // 404 before the stream starts
    // HEAD: the stream's headers and no stream (a body would never be sent, and the slot held until the client gave up).
    if (request.method === 'HEAD') return reply.header('content-type', 'text/event-stream; charset=utf-8').header('cache-control', 'no-cache, no-transform').send('');
    const lastId = request.headers['last-event-id']?.split('@');
    const resume = request.query.after_version ?? (lastId === undefined ? null : lastId[0] === 'NaN' ? current.version + 1 : Number(lastId[0]));
    /** An id of another session of this name: the one the client followed was deleted while it reconnected. */
    const followedGone = lastId?.[1] !== undefined && Number(lastId[1]) !== current.id;
    // A bare version past the current one is another session's too (it cannot tell): the current version is
    // sent at once, as after any gap.
    let sent = resume === null ? current.version : resume > current.version ? current.version - 1 : resume;
    const res = reply.raw;
    let ended = false;
    let keepAlive: NodeJS.Timeout | undefined;
    let recheck: NodeJS.Timeout | undefined;
    const end = () => {
      if (ended) return;
      ended = true;
      clearInterval(keepAlive);
      clearInterval(recheck);
      release();
      res.end();
      // What is still unsent when the stream ends (after deleted, a revoked token) goes within STALLED_STREAM_MS
      // or the connection is cut: the keep-alive check that cut a client taking nothing has stopped.
      if (!res.writableFinished) {
        const cut = setTimeout(() => res.destroy(), STALLED_STREAM_MS);
        cut.unref();
        res.once('close', () => clearTimeout(cut));
      }
    };
    /** When the client stopped taking what was written (0: it takes it). */
    let stalledSince = 0;
    /** Whether more than MAX_UNSENT_BYTES wait for the client: then the next event waits for it to drain. */
    const congested = (): boolean => {
      if (res.writableLength <= MAX_UNSENT_BYTES) return false;
      if (stalledSince === 0) {
        stalledSince = Date.now();
        res.once('drain', () => {
          stalledSince = 0;
          void refresh();
        });
      }
      return true;
    };
    const write = (text: string) => {
      if (!ended) res.write(text);
    };
    // A stream opened with a stored token ends once the token is revoked, on any replica: checked before an
    // event is sent and every second while idle (one query a second per token in this process, shared by its
    // streams: tokenActive). The admin token and auth off have no row.
    const tokenId = storedTokenId(request);
    const opened = Date.now();
    const allowed = async (): Promise<boolean> => {
      // The request itself was authenticated a moment ago.
      if (tokenId === null || Date.now() < opened + TOKEN_RECHECK_MS) return true;
      const active = await tokenActive(tokenId);
      if (!active) end();
      return active;
    };

    // The newest version announced to this process (NOTIFY carries version and step) and when: a session
    // deleted right after a step is gone by the time it is read, and that step's event is sent from this.
    let announced: { version: number; step: number; at: Date } | null = null;
    /** What woke the next read (a signal, shared with the other streams it woke; else this stream's own). */
    let cause: object = {};
    const onSignal = (signal: { version: number; step: number } | null) => {
      if (signal && signal.version > 0 && signal.version > (announced?.version ?? 0)) announced = { ...signal, at: new Date() };
      cause = signal ?? {};
      void refresh();
    };
    /**
     * The session followed is gone: the last step announced for it (if not sent yet; not when another session
     * of the name is there, whose steps are announced alike), `deleted`, the end.
     */
    const deleted = (replaced = false) => {
      const last = replaced ? null : announced;
      if (last && last.version > sent) {
        const data = { version: last.version, step: last.step, time: last.at.toISOString(), kind: 'step' };
        write(versionEvent(last.version, current.id, data));
      }
      // replaced: another session of the name is there now (created after this one was deleted).
      // retry: a day, so that a browser's EventSource, which reconnects after a stream ends (with the same
      // Last-Event-ID: it would be told this again every 2 s), does not come back; its page closes it on this event.
      write(`retry: 86400000\nevent: deleted\ndata: ${JSON.stringify({ session: name, ...(replaced && { replaced: true }) })}\n\n`);
      end();
    };
    // Reads the latest version once per burst of signals: a signal during a read asks for one more read.
    let reading = false;
    let again = false;
    const refresh = async () => {
      if (reading) {
        again = true;
        return;
      }
      reading = true;
      try {
        do {
          again = false;
          let change;
          try {
            change = await latestChange(name, cause);
          } catch (err) {
            if (err instanceof ApiError && err.code === 'SESSION_NOT_FOUND') {
              deleted();
            } else {
              // The database is away: the listener's reset after it returns triggers another read.
              request.log.warn({ err }, 'event stream could not read the session');
            }
            return;
          }
          const { session, point, reason } = change;
          // Deleted and created again under its name between two reads: the session followed is gone.
          if (session.id !== current.id) {
            deleted(true);
            return;
          }
          if (session.version <= sent) continue;
          if (!(await allowed())) return;
          if (congested()) return; // sent once the client has taken what waits ('drain' reads again)
          sent = session.version;
          const data = point
            ? { version: session.version, step: session.step, time: point.createdAt.toISOString(), kind: 'step', staleness: point.staleness, ...(point.metrics && { metrics: point.metrics }) }
            : { version: session.version, step: session.step, time: session.updatedAt.toISOString(), kind: (reason && KIND_OF_REASON[reason]) ?? reason ?? 'change' };
          write(versionEvent(session.version, current.id, data));
        } while (again && !ended);
      } finally {
        reading = false;
      }
    };

    // Holds a bounded slot (503 TOO_MANY_WAITERS beyond it) before the answer starts.
    // At shutdown the socket goes too: the server closes idle keep-alive connections only once, early.
    const releaseToken = streams.take(request, MAX_STREAMS_PER_TOKEN, () => errors.tooManyStreams(MAX_STREAMS_PER_TOKEN));
    let releaseSlot: () => void;
    try {
      releaseSlot = fastify.versions.openStream(name, onSignal, () => {
        end();
        if (res.writableFinished) res.socket?.destroy();
        else res.once('finish', () => res.socket?.destroy());
      });
    } catch (err) {
      releaseToken();
      throw err;
    }
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      releaseSlot();
      releaseToken();
    };
    reply.hijack();
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no', // nginx (docker-compose) would otherwise buffer the stream
      'x-request-id': request.id,
    });
    write('retry: 2000\n\n');
    res.on('close', end);
    if (followedGone) {
      deleted(true);
      return;
    }
    // A client that hung up while the session was looked up closed before this listener: release its slot now.
    if (request.raw.socket.destroyed) {
      end();
      return;
    }
    let lastUnsent = 0;
    keepAlive = setInterval(() => {
      const unsent = res.writableLength;
      // A client that took some since the last look is slow, not stalled: the clock starts again.
      if (stalledSince !== 0 && unsent < lastUnsent) stalledSince = Date.now();
      lastUnsent = unsent;
      if (stalledSince !== 0 && Date.now() - stalledSince >= STALLED_STREAM_MS) {
        request.log.warn({ unsentBytes: res.writableLength, stalledMs: Date.now() - stalledSince }, 'the event stream\'s client took nothing of it; closing the connection');
        end();
        res.destroy();
        return;
      }
      // Bytes still waiting for the client keep the connection busy enough: no keep-alive on top of them.
      if (res.writableLength === 0) void allowed().then((ok) => ok && write(': keep-alive\n\n'));
    }, KEEP_ALIVE_MS);
    keepAlive.unref();
    if (tokenId !== null) {
      recheck = setInterval(() => void allowed(), TOKEN_RECHECK_MS);
      recheck.unref();
    }
    // A commit between the read above and the subscription is not missed: once this process listens to the
    // session (its steps are announced from then on), read once more. If the lease cannot be taken now, the
    // notifier retries it and asks for a read when it holds it.
    fastify.versions.listening(name).then(
      () => void refresh(),
      (err: unknown) => {
        request.log.warn({ err }, 'event stream could not take the listening lease');
        void refresh();
      },
    );
  });
};

export default eventsRoutes;
