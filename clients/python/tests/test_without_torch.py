"""The plain Client is standard library only: without torch, a step that returns the parameters answers
them as {"shape", "data"} dicts, as get_params does. It raised ModuleNotFoundError after the step had been
committed, so a retry stepped twice (found by a review of the README as a new user)."""

import json
import os
import subprocess
import sys
import unittest

from _common import ServiceTestCase, unique

# Run in a fresh interpreter in which `import torch` fails, as on a machine without torch.
SCRIPT = r"""
import json, sys
sys.modules["torch"] = None
from asgd_client import Client
url, token, name = sys.argv[1:4]
c = Client(url, token=token or None)
c.create_session(name, [{"name": "w", "shape": [2], "data": [1.0, 2.0]}], hyperparameters={"lr": 0.5, "lambd": 0.0})
out = {}
for transport in ("safetensors", "json"):
    c = Client(url, token=token or None, transport=transport)
    answer = c.step(name, {"w": ((2,), [0.5, -0.5])}, returns="params")
    out[transport] = {"version": answer["version"], "params": answer["params"]}
params, version = c.get_params(name)
out["get_params"] = {"version": version, "params": params}
print(json.dumps(out))
"""


class WithoutTorch(ServiceTestCase):
    def test_step_with_returns_params_answers_plain_tensors(self):
        name = unique("no-torch")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")] if p)}
        run = subprocess.run([sys.executable, "-c", SCRIPT, self.url, self.token or "", name], capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(run.returncode, 0, run.stderr)
        out = json.loads(run.stdout)
        # w -= 0.5 * g each step (lr 0.5, lambd 0: eta stays lr): [1, 2] -> [0.75, 2.25] -> [0.5, 2.5]
        self.assertEqual(out["safetensors"], {"version": 2, "params": {"w": {"shape": [2], "data": [0.75, 2.25]}}})
        self.assertEqual(out["json"]["version"], 3)
        self.assertEqual(out["json"]["params"]["w"]["data"], [0.5, 2.5])
        self.assertEqual(out["get_params"], {"version": 3, "params": {"w": {"shape": [2], "data": [0.5, 2.5]}}})


if __name__ == "__main__":
    unittest.main()
