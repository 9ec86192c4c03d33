"""The processes of bench/training.ts (run with a Python that has torch; the client comes from this checkout).

    training_worker.py local  --steps N [--pause-ms P]         one local torch.optim.ASGD process (sleeping P ms
                                                               after each step: a loop that waits, as a remote
                                                               worker waits for its answers)
    training_worker.py remote --url U --session S --rank R --workers W --steps N
                                                               one of W workers, RemoteASGD(pipeline=True);
                                                               prints "ready", starts at a line on stdin
    training_worker.py percall --url U --numel 1000000 --steps K
                                                               ms per optimizer step, remote and local

Each prints one JSON line. Times are measured inside the process around the training loop only (not
Python's start, the torch import or the session's creation), with time.time() so that the loops of
several processes can be laid on one clock. "compute" is the CPU time (time.process_time) the loop spent in
forward and backward: the same work in every mode, so it shows what waiting does to the CPU; a remote
worker's "cpu" is the CPU time of its whole loop (forward, backward and the client's work). The model is an MLP 64-128-10 (9,610 parameters) on
synthetic data made here: inputs N(0, 1), labels from a fixed random linear teacher.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)
HYPER = dict(lr=0.05, lambd=1e-4, alpha=0.75, t0=200.0, weight_decay=1e-4)
BATCH = 32


def data(n=4096, seed=7):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 64, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    return X, (X @ teacher).argmax(dim=1)


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(m, opt, X, y, steps, rank=0, workers=1, pause=0.0):
    """``steps`` steps on this worker's shard (rows rank, rank + workers, ...), sleeping ``pause`` seconds
    after each; returns the last loss and the CPU seconds of the forward and backward passes."""
    Xs, ys = X[rank::workers], y[rank::workers]
    n = Xs.shape[0] // BATCH
    loss = None
    compute = 0.0
    for i in range(steps):
        k = (i % n) * BATCH
        opt.zero_grad()
        t = time.process_time()
        loss = nn.functional.cross_entropy(m(Xs[k : k + BATCH]), ys[k : k + BATCH])
        loss.backward()
        compute += time.process_time() - t
        opt.step()
        if pause:
            time.sleep(pause)
    return (float(loss.item()) if loss is not None else None), compute


def local(args):
    X, y = data()
    m = model()
    opt = torch.optim.ASGD(m.parameters(), **HYPER)
    start = time.time()
    loss, compute = train(m, opt, X, y, args.steps, pause=args.pause_ms / 1000)
    print(json.dumps({"start": start, "end": time.time(), "loss": loss, "compute": compute, "numel": sum(p.numel() for p in m.parameters())}))


def remote(args):
    from asgd_client import RemoteASGD

    X, y = data()
    m = model()
    opt = RemoteASGD(m.named_parameters(), url=args.url, session=args.session, pipeline=True, **HYPER)
    print("ready", flush=True)  # the workers' loops start together, when the bench says so
    sys.stdin.readline()
    start = time.time()
    cpu = time.process_time()
    loss, compute = train(m, opt, X, y, args.steps, args.rank, args.workers)
    opt.synchronize()
    end = time.time()
    cpu = time.process_time() - cpu
    print(json.dumps({"start": start, "end": end, "loss": loss, "compute": compute, "cpu": cpu, "stale_dropped": opt.stale_dropped,
                      "last_staleness": (opt.last_step or {}).get("staleness"), "version": opt.version}))
    opt.close()


def percall(args):
    """Seconds per optimizer step on a flat model of ``numel`` parameters: remote (one request, blocking)
    and local torch.optim.ASGD, interleaved in rounds; medians."""
    from asgd_client import RemoteASGD

    p_remote = nn.Parameter(torch.randn(args.numel))
    p_local = nn.Parameter(p_remote.detach().clone())
    opt = RemoteASGD([("w", p_remote)], url=args.url, session=args.session, **HYPER)
    ref = torch.optim.ASGD([p_local], **HYPER)
    grad = torch.randn(args.numel) * 1e-3
    remote_times, local_times = [], []
    for _ in range(args.steps):
        p_remote.grad = grad
        t = time.perf_counter()
        opt.step()
        remote_times.append(time.perf_counter() - t)
        p_local.grad = grad
        t = time.perf_counter()
        ref.step()
        local_times.append(time.perf_counter() - t)
    if not torch.equal(p_remote, p_local):
        raise SystemExit("remote and local parameters differ")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    print(json.dumps({"remote": med(remote_times[1:]), "local": med(local_times[1:])}))
    opt.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["local", "remote", "percall"])
    parser.add_argument("--url")
    parser.add_argument("--session")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--pause-ms", type=float, default=0.0)
    args = parser.parse_args()
    {"local": local, "remote": remote, "percall": percall}[args.mode](args)


if __name__ == "__main__":
    main()
