// The service's safetensors layout of an optimizer state_dict (safetensors holds flat named tensors, not
// nested dicts): per-parameter state as tensors `state.<index>.<step|eta|mu|ax>` (scalars as 0-dim float32),
// param_groups as a JSON list in the `param_groups` metadata entry. torch users read it with
// safetensors.torch.load_file plus json.loads(metadata["param_groups"]).
import { fail } from './errors.ts';
import { readSafetensors, writeSafetensors, type SafetensorsReadOptions } from './safetensors.ts';
import { toFloat32, type Float32Tensor, type Tensor } from './tensor.ts';
import { stepNotFloat32, type AsgdParamState } from './optimizer-state.ts';
import type { ByteStream } from './zip.ts';

const STATE_NAME = /^state\.(\d{1,9})\.(step|eta|mu|ax)$/;

/**
 * The state tensors of the layout as {index: {step, eta, mu, ax: {shape, data}}}, and the param_groups
 * metadata entry as written (a JSON text, or undefined when absent): its contents are checked by the
 * state_dict reader like a JSON upload's.
 */
export function readOptimizerSafetensors(body: Uint8Array, options: Pick<SafetensorsReadOptions, 'maxTensors'> = {}): { state: Record<string, Record<string, unknown>>; paramGroups: string | undefined } {
  const file = readSafetensors(body, { dtypes: 'all', maxTensors: options.maxTensors });
  const state: Record<string, Record<string, unknown>> = {};
  for (const [name, tensor] of file.tensors) {
    const m = STATE_NAME.exec(name);
    if (!m) fail('INVALID_STATE_DICT', `${name}: tensor names must be state.<index>.<step|eta|mu|ax>`);
    // As from a torch.save file, and as torch's load_state_dict casts the state to its parameters' dtype:
    // another dtype (float64, float16, bfloat16, an integer) is converted to float32 with one rounding.
    const data = toFloat32(tensor);
    const problem = m[2] === 'step' && data.length === 1 ? stepNotFloat32(tensor, data[0]) : null;
    if (problem) fail('INVALID_STATE_DICT', `${name}: ${problem}`);
    (state[m[1]] ??= {})[m[2]] = { shape: tensor.shape, data };
  }
  return { state, paramGroups: file.metadata.get('param_groups') };
}

/** Writes the layout: `paramGroups` as their JSON form, `metadata` added beside them. */
export function writeOptimizerSafetensors(state: ReadonlyMap<number, AsgdParamState>, paramGroups: unknown[], metadata: Record<string, string>): ByteStream {
  const tensors: [string, Tensor][] = [];
  const scalar = (x: number): Float32Tensor => ({ dtype: 'float32', shape: [], data: Float32Array.of(x) });
  for (const [i, s] of state) {
    tensors.push([`state.${i}.step`, scalar(s.step)], [`state.${i}.eta`, scalar(s.eta)], [`state.${i}.mu`, scalar(s.mu)], [`state.${i}.ax`, s.ax]);
  }
  return writeSafetensors(tensors, { param_groups: JSON.stringify(paramGroups), ...metadata });
}
