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


# -- connection reuse and pipelining ------------------------------------------------

from twisted.internet import protocol, reactor  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols import basic  # noqa: E402

import test_queue  # noqa: E402
from upasmail import convert, mxdial  # noqa: E402


class ReuseTests(test_queue.Case):
    @defer.inlineCallbacks
    def test_messages_to_one_destination_share_a_connection(self):
        s = self.sink()
        qids = [self.enqueue(["a.example!u%d" % i]) for i in range(5)]
        r = self.runner(self.settings(max_per_destination=1))
        yield self.until(lambda: not self.jobs())
        yield self.settle(r)
        self.assertEqual(len(s.sessions), 1)
        verbs = [c.split(" ", 1)[0].split(":", 1)[0] for c in s.sessions[0].commands]
        self.assertEqual(verbs, ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 5)
        self.assertEqual(s.sessions[0].data.count(b"Subject: queued mail"), len(qids))
        self.clock.advance(r.connections.idle)  # no next message: QUIT
        yield s.seen("QUIT")

    @defer.inlineCallbacks
    def test_a_connection_carries_at_most_max_messages(self):
        s = self.sink()
        for i in range(5):
            self.enqueue(["a.example!u%d" % i])
        r = self.runner(self.settings(max_per_destination=1))
        r.connections.max_messages = 2
        yield self.until(lambda: not self.jobs())
        yield self.settle(r)
        self.assertEqual([sum(c.startswith("MAIL") for c in sess.commands)
                          for sess in s.sessions], [2, 2, 1])

    @defer.inlineCallbacks
    def test_refused_recipients_end_the_connection_with_quit(self):
        s = self.sink(replies={"RCPT": "550 no such user"})
        self.enqueue(["a.example!eve"])
        self.enqueue(["a.example!mallory"])
        r = self.runner(self.settings(max_per_destination=1))
        yield self.until(lambda: len(s.sessions) == 2)
        yield s.sessions[1].closed
        yield self.settle(r)
        self.assertEqual([sess.commands[-1] for sess in s.sessions], ["QUIT", "QUIT"])


class _DroppingSMTP(basic.LineOnlyReceiver):
    """Finishes ``keep`` messages on the first connection, then drops it at the next
    ``drop_at`` (``MAIL``: before the transaction; ``.``: after the message, before
    its reply).  Later connections behave."""

    def connectionMade(self):
        self.sink = self.factory.sink
        self.sink.connections += 1
        self.first = self.sink.connections == 1
        self.data = None
        self.sendLine(b"220 drop.example ESMTP")

    def lineReceived(self, line):
        if self.data is not None:
            if line != b".":
                self.data.append(line)
                return
            done, self.data = b"\r\n".join(self.data), None
            if self.first and self.sink.drop_at == "." and self.sink.kept == self.sink.keep:
                self.sink.lost.append(done)
                self.transport.loseConnection()
                return
            self.sink.messages.append(done)
            self.sink.kept += self.first
            self.sendLine(b"250 2.0.0 queued")
            return
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"MAIL" and self.first and self.sink.drop_at == "MAIL" and \
                self.sink.kept == self.sink.keep:
            self.transport.loseConnection()
            return
        if verb == b"DATA":
            self.data = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


class _DroppingSink(protocol.ServerFactory):
    protocol = _DroppingSMTP

    def __init__(self, keep, drop_at):
        self.sink = self
        self.keep, self.drop_at = keep, drop_at
        self.kept = 0
        self.connections = 0
        self.messages = []
        self.lost = []  # messages sent whose reply never came


class DroppedConnectionTests(test_queue.Case):
    def dropping_sink(self, keep, drop_at):
        sink = _DroppingSink(keep, drop_at)
        listening = reactor.listenTCP(0, sink, interface="127.0.0.2")
        self.port = listening.getHost().port
        self.addCleanup(listening.stopListening)
        return sink

    def subjects(self, messages):
        return sorted(m.split(b"X-N: ", 1)[1].split(b"\r\n", 1)[0] for m in messages)

    def enqueue_numbered(self, n):
        return [self.enqueue(["a.example!u%d" % i], data=test_queue.MESSAGE.replace(
            b"\n\nhello", b"\nX-N: %d\n\nhello" % i)) for i in range(n)]

    @defer.inlineCallbacks
    def test_a_server_that_drops_an_idle_connection_loses_nothing(self):
        sink = self.dropping_sink(keep=2, drop_at="MAIL")
        self.enqueue_numbered(4)
        r = self.runner(self.settings(max_per_destination=1))
        yield self.until(lambda: not self.jobs())
        yield self.settle(r)
        # the message that found the connection gone went on a new one, at once
        self.assertEqual(self.subjects(sink.messages), [b"0", b"1", b"2", b"3"])
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_a_server_that_drops_after_the_message_gets_it_again_later(self):
        sink = self.dropping_sink(keep=1, drop_at=".")
        self.enqueue_numbered(3)
        r = self.runner(self.settings(max_per_destination=1))
        yield self.until(lambda: len(self.jobs()) == 1 and not r.inflight)
        yield self.settle(r)
        # no reply to the second message: it waits for its retry, the rest went on
        self.assertEqual(len(sink.lost), 1)
        [left] = self.jobs()
        self.assertEqual(len(sink.messages), 2)
        self.clock.advance(r.settings.retry_min)
        yield self.until(lambda: not self.jobs())
        yield self.settle(r)
        # every message exactly once among those that got a 250
        self.assertEqual(self.subjects(sink.messages), [b"0", b"1", b"2"])


class PipeliningTests(unittest.TestCase):
    def conversation(self, rcpts):
        self.clock = task.Clock()
        self.transport = StringTransport()
        wire = client.Wire(self.clock)
        wire.makeConnection(self.transport)
        options = client.ClientOptions(sysname="gnot.example.org", domain="example.org")
        message = convert.OutboundMessage(__import__("io").BytesIO(MESSAGE),
                                          "gnot.example.org!alice", options.hostdomain)
        self.results = [client.RecipientResult(r) for r in rcpts]
        conv = client.Conversation(wire, options, message, "gnot.example.org!alice",
                                   self.results, "tcp!a.example", "a.example", "a.example",
                                   mxdial.Target("127.0.0.2", 25), self.clock)
        conv.offered = frozenset(["PIPELINING", "8BITMIME"])
        self.wire = wire
        return conv

    def sent(self):
        out = self.transport.value()
        self.transport.clear()
        return out

    def test_mail_and_rcpts_go_together_and_each_reply_is_kept(self):
        conv = self.conversation(["a.example!bob", "a.example!eve", "a.example!carol"])
        d = conv.transaction()
        self.assertEqual(self.sent(), b"MAIL FROM:<alice@gnot.example.org>\r\n"
                         b"RCPT TO:<bob@a.example>\r\nRCPT TO:<eve@a.example>\r\n"
                         b"RCPT TO:<carol@a.example>\r\n")
        self.wire.dataReceived(b"250 ok\r\n250 bob ok\r\n550 5.1.1 no eve\r\n")
        self.assertEqual(self.sent(), b"")  # DATA waits for every RCPT reply
        self.wire.dataReceived(b"250 carol ok\r\n")
        self.assertEqual(self.sent(), b"DATA\r\n")
        self.wire.dataReceived(b"354 go\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertTrue(self.sent().endswith(b"\r\n.\r\n"))
        self.wire.dataReceived(b"250 2.0.0 queued as X\r\n")
        self.assertEqual(self.successResultOf(d), client.PERMANENT)
        self.assertEqual([(r.status, r.reply) for r in self.results], [
            (client.DELIVERED, "250 2.0.0 queued as X"),
            (client.PERMANENT_FAILURE, "550 5.1.1 no eve"),
            (client.DELIVERED, "250 2.0.0 queued as X")])
        self.assertTrue(conv.clean)

    def test_a_refused_sender_reads_every_reply_and_sends_no_data(self):
        conv = self.conversation(["a.example!bob"])
        d = conv.transaction()
        self.sent()
        self.wire.dataReceived(b"553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n")
        f = self.failureResultOf(d, client.Failed)
        self.assertEqual(str(f.value.reply), "553 5.1.8 bad sender")
        self.assertEqual(self.sent(), b"")
        self.assertFalse(conv.clean)
        self.assertEqual(self.results[0].rcpt, "")

    def test_without_pipelining_each_command_waits(self):
        conv = self.conversation(["a.example!bob", "a.example!carol"])
        conv.offered = frozenset()
        conv.transaction()
        self.assertEqual(self.sent(), b"MAIL FROM:<alice@gnot.example.org>\r\n")
        self.wire.dataReceived(b"250 ok\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<bob@a.example>\r\n")


class GroupCommitTests(Case):
    def test_outcomes_of_jobs_that_finish_together_share_fsyncs(self):
        qids = [self.enqueue("far.example!u%d" % i) for i in range(6)]
        pending = []

        def later(f, *args):  # a thread pool that the test lets run
            d = defer.Deferred()
            pending.append((f, args, d))
            return d

        synced = []
        real_fsync = queue.fsync_paths

        def fsync_paths(paths):
            synced.extend(paths)
            return real_fsync(paths)

        self.patch(queue, "fsync_paths", fsync_paths)
        self.root.run_blocking = later
        settings = testing.make_settings("", root=self.root.root, outbound_tls=False,
                                         smarthost="tcp!192.0.2.1!25", max_per_destination=10)
        r = queue.QueueRunner(self.root, settings, None, None, self.clock, deliver=self.deliver)
        r.startService()
        self.addCleanup(lambda: r.stopService() if r.running else None)
        self.clock.advance(0)
        self.assertEqual(sorted(q for q, _ in self.delivered), sorted(qids))
        while pending:
            f, args, d = pending.pop(0)
            d.callback(f(*args))
        self.assertEqual(self.jobs(), [])
        # 6 outcomes and 6 removals: before, 6 x (outcome, save again, removal)
        # = 18 fsyncs of the directory; now a batch shares one
        self.assertLessEqual(synced.count(self.root.queue), 4)
        self.assertEqual(r.writes.batches, synced.count(self.root.queue))

    def test_a_delivered_job_is_removed_with_its_outcome(self):
        synced = []
        real_apply = queue.Queue.apply

        def apply(q, writes):
            synced.append([w.record is None for w in writes])
            return real_apply(q, writes)

        self.patch(queue.Queue, "apply", apply)
        self.runner()
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual(synced, [[True]])  # one removal, no envelope written first
        self.assertEqual(self.jobs(), [])

    def test_a_job_left_with_everything_delivered_is_removed_at_start_up(self):
        qid = self.waiting_job(wait=0)
        path = os.path.join(self.root.queue, qid + ".env")
        with open(path) as f:
            record = json.load(f)
        record["state"] = {"far.example!x": {"status": queue.DELIVERED}}
        with open(path, "w") as f:
            json.dump(record, f)
        self.runner()
        self.assertEqual(self.jobs(), [])
        self.assertEqual(self.delivered, [])


class SecondRunnerTests(Case):
    def test_a_record_from_the_hook_yields_to_what_another_runner_wrote(self):
        r = self.runner()
        r.stopService()  # the hook is ours; no scan runs until we say
        r.startService()
        qid = self.enqueue()
        self.assertIn(qid, r.fresh)
        # meanwhile upas-runq delivered it and saved that (a new envelope)
        q = queue.Queue(self.root.queue)
        record = q.load(qid)
        record["state"]["far.example!bob"]["status"] = queue.DELIVERED
        q.save(record)
        del self.loads[:]
        self.clock.advance(0)
        self.assertEqual(self.delivered, [])  # not sent again
        self.assertEqual(self.loads, [qid])  # the handed-over record was stale: read
        self.assertEqual(self.jobs(), [])  # the other runner's outcome finished here


class FullTests(Case):
    def test_a_full_runner_waits_for_a_delivery_to_end_not_in_a_loop(self):
        for _ in range(3):
            self.enqueue()
        hanging = []

        def deliver(*args, **kw):
            hanging.append(defer.Deferred())
            return hanging[-1]

        self.deliver = deliver
        scans = []
        real_scan = queue.QueueRunner.scan

        def scan(runner):
            scans.append(1)
            if len(scans) > 50:
                raise AssertionError("scanning in a loop while full")
            return real_scan(runner)

        self.patch(queue.QueueRunner, "scan", scan)
        settings = testing.make_settings("", root=self.root.root, outbound_tls=False,
                                         smarthost="tcp!192.0.2.1!25", max_deliveries=1)
        r = queue.QueueRunner(self.root, settings, None, None, self.clock, deliver=deliver)
        r.startService()
        self.addCleanup(r.stopService)

        def answer():  # each delivery ends (a temporary failure), so the runner can stop
            for d in hanging:
                d.callback(client.Result(client.RETRY, [client.RecipientResult(
                    "far.example!bob", status=client.TEMPORARY, reply="451 later")]))

        self.addCleanup(answer)
        for _ in range(5):
            self.clock.advance(1)
        self.assertEqual(len(hanging), 1)
        self.assertLessEqual(len(scans), 3)

    def test_a_long_start_up_lets_other_events_in(self):
        for _ in range(queue.SCAN_BATCH + 20):
            self.waiting_job()
        settings = testing.make_settings("", root=self.root.root, outbound_tls=False,
                                         smarthost="tcp!192.0.2.1!25")
        r = queue.QueueRunner(self.root, settings, None, None, self.clock,
                              deliver=self.deliver)
        r.startService()
        self.addCleanup(r.stopService)
        r.scan()  # one turn reads at most SCAN_BATCH envelopes
        self.assertEqual(len(self.loads), queue.SCAN_BATCH)
        self.clock.advance(0)  # the rest in the next turns
        self.assertEqual(len(self.loads), queue.SCAN_BATCH + 20)
        self.assertEqual(len(r.due_at), queue.SCAN_BATCH + 20)

    def test_one_pass_takes_every_due_job_however_many_turns(self):
        for _ in range(queue.SCAN_BATCH + 5):
            self.waiting_job(wait=0)
        settings = testing.make_settings("", root=self.root.root, outbound_tls=False,
                                         smarthost="tcp!192.0.2.1!25")
        r = queue.QueueRunner(self.root, settings, None, None, self.clock,
                              deliver=self.deliver, once=True)
        at_the_end = []
        r.done.addCallback(lambda _: at_the_end.append(len(self.delivered)))
        r.startService()
        self.addCleanup(r.stopService)
        self.clock.advance(0)
        self.assertEqual(at_the_end, [queue.SCAN_BATCH + 5])  # the pass ended after all
        self.assertEqual(self.jobs(), [])
