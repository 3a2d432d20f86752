"""Issue 13 items 10 and 11: logs that can be joined, start-up errors in one line."""

import json
import os
import re
import shutil
import smtplib
import socket
import tempfile
import time

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.logger import (LogLevel, FilteringLogObserver, capturedLogs, formatEvent,
                            globalLogPublisher)
from twisted.names import dns
from twisted.python import log as legacy_log
from twisted.trial import unittest

from upasmail import logs, testing

from test_twistd import twistd
from test_twistd import dns_port, server  # noqa: F401  (fixtures)

SESSION_ID = re.compile(r"[0-9a-f]{12}\Z")
QUEUE_ID = re.compile(r"\d+\.[0-9a-f]{12}\Z")
BODY = ("Subject: joined\r\nMessage-ID: <m1@example.org>\r\n\r\nhello\r\n")


# -- item 10: every session line names the session, message lines the message ----

class SessionLineTests(unittest.TestCase):
    def dialogue(self, peer="127.0.0.2"):
        root = tempfile.mkdtemp(prefix="upasmail-logging-")
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "box", "bob"))
        os.makedirs(os.path.join(root, "lib"))
        with open(os.path.join(root, "lib", "names.blocked"), "w") as f:
            f.write("trap\n")
        d = testing.Dialogue(testing.make_settings(root=root), peer=peer)
        self.addCleanup(d.close)
        return d

    def session_events(self, events):
        return [e for e in events if e.get("log_namespace") == "smtpd"]

    def test_every_line_of_a_session_names_it(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("EHLO h.sender.net", "MAIL FROM:<alice@example.org>",
                   "RCPT TO:<x@far.example>", "RCPT TO:<trap>", "RCPT TO:<bob>", "DATA")
            out = d.raw(BODY.encode() + b".\r\n")
            d.close()
        self.assertEqual(out, ["250 2.5.0 sent"])
        sid = d.proto.session.id
        self.assertRegex(sid, SESSION_ID)
        mine = self.session_events(events)
        lines = [formatEvent(e) for e in mine]
        # nothing logged in the session is without its id
        self.assertEqual([e.get("session") for e in mine], [sid] * len(mine))
        self.assertEqual([t for t in lines if not t.startswith(sid + ": ")], [])
        text = "\n".join(lines)
        for expected in ("connect from 127.0.0.2", "ehlo from 127.0.0.2 as h.sender.net",
                         "Bad Forward", "names.blocked blocks trap",
                         "disconnect from 127.0.0.2: 1 accepted"):
            self.assertIn(expected, text)

    def test_greylist_and_helo_lines_name_the_session(self):
        root = tempfile.mkdtemp(prefix="upasmail-logging-")
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "box", "bob"))
        resolver = testing.FakeResolver({"2.0.0.127.in-addr.arpa": [
            dns.Record_PTR("p.sender.net")]})
        d = testing.Dialogue(testing.make_settings(root=root, greylist=True), resolver=resolver)
        self.addCleanup(d.close)
        with capturedLogs() as events:
            d.send("EHLO p.sender.net")
            out = d.send("MAIL FROM:<alice@example.org>", "RCPT TO:<bob>", "DATA")
        self.assertEqual(out[-1][:4], "451 ")
        mine = self.session_events(events)
        text = "\n".join(formatEvent(e) for e in mine)
        self.assertIn("ptr only from 127.0.0.2 as p.sender.net", text)
        self.assertIn("no call registered for 127.0.0.2/bob", text)
        self.assertEqual({e["session"] for e in mine}, {d.proto.session.id})

    def test_message_lines_name_the_queue_id_and_message_id(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("EHLO h.sender.net", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob>",
                   "DATA")
            d.raw(BODY.encode() + b".\r\n")
        sid = d.proto.session.id
        about = [e for e in self.session_events(events) if "queue_id" in e]
        [qid] = {e["queue_id"] for e in about}
        self.assertRegex(qid, QUEUE_ID)
        lines = [formatEvent(e) for e in about]
        prefix = "%s: %s: " % (sid, qid)
        self.assertEqual(lines[:2], [
            prefix + "message-id=<m1@example.org>",
            prefix + "to=bob relay=local status=sent (delivered to mailbox)",
        ])
        # upas's line, with the maillog fields after it (docs/logging.rst)
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[2].startswith(
            prefix + "[h.sender.net/127.0.0.2] example.org!alice sent %d bytes to bob; "
            % about[-1]["n"]), lines[2])
        self.assertEqual({e["message_id"] for e in about}, {"<m1@example.org>"})

    def test_queued_message_logs_the_id_the_queue_uses(self):
        with capturedLogs() as events:
            d = self.dialogue(peer="127.0.0.1")  # loopback may relay
            d.send("EHLO h.sender.net", "MAIL FROM:<alice@example.org>",
                   "RCPT TO:<bob@far.example>", "DATA")
            d.raw(b"Subject: no id\r\n\r\nhi\r\n.\r\n")
        [env] = [n for n in os.listdir(d.root.queue) if n.endswith(".env")]
        with open(os.path.join(d.root.queue, env)) as f:
            job = json.load(f)
        queued = [e for e in events if "status=queued" in e.get("log_format", "")]
        self.assertEqual([(e["queue_id"], e["rcpt"]) for e in queued],
                         [(job["id"], "far.example!bob")])
        self.assertNotIn("message_id", queued[0])  # the header had none

    def test_refused_connection_line_has_a_session_id(self):
        d = self.dialogue()
        d.factory.settings = testing.make_settings(root=d.root.root, max_connections=1)
        with capturedLogs() as events:
            self.assertIsInstance(d.factory.buildProtocol(testing.address("127.0.0.3", 1)),
                                  protocol.Protocol)
        [e] = [e for e in events if "too many connections" in e.get("log_format", "")]
        self.assertRegex(e["session"], SESSION_ID)
        self.assertTrue(formatEvent(e).startswith(e["session"] + ": too many"))


class MailerLineTests(unittest.TestCase):
    """-m: the mailer's lines name the session and the message too."""

    def test_mailer_failure_line(self):
        root = tempfile.mkdtemp(prefix="upasmail-logging-")
        self.addCleanup(shutil.rmtree, root, True)
        path = os.path.join(root, "fakemail")
        with open(path, "w") as f:
            f.write("#!/bin/sh\ncat >/dev/null\necho 'no such user' >&2\nexit 1\n")
        os.chmod(path, 0o700)
        s = testing.make_settings("", root=os.path.join(root, "mail"), mailer=path)
        d = testing.Dialogue(s, peer="127.0.0.1", reactor=reactor)
        self.addCleanup(d.close)
        d.send("HELO h.sender.net", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.com>",
               "DATA")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d.raw(b"Message-ID: <m2@example.org>\r\n\r\nhi\r\n.\r\n")
        return d.proto.whenQuiet().addCallback(self.check, d, events)

    def check(self, _, d, events):
        [e] = [e for e in events if "returned {code}" in e.get("log_format", "")]
        self.assertEqual((e["session"], e["message_id"]), (d.proto.session.id, "<m2@example.org>"))
        self.assertRegex(e["queue_id"], QUEUE_ID)
        self.assertIn("returned 450 no such user", formatEvent(e))


class SessionLoggerTests(unittest.TestCase):
    def test_fields_and_prefix(self):
        events = []
        log = logs.SessionLogger("abc", observer=events.append)
        log.info("hello {who}", who="bob")
        log.forMessage("1.ff", "<x@y>").warn("queued")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("broke")
        self.assertEqual([formatEvent(e) for e in events[:2]],
                         ["abc: hello bob", "abc: 1.ff: queued"])
        self.assertEqual((events[1]["session"], events[1]["queue_id"], events[1]["message_id"]),
                         ("abc", "1.ff", "<x@y>"))
        self.assertEqual((events[2]["session"], events[2]["log_level"]),
                         ("abc", LogLevel.critical))
        self.assertTrue(formatEvent(events[2]).startswith("abc: broke"))

    def test_printable(self):
        self.assertEqual(logs.printable("<a\r\n\tb\x1b@c>"), "<a b?@c>")
        self.assertEqual(len(logs.printable("x" * 1000)), 200)


class DNSNoiseTests(unittest.TestCase):
    """The lines Twisted really writes for a DNS query's UDP port, on 127.0.0.1."""

    @defer.inlineCallbacks
    def udp_port_lines(self, proto):
        with capturedLogs() as events:
            port = reactor.listenUDP(0, proto, interface="127.0.0.1")
            yield port.stopListening()
        return events

    def filtered(self, events, predicate):
        kept = []
        observer = FilteringLogObserver(kept.append, [predicate])
        for e in events:
            observer(e)
        return kept

    @defer.inlineCallbacks
    def test_dns_port_lines_are_dropped_and_nothing_else(self):
        noise = yield self.udp_port_lines(dns.DNSDatagramProtocol(None))
        self.assertEqual(len(noise), 4)  # the four lines per lookup
        other = yield self.udp_port_lines(protocol.DatagramProtocol())
        self.assertTrue(any("UDP Port" in formatEvent(e) for e in other))
        with capturedLogs() as errors:
            legacy_log.msg("(UDP Port 53 Closed)")  # a port it never saw open
            legacy_log.err(RuntimeError("DNSDatagramProtocol starting on 1 boom"))
        predicate = logs.DNSNoise()
        self.assertEqual(self.filtered(noise, predicate), [])
        self.assertEqual(self.filtered(other + errors, predicate), other + errors)
        self.flushLoggedErrors(RuntimeError)


# -- item 10 end to end: one grep joins AUTH, acceptance and the relay --------

def lines_with(text, needle):
    return [line for line in text.splitlines() if needle in line]


def test_grep_joins_session_message_and_queue(tmp_path, server):  # noqa: F811
    pw = tmp_path / "passwd"
    pw.write_text("alice:secret 9\n")
    pw.chmod(0o600)
    far = server("--listen", "tcp:0:interface=127.0.0.2", "-h", "far.example",
                 "--no-queue-runner", where="far")
    near = server("-p", "--passwd", str(pw), "--queue-scan", "1", "--mx-port", str(far.port),
                  where="near")
    os.makedirs(os.path.join(far.root, "box", "bob"), exist_ok=True)
    with smtplib.SMTP("127.0.0.1", near.port) as c:
        c.ehlo("client.example.net")
        c.login("alice", "secret 9")
        assert c.sendmail("alice@example.org", ["bob@far.example"], BODY) == {}
    mbox = os.path.join(far.root, "box", "bob", "mbox")
    for _ in range(600):  # two child processes at work: poll for the result
        if "status=sent" in near.output() and os.path.exists(mbox):
            break
        time.sleep(0.05)
    log = near.output()
    [auth] = lines_with(log, "authenticated alice from 127.0.0.1")
    sid = re.search(r"\] ([0-9a-f]{12}): authenticated", auth).group(1)
    session = lines_with(log, sid + ": ")
    [accepted] = lines_with(log, ": message-id=<m1@example.org>")
    qid = re.search(sid + r": (\d+\.[0-9a-f]{12}): message-id", accepted).group(1)
    # grep the session id: the whole conversation, with the queue id in it
    for text in ("connect from 127.0.0.1", "ehlo from 127.0.0.1 as client.example.net",
                 "(protected)) from client.example.net",
                 qid + ": message-id=<m1@example.org>",
                 qid + ": to=far.example!bob relay=queue status=queued",
                 qid + ": [client.example.net/127.0.0.1] example.org!alice sent",
                 "disconnect from 127.0.0.1: 1 accepted, 0 refused"):
        assert any(text in line for line in session), (text, session)
    # grep the queue id: acceptance and delivery by the queue runner
    assert re.search(qid + r": to=far.example!bob relay=\(mx.far.example:127.0.0.2\) "
                     r"status=sent", log)
    # the far side logs the same Message-ID under its own ids
    assert lines_with(far.output(), ": message-id=<m1@example.org>")
    # the MX lookup happened, and Twisted's per-query lines are gone
    for noise in ("DNSDatagramProtocol", "UDP Port"):
        assert noise not in log


# -- item 11: start-up errors are one line and exit 1, through twistd ---------

def startup_failure(tmp_path, *args):
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--root", str(tmp_path / "mail"), *args,
               cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out and "Usage:" not in out, out
    [line] = [line for line in out.splitlines() if "upas-smtpd:" in line]
    return line


@pytest.mark.parametrize("args,expected", [
    (["--tarpit-unit", "abc"], "upas-smtpd: --tarpit-unit wants a number, not 'abc'"),
    (["--tarpit-max", "nan"], "upas-smtpd: --tarpit-max wants a number, not 'nan'"),
    (["--max-recipients", "many"], "upas-smtpd: --max-recipients wants an integer, not 'many'"),
    (["--mx-port", "25.5"], "upas-smtpd: --mx-port wants an integer, not '25.5'"),
    (["--listen", "tcp:notaport"], "upas-smtpd: --listen tcp:notaport: invalid literal"),
    (["--listen", "bogus:25"], "upas-smtpd: --listen bogus:25: Unknown endpoint type"),
    (["--max-command-line", "100"], "upas-smtpd: --max-command-line must be at least 512"),
    # each limit's error names only the option given
    (["--max-recipients", "-5"], "upas-smtpd: --max-recipients must be at least 100 "
                                 "(RFC 5321 4.5.3.1)"),
    (["--max-domain", "1"], "upas-smtpd: --max-domain must be at least 255 (RFC 5321"),
    (["--auth-max-failures", "0"], "upas-smtpd: --auth-max-failures must be at least 1"),
    (["--tarpit-max", "-1"], "upas-smtpd: --tarpit-max cannot be negative"),
    # endpoint parsers raise more than ValueError
    (["--listen", "tcp:2610:interface=127.0.0.1:proxy=1"],
     "upas-smtpd: --listen tcp:2610:interface=127.0.0.1:proxy=1: wrong parameters for tcp: "
     "got an unexpected keyword argument 'proxy'"),
    (["--listen", "tcp6:2601:interface=::1"],
     "upas-smtpd: --listen tcp6:2601:interface=::1: wrong parameters for tcp6: got multiple "
     "values for argument 'interface' (write a ':' inside a value as '\\:', as in "
     "interface=\\:\\:1)"),
    (["--listen", "tcp:2525:1:2:3:4"],
     "upas-smtpd: --listen tcp:2525:1:2:3:4: wrong parameters for tcp: too many "
     "':'-separated parts"),
    (["--listen", "systemd:domain=INET:index=0"],
     "upas-smtpd: --listen systemd:domain=INET:index=0: no such socket inherited from "
     "systemd (0 inherited)"),
])
def test_bad_option_value_is_one_line(tmp_path, args, expected):
    line = startup_failure(tmp_path, *args)
    assert line.startswith(expected)
    assert line.count("--") == 1  # no option but the one at fault


@pytest.mark.parametrize("listen,reason", [
    ("tcp:99999", "bind(): port must be 0-65535."),
    ("tcp:-1", "bind(): port must be 0-65535."),
    ("unix:{tmp}/nosuchdir/sock", "no such file or directory: {tmp}/nosuchdir/sock.lock"),
])
@pytest.mark.parametrize("foreground", [True, False])
def test_endpoint_that_cannot_listen_is_one_line(tmp_path, listen, reason, foreground):
    listen, reason = (t.format(tmp=tmp_path) for t in (listen, reason))
    expected = "upas-smtpd: cannot listen on %s: %s" % (listen, reason)
    if foreground:
        assert startup_failure(tmp_path, "--listen", listen).endswith(expected)
        return
    r = twistd("--logfile", str(tmp_path / "twistd.log"), "--pidfile",
               str(tmp_path / "twistd.pid"), "upas-smtpd", "--root", str(tmp_path / "mail"),
               "--listen", listen, cwd=str(tmp_path))
    assert r.returncode == 1
    assert expected[:60] in r.stderr  # twistd's parent cuts it
    line = daemon_log_line(tmp_path / "twistd.log")
    assert line.endswith(expected)


def daemon_log_line(path):
    """The ``upas-smtpd:`` line of a daemon's log, and no traceback.

    twistd's parent exits as soon as the child has told it; the child logs
    the line on its way out: poll for it.
    """
    for _ in range(250):
        text = path.read_text()
        text = text[:text.rfind("\n") + 1]  # whole lines only: it may be mid-write
        lines = [line for line in text.splitlines() if "upas-smtpd:" in line]
        if lines:
            break
        time.sleep(0.02)
    assert "Traceback" not in text
    [line] = lines
    return line


def test_escaped_ipv6_interface_parses():
    from upasmail import tap_smtpd
    tap_smtpd.check_endpoint("tcp6:2601:interface=\\:\\:1")


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = startup_failure(tmp_path, "--listen", "tcp:%d:interface=127.0.0.1" % port)
    assert line.endswith("upas-smtpd: cannot listen on 127.0.0.1:%d: address already in use"
                         % port)


def test_unusable_mail_root_is_one_line(tmp_path):
    (tmp_path / "mail").write_text("a file, not a directory\n")
    line = startup_failure(tmp_path)
    assert line.startswith("upas-smtpd: mail root %s: " % (tmp_path / "mail"))


class ListenerTests(unittest.TestCase):
    """Errors a test cannot provoke for real (we may be root: low ports bind)."""

    def start(self, error):
        from twisted.application.service import Service
        from upasmail import tap_smtpd

        class Refused(Service):
            def privilegedStartService(self):
                raise error

        svc = tap_smtpd.TwistdService(Refused(), "tcp:25")
        with self.assertRaises(tap_smtpd.StartupError) as e:
            svc.privilegedStartService()
        return str(e.exception)

    def test_permission_denied_on_a_low_port(self):
        from twisted.internet.error import CannotListenError
        text = self.start(CannotListenError("", 25, PermissionError(13, "Permission denied")))
        self.assertEqual(text, "upas-smtpd: cannot listen on *:25: permission denied")

    def test_unix_socket_path(self):
        from twisted.internet.error import CannotListenError
        text = self.start(CannotListenError(None, "/nonexistent/s", FileNotFoundError(
            2, "No such file or directory")))
        self.assertEqual(text, "upas-smtpd: cannot listen on /nonexistent/s: "
                               "no such file or directory")

    def test_options_outside_twistd_still_raise_usage_errors(self):
        from twisted.python import usage
        from upasmail import tap_smtpd
        with self.assertRaises(usage.UsageError) as e:
            tap_smtpd.Options().parseOptions(["--tarpit-unit", "abc"])
        self.assertEqual(str(e.exception), "--tarpit-unit wants a number, not 'abc'")


def test_port_in_use_without_n_reaches_the_parent(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = twistd("--logfile", str(tmp_path / "twistd.log"), "--pidfile",
                   str(tmp_path / "twistd.pid"), "upas-smtpd", "--root", str(tmp_path / "mail"),
                   "--listen", "tcp:%d:interface=127.0.0.1" % port, cwd=str(tmp_path))
    assert r.returncode == 1  # the parent no longer waits for ever
    assert "upas-smtpd: cannot listen on 127.0.0.1:%d" % port in r.stderr  # twistd cuts it
    line = daemon_log_line(tmp_path / "twistd.log")
    assert line.endswith("upas-smtpd: cannot listen on 127.0.0.1:%d: address already in use"
                         % port)
    for _ in range(250):  # the child removes its pid file on its way out, too
        if not (tmp_path / "twistd.pid").exists():
            break
        time.sleep(0.02)
    assert not (tmp_path / "twistd.pid").exists()
