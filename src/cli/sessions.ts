// `asgd-serve sessions ls|show|rm|snapshot|download|import|restore|fork`: what an operator does with sessions,
// over the API.
import { createWriteStream } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { positionals, stringOption, wholeOption, type ParsedArgs } from './args.ts';
import { CliError, EXIT, notOurs, usageError } from './http.ts';
import { age, bytes, duration, fields, table } from './output.ts';
import type { OpsContext } from './context.ts';
import { readStateFile, WHATS, type What } from './state-file.ts';

interface Storage { log_bytes: number; log_steps: number; snapshot_bytes: number; snapshots: number; replay_point_bytes?: number; other_bytes: number; total_bytes: number }
interface Session {
  name: string; version: number; step: number; numel: number;
  params: { name: string; shape: number[]; numel: number }[];
  param_groups: Record<string, unknown>[];
  snapshot_every: number; keep_snapshots: number; max_staleness: number | null;
  keep_log_bytes?: number | null; expire_after_idle_s?: number | null;
  created_at: string; updated_at: string; storage?: Storage;
  aggregation?: { contributions?: number; target_samples?: number; timeout_s?: number; min_contributions?: number } | null;
  round?: { version: number; contributions: number; workers: string[]; age_s: number } | null;
}
interface Snapshot { id: number; version: number; step: number; reason: string; pinned: boolean; byte_size: number; created_at: string }

const path = (name: string) => `/v1/sessions/${encodeURIComponent(name)}`;

export const SESSION_OPTIONS = {
  limit: { kind: 'value' },
  yes: { kind: 'switch', short: 'y' },
  pin: { kind: 'switch' },
  snapshot: { kind: 'value' },
  version: { kind: 'value' },
  format: { kind: 'value' },
  what: { kind: 'value' },
  output: { kind: 'value', short: 'o' },
  'if-match': { kind: 'value' },
  // fork: the new session's settings, as POST .../fork takes them (default: the source's)
  'snapshot-every': { kind: 'value' },
  'keep-snapshots': { kind: 'value' },
  'max-staleness': { kind: 'value' },
  'keep-log-bytes': { kind: 'value' },
  'expire-after-idle-s': { kind: 'value' },
} as const;

/** The options each command takes (beside --url, --token, --json, --help): any other is refused naming it. */
export const SESSION_COMMAND_OPTIONS: Record<string, readonly (keyof typeof SESSION_OPTIONS)[]> = {
  ls: ['limit'],
  show: [],
  rm: ['yes', 'if-match'],
  snapshot: ['pin'],
  download: ['format', 'what', 'output', 'snapshot', 'version'],
  import: ['what', 'if-match'],
  // (--version: refused with a word on what to do instead)
  restore: ['snapshot', 'yes', 'if-match', 'version'],
  fork: ['snapshot', 'version', 'snapshot-every', 'keep-snapshots', 'max-staleness', 'keep-log-bytes', 'expire-after-idle-s'],
};
SESSION_COMMAND_OPTIONS.list = SESSION_COMMAND_OPTIONS.ls;
SESSION_COMMAND_OPTIONS.delete = SESSION_COMMAND_OPTIONS.rm;

const COMMANDS = 'ls, show, rm, snapshot, download, import, restore, fork';

export async function sessionsCommand(sub: string | undefined, args: ParsedArgs, ctx: OpsContext): Promise<number> {
  switch (sub) {
    case 'ls':
    case 'list':
      return list(args, ctx);
    case 'show':
      return show(args, ctx);
    case 'rm':
    case 'delete':
      return remove(args, ctx);
    case 'snapshot':
      return snapshot(args, ctx);
    case 'download':
      return download(args, ctx);
    case 'import':
      return importFile(args, ctx);
    case 'restore':
      return restore(args, ctx);
    case 'fork':
      return fork(args, ctx);
    default:
      throw usageError(sub === undefined ? `sessions: say what to do (${COMMANDS})` : `sessions: unknown command ${JSON.stringify(sub)} (${COMMANDS})`);
  }
}

/** Every session, page by page (at most --limit of them). */
async function list(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  positionals(args, [], 'sessions ls');
  const max = wholeOption(args, 'limit') ?? Infinity;
  const sessions: Session[] = [];
  let after: string | null = null;
  do {
    const pageSize = Math.min(1000, max - sessions.length);
    const query: string = `?storage=true&limit=${pageSize}${after ? `&after=${encodeURIComponent(after)}` : ''}`;
    const page: { sessions: Session[]; next: string | null } = await ctx.client.json('GET', `/v1/sessions${query}`);
    if (!Array.isArray(page?.sessions) || (page.next !== null && typeof page.next !== 'string')) throw notOurs('GET /v1/sessions');
    sessions.push(...page.sessions);
    // Names come in order: a cursor that does not move on (or a page with nothing) would page forever.
    if (page.next !== null && (page.sessions.length === 0 || (after !== null && page.next <= after))) throw notOurs('GET /v1/sessions (its next page does not move on)');
    after = page.next;
  } while (after !== null && sessions.length < max);
  if (ctx.json) return ctx.print({ sessions });
  if (sessions.length === 0) {
    ctx.out('no sessions\n');
    return EXIT.ok;
  }
  ctx.out(table(
    ['NAME', 'VERSION', 'STEP', 'PARAMS', 'STORED', 'LOG STEPS', 'SNAPSHOTS', 'IDLE', 'EXPIRES AFTER'],
    sessions.map((s) => [
      s.name, s.version, s.step, s.numel, bytes(s.storage?.total_bytes), s.storage?.log_steps ?? '-', s.storage?.snapshots ?? '-',
      age(s.updated_at), s.expire_after_idle_s ? duration(s.expire_after_idle_s) : 'never',
    ]),
  ));
  return EXIT.ok;
}

async function show(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name] = positionals(args, ['name'], 'sessions show');
  const session = await ctx.client.json<Session>('GET', path(name));
  const { snapshots } = await ctx.client.json<{ snapshots: Snapshot[] }>('GET', `${path(name)}/snapshots`);
  if (ctx.json) return ctx.print({ ...session, snapshots });
  const st = session.storage;
  ctx.out(fields([
    ['name', session.name],
    ['version', session.version],
    ['step', session.step],
    ['parameters', `${plural(session.params.length, 'tensor')}, ${plural(session.numel, 'element')}`],
    ['param groups', session.param_groups.map((g) => `lr=${g.lr} lambd=${g.lambd} alpha=${g.alpha} t0=${g.t0} weight_decay=${g.weight_decay}`).join('; ')],
    ['snapshot every', `${session.snapshot_every} steps`],
    ['keep snapshots', session.keep_snapshots],
    ['keep log bytes', session.keep_log_bytes == null ? 'no bound' : bytes(session.keep_log_bytes)],
    ['max staleness', session.max_staleness ?? 'none'],
    ['expire after idle', session.expire_after_idle_s ? duration(session.expire_after_idle_s) : 'never'],
    ['created', `${session.created_at} (${age(session.created_at)} ago)`],
    ['updated', `${session.updated_at} (${age(session.updated_at)} ago)`],
    ['rounds', roundsOf(session)],
    ['stored', st ? `${bytes(st.total_bytes)}: log ${bytes(st.log_bytes)} (${plural(st.log_steps, 'step')}), snapshots ${bytes(st.snapshot_bytes)} (${st.snapshots}), replay point ${bytes(st.replay_point_bytes ?? 0)}, other ${bytes(st.other_bytes)}` : '-'],
  ]));
  ctx.out('\n');
  ctx.out(snapshots.length === 0 ? 'no snapshots\n' : table(
    ['SNAPSHOT', 'VERSION', 'STEP', 'REASON', 'PINNED', 'SIZE', 'AGE'],
    snapshots.map((s) => [s.id, s.version, s.step, s.reason, s.pinned ? 'yes' : 'no', bytes(s.byte_size), age(s.created_at)]),
  ));
  return EXIT.ok;
}

/** `n word(s)`. */
const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;

/**
 * A session's rounds (aggregation) and its open round, as `sessions show` says them (a review: a round left
 * open by workers that went away could be seen only with --json).
 */
function roundsOf(session: Session): string {
  const a = session.aggregation;
  if (!a) return 'off (every step request is its own step)';
  const at = [a.contributions ? plural(a.contributions, 'contribution') : null, a.target_samples ? `${a.target_samples} samples` : null].filter(Boolean).join(' or ');
  const timeout = a.timeout_s ? ` or ${a.timeout_s} s${a.min_contributions ? ` with at least ${a.min_contributions}` : ''}` : '';
  const r = session.round;
  const open = r && r.contributions > 0
    ? `; open at version ${r.version}: ${plural(r.contributions, 'contribution')} (${r.workers.join(', ')}), first ${duration(Math.round(r.age_s))} ago`
    : '; no round open';
  return `a round steps at ${at}${timeout}${open}`;
}

async function remove(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name] = positionals(args, ['name'], 'sessions rm');
  // Read first: a misspelt name fails before any question, and the question can say what goes.
  const session = await ctx.client.json<Session>('GET', path(name));
  if (!args.options.yes) {
    if (!ctx.interactive) throw usageError(`sessions rm: not on a terminal: pass --yes to delete ${JSON.stringify(name)} without asking`);
    const what = `session ${JSON.stringify(name)} (version ${session.version}, ${bytes(session.storage?.total_bytes)} with its snapshots and log)`;
    if (!(await ctx.confirm(`Delete ${what}? This cannot be undone. [y/N] `))) {
      ctx.err('not deleted\n');
      return EXIT.usage;
    }
  }
  // After a question, only the version it named is deleted: steps taken meanwhile make it a 412.
  const headers = args.options['if-match'] !== undefined || args.options.yes ? ifMatch(args) : { 'if-match': `"${session.version}"` };
  await ctx.client.json('DELETE', path(name), undefined, headers);
  if (ctx.json) return ctx.print({ deleted: name });
  ctx.out(`deleted session ${name}\n`);
  return EXIT.ok;
}

async function snapshot(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name] = positionals(args, ['name'], 'sessions snapshot');
  const snap = await ctx.client.json<Snapshot>('POST', `${path(name)}/snapshots`, args.options.pin ? { pinned: true } : {});
  if (ctx.json) return ctx.print(snap);
  // The service answers the snapshot already at the current version where there is one (found by a review:
  // "take a snapshot" seemed to make none): said, with what wrote it.
  const earlier = snap.reason !== 'manual' ? `, the one already at this version (${snap.reason})` : '';
  ctx.out(`snapshot ${snap.id} of ${name} at version ${snap.version} (step ${snap.step})${snap.pinned ? ', pinned' : ''}${earlier}\n`);
  return EXIT.ok;
}

const FORMATS = ['pt', 'safetensors', 'json'] as const;

/**
 * Downloads a checkpoint (model + optimizer, torch.save), the optimizer's state_dict or the parameters, of
 * the current state or a snapshot. Written to FILE.part and renamed when complete, so an interrupted
 * download never leaves a file that looks whole.
 */
async function download(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name] = positionals(args, ['name'], 'sessions download');
  const format = stringOption(args, 'format');
  if (!format || !(FORMATS as readonly string[]).includes(format)) throw usageError(`sessions download: --format must be one of ${FORMATS.join(', ')}`);
  // safetensors holds tensors, not a pickled dict: its natural default is the model's parameters.
  const what = stringOption(args, 'what') ?? (format === 'safetensors' ? 'params' : 'checkpoint');
  if (!(WHATS as readonly string[]).includes(what)) throw usageError(`sessions download: --what must be one of ${WHATS.join(', ')}`);
  if (what === 'checkpoint' && format === 'safetensors') throw usageError('sessions download: a checkpoint is a torch.save file (--format pt) or JSON; use --what state_dict or params for safetensors');
  const output = stringOption(args, 'output');
  if (!output) throw usageError('sessions download: say where with -o FILE (or -o - for standard output)');
  const snapshotId = wholeOption(args, 'snapshot');
  const version = wholeOption(args, 'version');
  if (snapshotId !== undefined && version !== undefined) throw usageError('sessions download: --snapshot and --version exclude each other');
  const base = snapshotId !== undefined ? `${path(name)}/snapshots/${snapshotId}/${what}` : `${path(name)}/${what}`;
  const res = await ctx.client.stream(`${base}?format=${format}${version !== undefined ? `&version=${version}` : ''}`);
  const total = Number(res.headers.get('content-length')) || null;
  const body = Readable.fromWeb(res.body as import('node:stream/web').ReadableStream);
  const progress = progressMeter(total, ctx.progress ? ctx.err : null);
  if (output === '-') {
    await pipeline(body, progress.stream, ctx.stdoutStream());
    progress.done();
    return EXIT.ok;
  }
  const partial = `${output}.part`;
  let received = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      received += chunk.length;
      done(null, chunk);
    },
  });
  try {
    await pipeline(body, counter, progress.stream, createWriteStream(partial));
    if (total !== null && received !== total) throw new Error(`the answer ended after ${received} of ${total} bytes`);
    await rename(partial, output);
  } catch (err) {
    await rm(partial, { force: true });
    const code = (err as { code?: string }).code;
    const local = typeof code === 'string' && /^E(NOENT|ACCES|ISDIR|NOSPC|ROFS|PERM|NOTDIR)$/.test(code);
    throw new CliError(local ? EXIT.server : EXIT.unreachable, `download of ${name} failed: ${local ? `cannot write ${output} (written first as ${partial}): ${code}` : (err as Error).message}`);
  } finally {
    progress.done();
  }
  const version_ = res.headers.get('x-session-version');
  if (ctx.json) return ctx.print({ session: name, file: output, bytes: received, format, what, version: version_ ? Number(version_) : null, snapshot: snapshotId ?? null });
  ctx.out(`wrote ${output}: ${what} of ${name}${snapshotId !== undefined ? ` snapshot ${snapshotId}` : ''}${version_ ? ` at version ${version_}` : ''}, ${bytes(received)}\n`);
  return EXIT.ok;
}

/** If-Match for a change that applies only at this version (412 VERSION_MISMATCH otherwise). */
function ifMatch(args: ParsedArgs): Record<string, string> {
  const version = wholeOption(args, 'if-match');
  return version === undefined ? {} : { 'if-match': `"${version}"` };
}

/**
 * Loads a file into a session: PUT state_dict, checkpoint or params, by what the file holds (or --what).
 * Read and recognised before anything is sent, and the session read first: a misspelt name fails before
 * the upload.
 */
async function importFile(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name, file] = positionals(args, ['name', 'file'], 'sessions import');
  const forced = stringOption(args, 'what');
  if (forced !== undefined && !(WHATS as readonly string[]).includes(forced)) throw usageError(`sessions import: --what must be one of ${WHATS.join(', ')}`);
  const headers = ifMatch(args);
  const upload = await readStateFile(file, forced as What | undefined);
  await ctx.client.json<Session>('GET', path(name));
  const session = await ctx.client.upload<Session>('PUT', `${path(name)}/${upload.what}`, upload, headers);
  if (ctx.json) return ctx.print(session);
  ctx.out(`loaded ${upload.what} from ${file} into ${name}: version ${session.version} (step ${session.step})\n`);
  return EXIT.ok;
}

/** Rolls a session back to a snapshot, as a new version; asks first on a terminal, as rm does. */
async function restore(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [name] = positionals(args, ['name'], 'sessions restore');
  if (args.options.version !== undefined) {
    throw usageError('sessions restore: the service restores snapshots, not versions: download the version (sessions download NAME --version V --format pt -o FILE) and import that');
  }
  const snapshotId = wholeOption(args, 'snapshot');
  if (snapshotId === undefined) throw usageError('sessions restore: say which snapshot with --snapshot ID (sessions show NAME lists them)');
  const headers = ifMatch(args);
  // Read first: a misspelt name or snapshot fails before any question, and the question can say what changes.
  const session = await ctx.client.json<Session>('GET', path(name));
  const snap = await ctx.client.json<Snapshot>('GET', `${path(name)}/snapshots/${snapshotId}`);
  if (!args.options.yes) {
    if (!ctx.interactive) throw usageError(`sessions restore: not on a terminal: pass --yes to restore ${JSON.stringify(name)} without asking`);
    const question = `Restore session ${JSON.stringify(name)} (version ${session.version}, step ${session.step}) to snapshot ${snap.id} (version ${snap.version}, step ${snap.step})? ` +
      'Its state becomes a new version. [y/N] ';
    if (!(await ctx.confirm(question))) {
      ctx.err('not restored\n');
      return EXIT.usage;
    }
  }
  const restored = await ctx.client.json<Session>('POST', `${path(name)}/snapshots/${snapshotId}/restore`, undefined, headers);
  if (ctx.json) return ctx.print(restored);
  ctx.out(`restored ${name} to snapshot ${snap.id} (version ${snap.version}): version ${restored.version} (step ${restored.step})\n`);
  return EXIT.ok;
}

/** A setting that may be turned off (null): a whole number, or none (never, for an expiry). */
function nullableOption(args: ParsedArgs, name: string, min: number): number | null | undefined {
  const value = stringOption(args, name);
  if (value === 'none' || value === 'never') return null;
  if (value !== undefined && (!/^\d{1,15}$/.test(value) || Number(value) < min)) throw usageError(`--${name}: must be a whole number >= ${min} or none, got ${JSON.stringify(value)}`);
  return value === undefined ? undefined : Number(value);
}

/** A new session from another's current state or one of its snapshots (POST /v1/sessions/{name}/fork). */
async function fork(args: ParsedArgs, ctx: OpsContext): Promise<number> {
  const [source, target] = positionals(args, ['name', 'new_name'], 'sessions fork');
  if (args.options.version !== undefined) throw usageError('sessions fork: the service forks the current state or a snapshot (--snapshot ID), not a version');
  const snapshotId = wholeOption(args, 'snapshot');
  const body = {
    name: target,
    snapshot: snapshotId,
    snapshot_every: wholeOption(args, 'snapshot-every'),
    keep_snapshots: wholeOption(args, 'keep-snapshots'),
    max_staleness: nullableOption(args, 'max-staleness', 0),
    keep_log_bytes: nullableOption(args, 'keep-log-bytes', 1),
    expire_after_idle_s: nullableOption(args, 'expire-after-idle-s', 1),
  };
  const session = await ctx.client.json<Session>('POST', `${path(source)}/fork`, body); // undefined settings are left out
  if (ctx.json) return ctx.print(session);
  ctx.out(`forked ${source}${snapshotId !== undefined ? ` snapshot ${snapshotId}` : ''} into ${session.name}: version ${session.version}, step ${session.step}, ` +
    `${session.params.length} tensors, ${session.numel} elements\n`);
  return EXIT.ok;
}

/** Progress on stderr (when `write` is given: a terminal), redrawn in place at most 10 times a second. */
function progressMeter(total: number | null, write: ((s: string) => void) | null) {
  let seen = 0;
  let last = 0;
  const draw = () => write?.(`\r${bytes(seen)}${total ? ` of ${bytes(total)} (${Math.floor((100 * seen) / total)}%)` : ''}   `);
  return {
    stream: new Transform({
      transform(chunk: Buffer, _encoding, done) {
        seen += chunk.length;
        const now = Date.now();
        if (now - last > 100) {
          last = now;
          draw();
        }
        done(null, chunk);
      },
    }),
    done: () => {
      draw();
      write?.('\n');
    },
  };
}

