"""Client outcomes as types: every ending of a delivery is an ``Outcome``
(delivered / retry / give up) with upas's status text and the exit code.

No sockets: the reactor is a ``MemoryReactorClock`` and the server is a
transport that answers the Wire's commands from a table.
"""

import io

from OpenSSL import crypto
from twisted.internet import error, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.trial import unittest

from upasmail import client, convert, mxdial, replies, testing, thumbprint

MSG = b"Subject: test\n\nbody\n"
SENDER = "gnot.example.org!alice"
REPLIES = {"EHLO": "250-mx.example\r\n250 8BITMIME", "HELO": "250 hi", "MAIL": "250 ok",
           "RCPT": "250 ok", "DATA": "354 go", ".": "250 2.0.0 queued as X",
           "QUIT": "221 bye", "STARTTLS": "220 go ahead", "AUTH": "235 ok"}


class ScriptedServer(testing.FakeTLSTransport):
    """The server's side of a Wire: each command gets the reply it has in
    ``replies``, else the one its verb has (none: silence), on the next
    turn of the clock, as from a real peer; the message gets the reply of
    ``"."``."""

    def __init__(self, clock, replies_by_verb, greeting="220 mx.example ESMTP", cert=None):
        testing.FakeTLSTransport.__init__(self)
        self.clock = clock
        self.replies = dict(REPLIES, **replies_by_verb)
        self.greeting = greeting
        self.cert = cert
        self.commands = []
        self.pending = b""
        self.in_data = False
        self.wire = None

    def attach(self, wire):
        self.wire = wire
        wire.makeConnection(self)
        if self.greeting is not None:
            self.answer(self.greeting)

    def answer(self, text):
        self.clock.callLater(0, self.wire.dataReceived, text.encode() + b"\r\n")

    def write(self, data):
        testing.FakeTLSTransport.write(self, data)
        self.pending += data
        if self.in_data:
            if self.pending.endswith(b"\r\n.\r\n"):
                self.in_data, self.pending = False, b""
                self.respond(".", ".")
            return
        while b"\r\n" in self.pending:
            line, self.pending = self.pending.split(b"\r\n", 1)
            command = line.decode()
            self.commands.append(command)
            self.respond(command, command.split()[0].split(":")[0].upper())

    def respond(self, command, verb):
        reply = self.replies.get(command, self.replies.get(verb))
        if reply is None:
            return
        self.in_data = verb == "DATA" and reply.startswith("3")
        self.answer(reply)

    def startTLS(self, contextFactory):
        testing.FakeTLSTransport.startTLS(self, contextFactory)
        self.wire.handshakeCompleted()

    def getPeerCertificate(self):
        return self.cert

    def loseConnection(self):
        if not self.wire.closed:
            self.wire.connectionLost(Failure(error.ConnectionDone()))

    abortConnection = loseConnection


class Case(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def options(self, **kw):
        kw.setdefault("sysname", "gnot.example.org")
        kw.setdefault("domain", "example.org")
        return client.ClientOptions(**kw)

    def deliver(self, dest="tcp!127.0.0.2!25", sender=SENDER, rcpts=("bob@example.net",),
                zone=None, failing=(), **kw):
        resolver = testing.FakeResolver(zone or {}, failing=failing)
        return client.deliver(io.BytesIO(MSG), dest, sender, rcpts, self.options(**kw),
                              self.reactor, resolver, self.reactor)

    def connected(self, replies_by_verb=None, index=-1, **kw):
        """Answer the connection attempt ``index`` with a scripted server."""
        factory = self.reactor.tcpClients[index][2]
        server = ScriptedServer(self.reactor, replies_by_verb or {}, **kw)
        server.attach(factory.buildProtocol(None))
        return server

    def refused(self, reason, index=-1):
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(reason))

    def settle(self, d, server=None):
        """Turn the clock (and pull the message) until ``d`` has fired."""
        for _ in range(100):
            if d.called:
                break
            self.reactor.advance(0)
            if server is not None and server.producer is not None:
                server.producer.resumeProducing()
        return self.successResultOf(d)

    def assertOutcome(self, result, kind, status, code, detail=None):
        o = result.outcome
        self.assertEqual((o.kind, o.status, o.exit_code), (kind, status, code))
        self.assertEqual((result.status, result.exit_code), (status, code))  # the old fields
        if detail is not None:
            self.assertEqual(o.detail, detail)
        self.assertEqual(o.detail, result.report[-1] if result.report else status)


class EndingTests(Case):
    def test_delivered(self):
        d = self.deliver()
        server = self.connected()
        r = self.settle(d, server)
        self.assertOutcome(r, client.Kind.DELIVERED, "", 0, "")
        self.assertEqual([x.status for x in r.recipients], [client.DELIVERED])
        self.assertEqual(server.commands[-1], "QUIT")

    def test_every_step_4xx_retries_and_5xx_gives_up(self):
        steps = [  # (replies, the failing reply, the phase)
            ({}, "greeting", "hello"),
            ({"EHLO": None}, "EHLO", "hello"),
            ({"EHLO": "500 what", "HELO": None}, "HELO", "hello"),
            ({}, "MAIL", "mailfrom"),
            ({}, "RCPT", "rcptto"),
            ({}, "DATA", "data"),
            ({}, ".", "data"),
        ]
        for base, step, phase in steps:
            for code, kind, status, exit in (
                    ("451 4.3.0 not now", client.Kind.RETRY, client.RETRY, 75),
                    ("554 5.7.1 no", client.Kind.GIVE_UP, client.PERMANENT, 69)):
                if step == "EHLO" and exit == 69:
                    continue  # EHLO's 5xx is answered with HELO: the next step
                with self.subTest(step=step, reply=code):
                    self.reactor = MemoryReactorClock()
                    d = self.deliver()
                    if step == "greeting":
                        server = self.connected(base, greeting=code)
                    else:
                        server = self.connected(dict(base, **{step: code}))
                    r = self.settle(d, server)
                    self.assertOutcome(r, kind, status, exit, code)
                    self.assertEqual(r.phase, phase)
                    want = client.TEMPORARY if exit == 75 else client.PERMANENT_FAILURE
                    self.assertEqual([(x.status, x.reply) for x in r.recipients],
                                     [(want, code)])

    def test_a_refused_and_a_deferred_recipient_give_up_each_keeps_its_own(self):
        # upas: once a RCPT got a 5xx the transaction's ending is permanent;
        # the deferred recipient keeps its own temporary status for the queue
        d = self.deliver(rcpts=("bob@example.net", "eve@example.net"))
        server = self.connected({"RCPT": "550 5.1.1 no bob",
                                 "RCPT TO:<eve@example.net>": "452 4.2.2 full"})
        r = self.settle(d, server)
        self.assertOutcome(r, client.Kind.GIVE_UP, client.PERMANENT, 69, "452 4.2.2 full")
        self.assertEqual([x.status for x in r.recipients],
                         [client.PERMANENT_FAILURE, client.TEMPORARY])

    def test_a_partial_delivery_gives_up_on_the_rest(self):
        d = self.deliver(rcpts=("bob@example.net", "eve@example.net"))
        server = self.connected({"RCPT TO:<eve@example.net>": "550 5.1.1 no eve"})
        r = self.settle(d, server)
        self.assertOutcome(r, client.Kind.GIVE_UP, client.PERMANENT, 69)
        self.assertIn("550 5.1.1 no eve", r.outcome.detail)
        self.assertEqual([x.status for x in r.recipients],
                         [client.DELIVERED, client.PERMANENT_FAILURE])

    def test_auth_failure_retries_and_no_method_gives_up_with_its_own_status(self):
        creds = dict(auth=True, auth_in_clear=True, credentials=lambda s, u: ("alice", "pw"))
        d = self.deliver(**creds)
        server = self.connected({"EHLO": "250-mx\r\n250 AUTH PLAIN", "AUTH": "454 4.7.0 later"})
        self.assertOutcome(self.settle(d, server), client.Kind.RETRY, client.RETRY, 75,
                           "454 4.7.0 later")
        self.reactor = MemoryReactorClock()
        d = self.deliver(**creds)
        server = self.connected({"EHLO": "250-mx\r\n250 AUTH GSSAPI"})
        self.assertOutcome(self.settle(d, server), client.Kind.GIVE_UP, replies.NO_AUTH_METHOD,
                           69)

    def test_an_unlisted_certificate_gives_up(self):
        cert, _ = testing.self_signed_pem("mx.example")
        x509 = crypto.load_certificate(crypto.FILETYPE_PEM, cert)
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, x509)
        for pins, kind, status, code in (
                (thumbprint.Thumbprints(set()), client.Kind.GIVE_UP, client.PERMANENT, 69),
                (thumbprint.Thumbprints(thumbprint.parse(thumbprint.line_for(der))),
                 client.Kind.DELIVERED, "", 0)):
            self.reactor = MemoryReactorClock()
            d = self.deliver(starttls=True, thumbprints=pins)
            server = self.connected({"EHLO": "250-mx\r\n250 STARTTLS"}, cert=x509)
            r = self.settle(d, server)
            self.assertOutcome(r, kind, status, code)
            if code:
                self.assertIn("not recognized", r.report[0])
                self.assertNotIn("MAIL", " ".join(server.commands))

    def test_connection_refused_and_connect_timeout_retry(self):
        for reason, text in ((error.ConnectionRefusedError(), "connection refused"),
                             (error.TimeoutError(), "connect timed out")):
            self.reactor = MemoryReactorClock()
            d = self.deliver()
            self.refused(reason)
            r = self.settle(d)
            self.assertOutcome(r, client.Kind.RETRY, client.RETRY, 75)
            self.assertIn(text, r.outcome.detail)
            self.assertEqual([x.status for x in r.recipients], [client.TEMPORARY])

    def test_a_silent_server_times_out_and_retries(self):
        d = self.deliver()
        self.connected(greeting=None)
        self.reactor.advance(10 * 60)
        r = self.successResultOf(d)
        self.assertOutcome(r, client.Kind.RETRY, client.RETRY, 75,
                           replies.REPORT_TIMEOUT.format(addr="tcp!127.0.0.2!25"))

    def test_illegal_addresses_give_up_before_dialling(self):
        r = self.successResultOf(self.deliver(sender="al\nice"))
        self.assertOutcome(r, client.Kind.GIVE_UP, client.PERMANENT, 69)
        self.assertIn("illegal address", r.outcome.detail)
        r = self.successResultOf(self.deliver(rcpts=("bob\r\n@example.net",)))
        self.assertOutcome(r, client.Kind.GIVE_UP, client.PERMANENT, 69)
        r = self.successResultOf(self.deliver(dest="net![192.0.2.1]"))
        self.assertOutcome(r, client.Kind.GIVE_UP, client.PERMANENT, 69)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_the_kind_is_not_read_from_words_in_a_text(self):
        # upas gives up on any dial error saying "illegal", "unknown" or
        # "can't translate": a mail server so named would bounce mail on a
        # refused connection, and a DNS failure for the gateway would too
        zone = {"unknown.example": [dns.Record_A("127.0.0.2")]}
        d = self.deliver(dest="tcp!unknown.example!25", zone=zone)
        self.refused(error.ConnectionRefusedError())
        r = self.settle(d)
        self.assertOutcome(r, client.Kind.RETRY, client.RETRY, 75)
        self.assertIn("unknown.example", r.outcome.detail)
        d = self.deliver(dest="tcp!nowhere.example!25", gateway="tcp!gw.example!25",
                         failing=["gw.example"])
        r = self.settle(d)
        self.assertOutcome(r, client.Kind.RETRY, client.RETRY, 75)
        self.assertIn("can't translate gateway gw.example", r.outcome.detail)


class OutcomeTests(unittest.TestCase):
    def test_statuses_and_exit_codes(self):
        self.assertEqual((client.Outcome.delivered().status,
                          client.Outcome.delivered().exit_code), ("", client.EX_OK))
        self.assertEqual((client.Outcome.retry().status, client.Outcome.retry().exit_code),
                         ("Retry, Temporary Failure", client.EX_TEMPFAIL))
        self.assertEqual((client.Outcome.give_up().status,
                          client.Outcome.give_up().exit_code),
                         ("Permanent Failure", client.EX_UNAVAILABLE))

    def test_a_result_built_from_a_status_has_its_outcome(self):
        r = client.Result(client.RETRY, [], ["why"])
        self.assertEqual((r.outcome.kind, r.outcome.detail, r.exit_code),
                         (client.Kind.RETRY, "why", 75))
        self.assertEqual(client.Result("", []).outcome.kind, client.Kind.DELIVERED)
        self.assertEqual(client.exit_code(replies.NO_AUTH_METHOD), 69)
        with self.assertRaises(ValueError):
            client.Result(client.RETRY, [], outcome=client.Outcome.give_up())


class ConversationTests(unittest.TestCase):
    """A Conversation over a StringTransport, the clock a task.Clock: each
    command is read off the transport and each reply fed in by hand."""

    def conversation(self, rcpts):
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.wire = client.Wire(self.clock)
        self.wire.makeConnection(self.transport)
        options = client.ClientOptions(sysname="gnot.example.org", domain="example.org")
        message = convert.OutboundMessage(io.BytesIO(MSG), SENDER, options.hostdomain)
        self.results = [client.RecipientResult(r) for r in rcpts]
        return client.Conversation(self.wire, options, message, SENDER, self.results,
                                   "tcp!a.example", "a.example", "a.example",
                                   mxdial.Target("192.0.2.1", 25), self.clock)

    def exchange(self, reply, want):
        """Feed ``reply``; the client must answer with ``want``."""
        self.wire.dataReceived(reply)
        out = self.transport.value()
        self.transport.clear()
        self.assertEqual(out, want)

    def test_a_whole_delivery(self):
        conv = self.conversation(["a.example!bob"])
        d = conv.run()
        self.exchange(b"220 a.example ESMTP\r\n", b"EHLO gnot.example.org\r\n")
        self.exchange(b"250-a.example\r\n250 8BITMIME\r\n",
                      b"MAIL FROM:<alice@gnot.example.org>\r\n")
        self.exchange(b"250 ok\r\n", b"RCPT TO:<bob@a.example>\r\n")
        self.exchange(b"250 ok\r\n", b"DATA\r\n")
        self.wire.dataReceived(b"354 go\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        body = self.transport.value()
        self.transport.clear()
        self.assertIn(b"\r\nbody\r\n.\r\n", body)
        self.wire.dataReceived(b"250 2.0.0 queued as X\r\n")
        self.assertEqual(self.successResultOf(d), "")
        self.assertEqual(conv.outcome, client.Outcome.delivered())
        self.assertEqual([(r.status, r.reply) for r in self.results],
                         [(client.DELIVERED, "250 2.0.0 queued as X")])
        self.assertTrue(conv.ready_for_more())
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 10 * 60)  # armed

    def test_a_4xx_rcpt_sends_no_data_and_retries(self):
        conv = self.conversation(["a.example!bob"])
        d = conv.run()
        self.exchange(b"220 a.example ESMTP\r\n", b"EHLO gnot.example.org\r\n")
        self.exchange(b"250 a.example\r\n", b"MAIL FROM:<alice@gnot.example.org>\r\n")
        self.exchange(b"250 ok\r\n", b"RCPT TO:<bob@a.example>\r\n")
        self.exchange(b"450 4.2.0 mailbox busy\r\n", b"")
        f = self.failureResultOf(d, client.Failed)
        self.assertEqual(f.value.outcome.kind, client.Kind.RETRY)
        self.assertEqual((f.value.status, f.value.outcome.exit_code), (client.RETRY, 75))
        self.assertEqual(str(f.value.reply), "450 4.2.0 mailbox busy")
        self.assertEqual([r.status for r in self.results], [client.TEMPORARY])
        self.assertEqual(conv.phase, "rcptto")

    def test_a_silent_server_is_cut_off_on_the_clock(self):
        conv = self.conversation(["a.example!bob"])
        d = conv.run()
        self.clock.advance(10 * 60 - 1)
        self.assertNoResult(d)
        self.transport.abortConnection = lambda: self.wire.connectionLost(None)
        self.clock.advance(1)
        self.assertTrue(self.failureResultOf(d, client.Closed).value.timed_out)
