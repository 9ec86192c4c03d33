// The nesting bound checked before JSON.parse (src/formats/json-depth.ts).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { jsonTooDeepAt, quoteNonFiniteTokens } from '../../src/formats/json-depth.ts';

test('JSON nesting: arrays and objects count, brackets in strings (escaped quotes and backslashes too) do not', () => {
  assert.equal(jsonTooDeepAt('{"a":[[[1]]]}', 4), -1);
  assert.equal(jsonTooDeepAt('{"a":[[[1]]]}', 3), 7);
  assert.equal(jsonTooDeepAt('[1,[2],[3],[4]]', 2), -1, 'siblings are not deeper');
  assert.equal(jsonTooDeepAt('{"a\\\\":[[[1]]]}', 3), 9, 'an escaped backslash ends no string: the brackets after it count');
  assert.equal(jsonTooDeepAt('{"a\\"[[[[[":1}', 2), -1, 'an escaped quote does not end the string');
  assert.equal(jsonTooDeepAt('["[[[[", "]]]]"]', 1), -1);
  assert.equal(jsonTooDeepAt('"unterminated [[[[', 1), -1, 'not JSON: left to the parser');
  assert.equal(jsonTooDeepAt(']]]][[', 1), 5, 'stray closings lower nothing below 0');
  assert.equal(jsonTooDeepAt('['.repeat(1_000_000) + ']'.repeat(1_000_000), 64), 64);
  const flat = `{"grads":{"w":[${'0.1234567,'.repeat(1_000_000)}1]}}`;
  assert.equal(jsonTooDeepAt(flat, 3), -1);
  assert.equal(jsonTooDeepAt(flat, 2), 14);
});

test('Python\'s bare NaN / Infinity / -Infinity become strings; the same words inside strings, and other spellings, stay', () => {
  assert.equal(quoteNonFiniteTokens('{"a": NaN, "b": [Infinity, -Infinity, 1]}'), '{"a": "NaN", "b": ["Infinity", "-Infinity", 1]}');
  assert.equal(quoteNonFiniteTokens('{"NaN": 1, "x\\"NaN": "Infinity"}'), null);
  assert.equal(quoteNonFiniteTokens('[1, 2]'), null);
  assert.equal(quoteNonFiniteTokens('[NaNa, xInfinity]'), null, 'whole words only');
  assert.equal(JSON.parse(quoteNonFiniteTokens('[NaN]')!)[0], 'NaN');
});
