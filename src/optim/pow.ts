// glibc's double-precision pow(x, y), bit for bit, as it runs on x86_64 with FMA.
//
// Port of glibc 2.36 sysdeps/ieee754/dbl-64/e_pow.c with e_pow_log_data.c and e_exp_data.c (tag
// glibc-2.36, commit c804cd1c00adde061ca51711f63068c103e94eef; the algorithm is Szabolcs Nagy's from
// ARM's optimized-routines). Python's float `**` (PyTorch's ASGD computes eta in Python) calls this
// pow; V8's Math.pow (fdlibm) differs from it in the last bit for some inputs, and glibc's pow is not
// correctly rounded, so only the same algorithm, operation for operation, gives the same bits.
//
// On x86_64 libm selects the pow variant with an ifunc; on a CPU with FMA and AVX2 it runs
// __ieee754_pow_fma: e_pow.c built with -mfma -mavx2 (sysdeps/x86_64/fpu/multiarch/e_pow-fma.c), so
// __FP_FAST_FMA is defined and the __builtin_fma branches are taken. glibc builds e_pow.c WITHOUT
// -ffp-contract=off (only branred.c and e_sqrt.c get $(config-cflags-nofma)), and GCC's default in
// GNU C mode is -ffp-contract=fast: the compiler also fused many `a * b + c` of the source. Which ones
// was read off the disassembly of __ieee754_pow_fma in Debian 12's libm.so.6 (glibc 2.36-9+deb12u14),
// instruction by instruction; every fma() call below is one vfmadd/vfmsub there, every other operation
// is a separately rounded vaddsd/vsubsd/vmulsd. (The non-FMA variant, __ieee754_pow_sse2, would need
// the source's #else branches and has different rounding: this port is NOT that variant.)
//
// JavaScript has no fused multiply-add, so fma() below computes RN(a*b + c) exactly: an exact product
// (Veltkamp/Dekker), an exact sum (TwoSum) and a round-to-odd of the low parts (Boldo & Melquiond,
// "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008),
// with a BigInt fallback outside the ranges where that is proven (huge, tiny, zero, non-finite).
//
// The errno side effects of glibc (ERANGE, EDOM) and NaN payloads are not reproduced; the values are.

// One 8-byte scratch cell to move between a double and its two 32-bit words (little-endian: the
// module checks that below). WORDS[0] is the low word, WORDS[1] the high word (sign, exponent, top 20
// mantissa bits).
const CELL = new Float64Array(1);
const WORDS = new Uint32Array(CELL.buffer);
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error('pow.ts assumes a little-endian platform');
}

function fromWords(hi: number, lo: number): number {
  WORDS[0] = lo;
  WORDS[1] = hi;
  return CELL[0];
}

// ---------------------------------------------------------------------------------------------
// fma(a, b, c) = a * b + c rounded once, to nearest even, as vfmadd231sd does.

const SPLITTER = 134217729; // 2^27 + 1, Veltkamp's split into two 26-bit halves
const TWO_M900 = 2 ** -900;
const TWO_P900 = 2 ** 900;
const TWO_M950 = 2 ** -950;
const TWO_P950 = 2 ** 950;

function fma(a: number, b: number, c: number): number {
  const p = a * b;
  const ap = p < 0 ? -p : p;
  const ac = c < 0 ? -c : c;
  const aa = a < 0 ? -a : a;
  const ab = b < 0 ? -b : b;
  // Fast path where every step below is exact: no overflow in the split or the sums, no underflow in
  // the product's error term or in the round-to-odd sum.
  if (
    ap > TWO_M900 && ap < TWO_P900 && aa > TWO_M950 && aa < TWO_P950 && ab > TWO_M950 && ab < TWO_P950 &&
    ac < TWO_P900 && (ac > TWO_M900 || c === 0)
  ) {
    // Exact product p + pl (Dekker).
    let t = SPLITTER * a;
    const ah = t - (t - a);
    const al = a - ah;
    t = SPLITTER * b;
    const bh = t - (t - b);
    const bl = b - bh;
    const pl = ah * bh - p + ah * bl + al * bh + al * bl;
    // Exact sum th + tl = c + p (TwoSum).
    const th = c + p;
    const pv = th - c;
    const cv = th - pv;
    const tl = c - cv + (p - pv);
    // v = round-to-odd(tl + pl); then one rounding to nearest of th + v is RN(a*b + c).
    const s = tl + pl;
    const sv = s - tl;
    const tv = s - sv;
    const e = tl - tv + (pl - sv);
    if (e === 0) return th + s;
    CELL[0] = s;
    if ((WORDS[0] & 1) !== 0) return th + s;
    // s is even and inexact: the odd neighbour on the side of the exact sum.
    if (s > 0 === e > 0) {
      WORDS[0] = WORDS[0] + 1; // away from zero; bit 0 was clear, so no carry
    } else if (WORDS[0] === 0) {
      WORDS[0] = 0xffffffff;
      WORDS[1] = WORDS[1] - 1;
    } else {
      WORDS[0] = WORDS[0] - 1;
    }
    return th + CELL[0];
  }
  if ((a === 0 || b === 0) && aa !== Infinity && ab !== Infinity && a === a && b === b) {
    return p + c; // a or b is zero: the product is exactly the signed zero p
  }
  return fmaExact(a, b, c);
}

/** x = mant * 2^exp with a BigInt mant (signed); x finite. */
function decompose(x: number): [bigint, number] {
  CELL[0] = x;
  const hi = WORDS[1];
  const lo = WORDS[0];
  const e = (hi >>> 20) & 0x7ff;
  let m = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  let exp = -1074;
  if (e !== 0) {
    m |= 1n << 52n;
    exp = e - 1075;
  }
  return [hi >>> 31 ? -m : m, exp];
}

/** The double nearest (ties to even) to s * 2^e, s a non-zero BigInt. */
function roundToDouble(s: bigint, e: number): number {
  const neg = s < 0n;
  let a = neg ? -s : s;
  const n = a.toString(2).length;
  const msb = e + n - 1;
  if (msb > 1023) return neg ? -Infinity : Infinity;
  const lsb = Math.max(msb - 52, -1074);
  const shift = lsb - e;
  if (shift > 0) {
    const sh = BigInt(shift);
    let q = a >> sh;
    const rem = a - (q << sh);
    const half = 1n << (sh - 1n);
    if (rem > half || (rem === half && (q & 1n) === 1n)) q += 1n;
    a = q;
  } else if (shift < 0) {
    a <<= BigInt(-shift);
  }
  // a < 2^54 is exact as a number; a * 2^lsb is representable (or overflows to infinity, as RN does).
  let r = Number(a);
  if (lsb >= -1022) {
    r *= fromWords((lsb + 1023) << 20, 0);
  } else {
    r = r * 2 ** -1022 * fromWords((lsb + 1022 + 1023) << 20, 0);
  }
  return neg ? -r : r;
}

/** RN(a * b + c) by exact BigInt arithmetic; the slow path of fma for extreme or special operands. */
function fmaExact(a: number, b: number, c: number): number {
  if (!Number.isFinite(a) || !Number.isFinite(b)) return a * b + c; // inf * 0, inf + -inf: NaN
  if (!Number.isFinite(c)) return c; // the exact product is finite even where a * b overflows
  const [ma, ea] = decompose(a);
  const [mb, eb] = decompose(b);
  const [mc, ec] = decompose(c);
  const mp = ma * mb;
  if (mp === 0n) return a * b + c; // exact: a * b is the signed zero
  if (mc === 0n) return roundToDouble(mp, ea + eb);
  const ep = ea + eb;
  const lo = Math.min(ep, ec);
  const s = (mp << BigInt(ep - lo)) + (mc << BigInt(ec - lo));
  if (s === 0n) return 0; // exact cancellation rounds to +0
  return roundToDouble(s, lo);
}

/** For tests: the fused multiply-add pow uses. */
export { fma as fmaForTest };

// ---------------------------------------------------------------------------------------------
// Constants (glibc-2.36 e_pow_log_data.c, e_exp_data.c). The decimal literals are the shortest
// round-trip forms of the hexadecimal C literals (JS and C parse both correctly rounded), checked
// against the tables in the running libm's memory.

// __pow_log_data
const LN2HI = 0.6931471805598903; // 0x1.62e42fefa3800p-1
const LN2LO = 5.497923018708371e-14; // 0x1.ef35793c76730p-45
const A0 = -0.5; // -0x1p-1
const A1 = -0.6666666666666679; // 0x1.555555555556p-2 * -2
const A2 = 0.5000000000000007; // -0x1.0000000000006p-2 * -2
const A3 = 0.7999999995323976; // 0x1.999999959554ep-3 * 4
const A4 = -0.6666666663487739; // -0x1.555555529a47ap-3 * 4
const A5 = -1.142909628459501; // 0x1.2495b9b4845e9p-3 * -8
const A6 = 1.0000415263675542; // -0x1.0002b8b263fc3p-3 * -8
// __exp_data
const INV_LN2_N = 184.6649652337873; // 0x1.71547652b82fep0 * 128
const NEG_LN2_HI_N = -0.005415212348111709; // -0x1.62e42fefa0000p-8
const NEG_LN2_LO_N = -1.2864023111638346e-14; // -0x1.cf79abc9e3b3ap-47
const SHIFT = 6755399441055744.0; // 0x1.8p52
const C2 = 0.49999999999996786; // 0x1.ffffffffffdbdp-2
const C3 = 0.16666666666665886; // 0x1.555555555543cp-3
const C4 = 0.0416666808410674; // 0x1.55555cf172b91p-5
const C5 = 0.008333335853059549; // 0x1.1111167a4d017p-7
const SIGN_BIAS = 0x800 << 7; // 0x800 << EXP_TABLE_BITS
const TWO_P1009 = 2 ** 1009;
const TWO_M1022 = 2 ** -1022;
const TWO_P52 = 2 ** 52;

// __pow_log_data.tab (glibc-2.36 sysdeps/ieee754/dbl-64/e_pow_log_data.c): [invc, logc, logctail] x 128.
const LOG_TAB: Float64Array = new Float64Array([
  1.4140625, -0.3464667673462145, 5.929407345889625e-15,
  1.40625, -0.34092658697056777, -2.544157440035963e-14,
  1.3984375, -0.3353555419211034, -3.443525940775045e-14,
  1.390625, -0.3297532863724655, -2.500123826022799e-15,
  1.3828125, -0.32411946865420305, -8.929337133850617e-15,
  1.375, -0.31845373111855224, 1.7625431312172662e-14,
  1.3671875, -0.31275571000389846, 1.5688303180062087e-15,
  1.359375, -0.3070250352949415, 2.9655274673691784e-14,
  1.3515625, -0.3012613305781997, 3.7923164802093147e-14,
  1.34375, -0.2954642128938758, 3.993416384387844e-14,
  1.3359375, -0.28963329258306203, 1.9352855826489123e-14,
  1.3359375, -0.28963329258306203, 1.9352855826489123e-14,
  1.328125, -0.28376817313062475, -1.9852665484979036e-14,
  1.3203125, -0.27786845100342816, -2.814323765595281e-14,
  1.3125, -0.2719337154836694, 2.7643769993528702e-14,
  1.3046875, -0.2659635484970977, -4.025092402293806e-14,
  1.296875, -0.25995752443691345, -1.2621729398885316e-14,
  1.2890625, -0.25391520998095984, -3.600176732637335e-15,
  1.2890625, -0.25391520998095984, -3.600176732637335e-15,
  1.28125, -0.2478361639045943, 1.3029797173308663e-14,
  1.2734375, -0.2417199368871934, 4.8230289429940886e-14,
  1.265625, -0.23556607131274632, -2.0592242769647135e-14,
  1.2578125, -0.22937410106487732, 3.149265065191484e-14,
  1.25, -0.22314355131425145, 4.169796584527195e-14,
  1.25, -0.22314355131425145, 4.169796584527195e-14,
  1.2421875, -0.21687393830063684, 2.2477465222466186e-14,
  1.234375, -0.21056476910735, 3.6507188831790577e-16,
  1.2265625, -0.2042155414286526, -3.827767260205414e-14,
  1.2265625, -0.2042155414286526, -3.827767260205414e-14,
  1.21875, -0.19782574332987224, -4.7641388950792196e-14,
  1.2109375, -0.19139485299967873, 4.9278276214647115e-14,
  1.203125, -0.18492233849406148, 4.9485167661250996e-14,
  1.203125, -0.18492233849406148, 4.9485167661250996e-14,
  1.1953125, -0.1784076574728033, -1.5003333854266542e-14,
  1.1875, -0.17185025692663203, -2.7194441649495324e-14,
  1.1875, -0.17185025692663203, -2.7194441649495324e-14,
  1.1796875, -0.1652495728952772, -2.99659267292569e-14,
  1.171875, -0.15860503017665906, 2.0472357800461955e-14,
  1.171875, -0.15860503017665906, 2.0472357800461955e-14,
  1.1640625, -0.15191604202584585, 3.879296723063646e-15,
  1.15625, -0.1451820098444614, -3.6506824353335045e-14,
  1.1484375, -0.13840232285906495, -5.4183331379008994e-14,
  1.1484375, -0.13840232285906495, -5.4183331379008994e-14,
  1.140625, -0.131576357788731, 1.1729485484531301e-14,
  1.140625, -0.131576357788731, 1.1729485484531301e-14,
  1.1328125, -0.12470347850091912, -3.811763084710266e-14,
  1.125, -0.11778303565643, 4.654729747598445e-14,
  1.125, -0.11778303565643, 4.654729747598445e-14,
  1.1171875, -0.11081436634026431, -2.5799991283069902e-14,
  1.109375, -0.10379679368168127, 3.7700471749674615e-14,
  1.109375, -0.10379679368168127, 3.7700471749674615e-14,
  1.1015625, -0.09672962645856842, 1.7306161136093256e-14,
  1.1015625, -0.09672962645856842, 1.7306161136093256e-14,
  1.09375, -0.089612158689647, -4.012913552726574e-14,
  1.0859375, -0.08244366921110213, 2.7541708360737882e-14,
  1.0859375, -0.08244366921110213, 2.7541708360737882e-14,
  1.078125, -0.07522342123763792, 5.0396178134370583e-14,
  1.078125, -0.07522342123763792, 5.0396178134370583e-14,
  1.0703125, -0.06795066190852594, 1.8195060030168815e-14,
  1.0625, -0.06062462181648698, 5.213620639136504e-14,
  1.0625, -0.06062462181648698, 5.213620639136504e-14,
  1.0546875, -0.053244514518837605, 2.532168943117445e-14,
  1.0546875, -0.053244514518837605, 2.532168943117445e-14,
  1.046875, -0.045809536031242715, -5.148849572685811e-14,
  1.046875, -0.045809536031242715, -5.148849572685811e-14,
  1.0390625, -0.038318864302141264, 4.6652946995830086e-15,
  1.0390625, -0.038318864302141264, 4.6652946995830086e-15,
  1.03125, -0.03077165866670839, -4.529814257790929e-14,
  1.03125, -0.03077165866670839, -4.529814257790929e-14,
  1.0234375, -0.023167059281490765, -4.361324067851568e-14,
  1.015625, -0.015504186535963527, -1.7274567499706107e-15,
  1.015625, -0.015504186535963527, -1.7274567499706107e-15,
  1.0078125, -0.0077821404420319595, -2.298941004620351e-14,
  1.0078125, -0.0077821404420319595, -2.298941004620351e-14,
  1.0, 0.0, 0.0,
  1.0, 0.0, 0.0,
  0.9921875, 0.007843177461040796, -1.4902732911301337e-14,
  0.984375, 0.01574835696817445, -3.527980389655325e-14,
  0.9765625, 0.023716526617363343, -4.730054772033249e-14,
  0.96875, 0.03174869831457272, 7.580310369375161e-15,
  0.9609375, 0.039845908547249564, -4.9893776716773285e-14,
  0.953125, 0.048009219186383234, -2.262629393030674e-14,
  0.9453125, 0.056239718322899535, -2.345674491018699e-14,
  0.94140625, 0.06038051098892083, -1.3352588834854848e-14,
  0.93359375, 0.06871389254808946, -3.765296820388875e-14,
  0.92578125, 0.07711730334438016, 5.1128335719851986e-14,
  0.91796875, 0.08559193033545398, -5.046674438470119e-14,
  0.9140625, 0.08985632912185793, 3.1218748807418837e-15,
  0.90625, 0.09844007281321865, 3.3871241029241416e-14,
  0.8984375, 0.10709813555638448, -1.7376727386423858e-14,
  0.89453125, 0.11145544092528326, 3.957125899799804e-14,
  0.88671875, 0.12022742699821265, -5.2849453521890294e-14,
  0.8828125, 0.12464244520731427, -3.767012502308738e-14,
  0.875, 0.13353139262449076, 3.1859736349078334e-14,
  0.87109375, 0.13800567301939282, 5.0900642926060466e-14,
  0.86328125, 0.14701474296180095, 8.710783796122478e-15,
  0.859375, 0.15154989812720032, 6.157896229122976e-16,
  0.8515625, 0.16068238169043525, 3.821577743916796e-14,
  0.84765625, 0.16528009093906348, 3.9440046718453496e-14,
  0.83984375, 0.17453941635187675, 2.2924522154618074e-14,
  0.8359375, 0.17920142945774842, -3.742530094732263e-14,
  0.83203125, 0.18388527877016259, -2.5223102140407338e-14,
  0.82421875, 0.1933193110035063, -1.0320443688698849e-14,
  0.8203125, 0.19806991376208316, 1.0634128304268335e-14,
  0.8125, 0.20763936477828793, -4.3425422595242564e-14,
  0.80859375, 0.21245865121420593, -1.2527395755711364e-14,
  0.8046875, 0.21730127569003344, -5.204008743405884e-14,
  0.80078125, 0.22216746534115828, -3.979844515951702e-15,
  0.79296875, 0.2319714654378231, -4.7955860343296286e-14,
  0.7890625, 0.2369097470783572, 5.015686013791602e-16,
  0.78515625, 0.24187253642048745, -7.252318953240293e-16,
  0.78125, 0.2468600779315011, 2.4688324156011588e-14,
  0.7734375, 0.2569104137850218, 5.465121253624792e-15,
  0.76953125, 0.26197371574153294, 4.102651071698446e-14,
  0.765625, 0.2670627852490952, -4.996736502345936e-14,
  0.76171875, 0.27217788591576664, 4.903580708156347e-14,
  0.7578125, 0.27731928541618345, 5.089628039500759e-14,
  0.75390625, 0.28248725557466514, 1.1782016386565151e-14,
  0.74609375, 0.29290401643288533, 4.727452940514406e-14,
  0.7421875, 0.29815337231912054, -4.4204083338755686e-14,
  0.73828125, 0.3034304294199046, 1.548345993498083e-14,
  0.734375, 0.30873548164959175, 2.1522127491642888e-14,
  0.73046875, 0.3140688276249648, 1.1054030169005386e-14,
  0.7265625, 0.31943077076641657, -5.534326352070679e-14,
  0.72265625, 0.3248216194012912, -5.351646604259541e-14,
  0.71875, 0.33024168687052224, 5.4612144489920215e-14,
  0.71484375, 0.3356912916381134, 2.8136969901227338e-14,
  0.7109375, 0.3411707574027787, -1.156568624616423e-14,
]);
// __exp_data.tab (glibc-2.36 sysdeps/ieee754/dbl-64/e_exp_data.c): 2^(k/128) as 64-bit words,
// [tail_hi32, tail_lo32, sbits_hi32, sbits_lo32] x 128 (tab[2k] = asuint64(T[k]), tab[2k+1] = asuint64(H[k]) - (k << 45)).
const EXP_TAB: Int32Array = new Int32Array([
  0x00000000 | 0, 0x00000000 | 0, 0x3ff00000 | 0, 0x00000000 | 0,
  0x3c9b3b4f | 0, 0x1a88bf6e | 0, 0x3feff63d | 0, 0xa9fb3335 | 0,
  0xbc716013 | 0, 0x9cd8dc5d | 0, 0x3fefec9a | 0, 0x3e778061 | 0,
  0xbc905e7a | 0, 0x108766d1 | 0, 0x3fefe315 | 0, 0xe86e7f85 | 0,
  0x3c8cd252 | 0, 0x3567f613 | 0, 0x3fefd9b0 | 0, 0xd3158574 | 0,
  0xbc8bce80 | 0, 0x23f98efa | 0, 0x3fefd06b | 0, 0x29ddf6de | 0,
  0x3c60f74e | 0, 0x61e6c861 | 0, 0x3fefc745 | 0, 0x18759bc8 | 0,
  0x3c90a3e4 | 0, 0x5b33d399 | 0, 0x3fefbe3e | 0, 0xcac6f383 | 0,
  0x3c979aa6 | 0, 0x5d837b6d | 0, 0x3fefb558 | 0, 0x6cf9890f | 0,
  0x3c8eb51a | 0, 0x92fdeffc | 0, 0x3fefac92 | 0, 0x2b7247f7 | 0,
  0x3c3ebe3d | 0, 0x702f9cd1 | 0, 0x3fefa3ec | 0, 0x32d3d1a2 | 0,
  0xbc6a0334 | 0, 0x89906e0b | 0, 0x3fef9b66 | 0, 0xaffed31b | 0,
  0xbc955652 | 0, 0x2a2fbd0e | 0, 0x3fef9301 | 0, 0xd0125b51 | 0,
  0xbc5080ef | 0, 0x8c4eea55 | 0, 0x3fef8abd | 0, 0xc06c31cc | 0,
  0xbc91c923 | 0, 0xb9d5f416 | 0, 0x3fef829a | 0, 0xaea92de0 | 0,
  0x3c80d3e3 | 0, 0xe95c55af | 0, 0x3fef7a98 | 0, 0xc8a58e51 | 0,
  0xbc801b15 | 0, 0xeaa59348 | 0, 0x3fef72b8 | 0, 0x3c7d517b | 0,
  0xbc8f1ff0 | 0, 0x55de323d | 0, 0x3fef6af9 | 0, 0x388c8dea | 0,
  0x3c8b898c | 0, 0x3f1353bf | 0, 0x3fef635b | 0, 0xeb6fcb75 | 0,
  0xbc96d99c | 0, 0x7611eb26 | 0, 0x3fef5be0 | 0, 0x84045cd4 | 0,
  0x3c9aecf7 | 0, 0x3e3a2f60 | 0, 0x3fef5487 | 0, 0x3168b9aa | 0,
  0xbc8fe782 | 0, 0xcb86389d | 0, 0x3fef4d50 | 0, 0x22fcd91d | 0,
  0x3c8a6f41 | 0, 0x44a6c38d | 0, 0x3fef463b | 0, 0x88628cd6 | 0,
  0x3c807a05 | 0, 0xb0e4047d | 0, 0x3fef3f49 | 0, 0x917ddc96 | 0,
  0x3c968efd | 0, 0xe3a8a894 | 0, 0x3fef387a | 0, 0x6e756238 | 0,
  0x3c875e18 | 0, 0xf274487d | 0, 0x3fef31ce | 0, 0x4fb2a63f | 0,
  0x3c80472b | 0, 0x981fe7f2 | 0, 0x3fef2b45 | 0, 0x65e27cdd | 0,
  0xbc96b87b | 0, 0x3f71085e | 0, 0x3fef24df | 0, 0xe1f56381 | 0,
  0x3c82f7e1 | 0, 0x6d09ab31 | 0, 0x3fef1e9d | 0, 0xf51fdee1 | 0,
  0xbc3d219b | 0, 0x1a6fbffa | 0, 0x3fef187f | 0, 0xd0dad990 | 0,
  0x3c8b3782 | 0, 0x720c0ab4 | 0, 0x3fef1285 | 0, 0xa6e4030b | 0,
  0x3c6e1492 | 0, 0x89cecb8f | 0, 0x3fef0caf | 0, 0xa93e2f56 | 0,
  0x3c834d75 | 0, 0x4db0abb6 | 0, 0x3fef06fe | 0, 0x0a31b715 | 0,
  0x3c864201 | 0, 0xe2ac744c | 0, 0x3fef0170 | 0, 0xfc4cd831 | 0,
  0x3c8fdd39 | 0, 0x5dd3f84a | 0, 0x3feefc08 | 0, 0xb26416ff | 0,
  0xbc86a380 | 0, 0x3b8e5b04 | 0, 0x3feef6c5 | 0, 0x5f929ff1 | 0,
  0xbc924aed | 0, 0xcc4b5068 | 0, 0x3feef1a7 | 0, 0x373aa9cb | 0,
  0xbc9907f8 | 0, 0x1b512d8e | 0, 0x3feeecae | 0, 0x6d05d866 | 0,
  0xbc71d1e8 | 0, 0x3e9436d2 | 0, 0x3feee7db | 0, 0x34e59ff7 | 0,
  0xbc991919 | 0, 0xb3ce1b15 | 0, 0x3feee32d | 0, 0xc313a8e5 | 0,
  0x3c859f48 | 0, 0xa72a4c6d | 0, 0x3feedea6 | 0, 0x4c123422 | 0,
  0xbc931260 | 0, 0x7a28698a | 0, 0x3feeda45 | 0, 0x04ac801c | 0,
  0xbc58a78f | 0, 0x4817895b | 0, 0x3feed60a | 0, 0x21f72e2a | 0,
  0xbc7c2c9b | 0, 0x67499a1b | 0, 0x3feed1f5 | 0, 0xd950a897 | 0,
  0x3c4363ed | 0, 0x60c2ac11 | 0, 0x3feece08 | 0, 0x6061892d | 0,
  0x3c966609 | 0, 0x3b0664ef | 0, 0x3feeca41 | 0, 0xed1d0057 | 0,
  0x3c6ecce1 | 0, 0xdaa10379 | 0, 0x3feec6a2 | 0, 0xb5c13cd0 | 0,
  0x3c93ff8e | 0, 0x3f0f1230 | 0, 0x3feec32a | 0, 0xf0d7d3de | 0,
  0x3c7690ce | 0, 0xbb7aafb0 | 0, 0x3feebfda | 0, 0xd5362a27 | 0,
  0x3c931dbd | 0, 0xeb54e077 | 0, 0x3feebcb2 | 0, 0x99fddd0d | 0,
  0xbc8f9434 | 0, 0x0071a38e | 0, 0x3feeb9b2 | 0, 0x769d2ca7 | 0,
  0xbc87decc | 0, 0xdc93a349 | 0, 0x3feeb6da | 0, 0xa2cf6642 | 0,
  0xbc78dec6 | 0, 0xbd0f385f | 0, 0x3feeb42b | 0, 0x569d4f82 | 0,
  0xbc861246 | 0, 0xec7b5cf6 | 0, 0x3feeb1a4 | 0, 0xca5d920f | 0,
  0x3c933505 | 0, 0x18fdd78e | 0, 0x3feeaf47 | 0, 0x36b527da | 0,
  0x3c7b98b7 | 0, 0x2f8a9b05 | 0, 0x3feead12 | 0, 0xd497c7fd | 0,
  0x3c9063e1 | 0, 0xe21c5409 | 0, 0x3feeab07 | 0, 0xdd485429 | 0,
  0x3c34c785 | 0, 0x5019c6ea | 0, 0x3feea926 | 0, 0x8a5946b7 | 0,
  0x3c9432e6 | 0, 0x2b64c035 | 0, 0x3feea76f | 0, 0x15ad2148 | 0,
  0xbc8ce44a | 0, 0x6199769f | 0, 0x3feea5e1 | 0, 0xb976dc09 | 0,
  0xbc8c33c5 | 0, 0x3bef4da8 | 0, 0x3feea47e | 0, 0xb03a5585 | 0,
  0xbc845378 | 0, 0x892be9ae | 0, 0x3feea346 | 0, 0x34ccc320 | 0,
  0xbc93cedd | 0, 0x78565858 | 0, 0x3feea238 | 0, 0x82552225 | 0,
  0x3c5710aa | 0, 0x807e1964 | 0, 0x3feea155 | 0, 0xd44ca973 | 0,
  0xbc93b3ef | 0, 0xbf5e2228 | 0, 0x3feea09e | 0, 0x667f3bcd | 0,
  0xbc6a12ad | 0, 0x8734b982 | 0, 0x3feea012 | 0, 0x750bdabf | 0,
  0xbc6367ef | 0, 0xb86da9ee | 0, 0x3fee9fb2 | 0, 0x3c651a2f | 0,
  0xbc80dc3d | 0, 0x54e08851 | 0, 0x3fee9f7d | 0, 0xf9519484 | 0,
  0xbc781f64 | 0, 0x7e5a3ecf | 0, 0x3fee9f75 | 0, 0xe8ec5f74 | 0,
  0xbc86ee4a | 0, 0xc08b7db0 | 0, 0x3fee9f9a | 0, 0x48a58174 | 0,
  0xbc861932 | 0, 0x1e55e68a | 0, 0x3fee9feb | 0, 0x564267c9 | 0,
  0x3c909ccb | 0, 0x5e09d4d3 | 0, 0x3feea069 | 0, 0x4fde5d3f | 0,
  0xbc7b32dc | 0, 0xb94da51d | 0, 0x3feea114 | 0, 0x73eb0187 | 0,
  0x3c94ecfd | 0, 0x5467c06b | 0, 0x3feea1ed | 0, 0x0130c132 | 0,
  0x3c65ebe1 | 0, 0xabd66c55 | 0, 0x3feea2f3 | 0, 0x36cf4e62 | 0,
  0xbc88a1c5 | 0, 0x2fb3cf42 | 0, 0x3feea427 | 0, 0x543e1a12 | 0,
  0xbc9369b6 | 0, 0xf13b3734 | 0, 0x3feea589 | 0, 0x994cce13 | 0,
  0xbc805e84 | 0, 0x3a19ff1e | 0, 0x3feea71a | 0, 0x4623c7ad | 0,
  0xbc94d450 | 0, 0xd872576e | 0, 0x3feea8d9 | 0, 0x9b4492ed | 0,
  0x3c90ad67 | 0, 0x5b0e8a00 | 0, 0x3feeaac7 | 0, 0xd98a6699 | 0,
  0x3c8db72f | 0, 0xc1f0eab4 | 0, 0x3feeace5 | 0, 0x422aa0db | 0,
  0xbc65b660 | 0, 0x9cc5e7ff | 0, 0x3feeaf32 | 0, 0x16b5448c | 0,
  0x3c7bf683 | 0, 0x59f35f44 | 0, 0x3feeb1ae | 0, 0x99157736 | 0,
  0xbc93091f | 0, 0xa71e3d83 | 0, 0x3feeb45b | 0, 0x0b91ffc6 | 0,
  0xbc5da9b8 | 0, 0x8b6c1e29 | 0, 0x3feeb737 | 0, 0xb0cdc5e5 | 0,
  0xbc6c23f9 | 0, 0x7c90b959 | 0, 0x3feeba44 | 0, 0xcbc8520f | 0,
  0xbc924343 | 0, 0x22f4f9aa | 0, 0x3feebd82 | 0, 0x9fde4e50 | 0,
  0xbc85ca6c | 0, 0xd7668e4b | 0, 0x3feec0f1 | 0, 0x70ca07ba | 0,
  0x3c71affc | 0, 0x2b91ce27 | 0, 0x3feec491 | 0, 0x82a3f090 | 0,
  0x3c6dd235 | 0, 0xe10a73bb | 0, 0x3feec863 | 0, 0x19e32323 | 0,
  0xbc87c504 | 0, 0x22622263 | 0, 0x3feecc66 | 0, 0x7b5de565 | 0,
  0x3c8b1c86 | 0, 0xe3e231d5 | 0, 0x3feed09b | 0, 0xec4a2d33 | 0,
  0xbc91bbd1 | 0, 0xd3bcbb15 | 0, 0x3feed503 | 0, 0xb23e255d | 0,
  0x3c90cc31 | 0, 0x9cee31d2 | 0, 0x3feed99e | 0, 0x1330b358 | 0,
  0x3c846984 | 0, 0x6e735ab3 | 0, 0x3feede6b | 0, 0x5579fdbf | 0,
  0xbc82dfcd | 0, 0x978e9db4 | 0, 0x3feee36b | 0, 0xbfd3f37a | 0,
  0x3c8c1a77 | 0, 0x92cb3387 | 0, 0x3feee89f | 0, 0x995ad3ad | 0,
  0xbc907b8f | 0, 0x4ad1d9fa | 0, 0x3feeee07 | 0, 0x298db666 | 0,
  0xbc55c3d9 | 0, 0x56dcaeba | 0, 0x3feef3a2 | 0, 0xb84f15fb | 0,
  0xbc90a40e | 0, 0x3da6f640 | 0, 0x3feef972 | 0, 0x8de5593a | 0,
  0xbc68d6f4 | 0, 0x38ad9334 | 0, 0x3feeff76 | 0, 0xf2fb5e47 | 0,
  0xbc91eee2 | 0, 0x6b588a35 | 0, 0x3fef05b0 | 0, 0x30a1064a | 0,
  0x3c74ffd7 | 0, 0x0a5fddcd | 0, 0x3fef0c1e | 0, 0x904bc1d2 | 0,
  0xbc91bdfb | 0, 0xfa9298ac | 0, 0x3fef12c2 | 0, 0x5bd71e09 | 0,
  0x3c736eae | 0, 0x30af0cb3 | 0, 0x3fef199b | 0, 0xdd85529c | 0,
  0x3c8ee332 | 0, 0x5c9ffd94 | 0, 0x3fef20ab | 0, 0x5fffd07a | 0,
  0x3c84e08f | 0, 0xd10959ac | 0, 0x3fef27f1 | 0, 0x2e57d14b | 0,
  0x3c63cdaf | 0, 0x384e1a67 | 0, 0x3fef2f6d | 0, 0x9406e7b5 | 0,
  0x3c676b2c | 0, 0x6c921968 | 0, 0x3fef3720 | 0, 0xdcef9069 | 0,
  0xbc808a18 | 0, 0x83ccb5d2 | 0, 0x3fef3f0b | 0, 0x555dc3fa | 0,
  0xbc8fad5d | 0, 0x3ffffa6f | 0, 0x3fef472d | 0, 0x4a07897c | 0,
  0xbc900dae | 0, 0x3875a949 | 0, 0x3fef4f87 | 0, 0x080d89f2 | 0,
  0x3c74a385 | 0, 0xa63d07a7 | 0, 0x3fef5818 | 0, 0xdcfba487 | 0,
  0xbc82919e | 0, 0x2040220f | 0, 0x3fef60e3 | 0, 0x16c98398 | 0,
  0x3c8e5a50 | 0, 0xd5c192ac | 0, 0x3fef69e6 | 0, 0x03db3285 | 0,
  0x3c843a59 | 0, 0xac016b4b | 0, 0x3fef7321 | 0, 0xf301b460 | 0,
  0xbc82d521 | 0, 0x07b43e1f | 0, 0x3fef7c97 | 0, 0x337b9b5f | 0,
  0xbc892ab9 | 0, 0x3b470dc9 | 0, 0x3fef8646 | 0, 0x14f5a129 | 0,
  0x3c74b604 | 0, 0x603a88d3 | 0, 0x3fef902e | 0, 0xe78b3ff6 | 0,
  0x3c83c5ec | 0, 0x519d7271 | 0, 0x3fef9a51 | 0, 0xfbc74c83 | 0,
  0xbc8ff712 | 0, 0x8fd391f0 | 0, 0x3fefa4af | 0, 0xa2a490da | 0,
  0xbc8dae98 | 0, 0xe223747d | 0, 0x3fefaf48 | 0, 0x2d8e67f1 | 0,
  0x3c8ec3bc | 0, 0x41aa2008 | 0, 0x3fefba1b | 0, 0xee615a27 | 0,
  0x3c842b94 | 0, 0xc3a9eb32 | 0, 0x3fefc52b | 0, 0x376bba97 | 0,
  0x3c8a64a9 | 0, 0x31d185ee | 0, 0x3fefd076 | 0, 0x5b6e4540 | 0,
  0xbc8e37ba | 0, 0xe43be3ed | 0, 0x3fefdbfd | 0, 0xad9cbe14 | 0,
  0x3c77893b | 0, 0x4d91cd9d | 0, 0x3fefe7c1 | 0, 0x819e90d8 | 0,
  0x3c5305c1 | 0, 0x4160cc89 | 0, 0x3feff3c2 | 0, 0x2b8f71f1 | 0,
]);

// ---------------------------------------------------------------------------------------------
// The algorithm. Words of 64-bit integers: hi (bits 32..63) and lo (bits 0..31), 32-bit arithmetic
// that wraps as the C uint64_t arithmetic does on the bits that matter.

let logTail = 0; // log_inline's *tail

/**
 * log(x) as hi + logTail (log_inline). (ixHi, ixLo) are the bits of x > 0, normalized for subnormal
 * x by giving the exponent field a negative value (wrapping into the sign bit), as glibc does.
 */
function logInline(ixHi: number, ixLo: number): number {
  // x = 2^k z, z in [OFF, 2*OFF) with OFF = 0x3fe6955500000000 (whose low word is 0).
  const tmpHi = (ixHi - 0x3fe69555) | 0;
  const i = (tmpHi >>> 13) & 127; // (tmp >> 45) % 128
  const k = tmpHi >> 20; // (int64_t) tmp >> 52
  const z = fromWords((ixHi - (tmpHi & 0xfff00000)) | 0, ixLo);
  const kd = k;
  const invc = LOG_TAB[3 * i];
  const logc = LOG_TAB[3 * i + 1];
  const logctail = LOG_TAB[3 * i + 2];

  const r = fma(z, invc, -1.0); // __builtin_fma
  const t1 = fma(kd, LN2HI, logc); // contracted
  const t2 = t1 + r;
  const lo1 = fma(kd, LN2LO, logctail); // contracted
  const lo2 = t1 - t2 + r;
  const ar = A0 * r;
  const ar2 = r * ar;
  const ar3 = r * ar2;
  const hi = t2 + ar2;
  const lo3 = fma(ar, r, -ar2); // __builtin_fma
  const lo4 = t2 - hi + ar2;
  // p = ar3 * (A1 + r*A2 + ar2*(A3 + r*A4 + ar2*(A5 + r*A6))), all contracted, and the final
  // `lo1 + lo2 + lo3 + lo4 + p` fuses the multiply by ar3 into the last addition.
  const q1 = fma(r, A2, A1);
  const q3 = fma(r, A4, A3);
  const q5 = fma(r, A6, A5);
  const inner = fma(q5, ar2, q3);
  const poly = fma(ar2, inner, q1);
  const lo = fma(ar3, poly, lo1 + lo2 + lo3 + lo4);
  const y = hi + lo;
  logTail = hi - y + lo;
  return y;
}

/** The result scale * (1 + tmp) when it may overflow or underflow (specialcase). */
function specialCase(tmp: number, sbitsHi: number, sbitsLo: number, kiLo: number): number {
  if ((kiLo & 0x80000000) === 0) {
    // k > 0: the exponent of scale might have overflowed by <= 460.
    const scale = fromWords((sbitsHi - (1009 << 20)) | 0, sbitsLo);
    return TWO_P1009 * fma(scale, tmp, scale); // contracted
  }
  // k < 0: care in the subnormal range. Here the product is NOT fused (it is used twice).
  const hi2 = (sbitsHi + (1022 << 20)) | 0;
  const scale = fromWords(hi2, sbitsLo);
  const st = scale * tmp;
  let y = scale + st;
  if (Math.abs(y) < 1.0) {
    const one = y < 0.0 ? -1.0 : 1.0;
    let lo = scale - y + st;
    const hi = one + y;
    lo = one - hi + y + lo;
    y = hi + lo - one;
    if (y === 0) y = hi2 < 0 ? -0.0 : 0.0;
  }
  return TWO_M1022 * y;
}

/** sign * exp(x + xtail) (exp_inline); signBias is SIGN_BIAS for a negative result, else 0. */
function expInline(x: number, xtail: number, signBias: number): number {
  CELL[0] = x;
  const xHi = WORDS[1];
  let abstop = (xHi >>> 20) & 0x7ff;
  if (abstop - 0x3c9 < 0 || abstop - 0x3c9 >= 0x3f) {
    if (abstop - 0x3c9 < 0) {
      // Tiny x: avoid spurious underflow. (Note: 0 is a common input.)
      const one = 1.0 + x;
      return signBias !== 0 ? -one : one;
    }
    if (abstop >= 0x409) {
      // |x| >= 1024: overflow or underflow (inf and nan were handled before).
      if (xHi >>> 31) return signBias !== 0 ? -0.0 : 0.0;
      return signBias !== 0 ? -Infinity : Infinity;
    }
    abstop = 0; // large x is special-cased below
  }
  // exp(x) = 2^(k/N) * exp(r), x = ln2/N*k + r.
  const kdShifted = fma(x, INV_LN2_N, SHIFT); // z = InvLn2N * x; kd = z + Shift: contracted
  CELL[0] = kdShifted;
  const kiLo = WORDS[0];
  const kd = kdShifted - SHIFT;
  let r = fma(kd, NEG_LN2_LO_N, fma(kd, NEG_LN2_HI_N, x)); // contracted, twice
  r = xtail + r;
  const idx = 4 * (kiLo & 127);
  const topHi = (kiLo + signBias) << 13; // ((ki + sign_bias) << 45) >> 32
  const tail = fromWords(EXP_TAB[idx], EXP_TAB[idx + 1]);
  const sbitsHi = (EXP_TAB[idx + 2] + topHi) | 0;
  const sbitsLo = EXP_TAB[idx + 3];
  const r2 = r * r;
  // tmp = tail + r + r2 * (C2 + r * C3) + r2 * r2 * (C4 + r * C5), contracted as:
  const a = fma(r, C3, C2);
  const b = r + tail;
  const c = fma(r, C5, C4);
  const d = fma(a, r2, b);
  const tmp = fma(c, r2 * r2, d);
  if (abstop === 0) return specialCase(tmp, sbitsHi, sbitsLo >>> 0, kiLo);
  const scale = fromWords(sbitsHi, sbitsLo);
  return fma(scale, tmp, scale); // scale + scale * tmp: contracted
}

/** checkint: 0 if y is not an integer, 1 if odd, 2 if even (y finite, non-zero). */
function checkint(y: number): number {
  if (!Number.isInteger(y)) return 0;
  if (Math.abs(y) >= 9007199254740992) return 2; // 2^53 and above: even
  return y % 2 === 0 ? 2 : 1;
}

/** A signaling NaN (quiet bit clear), as issignaling_inline sees it. */
function isSignaling(x: number): boolean {
  if (x === x) return false;
  CELL[0] = x;
  return (WORDS[1] & 0x00080000) === 0;
}

/** pow(x, y) exactly as glibc 2.36's __ieee754_pow_fma computes it (x86_64 with FMA). */
export function pow(x: number, y: number): number {
  CELL[0] = x;
  let ixHi = WORDS[1];
  let ixLo = WORDS[0];
  CELL[0] = y;
  const iyHi = WORDS[1];
  const iyLo = WORDS[0];
  let topx = ixHi >>> 20;
  const topy = iyHi >>> 20;
  let signBias = 0;
  if (topx - 1 < 0 || topx - 1 >= 0x7fe || (topy & 0x7ff) - 0x3be < 0 || (topy & 0x7ff) - 0x3be >= 0x80) {
    // x < 0x1p-1022 or x negative or inf or nan; or |y| < 0x1p-65 or |y| >= 0x1p63 or nan.
    const yAbsHi = iyHi & 0x7fffffff;
    if ((yAbsHi === 0 && iyLo === 0) || yAbsHi >= 0x7ff00000) {
      // y is zero, infinity or nan.
      if (yAbsHi === 0 && iyLo === 0) return isSignaling(x) ? x + y : 1.0;
      if (ixHi === 0x3ff00000 && ixLo === 0) return isSignaling(y) ? x + y : 1.0;
      if (x !== x || y !== y) return x + y;
      const ax = Math.abs(x);
      if (ax === 1) return 1.0;
      if ((ax < 1) === (iyHi >>> 31 === 0)) return 0.0; // |x| < 1 && y == inf or |x| > 1 && y == -inf
      return y * y;
    }
    const xAbsHi = ixHi & 0x7fffffff;
    if ((xAbsHi === 0 && ixLo === 0) || xAbsHi >= 0x7ff00000) {
      // x is zero, infinity or nan.
      let x2 = x * x;
      if (ixHi >>> 31 && checkint(y) === 1) {
        x2 = -x2;
        signBias = 1;
      }
      if (xAbsHi === 0 && ixLo === 0 && iyHi >>> 31) return signBias ? -Infinity : Infinity; // divzero
      return iyHi >>> 31 ? 1 / x2 : x2;
    }
    // Here x and y are non-zero finite.
    if (ixHi >>> 31) {
      // Finite x < 0.
      const yint = checkint(y);
      if (yint === 0) return NaN; // __math_invalid
      if (yint === 1) signBias = SIGN_BIAS;
      ixHi &= 0x7fffffff;
      topx &= 0x7ff;
    }
    if ((topy & 0x7ff) - 0x3be < 0 || (topy & 0x7ff) - 0x3be >= 0x80) {
      // Note: signBias == 0 here because y is not odd.
      if (ixHi === 0x3ff00000 && ixLo === 0) return 1.0;
      const xAboveOne = ixHi > 0x3ff00000 || (ixHi === 0x3ff00000 && ixLo !== 0);
      if ((topy & 0x7ff) < 0x3be) {
        // |y| < 2^-65, x^y ~= 1 + y*log(x).
        return xAboveOne ? 1.0 + y : 1.0 - y;
      }
      return xAboveOne === topy < 0x800 ? Infinity : 0.0; // __math_oflow(0) : __math_uflow(0)
    }
    if (topx === 0) {
      // Normalize subnormal x so the exponent becomes negative.
      CELL[0] = x * TWO_P52;
      ixHi = ((WORDS[1] & 0x7fffffff) - (52 << 20)) | 0;
      ixLo = WORDS[0];
    }
  }
  const hi = logInline(ixHi, ixLo);
  const lo = logTail;
  const ehi = y * hi;
  const elo = fma(y, lo, fma(y, hi, -ehi)); // y * lo + __builtin_fma (y, hi, -ehi): contracted
  return expInline(ehi, elo, signBias);
}
