"""A session replaced under a running worker: deleted and created again (by another worker or by its
expire_after_idle_s), the new session continues the name's versions, and a gradient of the deleted one's is
of replaced state (409 STALE_GRADIENT with replaced_at; a review: it was applied to the new session as a
stale step once the new one had passed the old version). A database restored from an older backup is at a
lower version than the optimizer held (409 BASE_VERSION_AHEAD: every step was refused and the loop could not
go on, found by a review of the JavaScript client). Either way the gradient is dropped, the session's
parameters loaded, and training goes on from them."""

import unittest

import torch

from asgd_client import BaseVersionAhead, Client, StaleGradient
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

    def _goes_on(self, pipeline, restored=False):
        name, w, opt, loss, client = self._run(pipeline)
        if restored:
            # As after the database was restored from an older backup: the optimizer holds a version the
            # session never reached.
            opt._version = 60
        with self.assertLogs("asgd_client", "WARNING") as logs:
            for _ in range(3):
                opt.zero_grad()
                loss().backward()
                opt.step()
            opt.synchronize()
        said = "below the 60 this optimizer held" if restored else "before the session's state was replaced at version 7"
        self.assertTrue(any(said in line for line in logs.output), logs.output)
        params, version = client.get_params(name)
        self.assertEqual(opt.version, version)
        self.assertTrue(torch.equal(w.detach(), params["w"]))
        self.assertGreaterEqual(version, 8, "training went on in the new session, which continued the name's versions")
        self.assertLess(float(w[0]), 42.0, "stepped from the new session's parameters")
        opt.close()

    def test_blocking_steps_go_on_from_the_new_session(self):
        self._goes_on(pipeline=False)

    def test_pipelined_steps_go_on_from_the_new_session(self):
        self._goes_on(pipeline=True)

    def test_blocking_steps_go_on_after_a_restored_database(self):
        self._goes_on(pipeline=False, restored=True)

    def test_on_stale_raise_raises(self):
        _, w, opt, loss, _ = self._run(False, on_stale="raise")
        opt.zero_grad()
        loss().backward()
        with self.assertRaises(StaleGradient) as ctx:
            opt.step()
        self.assertEqual((ctx.exception.status, ctx.exception.code, ctx.exception.version, ctx.exception.body["replaced_at"]), (409, "STALE_GRADIENT", 7, 7))
        self.assertIn("the gradient was computed at version 6, before the session's state was replaced at version 7", str(ctx.exception))
        opt._version = 60  # a database restored from an older backup
        opt.zero_grad()
        loss().backward()
        with self.assertRaises(BaseVersionAhead) as ctx:
            opt.step()
        self.assertEqual((ctx.exception.status, ctx.exception.code, ctx.exception.version), (409, "BASE_VERSION_AHEAD", 7))
        self.assertIn("base_version: 60 is newer than the session's version 7", str(ctx.exception))
        opt.close()


if __name__ == "__main__":
    unittest.main()
