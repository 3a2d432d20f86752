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
import json
import os

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher

import test_client
import test_queue
from upasmail import client, queue, store, tap_runq, tap_smtp, testing


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
        # the random part may hold no letter, so qid.upper() could be qid itself
        for bad in (qid + "/", qid + "\n", qid[:-1] + "A", "x" + qid, qid[:-1], qid + "0",
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


# -- 2. control characters -------------------------------------------------------

class UpasSmtpAddressTests(test_client.Case):

    def upas_smtp(self, *argv):
        out, err = io.BytesIO(), io.StringIO()
        d = tap_smtp.run(reactor, ["--sysname", "gnot", ".example.org"] + list(argv),
                         io.BytesIO(test_client.MSG), out, err,
                         resolver=testing.FakeResolver())
        return d.addCallback(lambda code: (code, err.getvalue()))

    @defer.inlineCallbacks
    def test_newline_in_the_sender_is_refused_before_connecting(self):
        s = self.serve()
        dest = "tcp!127.0.0.2!%d" % self.port
        code, err = yield self.upas_smtp(dest, "al\nice", "bob")
        self.assertEqual(code, client.EX_UNAVAILABLE)
        self.assertEqual(err, "smtp: delivery from al\\nice failed: illegal address (%s)\n"
                              "Permanent Failure\n" % dest)
        self.assertEqual(s.sessions, [])

    @defer.inlineCallbacks
    def test_escaped_crlf_or_nul_in_a_recipient_is_refused_before_connecting(self):
        s = self.serve()
        dest = "tcp!127.0.0.2!%d" % self.port
        code, err = yield self.upas_smtp(dest, "alice", "bob", "eve%0D%0ARSET", "x\0y")
        self.assertEqual(code, client.EX_UNAVAILABLE)
        self.assertEqual(err.splitlines(), [
            "smtp: delivery to eve%%0D%%0ARSET failed: illegal address (%s)" % dest,
            "smtp: delivery to x\\x00y failed: illegal address (%s)" % dest,
            "Permanent Failure"])
        self.assertEqual(s.sessions, [])


class LibraryAddressTests(test_client.Case):

    @defer.inlineCallbacks
    def test_a_bad_recipient_is_refused_alone_and_never_sent(self):
        s = self.serve()
        result = yield self.deliver(rcpts=("bob@example.net", "eve@example.net\r\nRSET",
                                           "carol@example.net"))
        self.assertEqual(self.commands(), [
            "EHLO gnot.example.org", "MAIL FROM:<alice@gnot.example.org>",
            "RCPT TO:<bob@example.net>", "RCPT TO:<carol@example.net>", "DATA", "QUIT"])
        self.assertIn(b"To: bob@example.net, carol@example.net\r\n", s.sessions[-1].data)
        self.assertEqual(result.status, client.PERMANENT)  # upas: a partial failure
        self.assertEqual([r.status for r in result.recipients],
                         [client.DELIVERED, client.PERMANENT_FAILURE, client.DELIVERED])
        self.assertEqual(result.recipients[1].reply, "delivery to eve@example.net\\r\\nRSET "
                                                     "failed: illegal address")
        self.assertTrue(all(line.isprintable() for line in result.report), result.report)

    @defer.inlineCallbacks
    def test_only_bad_addresses_make_no_connection(self):
        s = self.serve()
        for sender, rcpts in (("alice", ["bob\n"]), ("al\x1bice", ["bob@example.net"])):
            result = yield self.deliver(sender=sender, rcpts=rcpts)
            self.assertEqual(result.status, client.PERMANENT)
            self.assertEqual(result.recipients[0].status, client.PERMANENT_FAILURE)
            self.assertIn("illegal address", result.report[0])
        self.assertEqual(s.sessions, [])

    @defer.inlineCallbacks
    def test_odd_bytes_in_replies_stay_inside_one_log_line(self):
        events = capture_log(self)
        self.serve(replies={"RCPT TO:<eve@example.net>":
                            "550-5.1.1 no\r\n550 eve\rFAKE: injected\x1b[2J\x00",
                            "RCPT TO:<bob@example.net>": "250 ok\x85NEL"})
        result = yield self.deliver(rcpts=("bob@example.net", "eve@example.net"))
        self.assertEqual(result.recipients[1].reply,
                         "550-5.1.1 no\n550 eve?FAKE: injected?[2J?")
        lines = texts(events, "smtp", "smtp.fail")
        self.assertTrue(any("injected" in line for line in lines))
        for line in lines:
            self.assertTrue(line.isprintable(), repr(line))


class QueueAddressTests(test_queue.Case):

    @defer.inlineCallbacks
    def test_a_queued_recipient_with_a_newline_is_bounced_alone_never_sent(self):
        s = self.sink()
        self.enqueue(["a.example!bob", "a.example!eve\nRSET"])
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual([c for c in s.sessions[-1].commands if c.startswith("RCPT")],
                         ["RCPT TO:<bob@a.example>"])
        self.assertNotIn("RSET", s.sessions[-1].commands)
        self.assertEqual(self.jobs(), [])
        [dsn] = self.mbox("alice")
        text = dsn.as_string()
        self.assertIn("Final-Recipient: rfc822; eve\\nRSET@a.example\n", text)
        self.assertIn("delivery to a.example!eve\\nRSET failed: illegal address", text)


# -- 3. the final reply and the queue id -------------------------------------------

class QueueLogTests(test_queue.Case):

    @defer.inlineCallbacks
    def test_delivered_recipients_get_the_final_reply_refused_ones_the_rcpt_reply(self):
        events = capture_log(self)
        s = self.sink(replies={"RCPT": "250 2.1.5 ok",
                               "RCPT TO:<carol@a.example>": "451 4.2.0 later",
                               "RCPT TO:<eve@a.example>": "550 5.1.1 no eve",
                               ".": "250 2.0.0 Ok: queued as 4Xyz"})
        qid = self.enqueue(["a.example!bob", "a.example!carol", "a.example!eve"])
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        lines = texts(events, "queue")
        relay = "relay=(mx.a.example:127.0.0.2)"
        for rcpt, word, reply in (("bob", "sent", "250 2.0.0 Ok: queued as 4Xyz"),
                                  ("carol", "deferred", "451 4.2.0 later"),
                                  ("eve", "bounced", "550 5.1.1 no eve")):
            self.assertIn("%s: to=a.example!%s %s status=%s (%s)" % (qid, rcpt, relay, word,
                                                                     reply), lines)
        with open(os.path.join(self.root.queue, qid + ".env")) as f:
            state = json.load(f)["state"]  # carol keeps the job in the queue
        self.assertEqual(state["a.example!bob"]["reply"], "250 2.0.0 Ok: queued as 4Xyz")

    @defer.inlineCallbacks
    def test_every_client_line_of_a_queue_delivery_starts_with_the_queue_id(self):
        events = capture_log(self)
        s = self.sink(replies={"RCPT TO:<eve@a.example>": "550 5.1.1 no eve"})
        qid = self.enqueue(["a.example!bob", "a.example!eve"])
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        lines = texts(events, "smtp", "smtp.fail")
        self.assertTrue(any(" sent " in line and " bytes to " in line for line in lines))
        self.assertTrue(any("eve@a.example" in line for line in lines))  # the refusal
        for line in lines:
            self.assertTrue(line.startswith(qid + ": "), line)
        for e in events:
            if e.get("log_namespace") in ("smtp", "smtp.fail"):
                self.assertEqual(e["queue_id"], qid)

    @defer.inlineCallbacks
    def test_upas_smtp_lines_have_no_queue_id(self):
        events = capture_log(self)
        s = testing.ScriptedSMTPServer()
        port = s.listen(reactor, "127.0.0.2")
        self.addCleanup(port.stopListening)
        result = yield client.deliver(
            io.BytesIO(test_client.MSG), "tcp!127.0.0.2!%d" % port.getHost().port, "alice",
            ["bob@example.net"], client.ClientOptions(sysname="gnot"), reactor,
            testing.FakeResolver(), self.clock)
        yield defer.gatherResults([x.closed for x in s.sessions])
        self.assertEqual(result.status, "")
        lines = texts(events, "smtp")
        self.assertTrue(lines)
        self.assertTrue(all(line.startswith("alice sent ") for line in lines), lines)
