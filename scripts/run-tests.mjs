#!/usr/bin/env node
// Runs every test/**/*.test.ts with node's test runner; Node 24 runs the TypeScript natively (type
// stripping). We list the files ourselves so that arguments can filter them.
// Extra arguments are file filters: `npm test -- kernel` runs files whose path contains "kernel".
// Two files run at once (ASGD_TEST_CONCURRENCY sets how many): each test makes its own database and
// listens on a port of its own, and most of a file's time is waiting (browsers, processes starting,
// backoffs), so on 2 cores the suite takes ~620 s against ~900 s one file at a time.
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

function walk(dir) {
  const out = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...walk(path));
    else if (path.endsWith('.test.ts')) out.push(path);
  }
  return out;
}

const filters = process.argv.slice(2);
const files = walk('test').sort().filter((f) => filters.length === 0 || filters.some((p) => f.includes(p)));
if (files.length === 0) {
  console.error('no test files matched');
  process.exit(1);
}
const concurrency = Number(process.env.ASGD_TEST_CONCURRENCY ?? 2);
if (!Number.isInteger(concurrency) || concurrency < 1) {
  console.error(`ASGD_TEST_CONCURRENCY must be a whole number >= 1, not ${process.env.ASGD_TEST_CONCURRENCY}`);
  process.exit(1);
}
const result = spawnSync(
  process.execPath,
  ['--test', `--test-concurrency=${concurrency}`, '--test-reporter=spec', ...files],
  { stdio: 'inherit' },
);
process.exit(result.status ?? 1);
