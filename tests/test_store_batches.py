"""The writer's group commit (store.Batcher) and the in-memory spool."""

import os

from twisted.internet import defer
from twisted.trial import unittest

from upasmail import store


class Later:
    """run_blocking whose calls finish when the test says."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, i):
        f, args, d = self.calls[i]
        d.callback(f(*args))


def write(jobs):
    return list(jobs)


def sync(jobs):
    return [(True, job) for job in jobs]


class BatcherTests(unittest.TestCase):
    def test_jobs_that_wait_go_together(self):
        run = Later()
        b = store.Batcher(run, write, sync, inline=lambda jobs: True, depth=1)
        first = b.submit("a")
        rest = [b.submit(x) for x in "bcd"]  # the first batch is syncing
        self.assertEqual(len(run.calls), 1)
        run.finish(0)
        self.assertEqual(self.successResultOf(first), "a")
        self.assertEqual(run.calls[1][1], (["b", "c", "d"],))
        run.finish(1)
        self.assertEqual([self.successResultOf(d) for d in rest], ["b", "c", "d"])
        self.assertEqual(b.batches, 2)

    def test_results_come_in_the_order_written(self):
        run = Later()
        b = store.Batcher(run, write, sync, inline=lambda jobs: True, depth=4)
        first, second = b.submit("a"), b.submit("b")
        self.assertEqual(len(run.calls), 2)  # both syncing at once
        run.finish(1)
        # the second batch synced first, but it may rely on the first's fsync
        self.assertNoResult(second)
        run.finish(0)
        self.assertEqual(self.successResultOf(first), "a")
        self.assertEqual(self.successResultOf(second), "b")

    def test_a_failed_sync_fails_its_jobs_only(self):
        run = Later()

        def sync_or_fail(jobs):
            if "bad" in jobs:
                raise OSError("disk gone")
            return sync(jobs)

        b = store.Batcher(run, write, sync_or_fail, inline=lambda jobs: True, depth=4)
        good, bad = b.submit("good"), b.submit("bad")
        f, args, d = run.calls[1]
        d.errback(OSError("disk gone"))
        run.finish(0)
        self.assertEqual(self.successResultOf(good), "good")
        self.failureResultOf(bad, OSError)

    def test_writes_go_to_a_thread_unless_inline(self):
        run = Later()
        b = store.Batcher(run, write, sync, inline=lambda jobs: False)
        d = b.submit("x")
        self.assertIs(run.calls[0][0], write)
        run.finish(0)
        self.assertIs(run.calls[1][0], sync)
        run.finish(1)
        self.assertEqual(self.successResultOf(d), "x")


class SpoolTests(unittest.TestCase):
    def test_small_stays_in_memory_large_goes_to_a_file(self):
        d = self.mktemp()
        os.makedirs(d)
        small = store.Spool(d, "one", 100)
        small.write(b"x" * 60)
        small.close()
        self.assertEqual((small.path, small.source()), (None, b"x" * 60))
        big = store.Spool(d, "two", 100)
        big.write(b"y" * 60)
        big.write(b"z" * 60)
        big.close()
        self.assertEqual(big.source(), os.path.join(d, "two"))
        with open(big.path, "rb") as f:
            self.assertEqual(f.read(), b"y" * 60 + b"z" * 60)
        self.assertEqual(small.materialize(), os.path.join(d, "one"))
        for spool in (small, big):
            spool.discard()
        self.assertEqual(os.listdir(d), [])


def test_a_mailbox_cut_mid_line_gets_its_next_message_on_a_line_of_its_own(tmp_path):
    import mailbox
    from upasmail import mbox
    path = str(tmp_path / "mbox")
    with open(path, "wb") as f:
        f.write(b"From a Mon Jan  1 00:00:00 2024\nSubject: one\n\nbody\n\nFrom b Mon Jan  1 00:00:00 2024\nSubject: partial")
    stream = b"From c Mon Jan  1 00:00:00 2024 remote from \nSubject: new\n\nhello\n"
    mbox.append_many(path, [(stream, None)])
    subjects = [m["subject"] for m in mailbox.mbox(path)]
    assert subjects[-1] == "new" and len(subjects) == 3
    assert mbox.separator(b"") == b"" and mbox.separator(b"x\n\n") == b""
    assert mbox.separator(b"x\n") == b"\n" and mbox.separator(b"xy") == b"\n\n"


def test_a_worker_leaves_the_spool_of_live_processes_alone(tmp_path):
    from twisted.internet import task
    root = store.MailRoot(str(tmp_path / "mail"), None, task.Clock())
    root.make_directories()
    live = os.path.join(root.tmp, "1700000000.0123456789ab")
    with open(live, "wb") as f:
        f.write(b"a message the main process is receiving")
    root.prepare(tidy=False)  # a worker starting beside a busy main process
    assert os.path.exists(live)
    root.prepare()  # the main process at start-up: nothing is live yet
    assert not os.path.exists(live)
