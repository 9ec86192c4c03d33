// Node's process warnings (a dependency's process.emitWarning: node-postgres says one about sslmode) as log
// lines. Node writes them to stderr as multi-line text, which breaks a log made of JSON lines.
import type { FastifyBaseLogger } from 'fastify';

export interface HeldWarnings {
  /** From now on each warning is one log line; those held until now are logged first. */
  logTo(log: FastifyBaseLogger): void;
  /** Node writes warnings again (the held ones now): the server did not start, or has closed. */
  release(): void;
}

/** Takes Node's process warnings from its stderr writer and holds them until a logger takes them. */
export function holdProcessWarnings(): HeldWarnings {
  const writers = process.listeners('warning');
  for (const w of writers) process.removeListener('warning', w);
  const held: Error[] = [];
  let sink: ((warning: Error) => void) | null = null;
  const onWarning = (warning: Error) => (sink ? sink(warning) : held.push(warning));
  process.on('warning', onWarning);
  let released = false;
  return {
    logTo(log) {
      sink = (warning) => {
        const { name, message } = warning;
        const code = (warning as { code?: unknown }).code;
        log.warn({ warning: { name, ...(typeof code === 'string' ? { code } : {}), message } }, `${name}: ${message.split('\n', 1)[0]}`);
      };
      for (const warning of held.splice(0)) sink(warning);
    },
    release() {
      if (released) return;
      released = true;
      process.removeListener('warning', onWarning);
      for (const w of writers) process.on('warning', w);
      for (const warning of held.splice(0)) for (const w of writers) w(warning);
    },
  };
}
