"""Queue tools and client defects from a black-box test (issue 13, q2).

1. ``upas-mailq --delete`` and every other way a name becomes a path in
   the queue: only queue ids (``store.new_id``'s form) are;
2. control characters in addresses never reach the wire; odd bytes in a
   server's reply never start a log line of their own;
3. a delivered recipient's log line and state carry the server's final
   reply (its queue id), and every client line of a queue delivery starts
   with the job's queue id.

Mail servers are ``testing.ScriptedSMTPServer``\\s on 127.0.0.2; DNS is a
``testing.FakeResolver``.
"""

import io
import os

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

import test_queue
from upasmail import queue, store, tap_runq


def capture_log(case):
    """The events logged from now until the test ends."""
    events = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def texts(events, *namespaces):
    return [formatEvent(e) for e in events if e.get("log_namespace") in namespaces]


# -- 1. queue ids ------------------------------------------------------------

class QueueIdTests(test_queue.Case):

    def mailq(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = tap_runq.mailq(["--root", self.root.root] + list(argv), out, err)
        return code, out.getvalue(), err.getvalue()

    def test_delete_refuses_a_path_out_of_the_queue(self):
        precious = [os.path.join(self.root.root, "precious" + ext) for ext in (".env", ".msg")]
        for path in precious:
            with open(path, "w") as f:
                f.write("{}")
        code, out, err = self.mailq("--delete", "../precious")
        self.assertEqual((code, out), (64, ""))
        self.assertEqual(err, "upas-mailq: ../precious: not a queue id\n")
        self.assertTrue(all(os.path.exists(p) for p in precious))

    def test_delete_refuses_what_is_not_exactly_a_queue_id(self):
        qid = self.enqueue()
        for bad in (qid + "/", qid + "\n", qid.upper(), "x" + qid, qid[:-1], qid + "0",
                    os.path.join(self.root.queue, qid), "."):
            code, out, err = self.mailq("--delete", bad)
            self.assertEqual((code, out), (64, ""), bad)
            self.assertEqual(err.count("\n"), 1, bad)  # one line, whatever the name holds
            self.assertTrue(err.endswith(": not a queue id\n"), bad)
        self.assertEqual(self.jobs(), [qid])
        self.assertEqual(self.mailq("--delete", qid)[:2], (0, qid + ": deleted\n"))
        self.assertEqual(self.jobs(), [])

    def test_the_ids_the_store_makes_are_queue_ids(self):
        for seconds in (0, 1795981096.5, 4e9):
            self.assertTrue(queue.is_queue_id(store.new_id(seconds)))
        path, f = self.root.open_spool()
        f.close()
        self.assertTrue(queue.is_queue_id(self.root.queue_id(path)))
        with self.assertRaises(queue.BadQueueId):
            queue.Queue(self.root.queue).paths("../precious")

    def test_flush_never_writes_through_a_planted_symlink(self):
        target = os.path.join(self.root.root, "precious")
        with open(target, "w") as f:
            f.write("keep me")
        os.symlink(target, os.path.join(self.root.queue, queue.FLUSH))
        code, out, _ = self.mailq("--flush")
        self.assertEqual(code, 0)
        self.assertIn("flush requested", out)
        with open(target) as f:
            self.assertEqual(f.read(), "keep me")
        self.assertTrue(queue.Queue(self.root.queue).flush_requested())  # the link goes
        self.assertTrue(os.path.exists(target))

    @defer.inlineCallbacks
    def test_a_job_not_named_by_a_queue_id_is_set_aside_not_sent(self):
        s = self.sink()
        qid = self.enqueue()
        for ext in (".msg", ".env"):
            os.link(os.path.join(self.root.queue, qid + ext),
                    os.path.join(self.root.queue, "hello" + ext))
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(len(s.sessions), 1)  # the real job only
        self.assertEqual(self.jobs(), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root.queue, queue.CORRUPT))),
                         ["hello.env", "hello.msg"])
        self.flushLoggedErrors()
