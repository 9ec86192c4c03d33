// A bound on JSON nesting, checked on the text before JSON.parse builds anything: a body of a hundred
// million `[` is 200 MB of text within the JSON limit, and JSON.parse makes an array of each (about 40
// bytes of heap a byte of text), which took the process past its heap limit. No value this service reads
// nests deeply (a tensor has at most 16 dimensions), so a deep one is refused before it is parsed.

/** Brackets and quotes: a tensor's numbers between them are skipped by the regular expression engine. */
const STRUCTURE = /[[\]{}"]/g;

/**
 * The offset at which the JSON text first nests deeper than `maxDepth` arrays and objects, or -1 when it
 * never does. Brackets inside strings do not count. Text that is not JSON is left to the parser (a stray
 * closing bracket lowers nothing below 0). Measured: 250 MB of a flat list of numbers in ~20 ms.
 */
export function jsonTooDeepAt(text: string, maxDepth: number): number {
  return jsonTooBigAt(text, maxDepth, Infinity)?.at ?? -1;
}

/**
 * Where the JSON text first nests deeper than `maxDepth` ('deep'), or opens its (maxContainers + 1)th array
 * or object ('wide'); null when neither. Wide bounds the other way JSON.parse is made to build millions of
 * objects: a flat list of 21 million `[]` (64 MB) took 19 s of the event loop and 2.2 GB of heap before
 * anything refused it, and killed a process with a smaller heap. Numbers (a tensor's data) cost nothing here.
 */
export function jsonTooBigAt(text: string, maxDepth: number, maxContainers: number): { kind: 'deep' | 'wide'; at: number } | null {
  const re = new RegExp(STRUCTURE);
  let depth = 0;
  let containers = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) {
    const c = text.charCodeAt(m.index);
    if (c === 0x22) {
      const end = stringEnd(text, m.index + 1);
      if (end < 0) return null; // unterminated: the parser says so
      re.lastIndex = end + 1;
    } else if (c === 0x5b || c === 0x7b) {
      if (++depth > maxDepth) return { kind: 'deep', at: m.index };
      if (++containers > maxContainers) return { kind: 'wide', at: m.index };
    } else if (depth > 0) {
      depth--;
    }
  }
  return null;
}

/** The index of the quote that closes the string whose text starts at `from` (one not escaped), or -1. */
function stringEnd(text: string, from: number): number {
  for (let at = from; ;) {
    const quote = text.indexOf('"', at);
    if (quote < 0) return -1;
    let backslashes = 0;
    while (text.charCodeAt(quote - 1 - backslashes) === 0x5c) backslashes++;
    if (backslashes % 2 === 0) return quote;
    at = quote + 1;
  }
}

/**
 * The first key given twice in one JSON object ({"grads": {...}, "grads": {...}}), or null. JSON.parse keeps
 * the last, so a body read one way here may be read the other way by a proxy, a log or another parser: such
 * a body is refused, naming the key. Keys compare as decoded ("a" and "\u0061" are one key). Linear; the
 * numbers of a tensor are skipped by the regular expression engine as in jsonTooDeepAt. Text that is not
 * JSON is left to the parser. With bounds: also the first key past `maxPerObject` in one object or past
 * `maxTotal` in the text (`many`), before JSON.parse builds such objects: one of 3 million keys (a 40 MB
 * step's metrics) held the event loop 40 s, and 10 million (a 129 MB create) ran the heap out (found by a
 * hostile-input review).
 */
export function firstDuplicateKey(text: string, maxPerObject = Infinity, maxTotal = Infinity, maxOutermost = maxPerObject): { key: string; at: number; many?: 'outermost' | 'nested' | 'total' } | null {
  const re = new RegExp(STRUCTURE);
  // One entry per open bracket: the keys seen in an object, null for an array.
  const frames: (Set<string> | null)[] = [];
  let total = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) {
    const c = text.charCodeAt(m.index);
    if (c === 0x22) {
      const end = stringEnd(text, m.index + 1);
      if (end < 0) return null;
      re.lastIndex = end + 1;
      const keys = frames.at(-1);
      if (!keys) continue;
      let next = end + 1;
      while (next < text.length && (text.charCodeAt(next) === 0x20 || text.charCodeAt(next) === 0x0a || text.charCodeAt(next) === 0x0d || text.charCodeAt(next) === 0x09)) next++;
      if (text.charCodeAt(next) !== 0x3a) continue; // a value, not a key
      let key = text.slice(m.index + 1, end);
      if (key.includes('\\')) {
        try {
          key = JSON.parse(text.slice(m.index, end + 1)) as string;
        } catch {
          return null; // a bad escape: the parser names it
        }
      }
      if (keys.has(key)) return { key, at: m.index };
      if (++total > maxTotal) return { key, at: m.index, many: 'total' };
      if (keys.size >= (frames.length === 1 ? maxOutermost : maxPerObject)) return { key, at: m.index, many: frames.length === 1 ? 'outermost' : 'nested' };
      keys.add(key);
    } else if (c === 0x7b) frames.push(new Set());
    else if (c === 0x5b) frames.push(null);
    else frames.pop();
  }
  return null;
}

/** An unpaired high or low surrogate (regular expressions without the u flag see UTF-16 code units). */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const unstorable = (text: string): boolean => text.includes('\0') || LONE_SURROGATE.test(text);

/**
 * The path of the first string (a value or a key) in a parsed JSON value that holds a NUL or an unpaired
 * UTF-16 surrogate, or null. Such text reached PostgreSQL (a group's extra value, param_names) and came back
 * as a 400 naming no field. A list of numbers only (a tensor's data) is passed over in one scan.
 */
export function unstorableText(value: unknown, path: string): string | null {
  if (typeof value === 'string') return unstorable(value) ? path || 'body' : null;
  if (value === null || typeof value !== 'object') return null;
  if (Array.isArray(value)) {
    if (typeof value[0] === 'number' && value.every((v) => typeof v === 'number')) return null;
    for (let i = 0; i < value.length; i++) {
      const bad = unstorableText(value[i], `${path}[${i}]`);
      if (bad) return bad;
    }
    return null;
  }
  for (const [key, v] of Object.entries(value)) {
    const name = /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? key : JSON.stringify(key);
    const at = path ? `${path}.${name}` : name;
    if (unstorable(key)) return at;
    const bad = unstorableText(v, at);
    if (bad) return bad;
  }
  return null;
}

/** How deep the JSON a metadata entry or an option string holds may nest (a few levels in practice). */
export const MAX_EMBEDDED_JSON_DEPTH = 16;

/**
 * JSON.parse of JSON text embedded in a file's metadata or a query (small, but its nesting bounded before it
 * is parsed, as every JSON the service reads); `refuse(problem)` makes the error: for text nested deeper than
 * `maxDepth` or with a key twice in one object, `problem` says so; for text that is not JSON it is null.
 */
export function parseJsonWithin(text: string, refuse: (problem: string | null) => Error, maxDepth = MAX_EMBEDDED_JSON_DEPTH, reviver?: (this: object, key: string, value: unknown) => unknown): unknown {
  if (jsonTooDeepAt(text, maxDepth) >= 0) throw refuse(`nested deeper than ${maxDepth} levels`);
  let value: unknown;
  try {
    value = JSON.parse(text, reviver);
  } catch {
    // As in a JSON body: Python's bare NaN and Infinity are read as the strings the API takes for them, so
    // that the field is named (a metric's or a hyperparameter's 400) rather than "not valid JSON".
    const quoted = quoteNonFiniteTokens(text);
    try {
      if (quoted === null) throw new Error('not JSON');
      value = JSON.parse(quoted, reviver);
    } catch {
      throw refuse(null);
    }
  }
  // As in a JSON body: JSON.parse would keep the last of two values ({"lr": 0.1, "lr": 5} set lr to 5).
  const twice = firstDuplicateKey(text);
  if (twice) throw refuse(`the key ${JSON.stringify(twice.key.slice(0, 100))} appears twice in one object; give each key once`);
  const bad = text.includes('\\u') ? unstorableText(value, '') : null;
  if (bad) throw refuse(`${bad === 'body' ? 'the value' : bad}: text with a NUL character or an unpaired UTF-16 surrogate is not accepted`);
  return value;
}

/** The bare tokens Python's json.dumps writes for non-finite floats (allow_nan=True, its default). */
const NON_FINITE_TOKEN = /[["\]{},:]|-?\bInfinity\b|\bNaN\b/g;

/**
 * The JSON text with Python's bare NaN, Infinity and -Infinity (not JSON; json.dumps writes them by default)
 * as the strings "NaN", "Infinity" and "-Infinity", which the API reads as those values wherever a number
 * may be one (and refuses, naming the field, wherever it may not); null when the text has none outside
 * strings.
 */
export function quoteNonFiniteTokens(text: string): string | null {
  const re = new RegExp(NON_FINITE_TOKEN);
  let out = '';
  let from = 0;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) {
    const token = m[0];
    if (token === '"') {
      const end = stringEnd(text, m.index + 1);
      if (end < 0) return null;
      re.lastIndex = end + 1;
    } else if (token.length > 1) {
      out += `${text.slice(from, m.index)}"${token}"`;
      from = m.index + token.length;
    }
  }
  return from === 0 ? null : out + text.slice(from);
}
