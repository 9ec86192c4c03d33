// The public surface of src/formats: wire and file formats, pure code (no HTTP, no SQL).
export { FormatError, FORMAT_ERROR_CODES, isFormatError, type FormatErrorCode } from './errors.ts';
export {
  DTYPES, arrayFromBytes, bfloat16ToFloat, checkShape, contiguousStrides, elementSize, halfToFloat, int64ToFloat32, isDType,
  isTensor, makeTensor, numel, scalarValue, tensorBytes, toFloat32, toFloat32Tensor,
  type DType, type Float32Tensor, type Tensor, type TensorArrays, type TensorOf, type TypedArray,
} from './tensor.ts';
export { PyDict, PyTuple, isPyKey, orderedDict, pyIntToNumber, pyTypeName, type PyKey, type PyValue } from './pyvalue.ts';
export { readZip, type ZipArchive, type ZipEntry, type ZipReadOptions } from './zip-reader.ts';
export { streamToBuffer, zipStream, type ByteStream, type ZipWriterEntry, type ZipWriterOptions } from './zip-writer.ts';
export { PyGlobal, unpickle, type UnpickleOptions } from './pickle-reader.ts';
export { pickle, type PickleWriteOptions, type StorageId } from './pickle-writer.ts';
export { findTorchGlobal, STORAGE_CLASS } from './torch-globals.ts';
export { readTorchSave, torchSaveToBuffer, writeTorchSave, type TorchLoadOptions, type TorchSaveOptions } from './torch-save.ts';
export {
  ASGD_NUMERIC_KEYS, fromAsgdStateDict, scalarTensor, toAsgdStateDict,
  type AsgdNumericKey, type AsgdParamGroup, type AsgdParamState, type AsgdStateDict, type StateDictReadOptions,
} from './optimizer-state.ts';
export { fromCheckpoint, fromModelStateDict, toCheckpoint, toModelStateDict, type Checkpoint, type ModelStateDict } from './model-state.ts';
export { readSafetensors, writeSafetensors, type SafetensorsFile, type SafetensorsReadOptions } from './safetensors.ts';
