"""A session restored to a snapshot (or given a state_dict or checkpoint) while a worker trains on it: the
worker's next gradient was computed on parameters the restore threw away. It is refused as stale (409
STALE_GRADIENT naming the version that replaced the state), dropped, and the worker loads the restored
parameters and trains on from them: the gradient of a model that diverged (the usual reason to roll back)
never lands on the state rolled back to (found by a PyTorch user's review: it was applied, as staleness 1)."""

import unittest

import torch

from _common import ServiceTestCase, make_model, train


class RestoredUnderAWorker(ServiceTestCase):
    def _run(self, pipeline):
        model = make_model()
        opt = self.remote(model.named_parameters(), pipeline=pipeline)
        self.addCleanup(opt.close)
        client = self.client()
        train(model, opt, range(3))
        opt.synchronize()
        snap = client.snapshot(opt.session)
        train(model, opt, range(3, 6))
        opt.synchronize()
        restored = client.restore_snapshot(opt.session, snap["id"])
        want, at = client.get_params(opt.session)
        self.assertEqual(at, restored["version"])
        with self.assertLogs("asgd_client", "WARNING") as logs:
            train(model, opt, range(6, 7))  # its gradient comes from the model of versions before the restore
            opt.synchronize()
        self.assertEqual(opt.stale_dropped, 1)
        self.assertTrue(any(f"replaced at version {restored['version']}" in line for line in logs.output), logs.output)
        session = client.get_session(opt.session)
        self.assertEqual((session["version"], session["step"]), (restored["version"], restored["step"]), "nothing of the dropped gradient was applied")
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(p.detach(), want[n]), f"{n}: the worker holds the restored parameters")
        self.assertEqual(opt.version, restored["version"])
        # Training goes on from the restored state: the next gradients are computed on it and applied.
        train(model, opt, range(7, 9))
        opt.synchronize()
        self.assertEqual(opt.stale_dropped, 1)
        self.assertEqual(client.get_session(opt.session)["step"], restored["step"] + 2)
        got, _ = client.get_params(opt.session)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(p.detach(), got[n]), n)

    def test_a_worker_goes_on_from_the_restored_state(self):
        self._run(pipeline=False)

    def test_a_pipelined_worker_goes_on_from_the_restored_state(self):
        self._run(pipeline=True)


if __name__ == "__main__":
    unittest.main()
