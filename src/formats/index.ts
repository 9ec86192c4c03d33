// The public surface of src/formats: wire and file formats, pure code (no HTTP, no SQL).
//
// Reading an upload:  toAsgdStateDict(readTorchSave(body))      -> typed ASGD state_dict
//                     toCheckpoint(readTorchSave(body))         -> {model, optimizer, step}
//                     readSafetensors(body)                     -> float32 tensors + metadata
// Writing a reply:    const { byteLength, chunks } = writeTorchSave(fromAsgdStateDict(stateDict))
//                     reply.header('content-length', byteLength).send(Readable.from(chunks))
// Every bad input raises FormatError with a stable `code` (errors.ts); nothing else escapes a reader.
// Tensors read from a file are views into its buffer (pass { copy: true } for independent arrays).
export { FormatError, FORMAT_ERROR_CODES, isFormatError, type FormatErrorCode } from './errors.ts';
export {
  DTYPES, arrayFromBytes, bfloat16ToFloat, checkShape, contiguousStrides, elementSize, halfToFloat, int64ToFloat32, isDType,
  isTensor, makeTensor, numel, scalarValue, tensorBytes, toFloat32, toFloat32Tensor,
  type DType, type Float32Tensor, type Tensor, type TensorArrays, type TensorOf, type TypedArray,
} from './tensor.ts';
export { InertValue, PyDict, PyTuple, UnreadObject, isPyKey, orderedDict, pyIntToNumber, pyTypeName, type PyKey, type PyValue } from './pyvalue.ts';
export * from './zip.ts';
export * from './pickle.ts';
export { readTorchSave, torchSaveToBuffer, writeTorchSave, type TorchLoadOptions, type TorchSaveOptions } from './torch-save.ts';
export {
  ASGD_NUMERIC_KEYS, MAX_STEP_COUNT, missingGroupKey, NOT_ASGD_STATE, PARAM_STATE_KEYS, fromAsgdStateDict, scalarTensor, stepCountProblem, stepNotFloat32, toAsgdStateDict,
  type AsgdNumericKey, type AsgdParamGroup, type AsgdParamState, type AsgdStateDict, type StateDictReadOptions,
} from './optimizer-state.ts';
export { checkpointKeys, fromCheckpoint, missingCheckpointPart, fromModelStateDict, refuseUnreadInCheckpoint, toCheckpoint, toModelStateDict, type Checkpoint, type ModelStateDict } from './model-state.ts';
export { readOptimizerSafetensors, writeOptimizerSafetensors } from './optimizer-safetensors.ts';
export { readSafetensors, writeSafetensors, type SafetensorsFile, type SafetensorsReadOptions } from './safetensors.ts';
