"""ESMTP extensions, limits, timeouts, smuggling, shutdown (issue 8).

In-process sessions run over ``testing.Dialogue`` (StringTransport,
task.Clock); the fuzzing also runs over loopback against a real
``twistd upas-smtpd``; SIGTERM and SIGHUP are sent to a real twistd.
"""

import contextlib
import mailbox
import os
import re
import shutil
import signal
import smtplib
import socket
import tempfile
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from twisted.trial import unittest

from upasmail import grammar, testing

SYNTAX = "500 5.5.1 illegal command or bad syntax"
BARE = "554 5.5.2 Error: bare <CR> or <LF> in the message; send CRLF line ends"
NOOP_OK = "250 2.0.0 Nothing to see here. Move along ..."
GO = "354 Input message; end with <CRLF>.<CRLF>"


class Case(unittest.TestCase):
    def dialogue(self, conf="", peer="127.0.0.2", **kw):
        self.root = tempfile.mkdtemp(prefix="upasmail-limits-")
        self.addCleanup(shutil.rmtree, self.root, True)
        s = testing.make_settings(conf, root=self.root, **kw)
        d = testing.Dialogue(s, peer=peer, mailboxes=("bob", "carol"))
        self.addCleanup(d.close)
        return d

    def start(self, d, rcpts=("bob",), mail="MAIL FROM:<a@b.example>"):
        out = d.send("EHLO h.sender.net", mail, *["RCPT TO:<%s>" % r for r in rcpts], "DATA")
        self.assertEqual(out[-1], GO)
        return out

    def stored(self, user="bob"):
        path = os.path.join(self.root, "box", user, "mbox")
        return list(mailbox.mbox(path)) if os.path.exists(path) else []

    def spool_files(self):
        return os.listdir(os.path.join(self.root, "tmp"))


class ExtensionTests(Case):
    def test_ehlo_advertises(self):
        d = self.dialogue(message_limit=10000)
        self.assertEqual(d.send("EHLO h.sender.net")[1:],
                         ["250-ENHANCEDSTATUSCODES", "250-SIZE 10000", "250-8BITMIME",
                          "250-PIPELINING", "250 SMTPUTF8"])

    def test_size_declared_over_and_under(self):
        d = self.dialogue(message_limit=10000)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("MAIL FROM:<a@b.example> SIZE=10001"),
                         ["552 5.3.4 Error: message size exceeds the fixed limit"])
        self.assertEqual(d.send("MAIL FROM:<a@b.example> SIZE=10000"),
                         ["250 2.0.0 sender is b.example!a"])

    def test_body_over_the_limit_while_streaming(self):
        d = self.dialogue(message_limit=10000)
        self.start(d)
        self.assertEqual(d.raw(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n"), [])
        for _ in range(12):
            self.assertEqual(d.raw(b"y" * 998 + b"\r\n"), [])
        self.assertEqual(d.raw(b".\r\n"), ["552 5.3.4 Error: message file too big"])
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(d.send("NOOP"), [NOOP_OK])

    def test_8bitmime_stored_byte_exact(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("MAIL FROM:<a@b.example> BODY=8BITMIME"),
                         ["250 2.0.0 sender is b.example!a"])
        d.send("RCPT TO:<bob>", "DATA")
        body = b"caf\xc3\xa9 \xff\xfe raw bytes\r\n\x80\r\n"
        self.assertEqual(d.raw(b"Subject: 8bit\r\n\r\n" + body + b".\r\n"), ["250 2.5.0 sent"])
        with open(os.path.join(self.root, "box", "bob", "mbox"), "rb") as f:
            self.assertIn(b"\n\ncaf\xc3\xa9 \xff\xfe raw bytes\n\x80\n", f.read())
        self.assertEqual(d.send("MAIL FROM:<a@b.example> BODY=BINARYMIME"),
                         ["501 5.5.4 BODY= takes 7BIT or 8BITMIME"])

    def test_smtputf8(self):
        d = self.dialogue(peer="127.0.0.1")  # trusted: may relay
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("MAIL FROM:<jöran@exämple.org>"),
                         ["553 5.6.7 Error: a non-ASCII address needs SMTPUTF8"])
        self.assertEqual(d.send("MAIL FROM:<a@b.example>"), ["250 2.0.0 sender is b.example!a"])
        self.assertEqual(d.send("RCPT TO:<zoë@exämple.net>"),
                         ["553 5.6.7 Error: a non-ASCII address needs SMTPUTF8"])
        d.send("RSET")
        self.assertEqual(d.send("MAIL FROM:<jöran@exämple.org> SMTPUTF8"),
                         ["250 2.0.0 sender is exämple.org!jöran"])
        self.assertEqual(d.send("RCPT TO:<zoë@exämple.net>"),
                         ["250 2.0.0 receiver is exämple.net!zoë"])
        self.assertEqual(d.send("NOOP ünïcode"), [SYNTAX])

    def test_unknown_parameters(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("MAIL FROM:<a@b.example> RET=HDRS"),
                         ["555 5.5.4 Unsupported parameter RET"])
        d.send("MAIL FROM:<a@b.example>")
        self.assertEqual(d.send("RCPT TO:<bob> NOTIFY=NEVER"),
                         ["555 5.5.4 Unsupported parameter NOTIFY"])
        self.assertEqual(d.send("MAIL FROM:<a@b.example> SIZE=1 SIZE=2"),
                         ["501 5.5.4 Parameter given twice: SIZE"])

    def test_pipelining_five_replies_in_order(self):
        d = self.dialogue()
        out = d.raw(b"EHLO h.sender.net\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob>\r\n"
                    b"RCPT TO:<carol>\r\nDATA\r\n")
        finals = [line for line in out if line[3] == " "]
        self.assertEqual(finals, ["250 SMTPUTF8", "250 2.0.0 sender is b.example!a",
                                  "250 2.0.0 receiver is bob", "250 2.0.0 receiver is carol",
                                  GO])
        self.assertEqual(d.raw(b"Subject: p\r\n\r\nx\r\n.\r\nNOOP\r\n"),
                         ["250 2.5.0 sent", NOOP_OK])


class LimitTests(Case):
    def test_command_line_limit(self):
        d = self.dialogue(max_command_line=512)
        self.assertEqual(d.raw(b"NOOP " + b"x" * 600 + b"\r\n"),
                         ["500 5.5.2 Error: command line too long"])
        self.assertEqual(d.send("NOOP " + "x" * 500), [NOOP_OK])

    def test_data_line_limit_never_leaves_data(self):
        d = self.dialogue(max_data_line=1000)
        self.start(d)
        self.assertEqual(d.raw(b"Subject: x\r\n\r\n" + b"a" * 1001 + b"\r\nQUIT\r\n"), [])
        self.assertEqual(d.raw(b".\r\n"), ["554 5.3.4 Error: message line too long"])
        self.assertEqual(self.stored(), [])

    def test_recipients_limit(self):
        d = self.dialogue(max_recipients=100)
        os.makedirs(os.path.join(self.root, "lib"))
        with open(os.path.join(self.root, "lib", "users"), "w") as f:
            f.write("".join("u%d\n" % i for i in range(101)))
        d.send("EHLO h.sender.net", "MAIL FROM:<a@b.example>")
        out = d.send(*["RCPT TO:<u%d>" % i for i in range(101)])
        self.assertEqual(out[99], "250 2.0.0 receiver is u99")
        self.assertEqual(out[100], "452 4.5.3 Error: too many recipients")

    def test_bad_bytes_keep_the_session(self):
        d = self.dialogue()
        for line in (b"NO\x00OP", b"\xe9HLO x", b"MAIL FROM:<\xff@b.example>", b"\x80\x81"):
            self.assertEqual(d.raw(line + b"\r\n"), [SYNTAX], line)
        self.assertEqual(d.send("NOOP"), [NOOP_OK])

    def test_idle_and_data_block_timeouts(self):
        d = self.dialogue(idle_timeout=300.0, data_block_timeout=180.0)
        d.root.spool_limit = 0  # every message spooled to a file, to see it go
        d.clock.advance(299)
        self.assertEqual(d.send("NOOP"), [NOOP_OK])
        self.start(d)
        d.raw(b"Subject: slow\r\n\r\npart")
        self.assertEqual(len(self.spool_files()), 1)
        d.clock.advance(179)
        self.assertEqual(d.take(), [])
        d.clock.advance(1)
        self.assertEqual(d.take(), ["421 4.4.2 gnot.example.org Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(self.spool_files(), [])  # the partial message is gone
        self.assertEqual(self.stored(), [])


class ConnectionLimitTests(Case):
    def connect(self, factory, ip):
        from twisted.internet.testing import StringTransport
        p = factory.buildProtocol(testing.address(ip, 1234))
        t = StringTransport(peerAddress=testing.address(ip, 1234),
                            hostAddress=testing.address("127.0.0.1", 25))
        p.makeConnection(t)
        return p, t

    def test_per_peer_and_total_limits(self):
        d = self.dialogue(max_connections_per_peer=2, max_connections=4)
        f = d.factory  # d itself is connection 1, from 127.0.0.2
        p2, _ = self.connect(f, "127.0.0.2")
        p3, t3 = self.connect(f, "127.0.0.2")
        self.assertEqual(t3.value(), b"421 4.7.0 gnot.example.org Error: too many connections "
                                     b"from 127.0.0.2\r\n")
        self.assertTrue(t3.disconnecting)
        # trusted peers (ournets: 127.0.0.1) are not limited per address
        p4, t4 = self.connect(f, "127.0.0.1")
        p5, t5 = self.connect(f, "127.0.0.1")
        self.assertTrue(t5.value().startswith(b"220 "))
        p6, t6 = self.connect(f, "127.0.0.3")
        self.assertEqual(t6.value(), b"421 4.3.2 gnot.example.org Error: too many connections; "
                                     b"try again later\r\n")
        p2.connectionLost(None)
        p7, t7 = self.connect(f, "127.0.0.2")
        self.assertTrue(t7.value().startswith(b"220 "))
        for p in (p4, p5, p7):
            p.connectionLost(None)


class ShutdownTests(Case):
    def test_shutdown_lets_data_finish_and_closes_the_rest(self):
        d = self.dialogue(shutdown_grace=60.0)
        self.start(d)
        d.raw(b"Subject: late\r\n\r\nhalf")
        other, t = ConnectionLimitTests.connect(self, d.factory, "127.0.0.4")
        done = d.factory.shutdown(60.0)
        self.assertEqual(t.value().splitlines()[-1],
                         b"421 4.3.2 gnot.example.org Error: service shutting down")
        self.assertTrue(t.disconnecting)
        other.connectionLost(None)
        self.assertFalse(d.transport.disconnecting)  # in DATA: may finish
        self.assertEqual(d.raw(b" done\r\n.\r\n"),
                         ["250 2.5.0 sent",
                          "421 4.3.2 gnot.example.org Error: service shutting down"])
        self.assertTrue(d.transport.disconnecting)
        d.proto.connectionLost(None)
        self.successResultOf(done)
        [msg] = self.stored()
        self.assertEqual(msg.get_payload(), "half done\n")

    def test_grace_expires_message_dropped_with_421(self):
        d = self.dialogue()
        self.start(d)
        d.raw(b"Subject: never\r\n\r\nhalf")
        done = d.factory.shutdown(5.0)
        d.clock.advance(5)
        self.assertEqual(d.take(), ["421 4.3.2 gnot.example.org Error: service shutting down"])
        d.proto.connectionLost(None)
        self.successResultOf(done)
        self.assertEqual(self.stored(), [])
        self.assertEqual(self.spool_files(), [])

    def test_new_connections_refused_while_closing(self):
        d = self.dialogue()
        d.factory.shutdown(1.0)
        p, t = ConnectionLimitTests.connect(self, d.factory, "127.0.0.5")
        self.assertTrue(t.value().startswith(b"421 "))


# -- smuggling: every CVE-2023-51764 style end-of-data look-alike --------------

VARIANTS = {
    "lf-dot-lf": b"\n.\n", "cr-dot-cr": b"\r.\r", "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-crlf": b"\n.\r\n", "cr-dot-crlf": b"\r.\r\n", "crlf-dot-cr": b"\r\n.\r",
    "lf-dot-cr": b"\n.\r", "cr-dot-lf": b"\r.\n", "bare-lf": b"\n", "bare-cr": b"\r",
    "lf-dot-dot-lf": b"\n..\n", "cr-lf-dot-lf": b"\r\n.\n",
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_smuggling_variant_is_refused(name, tmp_path):
    d = testing.Dialogue(testing.make_settings("", root=str(tmp_path)), peer="127.0.0.2",
                         mailboxes=("bob",))
    d.send("EHLO h.sender.net", "MAIL FROM:<a@b.example>", "RCPT TO:<bob>", "DATA")
    smuggled = (b"Subject: smuggle\r\n\r\nbody" + VARIANTS[name] +
                b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<carol>\r\nDATA\r\nevil\r\n")
    assert d.raw(smuggled) == []  # none of it was a command
    assert d.raw(b".\r\n") == [BARE]
    assert d.send("NOOP") == [NOOP_OK]
    assert not os.path.exists(tmp_path / "box" / "bob" / "mbox")
    d.close()


def test_bare_cr_before_a_real_end_refuses_the_message(tmp_path):
    """``body<CR><CR><LF>.<CR><LF>`` ends DATA for real (and for every later hop)."""
    d = testing.Dialogue(testing.make_settings("", root=str(tmp_path)), peer="127.0.0.2",
                         mailboxes=("bob",))
    d.send("EHLO h.sender.net", "MAIL FROM:<a@b.example>", "RCPT TO:<bob>", "DATA")
    assert d.raw(b"Subject: s\r\n\r\nbody\r\r\n.\r\nNOOP\r\n") == [BARE, NOOP_OK]
    assert not os.path.exists(tmp_path / "box" / "bob" / "mbox")
    d.close()


# -- fuzzing ------------------------------------------------------------------

body_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"x", b"MAIL FROM:<e@x>",
                                       b"\x00", b"\xff", b"Subject: s", b" "]),
                      max_size=40).map(b"".join)


def expected_end(body):
    """Does the message end only at the CRLF.CRLF we append, and has it a bare CR/LF?

    A CRLF.CRLF inside the body is a real end (for us and every later hop):
    what follows is commands, which the examples leave out.
    """
    stream = b"\r\n" + body + b"\r\n.\r\n"
    end = stream.find(b"\r\n.\r\n")
    message = stream[2:end]
    lines = message.split(b"\r\n") if message else []
    return end == len(body) + 2, any(b"\r" in line or b"\n" in line for line in lines)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None, max_examples=150)
@given(st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b), max_size=6),
       body_bytes)
def test_fuzz_commands_and_data_over_string_transport(commands, body):
    root = tempfile.mkdtemp(prefix="upasmail-fuzz-")
    try:
        d = testing.Dialogue(testing.make_settings("", root=root), peer="127.0.0.1",
                             mailboxes=("bob",))
        for line in commands:
            if d.proto.mode != "COMMAND" or d.transport.disconnecting:
                break
            out = d.raw(line + b"\r\n")
            assert out and all(re.match(r"\d\d\d[ -]", r) for r in out), (line, out)
        if d.transport.disconnecting:
            return
        if d.proto.mode != "COMMAND":
            d.raw(b"*\r\n.\r\n")
        d.send("RSET", "EHLO h.sender.net", "MAIL FROM:<a@b.example>", "RCPT TO:<bob>")
        assert d.send("DATA") == [GO]
        body = b"Subject: fuzz\r\n\r\n" + body  # random bytes in the body, not the header
        ours, bare = expected_end(body)
        assume(ours)
        out = d.raw(body + b"\r\n.\r\n")
        stored = os.path.exists(os.path.join(root, "box", "bob", "mbox"))
        if bare:
            assert BARE in out and not stored, (body, out)
        else:
            assert out[0] == "250 2.5.0 sent" and stored, (body, out)
        d.close()
    finally:
        shutil.rmtree(root, True)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from test_twistd import Server
    s = Server(tmp_path_factory.mktemp("fuzz"), "--tarpit-unit", "0", "--max-recipients", "100",
               mailboxes=("bob",))
    yield s
    s.stop()


def talk(port, data, expect_replies):
    """Send bytes in one write; read until ``expect_replies`` final reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        c.sendall(data)
        finals = []
        while len(finals) < expect_replies:
            line = f.readline()
            if not line:
                break
            if line[3:4] == b" ":
                finals.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
        c.sendall(b"QUIT\r\n")
        return finals


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None, max_examples=40)
@given(body_bytes)
def test_fuzz_data_over_loopback(live_server, body):
    mbox = os.path.join(live_server.root, "box", "bob", "mbox")
    before = len(mailbox.mbox(mbox)) if os.path.exists(mbox) else 0
    body = b"Subject: fuzz\r\n\r\n" + body
    ours, bare = expected_end(body)
    assume(ours)
    out = talk(live_server.port, b"EHLO h.sender.net\r\nMAIL FROM:<a@b.example>\r\n"
               b"RCPT TO:<bob>\r\nDATA\r\n" + body + b"\r\n.\r\nNOOP\r\n", 6)
    assert out[:4] == ["250 SMTPUTF8", "250 2.0.0 sender is b.example!a",
                       "250 2.0.0 receiver is bob", GO]
    assert out[4] == (BARE if bare else "250 2.5.0 sent"), (body, out)
    assert out[5] == NOOP_OK  # nothing smuggled ran as a command
    after = len(mailbox.mbox(mbox)) if os.path.exists(mbox) else 0
    assert after == before + (0 if bare else 1)


# -- signals, against a real twistd -------------------------------------------

@pytest.fixture
def twistd_server(tmp_path):
    """Start ``twistd upas-smtpd`` with extra arguments; stopped whatever happens."""
    from test_twistd import Server
    started = []

    def start(*args):
        s = Server(tmp_path, *args, mailboxes=("bob",))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@contextlib.contextmanager
def in_data(port, first_part):
    """A connection that has sent ``first_part`` of a message after DATA's 354."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        f = c.makefile("rb")
        f.readline()
        c.sendall(b"EHLO h.sender.net\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob>\r\nDATA\r\n")
        while not f.readline().startswith(b"354"):
            pass
        c.sendall(first_part)
        yield c, f


def test_sigterm_with_a_message_in_flight(twistd_server):
    s = twistd_server("--shutdown-grace", "30")
    with in_data(s.port, b"Subject: in flight\r\n\r\nfirst half\r\n") as (c, f):
        s.proc.send_signal(signal.SIGTERM)
        # the listener closes, the session in DATA may finish
        c.sendall(b"second half\r\n.\r\n")
        assert f.readline() == b"250 2.5.0 sent\r\n"
        assert f.readline().startswith(b"421 4.3.2 ")
    s.proc.wait(30)
    [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    assert msg.get_payload() == "first half\nsecond half\n"


def test_sigterm_grace_over_refuses_with_421_and_stores_nothing(twistd_server):
    s = twistd_server("--shutdown-grace", "0.5")
    with in_data(s.port, b"Subject: never finished\r\n\r\nhalf\r\n") as (c, f):
        s.proc.send_signal(signal.SIGTERM)
        assert f.readline().startswith(b"421 4.3.2 ")
    s.proc.wait(30)
    assert not os.path.exists(os.path.join(s.root, "box", "bob", "mbox"))
    assert os.listdir(os.path.join(s.root, "tmp")) == []


def test_sighup_reloads_smtpd_conf_and_keeps_connections(twistd_server, tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("ourdomains a.example\n")
    s = twistd_server("--conf", str(conf), "--tarpit-unit", "0", "-e")  # -e: no HELO DNS
    kept = smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                        local_hostname="h.sender.net")
    kept.ehlo()

    def rcpt():
        with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0)) as c:
            c.ehlo("h.sender.net")
            c.mail("x@sender.example")
            return c.rcpt("bob@b.example")[0]

    assert rcpt() == 550
    conf.write_text("ourdomains a.example, b.example\n")
    s.proc.send_signal(signal.SIGHUP)
    for _ in range(600):  # the reload happens in the child: poll its log
        if "settings reloaded" in s.output():
            break
        time.sleep(0.05)
    assert rcpt() == 250
    assert kept.noop()[0] == 250  # the old connection is still there
    kept.close()
    conf.write_text("nonsense here\n")
    s.proc.send_signal(signal.SIGHUP)
    for _ in range(600):
        if "keeping the running settings" in s.output():
            break
        time.sleep(0.05)
    assert rcpt() == 250


def test_grammar_parameter_errors_are_syntax_errors_too():
    with pytest.raises(grammar.CommandSyntaxError):
        grammar.parse(b"MAIL FROM:<a@b.example> X-FOO=1")
    assert grammar.parse(b"MAIL FROM:<a@b.example> BODY=8bitmime SIZE=12").params == {
        "BODY": "8bitmime", "SIZE": "12"}
