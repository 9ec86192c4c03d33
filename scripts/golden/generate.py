#!/usr/bin/env python3
"""Golden fixtures for the ASGD kernels, written by real PyTorch.

Run with the interpreter that has torch (on this machine /usr/bin/python3, PyTorch 1.13):

    /usr/bin/python3 scripts/golden/generate.py                  # rewrites test/fixtures/golden
    /usr/bin/python3 scripts/golden/generate.py --out /tmp/g --seed 7 --quick

Everything is seeded; torch runs on one thread. Output: manifest.json plus one little-endian binary
file per scenario (layout in manifest.json and test/optim/golden-harness.ts). Scenario steps follow
torch.optim.ASGD.step() exactly: parameters without a gradient are skipped (and get no state until
their first gradient), state can be loaded through load_state_dict.

Halfway cases: for some elements the generator plants a gradient g such that the update
param.add_(g, alpha=-eta) has an exact value just off a float32 midpoint while the double sum
lands exactly on it; a kernel that rounds the double a*b+c once more gets those wrong. It checks
that torch's result equals the exactly rounded value (proving the FMA) and records how many traps
the scenario holds.
"""
import argparse
import json
import math
import os
import re
import sys
from fractions import Fraction

import numpy as np
import torch

FORMAT_VERSION = 1
MASK32 = 0xFFFFFFFF


def cpu_capability():
    match = re.search(r'CPU capability usage: ([^\n]+)', torch.__config__.show())
    return match.group(1).strip() if match else 'unknown'


# ---------------------------------------------------------------- exact float32 arithmetic

def rn32(x):
    """Round a dyadic Fraction to the nearest float32 (ties to even), with subnormals and overflow."""
    if x == 0:
        return 0.0
    negative = x < 0
    x = -x if negative else x
    n, d = x.numerator, x.denominator
    e = -(d.bit_length() - 1)
    top = n.bit_length() - 1 + e
    quantum = max(top - 23, -149)
    if quantum <= e:
        kept = n << (e - quantum)
    else:
        shift = quantum - e
        kept = n >> shift
        rest = n - (kept << shift)
        half = 1 << (shift - 1)
        if rest > half or (rest == half and kept & 1):
            kept += 1
    value = math.ldexp(kept, quantum)
    if value >= 2.0 ** 128:
        value = math.inf
    return -value if negative else value


def exact_fma(a, b, c):
    x = Fraction(a) * Fraction(b) + Fraction(c)
    return rn32(x) if x != 0 else float(np.float32(a * b + c))


def naive_fma(a, b, c):
    """The double a*b + c rounded to float32: wrong exactly on the halfway cases."""
    return float(np.float32(a * b + c))


def ulp32(x):
    if x == 0 or not math.isfinite(x):
        return 2.0 ** -149
    _, e = math.frexp(x)  # |x| in [2^(e-1), 2^e)
    return 2.0 ** max(e - 24, -149)


def odd_mantissa(x):
    """|x| = m * 2^e with m odd (x a nonzero float32 value)."""
    m, e = math.frexp(abs(x))
    m = int(m * 2 ** 24)
    e -= 24
    while m % 2 == 0:
        m //= 2
        e += 1
    return m, e


_solutions_cache = {}


def halfway_multiplicands(b):
    if b not in _solutions_cache:
        _solutions_cache.clear() if len(_solutions_cache) > 64 else None
        _solutions_cache[b] = _halfway_multiplicands(b)
    return _solutions_cache[b]


def _halfway_multiplicands(b):
    """Integers G < 2^24 with G*m ≡ 2^(K-1) + d (mod 2^K), |d| small, where |b| = m * 2^eb (m odd).

    With a = G * 2^ea the product a*b sits (j + 1/2) * 2^(K+eb+ea) + d * 2^(eb+ea) with d far
    below the double resolution of a sum whose float32 ulp is 2^(K+eb+ea): a halfway trap.
    Returns (G, K, j) sorted by j (small products first).
    """
    m, _ = odd_mantissa(b)
    found = []
    for K in range(31, 45):
        modulus = 1 << K
        inverse = pow(m, -1, modulus)
        w = 1 << (K - 30)
        d = np.concatenate([np.arange(-w, 0, dtype=np.int64), np.arange(1, w + 1, dtype=np.int64)])
        r = (np.uint64(modulus >> 1) + d.astype(np.uint64))  # wraps for negative d: fine mod 2^K
        G = (r * np.uint64(inverse)) & np.uint64(modulus - 1)
        for g in G[(G > 0) & (G < (1 << 24))].tolist():
            found.append((g, K, (g * m) >> K))
    found.sort(key=lambda t: t[2])
    return found


def plant_halfway(c, b, solutions, rng):
    """A float32 g such that fma(g, b, c) != naive(g, b, c); pushes |result| away from zero. Or None."""
    if c == 0 or not math.isfinite(c):
        return None
    m, eb = odd_mantissa(b)
    u = ulp32(c)
    for G, K, _ in solutions[:64]:
        ulp_g = u / 2.0 ** (K + eb)  # product ulp = ulp_g * 2^eb, float32 grid of the result = 2^K of those
        if ulp_g < 2.0 ** -149 or (G < 2 ** 23 and ulp_g != 2.0 ** -149):
            continue
        g = G * ulp_g
        if not (float(np.float32(g)) == g and g < 1e30):
            continue
        if (c > 0) != (b > 0):
            g = -g  # product with the sign of c
        if exact_fma(g, b, c) != naive_fma(g, b, c):
            return g
    return None


# ---------------------------------------------------------------- hashes (mirrored in golden-harness.ts)

def tensor_hashes(values):
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    i = np.arange(len(u), dtype=np.uint64)
    mask = np.uint64(MASK32)
    w1 = (((np.uint64(2) * i + np.uint64(1)) * np.uint64(0x9E3779B1)) & mask) | np.uint64(1)
    w2 = (((i * np.uint64(0x85EBCA77)) & mask) ^ np.uint64(0xC2B2AE3D)) | np.uint64(1)
    h1 = int(((u * w1) & mask).sum()) & MASK32
    h2 = int((((u ^ (u >> np.uint64(15))) * w2) & mask).sum()) & MASK32
    return h1, h2


# ---------------------------------------------------------------- values

def f32(x):
    return np.asarray(x, dtype=np.float32)


def normal_values(rng, n, scale):
    return f32(rng.standard_normal(n) * scale)


def mixed_values(rng, n):
    """Magnitudes from 2^-149 to 2^4 (log-uniform), random signs, some zeros of both signs."""
    exponents = rng.uniform(-149, 4, n)
    values = np.sign(rng.standard_normal(n)) * np.exp2(exponents) * rng.uniform(1, 2, n)
    out = f32(values)
    kinds = rng.random(n)
    out[kinds < 0.05] = 0.0
    out[(kinds >= 0.05) & (kinds < 0.08)] = -0.0
    subnormal = (kinds >= 0.08) & (kinds < 0.2)
    out[subnormal] = f32(np.sign(rng.standard_normal(subnormal.sum())) * rng.integers(1, 2 ** 23, subnormal.sum()) * 2.0 ** -149)
    return out


WD_TRAP = float(np.float32((1 - 2 ** -23) * 2 ** -7))  # (1 - 2^-23)(1 + 2^-23) = 1 - 2^-46: see wd_trap_pair


def wd_trap_pair(rng, n):
    """Params and first gradients such that grad.add(param, alpha=WD_TRAP) is a halfway trap.

    param = ±(1 + 2^-23) * 2^e makes param*wd = ±(1 - 2^-46) * 2^(e-7), just under half an ulp of a
    gradient with ulp 2^(e-6) and an odd mantissa: the double sum is the midpoint, ties-to-even
    rounds away, the FMA does not.
    """
    e = rng.integers(-30, -14, n)
    params = f32(np.where(rng.random(n) < 0.5, -1.0, 1.0) * (1 + 2.0 ** -23) * np.exp2(e))
    mantissa = (rng.integers(2 ** 22, 2 ** 23, n) * 2 + 1).astype(np.float64)
    grads = f32(np.where(rng.random(n) < 0.5, -1.0, 1.0) * mantissa * np.exp2(e - 6))  # ulp 2^(e-6)
    return params, grads


# ---------------------------------------------------------------- scenarios

def hp(lr=0.01, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, maximize=False):
    return dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, maximize=maximize)


def P(size, init='normal', grads='normal', scale=1.0, first=1, skip=0, plant=0, state=None, wd_trap=False):
    """A parameter: init values, gradient kind and scale, first step with a gradient, skip every
    `skip`-th step after that (0: never), `plant` halfway traps per step, optional loaded state."""
    return dict(size=size, init=init, grads=grads, scale=scale, first=first, skip=skip, plant=plant,
                state=state, wd_trap=wd_trap)


def scenarios(quick):
    steps = (lambda n: min(n, 40)) if quick else (lambda n: n)
    stall_eta = float(np.float32(0.01 / math.pow(1 + 1e-4 * 0.01 * 16777214.0, 0.75)))
    return [
        dict(name='defaults', steps=steps(210), description='default hyperparameters, sizes around the SIMD widths',
             groups=[dict(hyper=hp(), params=[P(1), P(7), P(16), P(33, grads='mixed'), P(1000, plant=4)])]),
        dict(name='weight-decay', steps=steps(220), description='weight decay, larger lr',
             groups=[dict(hyper=hp(lr=0.05, weight_decay=1e-2), params=[P(7), P(33, grads='mixed'), P(100)])]),
        dict(name='maximize', steps=steps(200), description='maximize with weight decay and averaging',
             groups=[dict(hyper=hp(weight_decay=1e-3, t0=20, maximize=True), params=[P(16), P(33)]),
                     dict(hyper=hp(lr=0.03, maximize=True), params=[P(21, plant=2)])]),
        dict(name='t0-3', steps=steps(220), description='t0=3: averaging from step 5 on (ax differs from step 6)',
             groups=[dict(hyper=hp(t0=3, weight_decay=1e-4), params=[P(1), P(7), P(33, grads='mixed'), P(64)]),
                     dict(hyper=hp(t0=3), params=[P(40, plant=3)])]),
        dict(name='t0-50', steps=steps(220), description='t0=50, lambd=1e-2, alpha=0.5',
             groups=[dict(hyper=hp(lr=0.02, lambd=1e-2, alpha=0.5, t0=50), params=[P(17, plant=2), P(100, grads='mixed')])]),
        dict(name='hyper-sweep', steps=steps(200), description='large lr and lambd, decay factor 1, 0 and negative, alpha 0.25..2',
             groups=[dict(hyper=hp(lr=1.0, lambd=1.0, alpha=1.0, t0=0), params=[P(19, scale=0.1)]),
                     dict(hyper=hp(lr=0.5, lambd=0.0, t0=10), params=[P(19, scale=0.1)]),
                     dict(hyper=hp(lr=2.0, lambd=0.75, alpha=0.25, t0=5, weight_decay=0.5), params=[P(19, scale=0.1)]),
                     dict(hyper=hp(lr=0.1, lambd=10.0, alpha=2.0, t0=100), params=[P(19)]),
                     dict(hyper=hp(lr=1e-3, lambd=1e-4, t0=1, weight_decay=1e-5), params=[P(19, grads='mixed')]),
                     dict(hyper=hp(lr=3.0, weight_decay=0.1), params=[P(19, scale=0.01)]),
                     dict(hyper=hp(lr=0.0, t0=2), params=[P(19)])]),
        dict(name='two-groups', steps=steps(220), description='two param groups with different hyperparameters',
             groups=[dict(hyper=hp(), params=[P(5), P(40, plant=2)]),
                     dict(hyper=hp(lr=0.1, lambd=1e-3, alpha=0.6, t0=10, weight_decay=1e-2, maximize=True), params=[P(33), P(9, grads='mixed')])]),
        dict(name='sparse-grads', steps=steps(200), description='parameters without a gradient on some steps; weight-decay halfway traps at first steps',
             groups=[dict(hyper=hp(t0=10, weight_decay=WD_TRAP), params=[
                         P(12), P(33, first=5, skip=3), P(24, first=1, wd_trap=True), P(17, first=min(40, steps(40) - 2), skip=4, wd_trap=True)]),
                     dict(hyper=hp(t0=10), params=[P(8, first=3, skip=2, plant=1), P(3, first=10**9)])]),
        dict(name='step-stall', steps=steps(40), description='state loaded at step 16777214: the float32 counter stalls at 2**24',
             groups=[dict(hyper=hp(t0=16777200), params=[
                 P(7, state=dict(step=16777214.0, eta=stall_eta, mu=float(np.float32(1 / 14)))),
                 P(33, state=dict(step=16777214.0, eta=stall_eta, mu=float(np.float32(1 / 14))), plant=1)])]),
        dict(name='tiny-and-subnormal', steps=steps(220), description='mixed magnitudes with subnormal params and grads, small lr',
             groups=[dict(hyper=hp(lr=1e-3, t0=3), params=[P(64, init='mixed', grads='mixed', plant=4), P(33, init='mixed', grads='mixed')]),
                     dict(hyper=hp(lr=1e-5, t0=1e6), params=[P(32, init='subnormal-top', grads='mixed', plant=6)]),
                     dict(hyper=hp(lr=1e-3, weight_decay=1e-4, t0=3), params=[P(33, init='mixed', grads='mixed')])]),
    ]


def initial_values(rng, spec):
    n = spec['size']
    if spec['init'] == 'mixed':
        return mixed_values(rng, n)
    if spec['init'] == 'subnormal-top':  # subnormals in the top binades, where halfway traps can exist
        return f32(np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.integers(2 ** 21, 2 ** 23, n) * 2.0 ** -149)
    return normal_values(rng, n, 0.5)


def gradient_values(rng, spec):
    if spec['grads'] == 'mixed':
        return mixed_values(rng, spec['size'])
    return normal_values(rng, spec['size'], spec['scale'])


def has_gradient(spec, k):
    if k < spec['first']:
        return False
    return spec['skip'] == 0 or (k - spec['first']) % spec['skip'] != spec['skip'] - 1


def checkpoint_steps(steps):
    return sorted({s for s in (1, 2, 3, 5, 6, 10, 50, 100, steps) if s <= steps})


def run_scenario(sc, rng, plant_enabled, out_dir):
    specs = [p for g in sc['groups'] for p in g['params']]
    blob = bytearray()
    sections = {}

    def section(name, array, dtype):
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        sections[name] = dict(offset=len(blob), bytes=len(data))
        blob.extend(data)

    params = []
    trap_grads = {}
    for j, spec in enumerate(specs):
        values = initial_values(rng, spec)
        if spec['wd_trap']:
            values, trap_grads[j] = wd_trap_pair(rng, spec['size'])
        params.append(torch.nn.Parameter(torch.from_numpy(values.copy())))
    section('initialParams', np.concatenate([p.detach().numpy() for p in params]), np.float32)

    groups = []
    index = 0
    for g in sc['groups']:
        h = g['hyper']
        groups.append(dict(params=params[index:index + len(g['params'])], lr=h['lr'], lambd=h['lambd'],
                           alpha=h['alpha'], t0=h['t0'], weight_decay=h['weight_decay'], maximize=h['maximize']))
        index += len(g['params'])
    opt = torch.optim.ASGD(groups)

    loaded = {j: s['state'] for j, s in enumerate(specs) if s['state']}
    if loaded:
        sd = opt.state_dict()
        axes = []
        for j, st in loaded.items():
            ax = normal_values(rng, specs[j]['size'], 0.5)
            axes.append(ax)
            sd['state'][j] = dict(step=torch.tensor(st['step'], dtype=torch.float32), eta=torch.tensor(st['eta']),
                                  mu=torch.tensor(st['mu']), ax=torch.from_numpy(ax.copy()))
        opt.load_state_dict(sd)
        section('initialAx', np.concatenate(axes), np.float32)

    steps = sc['steps']
    checkpoints = checkpoint_steps(steps)
    grads_out, trace, ckpt = [], [], []
    traps = 0
    group_of = [gi for gi, g in enumerate(sc['groups']) for _ in g['params']]
    for k in range(1, steps + 1):
        planted = []  # (param index, element, g, b, c)
        for j, (spec, p) in enumerate(zip(specs, params)):
            if not has_gradient(spec, k):
                p.grad = None
                continue
            h = sc['groups'][group_of[j]]['hyper']
            first_step = k == spec['first']
            g = trap_grads[j] if (spec['wd_trap'] and first_step) else gradient_values(rng, spec)
            if plant_enabled and spec['plant'] and h['weight_decay'] == 0:
                state = opt.state[p]
                eta = float(state['eta']) if len(state) else float(np.float32(h['lr']))
                decay = np.float32(1 - h['lambd'] * eta)
                decayed = (p.detach().numpy() * decay).astype(np.float32)
                b = -eta
                solutions = halfway_multiplicands(b) if b != 0 else []
                for i in rng.choice(spec['size'], size=min(spec['plant'], spec['size']), replace=False):
                    c = float(decayed[i])
                    value = plant_halfway(c, b, solutions, rng)
                    if value is not None:
                        g[i] = -value if h['maximize'] else value
                        planted.append((j, int(i), value, b, c))
            p.grad = torch.from_numpy(np.array(g, dtype=np.float32))
            grads_out.append(np.array(g, dtype=np.float32))
        opt.step()
        for j, i, value, b, c in planted:
            got = float(params[j].detach()[i])
            if FMA and got != exact_fma(value, b, c):
                raise SystemExit(f'{sc["name"]} step {k}: torch gave {got!r}, exact FMA {exact_fma(value, b, c)!r}')
            if got != naive_fma(value, b, c):
                traps += 1
        for j, p in enumerate(params):
            values = p.detach().numpy()
            if not np.all(np.isfinite(values)):
                raise SystemExit(f'{sc["name"]}: non-finite values at step {k}; pick other hyperparameters')
            state = opt.state[p]
            if len(state):
                ax = state['ax'].numpy()
                scalars = np.array([float(state['step']), float(state['eta']), float(state['mu'])], dtype=np.float32)
            else:
                ax = np.zeros(spec_size(specs, j), dtype=np.float32)
                scalars = np.zeros(3, dtype=np.float32)
            trace.append(np.array([*tensor_hashes(values), *tensor_hashes(ax)], dtype=np.uint32).view(np.float32))
            trace.append(scalars)
        if k in checkpoints:
            for p in params:
                ckpt.append(p.detach().numpy().copy())
            for j, p in enumerate(params):
                state = opt.state[p]
                ckpt.append(state['ax'].numpy().copy() if len(state) else np.zeros(spec_size(specs, j), dtype=np.float32))

    section('grads', np.concatenate(grads_out) if grads_out else np.zeros(0), np.float32)
    section('trace', np.concatenate(trace), np.float32)
    section('checkpoints', np.concatenate(ckpt), np.float32)

    file = f'{sc["name"]}.bin'
    with open(os.path.join(out_dir, file), 'wb') as fh:
        fh.write(bytes(blob))
    manifest_groups = []
    index = 0
    for g in sc['groups']:
        h = g['hyper']
        manifest_groups.append(dict(lr=h['lr'], lambd=h['lambd'], alpha=h['alpha'], t0=h['t0'],
                                    weightDecay=h['weight_decay'], maximize=h['maximize'],
                                    params=list(range(index, index + len(g['params'])))))
        index += len(g['params'])
    return dict(
        name=sc['name'], description=sc['description'], steps=steps, file=file, sections=sections,
        groups=manifest_groups,
        params=[dict(size=s['size'], firstGradStep=s['first'], skipEvery=s['skip'],
                     loadedState=s['state']) for s in specs],
        checkpointSteps=checkpoints, halfwayTraps=traps,
    )


def spec_size(specs, j):
    return specs[j]['size']


# ---------------------------------------------------------------- direct checks of the primitives

def fma_cases(rng, count, out_dir):
    """Triples (a, b, c) and torch's c.add(a, alpha=b) on a 19-element tensor (vector body and scalar
    tail): adversarial halfway cases with normal and subnormal results, and random bit patterns."""
    triples = []
    while len(triples) < count // 3:  # halfway, normal results
        b = float(np.float32(rng.uniform(1, 2) * 2.0 ** int(rng.integers(-40, 0))))
        sols = halfway_multiplicands(b)
        c = float(np.float32(rng.uniform(1, 2) * 2.0 ** int(rng.integers(-60, 20))))
        g = plant_halfway(c, b, sols, rng)
        if g is not None:
            triples.append((g, b, c))
    while len(triples) < 2 * (count // 3):  # halfway, subnormal results: c in the top subnormal binade
        b = float(np.float32(rng.uniform(1, 2) * 2.0 ** -int(rng.integers(8, 12))))
        c = float(rng.integers(2 ** 22, 2 ** 23 - 2 ** 20)) * 2.0 ** -149
        a = plant_halfway(c, b, halfway_multiplicands(b), rng)
        if a is not None:
            triples.append((a, b, c))
    while len(triples) < count:
        a, b, c = (float(x) for x in rng.integers(0, 2 ** 32, 3, dtype=np.uint64).astype(np.uint32).view(np.float32))
        if all(math.isfinite(x) for x in (a, b, c)) and math.isfinite(a * b + c) and abs(a * b + c) < 3e38:
            triples.append((a, b, c))
    rows = []
    for a, b, c in triples:
        at = torch.full((19,), a, dtype=torch.float32)
        ct = torch.full((19,), c, dtype=torch.float32)
        r = torch.add(ct, at, alpha=b).numpy()
        if not np.all(r.view(np.uint32) == r.view(np.uint32)[0]):
            raise SystemExit('vector body and scalar tail of add() disagree')
        rows.append((a, b, c, float(r[0])))
    data = np.array(rows, dtype=np.float32)
    with open(os.path.join(out_dir, 'fma-cases.bin'), 'wb') as fh:
        fh.write(data.tobytes())
    traps = sum(1 for a, b, c, r in rows if naive_fma(a, b, c) != r)
    return dict(file='fma-cases.bin', count=len(rows), halfwayTraps=traps,
                description='rows of float32 a, b, c, torch.add(c, a, alpha=b)')


def eta_table(rng, count, out_dir):
    """eta and mu exactly as asgd.py computes them, for random hyperparameters and steps."""
    # math.exp, not np.exp: numpy's SIMD exp differs in the last bit between CPUs (AVX2 vs AVX-512), which
    # made the committed table irreproducible on another machine. libm's exp is the same everywhere here.
    exp = np.vectorize(math.exp, otypes=[np.float64])
    lr = exp(rng.uniform(math.log(1e-5), math.log(10), count))
    lambd = np.where(rng.random(count) < 0.1, 0.0, exp(rng.uniform(math.log(1e-6), math.log(10), count)))
    alpha = np.where(rng.random(count) < 0.2, 0.75, rng.uniform(0, 2, count))
    t0 = np.where(rng.random(count) < 0.5, 1e6, np.floor(rng.uniform(0, 1000, count)))
    step = f32(np.where(rng.random(count) < 0.7, rng.integers(1, 2000, count), rng.integers(1, 2 ** 24 + 1, count)))
    # A negative alpha in a fifth of the rows (torch takes it: eta grows with the step; the power stays far
    # from 0 here), drawn after the others so that the other rows stay what they were.
    alpha = np.where(rng.random(count) < 0.2, rng.uniform(-2, 0, count), alpha)
    eta = np.zeros(count, dtype=np.float32)
    mu = np.zeros(count, dtype=np.float32)
    for i in range(count):
        s = float(step[i])
        eta[i] = torch.tensor(float(lr[i]) / math.pow((1 + float(lambd[i]) * float(lr[i]) * s), float(alpha[i]))).item()
        mu[i] = torch.tensor(1 / max(1, s - float(t0[i]))).item()
    doubles = np.stack([lr, lambd, alpha, t0], axis=1).astype('<f8')
    floats = np.stack([step, eta, mu], axis=1).astype('<f4')
    with open(os.path.join(out_dir, 'eta-table.bin'), 'wb') as fh:
        fh.write(doubles.tobytes())
        fh.write(floats.tobytes())
    return dict(file='eta-table.bin', count=count,
                description='count rows of float64 lr, lambd, alpha, t0; then count rows of float32 step, eta, mu')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', '..', 'test', 'fixtures', 'golden'))
    parser.add_argument('--seed', type=int, default=20240613)
    parser.add_argument('--quick', action='store_true', help='at most 40 steps, fewer table rows (for live tests)')
    parser.add_argument('--only', default='', help='comma-separated scenario names')
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    only = set(filter(None, args.only.split(',')))
    manifest = dict(
        formatVersion=FORMAT_VERSION, torch=torch.__version__, cpuCapability=cpu_capability(), fma=FMA,
        seed=args.seed, quick=args.quick, generator='scripts/golden/generate.py',
        hash='per tensor: h1 = sum(u[i] * (((2i+1) * 0x9E3779B1) | 1)), h2 = sum((u[i] ^ (u[i] >> 15)) * '
             '(((i * 0x85EBCA77) ^ 0xC2B2AE3D) | 1)), mod 2^32, u = float32 bit patterns',
        trace='per step, per param: uint32 h1(param), h2(param), h1(ax), h2(ax); float32 step, eta, mu '
              '(zeros while a param has no state)',
        checkpoints='at each checkpoint step: every param, then every ax (zeros while no state)',
        scenarios=[],
    )
    for sc in scenarios(args.quick):
        if only and sc['name'] not in only:
            continue
        manifest['scenarios'].append(run_scenario(sc, np.random.default_rng([args.seed, len(manifest['scenarios'])]), FMA, args.out))
    if not only:
        manifest['fmaCases'] = fma_cases(np.random.default_rng([args.seed, 1000]), 90 if args.quick else 450, args.out)
        manifest['etaTable'] = eta_table(np.random.default_rng([args.seed, 1001]), 500 if args.quick else 4000, args.out)
    with open(os.path.join(args.out, 'manifest.json'), 'w') as fh:
        json.dump(manifest, fh, indent=1)
        fh.write('\n')
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f'wrote {args.out}: {len(manifest["scenarios"])} scenarios, {total} bytes, torch {torch.__version__}, '
          f'capability {manifest["cpuCapability"]}, traps {[s["halfwayTraps"] for s in manifest["scenarios"]]}')


FMA = cpu_capability() not in ('NO AVX', 'DEFAULT', 'unknown')

if __name__ == '__main__':
    sys.exit(main())
