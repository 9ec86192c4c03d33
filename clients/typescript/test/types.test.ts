// The client's types as the README describes them: test/types/client-types.ts must type-check (what it
// accepts is accepted, every @ts-expect-error is an error). Node strips types when it runs the tests, so
// only the compiler can check this.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const FIXTURE = fileURLToPath(new URL('./types/client-types.ts', import.meta.url));

test('the public types accept what the service accepts and reject what it refuses (test/types/client-types.ts)', () => {
  const config = ts.readConfigFile(`${ROOT}/tsconfig.json`, ts.sys.readFile);
  const { options } = ts.parseJsonConfigFileContent(config.config, ts.sys, ROOT);
  const program = ts.createProgram([FIXTURE], { ...options, noEmit: true });
  const errors = ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file && d.start !== undefined ? `${d.file.fileName.slice(ROOT.length)}:${d.file.getLineAndCharacterOfPosition(d.start).line + 1}: ` : '';
    return where + ts.flattenDiagnosticMessageText(d.messageText, '\n');
  });
  assert.deepEqual(errors, []);
});

test('StepOptions.wait says the range of ?wait= the service accepts (the OpenAPI document\'s)', () => {
  // Found by a review: it said 1..3600 where the service takes 0 (answer at once) too.
  const spec = JSON.parse(readFileSync(new URL('../../../openapi/openapi.json', import.meta.url), 'utf8')) as {
    paths: Record<string, Record<string, { parameters?: { name: string; in: string; schema?: { minimum?: number; maximum?: number } }[] }>>;
  };
  const wait = spec.paths['/v1/sessions/{name}/step'].post.parameters!.find((p) => p.name === 'wait' && p.in === 'query')!.schema!;
  const types = readFileSync(new URL('../src/types.ts', import.meta.url), 'utf8');
  const doc = /`\?wait=`, (\d+)\.\.(\d+)/.exec(types.slice(types.indexOf('export interface StepOptions')));
  assert.ok(doc, 'StepOptions.wait names its range');
  assert.deepEqual([Number(doc[1]), Number(doc[2])], [wait.minimum, wait.maximum]);
});
