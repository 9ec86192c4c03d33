// Pickles: the safe unpickler (allow-list passed in; torch's is in torch-globals.ts) and the protocol-2 pickler.
export { MAX_PICKLE_ITEMS, MAX_PICKLE_OBJECTS, MAX_PICKLE_STACK_ITEMS, MAX_PICKLE_TEXT_BYTES, Opaque, PyGlobal, unpickle, type Item, type UnpickleOptions } from './pickle-reader.ts';
export { encodeLong, pickle, type PickleWriteOptions, type StorageId } from './pickle-writer.ts';
export { findTorchGlobal, STORAGE_CLASS } from './torch-globals.ts';
