// Reads a create request: JSON, or a safetensors / torch.save file of the initial parameters; both go
// through the same checks.
import type { Config } from '../../config.ts';
import type { GroupSpec, ParamSpec } from '../../db/schema.ts';
import { ApiError, errors } from '../../errors.ts';
import { parseJsonWithin, unstorableText } from '../../formats/json-depth.ts';
import type { CreateInput } from '../../sessions/model.ts';
import {
  assertName, assertShape, buildGroups, DEFAULT_GROUP, FLAG_KEYS, HYPERPARAMETER_KEYS, MAX_PARAMS, MAX_SESSION_NUMEL, integerLiterals, numelOf, PARAM_NAME_MAX, recordIntegerLiterals, resolveHyperparameters,
  type HyperparameterInput,
} from '../../sessions/spec.ts';
import { firstNonFinite, readJsonTensor } from '../../sessions/tensors.ts';
import { parseAggregation } from '../../sessions/aggregation.ts';
import { CREATE_FILE_LIMITS, readNamedTensors } from './binary.ts';
import type { WireFormat } from '../media.ts';
import { optionalWhole } from '../common.ts';
import { SETTING_LIMITS } from '../schemas.ts';

const CREATE_KEYS = ['name', 'params', 'hyperparameters', 'param_groups', 'snapshot_every', 'keep_snapshots', 'max_staleness', 'keep_log_bytes', 'expire_after_idle_s', 'aggregation'];

function assertParamName(value: unknown, field: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.length > PARAM_NAME_MAX || /[\u0000-\u001f\u007f]/.test(value)) {
    throw errors.invalidTensor(field, `parameter names must be 1-${PARAM_NAME_MAX} UTF-16 code units (most characters take one, an emoji two) without control characters`);
  }
  // A file's names are not checked as JSON text is (content-types.ts): PostgreSQL refused this one at the
  // insert, a 400 naming no field (found by a review).
  if (unstorableText(value, field) !== null) throw errors.invalidTensor(field, 'text with an unpaired UTF-16 surrogate is not accepted (PostgreSQL stores none)');
  // A safetensors file keeps its metadata under this key: such a parameter could never be read or stepped in one.
  if (value === '__metadata__') throw errors.invalidTensor(field, '"__metadata__" is reserved (safetensors keeps its metadata under it)');
  // JSON answers are objects by parameter name, and JavaScript does not keep an own key of this name in
  // an object it builds (the parameter vanished from GET .../params); JSON bodies refuse it already.
  if (value === '__proto__') throw errors.invalidTensor(field, '"__proto__" cannot be a parameter name (JSON answers could not hold it)');
  return value;
}

/** The parts of a create request other than the tensors (shared by the JSON and the file forms). */
function parseCreateOptions(body: Record<string, unknown>, config: Config, params: ParamSpec[], data: Float32Array[]): CreateInput {
  const name = assertName(body.name, 'name');
  if (params.length === 0) throw errors.invalidBody('params: a session needs at least one parameter');
  const hyper = body.hyperparameters;
  if (hyper !== null && typeof hyper === 'object' && !Array.isArray(hyper)) {
    // As for param_groups: a misspelt hyperparameter must not silently fall back to its default.
    for (const key of Object.keys(hyper)) {
      if (!(HYPERPARAMETER_KEYS as readonly string[]).includes(key) && !(FLAG_KEYS as readonly string[]).includes(key)) throw errors.invalidHyperparameter(`hyperparameters.${key}`, 'unknown key');
    }
  }
  const defaults = resolveHyperparameters(DEFAULT_GROUP as Omit<GroupSpec, 'params'>, hyper as HyperparameterInput | undefined, 'hyperparameters', hyper && typeof hyper === 'object' ? integerLiterals.get(hyper) : undefined);
  const { params: ordered, groups, order } = buildGroups(params, defaults, body.param_groups);
  const snapshotEvery = optionalWhole(body.snapshot_every, 'snapshot_every', 1, SETTING_LIMITS.snapshot_every) ?? config.defaultSnapshotEvery;
  const keepSnapshots = optionalWhole(body.keep_snapshots, 'keep_snapshots', 1, SETTING_LIMITS.keep_snapshots) ?? config.defaultKeepSnapshots;
  const maxStaleness = optionalWhole(body.max_staleness, 'max_staleness', 0, SETTING_LIMITS.max_staleness);
  // Absent: the configured default; null: no byte bound / never expire.
  const keepLogBytes = body.keep_log_bytes === null ? null
    : optionalWhole(body.keep_log_bytes, 'keep_log_bytes', 1, SETTING_LIMITS.keep_log_bytes) ?? config.defaultKeepLogBytes;
  const expireAfterIdleS = body.expire_after_idle_s === null ? null
    : optionalWhole(body.expire_after_idle_s, 'expire_after_idle_s', 1, SETTING_LIMITS.expire_after_idle_s) ?? config.defaultExpireAfterIdleS;
  const aggregation = parseAggregation(body.aggregation) ?? null;
  return { name, params: ordered, data: order.map((i) => data[i]), groups, snapshotEvery, keepSnapshots, maxStaleness, keepLogBytes, expireAfterIdleS, aggregation };
}

function checkParamList(params: ParamSpec[]): void {
  if (params.length > MAX_PARAMS) throw errors.invalidBody(`params: at most ${MAX_PARAMS} parameters`);
  const seen = new Set<string>();
  let total = 0;
  params.forEach((p, i) => {
    if (seen.has(p.name)) throw errors.invalidBody(`params[${i}].name: ${JSON.stringify(p.name)} appears twice`);
    seen.add(p.name);
    total += numelOf(p.shape);
  });
  if (total > MAX_SESSION_NUMEL) throw errors.tooLarge(`params: ${total} elements; a session holds at most ${MAX_SESSION_NUMEL}`);
}

/**
 * A create request whose body is a file of initial parameters: safetensors, or a torch.save'd model
 * state_dict of the parameters (`torch.save(dict(model.named_parameters()), f)`). Everything else of the request is a JSON object of
 * the same keys as the JSON form (name, hyperparameters, param_groups, …) taken from the `options` query
 * parameter and, in safetensors, the `asgd` metadata entry (merged); `?name=` may give the name alone.
 */
function parseFileCreate(body: Buffer, query: CreateQuery, format: WireFormat, config: Config): CreateInput {
  const { tensors, metadata, aliases } = readNamedTensors(format, body, 'params', CREATE_FILE_LIMITS);
  // Tied weights: two untied copies would train apart, and the model's named_parameters() (RemoteASGD) would
  // not match the session's names.
  for (const [alias, name] of aliases) {
    throw errors.invalidBody(`params.${alias}: is the same tensor as params.${name} in this file (tied weights, as model.state_dict() names them): send the parameters once each, as dict(model.named_parameters()) has them`);
  }
  // The options come from the query (?options=) and, in a safetensors file, its `asgd` metadata entry: a
  // fault in them is named where it is (INVALID_QUERY options… / INVALID_BODY __metadata__.asgd…). Given in
  // both, they are merged; a key in both with different values is refused (the query's used to win silently).
  const fromFile = optionsOf(metadata.get('asgd'), false);
  const fromQuery = optionsOf(query.options, true);
  for (const [key, value] of Object.entries(fromFile)) {
    if (key in fromQuery && JSON.stringify(fromQuery[key]) !== JSON.stringify(value)) {
      throw errors.invalidQuery(`options.${key}`, `${JSON.stringify(fromQuery[key]).slice(0, 100)} in the query and ${JSON.stringify(value).slice(0, 100)} in __metadata__.asgd; give it once, or the same in both`);
    }
  }
  const options: Record<string, unknown> = { ...fromFile, ...fromQuery };
  const where = query.options !== undefined && 'name' in fromQuery ? 'options' : '__metadata__.asgd';
  if (query.name !== undefined) {
    // Two names for one session: refused, as a step refuses a field given twice with different values.
    if (options.name !== undefined && options.name !== query.name) {
      throw errors.invalidQuery('name', `${JSON.stringify(query.name)} in the query and ${JSON.stringify(options.name)} in ${where}; give it once, or the same in both`);
    }
    options.name = query.name;
  }
  assertName(options.name, 'name');
  const params: ParamSpec[] = [];
  const data: Float32Array[] = [];
  for (const [name, tensor] of tensors) {
    // A name of other characters than a JSON key's plain ones is quoted in the messages (a NUL, a lone surrogate).
    const field = /^[\x21-\x7e]+$/.test(name) ? `params.${name}` : `params[${JSON.stringify(name)}]`;
    assertParamName(name, field);
    params.push({ name, shape: assertShape(tensor.shape, `${field}.shape`) });
    const bad = firstNonFinite(tensor.data);
    if (bad >= 0) throw errors.invalidTensor(`${field}.data[${bad}]`, 'is not finite');
    data.push(tensor.data);
  }
  checkParamList(params);
  try {
    return parseCreateOptions(options, config, params, data);
  } catch (err) {
    // Its messages name an option by its key alone (as in a JSON body): here it is named where it was given,
    // `options.<key>` or `__metadata__.asgd.<key>` (found by a review: every bad setting was INVALID_QUERY).
    const key = err instanceof ApiError ? /^[a-z_]+/.exec(err.message)?.[0] : undefined;
    if (!(err instanceof ApiError) || key === undefined || key === 'name' || !(key in fromQuery || key in fromFile)) throw err;
    throw key in fromQuery ? errors.givenIn(err, 'options', 'querystring') : errors.givenIn(err, '__metadata__.asgd', 'body');
  }
}

/** A file create's options object from `?options=` (`inQuery`) or the file's `asgd` metadata entry; {} when absent. */
function optionsOf(raw: string | undefined, inQuery: boolean): Record<string, unknown> {
  if (raw === undefined) return {};
  const where = inQuery ? 'options' : '__metadata__.asgd';
  const refuse = (field: string, message: string) => (inQuery ? errors.invalidQuery(field, message) : errors.invalidBody(`${field}: ${message}`));
  const options = parseJsonWithin(raw, (problem) =>
    refuse(where, problem ?? 'must be a JSON object {"name", "hyperparameters", "param_groups", …}'), undefined, recordIntegerLiterals) as Record<string, unknown>;
  if (options === null || typeof options !== 'object' || Array.isArray(options)) throw refuse(where, 'must be a JSON object');
  for (const key of Object.keys(options)) if (!CREATE_KEYS.includes(key) || key === 'params') throw refuse(`${where}.${key}`, 'unknown key');
  return options;
}

/** The query parameters of a create request (a file body's options). */
export interface CreateQuery {
  name?: string;
  options?: string;
}

export function parseCreateBody(body: unknown, query: CreateQuery, format: WireFormat, config: Config): CreateInput {
  if (Buffer.isBuffer(body)) return parseFileCreate(body, query, format, config);
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw errors.invalidBody('body: must be a JSON object {"name", "params", ...}');
  }
  const b = body as Record<string, unknown>;
  for (const key of Object.keys(b)) if (!CREATE_KEYS.includes(key)) throw errors.invalidBody(`${key}: unknown key`);
  // The query's name and options are a file body's; with a JSON body they were ignored (the session got the body's name).
  if (query.options !== undefined) throw errors.invalidQuery('options', 'is for a file body (torch.save or safetensors); a JSON body holds its options itself');
  if (query.name !== undefined && query.name !== b.name) {
    throw errors.invalidQuery('name', `${JSON.stringify(query.name)} in the query and ${JSON.stringify(b.name)} in the body; give it once, or the same in both`);
  }
  assertName(b.name, 'name');
  if (!Array.isArray(b.params)) throw errors.invalidBody('params: must be a list of {"name", "shape", "data"}');
  if (b.params.length > MAX_PARAMS) throw errors.invalidBody(`params: at most ${MAX_PARAMS} parameters`);
  const params: ParamSpec[] = [];
  const data: Float32Array[] = [];
  let total = 0;
  for (const [i, raw] of (b.params as unknown[]).entries()) {
    const field = `params[${i}]`;
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw errors.invalidBody(`${field}: must be {"name", "shape", "data"}`);
    const p = raw as Record<string, unknown>;
    for (const key of Object.keys(p)) if (!['name', 'shape', 'data', 'dtype'].includes(key)) throw errors.invalidBody(`${field}.${key}: unknown key`);
    const name = assertParamName(p.name, `${field}.name`);
    const shape = assertShape(p.shape, `${field}.shape`);
    const numel = numelOf(shape);
    total += numel;
    if (total > MAX_SESSION_NUMEL) throw errors.tooLarge(`params: more than ${MAX_SESSION_NUMEL} elements; a session holds at most that`);
    const values = new Float32Array(numel);
    readJsonTensor({ shape: p.shape, data: p.data, ...(p.dtype !== undefined && { dtype: p.dtype }) }, `${field}`, shape, values, 'reject');
    params.push({ name, shape });
    data.push(values);
  }
  checkParamList(params);
  return parseCreateOptions(b, config, params, data);
}
