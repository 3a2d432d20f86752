"""The queue's cost: an index instead of scans, batched state writes, reused connections."""

import json
import os
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from upasmail import client, queue, testing
from upasmail.session import Transaction
from upasmail.store import MailRoot, new_id

MESSAGE = b"From gnot.example.org!alice Wed Mar  7 23:47:45 -0400 2024 remote from gnot\n" \
          b"Subject: q\n\nbody\n"


class Case(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.root = MailRoot(os.path.join(self.dir, "mail"), testing.run_now, self.clock)
        self.root.prepare()
        self.delivered = []  # (queue id, recipients) per delivery
        self.loads = []
        real_load = queue.Queue.load

        def load(q, qid):
            self.loads.append(qid)
            return real_load(q, qid)

        self.patch(queue.Queue, "load", load)

    def deliver(self, source, dest, sender, rcpts, options, reactor, resolver, clock=None,
                watch=None, outcome=None, queue_id=None, smtputf8=False, **kw):
        self.delivered.append((queue_id, list(rcpts)))
        result = client.Result("", [client.RecipientResult(r, r, client.DELIVERED, "250 ok")
                                    for r in rcpts])
        if outcome is not None:
            outcome(result)
        return defer.succeed(result)

    def runner(self, **kw):
        settings = testing.make_settings("", root=self.root.root, outbound_tls=False,
                                         smarthost="tcp!192.0.2.1!25")
        r = queue.QueueRunner(self.root, settings, None, None, self.clock,
                              deliver=self.deliver, **kw)
        r.startService()
        self.addCleanup(lambda: r.stopService() if r.running else None)
        self.clock.advance(0)
        return r

    def enqueue(self, rcpt="far.example!bob"):
        path, f = self.root.open_spool()
        with f:
            f.write(MESSAGE)
        tx = Transaction(sender="gnot.example.org!alice", recipients=(rcpt,), local=(),
                         remote=(rcpt,), peer="127.0.0.1", helo="h")
        self.successResultOf(self.root.deliver(path, tx))
        os.unlink(path)
        return os.path.basename(path)

    def waiting_job(self, wait=3600.0):
        """A job written straight to disk whose next try is ``wait`` seconds away."""
        qid = new_id(self.clock.seconds())
        with open(os.path.join(self.root.queue, qid + ".msg"), "wb") as f:
            f.write(MESSAGE)
        with open(os.path.join(self.root.queue, qid + ".env"), "w") as f:
            json.dump({"id": qid, "sender": "a!b", "recipients": ["far.example!x"],
                       "created": self.clock.seconds(), "attempts": {"smarthost": 1},
                       "next": {"smarthost": self.clock.seconds() + wait}}, f)
        return qid

    def jobs(self):
        return queue.Queue(self.root.queue).ids()


class IndexTests(Case):
    def test_an_enqueue_reads_no_envelope(self):
        for _ in range(20):
            self.waiting_job()
        r = self.runner()
        self.assertEqual(len(self.loads), 20)  # start-up reads each job once
        del self.loads[:]
        qids = [self.enqueue() for _ in range(5)]
        self.clock.advance(0)
        self.assertEqual(sorted(q for q, _ in self.delivered), sorted(qids))
        self.assertEqual(self.loads, [])
        self.assertEqual(len(self.jobs()), 20)
        self.assertEqual(len(r.due_at), 20)

    def test_a_scan_touches_only_due_jobs(self):
        waiting = [self.waiting_job(wait=3600.0) for _ in range(30)]
        soon = self.waiting_job(wait=100.0)
        r = self.runner()
        del self.loads[:]
        for _ in range(5):
            r.scan()
        self.clock.advance(50)
        self.assertEqual(self.loads, [])
        self.clock.advance(50)
        self.assertEqual(self.loads, [soon])
        self.assertEqual(self.delivered, [(soon, ["far.example!x"])])
        self.assertEqual(sorted(self.jobs()), sorted(waiting))

    def test_a_job_another_program_queued_is_found_at_the_timed_scan(self):
        r = self.runner()
        qid = self.waiting_job(wait=0)  # as stdio smtpd or a second server would
        self.clock.advance(0)
        self.assertEqual(self.delivered, [])
        self.clock.advance(r.settings.queue_scan)
        self.assertEqual(self.delivered, [(qid, ["far.example!x"])])
        self.assertEqual(self.jobs(), [])

    def test_a_job_another_program_deleted_is_forgotten(self):
        r = self.runner()
        qid = self.waiting_job(wait=100.0)
        self.clock.advance(r.settings.queue_scan)
        self.assertIn(qid, r.known)
        queue.delete(queue.Queue(self.root.queue), qid)
        self.clock.advance(r.settings.queue_scan)
        self.assertNotIn(qid, r.known)
        self.assertEqual(self.delivered, [])
