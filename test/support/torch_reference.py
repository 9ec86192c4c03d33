"""Runs torch.optim.ASGD (PyTorch's CPU single-tensor path, one thread) on a JSON scenario read from
stdin and prints the resulting parameters and state_dict as float32 bit patterns (hex), so that tests can
compare the service's answers bit for bit with PyTorch's.

Input: {"params": [{"name", "shape", "data"}], "defaults": {hyper}, "groups": [{"params": [names], ...}] | null,
        "steps": [{name: flat grad list | null}], "state_dict": optional state_dict JSON to load first,
        "step_hyper": optional, per step null or [per group {key: value} | null]: set on the groups before
        that step, as an LR scheduler does}
       A step may instead be a list of contributions [{name: flat grad list | null}] in worker order (a round
       of a session with aggregation): each parameter's gradient is the documented mean of the contributions
       that carry it, s = g[0].clone(); s += g for the rest; s /= n (float32), or None when none does.
Output: {"params": {name: [hex]}, "state": {index: {"step", "eta", "mu": hex, "ax": [hex]}}, "param_groups": [...]}
"""
import json
import struct
import sys

import torch

torch.set_num_threads(1)


def hexbits(t):
    return [format(x, "08x") for x in struct.unpack("<%dI" % t.numel(), t.detach().contiguous().numpy().astype("<f4").tobytes())]


def round_mean(grads, shape):
    carried = [torch.tensor(g, dtype=torch.float32).reshape(shape) for g in grads if g is not None]
    if not carried:
        return None
    s = carried[0].clone()
    for g in carried[1:]:
        s += g
    s /= len(carried)
    return s


def main():
    spec = json.load(sys.stdin)
    tensors = {}
    for p in spec["params"]:
        tensors[p["name"]] = torch.tensor(p["data"], dtype=torch.float32).reshape(p["shape"]).requires_grad_()
    defaults = spec.get("defaults") or {}
    if spec.get("groups"):
        groups = []
        for g in spec["groups"]:
            g = dict(g)
            g["params"] = [tensors[n] for n in g["params"]]
            groups.append(g)
    else:
        groups = [{"params": list(tensors.values())}]
    opt = torch.optim.ASGD(groups, **defaults)
    if spec.get("state_dict") is not None:
        sd = spec["state_dict"]
        state = {}
        for k, v in sd["state"].items():
            state[int(k)] = {
                "step": torch.tensor(v["step"], dtype=torch.float32),
                "eta": torch.tensor(v["eta"], dtype=torch.float32),
                "mu": torch.tensor(v["mu"], dtype=torch.float32),
                "ax": torch.tensor(v["ax"]["data"], dtype=torch.float32).reshape(v["ax"]["shape"]),
            }
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    step_hyper = spec.get("step_hyper") or []
    for k, step in enumerate(spec["steps"]):
        hyper = step_hyper[k] if k < len(step_hyper) else None
        for group, values in zip(opt.param_groups, hyper or []):
            group.update(values or {})
        for name, t in tensors.items():
            if isinstance(step, list):
                t.grad = round_mean([c.get(name) for c in step], t.shape)
                continue
            g = step.get(name)
            t.grad = None if g is None else torch.tensor(g, dtype=torch.float32).reshape(t.shape)
        opt.step()
    out_state = {}
    sd = opt.state_dict()
    for k, v in sd["state"].items():
        out_state[str(k)] = {
            "step": hexbits(v["step"].reshape(1))[0],
            "eta": hexbits(torch.as_tensor(v["eta"], dtype=torch.float32).reshape(1))[0],
            "mu": hexbits(torch.as_tensor(v["mu"], dtype=torch.float32).reshape(1))[0],
            "ax": hexbits(v["ax"]),
        }
    json.dump({
        "torch": torch.__version__,
        "params": {n: hexbits(t) for n, t in tensors.items()},
        "averaged": {n: hexbits(opt.state[t]["ax"]) if t in opt.state else hexbits(t) for n, t in tensors.items()},
        "state": out_state,
        "param_groups": sd["param_groups"],
    }, sys.stdout)


main()
