"""An interrupt (KeyboardInterrupt, SystemExit, a signal handler's exception) between sending a request and
reading its whole answer: the connection is dropped (the next request never reads that answer as its own),
and an interrupted step is applied exactly once: the next call sends it again with its Idempotency-Key, and
a step() with the same gradients is its retry."""

import unittest
from unittest import mock

import torch
from torch import nn

from _common import STEPS, ServiceTestCase, batch, make_model, torch_run, train, unique


def gradients(model: nn.Module, i: int) -> None:
    """The gradients of batch i, without the optimizer's zero_grad (which would load a pipelined answer)."""
    for p in model.parameters():
        p.grad = None
    X, y = batch(i)
    nn.functional.mse_loss(model(X), y).backward()


class Interrupts(ServiceTestCase):
    def interrupt_next_answer(self, after_head: bool = False, exc: type = KeyboardInterrupt) -> None:
        """The next answer read over a plain http connection is interrupted once it has begun to arrive (so the
        service has answered: a step is committed), before (or, ``after_head``, inside) the read."""
        from asgd_client import http as h

        original = h._PlainConnection.receive
        armed = [True]

        def receive(conn, method):
            if armed[0]:
                armed[0] = False
                conn.fp.peek(1)  # waits for the answer's first bytes
                if after_head:
                    conn._read_head(True)
                raise exc()
            return original(conn, method)

        patcher = mock.patch.object(h._PlainConnection, "receive", receive)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_an_interrupted_request_does_not_leave_its_answer_to_the_next(self):
        c = self.client()
        name = unique("intr-get")
        c.create_session(name, {"w": torch.arange(4.0)})
        self.addCleanup(c.delete_session, name, missing_ok=True)
        self.interrupt_next_answer()
        with self.assertRaises(KeyboardInterrupt):
            c.get_params(name)
        self.assertEqual(c.get_session(name)["name"], name)
        tensors, _ = c.get_params(name)
        self.assertTrue(torch.equal(tensors["w"], torch.arange(4.0)))

    def check_blocking(self, exc: type, after_head: bool) -> None:
        model, opt = self.three_steps_then_gradients()
        self.interrupt_next_answer(after_head=after_head, exc=exc)
        with self.assertRaises(exc):
            opt.step()
        # The next call reads its own answer; the interrupted step is completed (applied once) first.
        ref4, ref4_opt = torch_run(4)
        self.assertStateDictEqual(opt.state_dict(), ref4_opt.state_dict())
        self.assertParamsIdentical(model, ref4)
        # step() again with the same gradients is the retry of the interrupted step: not applied twice.
        opt.step()
        self.assertEqual(opt.client.get_session(opt.session)["step"], 4)
        self.assertParamsIdentical(model, ref4)
        train(model, opt, range(4, 20))
        ref, ref_opt = torch_run(20)
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), ref_opt.state_dict())

    def test_a_step_interrupted_by_ctrl_c_is_applied_once_and_the_next_calls_read_their_answers(self):
        self.check_blocking(KeyboardInterrupt, after_head=False)

    def test_a_step_interrupted_inside_its_answer_by_systemexit(self):
        self.check_blocking(SystemExit, after_head=True)

    def test_retrying_the_interrupted_step_at_once(self):
        model, opt = self.three_steps_then_gradients()
        self.interrupt_next_answer()
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        opt.step()  # the retry: sent again with its key, applied once
        ref4, _ = torch_run(4)
        self.assertParamsIdentical(model, ref4)
        train(model, opt, range(4, STEPS))
        ref, ref_opt = torch_run(STEPS)
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), ref_opt.state_dict())

    def test_a_pipelined_step_interrupted_while_it_reads_the_previous_answer(self):
        model, opt = self.three_steps_then_gradients(pipeline=True)
        self.interrupt_next_answer()
        with self.assertRaises(KeyboardInterrupt):
            opt.step()  # sends step 4, then reading step 3's answer is interrupted
        opt.state_dict()
        opt.step()  # the retry: step 4 is already sent, nothing more is
        for i in range(4, 10):
            gradients(model, i)
            opt.step()
        opt.synchronize()
        session = opt.client.get_session(opt.session)
        self.assertEqual(session["step"], 10, "each step() applied exactly once")
        tensors, version = opt.client.get_params(opt.session)
        self.assertEqual(opt.version, version)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(tensors[n], p.detach()), n)

    def test_a_pipelined_step_interrupted_before_it_was_sent_is_applied_before_the_next_one(self):
        # Found by a review: Ctrl-C while a big pipelined step was still being sent left it owed, and the next
        # step() sent its own gradients before sending the owed ones again: applied in the order 0, 1, 2, 4, 3.
        from asgd_client.optim import RemoteASGD

        model, opt = self.three_steps_then_gradients(tagged=True, pipeline=True)
        original = RemoteASGD._start
        armed = [True]

        def start(o, *a, **k):
            if armed[0]:
                armed[0] = False
                raise KeyboardInterrupt()  # nothing of this step has gone out
            return original(o, *a, **k)

        with mock.patch.object(RemoteASGD, "_start", start):
            with self.assertRaises(KeyboardInterrupt):
                opt.step(metrics={"i": 3})
            for i in range(4, 8):  # the loop goes on (no re-run of the interrupted step)
                gradients(model, i)
                opt.step(metrics={"i": i})
        opt.synchronize()
        points = opt.client.metrics(opt.session)["points"]
        self.assertEqual([p["values"]["i"] for p in points], list(range(8)), "each step applied once, in order")

    def three_steps_then_gradients(self, tagged: bool = False, **kw):
        """A model and its RemoteASGD after three steps, with the gradients of the fourth in place; ``tagged``:
        each step carries its number as the metric ``i``."""
        self.requireStepParams()
        model = make_model()
        opt = self.remote(model.named_parameters(), **kw)
        for i in range(3):
            gradients(model, i)
            opt.step(**({"metrics": {"i": i}} if tagged else {}))
        gradients(model, 3)
        return model, opt

    def interrupt_loads(self, *which: int) -> None:
        """Ctrl-C right after the model took the service's parameters, on the loads numbered ``which`` (1-based)."""
        from asgd_client.optim import RemoteASGD

        original = RemoteASGD._load_from_service
        count = [0]

        def load(opt, *a, **k):
            original(opt, *a, **k)
            count[0] += 1
            if count[0] in which:
                raise KeyboardInterrupt()

        patcher = mock.patch.object(RemoteASGD, "_load_from_service", load)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_ctrl_c_while_the_answer_is_loaded_then_the_cell_run_again_applies_the_step_once(self):
        # The step is committed and its parameters copied in when the interrupt comes: the re-run (same
        # gradients) is its retry; nothing more is sent.
        model, opt = self.three_steps_then_gradients()
        self.interrupt_loads(1)
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        opt.step()
        self.assertEqual(opt.client.get_session(opt.session)["step"], 4, "applied once")
        ref4, ref4_opt = torch_run(4)
        self.assertParamsIdentical(model, ref4)
        self.assertStateDictEqual(opt.state_dict(), ref4_opt.state_dict())

    def test_ctrl_c_again_while_the_retry_loads_the_owed_step_still_applies_it_once(self):
        # First the answer is lost (interrupted in its read: the step is owed); the re-run sends it again with
        # its key and is interrupted while loading that answer; the third run is still the same step's retry.
        model, opt = self.three_steps_then_gradients()
        self.interrupt_next_answer()
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        self.interrupt_loads(1)
        with self.assertRaises(KeyboardInterrupt):
            opt.step()
        opt.step()
        self.assertEqual(opt.client.get_session(opt.session)["step"], 4, "applied once")
        ref4, _ = torch_run(4)
        self.assertParamsIdentical(model, ref4)
        train(model, opt, range(4, 10))
        ref, ref_opt = torch_run(10)
        self.assertParamsIdentical(model, ref)
        self.assertStateDictEqual(opt.state_dict(), ref_opt.state_dict())

    def test_a_background_step_whose_connection_failed_is_sent_again_and_applied_once(self):
        # step(wait=False) sends on a background thread; there the answer is lost (the service has committed
        # the step) and, without retries, the request fails with its fate unknown. The next call raises that
        # error once, also when the Future gave it already (the step is owed); the one after sends the step
        # again with its Idempotency-Key: applied once, loaded.
        from asgd_client import ConnectionFailed

        model, opt = self.three_steps_then_gradients(retry_budget_s=0)
        self.interrupt_next_answer(exc=ConnectionResetError)
        answer = opt.step(wait=False)
        with self.assertRaises(ConnectionFailed):
            answer.result(timeout=30)
        with self.assertLogs("asgd_client", level="WARNING") as logs, self.assertRaises(ConnectionFailed):
            opt.synchronize()
        self.assertIn("sends it again with its Idempotency-Key", "\n".join(logs.output))
        opt.synchronize()
        self.assertEqual(opt.client.get_session(opt.session)["step"], 4, "the lost step applied once")
        ref4, ref4_opt = torch_run(4)
        self.assertParamsIdentical(model, ref4)
        self.assertStateDictEqual(opt.state_dict(), ref4_opt.state_dict())
        train(model, opt, range(4, 10))
        ref, _ = torch_run(10)
        self.assertParamsIdentical(model, ref)

    def test_a_background_step_whose_connection_failed_and_whose_future_nobody_read(self):
        # As above, the Future never read: the next call raises the error once, the one after sends the step
        # again with its Idempotency-Key (applied once).
        from asgd_client import ConnectionFailed

        model, opt = self.three_steps_then_gradients(retry_budget_s=0)
        self.interrupt_next_answer(exc=ConnectionResetError)
        opt.step(wait=False)
        with self.assertLogs("asgd_client", level="WARNING") as logs, self.assertRaises(ConnectionFailed):
            opt.synchronize()
        self.assertIn("sends it again with its Idempotency-Key", "\n".join(logs.output))
        opt.synchronize()
        self.assertEqual(opt.client.get_session(opt.session)["step"], 4, "the lost step applied once")
        ref4, _ = torch_run(4)
        self.assertParamsIdentical(model, ref4)


if __name__ == "__main__":
    unittest.main()
