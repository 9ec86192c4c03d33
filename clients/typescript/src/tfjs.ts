// RemoteASGD: a TensorFlow.js optimizer whose steps are torch.optim.ASGD steps applied by asgd-serve.
// applyGradients sends one request (the gradients, return=params) and writes the parameters the service
// answers into the variables. tfjs calls applyGradients synchronously and HTTP is not, so the write
// lands when the answer does: `await opt.synchronize()` after `minimize` in a custom loop, and
// `callbacks: [opt.callback]` in model.fit (it synchronizes at the end of every batch). A gradient
// computed before the previous answer landed is sent with the version it was computed from
// (base_version), so the service counts it as stale rather than pretending otherwise.
// In a session with `aggregation` each step is this worker's contribution to the round at the variables'
// version; its answer (after the round has stepped) brings the parameters of the next version.
import { Optimizer, tensor, type NamedTensorMap, type Scalar, type Tensor as TfTensor, type Variable } from '@tensorflow/tfjs-core';
import { ASGDClient } from './client.ts';
import { SessionNotFound } from './errors.ts';
import type { TransportOptions } from './http.ts';
import type { Tensor } from './tensors.ts';
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
  /** With aggregation: give up waiting for a round after this long (RoundPending). Default: no limit. */
  maxRoundWaitMs?: number;
  /** Gradient transport: safetensors (default) or JSON, and the wire dtype (F32 default). */
  format?: StepOptions['format'];
  dtype?: StepOptions['dtype'];
  /** Send each step's loss as the metric `loss` (the service keeps it in the session's history). */
  sendLoss?: boolean;
  retryBudgetMs?: number;
}

type NamedTensor = { name: string; tensor: TfTensor };

const NAME = /[^A-Za-z0-9._-]/g;

/** The session's name for a variable: its tfjs name with characters outside A-Za-z0-9._- made '.'. */
export const paramNameOf = (variableName: string): string => variableName.replace(NAME, '.').slice(-128);

function asVariable(v: VariableLike): Variable {
  return ('assign' in v ? v : (v as { read(): unknown }).read()) as Variable;
}

export class RemoteASGD extends Optimizer {
  static get className(): string {
    return 'RemoteASGD';
  }

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
  /** Hyperparameters for the next step only (e.g. a learning-rate schedule): one object per session group. */
  nextParamGroups: StepParamGroup[] | undefined;
  /** The batch size of the next step (sent as its `samples`; a session's aggregation.target_samples counts them). */
  nextSamples: number | undefined;
  /** This worker's id (see the `worker` option). */
  readonly worker: string;
  /** The session's aggregation as attach() found it (null: every step is applied on its own). */
  aggregation: Aggregation | null = null;
  private pending: Promise<void> = Promise.resolve();
  private failure: unknown = null;
  private pendingLoss: number | undefined;

  constructor(options: RemoteASGDOptions) {
    super();
    this.options = options;
    this.client = typeof options.client === 'string' ? new ASGDClient(options.client, options.clientOptions) : options.client;
    this.session = options.session;
    this.worker = options.worker ?? `js-${crypto.randomUUID().replaceAll('-', '').slice(0, 12)}`;
  }

  /**
   * Binds the optimizer to these variables (a model's `trainableWeights`, or tf.Variables) and to the
   * session: creates it from their values if it is missing, else writes its parameters into them.
   * `names` gives the session's parameter names (default: the variables' names, made URL-safe).
   */
  async attach(variables: VariableLike[], names?: string[]): Promise<Session> {
    if (names && names.length !== variables.length) throw new RangeError(`names: ${names.length} names for ${variables.length} variables`);
    const vars = variables.map(asVariable);
    vars.forEach((v, i) => {
      const param = names?.[i] ?? paramNameOf(v.name);
      this.paramOf.set(v.name, param);
      this.variableOf.set(param, v);
    });
    let session: Session;
    try {
      session = await this.client.getSession(this.session);
    } catch (err) {
      if (!(err instanceof SessionNotFound) || this.options.create === 'never') throw err;
      const params = await Promise.all(vars.map(async (v) => ({ name: this.paramOf.get(v.name)!, shape: v.shape, data: Float32Array.from(await v.data()) })));
      session = await this.client.createSession({ name: this.session, params, hyperparameters: this.options.hyperparameters, ...this.options.sessionSettings });
      this.version = session.version;
      this.aggregation = session.aggregation ?? null;
      return session;
    }
    this.aggregation = session.aggregation ?? null;
    const known = new Set(session.params.map((p) => p.name));
    const missing = [...this.variableOf.keys()].filter((p) => !known.has(p));
    if (missing.length) throw new RangeError(`session ${this.session} has no parameter ${missing.join(', ')} (it has ${[...known].join(', ')})`);
    const current = await this.client.params(this.session);
    this.write(current.params, current.version);
    return session;
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
    const baseVersion = this.version;
    const metrics = this.pendingLoss !== undefined && Number.isFinite(this.pendingLoss) ? { loss: this.pendingLoss } : undefined;
    const paramGroups = this.nextParamGroups;
    // A contribution when the session has rounds; the worker id is also sent when given (checked, then ignored).
    const round: StepOptions = this.aggregation !== null || this.options.worker !== undefined
      ? { worker: this.worker, wait: this.options.roundWaitSeconds, maxWaitMs: this.options.maxRoundWaitMs }
      : {};
    const samples = this.nextSamples;
    this.pendingLoss = undefined;
    this.nextParamGroups = undefined;
    this.nextSamples = undefined;
    this.incrementIterations();
    this.pending = this.pending.then(async () => {
      if (this.failure) return; // a failed step ends the run: the rest are not sent
      try {
        const answer = await this.client.step(this.session, grads, {
          return: 'params', baseVersion, metrics, paramGroups, samples, ...round, format: this.options.format, dtype: this.options.dtype, retryBudgetMs: this.options.retryBudgetMs,
        });
        this.lastStep = answer;
        if (answer.params) this.write(answer.params, answer.paramsVersion ?? answer.version);
        else {
          // A service without return=params: read them (a second request).
          const current = await this.client.params(this.session);
          this.write(current.params, current.version);
        }
      } catch (err) {
        this.failure = err;
      }
    });
  }

  /** Waits for every step in flight; their parameters are in the variables after it. Throws a step's error. */
  async synchronize(): Promise<void> {
    await this.pending;
    if (this.failure) {
      const err = this.failure;
      this.failure = null;
      throw err;
    }
  }

  /** For model.fit: `callbacks: [optimizer.callback]` makes every batch start from the service's parameters. */
  get callback(): { onBatchEnd: () => Promise<void>; onTrainEnd: () => Promise<void> } {
    return { onBatchEnd: () => this.synchronize(), onTrainEnd: () => this.synchronize() };
  }

  /** Reads the newest parameters from the service into the variables (e.g. after other workers stepped). */
  async pull(): Promise<number> {
    await this.synchronize();
    const current = await this.client.paramsIfChanged(this.session, this.version);
    if (current) this.write(current.params, current.version);
    return this.version;
  }

  private write(params: Record<string, Tensor>, version: number): void {
    if (version < this.version) return; // an older answer than what the variables hold
    for (const [param, t] of Object.entries(params)) {
      const v = this.variableOf.get(param);
      if (!v) continue;
      const value = tensor(t.data, t.shape, 'float32');
      v.assign(value);
      value.dispose();
    }
    this.version = version;
  }

  override getConfig() {
    return { session: this.session, url: this.client.http.baseUrl };
  }

  override async getWeights(): Promise<NamedTensor[]> {
    return [];
  }

  override async setWeights(): Promise<void> {
    // The optimizer's state lives in the service (GET /v1/sessions/{name}/state_dict), not in the model file.
  }
}

export { ASGDClient };
