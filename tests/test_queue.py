"""The outbound queue (issue 7): delivery, backoff, bounces, expiry, restart,
quarantine, mailq, flush, delete, one-shot runs.

Jobs are made the way smtpd makes them (``MailRoot.deliver``); mail
servers are ``testing.ScriptedSMTPServer`` sinks on 127.0.0.2/.3 found
through a ``testing.FakeResolver``; every queue and client timer runs on
a task.Clock (the network is the real reactor on loopback).
"""

import email
import io
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor, task
from twisted.names import dns
from twisted.trial import unittest

from upasmail import client, queue, tap_runq, testing
from upasmail.session import Transaction
from upasmail.store import MailRoot

ZONE = {
    "a.example": [dns.Record_MX(10, "mx.a.example")],
    "mx.a.example": [dns.Record_A("127.0.0.2")],
    "b.example": [dns.Record_MX(10, "mx.b.example")],
    "mx.b.example": [dns.Record_A("127.0.0.3")],
    "far.example": [dns.Record_MX(10, "mx.a.example")],
}
MESSAGE = (b"From gnot.example.org!alice Wed Mar  7 23:47:45 -0400 2024 remote from \n"
           b"Received: from h ([127.0.0.1]) by gnot; Wed Mar  7 23:47:45 -0400 2024\n"
           b"Subject: queued mail\nFrom: alice@gnot.example.org\n\nhello\n")


class Case(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="upasmail-queue-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = task.Clock()
        self.root = MailRoot(os.path.join(self.dir, "mail"), testing.run_now, self.clock)
        self.root.prepare()
        testing.make_mailboxes(self.root.root, "alice")  # local senders get their bounces
        self.sinks = {}

    def sink(self, interface="127.0.0.2", port=None, **kw):
        script = testing.ScriptedSMTPServer(**kw)
        listening = script.listen(reactor, interface, port or 0)
        self.port = listening.getHost().port
        self.sinks[interface] = script

        @defer.inlineCallbacks
        def stop():
            yield defer.gatherResults([s.closed for s in script.sessions])
            yield listening.stopListening()

        self.addCleanup(stop)
        return script

    def settings(self, **kw):
        kw.setdefault("mx_port", self.port)
        kw.setdefault("outbound_tls", False)
        return testing.make_settings("", root=self.root.root, **kw)

    def runner(self, settings=None, **kw):
        r = queue.QueueRunner(self.root, settings or self.settings(), reactor,
                              testing.FakeResolver(ZONE), self.clock, **kw)
        r.startService()
        self.addCleanup(lambda: r.stopService() if r.running else None)
        self.clock.advance(0)
        return r

    def enqueue(self, rcpts=("a.example!bob",), sender="gnot.example.org!alice",
                data=MESSAGE):
        path, f = self.root.open_spool()
        with f:
            f.write(data)
        tx = Transaction(sender=sender, recipients=tuple(rcpts), local=(), remote=tuple(rcpts),
                         peer="127.0.0.1", helo="h")
        self.successResultOf(self.root.deliver(path, tx))
        os.unlink(path)
        self.clock.advance(0)  # a running queue wakes up
        return os.path.basename(path)

    def jobs(self):
        return queue.Queue(self.root.queue).ids()

    def mbox(self, user):
        path = self.root.mailbox_path(user)
        if not os.path.exists(path):
            return []
        import mailbox
        return list(mailbox.mbox(path))

    @defer.inlineCallbacks
    def settle(self, runner):
        """Wait until the runner has nothing under way (real network events)."""
        while True:
            self.clock.advance(0)
            yield runner.whenIdle()
            yield task.deferLater(reactor, 0, lambda: None)
            self.clock.advance(0)
            if not runner.inflight:
                return

    @defer.inlineCallbacks
    def until(self, condition):
        """Let the reactor run (no clock time passes) until condition() holds."""
        for _ in range(100000):
            self.clock.advance(0)
            if condition():
                return
            yield task.deferLater(reactor, 0, lambda: None)
        self.fail("condition never held")


class DeliveryTests(Case):
    @defer.inlineCallbacks
    def test_delivered_on_first_try(self):
        s = self.sink()
        qid = self.enqueue(["a.example!bob", "a.example!carol"])
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [session] = s.sessions
        self.assertEqual(session.commands[2:4], ["RCPT TO:<bob@a.example>",
                                                 "RCPT TO:<carol@a.example>"])
        self.assertIn(b"Subject: queued mail\r\n", session.data)
        self.assertIn(b"hello\r\n", session.data)
        self.assertFalse(session.data.startswith(b"From "))
        self.assertTrue(qid)

    @defer.inlineCallbacks
    def test_temporary_failure_retries_after_backoff(self):
        s = self.sink(replies={"RCPT": "451 4.3.0 try later"})
        qid = self.enqueue()
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        record = queue.Queue(self.root.queue).load(qid)
        self.assertEqual(record["state"]["a.example!bob"]["status"], queue.PENDING)
        self.assertEqual(record["next"]["a.example"], 300)
        self.assertIn("451 4.3.0 try later", record["state"]["a.example!bob"]["error"])
        s.replies["RCPT"] = "250 ok"
        self.clock.advance(299)
        yield self.settle(r)
        self.assertEqual(len(s.sessions), 1)
        self.clock.advance(1)
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(len(s.sessions), 2)

    def test_backoff_schedule(self):
        self.assertEqual([queue.backoff(n, 300, 3600) for n in range(7)],
                         [0, 300, 600, 1200, 2400, 3600, 3600])

    @defer.inlineCallbacks
    def test_permanent_failure_bounces_once_with_the_original_header(self):
        s = self.sink(replies={"RCPT TO:<eve@a.example>": "550 5.1.1 eve: no such user"})
        self.enqueue(["a.example!bob", "a.example!eve"])
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [bounce] = self.mbox("alice")  # the sender is ours: the bounce is local
        self.assertEqual(bounce.get_from().split()[0], "MAILER-DAEMON")
        self.assertEqual(bounce["Return-Path"], "<>")
        self.assertEqual(bounce.get_content_type(), "multipart/report")
        self.assertEqual(bounce.get_param("report-type"), "delivery-status")
        text, status, headers = bounce.get_payload()
        self.assertIn("<eve@a.example>: 550 5.1.1 eve: no such user", text.get_payload())
        report = status.as_string()
        self.assertIn("Final-Recipient: rfc822; eve@a.example", report)
        self.assertIn("Status: 5.1.1", report)
        self.assertIn("Remote-MTA: dns; mx.a.example", report)
        self.assertNotIn("bob@a.example", report)
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: queued mail", headers.get_payload())
        self.assertEqual(bounce["To"], "<alice@gnot.example.org>")

    @defer.inlineCallbacks
    def test_a_failure_is_returned_while_others_still_wait(self):
        s = self.sink(replies={"RCPT TO:<eve@a.example>": "550 5.1.1 eve: no such user",
                               "RCPT TO:<carol@a.example>": "451 4.3.0 later"})
        qid = self.enqueue(["a.example!eve", "a.example!carol"])
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [qid])
        [b] = self.mbox("alice")
        self.assertIn("eve@a.example", b.get_payload()[1].as_string())
        self.assertNotIn("carol@a.example", b.get_payload()[1].as_string())
        s.replies["RCPT TO:<carol@a.example>"] = "250 ok"
        self.clock.advance(300)
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(len(self.mbox("alice")), 1)  # eve was returned once only

    @defer.inlineCallbacks
    def test_expiry_bounces(self):
        s = self.sink(replies={"RCPT": "451 4.3.0 busy"})
        self.enqueue()
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        self.clock.advance(2 * 86400 + 1)
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [b] = self.mbox("alice")
        report = b.get_payload()[1].as_string()
        self.assertIn("Status: 4.4.7", report)
        self.assertIn("gave up after 2 days", report)

    @defer.inlineCallbacks
    def test_bounces_are_never_bounced(self):
        s = self.sink(replies={"RCPT": "550 5.1.1 no"})
        self.enqueue(sender="/dev/null")
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(self.mbox("alice"), [])
        self.assertEqual(len(s.sessions), 1)

    @defer.inlineCallbacks
    def test_remote_sender_gets_its_bounce_from_the_queue(self):
        s = self.sink(replies={"RCPT TO:<bob@a.example>": "550 5.1.1 bob: no such user"})
        self.enqueue(sender="far.example!zed")
        r = self.runner()
        yield self.until(lambda: len(s.sessions) == 2 and s.sessions[1].data)
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        bounce = s.sessions[1]
        self.assertEqual(bounce.commands[1:3], ["MAIL FROM:<>", "RCPT TO:<zed@far.example>"])
        msg = email.message_from_bytes(bounce.data.replace(b"\r\n", b"\n"))
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertIn("Final-Recipient: rfc822; bob@a.example", msg.as_string())

    @defer.inlineCallbacks
    def test_smarthost_takes_everything_in_one_connection(self):
        s = self.sink()
        self.enqueue(["a.example!bob", "b.example!carol"])
        r = self.runner(self.settings(smarthost="tcp!127.0.0.2!%d" % self.port))
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(len(s.sessions), 1)
        self.assertEqual(s.sessions[0].commands[2:4], ["RCPT TO:<bob@a.example>",
                                                       "RCPT TO:<carol@b.example>"])

    @defer.inlineCallbacks
    def test_restart_in_the_middle_delivers_each_recipient_once(self):
        a = self.sink()
        b = self.sink(interface="127.0.0.3", port=self.port, silent=("RCPT",))
        self.enqueue(["a.example!bob", "b.example!carol"])
        first = self.runner()
        yield defer.gatherResults([a.seen("."), b.seen("RCPT")])
        yield self.until(lambda: not any(k[1] == "a.example" for k in first.inflight))
        yield first.stopService()  # b's delivery is cut off mid-RCPT
        [qid] = self.jobs()
        record = queue.Queue(self.root.queue).load(qid)
        self.assertEqual(record["state"]["a.example!bob"]["status"], queue.DELIVERED)
        self.assertEqual(record["state"]["b.example!carol"]["status"], queue.PENDING)
        b.silent.clear()
        second = self.runner()
        yield b.seen(".")
        yield self.settle(second)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(sum(1 for sess in a.sessions if sess.data), 1)
        self.assertEqual([sess.commands[2] for sess in b.sessions if sess.data],
                         ["RCPT TO:<carol@b.example>"])

    @defer.inlineCallbacks
    def test_a_locked_job_is_left_to_its_runner(self):
        self.sink()
        qid = self.enqueue()
        fd = queue.Queue(self.root.queue).lock(qid)
        r = self.runner()
        yield self.settle(r)
        self.assertEqual(self.jobs(), [qid])
        os.close(fd)
        r.wake()
        self.clock.advance(0)
        yield self.sinks["127.0.0.2"].seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])


class HousekeepingTests(Case):
    @defer.inlineCallbacks
    def test_corrupt_job_is_quarantined_and_others_go_on(self):
        s = self.sink()
        with open(os.path.join(self.root.queue, "1.bad.env"), "w") as f:
            f.write("{not json")
        with open(os.path.join(self.root.queue, "1.bad.msg"), "w") as f:
            f.write("x")
        with open(os.path.join(self.root.queue, "2.nomsg.env"), "w") as f:
            json.dump({"sender": "a", "recipients": ["a.example!b"], "created": 0}, f)
        self.enqueue()
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root.queue, "corrupt"))),
                         ["1.bad.env", "1.bad.msg", "2.nomsg.env"])
        self.flushLoggedErrors()

    def test_orphan_messages_and_half_written_envelopes(self):
        q = queue.Queue(self.root.queue)
        for name in ("9.old.msg", "9.new.msg", "9.half.env.tmp"):
            with open(os.path.join(self.root.queue, name), "w") as f:
                f.write("x")
        os.utime(os.path.join(self.root.queue, "9.old.msg"), (0, 0))
        q.tidy(now=10 * 3600)
        self.assertEqual(sorted(os.listdir(self.root.queue)), ["9.new.msg", "corrupt"])
        self.flushLoggedErrors()

    def test_mailq_listing(self):
        q = queue.Queue(self.root.queue)
        self.clock.advance(1000)
        qid = self.enqueue(["a.example!bob", "b.example!carol"])
        record = q.load(qid)
        record["state"]["b.example!carol"] = {"status": "delivered"}
        record["state"]["a.example!bob"]["error"] = "451 4.3.0 try\nlater"
        q.save(record)
        size = os.path.getsize(q.paths(qid)[0])
        self.assertEqual(queue.listing(q, now=1000 + 7380), (
            "Queue ID                     Size  Age     Sender/Recipient (last error)\n"
            "%-24s %8d  2h03m   gnot.example.org!alice\n"
            "                                    a.example!bob  (451 4.3.0 try later)\n"
            "-- 1 message in the queue\n") % (qid, size))
        self.assertEqual(queue.listing(queue.Queue(os.path.join(self.dir, "none")), 0),
                         "Mail queue is empty\n")

    @defer.inlineCallbacks
    def test_flush_and_delete_from_upas_mailq(self):
        s = self.sink(replies={"RCPT": "451 4.3.0 later"})
        qid = self.enqueue()
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        out = io.StringIO()
        root = self.root.root
        self.assertEqual(tap_runq.mailq(["--root", root, "--flush"], out), 0)
        s.replies["RCPT"] = "250 ok"
        self.clock.advance(queue.FLUSH_POLL)  # the runner notices well before 300 s
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        qid = self.enqueue(["b.example!x"])  # nothing listens on 127.0.0.3 now
        yield self.settle(r)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(tap_runq.mailq(["--root", root, "--delete", qid], out, err), 0)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(tap_runq.mailq(["--root", root, "--delete", qid], out, err), 1)
        out = io.StringIO()
        tap_runq.mailq(["--root", root], out)
        self.assertEqual(out.getvalue(), "Mail queue is empty\n")

    @defer.inlineCallbacks
    def test_upas_runq_one_pass(self):
        import time
        s = self.sink()
        self.clock.advance(time.time())  # runq runs on the real clock: a fresh job
        self.enqueue()
        err = io.StringIO()
        code = yield tap_runq.runq(reactor, ["--root", self.root.root, "--mx-port",
                                             str(self.port), "--no-outbound-tls",
                                             "--sysname", "gnot.example.org"], err,
                                   resolver=testing.FakeResolver(ZONE))
        self.assertEqual(code, 0)
        self.assertIn("to=a.example!bob relay=(mx.a.example:127.0.0.2) status=sent",
                      err.getvalue())  # runq logs to stderr
        self.assertEqual(self.jobs(), [])
        self.assertEqual(len(s.sessions), 1)


class PureTests(unittest.TestCase):
    def test_groups_and_due(self):
        record = queue.normalize({"sender": "a", "created": 0,
                                  "recipients": ["x.example!a", "X.example!b", "y.example!c"]},
                                 "q")
        record["next"]["y.example"] = 100
        self.assertEqual(queue.due_groups(record, 50),
                         {"x.example": ["x.example!a", "X.example!b"]})
        self.assertEqual(queue.due_groups(record, 50, smarthost="tcp!r!25"),
                         {"smarthost": ["x.example!a", "X.example!b", "y.example!c"]})
        self.assertEqual(queue.next_due(record, busy={"x.example"}), 100)
        for bad in ({}, {"sender": "a", "recipients": [], "created": 0},
                    {"sender": "a", "recipients": ["x"], "created": "soon"}):
            with self.assertRaises(queue.CorruptJob):
                queue.normalize(dict(bad), "q")

    def test_dsn_status(self):
        from upasmail import bounce
        self.assertEqual(bounce.status_of("550 5.1.1 no"), "5.1.1")
        self.assertEqual(bounce.status_of("550 no code"), "5.0.0")
        self.assertEqual(bounce.status_of("451 4.3.0 x"), "5.3.0")

    def test_client_status_words(self):
        self.assertEqual(client.exit_code(""), 0)
