"""A batch per reactor turn (store.Batcher's ``collect``): every message
whose final dot came in one turn goes into one batch, one lock and one
fsync, instead of the first of them alone."""

import functools

from twisted.internet import task
from twisted.trial import unittest

from test_store_batches import Later, sync, write
from upasmail import service, store
from upasmail.testing import FakeResolver, make_settings


class CollectTests(unittest.TestCase):
    def batcher(self):
        clock, run = task.Clock(), Later()
        b = store.Batcher(run, write, sync, inline=lambda jobs: True, depth=4,
                          collect=functools.partial(clock.callLater, 0))
        return clock, run, b

    def test_a_turns_messages_share_one_batch(self):
        clock, run, b = self.batcher()
        ds = [b.submit(x) for x in "abc"]
        self.assertEqual(run.calls, [])  # nothing written before the turn ends
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # one end of turn asked for
        clock.advance(0)
        self.assertEqual([args for _, args, _ in run.calls], [(["a", "b", "c"],)])
        run.finish(0)
        self.assertEqual([self.successResultOf(d) for d in ds], ["a", "b", "c"])
        self.assertEqual(b.batches, 1)

    def test_the_next_turn_makes_the_next_batch(self):
        clock, run, b = self.batcher()
        first = b.submit("a")
        clock.advance(0)
        second = [b.submit("b"), b.submit("c")]
        clock.advance(0)
        self.assertEqual([args for _, args, _ in run.calls], [(["a"],), (["b", "c"],)])
        run.finish(0)
        run.finish(1)
        self.assertEqual(self.successResultOf(first), "a")
        self.assertEqual([self.successResultOf(d) for d in second], ["b", "c"])

    def test_jobs_waiting_for_a_full_pipeline_go_when_it_drains(self):
        clock, run, b = self.batcher()
        early = []
        for x in "abcd":  # four batches syncing: the most at once
            early.append(b.submit(x))
            clock.advance(0)
        late = [b.submit("e"), b.submit("f")]
        clock.advance(0)
        self.assertEqual(len(run.calls), 4)
        run.finish(0)  # a slot frees: the waiting two go together
        self.assertEqual(run.calls[4][1], (["e", "f"],))
        for i in (1, 2, 3, 4):
            run.finish(i)
        self.assertEqual([self.successResultOf(d) for d in early + late], list("abcdef"))

    def test_without_collect_a_batch_starts_at_once(self):
        run = Later()
        b = store.Batcher(run, write, sync, inline=lambda jobs: True, depth=4)
        b.submit("a")
        self.assertEqual(len(run.calls), 1)


class WiringTests(unittest.TestCase):
    def test_the_server_batches_per_reactor_turn(self):
        """The factory made on a real reactor gives its store the end of turn."""
        from twisted.internet import reactor
        settings = make_settings("", root=self.mktemp())
        factory = service.makeSmtpdFactory(settings, reactor=reactor,
                                           resolver=FakeResolver({}))
        self.addCleanup(factory.root.writer._run.stop)
        self.assertIsNotNone(factory.root.writer._collect)

    def test_tests_own_runner_keeps_batches_immediate(self):
        settings = make_settings("", root=self.mktemp())
        factory = service.makeSmtpdFactory(settings, reactor=task.Clock(),
                                           run_blocking=lambda f, *a: f(*a))
        self.assertIsNone(factory.root.writer._collect)
