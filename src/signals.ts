// A signal while the process starts (waiting for PostgreSQL, migrating, PGlite's first start) ends it at
// once: without a handler, node as PID 1 (a container without an init) ignores SIGTERM and SIGINT, and
// `docker stop` waited out its grace period (found by operators' reviews, for `serve` and then `migrate`).

export type SignalHandler = (signal: NodeJS.Signals) => void;

/**
 * Exits with 128 + the signal's number on SIGTERM or SIGINT, saying `${signal} while ${doing}`. Returns the
 * function that ends this: given a handler, the signals go to it from then on, through the same listeners;
 * without one, the listeners are removed.
 *
 * A hand-over keeps the listeners: removing the last listener of a signal stops node watching it, and a
 * signal node had received but not yet dispatched (the event loop busy finishing the start) was dropped;
 * the process then served until a second signal (found by a review: 2 starts in 8 stopped 0.1 s before
 * listening never stopped).
 */
export function exitOnSignalWhile(doing: string, write: (line: string) => void = (line) => console.error(line)): (then?: SignalHandler) => void {
  let handler: SignalHandler = (signal) => {
    write(`asgd-serve: ${signal} while ${doing}`);
    process.exit(128 + (signal === 'SIGINT' ? 2 : 15));
  };
  const route = (signal: NodeJS.Signals) => handler(signal);
  process.on('SIGTERM', route);
  process.on('SIGINT', route);
  return (then) => {
    if (then) {
      handler = then;
      return;
    }
    process.off('SIGTERM', route);
    process.off('SIGINT', route);
  };
}
