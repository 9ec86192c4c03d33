// What the README promises about events() on reconnect, and its save/load snippet, which must run with
// @tensorflow/tfjs (this package's devDependency, no file:// handler) as printed: extracted from the
// README, its imports pointed at this checkout, and run against a live service.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { CODES } from '../../../src/errors.ts';
import * as errors from '../src/errors.ts';
import { RemoteASGD } from '../src/tfjs.ts';
import { liveService, uniqueName } from './service.ts';

tf.setBackend('cpu');

const README = readFileSync(new URL('../README.md', import.meta.url), 'utf8');

/** The README's text from `heading` to the next heading, with line breaks as spaces. */
function section(heading: string): string {
  const start = README.indexOf(heading);
  assert.ok(start >= 0, `the README has ${heading}`);
  const end = README.slice(start + heading.length).search(/\n#{2,3} /);
  return README.slice(start, end < 0 ? undefined : start + heading.length + end);
}

test('README: events() on reconnect sends the newest version at once; the versions missed are coalesced, not replayed', () => {
  const text = section('## The client').replace(/\s+/g, ' ');
  const events = text.slice(text.indexOf('`events(name, {afterVersion, signal, idleTimeoutMs})` follows'));
  assert.match(events, /`Last-Event-ID`/);
  assert.match(events, /only the newest version/);
  assert.match(events, /coalesced into that one event, \*\*not replayed\*\*/);
  assert.match(events, /`metrics\(name, \{afterVersion\}\)`/, 'says how to catch up');
  assert.doesNotMatch(events, /resumes after the last version received, as an `EventSource` does/, 'the old wording suggested a replay');
});

test('README: every error class is named, and a code without a class of its own says the class it comes as', () => {
  // Found by a review: BaseVersionAhead was missing from the list, and codes such as TOO_MANY_WAITERS or
  // INSUFFICIENT_STORAGE came as some class the README did not say.
  const start = README.indexOf('**Errors** are classes');
  assert.ok(start >= 0, 'the README has the paragraph on errors');
  const text = README.slice(start, README.indexOf('\n\n', start)).replace(/\s+/g, ' ');
  const classes = Object.entries(errors).filter(([, value]) => typeof value === 'function' && value.prototype instanceof errors.ASGDError).map(([name]) => name);
  assert.ok(classes.includes('BaseVersionAhead'));
  for (const name of classes) assert.ok(text.includes(`\`${name}\``), `the README names ${name}`);
  // Each code named: the first class named after it (in its clause) is the class it comes as.
  for (const code of ['TOO_MANY_WAITERS', 'SNAPSHOT_UNAVAILABLE', 'INSUFFICIENT_STORAGE', 'METHOD_NOT_ALLOWED', 'HOST_NOT_ALLOWED', 'TOO_MANY_STREAMS', 'ROUTE_NOT_FOUND'] as const) {
    const at = text.indexOf(`\`${code}\``);
    assert.ok(at >= 0, `the README names ${code}`);
    const clause = text.slice(at).split(/[;.]/)[0];
    const named = [...clause.matchAll(/`([A-Z][A-Za-z]+)`/g)].map((m) => m[1]).find((n) => classes.includes(n));
    assert.equal(named, errors.errorClass(CODES[code].status, code).name, `${code} comes as`);
  }
});

test('README: the save/load snippet runs with @tensorflow/tfjs, and says that file:// needs tfjs-node', async (t) => {
  const text = section('### Saving and loading a model');
  assert.match(text.replace(/\s+/g, ' '), /`file:\/\/` paths work \*\*only with `@tensorflow\/tfjs-node`\*\*/);
  const snippet = /```ts\n([\s\S]*?)```/.exec(text)?.[1];
  assert.ok(snippet, 'the section has a ts snippet');
  assert.match(snippet, /from '@tensorflow\/tfjs'/, 'the snippet is for plain @tensorflow/tfjs');

  // The snippet as a module: its imports pointed at this checkout (the same module instances as this test's),
  // its statements in a function given what the README assumes (model, names, xs, ys).
  const lines = snippet.split('\n');
  const imports = lines.filter((l) => l.startsWith('import '))
    .map((l) => l.replace("'@tensorflow/tfjs'", `'${import.meta.resolve('@tensorflow/tfjs')}'`).replace("'asgd-client/tfjs'", `'${new URL('../src/tfjs.ts', import.meta.url).href}'`));
  const body = lines.filter((l) => !l.startsWith('import '));
  const dir = mkdtempSync(join(tmpdir(), 'asgd-readme-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'snippet.mts');
  writeFileSync(file, [...imports, 'export async function run({ model, names, xs, ys }: any) {', ...body, 'return { optimizer };', '}'].join('\n'));

  const { client } = await liveService();
  const session = uniqueName('readme_save');
  const names = ['l1.kernel', 'l1.bias'];
  const model = tf.sequential();
  model.add(tf.layers.dense({ units: 1, inputShape: [2], kernelInitializer: tf.initializers.glorotUniform({ seed: 7 }) }));
  const trained = new RemoteASGD({ client, session, hyperparameters: { lr: 0.05 }, worker: 'readme_worker' });
  await trained.attach(model.trainableWeights, names);
  model.compile({ optimizer: trained, loss: 'meanSquaredError' });
  const xs = tf.tensor2d([1, 2, 3, 4, 5, 6, 7, 8], [4, 2]);
  const ys = tf.tensor2d([1, 0, 1, 0], [4, 1]);
  await model.fit(xs, ys, { epochs: 1, batchSize: 4, verbose: 0, callbacks: [trained.callback] });
  assert.equal(trained.version, 2);

  const { run } = await import(pathToFileURL(file).href) as { run: (x: object) => Promise<{ optimizer: RemoteASGD }> };
  const { optimizer } = await run({ model, names, xs, ys });
  assert.ok(optimizer instanceof RemoteASGD);
  assert.deepEqual([optimizer.session, optimizer.worker, optimizer.client.http.baseUrl], [session, 'readme_worker', client.http.baseUrl]);
  assert.equal(optimizer.version, 3, 'the loaded model continued the session');
  assert.equal((await client.getSession(session)).step, 2);
  tf.dispose([xs, ys]);
});
