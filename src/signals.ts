// A signal while the process starts (waiting for PostgreSQL, migrating, PGlite's first start) ends it at
// once: without a handler, node as PID 1 (a container without an init) ignores SIGTERM and SIGINT, and
// `docker stop` waited out its grace period (found by operators' reviews, for `serve` and then `migrate`).

/** Exits with 128 + the signal's number on SIGTERM or SIGINT, saying `${signal} while ${doing}`; returns the function that removes the handlers. */
export function exitOnSignalWhile(doing: string, write: (line: string) => void = (line) => console.error(line)): () => void {
  const onSignal = (signal: NodeJS.Signals) => {
    write(`asgd-serve: ${signal} while ${doing}`);
    process.exit(128 + (signal === 'SIGINT' ? 2 : 15));
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  return () => {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  };
}
