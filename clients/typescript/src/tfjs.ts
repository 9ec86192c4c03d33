// RemoteASGD: a TensorFlow.js optimizer whose steps are torch.optim.ASGD steps applied by asgd-serve.
// applyGradients sends one request (the gradients, return=params) and writes the parameters the service
// answers into the variables. tfjs calls applyGradients synchronously and HTTP is not, so the write
// lands when the answer does: `await opt.synchronize()` after `minimize` in a custom loop, and
// `callbacks: [opt.callback]` in model.fit (it synchronizes at the end of every batch). A gradient
// computed before the previous answer landed is sent with the version it was computed from
// (base_version), so the service counts it as stale rather than pretending otherwise.
// In a session with `aggregation` each step is this worker's contribution to the round at the variables'
// version; its answer (after the round has stepped) brings the parameters of the next version.
// A step refused as stale (max_staleness, or a round that stepped without it) is handled by `onStale`:
// 'pull' (default) drops it and loads the session's parameters, 'raise' throws it from synchronize().
import { Optimizer, serialization, tensor, type NamedTensorMap, type Scalar, type Tensor as TfTensor, type Variable } from '@tensorflow/tfjs-core';
import { ASGDClient } from './client.ts';
import { BaseVersionAhead, RoundPending, SessionExists, SessionNotFound, StaleGradient, VersionMismatch } from './errors.ts';
import { newIdempotencyKey, randomUuid, type TransportOptions } from './http.ts';
import type { Tensor, TensorInput } from './tensors.ts';
import type { Aggregation, Hyperparameters, Session, StepOptions, StepParamGroup, StepResult } from './types.ts';

/** A tf.Variable, or a tfjs-layers LayerVariable (model.trainableWeights), whose read() is the tf.Variable. */
export type VariableLike = Variable | { read(): unknown; name: string };

export interface RemoteASGDOptions {
  /** A client, or the service's base URL. */
  client: ASGDClient | string;
  /** With a URL: the client's options (token, retry budget). */
  clientOptions?: TransportOptions;
  session: string;
  /** Used when this optimizer creates the session. */
  hyperparameters?: Hyperparameters;
  /** 'if_missing' (default): create the session from the variables unless it exists; 'never': it must exist. */
  create?: 'if_missing' | 'never';
  /** Session settings for creation (snapshot_every, keep_snapshots, max_staleness, aggregation). */
  sessionSettings?: { snapshot_every?: number; keep_snapshots?: number; max_staleness?: number | null; aggregation?: Aggregation | null };
  /**
   * This worker's id (1-128 of A-Za-z0-9._-). In a session with `aggregation` every step is its contribution
   * to the round at the variables' version (default id: `js-` and 12 random hex digits). Give each worker a
   * stable id: a round adds the gradients in the order of the ids.
   */
  worker?: string;
  /** With aggregation: seconds the service holds a step for its round before the client asks again (`?wait=`). */
  roundWaitSeconds?: number;
  /**
   * With aggregation: give up waiting for a round after this long (RoundPending; the contribution stays in
   * the round). `resumeRound()`, or the next `minimize`, waits on for that round. Default: no limit.
   */
  maxRoundWaitMs?: number;
  /**
   * What a step refused as stale (409 STALE_GRADIENT: older than the session's `max_staleness`, or a
   * contribution to a round that has already stepped, e.g. after its `timeout_s`) does:
   * 'pull' (default, as the Python client's `on_stale="pull"`): drop the gradient, load the session's current
   * parameters into the variables, count it in `staleDropped`; training goes on (`model.fit` is not ended).
   * 'raise': the step's StaleGradient is thrown by `synchronize()` (in `model.fit`, by `optimizer.callback`).
   * A step refused as 409 BASE_VERSION_AHEAD (the session is below the version the gradient was computed
   * at: deleted and created again, or its database restored) is dropped likewise under 'pull', the session's
   * parameters loaded at its lower version with a warning; under 'raise' synchronize() throws BaseVersionAhead.
   */
  onStale?: StalePolicy;
  /** Gradient transport: safetensors (default) or JSON, and the wire dtype (F32 default). */
  format?: StepOptions['format'];
  dtype?: StepOptions['dtype'];
  /** Send each step's loss as the metric `loss` (the service keeps it in the session's history). */
  sendLoss?: boolean;
  /**
   * Compare the variables with their last synced values at each step and send edited ones first (default
   * true). It reads the variables back once a step (a GPU read-back on WebGL); false skips it, and edits
   * made outside the optimizer are then overwritten by the next answer.
   */
  detectEdits?: boolean;
  retryBudgetMs?: number;
  /**
   * Stops training when aborted: the step in flight (its retries, a wait for its round) ends, no further
   * step is sent, and `synchronize()` (in `model.fit`, `optimizer.callback`) throws the signal's reason. A
   * step whose request had gone out may have been applied. Not saved with the model (getConfig).
   */
  signal?: AbortSignal;
}

type NamedTensor = { name: string; tensor: TfTensor };

/** RemoteASGDOptions.onStale: what a gradient refused as stale does. */
export type StalePolicy = 'pull' | 'raise';
const STALE_POLICIES: readonly StalePolicy[] = ['pull', 'raise'];

/** This worker's contribution to a round it stopped waiting for (RoundPending): the same request again. */
interface PendingContribution {
  /** The round's version (the contribution's base_version). */
  version: number;
  /** Sends the contribution again with its Idempotency-Key: the service counts it once. */
  send: (maxWaitMs: number | undefined) => Promise<StepResult>;
  /** The hyperparameters the step carries (this worker's changes no answered step had carried yet), or undefined. */
  paramGroups: StepParamGroup[] | undefined;
}

const NAME = /[^A-Za-z0-9._-]/g;

/** The session's name for a variable: its tfjs name with characters outside A-Za-z0-9._- made '.'. */
export const paramNameOf = (variableName: string): string => variableName.replace(NAME, '.').slice(-128);

function asVariable(v: VariableLike): Variable {
  return ('assign' in v ? v : (v as { read(): unknown }).read()) as Variable;
}

/** A model.fit batch's logs as metrics: its finite numbers but the loss (sent as such) and tfjs's batch and size. */
function logMetrics(logs: Record<string, unknown> | undefined): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, value] of Object.entries(logs ?? {})) {
    if (name !== 'batch' && name !== 'size' && name !== 'loss' && typeof value === 'number' && Number.isFinite(value)) out[name] = value;
  }
  return out;
}

const sameShape = (a: readonly number[], b: readonly number[]): boolean => a.length === b.length && a.every((d, i) => d === b[i]);
/** A session's groups' hyperparameters (the keys a step may set). */
const groupsOf = (session: Session): StepParamGroup[] =>
  session.param_groups.map((g) => ({ lr: g.lr, lambd: g.lambd, alpha: g.alpha, t0: g.t0, weight_decay: g.weight_decay, maximize: g.maximize }));

const shapeText = (shape: readonly number[]): string => `[${shape.join(', ')}]`;

/** One variable whose shape is not its session parameter's. */
export interface ShapeMismatchEntry {
  param: string;
  variable: string;
  sessionShape: number[];
  variableShape: number[];
}

/**
 * attach() (or an answer) found variables whose shapes differ from their session parameters': nothing was
 * written into any variable. (tfjs Dense kernels are [in, out]; a PyTorch nn.Linear weight is [out, in].)
 */
export class VariableShapeMismatch extends RangeError {
  readonly session: string;
  readonly mismatches: ShapeMismatchEntry[];

  constructor(session: string, mismatches: ShapeMismatchEntry[]) {
    const list = mismatches.map((m) => `parameter ${m.param} is ${shapeText(m.sessionShape)} in the session but the variable ${m.variable} is ${shapeText(m.variableShape)}`);
    super(`session ${session}: ${list.join('; ')} (no variable was changed)`);
    this.name = 'VariableShapeMismatch';
    this.session = session;
    this.mismatches = mismatches;
  }
}

// tfjs-layers turns the saved optimizer config's keys and string values from snake_case to camelCase when
// it loads a model (convertPythonicToTs): "my_run" would come back "myRun". getConfig() therefore writes
// '%' as %25 and '_' as %5F in every key and string, and fromConfig() reads them back.
function protect(value: unknown): unknown {
  if (typeof value === 'string') return value.replace(/%/g, '%25').replace(/_/g, '%5F');
  if (Array.isArray(value)) return value.map(protect);
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined).map(([k, v]) => [protect(k), protect(v)]));
  }
  return value;
}

function unprotect(value: unknown): unknown {
  if (typeof value === 'string') return value.replace(/%(25|5F)/gi, (m) => (m === '%25' ? '%' : '_'));
  if (Array.isArray(value)) return value.map(unprotect);
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [unprotect(k), unprotect(v)]));
  return value;
}

/** The RemoteASGD options a saved model holds (getConfig): everything but the client, which is rebuilt from `url`. */
export type RemoteASGDConfig = Omit<RemoteASGDOptions, 'client' | 'clientOptions'> & { url: string };


export class RemoteASGD extends Optimizer {
  static get className(): string {
    return 'RemoteASGD';
  }

  /**
   * The client options of optimizers rebuilt from a saved model (`tf.loadLayersModel` of a model saved with
   * `includeOptimizer: true`, through fromConfig): the model file holds the service's URL and the session,
   * never a token. Set `RemoteASGD.clientOptions = { token }` before loading; when it is unset the token is
   * `ASGD_TOKEN` from the environment (Node), or none.
   */
  static clientOptions: TransportOptions | undefined = undefined;

  readonly client: ASGDClient;
  readonly session: string;
  private readonly options: RemoteASGDOptions;
  /** tf variable name -> session parameter name, and back. */
  private readonly paramOf = new Map<string, string>();
  private readonly variableOf = new Map<string, Variable>();
  /** The version the variables hold. */
  version = -1;
  /** The answer to the last step that landed. */
  lastStep: StepResult | null = null;
  /**
   * Hyperparameters for the next step (e.g. a learning-rate schedule): one object per session group. Only
   * the values that differ from the session's as this optimizer last saw them (at attach, in each step's
   * answer) are sent: a schedule that sets the same lr every batch records no change.
   */
  nextParamGroups: StepParamGroup[] | undefined;
  /** Each group's hyperparameters as this optimizer last saw them (attach, a step's answer), or null. */
  private knownGroups: StepParamGroup[] | null = null;
  /**
   * The values set in nextParamGroups that no answered step has carried yet, per group (as the Python
   * client keeps them): each step carries all of them, so a step dropped as stale (or in flight when a later
   * one goes) takes nothing with it, and an older value never follows a newer one (found by a review: a
   * dropped step's lr change, given back to nextParamGroups, missed the step queued behind it and came back
   * after that step's own newer lr). A value is settled once a step carrying it is answered.
   */
  private unsentGroups: StepParamGroup[] = [];
  /** The batch size of the next step (sent as its `samples`; a session's aggregation.target_samples counts them). */
  nextSamples: number | undefined;
  /** This worker's id (see the `worker` option). */
  readonly worker: string;
  /** The session's aggregation as attach() found it (null: every step is applied on its own). */
  aggregation: Aggregation | null = null;
  /** What a gradient refused as stale does (the `onStale` option; default 'pull'). */
  readonly onStale: StalePolicy;
  /** Gradients dropped because the service refused them as stale (`onStale: 'pull'`). */
  staleDropped = 0;
  /** The last StaleGradient dropped under `onStale: 'pull'` (its message says how stale), or null. */
  lastStale: StaleGradient | null = null;
  /** The contribution whose round this optimizer stopped waiting for (RoundPending), until that round's outcome is in. */
  private pendingRound: PendingContribution | null = null;
  private pending: Promise<void> = Promise.resolve();
  private failure: unknown = null;
  private pendingLoss: number | undefined;
  /**
   * Metrics the next step carries beside its loss, e.g. `{ acc: 0.91 }` in a custom loop (set before
   * minimize; taken by that step). In model.fit with `optimizer.callback` the batch's logs (the metrics
   * compiled into the model: acc, mse, …) go with its own step without it.
   */
  nextMetrics: Record<string, number> | undefined;
  /**
   * A batch of model.fit with `optimizer.callback` is under way (from its onBatchBegin until its step is
   * taken): that step waits for the batch's logs. Per batch, not from onTrainBegin to onTrainEnd: tfjs does
   * not call onTrainEnd when fit throws (a step's error thrown by the callback, RoundPending, Unauthorized),
   * and a later custom loop's steps then waited for logs no batch would bring (found by a review:
   * `resumeRound()` after a fit that threw RoundPending never returned).
   */
  private batchOpen = false;
  /** In model.fit: lets the batch's step go out, with the batch's logs (its onBatchEnd), or without them. */
  private releaseBatch: ((logs?: Record<string, unknown>) => void) | null = null;
  /** Steps sent (or queued) whose answers have not been written into the variables yet. */
  private inFlight = 0;
  private warnedBehind = false;
  /**
   * Per parameter: its values as last synced with the session (written from an answer, created, or sent).
   * A variable that differs from them was edited outside the optimizer (`assign`, `model.setWeights`, a
   * clamp): the session takes its values before the next step, as torch.optim.ASGD steps edited weights.
   */
  private readonly synced = new Map<string, Float32Array>();

  /**
   * What each request of this optimizer carries: its `signal` and `retryBudgetMs` (found by a review: the reads
   * after a stale drop, the edits' PUT and pull()'s read had neither, so an abort waited them out).
   */
  private get call(): { signal?: AbortSignal; retryBudgetMs?: number } {
    return { signal: this.options.signal, retryBudgetMs: this.options.retryBudgetMs };
  }

  /** The client's logger (its `logger` option): stale drops warn, a session created or joined is a notice. */
  private get logger() {
    return this.client.http.logger;
  }

  constructor(options: RemoteASGDOptions) {
    super();
    this.options = options;
    this.client = typeof options.client === 'string' ? new ASGDClient(options.client, options.clientOptions) : options.client;
    this.session = options.session;
    this.worker = options.worker ?? `js-${randomUuid().replaceAll('-', '').slice(0, 12)}`;
    // Checked here, as the Python client does: the service would refuse it only at the first step (400 INVALID_QUERY).
    if (typeof this.worker !== 'string' || !/^[A-Za-z0-9._-]{1,128}$/.test(this.worker)) {
      throw new RangeError(`RemoteASGD: worker must be 1-128 characters of A-Za-z0-9._-, not ${JSON.stringify(options.worker)}`);
    }
    this.onStale = options.onStale ?? 'pull';
    if (!STALE_POLICIES.includes(this.onStale)) throw new RangeError(`RemoteASGD: onStale must be one of ${STALE_POLICIES.map((p) => `'${p}'`).join(', ')}, not ${JSON.stringify(options.onStale)}`);
  }

  /**
   * Binds the optimizer to these variables (a model's `trainableWeights`, or tf.Variables) and to the
   * session: creates it from their values if it is missing, else writes its parameters into them.
   * `names` gives the session's parameter names (default: the variables' names, made URL-safe).
   */
  async attach(variables: VariableLike[], names?: string[]): Promise<Session> {
    if (names && names.length !== variables.length) throw new RangeError(`names: ${names.length} names for ${variables.length} variables`);
    const vars = variables.map(asVariable);
    // The binding is kept only once the session agrees with the variables: a failed attach changes nothing.
    const paramOf = new Map<string, string>();
    const variableOf = new Map<string, Variable>();
    vars.forEach((v, i) => {
      const param = names?.[i] ?? paramNameOf(v.name);
      if (variableOf.has(param)) throw new RangeError(`attach: variables ${variableOf.get(param)!.name} and ${v.name} are both parameter ${param}`);
      paramOf.set(v.name, param);
      variableOf.set(param, v);
    });
    const bind = () => {
      for (const [variable, param] of paramOf) this.paramOf.set(variable, param);
      for (const [param, v] of variableOf) this.variableOf.set(param, v);
    };
    let session: Session;
    try {
      session = await this.client.getSession(this.session, this.call);
    } catch (err) {
      if (!(err instanceof SessionNotFound) || this.options.create === 'never') throw err;
      // As safetensors: the variables' float32 bits, 4 bytes an element (as JSON, a model above ~23M
      // parameters passed the service's 256 MiB JSON limit, and building the text took seconds and GBs).
      const tensors: Record<string, TensorInput> = {};
      const values = new Map<string, Float32Array>();
      for (const v of vars) {
        const data = Float32Array.from(await v.data());
        values.set(paramOf.get(v.name)!, data);
        tensors[paramOf.get(v.name)!] = { shape: v.shape.slice(), data };
      }
      // The variables' order is the session's: named where an object's key order would not keep it (integer-like names).
      const order = vars.map((v) => paramOf.get(v.name)!);
      const named = order.some((n) => /^(0|[1-9]\d*)$/.test(n)) ? { param_groups: [{ params: order }] } : {};
      try {
        session = await this.client.createSessionFromTensors(this.session, tensors,
          { hyperparameters: this.options.hyperparameters, ...this.options.sessionSettings, ...named }, { sendAgain: true });
      } catch (createErr) {
        // Another worker started with the same arguments created it between the two requests (or this
        // create's answer was lost and it was sent again): join it.
        if (!(createErr instanceof SessionExists)) throw createErr;
        session = await this.client.getSession(this.session, this.call);
        return this.join(session, variableOf, bind);
      }
      bind();
      for (const [param, data] of values) this.synced.set(param, data);
      this.version = session.version;
      this.aggregation = session.aggregation ?? null;
      this.knownGroups = groupsOf(session);
      this.logger?.info?.(`[${this.worker}] session ${this.session} created at ${this.client.http.baseUrl} (version ${session.version}, step ${session.step})`);
      return session;
    }
    return this.join(session, variableOf, bind);
  }

  /** Binds to an existing session: its parameters are checked against the variables and written into them. */
  private async join(session: Session, variableOf: Map<string, Variable>, bind: () => void): Promise<Session> {
    const shapes = new Map(session.params.map((p) => [p.name, p.shape]));
    const missing = [...variableOf.keys()].filter((p) => !shapes.has(p));
    if (missing.length) throw new RangeError(`session ${this.session} has no parameter ${missing.join(', ')} (it has ${[...shapes.keys()].join(', ')})`);
    this.checkShapes(variableOf, shapes);
    const current = await this.client.params(this.session, this.call);
    this.checkShapes(variableOf, new Map(Object.entries(current.params).map(([p, t]) => [p, t.shape])));
    bind();
    this.aggregation = session.aggregation ?? null;
    this.knownGroups = groupsOf(session);
    // The session's version is the truth, lower than the variables' too: a session deleted and created
    // again, or a database restored from a backup (the variables' newer version would refuse its parameters
    // and make every step's base_version one the session has not reached).
    this.adoptVersion(current.version);
    this.write(current.params, current.version);
    this.logger?.info?.(`[${this.worker}] session ${this.session} joined at ${this.client.http.baseUrl} (version ${current.version}, step ${session.step})`);
    return session;
  }

  /** Throws VariableShapeMismatch, naming every parameter whose session shape is not its variable's. */
  private checkShapes(variableOf: Map<string, Variable>, shapes: Map<string, number[]>): void {
    const mismatches: ShapeMismatchEntry[] = [];
    for (const [param, v] of variableOf) {
      const sessionShape = shapes.get(param);
      if (sessionShape && !sameShape(sessionShape, v.shape)) mismatches.push({ param, variable: v.name, sessionShape, variableShape: v.shape.slice() });
    }
    if (mismatches.length) throw new VariableShapeMismatch(this.session, mismatches);
  }

  /** Computes the loss and its gradients, then steps; the loss goes with the step as a metric. */
  override minimize(f: () => Scalar, returnCost = false, varList?: Variable[]): Scalar | null {
    const { value, grads } = this.computeGradients(f, varList);
    if (this.options.sendLoss !== false) this.pendingLoss = value.dataSync()[0];
    this.applyGradients(varList ? varList.map((v) => ({ name: v.name, tensor: grads[v.name] })) : grads);
    for (const g of Object.values(grads)) g.dispose();
    if (returnCost) return value;
    value.dispose();
    return null;
  }

  /** Sends these gradients as one step (queued behind any step still in flight). */
  applyGradients(variableGradients: NamedTensorMap | NamedTensor[]): void {
    if (this.paramOf.size === 0) throw new Error('RemoteASGD: call `await optimizer.attach(model.trainableWeights)` before training');
    const list = Array.isArray(variableGradients) ? variableGradients : Object.entries(variableGradients).map(([name, t]) => ({ name, tensor: t }));
    const grads: Record<string, Tensor> = {};
    for (const { name, tensor: g } of list) {
      if (g == null) continue; // no gradient for this variable: skipped, as PyTorch skips a None grad
      const param = this.paramOf.get(name);
      if (param === undefined) throw new Error(`RemoteASGD: variable ${name} is not attached to session ${this.session}`);
      // Read now: tfjs disposes the gradients as soon as this returns.
      grads[param] = { shape: g.shape.slice(), data: Float32Array.from(g.dataSync() as Float32Array) };
    }
    // The gradient was computed on the variables as they are now: edited since the last sync, the session
    // takes them before this step goes out (and the step's base_version is then the version they made).
    const edited = this.editedParams().length > 0;
    let baseVersion = this.version;
    const loss: Record<string, number> = this.pendingLoss !== undefined && Number.isFinite(this.pendingLoss) ? { loss: this.pendingLoss } : {};
    const extra = this.nextMetrics;
    this.nextMetrics = undefined;
    // In model.fit the metrics compiled into the model are computed inside minimize's loss function, out of
    // this optimizer's sight, and reach the callback's onBatchEnd as the batch's logs: the step waits for
    // them (nothing overlaps there anyway: onBatchEnd waits for the step). Any other way on (the next
    // batch's gradients, synchronize(), the fit's end) lets it go without them.
    this.releaseBatch?.();
    const inBatch = this.batchOpen;
    this.batchOpen = false; // one step per batch waits for its logs
    const batchLogs = inBatch ? new Promise<Record<string, unknown> | undefined>((resolve) => {
      this.releaseBatch = (logs) => {
        this.releaseBatch = null;
        resolve(logs);
      };
    }) : undefined;
    let metrics: Record<string, number> | undefined;
    const paramGroups = this.takeParamGroups();
    // A contribution when the session has rounds. The worker id goes with every step, as the Python client
    // sends it: without rounds the service checks it and tells one worker's steps by it, and should rounds
    // be set on the session later (PATCH aggregation) the steps are contributions at once instead of 400s.
    const round: StepOptions = this.aggregation !== null || this.options.worker !== undefined
      ? { worker: this.worker, wait: this.options.roundWaitSeconds }
      : { worker: this.worker, held: false };
    const samples = this.nextSamples;
    this.pendingLoss = undefined;
    this.nextSamples = undefined;
    this.incrementIterations();
    if (this.inFlight > 0 && !this.warnedBehind) {
      // A loop that never waits (`await model.trainOnBatch(...)` alone: tfjs's CPU backend never yields) computes
      // every gradient at the parameters it started from: asynchronous SGD without a word (found by a review).
      this.warnedBehind = true;
      this.logger?.warn(`[${this.worker}] session ${this.session}: a gradient computed while ${this.inFlight} step(s) were still in flight, at version ${baseVersion} `
        + '(sent with that base_version: the service counts its staleness). In a custom loop, await optimizer.synchronize() after each minimize or trainOnBatch; '
        + 'in model.fit, pass callbacks: [optimizer.callback]. Said once');
    }
    this.inFlight++;
    // One key for this step: its retries, and a resumed wait for its round after RoundPending, count once.
    const idempotencyKey = newIdempotencyKey();
    // The changed values are chosen when the step goes out (after the steps before it answered); a retry
    // (RoundPending, the same Idempotency-Key) sends what the first send did.
    let sent: { groups: StepParamGroup[] | undefined } | null = null;
    const send = (maxWaitMs: number | undefined) => this.client.step(this.session, grads, {
      return: 'params', baseVersion, metrics, paramGroups: (sent ??= { groups: this.changedGroups(paramGroups) }).groups, samples, ...round, maxWaitMs, idempotencyKey, signal: this.options.signal,
      format: this.options.format, dtype: this.options.dtype, retryBudgetMs: this.options.retryBudgetMs,
    });
    const settled = () => void this.inFlight--;
    this.pending = this.pending.then(async () => {
      const logs = await batchLogs;
      const merged = { ...logMetrics(logs), ...extra, ...loss };
      metrics = Object.keys(merged).length > 0 ? merged : undefined;
      if (this.failure) return; // a failed step ends the run: the rest are not sent
      if (this.options.signal?.aborted) {
        this.failure = this.options.signal.reason; // stopped: nothing more is sent
        return;
      }
      const own = this.pendingRound;
      if (own && own.version === baseVersion) {
        // This worker is already in the round of this gradient's version (it stopped waiting, RoundPending):
        // a second contribution would be refused (DuplicateContribution). Wait for that round's outcome
        // instead; this gradient, of the same version, is not sent (its hyperparameters go with the next).
        await this.settle(own);
        return;
      }
      if (own && own.version < baseVersion) this.pendingRound = null; // the variables are past that round
      if (edited) {
        try {
          // The gradient was computed on the pushed values only when the variables were at its version and
          // nothing came in between (no step of this worker in flight, no other worker's step merged in on a
          // 412): then it is the pushed version's. Otherwise it keeps its own, and the service counts how
          // stale it is (max_staleness, rounds) rather than taking it as fresh (found by a review).
          const atCapture = this.version === baseVersion;
          if ((await this.pushEdits()) === 'pushed' && atCapture) baseVersion = this.version;
        } catch (err) {
          this.failure = err;
          return;
        }
      }
      await this.settle({ version: baseVersion, send, paramGroups });
    }).finally(settled);
  }

  /**
   * Sends a step (or a pending contribution again) and writes its answer into the variables. A StaleGradient
   * is handled by `onStale`; a RoundPending keeps the contribution for `resumeRound()`; any other error is
   * kept for `synchronize()` to throw.
   */
  private async settle(step: PendingContribution, maxWaitMs = this.options.maxRoundWaitMs): Promise<void> {
    try {
      let answer: StepResult;
      try {
        answer = await step.send(maxWaitMs);
      } catch (err) {
        if (err instanceof RoundPending) this.pendingRound = step;
        else if (this.pendingRound?.version === step.version) this.pendingRound = null;
        if (err instanceof BaseVersionAhead && this.onStale !== 'raise') {
          // The session is below the version this gradient was computed at: deleted and created again, or its
          // database restored. Its history is not the gradient's: dropped, and its parameters taken.
          const current = await this.client.params(this.session, this.call);
          this.adoptVersion(current.version);
          this.write(current.params, current.version);
          return; // its hyperparameters were not applied: the next step carries them
        }
        if (!(err instanceof StaleGradient) || this.onStale !== 'pull') throw err;
        // Dropped: the session moved on without this gradient. Continue from its current parameters.
        const current = await this.client.params(this.session, this.call);
        this.write(current.params, current.version, 'dropped'); // an edit made meanwhile goes with the next step
        this.staleDropped++;
        this.lastStale = err;
        this.logger?.warn(`[${this.worker}] session ${this.session}: gradient dropped as stale (${err.message}); loaded the parameters at version ${current.version} (${this.staleDropped} dropped so far)`);
        return; // its hyperparameters were not applied: the next step carries them
      }
      if (this.pendingRound?.version === step.version) this.pendingRound = null;
      this.settleParamGroups(step.paramGroups);
      this.lastStep = answer;
      if (answer.param_groups) this.knownGroups = answer.param_groups.map((g) => ({ ...g }));
      if (answer.params) this.write(answer.params, answer.paramsVersion ?? answer.version, 'step');
      else {
        // A service without return=params: read them (a second request).
        const current = await this.client.params(this.session, this.call);
        this.write(current.params, current.version, 'step');
      }
    } catch (err) {
      // A step refused for what it sent (a bad value, a group too many): the values set so far are not sent
      // again, or every later step would be refused the same way once synchronize() has thrown (found by a
      // review). A stale gradient ('raise') or a round still open keeps them for the next step.
      if (!(err instanceof RoundPending || err instanceof StaleGradient || err instanceof BaseVersionAhead)) this.unsentGroups = [];
      this.failure = err;
    }
  }

  /** Of `groups`, the values that differ from the session's as last seen (undefined when none does). */
  private changedGroups(groups: StepParamGroup[] | undefined): StepParamGroup[] | undefined {
    const known = this.knownGroups;
    if (!groups || !known || known.length !== groups.length) return groups; // the service checks the count
    const changed = groups.map((g, i) => Object.fromEntries(Object.entries(g).filter(([k, v]) => !Object.is(v, (known[i] as Record<string, unknown>)[k]))) as StepParamGroup);
    return changed.some((g) => Object.keys(g).length > 0) ? changed : undefined;
  }

  /** nextParamGroups added to the unsent values (a later value of a key replaces the earlier), and all of these, for a step. */
  private takeParamGroups(): StepParamGroup[] | undefined {
    const next = this.nextParamGroups;
    this.nextParamGroups = undefined;
    if (next) {
      next.forEach((g, i) => {
        this.unsentGroups[i] = { ...this.unsentGroups[i], ...Object.fromEntries(Object.entries(g ?? {}).filter(([, v]) => v !== undefined)) };
      });
      // More groups than the session has: sent as they are, for the service to refuse naming the count.
      if (next.length !== this.unsentGroups.length) this.unsentGroups.length = Math.max(next.length, this.unsentGroups.length);
    }
    if (!this.unsentGroups.some((g) => g && Object.keys(g).length > 0)) return undefined;
    const count = Math.max(this.unsentGroups.length, this.knownGroups?.length ?? 0);
    return Array.from({ length: count }, (_, i) => ({ ...this.unsentGroups[i] }));
  }

  /** A step carrying these values was answered: those not set anew since are settled (no later step sends them). */
  private settleParamGroups(carried: StepParamGroup[] | undefined): void {
    carried?.forEach((g, i) => {
      const unsent = this.unsentGroups[i] as Record<string, unknown> | undefined;
      if (!unsent) return;
      for (const [k, v] of Object.entries(g)) if (Object.is(unsent[k], v)) delete unsent[k];
    });
  }

  /**
   * After RoundPending (`maxRoundWaitMs` passed): waits again, up to `maxWaitMs` (default `maxRoundWaitMs`),
   * for the round this optimizer has already contributed to, by sending the same contribution with the
   * same Idempotency-Key (the service counts it once). Once the round has stepped its parameters are in the
   * variables; returns their version. Throws RoundPending again if the round is still open after
   * `maxWaitMs`, or the error of a step in flight. Without such a contribution it returns the version at once.
   */
  async resumeRound(options: { maxWaitMs?: number } = {}): Promise<number> {
    this.releaseBatch?.(); // a step waiting for its batch's logs goes without them, as in synchronize()
    await this.pending;
    if (this.failure instanceof RoundPending) this.failure = null; // the wait this call resumes
    const own = this.pendingRound;
    if (own) this.pending = this.pending.then(() => this.settle(own, options.maxWaitMs ?? this.options.maxRoundWaitMs));
    await this.synchronize();
    return this.version;
  }

  /** Whether a contribution of this optimizer waits for its round (after RoundPending): see resumeRound(). */
  get roundPending(): boolean {
    return this.pendingRound !== null;
  }

  /**
   * Waits for every step in flight; their parameters are in the variables after it. Throws a step's error
   * (a StaleGradient only with `onStale: 'raise'`; RoundPending after `maxRoundWaitMs`: see resumeRound()).
   */
  async synchronize(): Promise<void> {
    this.batchOpen = false;
    this.releaseBatch?.(); // a step waiting for its batch's logs goes without them
    await this.pending;
    if (this.failure) {
      const err = this.failure;
      this.failure = null;
      throw err;
    }
  }

  /** For model.fit: `callbacks: [optimizer.callback]` makes every batch start from the service's parameters. */
  get callback(): {
    onBatchBegin: () => Promise<void>; onBatchEnd: (batch: number, logs?: Record<string, unknown>) => Promise<void>; onTrainEnd: () => Promise<void>;
  } {
    return {
      onBatchBegin: async () => {
        this.batchOpen = true;
      },
      onBatchEnd: (_batch, logs) => {
        this.batchOpen = false;
        this.releaseBatch?.(logs);
        return this.synchronize();
      },
      onTrainEnd: () => this.synchronize(),
    };
  }

  /** Reads the newest parameters from the service into the variables (e.g. after other workers stepped). */
  async pull(): Promise<number> {
    await this.synchronize();
    const current = await this.client.paramsIfChanged(this.session, this.version, this.call);
    if (current) {
      this.adoptVersion(current.version); // nothing is in flight: the service's version, even a lower one
      this.write(current.params, current.version);
    }
    // Past the round of a pending contribution: that round has stepped, with the contribution in it.
    if (this.pendingRound && this.pendingRound.version < this.version) this.pendingRound = null;
    return this.version;
  }

  /** The session went back to `version` (replaced, or restored): its parameters are taken; a contribution waiting for a round of the old history is not. */
  private adoptVersion(version: number): void {
    if (version >= this.version) return;
    this.logger?.warn?.(`[${this.worker}] session ${this.session} is at version ${version}, below the ${this.version} this optimizer held (deleted and created again, or restored): its parameters are taken`);
    this.version = -1;
    this.pendingRound = null;
  }

  /**
   * Writes the session's parameters into the variables. With `keepEdits` the elements of a variable edited
   * since the last sync keep their edited values, which the next step (or the edits' PUT) sends; the others
   * take the session's. It says why the session's parameters came, for the line that names the kept edits:
   * 'step', a step's answer (the edit was made while it was in flight); 'dropped', the parameters read after
   * a step dropped as stale; 'merged', other workers' steps read after the edits' PUT was refused (412).
   */
  private write(params: Record<string, Tensor>, version: number, keepEdits: false | 'step' | 'dropped' | 'merged' = false): void {
    const from = this.version;
    if (version < this.version) return; // an older answer than what the variables hold
    // Every shape first: a mismatch leaves all variables as they were.
    this.checkShapes(this.variableOf, new Map(Object.entries(params).map(([p, t]) => [p, t.shape])));
    const kept: string[] = [];
    for (const [param, t] of Object.entries(params)) {
      const v = this.variableOf.get(param);
      if (!v) continue;
      let data = t.data;
      const before = keepEdits && this.options.detectEdits !== false ? this.synced.get(param) : undefined;
      if (before && before.length === data.length) {
        const now = v.dataSync() as Float32Array;
        if (!sameBits(now, before)) {
          data = mergeEdits(now, before, data);
          kept.push(param);
        }
      }
      const value = tensor(data, t.shape, 'float32');
      v.assign(value);
      value.dispose();
      this.synced.set(param, t.data);
    }
    this.version = version;
    if (kept.length) {
      // Said as it happened (found by a review: a 412 merge said "while a step was in flight" when none was).
      const what = keepEdits === 'merged'
        ? `changed outside the optimizer while other workers stepped the session (version ${from} to ${version}); their steps are written in, and the changed elements keep their new values and are sent at version ${version}`
        : keepEdits === 'dropped'
          ? `changed while a step was in flight that the service dropped as stale; the changed elements keep their new values over the session's parameters (version ${version}) and are sent with the next step`
          : 'changed while a step was in flight; the changed elements keep their new values over that step\'s result and are sent with the next step';
      this.logger?.info?.(`[${this.worker}] session ${this.session}: ${listed(kept)} ${what}`);
    }
  }

  /** The attached parameters whose variables differ (bit for bit) from their last synced values. */
  private editedParams(): string[] {
    const edited: string[] = [];
    if (this.options.detectEdits === false) return edited;
    for (const [param, v] of this.variableOf) {
      const before = this.synced.get(param);
      if (before && !sameBits(v.dataSync() as Float32Array, before)) edited.push(param);
    }
    return edited;
  }

  /**
   * PUT params with the variables' values, at the version the optimizer knows (If-Match). When other
   * workers' steps came in between (412), their parameters are written first, the edited elements kept,
   * and the result sent at the newer version: an edit replaces the elements it changed, nothing else.
   * 'pushed': sent at the version the optimizer knew; 'merged': other workers' steps were merged in first
   * (412); false: nothing was edited.
   */
  private async pushEdits(): Promise<'pushed' | 'merged' | false> {
    for (let attempt = 0; ; attempt++) {
      const edited = this.editedParams();
      if (!edited.length) return false;
      const values: Record<string, Tensor> = {};
      for (const [param, v] of this.variableOf) values[param] = { shape: v.shape.slice(), data: Float32Array.from(await v.data()) };
      let session: Session;
      try {
        session = await this.client.loadParams(this.session, values, { ifMatch: this.version, ...this.call });
      } catch (err) {
        if (!(err instanceof VersionMismatch) || attempt >= PUSH_ATTEMPTS - 1) throw err;
        const current = await this.client.params(this.session, this.call);
        this.write(current.params, current.version, 'merged');
        continue;
      }
      for (const [param, t] of Object.entries(values)) this.synced.set(param, t.data);
      this.version = Math.max(this.version, session.version);
      this.logger?.info?.(`[${this.worker}] session ${this.session}: parameters changed outside the optimizer (${listed(edited)}); sent the variables' values (version ${session.version}): the next step applies to them`);
      return attempt === 0 ? 'pushed' : 'merged';
    }
  }

  /**
   * What `model.save(..., {includeOptimizer: true})` keeps: the service's URL, the session and this
   * optimizer's other options (never the client's token). Keys and strings are stored with '%' as %25 and
   * '_' as %5F, since tfjs-layers camel-cases them when it loads a model.
   */
  override getConfig(): serialization.ConfigDict {
    const { client: _client, clientOptions: _clientOptions, signal: _signal, ...rest } = this.options;
    const config: RemoteASGDConfig = { ...rest, url: this.client.http.baseUrl, session: this.session };
    return protect(config) as serialization.ConfigDict;
  }

  /**
   * Rebuilds a RemoteASGD from getConfig() (tf.loadLayersModel calls it): a client of the saved URL with
   * `RemoteASGD.clientOptions` (its token, else the environment's ASGD_TOKEN). It is not attached:
   * `await optimizer.attach(model.trainableWeights)` before training, which reads the session's parameters.
   */
  static override fromConfig<T extends serialization.Serializable>(cls: serialization.SerializableConstructor<T>, config: serialization.ConfigDict): T {
    const { customObjects: _customObjects, ...saved } = config; // tfjs-layers adds customObjects to the config
    const { url, ...options } = unprotect(saved) as RemoteASGDConfig;
    if (typeof url !== 'string' || typeof options.session !== 'string') throw new TypeError('RemoteASGD.fromConfig: the config has no url and session');
    // clientOptions without a token (the README's `{ token: process.env.MY_ASGD_TOKEN }` with it unset) still
    // takes ASGD_TOKEN, as every client does (Transport).
    return new cls({ ...options, client: new ASGDClient(url, { ...RemoteASGD.clientOptions }) });
  }

  override async getWeights(): Promise<NamedTensor[]> {
    return [];
  }

  override async setWeights(): Promise<void> {
    // The optimizer's state lives in the service (GET /v1/sessions/{name}/state_dict), not in the model file.
  }
}

/** How often an edit is sent again after other workers' steps came in between (412). */
const PUSH_ATTEMPTS = 5;

/** Whether two float32 arrays hold the same bits (NaN payloads and -0 included). */
function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/** `answer` with the elements where `now` differs (in bits) from `before` taken from `now`. */
function mergeEdits(now: Float32Array, before: Float32Array, answer: Float32Array): Float32Array {
  const merged = Float32Array.from(answer);
  const m = new Uint32Array(merged.buffer);
  const x = new Uint32Array(now.buffer, now.byteOffset, now.length);
  const y = new Uint32Array(before.buffer, before.byteOffset, before.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) m[i] = x[i];
  return merged;
}

/** Up to five names, and how many more. */
const listed = (names: string[]) => names.slice(0, 5).join(', ') + (names.length > 5 ? ` and ${names.length - 5} more` : '');

// tf.loadLayersModel finds the optimizer of a model saved with includeOptimizer: true by this name.
serialization.registerClass(RemoteASGD);

export { ASGDClient };
