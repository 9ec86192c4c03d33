// ASGDClient: every operation of the asgd-serve API v1, typed from the OpenAPI document; the server-sent
// events of GET /v1/sessions/{name}/events as an async iterator.
import { ProtocolError, RoundPending, SessionNotFound, ShapeMismatch } from './errors.ts';
import { type Answer, type Exchange, newIdempotencyKey, parseJson, sleep, Transport, type TransportOptions } from './http.ts';
import { decodeSafetensors, encodeSafetensors, firstHalfOverflow, type SafetensorsFile } from './safetensors.ts';
import { asFloat32, fromJsonTensors, type Tensor, type TensorInput, type TensorLike, tensorProblem, toJsonData } from './tensors.ts';
import type {
  CheckpointFormat, CreatedToken, CreateSessionSpec, CreateTokenRequest, ForkRequest, Gradients, HyperparameterChanges, ListSessionsOptions,
  EventsOptions, HyperparameterChangesOptions, MetricsOptions, MetricsPage, SessionEvent, Norms, OwnToken, ParamsResult, PatchSessionRequest, GroupHyperparameters, PendingAnswer, ReadOptions, Session, SessionList, Snapshot,
  SessionChange, SnapshotList, StateDict, StateDictFormat, StateDictJson, StepAnswerJson, StepOptions, StepResult, TokenList,
} from './types.ts';

const SAFETENSORS = 'application/x-safetensors';
const TORCH = 'application/octet-stream';
/**
 * events(): silence after which a stream counts as dropped. The service sends `: keep-alive` every 15 s
 * (KEEP_ALIVE_MS in src/routes/sessions/events.ts): two missed ones and some slack.
 */
const EVENTS_IDLE_TIMEOUT_MS = 35_000;
/** The service's hold of a round contribution when `?wait=` is not given (asgd-serve's DEFAULT_WAIT_SECONDS). */
const ROUND_WAIT_DEFAULT_S = 60;

/**
 * A name as one path segment. '', '.' and '..' cannot be one: fetch drops a dot segment (and %2E, which it
 * takes as one), so `getSession('.')` would have read the session list, and `norms('.')` a session called
 * "norms". The service refuses such names anyway; refused here, before a request goes anywhere.
 */
function enc(name: string, what = 'session name'): string {
  if (typeof name !== 'string' || name === '' || name === '.' || name === '..') {
    throw new RangeError(`${what} ${JSON.stringify(name)}: must be 1-128 characters of A-Za-z0-9._-, not "." or ".."`);
  }
  return encodeURIComponent(name);
}
const sessionPath = (name: string) => `/v1/sessions/${enc(name)}`;
const etag = (version: number) => `"${version}"`;

/** Options of a change that is not a step (a load, hyperparameters, a restore). */
export interface ChangeOptions {
  /** Made only while the session is at this version (412 VersionMismatch otherwise). */
  ifMatch?: number;
  /**
   * Sent with every such change (a fresh one unless given), so that it is retried after a lost answer: a
   * repeat whose first attempt was applied gets the first answer (`replayed: true`) and changes nothing,
   * so a step another worker made meanwhile is not undone.
   */
  idempotencyKey?: string;
  /**
   * Ends the call (its retries) when aborted: it rejects with the signal's reason. A change whose request
   * went out may have been made: send it again with the same `idempotencyKey` to know (made once).
   */
  signal?: AbortSignal;
  /** This call's retry budget in milliseconds (default: the client's `retryBudgetMs`). */
  retryBudgetMs?: number;
}

/** What every request of one call carries: the caller's signal and the call's retry budget. */
interface CallOptions {
  signal?: AbortSignal;
  retryBudgetMs?: number;
}

/** A change's Exchange fields: If-Match, its Idempotency-Key, the caller's signal and budget. */
const changeOf = (options: ChangeOptions) => ({
  headers: {
    'if-match': options.ifMatch === undefined ? undefined : etag(options.ifMatch),
    'idempotency-key': options.idempotencyKey ?? newIdempotencyKey(),
  },
  signal: options.signal,
  retryBudgetMs: options.retryBudgetMs,
});

/**
 * The budget of a call that may make more than one request (a read of the parameters' shapes for flat
 * gradients, then the step): what is left of it, in milliseconds, each time it is asked.
 */
function budgetOf(budgetMs: number): () => number {
  const began = Date.now();
  return () => Math.max(0, budgetMs - (Date.now() - began));
}

function isSafetensors(answer: Answer): boolean {
  return (answer.headers.get('content-type') ?? '').startsWith(SAFETENSORS);
}

/**
 * A parameters file's tensors, in the session's (the model's) order as JSON lists them: the file holds them
 * in safetensors' order (by dtype, then name), its param_names metadata the session's.
 */
function paramsFromSafetensors(file: SafetensorsFile): Record<string, Tensor> {
  let names: unknown = null;
  try {
    names = JSON.parse(file.metadata.param_names ?? 'null');
  } catch {
    names = null;
  }
  const order = Array.isArray(names) && names.length === file.tensors.size && names.every((n) => typeof n === 'string' && file.tensors.has(n)) ? names as string[] : [...file.tensors.keys()];
  const out: Record<string, Tensor> = {};
  for (const name of order) {
    const t = file.tensors.get(name)!;
    out[name] = { shape: t.shape, data: t.data };
  }
  return out;
}

export class ASGDClient {
  readonly http: Transport;
  /** Parameter shapes by session, for gradients given as flat arrays (sent as safetensors). */
  private readonly shapes = new Map<string, Map<string, number[]>>();

  constructor(baseUrl: string, options: TransportOptions = {}) {
    this.http = new Transport(baseUrl, options);
  }

  // ---- sessions ------------------------------------------------------------------------------------

  /**
   * Creates a session. `options.sendAgain`: send it again after a connection error within the retry budget
   * (in a browser, fetch cannot say whether a failed request reached the service, so a write is otherwise
   * not retried there): a create whose answer was lost then answers SessionExists, which the caller takes
   * as created (RemoteASGD.attach joins the session).
   */
  async createSession(spec: CreateSessionSpec, options: { sendAgain?: boolean } = {}): Promise<Session> {
    const body = { ...spec, params: spec.params.map((p) => ({ ...p, data: toJsonData(p.data) })) };
    return (await this.http.json<Session>({ method: 'POST', path: '/v1/sessions', json: body, repeatable: options.sendAgain === true })).value;
  }

  /**
   * Creates a session from named tensors sent as safetensors (float32 bits as they are, 4 bytes an element:
   * no JSON limit); `options` are the JSON form's other keys, `sendAgain` as in createSession. The
   * parameters are in `tensors`' key order (JavaScript puts integer-like keys first: name the order with
   * `param_groups` for such names).
   */
  async createSessionFromTensors(name: string, tensors: Record<string, TensorInput>, options: Omit<CreateSessionSpec, 'name' | 'params'> = {},
    sending: { sendAgain?: boolean } = {}): Promise<Session> {
    const bytes = encodeSafetensors(tensors, { asgd: JSON.stringify({ name, ...options }) });
    return (await this.http.json<Session>({ method: 'POST', path: '/v1/sessions', bytes, contentType: SAFETENSORS, repeatable: sending.sendAgain === true })).value;
  }

  /** Creates a session from a file: safetensors or a torch.save'd model state_dict. */
  async createSessionFromFile(name: string, bytes: Uint8Array, format: 'safetensors' | 'pt', options: Omit<CreateSessionSpec, 'name' | 'params'> = {}): Promise<Session> {
    const query = { name, options: Object.keys(options).length ? JSON.stringify(options) : undefined };
    return (await this.http.json<Session>({ method: 'POST', path: '/v1/sessions', query, bytes, contentType: format === 'pt' ? TORCH : SAFETENSORS })).value;
  }

  /**
   * One page of sessions, by name: `limit`, `after` (the previous page's `next`), `search` (names containing
   * it, case-insensitive), `figures` (each session's `activity`), `storage` (each session's stored bytes).
   */
  async listSessions(options: ListSessionsOptions = {}): Promise<SessionList> {
    const { limit, after, search, figures, storage } = options;
    return (await this.http.json<SessionList>({ method: 'GET', path: '/v1/sessions', query: { limit, after, search, figures, storage }, repeatable: true })).value;
  }

  /** Every session (matching `search`, with `figures`/`storage` when asked), page after page; a number is the page size. */
  async *sessions(options: number | Omit<ListSessionsOptions, 'after'> = {}): AsyncGenerator<SessionList['sessions'][number]> {
    const { limit = 100, ...rest } = typeof options === 'number' ? { limit: options } : options;
    let after: string | undefined;
    for (;;) {
      const page = await this.listSessions({ ...rest, limit, after });
      yield* page.sessions;
      if (!page.next) return;
      after = page.next;
    }
  }

  async getSession(name: string, options: CallOptions = {}): Promise<Session> {
    const session = (await this.http.json<Session>({ method: 'GET', path: sessionPath(name), repeatable: true, signal: options.signal, retryBudgetMs: options.retryBudgetMs })).value;
    this.remember(session);
    return session;
  }

  /** The session, or null when it is still at `version` (If-None-Match, 304). */
  async getSessionIfChanged(name: string, version: number): Promise<Session | null> {
    const answer = await this.http.send({ method: 'GET', path: sessionPath(name), headers: { 'if-none-match': etag(version) }, allow: [304], repeatable: true });
    return answer.status === 304 ? null : parseJson<Session>(answer, 'GET', sessionPath(name));
  }

  async patchSession(name: string, changes: PatchSessionRequest): Promise<Session> {
    return (await this.http.json<Session>({ method: 'PATCH', path: sessionPath(name), json: changes, repeatable: true })).value;
  }

  /**
   * Sets hyperparameters of the groups without a step (one object per group, only the keys that change), as a
   * new version written as a snapshot: what a schedule changed after the last step, before a checkpoint or
   * snapshot is taken. Values the session has already: no new version.
   */
  async setHyperparameters(name: string, paramGroups: GroupHyperparameters[], options: ChangeOptions = {}): Promise<SessionChange> {
    return (await this.http.json<SessionChange>({ method: 'PATCH', path: `${sessionPath(name)}/param_groups`, json: { param_groups: paramGroups }, ...changeOf(options), repeatable: true })).value;
  }

  async deleteSession(name: string, options: { ifMatch?: number } = {}): Promise<void> {
    const headers = { 'if-match': options.ifMatch === undefined ? undefined : etag(options.ifMatch) };
    await this.http.send({ method: 'DELETE', path: sessionPath(name), headers });
    this.shapes.delete(name);
  }

  async fork(name: string, request: ForkRequest): Promise<Session> {
    return (await this.http.json<Session>({ method: 'POST', path: `${sessionPath(name)}/fork`, json: request })).value;
  }

  // ---- steps ---------------------------------------------------------------------------------------

  /**
   * One optimizer step. By default the gradients go as safetensors with a fresh Idempotency-Key, and a
   * lost answer is retried with that key within the retry budget: the step is applied once.
   *
   * In a session with `aggregation` the step is `worker`'s contribution to the round at `baseVersion`; it
   * resolves once the round has stepped (`round` in the result; with `return: 'params'` the parameters of
   * `baseVersion + 1`). While the round is open the service answers 202 after `wait` seconds, and the same
   * request goes again with the same key: the contribution counts once.
   */
  async step(name: string, grads: Gradients, options: StepOptions = {}): Promise<StepResult> {
    // One budget (and the caller's signal) for the whole call: the read of the shapes that flat gradients
    // need goes first and takes its time from it (found by a review: that read had neither, and a step given
    // AbortSignal.timeout(700) against a stalled service ran 72 s and failed naming a GET it never made).
    const left = budgetOf(options.retryBudgetMs ?? this.http.retryBudgetMs);
    return this.withShapesReadAgain(name, grads, options.format === 'json', () => this.stepOnce(name, grads, options, left));
  }

  /**
   * `send`, and once more when the service refuses it with SHAPE_MISMATCH and a flat gradient (or tensor) took
   * its shape from what this client read of the session before: the session may have been deleted and made
   * again, or replaced, with other shapes of the same sizes since (the shapes are read again; a review saw a
   * client fail every step after that). JSON carries flat data as it is: the service shapes it.
   */
  private async withShapesReadAgain<T>(name: string, tensors: Record<string, TensorLike>, json: boolean, send: () => Promise<T>): Promise<T> {
    const known = this.shapes.get(name);
    try {
      return await send();
    } catch (err) {
      // Shapes this call read itself (none were known) are the session's: the refusal is the caller's data.
      if (!(err instanceof ShapeMismatch) || json || known === undefined) throw err;
      if (!Object.values(tensors).some((t) => t instanceof Float32Array || Array.isArray(t))) throw err;
      // Read again, unless another call has done so meanwhile (several steps in flight): then with those.
      if (this.shapes.get(name) === known) this.shapes.delete(name);
      return send();
    }
  }

  private async stepOnce(name: string, grads: Gradients, options: StepOptions, left: () => number): Promise<StepResult> {
    if (grads === null || typeof grads !== 'object' || Array.isArray(grads)) {
      throw new TypeError('grads: must be an object mapping parameter names to gradients (Float32Array, number[] or {shape, data})');
    }
    if (options.idempotencyKey === null && options.worker !== undefined) {
      throw new RangeError('idempotencyKey: a contribution to a round needs one (its 202 pending is followed by sending it again)');
    }
    for (const [metric, value] of Object.entries(options.metrics ?? {})) {
      // Said here: NaN would go out as null (JSON) and come back as an error about fields never written.
      if (typeof value !== 'number' || !Number.isFinite(value)) throw new TypeError(`metrics.${metric}: must be a finite number, got ${typeof value === 'number' ? value : typeof value}`);
    }
    const key = options.idempotencyKey === null ? undefined : (options.idempotencyKey ?? newIdempotencyKey());
    const ret = options.return ?? 'none';
    const x: Exchange = {
      method: 'POST',
      path: `${sessionPath(name)}/step`,
      query: { return: ret === 'none' ? undefined : ret, wait: options.wait },
      headers: { 'idempotency-key': key, 'if-match': options.ifMatch === undefined ? undefined : etag(options.ifMatch) },
      repeatable: key !== undefined,
      signal: options.signal,
    };
    if ((options.format ?? 'safetensors') === 'json') {
      const body: Record<string, unknown> = { grads: jsonGradients(grads) };
      if (options.baseVersion !== undefined) body.base_version = options.baseVersion;
      if (options.worker !== undefined) body.worker = options.worker;
      if (options.samples !== undefined) body.samples = options.samples;
      if (options.paramGroups) body.param_groups = options.paramGroups;
      if (options.metrics) body.metrics = options.metrics;
      x.json = body;
      x.accept = 'application/json';
    } else {
      const metadata: Record<string, string> = {};
      if (options.paramGroups) metadata.param_groups = JSON.stringify(options.paramGroups);
      if (options.metrics) metadata.metrics = JSON.stringify(options.metrics);
      // The round's fields in the query, beside base_version: the file's metadata holds JSON only.
      Object.assign(x.query!, { base_version: options.baseVersion, worker: options.worker, samples: options.samples });
      const shaped = await this.shaped(name, grads, { signal: options.signal, retryBudgetMs: left() });
      const dtype = options.dtype ?? 'F32';
      // Plain JavaScript can pass anything: said here, not as the service's shape error about the bytes.
      if (!['F32', 'F16', 'BF16'].includes(dtype)) throw new RangeError(`dtype: ${JSON.stringify(dtype)} is not a gradient dtype (F32, F16 or BF16)`);
      for (const [param, t] of Object.entries(shaped)) {
        const i = firstHalfOverflow(t.data, dtype);
        if (i >= 0) throw new RangeError(`grads.${param}: element ${i} (${t.data[i]}) overflows ${dtype === 'F16' ? 'float16 (largest finite 65504)' : 'bfloat16'}; send it as F32`);
      }
      x.bytes = encodeSafetensors(shaped, metadata, dtype);
      x.contentType = SAFETENSORS;
      x.accept = ret === 'none' ? 'application/json' : `${SAFETENSORS}, application/json;q=0.5`;
    }
    // What the read of the shapes left of the budget (each attempt's own retries; a round's re-POSTs each have it).
    x.retryBudgetMs = left();
    const started = Date.now();
    let attempts = 0;
    for (;;) {
      if (options.held ?? (options.worker !== undefined || options.wait !== undefined)) {
        // The service holds a contribution up to `wait` seconds (its default when unset): never past
        // maxWaitMs, which would otherwise be seen only once that hold had ended.
        let wait = options.wait ?? ROUND_WAIT_DEFAULT_S;
        // In milliseconds (the service takes fractions of a second; 0: answer at once).
        if (options.maxWaitMs !== undefined) wait = Math.min(wait, Math.round(Math.max(0, options.maxWaitMs - (Date.now() - started))) / 1000);
        if (options.wait !== undefined || wait !== ROUND_WAIT_DEFAULT_S) x.query!.wait = wait;
        x.holdMs = wait * 1000;
      }
      const answer = await this.http.send(x);
      attempts += answer.attempts;
      if (answer.status !== 202) return { ...readStepAnswer(answer, x.path), idempotencyKey: key, attempts };
      const pending = parseJson<PendingAnswer>(answer, 'POST', x.path);
      const waited = Date.now() - started;
      if (key === undefined || (options.maxWaitMs !== undefined && waited >= options.maxWaitMs)) throw new RoundPending(name, pending.round, key, waited);
    }
  }

  /** Gradients with their shapes: flat arrays take the parameter's shape from the session (fetched once, again when a length differs). */
  private async shaped(name: string, grads: Gradients, call: CallOptions): Promise<Record<string, Tensor>> {
    const out: Record<string, Tensor> = {};
    for (const [param, g] of Object.entries(grads)) {
      const problem = tensorProblem(g, `grads.${param}`, true);
      if (problem) throw new TypeError(problem);
      if (!(g instanceof Float32Array) && !Array.isArray(g)) {
        out[param] = { shape: g.shape, data: asFloat32(g.data) };
        continue;
      }
      let shape = this.shapes.get(name)?.get(param);
      // Unknown, or of another size: the session may have been replaced (by another client) since it was read.
      if (!shape || shape.reduce((a, b) => a * b, 1) !== g.length) shape = this.remember(await this.getSession(name, call)).get(param);
      out[param] = { shape: shape ?? [g.length], data: asFloat32(g) };
    }
    return out;
  }

  private remember(session: Session): Map<string, number[]> {
    const shapes = new Map(session.params.map((p) => [p.name, p.shape]));
    this.shapes.set(session.name, shapes);
    return shapes;
  }

  /**
   * Metrics and staleness of committed steps, in version order; with `maxPoints` the whole series after
   * `afterVersion` downsampled to at most that many points (buckets with the mean, min and max).
   */
  async metrics(name: string, options: MetricsOptions = {}): Promise<MetricsPage> {
    const query = { after_version: options.afterVersion, limit: options.limit, max_points: options.maxPoints };
    return (await this.http.json<MetricsPage>({ method: 'GET', path: `${sessionPath(name)}/metrics`, query, repeatable: true })).value;
  }

  /**
   * The steps that changed hyperparameters (oldest first, after `afterVersion`), and every group's values at
   * the first version; with `maxPoints` the whole history after `afterVersion` in one answer, fitted to the
   * buckets of `metrics(name, {maxPoints})` when longer (`downsampled`, `total_changes`).
   */
  async hyperparameterChanges(name: string, options: HyperparameterChangesOptions = {}): Promise<HyperparameterChanges> {
    const query = { after_version: options.afterVersion, limit: options.limit, max_points: options.maxPoints };
    return (await this.http.json<HyperparameterChanges>({ method: 'GET', path: `${sessionPath(name)}/hyperparameters`, query, repeatable: true })).value;
  }

  /** L2 norms of each parameter and of its average ax, with ASGD's step, eta and mu, at the current version. */
  async norms(name: string): Promise<Norms> {
    return (await this.http.json<Norms>({ method: 'GET', path: `${sessionPath(name)}/norms`, repeatable: true })).value;
  }

  /**
   * The session's new versions as they are committed (GET .../events, server-sent events), on any replica:
   * `for await (const e of client.events(name, {signal})) ...`. Under load only the latest of several
   * versions comes. A dropped connection is opened again with Last-Event-ID (the last event's id), and
   * so is a connection silent for `idleTimeoutMs` (a hung replica or a network black hole: the service sends
   * a keep-alive every 15 s); the service then sends only the newest version at once: the versions committed
   * meanwhile are coalesced into it, not replayed (read them with `metrics(name, {afterVersion})`). A session
   * deleted while the connection was down comes as `deleted` too (the 404 on reopening the stream), even when
   * another of its name was created meanwhile (another session: its versions are not yielded as this one's). The stream ends after a `deleted`
   * event, when `signal` aborts, or with the error of a request that cannot succeed (SessionNotFound,
   * Unauthorized, ConnectionFailed once the retry budget is spent, …).
   */
  async *events(name: string, options: EventsOptions = {}): AsyncGenerator<SessionEvent, void, undefined> {
    const { signal, idleTimeoutMs = EVENTS_IDLE_TIMEOUT_MS } = options;
    if (!(idleTimeoutMs > 0)) throw new RangeError(`idleTimeoutMs: a positive number of milliseconds, not ${idleTimeoutMs}`);
    // The last event's id (`<version>@<n>`: it names the session followed), or the version given to start from.
    let last: string | undefined = options.afterVersion === undefined ? undefined : String(options.afterVersion);
    let pause = 100;
    /** The stream has been open: a 404 on reopening it says the session followed was deleted meanwhile. */
    let followed = false;
    while (!signal?.aborted) {
      let res: Response;
      try {
        res = await this.http.open({
          method: 'GET', path: `${sessionPath(name)}/events`, accept: 'text/event-stream',
          headers: last === undefined ? undefined : { 'last-event-id': last },
        }, signal, idleTimeoutMs);
      } catch (err) {
        if (signal?.aborted) return;
        if (followed && err instanceof SessionNotFound) {
          yield { event: 'deleted', session: name };
          return;
        }
        throw err;
      }
      followed = true;
      const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let event = { type: 'message', id: undefined as string | undefined, data: [] as string[] };
      try {
        for (;;) {
          // Silence for idleTimeoutMs: the connection is taken for dropped. Cancelling the reader ends the
          // pending read (done) and closes the connection. Only the read is timed, not the consumer's turn.
          const idle = Number.isFinite(idleTimeoutMs) ? setTimeout(() => void reader.cancel().catch(() => {}), idleTimeoutMs) : undefined;
          let chunk: ReadableStreamReadResult<string>;
          try {
            chunk = await reader.read();
          } finally {
            clearTimeout(idle);
          }
          const { value, done } = chunk;
          if (done) break;
          pause = 100; // the stream works: a later drop starts the back-off afresh
          buffer += value;
          let nl: number;
          while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
            const line = buffer.slice(0, nl);
            buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1));
            if (line === '') {
              // The end of an event (text/event-stream: a blank line dispatches it).
              const { type, id, data } = event;
              event = { type: 'message', id: undefined, data: [] };
              if (data.length === 0) continue;
              const payload = JSON.parse(data.join('\n')) as Record<string, unknown>;
              if (type === 'version') {
                if (id !== undefined && /^\d{1,15}(@\d{1,15})?$/.test(id)) last = id;
                yield { event: 'version', ...payload } as SessionEvent;
              } else if (type === 'deleted') {
                // replaced: another session of the name was created after this one was deleted (its versions count from 1).
                yield { event: 'deleted', session: String(payload.session ?? name), ...(payload.replaced === true && { replaced: true }) };
                return;
              }
              continue;
            }
            if (line.startsWith(':')) continue; // a comment: the keep-alive
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'event') event.type = text;
            else if (field === 'data') event.data.push(text);
            else if (field === 'id') event.id = text;
          }
        }
      } catch (err) {
        if (signal?.aborted) return;
        if (err instanceof SyntaxError) throw new ProtocolError(`GET ${sessionPath(name)}/events: an event's data is not JSON: ${err.message}`);
        // The connection broke: open it again below.
      } finally {
        await reader.cancel().catch(() => {}); // closes the connection (the source of the pipe is cancelled too)
      }
      if (signal?.aborted) return;
      try {
        await sleep(pause, signal);
      } catch {
        return; // aborted while it waited to reconnect
      }
      pause = Math.min(pause * 2, 2_000);
    }
  }

  // ---- params ---------------------------------------------------------------------------------------

  /** The parameters (or, with `averaged`, ASGD's averaged parameters `ax`). */
  async params(name: string, options: ReadOptions & { averaged?: boolean } = {}): Promise<ParamsResult> {
    return (await this.readParams(name, options, {}))!;
  }

  /** The parameters, or null when the session is still at `version` (If-None-Match, 304). */
  paramsIfChanged(name: string, version: number, options: ReadOptions & { averaged?: boolean } = {}): Promise<ParamsResult | null> {
    return this.readParams(name, options, { headers: { 'if-none-match': etag(version) } });
  }

  /**
   * Waits up to `waitSeconds` (at most 60) for a version above `afterVersion`; null if none came. The wait is
   * the service's hold of the request: each attempt may take the client's `timeoutMs` on top of it.
   */
  waitForParams(name: string, afterVersion: number, waitSeconds: number, options: Omit<ReadOptions, 'version'> & { averaged?: boolean } = {}): Promise<ParamsResult | null> {
    return this.readParams(name, options, { query: { after_version: afterVersion, wait: waitSeconds }, holdMs: waitSeconds * 1000 });
  }

  private async readParams(name: string, options: ReadOptions & { averaged?: boolean }, extra: Partial<Exchange>): Promise<ParamsResult | null> {
    const path = `${sessionPath(name)}/params`;
    const format = options.format ?? 'safetensors';
    const answer = await this.http.send({
      method: 'GET',
      path,
      query: { version: options.version, averaged: options.averaged ? 'true' : undefined, ...extra.query },
      headers: extra.headers,
      accept: format === 'json' ? 'application/json' : SAFETENSORS,
      allow: [304],
      repeatable: true,
      signal: options.signal,
      retryBudgetMs: options.retryBudgetMs,
      // A long poll (?wait=) is held by the service: not a silent server for timeoutMs (found by a review: a
      // wait longer than the client's timeoutMs was aborted and retried, and never answered null).
      holdMs: extra.holdMs,
    });
    if (answer.status === 304) return null;
    if (isSafetensors(answer)) {
      const file = decodeSafetensors(answer.bytes);
      return {
        session: file.metadata.session ?? name,
        version: Number(file.metadata.version),
        step: Number(file.metadata.step),
        averaged: file.metadata.averaged === 'true',
        params: paramsFromSafetensors(file),
      };
    }
    const body = parseJson<{ session: string; version: number; step: number; averaged: boolean; params: unknown }>(answer, 'GET', path);
    return { ...body, params: fromJsonTensors(body.params, 'params') };
  }

  // ---- state_dict and checkpoint ----------------------------------------------------------------------

  /** torch.optim.ASGD.state_dict() as JSON. */
  async stateDict(name: string, options: { version?: number } = {}): Promise<StateDict> {
    return (await this.http.json<StateDict>({ method: 'GET', path: `${sessionPath(name)}/state_dict`, query: options, repeatable: true })).value;
  }

  /** The state_dict as a file: 'pt' (torch.load reads it) or 'safetensors'. */
  async stateDictBytes(name: string, format: 'pt' | 'safetensors', options: { version?: number } = {}): Promise<Uint8Array> {
    return (await this.http.send({ method: 'GET', path: `${sessionPath(name)}/state_dict`, query: { ...options, format }, repeatable: true })).bytes;
  }

  /** Loads a state_dict (Optimizer.load_state_dict semantics): JSON, or file bytes in `format`. */
  async loadStateDict(name: string, stateDict: StateDictJson | Uint8Array, options: ChangeOptions & { format?: 'pt' | 'safetensors' } = {}): Promise<SessionChange> {
    return this.put(`${sessionPath(name)}/state_dict`, stateDict, options);
  }

  /**
   * Replaces every parameter of the session (PUT params), as editing a model's weights in place: the next
   * step applies to them; the optimizer state (step, eta, mu, ax) and the hyperparameters stay. Flat data
   * takes the parameter's shape from the session. Safetensors by default; 'json' sends {"params"}.
   */
  async loadParams(name: string, tensors: Record<string, TensorLike>, options: ChangeOptions & { format?: 'safetensors' | 'json' } = {}): Promise<SessionChange> {
    const path = `${sessionPath(name)}/params`;
    const change = changeOf(options);
    // One budget for the call, as a step's: the read of the shapes for flat data takes from it.
    const left = budgetOf(options.retryBudgetMs ?? this.http.retryBudgetMs);
    // JSON too takes the shapes read (it sends {shape, data}).
    return this.withShapesReadAgain(name, tensors, false, async () => {
      const shaped = await this.shaped(name, tensors, { signal: options.signal, retryBudgetMs: left() });
      const body: Partial<Exchange> = options.format === 'json'
        ? { json: { params: Object.fromEntries(Object.entries(shaped).map(([param, t]) => [param, { shape: t.shape, data: toJsonData(t.data) }])) } }
        : { bytes: encodeSafetensors(shaped), contentType: SAFETENSORS };
      return (await this.http.json<SessionChange>({ method: 'PUT', path, ...change, retryBudgetMs: left(), repeatable: true, ...body })).value;
    });
  }

  /** {"model", "optimizer", "step"} as one torch.save file. */
  async checkpointBytes(name: string, options: { version?: number } = {}): Promise<Uint8Array> {
    return (await this.http.send({ method: 'GET', path: `${sessionPath(name)}/checkpoint`, query: { ...options, format: 'pt' }, repeatable: true })).bytes;
  }

  async loadCheckpoint(name: string, bytes: Uint8Array, options: ChangeOptions = {}): Promise<SessionChange> {
    return this.put(`${sessionPath(name)}/checkpoint`, bytes, { ...options, format: 'pt' });
  }

  private async put(path: string, value: StateDictJson | Uint8Array, options: ChangeOptions & { format?: 'pt' | 'safetensors' }): Promise<SessionChange> {
    const body: Partial<Exchange> = value instanceof Uint8Array ? { bytes: value, contentType: options.format === 'safetensors' ? SAFETENSORS : TORCH } : { json: value };
    return (await this.http.json<SessionChange>({ method: 'PUT', path, ...changeOf(options), repeatable: true, ...body })).value;
  }

  // ---- snapshots -------------------------------------------------------------------------------------

  async createSnapshot(name: string, options: { pinned?: boolean } = {}): Promise<Snapshot> {
    return (await this.http.json<Snapshot>({ method: 'POST', path: `${sessionPath(name)}/snapshots`, json: options })).value;
  }

  async listSnapshots(name: string): Promise<SnapshotList> {
    return (await this.http.json<SnapshotList>({ method: 'GET', path: `${sessionPath(name)}/snapshots`, repeatable: true })).value;
  }

  async getSnapshot(name: string, id: number): Promise<Snapshot> {
    return (await this.http.json<Snapshot>({ method: 'GET', path: `${sessionPath(name)}/snapshots/${id}`, repeatable: true })).value;
  }

  async pinSnapshot(name: string, id: number, pinned = true): Promise<Snapshot> {
    return (await this.http.json<Snapshot>({ method: 'PATCH', path: `${sessionPath(name)}/snapshots/${id}`, json: { pinned }, repeatable: true })).value;
  }

  /** A snapshot's parameters (or averaged parameters). */
  async snapshotParams(name: string, id: number, options: { averaged?: boolean } = {}): Promise<ParamsResult> {
    const path = `${sessionPath(name)}/snapshots/${id}/params`;
    const answer = await this.http.send({ method: 'GET', path, query: { averaged: options.averaged ? 'true' : undefined }, accept: SAFETENSORS, repeatable: true });
    if (!isSafetensors(answer)) throw new ProtocolError(`GET ${path}: expected safetensors, got ${answer.headers.get('content-type')}`);
    const file = decodeSafetensors(answer.bytes);
    return { session: file.metadata.session ?? name, version: Number(file.metadata.version), step: Number(file.metadata.step), averaged: !!options.averaged, params: paramsFromSafetensors(file) };
  }

  /** A snapshot's state_dict ('pt', 'safetensors' or 'json') or checkpoint ('pt' or 'json': not safetensors) as a file's bytes. */
  snapshotBytes(name: string, id: number, what: 'state_dict', format?: StateDictFormat): Promise<Uint8Array>;
  snapshotBytes(name: string, id: number, what: 'checkpoint', format?: CheckpointFormat): Promise<Uint8Array>;
  async snapshotBytes(name: string, id: number, what: 'state_dict' | 'checkpoint', format: StateDictFormat | CheckpointFormat = 'pt'): Promise<Uint8Array> {
    if (what === 'checkpoint' && format === 'safetensors') throw new RangeError("snapshotBytes: a checkpoint is 'pt' or 'json', not safetensors");
    return (await this.http.send({ method: 'GET', path: `${sessionPath(name)}/snapshots/${id}/${what}`, query: { format }, repeatable: true })).bytes;
  }

  /** Rolls the session back to a snapshot, as a new version. */
  async restoreSnapshot(name: string, id: number, options: ChangeOptions = {}): Promise<SessionChange> {
    return (await this.http.json<SessionChange>({ method: 'POST', path: `${sessionPath(name)}/snapshots/${id}/restore`, ...changeOf(options), repeatable: true })).value;
  }

  // ---- tokens --------------------------------------------------------------------------------------

  async createToken(request: CreateTokenRequest): Promise<CreatedToken> {
    return (await this.http.json<CreatedToken>({ method: 'POST', path: '/v1/tokens', json: request })).value;
  }

  /** The token this client sends: its id, name, scope and sessions (`auth: false` when the service runs without tokens). */
  async getOwnToken(): Promise<OwnToken> {
    return (await this.http.json<OwnToken>({ method: 'GET', path: '/v1/tokens/self', repeatable: true })).value;
  }

  async listTokens(): Promise<TokenList> {
    return (await this.http.json<TokenList>({ method: 'GET', path: '/v1/tokens', repeatable: true })).value;
  }

  async deleteToken(id: string): Promise<void> {
    await this.http.send({ method: 'DELETE', path: `/v1/tokens/${enc(id, 'token id')}`, repeatable: true });
  }
}

function jsonGradients(grads: Gradients): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, g] of Object.entries(grads)) {
    const problem = tensorProblem(g, `grads.${name}`, true);
    if (problem) throw new TypeError(problem);
    out[name] = g instanceof Float32Array || Array.isArray(g) ? toJsonData(g) : { shape: g.shape, data: toJsonData(g.data) };
  }
  return out;
}

/** A JSON value in a safetensors answer's __metadata__ (whose values are strings). */
function metadataJson<T>(metadata: Record<string, string>, key: string, path: string): T {
  try {
    return JSON.parse(metadata[key]) as T;
  } catch {
    throw new ProtocolError(`POST ${path}: __metadata__.${key} is not JSON: ${metadata[key].slice(0, 200)}`);
  }
}

function readStepAnswer(answer: Answer, path: string): Omit<StepResult, 'attempts'> {
  if (isSafetensors(answer)) {
    const file = decodeSafetensors(answer.bytes);
    const m = file.metadata;
    return {
      session: m.session,
      step: Number(m.step),
      version: Number(m.version),
      staleness: Number(m.staleness),
      ...(m.replayed !== undefined && { replayed: m.replayed === 'true' }),
      ...(m.round !== undefined && { round: metadataJson(m, 'round', path) }),
      ...(m.params_version !== undefined && { paramsVersion: Number(m.params_version) }),
      // Each group's hyperparameters at the answered version, as the JSON answer's param_groups.
      ...(m.param_groups !== undefined && { param_groups: metadataJson(m, 'param_groups', path) }),
      params: paramsFromSafetensors(file),
    };
  }
  const body = parseJson<StepAnswerJson & { params?: unknown }>(answer, 'POST', path);
  const { params, params_version: paramsVersion, ...rest } = body as typeof body & { params_version?: number };
  return params === undefined ? rest : { ...rest, ...(paramsVersion !== undefined && { paramsVersion }), params: fromJsonTensors(params, 'params') };
}
