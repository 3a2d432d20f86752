"""Durable store: mbox format and locking, group commit, queue jobs."""

import json
import mailbox
import os
import threading
import time

from twisted.internet import defer, task
from twisted.trial import unittest

from upasmail import mbox, store
from upasmail.session import Transaction
from upasmail.testing import run_now

STREAM = (b"From example.org!alice Wed Mar  7 23:47:45 -0400 2024 remote from \n"
          b"Received: from h ([192.0.2.1]) by gnot; Wed Mar  7 23:47:45 -0400 2024\n"
          b"Subject: hi\n\nFrom the start\n>From quoted\nlast line")


class MboxTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.stream = os.path.join(self.dir, "stream")
        with open(self.stream, "wb") as f:
            f.write(STREAM)

    def test_append_format(self):
        path = os.path.join(self.dir, "box", "bob", "mbox")
        synced = mbox.append(path, self.stream)
        self.assertEqual(synced, [path, os.path.join(self.dir, "box"),
                                  os.path.join(self.dir, "box", "bob")])
        mbox.append(path, self.stream)
        with open(path, "rb") as f:
            data = f.read()
        one = (b"From example.org!alice Wed Mar  7 23:47:45 -0400 2024\n" + STREAM.split(b"\n", 1)[1]
               .replace(b"\nFrom the", b"\n>From the").replace(b"\n>From q", b"\n>>From q")
               + b"\n\n")
        self.assertEqual(data, one * 2)
        msgs = list(mailbox.mbox(path))
        self.assertEqual(len(msgs), 2)
        self.assertEqual(msgs[0]["Subject"], "hi")
        self.assertFalse(os.path.exists(path + ".lock"))

    def test_dotlock_of_another_writer_makes_it_busy(self):
        path = os.path.join(self.dir, "mbox")
        open(path + ".lock", "w").close()  # no pid (procmail, mutt): only its age counts
        self.assertRaises(mbox.Busy, mbox.append, path, self.stream)
        self.assertEqual(os.path.getsize(path), 0)
        old = time.time() - mbox.DOTLOCK_STALE - 1
        os.utime(path + ".lock", (old, old))
        notes = []
        mbox.append(path, self.stream, notes)
        self.assertEqual(len(mailbox.mbox(path)), 1)
        self.assertFalse(os.path.exists(path + ".lock"))
        self.assertIn("broke a stale lock: not touched for 30", notes[0])

    def test_concurrent_writers_do_not_interleave(self):
        path = os.path.join(self.dir, "mbox")
        errors = []

        def writer():
            try:
                done = 0
                while done < 20:
                    try:
                        mbox.append(path, self.stream)
                        done += 1
                    except mbox.Busy:
                        time.sleep(0)  # let the holder finish; the store waits on its clock instead
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        msgs = list(mailbox.mbox(path))
        self.assertEqual(len(msgs), 80)
        self.assertTrue(all(m["Subject"] == "hi" for m in msgs))

    def test_failed_append_is_cut_back(self):
        path = os.path.join(self.dir, "mbox")
        mbox.append(path, self.stream)
        size = os.path.getsize(path)
        real = mbox._write_all
        calls = []

        def failing(fd, data):
            calls.append(1)
            real(fd, data[:10])
            raise OSError(28, "No space left on device")

        mbox._write_all = failing
        self.addCleanup(setattr, mbox, "_write_all", real)
        self.assertRaises(OSError, mbox.append, path, self.stream)
        self.assertEqual(os.path.getsize(path), size)
        self.assertFalse(os.path.exists(path + ".lock"))


class GroupCommitTests(unittest.TestCase):
    def test_batches_share_fsyncs(self):
        pending = []

        def run_later(f, *args):
            d = defer.Deferred()
            pending.append((f, args, d))
            return d

        synced = []
        gc = store.GroupCommit(run_later, fsync=synced.append)
        results = []
        gc.sync(["a"]).addCallback(results.append)
        gc.sync(["a", "b"]).addCallback(results.append)
        gc.sync(["c"]).addCallback(results.append)
        # the first request started a batch alone; the next two wait for one batch
        self.assertEqual(len(pending), 1)
        f, args, d = pending.pop()
        f(*args)
        d.callback(None)
        self.assertEqual(results, [None])
        f, args, d = pending.pop()
        f(*args)
        d.callback(None)
        self.assertEqual(synced, [["a"], ["a", "b", "c"]])
        self.assertEqual(results, [None, None, None])
        self.assertEqual(gc.batches, 2)

    def test_fsync_failure_fails_the_batch(self):
        def bad(paths):
            raise OSError(5, "I/O error")

        gc = store.GroupCommit(run_now, fsync=bad)
        d = gc.sync(["x"])
        self.failureResultOf(d, OSError)


class MailRootTests(unittest.TestCase):
    def test_queue_job(self):
        root = store.MailRoot(self.mktemp(), run_now, task.Clock())
        root.prepare()
        os.mkdir(os.path.join(root.boxes, "bob"))
        path, f = root.open_spool()
        f.write(STREAM)
        f.close()
        tx = Transaction("example.org!alice", ("far.example!x", "bob"), ("bob",),
                         ("far.example!x",), "127.0.0.1", "h.example")
        self.successResultOf(root.deliver(path, tx))
        jobs = sorted(os.listdir(root.queue))
        self.assertEqual(len(jobs), 2)
        with open(os.path.join(root.queue, jobs[0])) as f:
            env = json.load(f)
        self.assertEqual(env["recipients"], ["far.example!x"])
        self.assertEqual(env["sender"], "example.org!alice")
        with open(os.path.join(root.queue, jobs[1]), "rb") as f:
            self.assertEqual(f.read(), STREAM)
        self.assertEqual(len(mailbox.mbox(root.mailbox_path("bob"))), 1)

    def test_prepare_fails_on_unwritable_root(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a directory")
        root = store.MailRoot(path, run_now, task.Clock())
        self.assertRaises(OSError, root.prepare)
