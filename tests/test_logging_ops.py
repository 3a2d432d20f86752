"""Issue 15, logging: event names and fields, maillog lines, the JSON log,
reopening for logrotate, journald lines, and what is never logged
(docs/logging.rst)."""

import base64
import io
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time

from twisted.internet import task
from twisted.logger import (FileLogObserver, LogLevel, LogPublisher, Logger, capturedLogs,
                            formatEvent, textFileLogObserver)
from twisted.python.logfile import LogFile
from twisted.trial import unittest

from upasmail import logs, store, testing, workers

from test_twistd import TWISTD, env
from test_twistd import dns_port, server  # noqa: F401  (fixtures)

BODY = "Subject: hi\r\nMessage-ID: <m1@example.org>\r\n\r\nhello\r\n"
# the fields docs/logging.rst promises, per event
ACCEPTED = {"event", "session", "queue_id", "message_id", "sender", "recipients", "nrcpt",
            "size", "peer", "helo", "tls", "auth_user", "code", "reply"}
REFUSED = {"event", "session", "peer", "helo", "tls", "auth_user", "command", "sender",
           "rcpt", "recipients", "code", "reply", "temporary", "reason", "detail"}
DISCONNECT = {"event", "session", "peer", "helo", "tls", "auth_user", "accepted", "refused",
              "duration", "end"}
REASONS = {"relay", "ratify", "helo", "greylist", "tarpit", "auth-required", "auth-failed",
           "auth-throttled", "auth-error", "size", "smuggling", "syntax", "sequence",
           "unknown-user", "sender-check", "recipients", "busy", "tls", "spam", "loop", "store",
           "local-error", "rate", "state-unavailable", "other"}


def named(events, name):
    return [e for e in events if e.get("event") == name]


def lose(d):
    """The connection goes (the test transport only notes that it should)."""
    d.proto.connectionLost(None)
    d.proto.setTimeout(None)


# -- the events of a session, in process ----------------------------------------

class SessionEventTests(unittest.TestCase):
    def dialogue(self, peer="127.0.0.2", **settings):
        root = tempfile.mkdtemp(prefix="upasmail-events-")
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "box", "bob"))
        d = testing.Dialogue(testing.make_settings(root=root, **settings), peer=peer)
        self.addCleanup(d.close)
        return d

    def test_accepted_message_and_connection_outcome(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("EHLO h.sender.net", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob>",
                   "DATA")
            self.assertEqual(d.raw(BODY.encode() + b".\r\n"), ["250 2.5.0 sent"])
            d.send("QUIT")
            lose(d)
        [connect] = named(events, "smtpd.connect")
        self.assertEqual((connect["peer"], connect["trusted"]), ("127.0.0.2", False))
        [e] = named(events, "smtpd.accepted")
        self.assertLessEqual(ACCEPTED, set(e))
        self.assertEqual((e["sender"], e["recipients"], e["nrcpt"], e["peer"], e["helo"],
                          e["tls"], e["auth_user"], e["message_id"], e["code"], e["reply"]),
                         ("alice@example.org", ["bob"], 1, "127.0.0.2", "h.sender.net", "none",
                          None, "<m1@example.org>", 250, "2.5.0 sent"))
        self.assertRegex(e["queue_id"], r"\d+\.[0-9a-f]{12}\Z")
        self.assertGreater(e["size"], len(BODY))  # with the lines smtpd adds
        # grep from=<addr> and the queue id find the acceptance
        text = formatEvent(e)
        for needle in ("from=<alice@example.org>", "to=<bob>", e["queue_id"] + ": ",
                       "message-id=<m1@example.org>", "auth=none", "(250 2.5.0 sent)"):
            self.assertIn(needle, text)
        [delivery] = named(events, "queue.delivery")
        self.assertEqual((delivery["rcpt"], delivery["relay"], delivery["status"]),
                         ("bob", "local", "sent"))
        [bye] = named(events, "smtpd.disconnect")
        self.assertLessEqual(DISCONNECT, set(bye))
        self.assertEqual((bye["accepted"], bye["refused"], bye["end"], bye["helo"]),
                         (1, 0, "quit", "h.sender.net"))
        self.assertIn("end=quit", formatEvent(bye))

    def test_a_message_without_message_id_has_it_null(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("HELO h.sender.net", "MAIL FROM:<>", "RCPT TO:<bob>", "DATA")
            d.raw(b"Subject: no id\r\n\r\nhi\r\n.\r\n")
        [e] = named(events, "smtpd.accepted")
        self.assertEqual((e["message_id"], e["sender"]), (None, ""))
        self.assertIn("accepted from=<> to=<bob> ", formatEvent(e))
        self.assertIn(" message-id=none ", formatEvent(e))

    def test_each_refusal_is_one_event_with_its_reason(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("EHLO h.sender.net", "RCPT TO:<bob>", "MAIL FROM:<alice@example.org>",
                   "RCPT TO:<x@far.example>", "RCPT TO:<nobody>", "BOGUS", "RCPT TO:<bob>",
                   "DATA")
            d.raw(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
        refused = named(events, "smtpd.refused")
        self.assertEqual([(e["command"], e["reason"], e["code"]) for e in refused], [
            ("RCPT", "sequence", 503), ("RCPT", "relay", 550), ("RCPT", "unknown-user", 550),
            ("BOGUS", "syntax", 500), ("DATA", "smuggling", 554)])
        for e in refused:
            self.assertLessEqual(REFUSED, set(e))
            self.assertIn(e["reason"], REASONS)
            self.assertEqual(e["session"], d.proto.session.id)
        relay = refused[1]
        self.assertEqual((relay["sender"], relay["rcpt"], relay["temporary"]),
                         ("alice@example.org", "x@far.example", False))
        self.assertEqual(formatEvent(relay), (
            "%s: refused RCPT from=<alice@example.org> to=<x@far.example> peer=127.0.0.2 "
            "helo=h.sender.net reason=relay (550 5.7.1 we don't relay.  send to "
            "your-path@[] for loopback.)" % d.proto.session.id))
        smuggled = refused[-1]
        self.assertEqual((smuggled["recipients"], smuggled["sender"]),
                         (["bob"], "alice@example.org"))
        self.assertIn("queue_id", smuggled)  # the message had one when it was refused
        self.assertIsNone(refused[0]["sender"])  # no MAIL yet

    def test_a_policy_hangup_ends_the_connection_as_hangup(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.send("HELO gnot.example.org")  # our own name: a lie
            lose(d)
        [e] = named(events, "smtpd.refused")
        self.assertEqual((e["reason"], e["detail"], e["command"]), ("helo", "lie", "HELO"))
        [bye] = named(events, "smtpd.disconnect")
        self.assertEqual(bye["end"], "hangup")

    def test_idle_timeout_ends_the_connection_as_timeout(self):
        with capturedLogs() as events:
            d = self.dialogue()
            d.clock.advance(301)
            lose(d)
        [bye] = named(events, "smtpd.disconnect")
        self.assertEqual(bye["end"], "timeout")

    def test_auth_events_name_the_outcome_never_the_secret(self):
        pw = os.path.join(tempfile.mkdtemp(prefix="upasmail-pw-"), "passwd")
        self.addCleanup(shutil.rmtree, os.path.dirname(pw), True)
        with open(pw, "w") as f:
            f.write("alice:Sekr1tMarker\n")
        os.chmod(pw, 0o600)
        d = self.dialogue(clear_passwords=True, passwd=pw, auth_fail_delay=0)
        with capturedLogs() as events:
            d.send("EHLO h.sender.net")
            good = base64.b64encode(b"\0alice\0Sekr1tMarker").decode()
            bad = base64.b64encode(b"\0alice\0WrongMarker").decode()
            d.send("AUTH PLAIN " + bad)
            d.send("AUTH PLAIN " + good)
        outcomes = [(e["result"], e["user"], e["mechanism"]) for e in named(events, "smtpd.auth")]
        self.assertEqual(outcomes, [("failure", "alice", "PLAIN"), ("success", "alice", "PLAIN")])
        [refused] = named(events, "smtpd.refused")
        self.assertEqual(refused["reason"], "auth-failed")
        dump = repr(events) + "".join(logs.json_line(e) for e in events)
        for secret in ("Sekr1tMarker", "WrongMarker", good, bad):
            self.assertNotIn(secret, dump)


class RefusedAtConnectTests(unittest.TestCase):
    def test_connection_limit_is_the_connections_one_disconnect_line(self):
        root = tempfile.mkdtemp(prefix="upasmail-events-")
        self.addCleanup(shutil.rmtree, root, True)
        d = testing.Dialogue(testing.make_settings(root=root), peer="127.0.0.2")
        self.addCleanup(d.close)
        d.factory.settings = testing.make_settings(root=root, max_connections=1)
        with capturedLogs() as events:
            d.factory.buildProtocol(testing.address("127.0.0.3", 1))
        [e] = named(events, "smtpd.disconnect")
        self.assertEqual((e["peer"], e["end"], e["accepted"], e["refused"]),
                         ("127.0.0.3", "limit", 0, 0))


# -- formats ----------------------------------------------------------------------

class FormatTests(unittest.TestCase):
    def event(self, **kw):
        events = []
        Logger(namespace="smtpd", observer=events.append).info(
            "{session}: hello {peer}", session="s1", peer="192.0.2.1", event="smtpd.x", **kw)
        return events[0]

    def test_json_line_is_one_object_with_the_fields_and_the_text(self):
        line = logs.json_line(self.event(recipients=["a", "b"], err=OSError("disk")))
        self.assertTrue(line.endswith("\n") and "\n" not in line[:-1])
        record = json.loads(line)
        self.assertEqual((record["event"], record["peer"], record["recipients"], record["level"],
                          record["namespace"], record["text"], record["err"]),
                         ("smtpd.x", "192.0.2.1", ["a", "b"], "info", "smtpd",
                          "s1: hello 192.0.2.1", "disk"))
        self.assertFalse([k for k in record if k.startswith("log_")])

    def test_journal_line_has_a_priority_and_no_time(self):
        e = self.event()
        self.assertEqual(logs.journal_line(e), "<6>s1: hello 192.0.2.1\n")
        e["log_level"] = LogLevel.error
        self.assertEqual(logs.journal_line(e)[:3], "<3>")

    def test_journald_is_recognised_by_its_stream(self):
        with tempfile.TemporaryFile("w") as f:
            st = os.fstat(f.fileno())
            stream = "%d:%d" % (st.st_dev, st.st_ino)
            self.assertTrue(logs.under_journald(f, {"JOURNAL_STREAM": stream}))
            self.assertFalse(logs.under_journald(f, {"JOURNAL_STREAM": "1:2"}))
            self.assertFalse(logs.under_journald(f, {}))


class LogServiceTests(unittest.TestCase):
    """LogService on a publisher of its own, as twistd leaves the global one."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="upasmail-logsvc-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.publisher = LogPublisher()
        self.signals = FakeSignals()

    def service(self, twistd_file, json_path=None, environ=None):
        twistd_observer = textFileLogObserver(twistd_file)
        self.publisher.addObserver(twistd_observer)
        svc = logs.LogService(json_path, publisher=self.publisher, environ=environ or {},
                              signals=self.signals, reactor=Immediate())
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        return svc, Logger(namespace="smtpd", observer=self.publisher)

    def test_debug_events_stay_out_of_the_text_and_json_logs(self):
        text = io.StringIO()
        path = os.path.join(self.dir, "log.json")
        seen = []
        self.publisher.addObserver(seen.append)  # a metrics observer sees everything
        svc, log = self.service(text, path)
        log.debug("synced", event="store.sync", seconds=0.001, messages=1)
        log.info("kept", event="smtpd.connect")
        svc.stopService()
        self.assertNotIn("synced", text.getvalue())
        self.assertIn("kept", text.getvalue())
        with open(path) as f:
            self.assertEqual([json.loads(line)["event"] for line in f], ["smtpd.connect"])
        self.assertEqual([e["event"] for e in seen], ["store.sync", "smtpd.connect"])

    def test_sigusr1_reopens_twistds_log_file_and_the_json_log(self):
        logfile = LogFile.fromFullPath(os.path.join(self.dir, "twistd.log"))
        path = os.path.join(self.dir, "log.json")
        svc, log = self.service(logfile, path)
        self.assertIsNone(logfile.rotateLength)  # twistd's own 1 MB rotation is off
        log.info("before", event="a")
        for name in ("twistd.log", "log.json"):
            os.rename(os.path.join(self.dir, name), os.path.join(self.dir, name + ".1"))
        self.signals.deliver(signal.SIGUSR1)
        log.info("after", event="b")
        svc.stopService()
        logfile.close()
        for name, old, new in (("twistd.log", "before", "after"), ("log.json", "before",
                                                                   "after")):
            with open(os.path.join(self.dir, name + ".1")) as f:
                rotated = f.read()
            with open(os.path.join(self.dir, name)) as f:
                current = f.read()
            self.assertIn(old, rotated)
            self.assertNotIn(new, rotated)
            self.assertIn(new, current)
            self.assertIn("log files reopened", current)

    def test_a_file_that_cannot_be_reopened_is_logged_and_kept(self):
        text = io.StringIO()
        path = os.path.join(self.dir, "log.json")
        svc, log = self.service(text, path)
        os.rename(path, path + ".1")
        os.mkdir(path)  # where logrotate's new file should be
        self.signals.deliver(signal.SIGUSR1)
        log.info("after", event="b")
        svc.stopService()
        self.assertIn("cannot reopen %s: Is a directory" % path, text.getvalue())
        with open(path + ".1") as f:
            self.assertEqual([json.loads(line)["event"] for line in f],
                             ["log.reopen_failed", "log.reopened", "b"])

    def test_journald_gets_plain_lines(self):
        with tempfile.TemporaryFile("w+") as out:
            st = os.fstat(out.fileno())
            svc, log = self.service(out, environ={"JOURNAL_STREAM": "%d:%d" % (
                st.st_dev, st.st_ino)})
            log.info("{session}: connect", session="s1", event="smtpd.connect")
            log.warn("careful", event="x")
            svc.stopService()
            out.seek(0)
            self.assertEqual(out.read(), "<6>s1: connect\n<4>careful\n")

    def test_stop_puts_twistds_observer_and_signal_back(self):
        text = io.StringIO()
        svc, log = self.service(text)
        svc.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGUSR1], "twistd's")
        self.assertEqual([type(o) for o in self.publisher._observers], [FileLogObserver])


class FakeSignals:
    SIGUSR1 = signal.SIGUSR1

    def __init__(self):
        self.handlers = {signal.SIGUSR1: "twistd's"}

    def signal(self, number, handler):
        previous, self.handlers[number] = self.handlers.get(number), handler
        return previous

    def deliver(self, number):
        self.handlers[number](number, None)


class Immediate:
    def callFromThread(self, f, *args):
        f(*args)


# -- the store's fsync batches, for the metrics -----------------------------------

class StoreSyncTests(unittest.TestCase):
    def test_each_batch_sync_is_a_debug_event_with_its_duration(self):
        clock = task.Clock()
        calls = []

        def run(f, *args):
            calls.append(f)
            clock.advance(0.25 if f is sync else 0)  # the fsyncs take a quarter second
            return defer_succeed(f(*args))

        def sync(written):
            return [(True, job) for job in written]

        b = store.Batcher(run, list, sync, timer=clock.seconds)
        with capturedLogs() as events:
            b.submit("a")
        [e] = named(events, "store.sync")
        self.assertEqual((e["log_level"], e["seconds"], e["messages"], e["log_namespace"]),
                         (LogLevel.debug, 0.25, 1, "store"))


def defer_succeed(value):
    from twisted.internet import defer
    return defer.succeed(value)


# -- workers relay whole events ---------------------------------------------------

class WorkerRelayTests(unittest.TestCase):
    def test_the_main_process_gets_the_workers_fields(self):
        written, published = [], []
        clock = task.Clock()
        relay = workers.log_relay(written.append, clock)
        Logger(namespace="smtpd", observer=relay).info(
            "{session}: accepted {size}", session="s1", event="smtpd.accepted", size=12,
            recipients=["bob", "carol"], auth_user=None, err=OSError("x"))
        relay.flush()
        workers.Worker(pool=None, number=3, publish=published.append).outReceived(written[0])
        [e] = published
        self.assertEqual((e["event"], e["size"], e["recipients"], e["auth_user"], e["worker"],
                          e["session"], e["log_level"], e["log_system"], formatEvent(e)),
                         ("smtpd.accepted", 12, ["bob", "carol"], None, 3, "s1", LogLevel.info,
                          "smtpd#info w3", "s1: accepted 12"))
        self.assertEqual(json.loads(logs.json_line(e))["worker"], 3)


# -- a real twistd -----------------------------------------------------------------

def json_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def wait_until(predicate, what):
    for _ in range(600):  # a child process acts on its own time: poll
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def test_json_log_has_an_event_per_accepted_and_refused_message(server, tmp_path):  # noqa: F811
    path = tmp_path / "log.json"
    s = server("--log-json", str(path), "--tarpit-unit", "0")
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                      local_hostname="client.sender.net") as c:
        assert c.sendmail("alice@sender.net", ["bob"], BODY) == {}
        c.mail("alice@sender.net")
        assert c.rcpt("x@far.example")[0] == 550
        c.rset()
        c.mail("alice@sender.net")
        c.rcpt("bob")
        assert c.data(b"Subject: x\r\n\r\nbare\nLF\r\n")[0] == 554
    wait_until(lambda: "disconnect from" in s.output(), "no disconnect line")
    wait_until(lambda: named(json_events(path), "smtpd.disconnect"), "no JSON disconnect")
    events = json_events(path)
    [accepted] = named(events, "smtpd.accepted")
    assert ACCEPTED <= set(accepted), accepted
    assert (accepted["sender"], accepted["recipients"], accepted["peer"],
            accepted["message_id"]) == ("alice@sender.net", ["bob"], "127.0.0.2",
                                        "<m1@example.org>")
    refused = named(events, "smtpd.refused")
    assert [(e["command"], e["reason"], e["rcpt"]) for e in refused] == [
        ("RCPT", "relay", "x@far.example"), ("DATA", "smuggling", None)]
    for e in refused:
        assert REFUSED <= set(e), e
    [bye] = named(events, "smtpd.disconnect")
    assert (bye["accepted"], bye["refused"], bye["end"]) == (1, 2, "quit")
    # every line of the JSON log is an event with its text; debug events stay out
    assert all("text" in e and "time" in e for e in events)
    assert not named(events, "store.sync") and "synced" not in s.output()
    # the text log has the maillog lines
    log = s.output()
    assert re.search(r"\] [0-9a-f]{12}: %s: .* accepted from=<alice@sender\.net> to=<bob> "
                     % re.escape(accepted["queue_id"]), log), log
    assert "refused RCPT from=<alice@sender.net> to=<x@far.example>" in log


def test_no_password_or_body_in_any_log(server, tmp_path):  # noqa: F811
    from test_twistd import PASSWORD
    pw = tmp_path / "passwd"
    pw.write_text("alice:%s\n" % PASSWORD)
    pw.chmod(0o600)
    path = tmp_path / "log.json"
    s = server("-p", "--passwd", str(pw), "--log-json", str(path), "--auth-fail-delay", "0",
               "--tarpit-unit", "0", "--no-queue-runner")
    marker = "BodyMarker4711"
    for mech in ("PLAIN", "LOGIN", "CRAM-MD5"):
        with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
            c.ehlo()
            c.user, c.password = "alice", "Wrong" + PASSWORD
            method = {"PLAIN": c.auth_plain, "LOGIN": c.auth_login,
                      "CRAM-MD5": c.auth_cram_md5}[mech]
            try:
                c.auth(mech, method, initial_response_ok=mech == "PLAIN")
            except smtplib.SMTPAuthenticationError:
                pass
            c.user, c.password = "alice", PASSWORD
            assert c.auth(mech, method, initial_response_ok=mech == "PLAIN")[0] == 235
            assert c.sendmail("alice@example.org", ["bob"],
                              "Subject: %s\r\n\r\n%s line\r\n" % (marker, marker)) == {}
    wait_until(lambda: s.output().count("disconnect from") == 3, "sessions not over")
    wait_until(lambda: len(named(json_events(path), "smtpd.disconnect")) == 3, "JSON behind")
    secrets = [PASSWORD, "Wrong" + PASSWORD, marker,
               base64.b64encode(("\0alice\0" + PASSWORD).encode()).decode(),
               base64.b64encode(PASSWORD.encode()).decode()]
    for text in (s.output(), path.read_text()):
        for secret in secrets:
            assert secret not in text
    assert len(named(json_events(path), "smtpd.auth")) == 6


def test_json_log_on_standard_output(tmp_path):
    """``--log-json -``: the JSON lines go to the real standard output."""
    out = open(tmp_path / "stdout", "w+")
    logfile = tmp_path / "smtpd.log"
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "--logfile", str(logfile), "upas-smtpd", "--listen",
         "tcp:0:interface=127.0.0.1", "--root", str(tmp_path / "mail"), "--sysname",
         "gnot.example.org", "--no-queue-runner", "--log-json", "-"],
        env=env(), stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        wait_until(lambda: logfile.exists() and "starting on" in logfile.read_text(), "no start")
        port = int(re.search(r"starting on (\d+)", logfile.read_text()).group(1))
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.recv(100)
            c.sendall(b"QUIT\r\n")
            c.recv(100)
        wait_until(lambda: "smtpd.disconnect" in (tmp_path / "stdout").read_text(), "no JSON")
        events = [json.loads(line) for line in (tmp_path / "stdout").read_text().splitlines()]
        assert named(events, "smtpd.disconnect")[0]["end"] == "quit"
        assert "smtpd.disconnect" not in logfile.read_text()  # the text log has its line
        assert "disconnect from 127.0.0.1" in logfile.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
        out.close()


def test_sigusr1_to_twistd_reopens_its_log_file(tmp_path):
    """logrotate's way: rename the file, signal, the next line goes to the old name."""
    root = tmp_path / "mail"
    logfile = tmp_path / "smtpd.log"
    jsonfile = tmp_path / "smtpd.json"
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "--logfile", str(logfile), "upas-smtpd", "--listen",
         "tcp:0:interface=127.0.0.1", "--root", str(root), "--sysname", "gnot.example.org",
         "--no-queue-runner", "--log-json", str(jsonfile)],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        wait_until(lambda: logfile.exists() and "starting on" in logfile.read_text(),
                   "server did not start")
        port = int(re.search(r"starting on (\d+)", logfile.read_text()).group(1))
        os.rename(logfile, tmp_path / "smtpd.log.1")
        os.rename(jsonfile, tmp_path / "smtpd.json.1")
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: logfile.exists() and "log files reopened" in logfile.read_text(),
                   "not reopened")
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.recv(100)
            c.sendall(b"QUIT\r\n")
            c.recv(100)
        wait_until(lambda: "disconnect from" in logfile.read_text(), "no disconnect line")
        wait_until(lambda: jsonfile.exists() and "smtpd.disconnect" in jsonfile.read_text(),
                   "no JSON disconnect")
        assert "disconnect from" not in (tmp_path / "smtpd.log.1").read_text()
        assert "smtpd.disconnect" not in (tmp_path / "smtpd.json.1").read_text()
        assert not list(tmp_path.glob("smtpd.log.1.*"))  # twistd renamed nothing itself
    finally:
        proc.terminate()
        proc.wait(30)


def test_under_journald_lines_are_plain(tmp_path):
    """systemd: standard output is the journal stream (JOURNAL_STREAM names it)."""
    out = open(tmp_path / "journal", "w+")
    st = os.fstat(out.fileno())
    e = env()
    e["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "--logfile", "-", "upas-smtpd", "--listen",
         "tcp:0:interface=127.0.0.1", "--root", str(tmp_path / "mail"), "--sysname",
         "gnot.example.org", "--no-queue-runner"],
        env=e, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        wait_until(lambda: "starting on" in (tmp_path / "journal").read_text(), "no start")
        port = int(re.search(r"starting on (\d+)", (tmp_path / "journal").read_text()).group(1))
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.recv(100)
            c.sendall(b"QUIT\r\n")
            c.recv(100)
        wait_until(lambda: "disconnect from" in (tmp_path / "journal").read_text(), "no line")
        [line] = [x for x in (tmp_path / "journal").read_text().splitlines()
                  if "disconnect from" in x]
        assert re.match(r"<6>[0-9a-f]{12}: disconnect from 127\.0\.0\.1: 0 accepted", line), line
    finally:
        proc.terminate()
        proc.wait(30)
        out.close()
