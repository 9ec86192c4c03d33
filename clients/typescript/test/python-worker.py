"""A Python worker for test/two-workers.test.ts: plain HTTP (urllib) and torch autograd. For each line
"step" on stdin it reads the session's parameters, computes the gradient of its own batch's MSE loss,
posts it as one step (with base_version), and prints {"version", "grads"} as one JSON line."""
import json
import sys
import urllib.request

import torch

torch.set_num_threads(1)
url, session, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
gen = torch.Generator().manual_seed(seed)
x = torch.rand(32, 4, generator=gen) * 2 - 1
y = x @ torch.tensor([[0.7], [-1.3], [0.4], [0.1]]) + 0.2


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as res:
        return json.load(res)


for line in sys.stdin:
    if line.strip() != "step":
        continue
    current = call("GET", f"/v1/sessions/{session}/params")
    w = torch.tensor(current["params"]["w"]["data"], dtype=torch.float32).reshape(4, 1).requires_grad_()
    b = torch.tensor(current["params"]["b"]["data"], dtype=torch.float32).reshape(1).requires_grad_()
    loss = ((x @ w + b - y) ** 2).mean()
    loss.backward()
    grads = {"w": w.grad.reshape(-1).tolist(), "b": b.grad.reshape(-1).tolist()}
    answer = call("POST", f"/v1/sessions/{session}/step", {"grads": grads, "base_version": current["version"], "metrics": {"loss": loss.item()}})
    print(json.dumps({"version": answer["version"], "grads": grads}), flush=True)
