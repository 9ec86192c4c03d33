// The package as `npm i <folder>`, `npm i --install-links <folder>` and `npm pack` install it: `exports`
// points at dist/, which is not in the repository, so `prepare` must build it; and the built files run on
// the oldest Node that `engines` admits (the README: Node >= 20 and browsers).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  name: string; engines: { node: string }; scripts: Record<string, string>; exports: Record<string, Record<string, string>>; files: string[];
};

/** A node binary of this major version: the system's (this repository's tests run on Node 24 from the root). */
function nodeOfMajor(major: number): string | null {
  for (const candidate of ['/usr/bin/node', '/usr/local/bin/node']) {
    const r = spawnSync(candidate, ['--version'], { encoding: 'utf8' });
    if (r.status === 0 && Number(/^v(\d+)/.exec(r.stdout)?.[1]) === major) return candidate;
  }
  return null;
}

test('prepare builds every exports target, and the built package runs on the oldest Node of engines', async (t) => {
  assert.match(pkg.scripts.prepare ?? '', /\bnpm run build\b/, 'a folder install or npm pack must build dist/ (the prepare script)');
  assert.ok(pkg.files.includes('dist'));
  const oldest = Number(/^>=\s*(\d+)/.exec(pkg.engines.node)?.[1]);
  assert.equal(oldest, 20, `engines.node ${pkg.engines.node}: the README says the built dist/ is for Node >= 20`);

  const dir = mkdtempSync(join(tmpdir(), 'asgd-client-package-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const build = spawnSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json', '--outDir', join(dir, 'dist')], { cwd: ROOT, encoding: 'utf8' });
  assert.equal(build.status, 0, build.stdout + build.stderr);
  for (const [entry, conditions] of Object.entries(pkg.exports)) {
    for (const target of Object.values(conditions)) assert.ok(existsSync(join(dir, target)), `${entry}: ${target} is built`);
  }

  // The built package as installed: its package.json, and @tensorflow/tfjs-core where a user's project has it.
  writeFileSync(join(dir, 'package.json'), JSON.stringify(pkg));
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  writeFileSync(join(dir, 'check.mjs'), [
    `import { ASGDClient, encodeSafetensors, decodeSafetensors } from '${pkg.name}';`,
    `import { RemoteASGD } from '${pkg.name}/tfjs';`,
    `const optimizer = new RemoteASGD({ client: 'http://127.0.0.1:9', session: 's' });`,
    `const file = decodeSafetensors(encodeSafetensors({ w: { shape: [2], data: [1, 2] } }));`,
    `console.log(optimizer.client instanceof ASGDClient, Array.from(file.tensors.get('w').data).join(','), process.version);`,
  ].join('\n'));
  const node = nodeOfMajor(oldest);
  const run = (binary: string) => spawnSync(binary, [join(dir, 'check.mjs')], { cwd: dir, encoding: 'utf8' });
  const here = run(process.execPath);
  assert.equal(here.status, 0, here.stderr);
  assert.match(here.stdout, /^true 1,2 v/);
  if (!node) {
    t.diagnostic(`no Node ${oldest} on this machine: the built package was run on ${process.version} only`);
    return;
  }
  const old = run(node);
  assert.equal(old.status, 0, old.stderr);
  assert.match(old.stdout, new RegExp(`^true 1,2 v${oldest}\\.`));
});
