"""Defects found by outside testing of issue 13's fixes: returns that cannot
be stored (no busy loop, a postmaster fallback, one pass for upas-runq),
the line joining a job to its bounce, SMTPUTF8 on the way out.

Jobs are made as smtpd makes them; the failures of a delivery are written
into the envelope as a runner cut off after saving them would leave them,
so no network is needed where none is tested.  Store calls go through a
``run_blocking`` on the test's clock, as the thread pool would make them:
asynchronous, so a scan that repeats work at once shows as work per tick.
"""

import errno
import io
import json
import os
import smtplib

from twisted.internet import defer, reactor, task

from test_client import ZONE, Case as ClientCase
from test_queue import MESSAGE, Case
from test_twistd import dns_port, server  # noqa: F401 (fixtures)
from upasmail import client, queue, tap_runq, testing
from upasmail.session import Transaction
from upasmail.store import MailRoot

LOCAL_SENDER = "gnot.example.org!alice"
BUSY = 20  # more tries than this at one instant: a busy loop


class Failing(Case):
    def setUp(self):
        Case.setUp(self)
        testing_boxes = os.path.join(self.root.root, "box")
        os.makedirs(os.path.join(testing_boxes, "postmaster"), exist_ok=True)
        self.outside = os.path.join(self.dir, "outside.txt")
        self.log = io.StringIO()
        self.addCleanup(tap_runq.start_logging(self.log))

    def later(self, f, *args):
        """A thread pool's answer, one clock tick later."""
        return task.deferLater(self.clock, 0, f, *args)

    def link_away(self, user):
        """The user's mbox is a symlink: storing fails with ELOOP (O_NOFOLLOW)."""
        os.symlink(self.outside, self.root.mailbox_path(user))

    def settled(self, sender=LOCAL_SENDER, status=queue.FAILED):
        """A job whose one recipient has failed (or been delivered), not yet finished."""
        qid = self.enqueue(["far.example!s1"], sender=sender)
        q = queue.Queue(self.root.queue)
        record = q.load(qid)
        record["state"]["far.example!s1"].update(status=status, dsn="5.1.1",
                                                 error="550 5.1.1 s1: no such user")
        q.save(record)
        return qid

    def async_runner(self, once=False, **kw):
        root = MailRoot(self.root.root, self.later, self.clock)
        self.calls, stuck = [], []
        deliver = root.deliver

        def counted(path, tx):
            self.calls.append(tx.recipients[0])
            if len(self.calls) > BUSY:  # stops a busy loop, so the test can fail
                stuck.append(defer.Deferred())
                return stuck[-1]
            return deliver(path, tx)

        root.deliver = counted
        self.port = 1  # no mail server: nothing here is sent
        settings = self.settings(retry_min=300, retry_max=3600, **kw)
        r = queue.QueueRunner(root, settings, None, None, self.clock, once=once)
        r.startService()
        self.addCleanup(lambda: r.stopService() if r.running else None)
        self.addCleanup(lambda: [d.errback(OSError("test over")) for d in stuck])  # runs first
        return r

    def ticks(self, n=200):
        for _ in range(n):
            self.clock.advance(0)

    def returned(self, qid):
        with open(os.path.join(self.root.queue, qid + ".env")) as f:
            return json.load(f)["state"]["far.example!s1"].get("returned", False)


class ReturnsThatCannotBeStored(Failing):
    def test_no_store_anywhere_waits_with_backoff_and_logs_one_line(self):
        self.link_away("alice")
        self.link_away("postmaster")
        qid = self.settled()
        self.async_runner()
        self.ticks()
        # the sender's mailbox, then the postmaster's: once each, not per tick
        self.assertEqual(self.calls, [LOCAL_SENDER, "postmaster"])
        text = self.log.getvalue()
        self.assertEqual(text.count("%s: returning failures: not to %s" % (qid, LOCAL_SENDER)),
                         1)
        self.assertIn("Too many levels of symbolic links", text)
        self.assertIn("next try in 300 s", text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("critical", text)
        self.assertNotIn("delivery to", text)  # not mislabelled as a delivery
        self.assertFalse(os.path.exists(self.outside))
        self.assertEqual(self.jobs(), [qid])
        self.assertFalse(self.returned(qid))
        self.clock.advance(299)
        self.ticks()
        self.assertEqual(len(self.calls), 2)
        self.clock.advance(1)
        self.ticks()
        self.assertEqual(len(self.calls), 4)
        self.clock.advance(599)  # the second wait doubles
        self.ticks()
        self.assertEqual(len(self.calls), 4)
        self.clock.advance(1)
        self.ticks()
        self.assertEqual(len(self.calls), 6)
        # the disk recovers: the postmaster's mailbox can be written again
        os.unlink(self.root.mailbox_path("postmaster"))
        self.clock.advance(1200)
        self.ticks()
        self.assertEqual(self.jobs(), [])
        [copy] = self.mbox("postmaster")
        self.assertIn("Final-Recipient: rfc822; s1@far.example", copy.as_string())
        self.assertFalse(os.path.exists(self.outside))

    def test_a_return_that_cannot_be_stored_goes_to_the_postmaster(self):
        self.link_away("alice")
        qid = self.settled()
        self.async_runner()
        self.ticks()
        self.assertEqual(self.calls, [LOCAL_SENDER, "postmaster"])
        self.assertEqual(self.jobs(), [])
        [copy] = self.mbox("postmaster")
        self.assertTrue(copy.get_from().startswith("double-bounce@"))
        text = copy.as_string()
        self.assertIn("Final-Recipient: rfc822; s1@far.example", text)
        self.assertIn("could not be given to its sender", text)
        self.assertNotIn("itself a bounce", text)
        log = self.log.getvalue()
        self.assertIn("%s: failures not returned to %s" % (qid, LOCAL_SENDER), log)
        self.assertIn("%s: postmaster non-delivery notification: stored in the local mailbox "
                      "of postmaster" % qid, log)
        self.assertNotIn("Traceback", log)
        self.assertFalse(os.path.exists(self.outside))

    def test_upas_runq_ends_its_pass_when_returns_fail(self):
        self.link_away("alice")
        self.link_away("postmaster")
        qid = self.settled()
        r = self.async_runner(once=True)
        self.ticks()
        self.assertTrue(r.done.called)
        self.assertEqual(self.calls, [LOCAL_SENDER, "postmaster"])
        self.assertEqual(self.jobs(), [qid])

    def test_any_failure_finishing_a_job_waits(self):
        # every outcome delivered; removing the job fails (a read-only queue)
        qid = self.settled(status=queue.DELIVERED)
        r = self.async_runner()
        removals, really = [], r.queue.apply

        def apply(writes):  # removals are batched with other writes
            gone = [w.qid for w in writes if w.record is None]
            removals.extend(gone)
            if gone and len(removals) <= BUSY:  # later: stops a busy loop, so the test can fail
                raise OSError(errno.EROFS, "Read-only file system")
            return really(writes)

        r.queue.apply = apply
        self.ticks()
        self.assertEqual(removals, [qid])
        text = self.log.getvalue()
        self.assertIn("%s: finishing the job failed: [Errno 30] Read-only file system; "
                      "next try in 300 s" % qid, text)
        self.assertNotIn("Traceback", text)
        self.clock.advance(300)
        self.ticks()
        self.assertEqual(removals, [qid, qid])

    def test_a_job_that_cannot_be_looked_at_waits(self):
        qid = self.settled()
        r = self.async_runner()
        looks = []

        def lock(q):
            looks.append(q)
            raise OSError(errno.EIO, "Input/output error")

        r.queue.lock = lock
        self.ticks()
        self.assertEqual(looks, [qid])
        self.assertIn("%s: cannot handle this job: [Errno 5] Input/output error; next try "
                      "in 300 s" % qid, self.log.getvalue())


class TheLineToTheBounce(Failing):
    def test_a_queued_bounce_is_named_by_its_queue_id(self):
        qid = self.settled(sender="far.example!zed")
        self.async_runner()
        self.ticks()
        [bid] = self.jobs()
        self.assertNotEqual(bid, qid)
        self.assertIn("%s: sender non-delivery notification: %s (to far.example!zed, 1 "
                      "recipients failed)" % (qid, bid), self.log.getvalue())

    def test_a_local_bounce_names_the_mailbox(self):
        qid = self.settled()
        self.async_runner()
        self.ticks()
        self.assertEqual(len(self.mbox("alice")), 1)
        self.assertIn("%s: sender non-delivery notification: stored in the local mailbox of "
                      "alice" % qid, self.log.getvalue())


class SMTPUTF8(ClientCase):
    """RFC 6531 3.2 on the way out: SMTPUTF8 when a message needs it and the
    server offers it; none at all when it does not (5.6.7, as Postfix)."""

    OFFERS = {"EHLO": "250-fake.example you are there\r\n250-8BITMIME\r\n250 SMTPUTF8"}

    @defer.inlineCallbacks
    def test_a_utf8_sender_is_not_sent_to_a_server_without_smtputf8(self):
        self.serve()
        result = yield self.deliver(sender="\u00fcn\u00ef@vm.test")
        self.assertEqual(result.status, client.PERMANENT)
        [r] = result.recipients
        self.assertEqual(r.status, client.PERMANENT_FAILURE)
        self.assertIn("5.6.7 SMTPUTF8 is required, but was not offered by host "
                      "mx.example.com[127.0.0.2]", r.reply)
        self.assertEqual([c.split(" ")[0] for c in self.commands()], ["EHLO", "QUIT"])

    @defer.inlineCallbacks
    def test_a_utf8_recipient_goes_with_smtputf8_when_offered(self):
        self.serve(replies=self.OFFERS)
        result = yield self.deliver(rcpts=("b\u00f6b@example.net",))
        self.assertEqual(result.status, "")
        self.assertEqual(self.commands()[1:3], ["MAIL FROM:<alice@gnot.example.org> SMTPUTF8",
                                                "RCPT TO:<b\u00f6b@example.net>"])

    @defer.inlineCallbacks
    def test_ascii_mail_goes_without_smtputf8(self):
        self.serve(replies=self.OFFERS)
        result = yield self.deliver()
        self.assertEqual(result.status, "")
        self.assertEqual(self.commands()[1], "MAIL FROM:<alice@gnot.example.org>")

    @defer.inlineCallbacks
    def test_mail_received_with_smtputf8_needs_it_for_a_utf8_header(self):
        self.serve()
        for msg, status in (("Subject: gr\u00fc\u00dfe\n\nbody\n".encode(), client.PERMANENT),
                            (b"Subject: hi\n\nbody\n", "")):  # ASCII: no need
            result = yield client.deliver(
                io.BytesIO(msg), "tcp!example.com!%d" % self.port, "alice",
                ["bob@example.net"], self.options(), reactor, testing.FakeResolver(ZONE),
                self.clock, smtputf8=True)
            self.assertEqual(result.status, status)


class SMTPUTF8InTheQueue(Case):
    @defer.inlineCallbacks
    def test_a_utf8_recipient_the_server_cannot_take_is_returned(self):
        s = self.sink()
        self.enqueue(["a.example!b\u00f6b"])
        r = self.runner()
        yield s.seen("QUIT")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))
        [bounce] = self.mbox("alice")
        text = bounce.as_string()
        self.assertIn("Status: 5.6.7", text)
        self.assertIn("SMTPUTF8 is required, but was not offered by host", text)

    def test_the_queue_keeps_the_smtputf8_flag(self):
        path, f = self.root.open_spool()
        with f:
            f.write(MESSAGE)
        tx = Transaction(sender="gnot.example.org!alice", recipients=("a.example!bob",),
                         local=(), remote=("a.example!bob",), peer="127.0.0.1", helo="h",
                         smtputf8=True)
        self.successResultOf(self.root.deliver(path, tx))
        record = queue.Queue(self.root.queue).load(os.path.basename(path))
        self.assertIs(record["smtputf8"], True)


def test_smtpd_marks_a_message_received_with_smtputf8(server):  # noqa: F811 (fixture)
    s = server("--no-queue-runner")
    with smtplib.SMTP("127.0.0.1", s.port) as c:
        c.ehlo()
        c.sendmail("alice@example.org", ["x@foreign.example"],
                   "Subject: gr\u00fc\u00dfe\r\n\r\nq\r\n".encode(), mail_options=["SMTPUTF8"])
        c.sendmail("alice@example.org", ["y@foreign.example"], b"Subject: q\r\n\r\nq\r\n")
    flags = {}
    for name in os.listdir(os.path.join(s.root, "queue")):
        if name.endswith(".env"):
            with open(os.path.join(s.root, "queue", name)) as f:
                record = json.load(f)
            flags[record["recipients"][0]] = record.get("smtputf8")
    assert flags == {"foreign.example!x": True, "foreign.example!y": False}
