// A bound on JSON nesting, checked on the bytes before JSON.parse builds anything: a body of a hundred
// million `[` is 200 MB of text within the JSON limit, and JSON.parse makes an array of each (about 40
// bytes of heap a byte of text), which took the process past its heap limit. No value this service reads
// nests deeply (a tensor has at most 16 dimensions), so a deep one is refused before it is parsed.

const OPEN_ARRAY = 0x5b; // [
const OPEN_OBJECT = 0x7b; // {
const CLOSE_ARRAY = 0x5d; // ]
const CLOSE_OBJECT = 0x7d; // }
const QUOTE = 0x22; // "
const BACKSLASH = 0x5c; // \

/**
 * The byte offset at which the JSON text in `bytes` (UTF-8) first nests deeper than `maxDepth` arrays and
 * objects, or -1 when it never does. Brackets inside strings do not count. Text that is not JSON at all is
 * left to the parser (a stray closing bracket resets nothing: the depth only grows with openings).
 */
export function jsonTooDeepAt(bytes: Uint8Array, maxDepth: number): number {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i];
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) {
      inString = true;
    } else if (c === OPEN_ARRAY || c === OPEN_OBJECT) {
      if (++depth > maxDepth) return i;
    } else if ((c === CLOSE_ARRAY || c === CLOSE_OBJECT) && depth > 0) {
      depth--;
    }
  }
  return -1;
}

/** As jsonTooDeepAt, for a string (checked as its UTF-16 code units: brackets and quotes are ASCII). */
export function jsonTextTooDeepAt(text: string, maxDepth: number): number {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) {
      inString = true;
    } else if (c === OPEN_ARRAY || c === OPEN_OBJECT) {
      if (++depth > maxDepth) return i;
    } else if ((c === CLOSE_ARRAY || c === CLOSE_OBJECT) && depth > 0) {
      depth--;
    }
  }
  return -1;
}
