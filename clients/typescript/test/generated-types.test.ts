// The generated types must be those of the current OpenAPI document: a route change without
// `npm run generate` in clients/typescript fails here.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import test from 'node:test';
import { generate, OUTPUT } from '../scripts/generate-types.ts';

test('src/generated/openapi.ts is generated from the current openapi/openapi.json', async () => {
  const fresh = await generate();
  assert.ok(fresh.includes("'/v1/sessions/{name}/step'") || fresh.includes('"/v1/sessions/{name}/step"'), 'the document has the step route');
  assert.equal(readFileSync(OUTPUT, 'utf8'), fresh, 'stale: run `npm run generate` in clients/typescript and commit the result');
});
