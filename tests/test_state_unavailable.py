"""When the shared state cannot answer (``StateUnavailable``, issue 18): every
question the server asks the state store gets a clear 4xx and a log line,
the session goes on where it can, and nothing is let through that would
otherwise be refused.  The store here is a ``LocalStateStore`` whose
methods fail as a Redis store's do when Redis is down (the redis branch
tests the real outage)."""

from twisted.cred import checkers
from twisted.internet import defer, task
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.protocols import loopback
from twisted.trial import unittest

from upasmail import grammar, metrics, testing
from upasmail.interfaces import MESSAGE, StateUnavailable
from upasmail.rules import decisionlog, policy, ratify
from upasmail.smtpd import spam, statestore

PEER = "192.0.2.7"  # not in ournets
HELO = "HELO client.sender.net"
DOWN = "4.3.0 gnot.example.org: anti-abuse state temporarily unavailable; try later"


def down(*args):
    return defer.fail(StateUnavailable("redis: connection refused"))


class FailingStore(statestore.LocalStateStore):
    """A local store whose shared state is gone: every question named in
    ``failing`` fails with StateUnavailable."""

    failing = ()

    def __getattribute__(self, name):
        if name in object.__getattribute__(self, "failing"):
            return down
        return object.__getattribute__(self, name)


class Case(unittest.TestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.clock = task.Clock()
        self.clock.advance(1000000)

    def dialogue(self, failing=(), conf="", checker=None, **kw):
        s = testing.make_settings(conf, root=self.root, **kw)
        store = FailingStore(s, self.clock)
        store.failing = failing
        # testing.Dialogue's factory makes its store by this name
        self.patch(spam, "LocalStateStore", lambda settings, clock: store)
        with capturedLogs() as events:
            d = testing.Dialogue(s, peer=PEER, clock=self.clock, mailboxes=["bob"],
                                 checker=checker)
        self.addCleanup(d.close)
        self.events = events
        d.store = store
        return d

    def logged(self, d, *lines):
        with capturedLogs() as events:
            out = d.send(*lines)
        self.events = events
        return out

    def state_lines(self):
        return [e for e in self.events if e.get("event") == "state.unavailable"]


class AtConnect(Case):
    def assertRefused(self, d):
        self.assertEqual(d.greeting, ["421 " + DOWN])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(d.factory.connections, set())
        [ended] = [e for e in self.events if e.get("event") == "smtpd.disconnect"]
        self.assertEqual(ended["end"], "state-unavailable")

    def test_the_grant_unknown(self):
        d = self.dialogue(failing=("isGranted",))
        self.assertRefused(d)
        [line] = self.state_lines()
        self.assertEqual((line["fact"], line["peer"], line["state"]),
                         ("granted", PEER, "unavailable"))
        self.assertEqual(d.store.total, 0)  # no slot was taken

    def test_the_connection_slot_unknown(self):
        d = self.dialogue(failing=("acquireConnection",))
        self.assertRefused(d)
        self.assertEqual([e["fact"] for e in self.state_lines()], ["connection_slot"])

    def test_the_connection_rate_unknown(self):
        d = self.dialogue(failing=("countAttempt",), conn_rate=5)
        self.assertRefused(d)
        self.assertEqual([e["fact"] for e in self.state_lines()], ["connection_rate"])
        self.assertEqual(d.store.total, 0)

    def test_a_trusted_peer_needs_no_grant(self):
        d = self.dialogue(failing=("isGranted",), conf="ournets 192.0.2.0/24\n")
        self.assertEqual(d.greeting, ["220 gnot.example.org ESMTP"])

    def test_another_store_error_gets_421_too(self):
        """A bug rather than an outage: logged with its traceback, and the
        client gets a 421 (RFC 5321 3.8) where it used to get a bare close."""
        s = testing.make_settings("", root=self.mktemp())
        d = testing.Dialogue(s, peer=PEER)
        self.addCleanup(d.close)
        d.factory.store.acquireConnection = lambda *a: defer.fail(RuntimeError("bug"))
        p = d.factory.buildProtocol(testing.address(PEER, 4322))
        t = testing.FakeTLSTransport(peerAddress=testing.address(PEER, 4322),
                                     hostAddress=testing.address("127.0.0.1", 25))
        p.makeConnection(t)
        self.assertEqual(t.value(),
                         b"421 4.3.0 Error: local error in processing; try again later\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MailAndRcpt(Case):
    def test_the_message_count_unknown(self):
        d = self.dialogue(failing=("countAttempt",), msg_rate=5)
        d.send(HELO)
        self.assertEqual(self.logged(d, "MAIL FROM:<alice@sender.net>"), ["451 " + DOWN])
        self.assertEqual([e["fact"] for e in self.state_lines()], ["message_rate"])
        [refused] = [e for e in self.events if e.get("event") == "smtpd.refused"]
        self.assertEqual((refused["reason"], refused["detail"]),
                         ("state-unavailable", "message_rate"))
        # the session goes on: no hang-up, no tarpit count
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.proto.session.rejects, 0)
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])

    def test_the_recipient_count_unknown(self):
        d = self.dialogue(failing=("countAttempt",), rcpt_rate=5)
        d.send(HELO, "MAIL FROM:<alice@sender.net>")
        self.assertEqual(d.send("RCPT TO:<bob>"), ["451 " + DOWN])
        d.store.failing = ()  # back
        self.assertEqual(d.send("RCPT TO:<bob>"), ["250 2.0.0 receiver is bob"])


class Greylist(Case):
    def greylisted(self, failing):
        d = self.dialogue(greylist=True)
        d.send(HELO, "MAIL FROM:<alice@sender.net>", "RCPT TO:<bob>")
        d.store.failing = failing
        return d

    def test_the_whitelist_unknown(self):
        d = self.greylisted(("isWhitelisted",))
        self.assertEqual(self.logged(d, "DATA"), ["451 " + DOWN])
        self.assertEqual([e["fact"] for e in self.state_lines()], ["greylist"])
        self.assertFalse(d.transport.disconnecting)  # unlike a greylist refusal

    def test_the_attempt_unrecorded(self):
        d = self.greylisted(("greylistAttempt",))
        self.assertEqual(d.send("DATA"), ["451 " + DOWN])
        self.assertEqual(d.send("RSET"), ["250 2.0.0 ok"])

    def test_a_whitelist_entry_that_cannot_be_written_lets_the_retry_through(self):
        d = self.greylisted(())
        self.assertEqual(d.send("DATA"), ["451 please try again soon from the same IP."])
        self.clock.advance(d.proto.settings.greylist_min + 1)
        d = self.greylisted(("addToWhitelist",))  # the retry: recent, so it passes
        self.assertEqual(d.send("DATA"), ["354 Input message; end with <CRLF>.<CRLF>"])


class Auth(Case):
    def authDialogue(self, failing):
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(bob=b"secret")
        d = self.dialogue(checker=checker, clear_passwords=True)
        d.send("EHLO client.sender.net")
        d.store.failing = failing
        return d

    def test_the_throttle_unknown_before_the_check(self):
        d = self.authDialogue(("authBegin",))
        with capturedLogs() as events:
            out = d.send("AUTH PLAIN AGJvYgBzZWNyZXQ=")  # bob, secret
        self.assertEqual(out, ["454 4.7.0 Temporary authentication failure"])
        self.assertFalse(d.proto.session.authenticated)
        [auth] = [e for e in events if e.get("event") == "smtpd.auth"]
        self.assertEqual(auth["result"], "tempfail")
        self.assertEqual(d.send("NOOP")[0][:3], "250")

    def test_the_failure_uncounted(self):
        d = self.authDialogue(("authFailed",))
        self.assertEqual(d.send("AUTH PLAIN AGJvYgB3cm9uZw=="),  # bob, wrong
                         ["454 4.7.0 Temporary authentication failure"])

    def test_a_success_that_cannot_be_counted_still_succeeds(self):
        d = self.authDialogue(("authSucceeded",))
        with capturedLogs() as events:
            self.assertEqual(d.send("AUTH PLAIN AGJvYgBzZWNyZXQ="),
                             ["235 2.0.0 Authentication successful"])
        self.assertEqual([e["state"] for e in events if e.get("event") == "state.unavailable"],
                         ["unavailable"])


class Metrics(Case):
    def test_counted(self):
        m = metrics.Metrics()
        globalLogPublisher.addObserver(m)
        self.addCleanup(globalLogPublisher.removeObserver, m)
        self.dialogue(failing=("countAttempt",), conn_rate=5)
        d = self.dialogue(failing=("countAttempt",), msg_rate=5)
        d.send(HELO, "MAIL FROM:<alice@sender.net>")

        def value(name, **labels):
            return m.registry.get_sample_value(name, labels) or 0
        self.assertEqual(value("upasmail_state_unavailable_total", fact="connection_rate"), 1)
        self.assertEqual(value("upasmail_state_unavailable_total", fact="message_rate"), 1)
        self.assertEqual(value("upasmail_connections_total", end="state-unavailable"), 1)
        self.assertEqual(value("upasmail_refusals_total", command="MAIL",
                               reason="state-unavailable", **{"class": "4xx"}), 1)


class Pure(unittest.TestCase):
    """The checks with an UNAVAILABLE fact, and its decision-log form."""

    def test_never_trusted_by_an_unknown_grant(self):
        conf = testing.make_settings("", root="/nonexistent")
        looked = policy.Facts(ratify=ratify.EMPTY, granted=policy.UNAVAILABLE)
        self.assertEqual(policy.peer_facts(PEER, conf, looked)[0], False)
        d = policy.peer_trust(None, grammar.Command("CONNECT", PEER), conf, looked)
        self.assertEqual((d.code, d.hangup, d.reason), (421, True, "state-unavailable"))

    def test_recorded_and_read_back(self):
        looked = policy.Facts(greylist=policy.UNAVAILABLE, message_rate=policy.UNAVAILABLE)
        for name, value in decisionlog.encode_facts(looked).items():
            self.assertEqual(decisionlog.decode_fact(name, value), policy.UNAVAILABLE)


class OverAmp(unittest.TestCase):
    """A worker's store asks the main process's over AMP: StateUnavailable
    reaches the worker as itself, not as an unknown remote error."""

    def test_every_question_fails_as_itself(self):
        clock = task.Clock()
        store = FailingStore(testing.make_settings("", root=self.mktemp()), clock)
        store.failing = ("acquireConnection", "authBegin", "authFailed", "isGranted",
                         "isWhitelisted", "greylistAttempt", "countAttempt")
        server = statestore.StateServer(store)
        client = statestore.Channel()
        remote = statestore.RemoteStateStore(client)
        pump = loopback.loopbackAsync(server, client)
        asks = [remote.acquireConnection(PEER, False, 1, 1), remote.authBegin(PEER),
                remote.authFailed(PEER), remote.isGranted(PEER), remote.isWhitelisted(PEER),
                remote.greylistAttempt("127.0.0.1", PEER, ["bob"]),
                remote.countAttempt(MESSAGE, PEER, 60)]
        for d in asks:
            self.assertFailure(d, StateUnavailable)
        done = defer.gatherResults(asks)
        done.addCallback(lambda _: client.transport.loseConnection())
        return done.addCallback(lambda _: pump)
