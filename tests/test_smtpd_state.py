"""The protocol's explicit state (issue 17): one phase value, changed in one
place (``UpasESMTP._enter``), each change a debug event ``smtpd.state``.

Sessions run over ``testing.Dialogue``; the events are captured from the
global log publisher with ``UpasESMTP.logStates`` on.
"""

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs

from test_auth_tls import Case as AuthCase, plain
from test_limits import Case as LimitsCase
from upasmail import logs, server, testing
from upasmail.server import ADMITTING, AUTH, CLOSING, COMMAND, DATA, GONE

QUIT = "221 2.0.0 Successful termination"
SHUTDOWN = "421 4.3.2 gnot.example.org Error: service shutting down"


def changes(events):
    return [(e["old"], e["new"]) for e in events if e.get("event") == "smtpd.state"]


class Logged:
    """Turns the state events on for the test."""

    def setUp(self):
        super().setUp()
        self.patch(server.UpasESMTP, "logStates", True)


class SessionStates(Logged, LimitsCase):
    def test_normal_session_with_data(self):
        with capturedLogs() as events:
            d = self.dialogue()
            self.assertIs(d.proto._state, COMMAND)
            self.start(d)
            self.assertIs(d.proto._state, DATA)
            self.assertEqual(d.proto.mode, DATA)  # Twisted's view
            self.assertEqual(d.raw(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), ["250 2.5.0 sent"])
            self.assertIs(d.proto._state, COMMAND)
            self.assertEqual(d.send("QUIT"), [QUIT])
            self.assertIs(d.proto._state, CLOSING)
            d.proto.connectionLost(None)
        self.assertIs(d.proto._state, GONE)
        self.assertEqual(changes(events), [(ADMITTING, COMMAND), (COMMAND, DATA),
                                           (DATA, COMMAND), (COMMAND, CLOSING),
                                           (CLOSING, GONE)])

    def test_the_events_are_debug_and_name_the_session(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("NOOP")
        [e] = [e for e in events if e.get("event") == "smtpd.state"]
        self.assertIs(e["log_level"], LogLevel.debug)
        self.assertEqual(e["log_namespace"], "smtpd")
        self.assertEqual(e["session"], d.proto.session.id)
        self.assertEqual((e["old"], e["new"]), (ADMITTING, COMMAND))

    def test_off_no_event_is_built(self):
        self.patch(server.UpasESMTP, "logStates", False)

        def never(*a, **kw):
            raise AssertionError("a debug event was built")

        self.patch(logs.SessionLogger, "debug", never)
        with capturedLogs() as events:
            d = self.dialogue()
            self.start(d)
            self.assertEqual(d.raw(b"Subject: hi\r\n\r\nbody\r\n.\r\n"), ["250 2.5.0 sent"])
            self.assertEqual(d.send("QUIT"), [QUIT])
        self.assertEqual(changes(events), [])

    def test_refused_connection_is_never_greeted(self):
        d = self.dialogue(max_connections_per_peer=1)
        p = d.factory.buildProtocol(testing.address("127.0.0.2", 1234))
        t = StringTransport(peerAddress=testing.address("127.0.0.2", 1234),
                            hostAddress=testing.address("127.0.0.1", 25))
        with capturedLogs() as events:
            p.makeConnection(t)
            self.assertTrue(t.value().startswith(b"421 "))
            self.assertIs(p._state, ADMITTING)
            p.connectionLost(None)
        self.assertEqual(changes(events), [(ADMITTING, GONE)])
        # the refusal's own line only: a session never greeted has no other
        [line] = [e for e in events if e.get("event") == "smtpd.disconnect"]
        self.assertEqual(line["end"], "limit")

    def test_line_too_long_in_data_stays_in_data(self):
        d = self.dialogue(max_data_line=100)
        self.start(d)
        with capturedLogs() as events:
            self.assertEqual(d.raw(b"x" * 500 + b"\r\nmore\r\n"), [])
            self.assertIs(d.proto._state, DATA)
            out = d.raw(b".\r\n")
        self.assertTrue(out[0].startswith("554 "), out)
        self.assertEqual(changes(events), [(DATA, COMMAND)])

    def test_shutdown_waits_for_data_then_closes(self):
        d = self.dialogue(shutdown_grace=60.0)
        self.start(d)
        with capturedLogs() as events:
            done = d.factory.shutdown(60.0)
            self.assertIs(d.proto._state, DATA)  # the message may finish
            self.assertEqual(d.raw(b"Subject: late\r\n\r\nx\r\n.\r\n"),
                             ["250 2.5.0 sent", SHUTDOWN])
            self.assertIs(d.proto._state, CLOSING)
            d.proto.connectionLost(None)
        self.successResultOf(done)
        self.assertEqual(changes(events), [(DATA, COMMAND), (COMMAND, CLOSING),
                                           (CLOSING, GONE)])

    def test_grace_expired_closes_from_data(self):
        d = self.dialogue()
        self.start(d)
        with capturedLogs() as events:
            done = d.factory.shutdown(5.0)
            d.clock.advance(5)
            self.assertEqual(d.take(), [SHUTDOWN])
            d.proto.connectionLost(None)
        self.successResultOf(done)
        self.assertEqual(changes(events), [(DATA, CLOSING), (CLOSING, GONE)])

    def test_gone_while_admitting(self):
        # the client goes before the store has answered: never greeted
        d = self.dialogue()
        d.factory.admit = lambda proto: defer.Deferred()  # the store never answers
        p = d.factory.buildProtocol(testing.address("127.0.0.3", 1234))
        t = StringTransport(peerAddress=testing.address("127.0.0.3", 1234),
                            hostAddress=testing.address("127.0.0.1", 25))
        with capturedLogs() as events:
            p.makeConnection(t)
            p.dataReceived(b"NOOP\r\n")  # not read before the greeting
            self.assertIs(p._state, ADMITTING)
            p.connectionLost(None)
        self.assertEqual(t.value(), b"")
        self.assertEqual(changes(events), [(ADMITTING, GONE)])


class AuthStates(Logged, AuthCase):
    def test_auth_exchange(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        with capturedLogs() as events:
            self.assertEqual(d.send("AUTH LOGIN"), ["334 VXNlcm5hbWU6"])
            self.assertIs(d.proto._state, AUTH)
            self.assertEqual(d.proto.mode, AUTH)
            self.assertEqual(d.send(plain()[:4]), ["334 UGFzc3dvcmQ6"])  # still AUTH
            d.send("*")  # the client cancels
            self.assertIs(d.proto._state, COMMAND)
            self.assertEqual(d.raw(b"AUTH PLAIN\r\n"), ["334 "])
            self.assertEqual(d.send(plain()), ["235 2.0.0 Authentication successful"])
        self.assertIs(d.proto._state, COMMAND)
        self.assertEqual(changes(events), [(COMMAND, AUTH), (AUTH, COMMAND),
                                           (COMMAND, AUTH), (AUTH, COMMAND)])

    def test_line_too_long_ends_the_exchange(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.raw(b"AUTH PLAIN\r\n"), ["334 "])
        with capturedLogs() as events:
            out = d.raw(b"A" * 5000 + b"\r\n")
        self.assertTrue(out[0].startswith("500 "), out)
        self.assertIs(d.proto._state, COMMAND)
        self.assertEqual(changes(events), [(AUTH, COMMAND)])

    def test_starttls_stays_in_command(self):
        d = self.dialogue(cert=True)
        d.send("EHLO h.sender.net")
        with capturedLogs() as events:
            # what is pipelined behind STARTTLS is dropped, not answered
            self.assertEqual(d.raw(b"STARTTLS\r\nNOOP\r\n"), ["220 2.0.0 Go ahead make my day"])
        self.assertIs(d.proto._state, COMMAND)
        self.assertTrue(d.proto.session.encrypted)
        self.assertEqual(changes(events), [])
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])
