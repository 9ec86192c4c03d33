// Pickles: the safe unpickler (allow-list passed in; torch's is in torch-globals.ts) and the protocol-2 pickler.
export { Opaque, PyGlobal, unpickle, type Item, type UnpickleOptions } from './pickle-reader.ts';
export { encodeLong, pickle, type PickleWriteOptions, type StorageId } from './pickle-writer.ts';
export { findTorchGlobal, STORAGE_CLASS } from './torch-globals.ts';
