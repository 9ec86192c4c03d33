#!/usr/bin/env node
// `asgd-serve [serve|migrate] [options]` (see --help). Runs src/cli.ts through tsx (a runtime dependency)
// when the sources are here, or dist/cli.js from `npm run build` when only the build is shipped.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const source = new URL('../src/cli.ts', import.meta.url);
const built = new URL('../dist/cli.js', import.meta.url);

let cli;
if (existsSync(fileURLToPath(source))) {
  const { register } = await import('tsx/esm/api');
  register();
  cli = await import(source.href);
} else if (existsSync(fileURLToPath(built))) {
  cli = await import(built.href);
} else {
  console.error('asgd-serve: neither src/cli.ts nor dist/cli.js is installed');
  process.exit(1);
}
const code = await cli.main(process.argv.slice(2));
if (code !== null) process.exitCode = code;
