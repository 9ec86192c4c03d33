"""A session replaced under a running worker (deleted and created again, by another worker or by its
expire_after_idle_s; or its database restored from a backup) is at a lower version than the optimizer
held: every step was refused (409 BASE_VERSION_AHEAD: base_version newer than the session's version) and
the loop could not go on.
The gradient is now dropped, the session's parameters loaded, and training goes on from them (found by a
review of the JavaScript client, which had the same bug at attach; checked here for the Python one)."""

import unittest

import torch

from asgd_client import BaseVersionAhead, Client
from _common import ServiceTestCase, unique


class SessionReplaced(ServiceTestCase):
    def _run(self, pipeline, on_stale="pull"):
        name = unique("replaced")
        w = torch.nn.Parameter(torch.zeros(2))
        opt = self.remote([("w", w)], session=name, lr=0.1, pipeline=pipeline, on_stale=on_stale)
        loss = lambda: ((w - 1) ** 2).sum()  # noqa: E731
        for _ in range(5):
            opt.zero_grad()
            loss().backward()
            opt.step()
        opt.synchronize()
        self.assertEqual(opt.version, 6)
        client = Client(self.url, token=self.token)
        client.delete_session(name)
        client.create_session(name, {"w": torch.tensor([42.0, 43.0])}, hyperparameters={"lr": 0.1})
        return name, w, opt, loss, client

    def _goes_on(self, pipeline):
        name, w, opt, loss, client = self._run(pipeline)
        with self.assertLogs("asgd_client", "WARNING") as logs:
            for _ in range(3):
                opt.zero_grad()
                loss().backward()
                opt.step()
            opt.synchronize()
        self.assertTrue(any("below the 6 this optimizer held" in line for line in logs.output), logs.output)
        params, version = client.get_params(name)
        self.assertEqual(opt.version, version)
        self.assertTrue(torch.equal(w.detach(), params["w"]))
        self.assertGreaterEqual(version, 2, "training went on in the new session")
        self.assertLess(float(w[0]), 42.0, "stepped from the new session's parameters")
        opt.close()

    def test_blocking_steps_go_on_from_the_new_session(self):
        self._goes_on(pipeline=False)

    def test_pipelined_steps_go_on_from_the_new_session(self):
        self._goes_on(pipeline=True)

    def test_on_stale_raise_raises(self):
        _, w, opt, loss, _ = self._run(False, on_stale="raise")
        opt.zero_grad()
        loss().backward()
        with self.assertRaises(BaseVersionAhead) as ctx:
            opt.step()
        self.assertEqual((ctx.exception.status, ctx.exception.code, ctx.exception.version), (409, "BASE_VERSION_AHEAD", 1))
        self.assertIn("base_version: 6 is newer than the session's version 1", str(ctx.exception))
        opt.close()


if __name__ == "__main__":
    unittest.main()
