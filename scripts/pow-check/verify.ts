// Compares src/optim/pow.ts (and Math.pow, to show the test has teeth) with glibc's pow on the records
// gen_pow.py wrote
// '<dddd' (x, y, glibc pow(x, y), category). Usage: node verify.ts pow.bin
import { readFileSync } from 'node:fs';
import { pow } from '../../src/optim/pow.ts';
const file = process.argv[2];
const buf = readFileSync(file);
const names = readFileSync(file + '.names', 'utf8').trim().split('\n');
const d = new Float64Array(buf.buffer, buf.byteOffset, buf.byteLength / 8);
const same = (a: number, b: number) => Object.is(a, b) || (a !== a && b !== b);
const cell = new Float64Array(1);
const big = new BigUint64Array(cell.buffer);
const hex = (v: number) => { cell[0] = v; return '0x' + big[0].toString(16).padStart(16, '0'); };
const ours = new Array(names.length).fill(0);
const mathPow = new Array(names.length).fill(0);
const count = new Array(names.length).fill(0);
let shown = 0;
const t0 = performance.now();
for (let i = 0; i < d.length; i += 4) {
  const x = d[i], y = d[i + 1], ref = d[i + 2], cat = d[i + 3];
  count[cat]++;
  const r = pow(x, y);
  if (!same(r, ref)) {
    ours[cat]++;
    if (shown++ < 20) console.log(`MISMATCH pow(${hex(x)}, ${hex(y)}) = ${hex(r)}, glibc ${hex(ref)}  [${names[cat]}]  (${x} ** ${y})`);
  }
  if (!same(Math.pow(x, y), ref)) mathPow[cat]++;
}
const ms = performance.now() - t0;
const sum = (a: number[]) => a.reduce((s, v) => s + v, 0);
console.log(`${'category'.padEnd(72)} ${'inputs'.padStart(8)} ${'pow.ts'.padStart(7)} ${'Math.pow'.padStart(9)}`);
for (let c = 0; c < names.length; c++) {
  console.log(`${names[c].padEnd(72)} ${String(count[c]).padStart(8)} ${String(ours[c]).padStart(7)} ${String(mathPow[c]).padStart(9)}`);
}
console.log(`all: ${sum(count)} inputs, pow.ts ${sum(ours)} mismatches, Math.pow ${sum(mathPow)}; ${(ms * 1000 / sum(count)).toFixed(2)} us a call`);
process.exitCode = sum(ours) === 0 ? 0 : 1;
