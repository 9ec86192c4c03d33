"""Synchronous rounds (issue 13) against the real service: three RemoteASGD workers, each on its own
service process when the tests run on PostgreSQL, train one model; every round's step is torch's ASGD
step on the documented mean of the three gradients, bit for bit. Also: a 202 pending followed with the
same Idempotency-Key, a duplicate contribution refused, and the aggregation setting changed by PATCH."""

import logging
import signal
import threading
import time

import torch
from torch import nn

from _common import HYPER, ServiceTestCase, StepCounter, batch, for_torch, make_model, unique

ROUNDS = 20
# Not in rank order, and "w10" sorts between "w1" and "w2" in byte order: the mean adds in that order.
WORKERS = ["w2", "w10", "w1"]
# One worker sends JSON, the others safetensors: one round takes both. (The service's safetensors step
# answer carries no `round` yet, so the round's record is checked on the JSON worker's answers.)
TRANSPORTS = ["safetensors", "json", "safetensors"]


def shard(round_: int, rank: int):
    return batch(round_ * len(WORKERS) + rank)


def gradients(model: nn.Module, X, y):
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(X), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def documented_mean(grads_by_worker):
    """The contract's formula: per parameter, in ascending byte order of the worker ids,
    s = g_1; s = fl32(s + g_k); mean = fl32(s / n) (all parameters carry a gradient here)."""
    order = sorted(grads_by_worker, key=lambda w: w.encode("ascii"))
    means = []
    for j in range(len(grads_by_worker[order[0]])):
        s = grads_by_worker[order[0]][j].clone()
        for w in order[1:]:
            s += grads_by_worker[w][j]
        s /= len(order)
        means.append(s)
    return means


def torch_rounds(rounds, shards):
    """(model, torch.optim.ASGD) after ``rounds`` steps, each on the documented mean of the gradients that
    ``shards(round)`` ({worker: (X, y)}) gives at that round's parameters."""
    model = make_model()
    opt = torch.optim.ASGD(for_torch(model.named_parameters()), **HYPER)
    for r in range(rounds):
        grads = {w: gradients(model, X, y) for w, (X, y) in shards(r).items()}
        for p, g in zip(model.parameters(), documented_mean(grads)):
            p.grad = g
        opt.step()
    return model, opt


class RoundsTestCase(ServiceTestCase):
    def requireRounds(self):
        """Fails (not skips) without the server side: a plain session must show ``aggregation``."""
        info = self.client().get_session(self.remote(make_model().named_parameters()).session)
        self.assertIn("aggregation", info, "the service's sessions have no aggregation (issue 13's server side absent)")

    def run_workers(self, targets):
        """Runs each target in a thread; fails with the first error (a worker that fails leaves the others
        waiting for their round, so each has a max_round_wait_s)."""
        errors = []

        def guarded(fn):
            try:
                fn()
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=guarded, args=(fn,), daemon=True) for fn in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        self.assertFalse(any(t.is_alive() for t in threads), "a worker did not finish")
        if errors:
            raise errors[0]


class ThreeWorkers(RoundsTestCase):
    def test_three_workers_step_as_torch_on_the_documented_mean(self):
        from asgd_client import RemoteASGD

        self.requireRounds()
        urls = self.srv.replicas(3) or [self.url] * 3
        name = unique("rounds-three")
        models = [make_model() for _ in WORKERS]
        opts = []
        for rank, worker in enumerate(WORKERS):
            opt = RemoteASGD(models[rank].named_parameters(), url=urls[rank], token=self.token, session=name, worker=worker,
                             aggregation={"contributions": 3}, max_round_wait_s=300, transport=TRANSPORTS[rank], **HYPER)
            self.addCleanup(opt.close)
            opts.append(opt)
        self.assertEqual(opts[0].aggregation["contributions"], 3)
        self.assertEqual([o.aggregation for o in opts[1:]], [opts[0].aggregation] * 2, "the joiners read it from the session")

        def train(rank):
            def loop():
                for r in range(ROUNDS):
                    X, y = shard(r, rank)
                    opts[rank].zero_grad()
                    nn.functional.mse_loss(models[rank](X), y).backward()
                    opts[rank].step(samples=len(X))
            return loop

        self.run_workers([train(rank) for rank in range(len(WORKERS))])

        want, torch_opt = torch_rounds(ROUNDS, lambda r: {w: shard(r, rank) for rank, w in enumerate(WORKERS)})
        for rank, worker in enumerate(WORKERS):
            self.assertParamsIdentical(models[rank], want, f"worker {worker} ({urls[rank]}):")
            self.assertEqual((opts[rank].version, opts[rank].step_count, opts[rank].last_step["staleness"]), (ROUNDS + 1, ROUNDS, 0))
        last = opts[TRANSPORTS.index("json")].last_step
        self.assertEqual(last["round"], {"version": ROUNDS, "contributions": 3, "samples": 48, "timed_out": False})
        info = opts[0].client.get_session(name)
        self.assertEqual((info["step"], info["version"], info["round"]), (ROUNDS, ROUNDS + 1, None))
        self.assertStateDictEqual(opts[0].state_dict(), torch_opt.state_dict())
        averaged = opts[1].named_averaged_parameters()
        for (pname, _), q in zip(models[0].named_parameters(), want.parameters()):
            self.assertTrue(torch.equal(averaged[pname], torch_opt.state[q]["ax"]), f"ax of {pname}")


class ClampedWeights(RoundsTestCase):
    def test_three_workers_clamping_their_weights_after_each_round_step_as_torch(self):
        """The weight-editing idiom (p.data.clamp_() after opt.step(), WGAN's clipping) in a round: each worker
        sends the same clamped parameters before its next contribution; the first makes a new version, the
        others change nothing (no version, so the contributions made at it stand). Before, each worker's
        PUT params voided the round the others had contributed to: gradients dropped, then a hang."""
        from asgd_client import RemoteASGD

        self.requireRounds()
        urls = self.srv.replicas(3) or [self.url] * 3
        name = unique("rounds-clamp")
        rounds, bound = 8, 0.3
        models = [make_model() for _ in WORKERS]
        opts = []
        for rank, worker in enumerate(WORKERS):
            opt = RemoteASGD(models[rank].named_parameters(), url=urls[rank], token=self.token, session=name, worker=worker,
                             aggregation={"contributions": 3}, max_round_wait_s=120, **HYPER)
            self.addCleanup(opt.close)
            opts.append(opt)

        def train(rank):
            def loop():
                for r in range(rounds):
                    X, y = shard(r, rank)
                    opts[rank].zero_grad()
                    nn.functional.mse_loss(models[rank](X), y).backward()
                    opts[rank].step()
                    for p in models[rank].parameters():
                        p.data.clamp_(-bound, bound)
                opts[rank].synchronize()
            return loop

        self.run_workers([train(rank) for rank in range(len(WORKERS))])

        want = make_model()
        torch_opt = torch.optim.ASGD(for_torch(want.named_parameters()), **HYPER)
        for r in range(rounds):
            grads = {w: gradients(want, *shard(r, rank)) for rank, w in enumerate(WORKERS)}
            for p, g in zip(want.parameters(), documented_mean(grads)):
                p.grad = g
            torch_opt.step()
            with torch.no_grad():
                for p in want.parameters():
                    p.clamp_(-bound, bound)
        self.assertTrue(any((p.abs() == bound).any() for p in want.parameters()), "the clamp bit")
        for rank, worker in enumerate(WORKERS):
            self.assertEqual(opts[rank].stale_dropped, 0, f"worker {worker} dropped gradients")
            self.assertParamsIdentical(models[rank], want, f"worker {worker}:")
        info = opts[0].client.get_session(name)
        self.assertEqual((info["step"], info["round"]), (rounds, None))
        self.assertStateDictEqual(opts[0].state_dict(), torch_opt.state_dict())


class KilledMidRound(RoundsTestCase):
    def test_rounds_complete_once_across_a_kill_9_of_a_service_process(self):
        from asgd_client import RemoteASGD

        self.requireRounds()
        if not self.srv.restartable:
            self.skipTest("the service was not started by the tests (ASGD_TEST_URL)")
        rounds = 12
        urls = self.srv.replicas(3) or [self.url] * 3  # worker 0 is on the process that is killed
        name = unique("rounds-kill")
        models = [make_model() for _ in WORKERS]
        opts = [RemoteASGD(models[rank].named_parameters(), url=urls[rank], token=self.token, session=name, worker=worker,
                           aggregation={"contributions": 3}, max_round_wait_s=300, round_wait_s=2, **HYPER)
                for rank, worker in enumerate(WORKERS)]
        for opt in opts:
            self.addCleanup(opt.close)
        killed = threading.Event()
        failure = []

        def kill_and_start():
            try:
                self.srv.restart(down_s=1.0, sig=signal.SIGKILL)
            except BaseException as err:
                failure.append(err)
            finally:
                killed.set()

        def train(rank):
            def loop():
                for r in range(rounds):
                    if rank == 0 and r == rounds // 2:  # its gradient computed, the others' rounds open
                        threading.Thread(target=kill_and_start, daemon=True).start()
                    X, y = shard(r, rank)
                    opts[rank].zero_grad()
                    nn.functional.mse_loss(models[rank](X), y).backward()
                    opts[rank].step()
            return loop

        with self.assertLogs("asgd_client", logging.WARNING) as logs:
            self.run_workers([train(rank) for rank in range(len(WORKERS))])
            self.assertTrue(killed.wait(120))
        self.assertEqual(failure, [])
        self.assertTrue(any("retry" in line for line in logs.output), "worker 0 retried across the kill")
        want, _ = torch_rounds(rounds, lambda r: {w: shard(r, rank) for rank, w in enumerate(WORKERS)})
        for rank, worker in enumerate(WORKERS):
            self.assertParamsIdentical(models[rank], want, f"worker {worker}:")
        info = opts[1].client.get_session(name)
        self.assertEqual((info["step"], info["version"]), (rounds, rounds + 1), "every round stepped once")


class Pending(RoundsTestCase):
    def test_a_202_is_followed_with_the_same_key_until_the_round_steps(self):
        from asgd_client import RemoteASGD

        self.requireRounds()
        counter = StepCounter(self, self.url, self.token)
        name = unique("rounds-pending")
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), session=name, worker="a", aggregation={"contributions": 2},
                        connection=counter.conn, round_wait_s=1, max_round_wait_s=300, transport="json")
        b = RemoteASGD(b_model.named_parameters(), url=self.url, token=self.token, session=name, worker="b", create=False)
        self.addCleanup(b.close)
        mark = counter.mark()

        def a_step():
            a.zero_grad()
            nn.functional.mse_loss(a_model(shard(0, 0)[0]), shard(0, 0)[1]).backward()
            a.step()

        def b_step_after_a_202():
            deadline = time.monotonic() + 120
            while 202 not in counter.statuses[mark:]:  # a is waiting on its round
                if time.monotonic() > deadline:
                    raise AssertionError(f"no 202 for a's step: {counter.statuses[mark:]}")
                time.sleep(0.05)
            self.assertEqual(b.client.get_session(name)["round"]["workers"], ["a"])
            b.zero_grad()
            nn.functional.mse_loss(b_model(shard(0, 1)[0]), shard(0, 1)[1]).backward()
            b.step()

        self.run_workers([a_step, b_step_after_a_202])
        posts = [r for r in counter.proxy.requests[mark:] if r.method == "POST"]
        statuses = counter.statuses[mark:]
        self.assertGreaterEqual(len(posts), 2)
        self.assertEqual(set(statuses[:-1]), {202})
        self.assertEqual(statuses[-1], 200)
        self.assertEqual(len({r.headers["idempotency-key"] for r in posts}), 1, "every re-POST with the first key")
        self.assertTrue(all("wait=1" in r.path for r in posts))
        want, _ = torch_rounds(1, lambda r: {"a": shard(0, 0), "b": shard(0, 1)})
        self.assertParamsIdentical(a_model, want)
        self.assertParamsIdentical(b_model, want)
        self.assertEqual(a.last_step["round"]["contributions"], 2, "a's gradient counted once")
        self.assertEqual(b.client.get_session(name)["step"], 1)


class Restart(RoundsTestCase):
    def test_a_worker_restarted_while_its_contribution_waits_takes_the_rounds_result(self):
        # Found by a review: a worker killed after its contribution was stored, the round still open, and
        # started again with its worker id (as the README asks: stable ids) got DuplicateContribution at its
        # first step() and died again, until the round had stepped without it. Its first contribution stands:
        # the new gradient is dropped and the round's result loaded once it steps.
        from asgd_client import RemoteASGD, RoundPending

        self.requireRounds()
        name = unique("rounds-restart")
        first_model, b_model = make_model(), make_model()
        first = self.remote(first_model.named_parameters(), session=name, worker="a", aggregation={"contributions": 2})
        grads = dict(zip((n for n, _ in first_model.named_parameters()), gradients(first_model, *shard(0, 0))))
        # The first life of worker a: its contribution is stored, and the process is gone before the round steps.
        with self.assertRaises(RoundPending):
            first.client.step(name, grads, base_version=1, worker="a", wait=0, max_wait_s=0)
        self.assertEqual(first.client.get_session(name)["round"]["workers"], ["a"])

        again_model = make_model()
        again = RemoteASGD(again_model.named_parameters(), url=self.url, token=self.token, session=name, worker="a",
                           create=False, round_wait_s=1, max_round_wait_s=120)
        self.addCleanup(again.close)
        b = RemoteASGD(b_model.named_parameters(), url=self.url, token=self.token, session=name, worker="b", create=False,
                       round_wait_s=1, max_round_wait_s=120)
        self.addCleanup(b.close)

        def a_again():
            gradients(again_model, *shard(7, 0))  # another batch: this gradient is not the one in the round
            again.step()

        def b_later():
            time.sleep(1.5)  # a is waiting for the round by then
            gradients(b_model, *shard(0, 1))
            b.step()

        with self.assertLogs("asgd_client", level="WARNING") as logs:
            self.run_workers([a_again, b_later])
        self.assertTrue(any("is in already" in line for line in logs.output), logs.output)
        want, _ = torch_rounds(1, lambda r: {"a": shard(0, 0), "b": shard(0, 1)})
        self.assertParamsIdentical(again_model, want)
        self.assertParamsIdentical(b_model, want)
        info = b.client.get_session(name)
        self.assertEqual((info["step"], info["version"]), (1, 2), "one round, stepped once")
        self.assertEqual(again.stale_dropped, 0)
        # Its figures are the round's (a review: step_count stayed a round behind, last_step None).
        self.assertEqual(again.step_count, 1)
        self.assertEqual((again.last_step["step"], again.last_step["version"], again.last_step["round"]["version"]), (1, 2, 1))

        # The restarted worker goes on with the next round as any other.
        def a_next():
            gradients(again_model, *shard(1, 0))
            again.step()

        def b_next():
            gradients(b_model, *shard(1, 1))
            b.step()

        self.run_workers([a_next, b_next])
        want, _ = torch_rounds(2, lambda r: {"a": shard(r, 0), "b": shard(r, 1)})
        self.assertParamsIdentical(again_model, want)
        self.assertEqual(b.client.get_session(name)["step"], 2)
        self.assertEqual(again.step_count, 2)
        self.assertEqual(again.last_step["round"]["contributions"], 2)


class ScheduleAndCheckpoint(RoundsTestCase):
    def test_one_worker_owns_the_schedule_and_checkpoints_at_the_epoch_end_without_voiding_the_round(self):
        # The README's pattern: rank 0 runs the scheduler and checkpoints after its epoch-end step(); the
        # other runs none. Neither is refused (ROUND_CONFLICT) nor dropped as stale, the rounds step with the
        # owner's lr, and the checkpoint holds the new lr as torch.save(opt.state_dict()) would.
        import os
        import tempfile

        from asgd_client import RemoteASGD

        self.requireRounds()
        name = unique("rounds-owner")
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), session=name, worker="a", aggregation={"contributions": 2}, round_wait_s=5)
        b = RemoteASGD(b_model.named_parameters(), url=self.url, token=self.token, session=name, worker="b", create=False, round_wait_s=5)
        self.addCleanup(b.close)
        sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
        path = os.path.join(tempfile.mkdtemp(), "ck.pt")
        lr0 = a.param_groups[0]["lr"]
        for epoch in range(3):
            def a_round():
                gradients(a_model, *shard(epoch, 0))
                a.step()
                sched.step()  # epoch end: a's lr halves, then a checkpoints
                a.download_checkpoint(path)

            def b_round():
                gradients(b_model, *shard(epoch, 1))
                b.step()

            self.run_workers([a_round, b_round])
            checkpoint = torch.load(path)
            self.assertEqual(checkpoint["optimizer"]["param_groups"][0]["lr"], lr0 * 0.5 ** (epoch + 1), "the checkpoint has the new lr")
        self.assertEqual((a.stale_dropped, b.stale_dropped), (0, 0))
        info = b.client.get_session(name)
        self.assertEqual(info["step"], 3)
        # Rounds 2 and 3 stepped with the lr a had set before them; the last halving waits for a's next contribution.
        self.assertEqual(info["param_groups"][0]["lr"], lr0 * 0.25)


    def test_synchronize_after_a_background_contribution_leaves_a_changed_lr_for_the_next_one(self):
        # The rounds README: with step(wait=False), synchronize() before the next gradient. With rank 0's
        # scheduler changing the lr in between, synchronize() must not PATCH it (a new version would drop the
        # other worker's contribution as stale, or be refused with ROUND_OPEN): it goes with the next one.
        from asgd_client import RemoteASGD

        self.requireRounds()
        name = unique("rounds-sync")
        a_model, b_model = make_model(), make_model()
        a = self.remote(a_model.named_parameters(), session=name, worker="a", aggregation={"contributions": 2}, round_wait_s=5, max_round_wait_s=30)
        b = RemoteASGD(b_model.named_parameters(), url=self.url, token=self.token, session=name, worker="b", create=False, round_wait_s=5, max_round_wait_s=30)
        self.addCleanup(b.close)
        sched = torch.optim.lr_scheduler.ExponentialLR(a, gamma=0.9)
        lr0 = a.param_groups[0]["lr"]
        rounds = 6
        v0 = b.client.get_session(name)["version"]

        def a_loop():
            for r in range(rounds):
                gradients(a_model, *shard(r, 0))
                a.step(wait=False)
                sched.step()
                a.synchronize()

        def b_loop():
            for r in range(rounds):
                gradients(b_model, *shard(r, 1))
                b.step(wait=False)
                b.synchronize()

        self.run_workers([a_loop, b_loop])
        self.assertEqual((a.stale_dropped, b.stale_dropped), (0, 0))
        info = b.client.get_session(name)
        self.assertEqual(info["step"], rounds)
        self.assertEqual(info["version"] - v0, rounds, "no version but the rounds'")
        want = lr0
        for _ in range(rounds - 1):
            want *= 0.9  # as ExponentialLR multiplies
        self.assertEqual(info["param_groups"][0]["lr"], want, "each round after the first with a's lr")


class GivingUp(RoundsTestCase):
    def test_max_round_wait_s_shorter_than_the_services_wait_is_kept(self):
        # The service holds a contribution up to ?wait= (60 s by default); the client asks for no longer than
        # its max_round_wait_s has left, so RoundPending comes after about that, not after 60 s.
        from asgd_client import RoundPending

        self.requireRounds()
        model = make_model()
        opt = self.remote(model.named_parameters(), worker="alone", aggregation={"contributions": 2}, max_round_wait_s=2)
        gradients(model, *shard(0, 0))
        started = time.monotonic()
        with self.assertRaises(RoundPending) as caught:
            opt.step()
        self.assertLess(time.monotonic() - started, 30, "gave up near max_round_wait_s, not at the service's 60 s")
        self.assertEqual(caught.exception.round["contributions"], 1)


class Refusals(RoundsTestCase):
    def test_a_duplicate_worker_gets_the_error_and_the_round_is_unchanged(self):
        from asgd_client import DuplicateContribution, RoundOpen

        self.requireRounds()
        client = self.client("json")
        name = unique("rounds-dup")
        model = make_model()
        client.create_session(name, model.named_parameters(), hyperparameters=HYPER, aggregation={"contributions": 2})
        g = {w: gradients(model, *shard(0, i)) for i, w in enumerate(("w0", "w0-again", "w1"))}
        named = {w: dict(zip([n for n, _ in model.named_parameters()], gs)) for w, gs in g.items()}
        answers = {}

        def first():
            answers["w0"] = client.step(name, named["w0"], base_version=1, worker="w0", samples=16, returns="params", max_wait_s=300)

        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while (client.get_session(name).get("round") or {}).get("contributions") != 1:
            self.assertLess(time.monotonic(), deadline, "w0's contribution never showed in the round")
            time.sleep(0.05)
        with self.assertRaises(DuplicateContribution) as caught:
            client.step(name, named["w0-again"], base_version=1, worker="w0")
        self.assertEqual(caught.exception.status, 409)
        self.assertIn("worker", caught.exception.message)
        with self.assertRaises(RoundOpen):
            client.update_settings(name, aggregation={"contributions": 3})
        info = client.get_session(name)
        self.assertEqual((info["round"]["contributions"], info["round"]["workers"], info["round"]["samples"]), (1, ["w0"], 16))
        self.assertEqual(info["aggregation"]["contributions"], 2)
        second = client.step(name, named["w1"], base_version=1, worker="w1", samples=16, returns="params")
        thread.join(300)
        self.assertEqual((second["version"], answers["w0"]["version"], second["round"]["contributions"]), (2, 2, 2))
        want, _ = torch_rounds(1, lambda r: {"w0": shard(0, 0), "w1": shard(0, 2)})
        for (pname, p), q in zip(model.named_parameters(), want.parameters()):
            self.assertTrue(torch.equal(second["params"][pname], q.detach()), f"{pname}: the duplicate's gradient is not in the mean")
            self.assertTrue(torch.equal(answers["w0"]["params"][pname], q.detach()))

    def test_aggregation_is_set_and_removed_by_patch(self):
        client = self.client()
        self.requireRounds()
        name = unique("rounds-patch")
        info = client.create_session(name, make_model().named_parameters(), hyperparameters=HYPER)
        self.assertIsNone(info["aggregation"])
        info = client.update_settings(name, aggregation={"contributions": 2, "timeout_s": 30, "min_contributions": 1})
        self.assertEqual(info["aggregation"], {"contributions": 2, "timeout_s": 30, "min_contributions": 1})
        self.assertEqual(client.get_session(name)["aggregation"], info["aggregation"])
        self.assertIsNone(client.update_settings(name, aggregation=None)["aggregation"])
