#!/usr/bin/env node
// `asgd-serve [serve|migrate|...] [options]` (see --help). Runs src/cli.ts with Node's type stripping (Node 24)
// when the sources are here, or dist/cli.js from `npm run build` when only the build is shipped.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const source = new URL('../src/cli.ts', import.meta.url);
const built = new URL('../dist/cli.js', import.meta.url);
const [major] = process.versions.node.split('.').map(Number);

let cli;
if (existsSync(fileURLToPath(source)) && major >= 24) {
  cli = await import(source.href);
} else if (existsSync(fileURLToPath(built))) {
  cli = await import(built.href);
} else {
  console.error(
    `asgd-serve: needs Node 24 or later to run its TypeScript sources (this is ${process.version}); ` +
      '`npm ci` installs one into node_modules/.bin, which `npx asgd-serve` and `npm start` use',
  );
  process.exit(1);
}
const code = await cli.main(process.argv.slice(2));
if (code !== null) process.exitCode = code;
