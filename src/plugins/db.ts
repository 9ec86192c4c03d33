// The database as a named plugin: opened (and migrated when asked) at boot, closed in onClose.
import { existsSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { join, resolve } from 'node:path';
import fp from 'fastify-plugin';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { openDatabase, type Database } from '../db/database.ts';
import { bodyStage } from './content-types.ts';
import type { Config } from '../config.ts';
import { describeDbFailure } from '../db/errors.ts';
import { databaseTarget, untilConnected } from '../db/wait.ts';
import { diskRoom, type DiskRoom, type DiskShort } from '../db/disk-room.ts';
import { createUpkeep } from '../db/vacuum.ts';
import { errors } from '../errors.ts';
import { findSession, hasKeyAnswer } from '../sessions/repository.ts';
import { sessionStorage } from '../sessions/storage.ts';

declare module 'fastify' {
  interface FastifyInstance {
    db: Database;
    /** The embedded database's disk guard (src/db/disk-room.ts); null on PostgreSQL and in memory. */
    diskRoom: DiskRoom | null;
  }
}

/** The routes that answer a retry from its Idempotency-Key (a step, PUT params/state_dict/checkpoint, PATCH param_groups, a restore). */
const KEYED_ROUTE = /\/(step|params|state_dict|checkpoint|param_groups|restore)$/;

/**
 * A retry of a request whose answer is kept under its Idempotency-Key: answered from that record, it writes
 * nothing, so the disk guard lets it through. A 507 in its place (an operator's review) left the client
 * unaware that its step had committed: sent again under a new key once the disk had room, it counted twice.
 * Only on a route that answers from the key, and only while the key stays kept for as long as the request
 * may take to arrive (`marginSeconds`): one that expired meanwhile would be committed as a new write (found
 * by a review: on a disk with no room that write hung PGlite).
 */
async function answeredUnderKey(db: Database, windowSeconds: number, marginSeconds: number, request: FastifyRequest): Promise<boolean> {
  const key = request.headers['idempotency-key'];
  const name = (request.params as { name?: unknown } | undefined)?.name;
  if (typeof key !== 'string' || typeof name !== 'string' || !KEYED_ROUTE.test(request.routeOptions.url ?? '')) return false;
  if (windowSeconds <= marginSeconds) return false;
  return hasKeyAnswer(db, name, key, windowSeconds - marginSeconds).catch(() => false);
}

export interface DbPluginOptions {
  config: Config;
  /** Apply migrations at start-up (the default for the embedded database; replicas use `asgd-serve migrate`). */
  migrate: boolean;
  /** Use this database instead of opening one (tests share one). */
  database?: Database;
}

/** A session's stored bytes (0 when it does not exist). */
async function storedBytes(db: Database, name: unknown): Promise<number> {
  if (typeof name !== 'string') return 0;
  const session = await findSession(db, name);
  return session ? ((await sessionStorage(db, session.id))?.total_bytes ?? 0) : 0;
}

/** The least free space a small write (below) is let through with. */
const SMALL_WRITE_FLOOR = 32 * 1024 * 1024;

/** PATCHes that write a row, not a state: a session's settings, a snapshot's pin. */
const SMALL_PATCH_ROUTES = new Set(['/v1/sessions/:name', '/v1/sessions/:name/snapshots/:id']);

/** The largest body read to its end before a 507 (a bigger one is answered at once, and its connection closed). */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;
/** How often the room is looked at again while a body of no declared length arrives. */
const ROOM_CHECK_BYTES = 1024 * 1024;

function drained(stream: Readable): Promise<void> {
  return new Promise((resolve) => {
    stream.on('end', resolve).on('error', () => resolve()).on('close', resolve);
    stream.resume();
  });
}

/** host:port/database of a PostgreSQL URL, for a log line (never the password). */
export default fp(
  async function dbPlugin(fastify: FastifyInstance, opts: DbPluginOptions) {
    const { databaseUrl, dataDir } = opts.config;
    // PGlite runs initdb (in WebAssembly: 17-49 s measured) when its directory has no PG_VERSION, the test
    // it makes itself: say so before it begins, or the first start is silent for that long.
    if (!opts.database && !databaseUrl && dataDir !== 'memory://' && !existsSync(join(dataDir, 'PG_VERSION'))) {
      fastify.log.info({ dataDir: resolve(dataDir) }, 'initialising a new embedded database: the first start can take up to a minute');
    }
    const db =
      opts.database ??
      (await openDatabase({
        databaseUrl,
        dataDir,
        poolSize: opts.config.dbPoolSize,
        silenceTimeoutMs: opts.config.dbTimeoutMs,
        onError: (err) => fastify.log.warn({ err }, 'database connection error'),
        onWarning: (message) => fastify.log.warn(message),
      }));
    // Without migrating at start the replica needs no database to start: it answers 503 until one answers.
    if (opts.migrate) {
      try {
        // A PostgreSQL still starting or down (a host reboot starts every container at once; Kubernetes and
        // systemd restart a replica that exits, with growing delays): wait for it, saying where, rather than exit.
        const applied = await untilConnected(() => db.migrate(), {
          waitMs: databaseUrl && !opts.database ? opts.config.dbStartTimeoutMs : 0,
          onWait: (err, waitedMs) => fastify.log.warn({ database: databaseTarget(databaseUrl) }, `waiting for PostgreSQL (${describeDbFailure(err)}); ${Math.round(waitedMs / 1000)} s so far, up to ${Math.round(opts.config.dbStartTimeoutMs / 1000)} s (ASGD_DB_START_TIMEOUT_MS)`),
        });
        if (applied > 0) fastify.log.info({ applied }, `database migrated: ${applied} migration${applied === 1 ? '' : 's'} applied (ASGD_MIGRATE)`);
      } catch (err) {
        // Nothing else will close it: the app never finished starting. (It may hold a data directory.)
        if (!opts.database) await db.close().catch(() => {});
        throw err;
      }
    }
    fastify.decorate('db', db);
    if (databaseUrl) {
      // Without autovacuum nothing reclaims the rows the service deletes (the log behind each snapshot, pruned
      // snapshots, expired keys): the tables grow without bound (a soak review on a server with autovacuum
      // off: 7 MB to 816 MB in 4 minutes, at a few hundred steps a second). Said once at start, not fatal.
      db.query<{ autovacuum: string; track_counts: string }>("SELECT current_setting('autovacuum') AS autovacuum, current_setting('track_counts') AS track_counts")
        .then(([row]) => {
          if (row && (row.autovacuum !== 'on' || row.track_counts !== 'on')) {
            fastify.log.warn({ autovacuum: row.autovacuum, track_counts: row.track_counts }, 'PostgreSQL runs without autovacuum (autovacuum or track_counts is off): the space of the rows this service deletes (the log behind each snapshot, pruned snapshots) is never reclaimed and its tables grow without bound; turn it on, or VACUUM the database regularly');
          }
        })
        .catch(() => {}); // unreachable now: the health checks say so
    }
    // Writes on the embedded database need room on its disk: refused (507, the state unchanged) without it.
    const room = !databaseUrl && dataDir !== 'memory://' ? diskRoom(dataDir, opts.config.minFreeBytes) : null;
    fastify.decorate('diskRoom', room);
    if (room) {
      /** Stored bytes of the sessions whose DELETE is under way in this process. */
      let deletesInFlight = 0;
      // How long a request may take to arrive and be handled: a key must stay kept that long past the check.
      const keyMarginSeconds = (opts.config.requestTimeoutMs || 3_600_000) / 1000 + 60;
      // Before the body is read, after auth (onRequest): a caller without a token learns nothing of the disk.
      fastify.addHook('preParsing', async (request, reply, payload) => {
        if (request.method === 'GET' || request.method === 'HEAD' || request.method === 'OPTIONS') return;
        const declared = request.headers['content-length'] !== undefined && request.headers['transfer-encoding'] === undefined;
        const body = declared ? Number(request.headers['content-length']) || 0 : 0;
        // The body is logged (a gradient) or written as a state, and a snapshot may follow: twice its size.
        // What frees space or writes a few bytes needs only half the floor: a DELETE (a session with its
        // log and snapshots, a token's revocation), a settings PATCH (lower keep_snapshots) or a pin's
        // (an operator's review: with the disk low, nothing could be deleted and no token revoked).
        // A session's DELETE writes WAL for every page it empties (up to the session's bytes, in full-page
        // images after a checkpoint): it needs that room besides, or PGlite could be left without any.
        const route = request.routeOptions.url ?? '';
        const sessionDelete = request.method === 'DELETE' && route === '/v1/sessions/:name';
        const small = request.method === 'DELETE' || (request.method === 'PATCH' && SMALL_PATCH_ROUTES.has(route));
        const refusal = (short: DiskShort) => errors.insufficientStorage(`${request.method} ${request.url.split('?', 1)[0]}`, short,
          sessionDelete ? 'half of ASGD_MIN_FREE_BYTES, at least 32 MiB, and the stored bytes of this session and of the deletes under way: a delete writes WAL for every page it empties'
            : small ? 'half of ASGD_MIN_FREE_BYTES, at least 32 MiB, for a small write' : undefined);
        // Deletes in flight count together (a delete frees nothing until the vacuum: a review's five at once
        // each passed against the same free space). Never below 32 MiB free, two WAL segments.
        const deleted = sessionDelete ? await storedBytes(db, (request.params as { name?: unknown }).name) : 0;
        const relief = Math.max(0, Math.min(Math.floor(opts.config.minFreeBytes / 2), opts.config.minFreeBytes - SMALL_WRITE_FLOOR));
        const short = room(small ? deletesInFlight + deleted - relief : 2 * body);
        if (!short && deleted > 0) {
          deletesInFlight += deleted;
          reply.raw.once('close', () => { deletesInFlight -= deleted; });
        }
        if ((short || !declared) && (await answeredUnderKey(db, opts.config.idempotencyWindowSeconds, keyMarginSeconds, request))) return;
        if (short) {
          // The body is read and dropped (nothing of it is written) so that a client sending it whole before it
          // reads the answer gets the 507, not a reset connection; with Expect: 100-continue it is never sent.
          if (body > 0 && body <= DRAIN_LIMIT_BYTES && !/100-continue/i.test(String(request.headers.expect ?? ''))) await drained(payload);
          throw refusal(short);
        }
        // A small write's body is bounded by its route (ASGD_BODY_LIMIT_DEFAULT): not measured as it comes.
        if (declared || small) return;
        // A body of no declared length (chunked) is measured as it arrives (the room looked at every
        // ROOM_CHECK_BYTES and at its end): once twice what has come exceeds the room, the rest is read and
        // dropped, as above, and the 507 answered at its end; past DRAIN_LIMIT_BYTES it is answered at once.
        let received = 0;
        let next = ROOM_CHECK_BYTES;
        let over: DiskShort | null = null;
        return bodyStage(payload, {
          transform(chunk: Buffer, _encoding, done) {
            received += chunk.length;
            if (!over && received >= next) {
              next = received + ROOM_CHECK_BYTES;
              over = room(2 * received);
            }
            if (!over) return done(null, chunk);
            done(received > DRAIN_LIMIT_BYTES ? refusal(over) : null);
          },
          flush(done) {
            over ??= room(2 * received);
            done(over ? refusal(over) : null);
          },
        });
      });
    }
    let stopVacuum = async (): Promise<void> => {};
    if (db.kind === 'pglite' && opts.config.vacuumIntervalMs > 0) {
      // No autovacuum in the embedded database: the service vacuums what its deletes left (src/db/vacuum.ts).
      let running: Promise<void> | null = null;
      const upkeep = createUpkeep(db);
      const timer = setInterval(() => {
        if (running) return;
        running = upkeep()
          .then(({ tables, checkpointed, ms }) => {
            if (tables.length || checkpointed) fastify.log.debug({ tables, checkpointed, ms }, 'embedded database: vacuumed the tables with many dead rows, checkpointed the WAL');
          })
          .catch((err) => fastify.log.warn({ err }, 'vacuuming the embedded database failed'))
          .finally(() => { running = null; });
      }, opts.config.vacuumIntervalMs);
      timer.unref();
      stopVacuum = async () => {
        clearInterval(timer);
        await running;
      };
    }
    fastify.addHook('onClose', async () => {
      await stopVacuum();
      if (!opts.database) await db.close();
    });
  },
  { name: 'db' },
);
