// PostgreSQL's Bind message with large Buffer parameters sent as they are. pg-protocol serialises a Bind
// into one Buffer: a step's 4 MB gradient was copied into a fresh 6 MB message (grown by half again plus
// the value), and such allocations, one or more a step, made V8 run a full mark-compact of the heap every
// few steps (its external-memory trigger; `--trace-gc` of the durable-step bench: one about every 5 steps,
// 20-30 ms of marking each). Here the message is framed around the values: its small parts are written
// into a few bytes of their own and each Buffer of LARGE bytes or more goes to the socket itself, corked with
// the rest (pg corks a query's messages), so it leaves in one writev with no copy in JavaScript.
//
// The wire format is the one pg-protocol writes (protocol 3.0, Bind): portal and statement names, one
// format code per parameter (1 for a Buffer, binary; 0 for text), the values (-1 for NULL), one result
// format code. pg's Query hands `connection.bind` the values with its own valueMapper (utils.prepareValue),
// applied here as pg-protocol applies it.

/** A Buffer value this large or larger is written on its own rather than copied into the message. */
const LARGE = 64 * 1024;

/** What pg's Query passes to `connection.bind`. */
export interface BindConfig {
  portal?: string;
  statement?: string;
  binary?: boolean;
  values?: readonly unknown[];
  valueMapper?: (value: unknown, index: number) => unknown;
}

/** The socket side of pg's Connection that a Bind is written to. */
export interface BindTarget {
  stream: { writable: boolean; write(chunk: Buffer): boolean };
}

/**
 * The Bind message as a list of Buffers that, concatenated, are byte for byte what pg-protocol's
 * `serialize.bind(config)` returns; Buffers of LARGE bytes or more are in the list themselves.
 */
export function bindParts(config: BindConfig): Buffer[] {
  const values = (config.values ?? []).map((v, i) => (config.valueMapper ? config.valueMapper(v, i) : v));
  const parts: Buffer[] = [];
  // Small pieces are gathered and joined once a large value (or the end) comes.
  let small: Buffer[] = [];
  const int16 = (n: number) => {
    const b = Buffer.allocUnsafe(2);
    b.writeUInt16BE(n); // counts up to 65535, as pg-protocol writes them (PostgreSQL reads them as int16)
    small.push(b);
  };
  const int32 = (n: number) => {
    const b = Buffer.allocUnsafe(4);
    b.writeInt32BE(n);
    small.push(b);
  };
  const flush = () => {
    if (small.length) parts.push(Buffer.concat(small));
    small = [];
  };
  const value = (b: Buffer) => {
    int32(b.length);
    if (b.length < LARGE) return small.push(b);
    flush();
    parts.push(b);
  };
  small.push(Buffer.from([0x42, 0, 0, 0, 0])); // 'B' and the length, filled in below
  small.push(Buffer.from(`${config.portal ?? ''}\0${config.statement ?? ''}\0`, 'utf8'));
  int16(values.length);
  for (const v of values) int16(v instanceof Buffer ? 1 : 0);
  int16(values.length);
  for (const v of values) {
    if (v === null || v === undefined) int32(-1);
    else value(v instanceof Buffer ? v : Buffer.from(String(v), 'utf8'));
  }
  int16(1);
  int16(config.binary ? 1 : 0);
  flush();
  const total = parts.reduce((sum, p) => sum + p.length, 0);
  parts[0].writeInt32BE(total - 1, 1); // the length counts itself, not the type byte
  return parts;
}

/**
 * `connection.bind` with bindParts when a value is a Buffer of LARGE bytes or more: each part written to the
 * connection's socket in order (pg's own `_send` writes nothing once the socket is no longer writable;
 * neither does this). Other Binds (a small step's, every read's) go to pg's own `bind`, one Buffer from one
 * reused writer: bindParts' small pieces cost a few microseconds more a statement, which the small-step
 * throughput benchmark, CPU-bound, would pay.
 */
export function writeBind(connection: BindTarget, config: BindConfig, pgBind: (config: BindConfig) => void): void {
  if (!(config.values ?? []).some((v) => v instanceof Buffer && v.length >= LARGE)) return pgBind(config);
  const parts = bindParts(config);
  if (!connection.stream.writable) return;
  for (const part of parts) connection.stream.write(part);
}
