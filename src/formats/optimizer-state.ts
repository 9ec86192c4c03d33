// torch.optim.ASGD.state_dict() as a typed value, and back to the exact Python structure it pickles
// as (torch/optim/optimizer.py, Optimizer.state_dict; torch/optim/asgd.py):
//   {"state": {0: {"step": tensor(4.), "eta": tensor(0.0099...), "mu": tensor(0.5), "ax": tensor([...])}, ...},
//    "param_groups": [{"lr": 0.01, "lambd": 0.0001, "alpha": 0.75, "t0": 1000000.0, "weight_decay": 0,
//                      "foreach": None, "maximize": False, "differentiable": False, "capturable": False,
//                      "params": [0, 1]}]}
// step, eta and mu are 0-dim float32 tensors; weight_decay=0 is a Python int; key order step, eta, mu, ax.

import { FormatError } from './errors.ts';
import { PyDict, pyIntToNumber, pyTypeName, type PyValue } from './pyvalue.ts';
import { isTensor, scalarValue, toFloat32Tensor, type Float32Tensor, type Tensor } from './tensor.ts';

/** The numeric hyperparameters of an ASGD group, by their Python names. */
export const ASGD_NUMERIC_KEYS = ['lr', 'lambd', 'alpha', 't0', 'weight_decay'] as const;
export type AsgdNumericKey = (typeof ASGD_NUMERIC_KEYS)[number];

/** One parameter's entry in state_dict()["state"]. */
export interface AsgdParamState {
  /** Steps taken, as PyTorch's float32 counter holds it. */
  step: number;
  /** Current learning rate (a float32 value). */
  eta: number;
  /** Averaging coefficient (a float32 value). */
  mu: number;
  /** The running average of the parameter, shaped like it. */
  ax: Float32Tensor;
}

/**
 * One entry of state_dict()["param_groups"]. Field names match src/optim's AsgdHyperparameters, so a
 * group can be passed where hyperparameters are expected.
 */
export interface AsgdParamGroup {
  lr: number;
  lambd: number;
  alpha: number;
  t0: number;
  weightDecay: number;
  foreach: boolean | null;
  maximize: boolean;
  /** Present in groups written by PyTorch 2.x, absent in 1.13's. Written only when set. */
  differentiable?: boolean;
  capturable?: boolean;
  /** Indices of the group's parameters, numbered across groups in order. */
  params: number[];
  /**
   * Numeric hyperparameters PyTorch holds as Python ints (it keeps the type the user passed:
   * weight_decay=0 by default, t0=2 if given as 2). Written back as ints. When absent, only
   * weight_decay is an int, and only when its value is whole (PyTorch's default 0).
   */
  intKeys?: AsgdNumericKey[];
  /** Any other keys of the group (e.g. initial_lr from an LR scheduler), in order; written after the known keys. */
  extra?: [string, PyValue][];
}

export interface AsgdStateDict {
  /** By parameter index, in file order; only parameters that have stepped have an entry. */
  state: Map<number, AsgdParamState>;
  paramGroups: AsgdParamGroup[];
}

export interface StateDictReadOptions {
  /**
   * Accept tensors of other dtypes (float64, float16, bfloat16, integers) and Python numbers where
   * float32 tensors belong, converting them to float32 with one rounding. Default false:
   * anything but float32 is refused with TENSOR_DTYPE_UNSUPPORTED.
   */
  toFloat32?: boolean;
}

const GROUP_FLAGS = ['foreach', 'maximize', 'differentiable', 'capturable'] as const;
const KNOWN_GROUP_KEYS = new Set<string>([...ASGD_NUMERIC_KEYS, ...GROUP_FLAGS, 'params']);

/** Reads the Python value of an ASGD state_dict. INVALID_STATE_DICT names the field that is wrong. */
export function toAsgdStateDict(value: PyValue, options: StateDictReadOptions = {}, path = 'state_dict'): AsgdStateDict {
  const top = expectDict(value, path);
  const groupsValue = top.get('param_groups');
  if (!Array.isArray(groupsValue)) throw invalid(`${path}.param_groups`, `must be a list, got ${describe(groupsValue)}`);
  // An id listed twice is refused where the state_dict meets the session's groups (load-plan.ts), after
  // torch's checks of their number and sizes, as for a JSON state_dict.
  const paramGroups = groupsValue.map((group, i) => readGroup(group, `${path}.param_groups[${i}]`));

  const stateValue = expectDict(top.get('state'), `${path}.state`);
  const state = new Map<number, AsgdParamState>();
  for (const [key, entry] of stateValue) {
    const field = `${path}.state[${String(key)}]`;
    const index = typeof key === 'bigint' ? pyIntToNumber(key, field) : NaN;
    // A whole number no group lists is kept by torch and used by no parameter: checked, and dropped at the
    // load (load-plan.ts), as in a JSON state_dict (a torch 2.x user's review: the file was refused where
    // torch and the JSON form take it, and a state_dict of another group count was told of its state's ids).
    if (!Number.isSafeInteger(index) || index < 0) throw invalid(field, 'keys must be parameter ids (whole numbers)');
    // {}: no state, as torch leaves it when code read optimizer.state[p] of a parameter that never stepped
    // (a defaultdict); its load_state_dict takes it, and so does this.
    if (entry instanceof PyDict && entry.size === 0) continue;
    state.set(index, readParamState(entry, field, options));
  }
  return { state, paramGroups };
}

function readGroup(value: PyValue, path: string): AsgdParamGroup {
  const dict = expectDict(value, path);
  const intKeys: AsgdNumericKey[] = [];
  const numeric = (key: AsgdNumericKey): number => {
    const v = dict.get(key);
    if (typeof v === 'bigint') {
      intKeys.push(key);
      return pyIntToNumber(v, `${path}.${key}`);
    }
    if (typeof v !== 'number') {
      if (v === undefined) throw invalid(`${path}.${key}`, missingGroupKey(dict.keys()));
      // torch 2.x takes a tensor lr (capturable, fused): its steps then compute eta as float32 tensors, which
      // the service's exact double-precision replay of the float path does not reproduce.
      const tensor = describe(v).startsWith('Tensor') ? `; save the group's value as a Python float (g['${key}'] = float(g['${key}'])) before torch.save: the service steps the float path` : '';
      throw invalid(`${path}.${key}`, `must be a number, got ${describe(v)}${tensor}`);
    }
    return v;
  };
  const flag = (key: (typeof GROUP_FLAGS)[number]): boolean | undefined => {
    const v = dict.get(key);
    if (v !== undefined && typeof v !== 'boolean') throw invalid(`${path}.${key}`, `must be a bool, got ${describe(v)}`);
    return v;
  };
  const foreach = dict.get('foreach');
  if (foreach !== undefined && foreach !== null && typeof foreach !== 'boolean') throw invalid(`${path}.foreach`, `must be a bool or None, got ${describe(foreach)}`);
  const params = dict.get('params');
  if (!Array.isArray(params)) throw invalid(`${path}.params`, params === undefined ? 'is missing' : `must be a list, got ${describe(params)}`);

  const group: AsgdParamGroup = {
    lr: numeric('lr'),
    lambd: numeric('lambd'),
    alpha: numeric('alpha'),
    t0: numeric('t0'),
    weightDecay: numeric('weight_decay'),
    foreach: foreach ?? null,
    maximize: flag('maximize') ?? false, // load_state_dict fills missing flags with the defaults
    params: params.map((p, i) => {
      const index = pyIntToNumber(p, `${path}.params[${i}]`);
      if (index < 0) throw invalid(`${path}.params[${i}]`, 'must not be negative');
      return index;
    }),
    intKeys,
  };
  const differentiable = flag('differentiable');
  const capturable = flag('capturable');
  if (differentiable !== undefined) group.differentiable = differentiable;
  if (capturable !== undefined) group.capturable = capturable;
  const extra = [...dict].filter(([key]) => typeof key !== 'string' || !KNOWN_GROUP_KEYS.has(key));
  for (const [key] of extra) if (typeof key !== 'string') throw invalid(path, `has a non-string key ${key}`);
  if (extra.length > 0) group.extra = extra as [string, PyValue][];
  return group;
}

/** Group keys of torch's other optimizers that ASGD's groups lack (SGD, Adam(W), RMSprop, Adagrad, Adadelta, NAdam, RAdam, Rprop, LBFGS). */
const OTHER_OPTIMIZER_KEYS = [
  'momentum', 'dampening', 'nesterov', 'betas', 'eps', 'amsgrad', 'centered', 'rho', 'lr_decay', 'initial_accumulator_value',
  'momentum_decay', 'decoupled_weight_decay', 'etas', 'step_sizes', 'max_iter', 'history_size', 'line_search_fn',
] as const;

/**
 * What a group's missing ASGD key says: "is missing", and, when the group has keys of another optimizer
 * (SGD's momentum, Adam's betas), that it is that optimizer's state_dict (a PyTorch user's review: an Adam
 * state_dict was refused for its missing lambd, a hint to add one).
 */
export function missingGroupKey(keys: Iterable<unknown>): string {
  const theirs = [...keys].filter((key) => (OTHER_OPTIMIZER_KEYS as readonly unknown[]).includes(key)).map(String);
  if (theirs.length === 0) return 'is missing';
  return `is missing, and the group has ${theirs.map((k) => JSON.stringify(k)).join(', ')}: a state_dict of another optimizer? A session holds torch.optim.ASGD's state (an ASGD state_dict, or the session's own)`;
}

/** The keys of one parameter's state in torch.optim.ASGD.state_dict(), in torch's order. */
export const PARAM_STATE_KEYS = ['step', 'eta', 'mu', 'ax'] as const;
/** Said of a per-parameter key that is not one of them. */
export const NOT_ASGD_STATE = 'is not part of ASGD\'s per-parameter state (step, eta, mu, ax): a state_dict of another optimizer?';

function readParamState(value: PyValue, path: string, options: StateDictReadOptions): AsgdParamState {
  const dict = expectDict(value, path);
  const step = readScalar(dict.get('step'), `${path}.step`, options);
  const problem = stepCountProblem(step) ?? stepNotFloat32(dict.get('step'), step);
  if (problem) throw invalid(`${path}.step`, problem);
  const eta = readScalar(dict.get('eta'), `${path}.eta`, options);
  const mu = readScalar(dict.get('mu'), `${path}.mu`, options);
  const ax = dict.get('ax');
  if (!isTensor(ax)) throw invalid(`${path}.ax`, ax === undefined ? 'is missing' : `must be a tensor, got ${describe(ax)}`);
  // Another optimizer's state (SGD's momentum_buffer, Adam's exp_avg) would otherwise be dropped without a word.
  for (const key of dict.keys()) {
    if (!(PARAM_STATE_KEYS as readonly unknown[]).includes(key)) throw invalid(`${path}.${String(key)}`, NOT_ASGD_STATE);
  }
  return { step, eta, mu, ax: float32Of(ax, `${path}.ax`, options) };
}

/**
 * The largest step count a parameter's state may hold: the largest float32 below 2**53 (2**53 - 2**29).
 * PyTorch's counter is a float32 tensor, and the session's step (the most any parameter took) must be
 * a safe integer, so every count up to here is stored, served and loaded back exactly.
 */
export const MAX_STEP_COUNT = 2 ** 53 - 2 ** 29;

/**
 * Why `step` cannot be a parameter's step count, or null when it can. ASGD only ever adds 1 to the
 * count (torch/optim/asgd.py, `step_t += 1`), so torch saves whole numbers from 0; the bound applies to
 * the value as float32, as it is stored.
 */
export function stepCountProblem(step: number): string | null {
  if (Number.isInteger(step) && step >= 0 && Math.fround(step) <= MAX_STEP_COUNT) return null;
  const got = Number.isNaN(step) ? 'NaN' : String(step);
  return `must be a whole number of steps from 0 to ${MAX_STEP_COUNT} (PyTorch's float32 step count), got ${got}`;
}

/**
 * Why a step count read in another dtype (float64, an integer; `raw`) cannot be kept as `as32`, its float32,
 * or null: the count is stored as PyTorch's float32 tensor, and one that float32 does not hold (2**24 + 1)
 * would be changed without a word. A tensor is given as itself.
 */
export function stepNotFloat32(raw: unknown, as32: number): string | null {
  // torch 1.13 loads a bool step, then fails at the next step (result type Long can't be cast to Bool).
  if (raw !== null && typeof raw === 'object' && isTensor(raw as PyValue) && (raw as Tensor).dtype === 'bool') {
    return 'is a bool tensor: a step count is a number (torch loads it, then fails at the next step)';
  }
  const value = raw !== null && typeof raw === 'object' && isTensor(raw as PyValue) ? scalarValue(raw as Tensor) : raw;
  // (NaN and the like are the count check's to name.)
  const exact = typeof value === 'bigint' ? Number.isInteger(as32) && BigInt(as32) === value : typeof value !== 'number' || !Number.isFinite(value) || value === as32;
  return exact ? null : `${String(value)} is not a float32 value: the step count is kept as PyTorch's float32 tensor (whole numbers up to 2**24, then every float32)`;
}

/** A float32 scalar: a one-element float32 tensor, or (with toFloat32) any one-element tensor or Python number. */
function readScalar(value: PyValue | undefined, path: string, options: StateDictReadOptions): number {
  if (value === undefined) throw invalid(path, 'is missing');
  if (isTensor(value)) {
    if (value.data.length !== 1) throw invalid(path, `must be a scalar tensor, got shape [${value.shape.join(', ')}]`);
    return float32Of(value, path, options).data[0];
  }
  if (typeof value === 'number' || typeof value === 'bigint') {
    if (!options.toFloat32) throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `${path} is a Python ${describe(value)}, not a float32 tensor (allow conversion to accept it)`);
    return float32Of({ dtype: typeof value === 'bigint' ? 'int64' : 'float64', shape: [], data: typeof value === 'bigint' ? BigInt64Array.of(value) : Float64Array.of(value) } as Tensor, path, options).data[0];
  }
  throw invalid(path, `must be a tensor, got ${describe(value)}`);
}

function float32Of(tensor: Tensor, path: string, options: StateDictReadOptions): Float32Tensor {
  if (tensor.dtype === 'float32') return tensor;
  if (!options.toFloat32) throw new FormatError('TENSOR_DTYPE_UNSUPPORTED', `${path} has dtype ${tensor.dtype}; float32 is required (allow conversion to accept it)`);
  return toFloat32Tensor(tensor);
}

/** The Python value ASGD.state_dict() returns for this state, ready for writeTorchSave. */
export function fromAsgdStateDict(stateDict: AsgdStateDict): PyDict {
  const state = new PyDict();
  for (const [index, entry] of stateDict.state) {
    state.set(BigInt(index), new PyDict([
      ['step', scalarTensor(entry.step)],
      ['eta', scalarTensor(entry.eta)],
      ['mu', scalarTensor(entry.mu)],
      ['ax', entry.ax],
    ]));
  }
  return new PyDict([
    ['state', state],
    ['param_groups', stateDict.paramGroups.map(writeGroup)],
  ]);
}

function writeGroup(group: AsgdParamGroup): PyDict {
  const intKeys = new Set<AsgdNumericKey>(group.intKeys ?? (Number.isInteger(group.weightDecay) ? ['weight_decay'] : []));
  const numeric = (key: AsgdNumericKey, value: number): PyValue => (intKeys.has(key) && Number.isSafeInteger(value) ? BigInt(value) : value);
  const dict = new PyDict([
    ['lr', numeric('lr', group.lr)],
    ['lambd', numeric('lambd', group.lambd)],
    ['alpha', numeric('alpha', group.alpha)],
    ['t0', numeric('t0', group.t0)],
    ['weight_decay', numeric('weight_decay', group.weightDecay)],
    ['foreach', group.foreach],
    ['maximize', group.maximize],
  ]);
  if (group.differentiable !== undefined) dict.set('differentiable', group.differentiable);
  if (group.capturable !== undefined) dict.set('capturable', group.capturable);
  for (const [key, value] of group.extra ?? []) {
    if (KNOWN_GROUP_KEYS.has(key)) throw new FormatError('INVALID_STATE_DICT', `param group extra key ${key} duplicates a known key`);
    dict.set(key, value);
  }
  dict.set('params', group.params.map((index) => BigInt(index)));
  return dict;
}

/** A 0-dim float32 tensor holding float32(value). */
export function scalarTensor(value: number): Float32Tensor {
  return { dtype: 'float32', shape: [], data: Float32Array.of(value) };
}

export function expectDict(value: PyValue | undefined, path: string): PyDict {
  if (!(value instanceof PyDict)) throw invalid(path, value === undefined ? 'is missing' : `must be a dict, got ${describe(value)}`);
  return value;
}

export function invalid(path: string, message: string): FormatError {
  return new FormatError('INVALID_STATE_DICT', `${path} ${message}`);
}

function describe(value: PyValue | undefined): string {
  return value === undefined ? 'nothing' : pyTypeName(value);
}
