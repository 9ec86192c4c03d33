# Inputs for pow and glibc's answers, as little-endian '<d' doubles: records (x, y, ref, category).
# ref is libm's pow called directly through ctypes; for finite x > 0 and finite y we also check that
# Python's own `x ** y` (float_pow -> the C library's pow) gives the same bits.
import ctypes, random, struct, sys, math
from array import array
libm = ctypes.CDLL('libm.so.6')
cpow = libm.pow
cpow.restype = ctypes.c_double
cpow.argtypes = [ctypes.c_double, ctypes.c_double]
rnd = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 2024)
def fb(b): return struct.unpack('<d', struct.pack('<Q', b))[0]
def bits(d): return struct.unpack('<Q', struct.pack('<d', d))[0]
PER = int(sys.argv[2])
recs = array('d')
cats = []
pyop_checked = 0; pyop_diff = 0
def same(a, b): return bits(a) == bits(b) or (a != a and b != b)
def emit(x, y, cat):
    global pyop_checked, pyop_diff
    r = cpow(x, y)
    if x > 0 and math.isfinite(x) and math.isfinite(y) and (pyop_checked < 3_000_000 or rnd.random() < 0.05):
        try:
            p = x ** y
            pyop_checked += 1
            if not same(p, r): pyop_diff += 1
        except OverflowError:
            pass
    recs.extend((x, y, r, float(cat)))
def rand_pos_normal(): return fb((rnd.randint(1, 2046) << 52) | rnd.getrandbits(52))
def rand_subnormal(): return fb(rnd.getrandbits(52) or 1)
def f32(v): return struct.unpack('<f', struct.pack('<f', v))[0]
def asgd_base():
    lambd = 10 ** rnd.uniform(-6, 0); lr = f32(10 ** rnd.uniform(-5, 0)); step = f32(float(rnd.randint(1, 10**7)))
    return 1 + lambd * lr * step
XS = [
    ('x in [1, 1+1e-9]', lambda: 1 + rnd.random() * 1e-9),
    ('x in [1, 2]', lambda: 1 + rnd.random()),
    ('x in [1, 1e3]', lambda: rnd.uniform(1, 1e3)),
    ('x in [1, 1e12]', lambda: rnd.uniform(1, 1e12)),
    ('x random positive normal bits', rand_pos_normal),
    ('x subnormal', rand_subnormal),
    ('x in (0, 1) and [1-1e-9, 1)', lambda: rnd.random() if rnd.random() < 0.5 else 1 - rnd.random() * 1e-9),
    ('x = 1 + lambd*lr*step (ASGD)', asgd_base),
]
def rand_large_y():
    if rnd.random() < 0.5:
        return rnd.choice([1, -1]) * 10 ** rnd.uniform(0.6, 6)
    return fb((rnd.getrandbits(1) << 63) | (rnd.randint(0x3be, 0x43d) << 52) | rnd.getrandbits(52))
YS = [('y=0.5', lambda: 0.5), ('y=0.75', lambda: 0.75), ('y=0.25', lambda: 0.25), ('y=1.5', lambda: 1.5),
      ('y=1', lambda: 1.0), ('y=2', lambda: 2.0), ('y=-0.5', lambda: -0.5),
      ('y in [-4, 4]', lambda: rnd.uniform(-4, 4)), ('y large/random exponent', rand_large_y)]
names = []
for xn, xf in XS:
    for yn, yf in YS:
        cat = len(names); names.append(f'{xn} | {yn}')
        for _ in range(PER):
            emit(xf(), yf(), cat)
# results near overflow / underflow / the subnormal range (exp_inline's specialcase)
cat = len(names); names.append('x^y near overflow, underflow, subnormal results')
for _ in range(PER * 2):
    x = rand_pos_normal()
    if x == 1.0: continue
    t = rnd.choice([rnd.uniform(1015, 1025), rnd.uniform(-1080, -1015), rnd.uniform(-1100, -1000)])
    emit(x, t / math.log2(x), cat)
# negative x with integer y (odd and even), and non-integer y
cat = len(names); names.append('negative x, integer (and some non-integer) y')
for _ in range(PER):
    x = -rnd.choice([rnd.uniform(0, 3), rand_pos_normal(), rand_subnormal(), 1 + rnd.random() * 1e-9])
    y = rnd.choice([float(rnd.randint(-50, 50)), float(rnd.randint(-10**6, 10**6)), float(rnd.getrandbits(60)), 2.0**53 + 1 * rnd.choice([0, 2]), rnd.uniform(-4, 4), 0.5])
    emit(x, y, cat)
# special values, all pairs
cat = len(names); names.append('special values (all pairs)')
inf = float('inf'); nan = float('nan')
S = [0.0, -0.0, inf, -inf, nan, -nan, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1.5, -1.5, 0.25, 10.0,
     5e-324, -5e-324, 2.2250738585072014e-308, -2.2250738585072014e-308, 2.225073858507201e-308,
     1.7976931348623157e308, -1.7976931348623157e308, 2.0**53, 2.0**53 + 2, -(2.0**53), 2.0**63, 2.0**64, 2.0**62, 9007199254740991.0, -9007199254740991.0,
     2.0**-65, -2.0**-65, 2.0**-66, 2.0**-60, 1e-300, 1e300, -1e300, 1 + 2**-52, 1 - 2**-53, -(1 + 2**-52), 1023.0, 1024.0, -1074.0, -1075.0, 0.75, -0.75, 7.0, -7.0, 1e-20, 1e20, 709.0, 745.0]
for x in S:
    for y in S:
        emit(x, y, cat)
recs.tofile(open(sys.argv[1], 'wb'))
open(sys.argv[1] + '.names', 'w').write('\n'.join(names) + '\n')
print(f'records {len(recs)//4}; python x**y checked against ctypes pow on {pyop_checked}: {pyop_diff} differ')
