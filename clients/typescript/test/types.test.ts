// The client's types as the README describes them: test/types/client-types.ts must type-check (what it
// accepts is accepted, every @ts-expect-error is an error). Node strips types when it runs the tests, so
// only the compiler can check this.
import assert from 'node:assert/strict';
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
