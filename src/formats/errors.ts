// The one error type of src/formats. Every malformed, hostile or unsupported input ends here,
// with a stable code the HTTP layer maps to a 400; nothing else escapes a reader.

/** Every code a format reader or writer can raise, with what it means. Codes are stable API. */
export const FORMAT_ERROR_CODES = {
  ZIP_TRUNCATED: 'the zip archive ends before a record it declares',
  ZIP_CORRUPT: 'a zip record is malformed: bad signature, offsets outside the file, overlapping entries, size mismatch',
  ZIP_UNSUPPORTED: 'a zip feature this reader refuses: encryption, multiple disks, a compression method other than stored/deflate',
  ZIP_CRC_MISMATCH: 'an entry does not match the CRC-32 its header declares',
  ZIP_DUPLICATE_ENTRY: 'two zip entries have the same name',
  ZIP_ENTRY_MISSING: 'a zip entry the format requires is absent',
  ZIP_LIMIT_EXCEEDED: 'an entry or archive is larger than the caller allows',
  PICKLE_TRUNCATED: 'the pickle ends before its STOP opcode or inside an argument',
  PICKLE_OPCODE_REFUSED: 'a pickle opcode this safe unpickler does not run',
  PICKLE_GLOBAL_REFUSED: 'a pickle global outside the allow-list (module.name)',
  PICKLE_STACK_INVALID: 'the pickle stack or mark stack does not hold what an opcode needs',
  PICKLE_MEMO_INVALID: 'a memo lookup of an index never stored',
  PICKLE_CALL_INVALID: 'an allowed callable was called with arguments it does not accept',
  PICKLE_VALUE_UNSUPPORTED: 'a value the Python value model cannot hold (sets, float keys, cycles, bare classes)',
  PICKLE_TOO_DEEP: 'values or marks nest deeper than the limit',
  PICKLE_LIMIT_EXCEEDED: 'the pickle exceeds a size limit (integer length, expanded size)',
  PICKLE_STRING_INVALID: 'a string is not valid UTF-8',
  TENSOR_DTYPE_UNSUPPORTED: 'a tensor dtype (or storage class) this service does not handle here',
  TENSOR_SHAPE_INVALID: 'a tensor shape, stride or offset is invalid or does not fit its data',
  STORAGE_MISSING: 'a tensor refers to a storage record that is absent or too small',
  TORCH_SAVE_INVALID: 'the archive is not a torch.save file this reader understands (version, layout)',
  /** The API's code for a malformed state_dict (src/errors.ts), so a file and a JSON body answer alike. */
  INVALID_STATE_DICT: 'a state_dict or checkpoint does not have the expected shape; the message names the field',
  /** The API's code for a malformed tensor: a file of one tensor a name (gradients, parameters) holding something else. */
  INVALID_TENSOR: 'a file of named tensors holds something other than a tensor under a name; the message names it',
  SAFETENSORS_HEADER_INVALID: 'the safetensors header is malformed or inconsistent with the body',
} as const;

export type FormatErrorCode = keyof typeof FORMAT_ERROR_CODES;

export class FormatError extends Error {
  readonly code: FormatErrorCode;

  constructor(code: FormatErrorCode, message: string) {
    super(message);
    this.name = 'FormatError';
    this.code = code;
  }
}

export function isFormatError(err: unknown): err is FormatError {
  return err instanceof FormatError;
}

/** Throws a FormatError; typed `never` so it can end an expression. */
export function fail(code: FormatErrorCode, message: string): never {
  throw new FormatError(code, message);
}
