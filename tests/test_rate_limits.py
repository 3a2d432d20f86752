"""Per-client rate limits (--conn-rate, --msg-rate, --rcpt-rate, issue 18):
the policy's checks alone, then the protocol over StringTransport with a
task.Clock, the decision log and replay, the metrics, and a real twistd."""

import smtplib

from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from upasmail import grammar, metrics, testing
from upasmail.cli import options
from upasmail.rules import policy, ratify
from upasmail.session import Session

from test_policy_replay import Recorder, json_replay
from test_twistd import Server, dns_port  # noqa: F401 (a fixture)

PEER = "192.0.2.7"  # not in ournets
HELO = "HELO client.sender.net"
CONN_REFUSED = ("421 4.7.0 gnot.example.org: too many connections from 192.0.2.7 in 60 "
                "seconds; try later")
MAIL_REFUSED = ("452 4.7.0 gnot.example.org: too many messages from 192.0.2.7 in 60 "
                "seconds; try later")
RCPT_REFUSED = ("452 4.5.3 gnot.example.org: too many recipients from 192.0.2.7 in 60 "
                "seconds; try later")


def settings(conf="", **kw):
    return testing.make_settings(conf, root="/nonexistent", **kw)


def connect_facts(**facts):
    looked = policy.Facts(ratify=ratify.EMPTY, granted=False)
    looked.update(facts)
    return looked


def run_check(check, s, cmd, conf, looked):
    """The check's decision, or the name of the fact it still needs."""
    try:
        return check(s, cmd, conf, looked)
    except policy.Missing as m:
        return m.name


# -- the checks alone --------------------------------------------------------------

class ConnectionRateCheck(unittest.TestCase):
    cmd = grammar.Command("CONNECT", PEER)

    def test_off_by_default_and_asks_nothing(self):
        self.assertIs(run_check(policy.connection_rate, None, self.cmd, settings(),
                                connect_facts()), policy.ACCEPT)

    def test_the_count_against_the_limit(self):
        conf = settings(conn_rate=2)
        self.assertEqual(run_check(policy.connection_rate, None, self.cmd, conf,
                                   connect_facts()), "connection_rate")
        for count in (1, 2):
            d = policy.connection_rate(None, self.cmd, conf, connect_facts(connection_rate=count))
            self.assertTrue(d.ok)
        d = policy.connection_rate(None, self.cmd, conf, connect_facts(connection_rate=3))
        self.assertEqual((d.code, d.text(), d.hangup, d.reason, d.detail, d.counts),
                         (421, CONN_REFUSED[4:], True, "limit", "rate", False))

    def test_the_window_is_in_the_reply(self):
        conf = settings(conn_rate=1, rate_window=30)
        d = policy.connection_rate(None, self.cmd, conf, connect_facts(connection_rate=2))
        self.assertIn("from 192.0.2.7 in 30 seconds;", d.text())

    def test_trusted_peers_are_exempt_unless_rate_trusted(self):
        conf = settings("ournets 192.0.2.0/24\n", conn_rate=1)
        self.assertIs(run_check(policy.connection_rate, None, self.cmd, conf, connect_facts()),
                      policy.ACCEPT)
        granted = connect_facts(granted=True, connection_rate=5)
        self.assertTrue(policy.connection_rate(None, self.cmd, settings(conn_rate=1),
                                               granted).ok)
        conf = settings("ournets 192.0.2.0/24\n", conn_rate=1, rate_trusted=True)
        d = policy.connection_rate(None, self.cmd, conf, connect_facts(connection_rate=2))
        self.assertEqual(d.code, 421)

    def test_before_the_connection_limits(self):
        """A connection refused for its rate must not hold a slot the
        factory would have to give back, and every attempt counts."""
        names = [c.__name__ for c in policy.CONNECT]
        self.assertEqual(names.index("connection_rate") + 1, names.index("connection_limits"))
        self.assertLess(names.index("peer_trust"), names.index("connection_rate"))


def command_session(**kw):
    s = Session(rsys=PEER, lsys="127.0.0.1")
    s.him = "client.sender.net"
    s.envelope.senders = ["sender.net!alice"]
    for k, v in kw.items():
        setattr(s, k, v)
    return s


class MessageAndRecipientRateChecks(unittest.TestCase):
    cases = ((policy.message_rate, "msg_rate", "message_rate", MAIL_REFUSED, "message",
              "MAIL FROM:<alice@sender.net>"),
             (policy.recipient_rate, "rcpt_rate", "recipient_rate", RCPT_REFUSED, "recipient",
              "RCPT TO:<bob>"))

    def test_off_by_default(self):
        for check, _, _, _, _, line in self.cases:
            self.assertIs(run_check(check, command_session(), grammar.parse(line.encode()),
                                    settings(), policy.Facts()), policy.ACCEPT)

    def test_over_the_limit(self):
        for check, option, fact, reply, kind, line in self.cases:
            conf = settings(**{option: 2})
            cmd = grammar.parse(line.encode())
            s = command_session()
            self.assertEqual(run_check(check, s, cmd, conf, policy.Facts()), fact)
            self.assertTrue(check(s, cmd, conf, policy.Facts({fact: 2})).ok)
            d = check(s, cmd, conf, policy.Facts({fact: 3}))
            self.assertEqual((d.code, d.text(), d.reason, d.detail, d.hangup),
                             (452, reply[4:], "rate", kind, False))

    def test_trusted_and_authenticated_are_exempt_unless_rate_trusted(self):
        for check, option, fact, _, _, line in self.cases:
            cmd = grammar.parse(line.encode())
            for who in ({"trusted": True}, {"authenticated": True}):
                s = command_session(**who)
                self.assertIs(run_check(check, s, cmd, settings(**{option: 1}),
                                        policy.Facts()), policy.ACCEPT)
                conf = settings(rate_trusted=True, **{option: 1})
                self.assertEqual(check(s, cmd, conf, policy.Facts({fact: 2})).code, 452)

    def test_after_syntax_and_sequence_before_the_lookups(self):
        mail = [c.__name__ for c in policy.MAIL]
        self.assertLess(mail.index("smtputf8_sender"), mail.index("message_rate"))
        self.assertLess(mail.index("message_rate"), mail.index("filterstate"))
        rcpt = [c.__name__ for c in policy.RCPT]
        self.assertLess(rcpt.index("recipient_limit"), rcpt.index("recipient_rate"))
        self.assertLess(rcpt.index("recipient_rate"), rcpt.index("validateaddress"))


class RateOptions(unittest.TestCase):
    def parse(self, *argv):
        o = options.SmtpdOptions()
        o.parseOptions(["--root", self.mktemp(), *argv])
        return o["settings"]

    def test_defaults_off(self):
        s = self.parse()
        self.assertEqual((s.conn_rate, s.msg_rate, s.rcpt_rate, s.rate_window, s.rate_trusted),
                         (0, 0, 0, 60.0, False))

    def test_given(self):
        s = self.parse("--conn-rate", "5", "--msg-rate", "7", "--rcpt-rate", "9",
                       "--rate-window", "30", "--rate-trusted")
        self.assertEqual((s.conn_rate, s.msg_rate, s.rcpt_rate, s.rate_window, s.rate_trusted),
                         (5, 7, 9, 30.0, True))

    def test_nonsense_refused(self):
        from twisted.python import usage
        for argv in (["--conn-rate", "-1"], ["--rate-window", "0"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)


# -- the protocol -------------------------------------------------------------------

class Protocol(unittest.TestCase):
    def dialogue(self, conf="", peer=PEER, clock=None, **kw):
        s = testing.make_settings(conf, root=self.mktemp(), **kw)
        d = testing.Dialogue(s, peer=peer, clock=clock, mailboxes=["bob"])
        self.addCleanup(d.close)
        return d

    def connect(self, d, peer=PEER):
        """Another connection to the same factory (and store)."""
        p = d.factory.buildProtocol(testing.address(peer, 4322))
        t = testing.FakeTLSTransport(peerAddress=testing.address(peer, 4322),
                                     hostAddress=testing.address("127.0.0.1", 25))
        p.makeConnection(t)
        self.addCleanup(lambda: t.disconnecting or p.connectionLost(None))
        return p, t

    def test_connections_over_the_rate_get_421_and_close(self):
        clock = task.Clock()
        clock.advance(60 * 1000)  # the start of a window
        d = self.dialogue(conn_rate=2, clock=clock)
        self.assertEqual(d.greeting, ["220 gnot.example.org ESMTP"])
        self.connect(d)
        p, t = self.connect(d)
        self.assertEqual(t.value().decode().splitlines(), [CONN_REFUSED])
        self.assertTrue(t.disconnecting)
        # counted as the other connect refusals: no slot held, none leaked
        self.assertEqual(d.factory.store.total, 2)
        self.assertNotIn(p, d.factory.connections)
        d.clock.advance(60)  # the next window
        p, t = self.connect(d)
        self.assertTrue(t.value().startswith(b"220 "))

    def test_trusted_connections_are_not_counted(self):
        d = self.dialogue("ournets 192.0.2.0/24\n", conn_rate=1)
        for _ in range(3):
            _, t = self.connect(d)
            self.assertTrue(t.value().startswith(b"220 "))
        self.assertEqual(d.factory.store.attempts, {})

    def test_messages_over_the_rate_get_452_and_the_session_goes_on(self):
        d = self.dialogue(msg_rate=2)
        d.send(HELO)
        replies = [d.send("MAIL FROM:<alice@sender.net>", "RSET")[0] for _ in range(3)]
        self.assertEqual(replies[:2], ["250 2.0.0 sender is sender.net!alice"] * 2)
        self.assertEqual(replies[2], MAIL_REFUSED)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])

    def test_refused_mail_counts_too(self):
        """Postfix: "regardless of whether or not Postfix actually accepts
        those messages"; one refused for its rate counts as well."""
        d = self.dialogue(msg_rate=1)
        d.send(HELO)
        d.send("MAIL FROM:<alice@sender.net>", "RSET")
        self.assertEqual(d.send("MAIL FROM:<alice@sender.net>"), [MAIL_REFUSED])
        self.assertEqual(d.send("MAIL FROM:<alice@sender.net>"), [MAIL_REFUSED])
        self.assertEqual(d.factory.store.attempts[
            "message", 60.0, int(d.clock.seconds() // 60)][PEER], 3)

    def test_recipients_over_the_rate_get_452(self):
        d = self.dialogue(rcpt_rate=2)
        d.send(HELO, "MAIL FROM:<alice@sender.net>")
        self.assertEqual(d.send("RCPT TO:<bob>", "RCPT TO:<bob>", "RCPT TO:<bob>"),
                         ["250 2.0.0 receiver is bob"] * 2 + [RCPT_REFUSED])

    def test_a_malformed_command_is_not_counted(self):
        d = self.dialogue(msg_rate=1)
        d.send(HELO)
        self.assertEqual(d.send("MAIL FROM:<alice@sender.net> SMTPUTF8=x")[0][:1], "5")
        self.assertEqual(d.send("MAIL FROM:<alice@sender.net>"),
                         ["250 2.0.0 sender is sender.net!alice"])

    def test_authenticated_and_trusted_are_exempt_unless_rate_trusted(self):
        d = self.dialogue("ournets 192.0.2.0/24\n", msg_rate=1)
        d.send(HELO)
        for _ in range(3):
            self.assertEqual(d.send("MAIL FROM:<alice@sender.net>", "RSET")[0][:3], "250")
        d = self.dialogue("ournets 192.0.2.0/24\n", msg_rate=1, rate_trusted=True)
        d.send(HELO)
        d.send("MAIL FROM:<alice@sender.net>", "RSET")
        self.assertEqual(d.send("MAIL FROM:<alice@sender.net>"), [MAIL_REFUSED])

    def test_counted_in_the_metrics(self):
        m = metrics.Metrics()
        globalLogPublisher.addObserver(m)
        self.addCleanup(globalLogPublisher.removeObserver, m)
        d = self.dialogue(msg_rate=1, rcpt_rate=1, conn_rate=1)
        d.send(HELO, "MAIL FROM:<alice@sender.net>", "RCPT TO:<bob>", "RCPT TO:<bob>", "RSET")
        d.send("MAIL FROM:<alice@sender.net>")
        self.connect(d)

        def value(name, **labels):
            return m.registry.get_sample_value(name, labels) or 0
        for kind in ("connection", "message", "recipient"):
            self.assertEqual(value("upasmail_rate_limited_total", kind=kind), 1, kind)
        self.assertEqual(value("upasmail_refusals_total", command="MAIL", reason="rate",
                               **{"class": "4xx"}), 1)
        self.assertEqual(value("upasmail_connections_total", end="limit"), 1)


class Explain(unittest.TestCase):
    def test_explain_counts_nothing(self):
        from upasmail.cli.policytool import ReadOnlyLookups
        s = settings(msg_rate=1)
        lookups = ReadOnlyLookups(s, testing.FakeResolver(everything_exists=True),
                                  None, task.Clock())
        session = Session(rsys=PEER, lsys="127.0.0.1")
        for name in ("connection_rate", "message_rate", "recipient_rate"):
            self.assertEqual([lookups(name, PEER, session, 0) for _ in range(2)], [1, 1])


# -- the decision log and replay -------------------------------------------------

def test_replay_reads_the_recorded_counts(tmp_path):
    rec = Recorder(tmp_path, msg_rate=1)
    rec.session(PEER, HELO, "MAIL FROM:<alice@sender.net>", "RSET",
                "MAIL FROM:<alice@sender.net>", "QUIT")
    [record] = rec.records()
    mails = [c for c in record["commands"] if c["line"].startswith("MAIL")]
    assert [c["facts"].get("message_rate") for c in mails] == [1, 2]
    assert mails[1]["decision"]["check"] == "message_rate"
    _, same = json_replay(rec, "--msg-rate", "1")
    assert same["changes"] == [] and same["undecidable"] == []
    # a looser limit passes the second MAIL, whose later checks were never run
    _, looser = json_replay(rec, "--msg-rate", "2")
    assert [u["missing"] for u in looser["undecidable"]] == ["validate_from"]


def test_a_connection_refused_for_its_rate_in_the_decision_log(tmp_path):
    rec = Recorder(tmp_path, conn_rate=1)
    d = testing.Dialogue(rec.settings, peer=PEER, clock=rec.clock, decisions=rec.log)
    d.send("QUIT")
    d.proto.connectionLost(None)  # the session's end: its record
    d.proto.setTimeout(None)
    # a second connection to the same factory, so the same store's count
    t = testing.FakeTLSTransport(peerAddress=testing.address(PEER, 4322),
                                 hostAddress=testing.address("127.0.0.1", 25))
    d.factory.buildProtocol(testing.address(PEER, 4322)).makeConnection(t)
    assert t.value().decode().startswith("421 4.7.0 ")
    first, refused = rec.records()
    assert first["connect"]["facts"]["connection_rate"] == 1
    assert refused["end"] == "limit"  # as smtpd.disconnect says
    assert refused["connect"]["facts"]["connection_rate"] == 2
    assert refused["connect"]["decision"]["check"] == "connection_rate"
    _, looser = json_replay(rec, "--conn-rate", "2")  # its slot was never asked
    assert [u["missing"] for u in looser["undecidable"]] == ["connection_slot"]


# -- a real server --------------------------------------------------------------------

def test_twistd_conn_rate(tmp_path, dns_port):  # noqa: F811 (the fixture)
    # a day's window: three connections do not straddle its edge
    server = Server(tmp_path, "--resolver", "127.0.0.1:%d" % dns_port, "--conn-rate", "2",
                    "--rate-window", "86400", "--rate-trusted", mailboxes=("bob",))
    try:
        greetings = []
        for _ in range(3):
            s = smtplib.SMTP()
            try:
                greetings.append(s.connect("127.0.0.1", server.port))
            except smtplib.SMTPConnectError as e:
                greetings.append((e.smtp_code, e.smtp_error))
            finally:
                s.close()
        assert [g[0] for g in greetings] == [220, 220, 421]
        assert greetings[2][1].decode().startswith(
            "4.7.0 gnot.example.org: too many connections from 127.0.0.1 in 86400 seconds")
        server.wait_for("rate limit: 3 connections from 127.0.0.1")
    finally:
        server.stop()
