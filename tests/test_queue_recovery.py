"""Queue crash recovery and silent loss (issue 13, items 3, 4 and 9).

The crash tests kill a real ``twistd upas-smtpd`` with SIGKILL at named
points: ``UPASMAIL_CRASH_AT=queue.after-save`` (the outcome of a delivery
is saved, nothing else done), and mid-flush, while a sink server this test
controls holds every relay connection after its final ``250`` and before
answering ``QUIT``.
"""

import mailbox
import os
import socketserver
import subprocess
import sys
import threading
import time

from twisted.internet import defer

from test_queue import Case
from test_twistd import dns_port, env, server  # noqa: F401 (fixtures)
from upasmail import queue as queue_module, tap_runq

SINK_IP = "127.0.0.2"  # not one of our own addresses: the relay may dial it


class Sink(socketserver.ThreadingTCPServer):
    """An SMTP server in a thread: records messages, refuses listed
    recipients with 550, and with ``hold_quit`` never answers QUIT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, refuse=(), hold_quit=False):
        socketserver.ThreadingTCPServer.__init__(self, (SINK_IP, 0), _SinkSession)
        self.refuse = set(refuse)
        self.hold_quit = hold_quit
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.messages = []  # (recipients, data)
        self.quits = 0
        self.connections = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dial(self):
        return "tcp!%s!%d" % (SINK_IP, self.server_address[1])

    def subjects(self):
        with self.lock:
            return sorted(d.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                          for _, d in self.messages)

    def close(self):
        self.release.set()
        self.shutdown()
        self.server_close()


class _SinkSession(socketserver.StreamRequestHandler):
    def handle(self):
        sink = self.server
        with sink.lock:
            sink.connections += 1
        try:
            self.say("220 sink.example ESMTP")
            rcpts = []
            for line in self.rfile:
                command = line.rstrip(b"\r\n").decode("utf-8", "replace")
                verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "MAIL":
                    rcpts = []
                elif verb == "RCPT":
                    rcpt = command.split(":", 1)[1].strip(" <>")
                    if rcpt in sink.refuse:
                        self.say("550 5.1.1 %s: no such user" % rcpt)
                        continue
                    rcpts.append(rcpt)
                elif verb == "DATA":
                    self.say("354 go ahead")
                    data = b"".join(iter(self.rfile.readline, b".\r\n"))
                    with sink.lock:
                        sink.messages.append((rcpts, data))
                    self.say("250 2.0.0 ok")
                    continue
                elif verb == "QUIT":
                    with sink.lock:
                        sink.quits += 1
                    if sink.hold_quit:
                        sink.release.wait(60)
                    self.say("221 bye")
                    return
                self.say("250 ok")
        except OSError:
            pass  # the relay was killed

    def say(self, text):
        self.wfile.write(text.encode() + b"\r\n")


def poll(condition, what, seconds=30):
    # waiting on child processes and their peers is not a timed test
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("never happened: " + what)


def jobs(root):
    queue = os.path.join(root, "queue")
    return sorted(n[:-4] for n in os.listdir(queue) if n.endswith(".env"))


def mailq(root, *args):
    return subprocess.run([sys.executable, "-c", "from upasmail.tap_runq import mailq_main; "
                           "mailq_main()", "--root", root, *args], env=env(),
                          capture_output=True, text=True, timeout=60)


def send(port, sender, rcpts, subject):
    import smtplib

    with smtplib.SMTP("127.0.0.1", port) as c:
        assert c.sendmail(sender, rcpts, b"Subject: %s\r\n\r\nbody\r\n" % subject.encode()) == {}


# -- item 3: a job with nothing pending is finished at start-up ---------------

def relay_args(sink):
    return ("--smarthost", sink.dial, "--no-outbound-tls", "--queue-scan", "1")


def test_killed_after_saving_delivered_job_is_removed_at_start_up(server, monkeypatch):
    # a job with every recipient delivered is removed as its outcome (issue 14):
    # killed right after that, nothing is left to send again
    sink = Sink()
    try:
        monkeypatch.setenv("UPASMAIL_CRASH_AT", "queue.after-save")
        s = server(*relay_args(sink), where="relay")
        send(s.port, "alice@example.org", ["bob@far.example"], "once")
        assert s.proc.wait(30) == -9  # killed itself right after saving the outcome
        assert jobs(s.root) == []
        assert "Mail queue is empty" in mailq(s.root).stdout
        monkeypatch.delenv("UPASMAIL_CRASH_AT")
        again = server(*relay_args(sink), where="relay")
        send(again.port, "alice@example.org", ["bob@far.example"], "next")
        poll(lambda: len(sink.subjects()) == 2 and not jobs(again.root), "the next one sent")
        assert sink.subjects() == ["next", "once"]  # delivered once, not again
    finally:
        sink.close()


def test_killed_after_saving_a_failure_returns_it_at_start_up(server, monkeypatch):
    sink = Sink(refuse={"eve@far.example"})
    try:
        monkeypatch.setenv("UPASMAIL_CRASH_AT", "queue.after-save")
        s = server(*relay_args(sink), where="relay")
        os.makedirs(os.path.join(s.root, "box", "alice"), exist_ok=True)
        send(s.port, "alice@gnot.example.org", ["eve@far.example"], "refused")
        assert s.proc.wait(30) == -9
        assert len(jobs(s.root)) == 1
        assert not os.path.exists(os.path.join(s.root, "box", "alice", "mbox"))
        assert "eve  (failed, to be returned: 550 5.1.1" in mailq(s.root).stdout
        monkeypatch.delenv("UPASMAIL_CRASH_AT")
        again = server(*relay_args(sink), where="relay")
        poll(lambda: not jobs(again.root), "the failed job was returned and removed")
        [bounce] = mailbox.mbox(os.path.join(again.root, "box", "alice", "mbox"))
        assert "Final-Recipient: rfc822; eve@far.example" in bounce.as_string()
        assert sink.messages == []  # never sent: the sink refused its only recipient
    finally:
        sink.close()


# -- item 4: the outcome is saved before QUIT ---------------------------------

def test_kill_9_mid_flush_delivers_nothing_twice(server):
    holding, after = Sink(hold_quit=True), Sink()
    n = 50
    try:
        s = server(*relay_args(holding), "--max-deliveries", "100",
                   "--max-per-destination", "100", where="relay")
        import smtplib
        with smtplib.SMTP("127.0.0.1", s.port) as c:
            for i in range(n):
                c.sendmail("alice@example.org", ["x%d@far.example" % i],
                           b"Subject: m%02d\r\n\r\nbody\r\n" % i)
        # every message has had its 250 (a connection carries several, each
        # saved before the next MAIL); each connection waits for QUIT's answer
        poll(lambda: len(holding.subjects()) == n and holding.quits == holding.connections,
             "every message sent, every relay connection at QUIT")
        s.proc.kill()
        s.proc.wait(30)
        again = server(*relay_args(after), where="relay")
        poll(lambda: not jobs(again.root), "the queue emptied after the restart")
        assert holding.subjects() == ["m%02d" % i for i in range(n)]
        assert after.subjects() == []  # none delivered twice
    finally:
        holding.close()
        after.close()


def test_recovery_decisions():
    record = queue_module.normalize({"sender": "a", "created": 0,
                              "recipients": ["x.example!a", "y.example!b"]}, "q")
    assert not queue_module.nothing_pending(record) and queue_module.unreturned(record) == []
    record["state"]["x.example!a"]["status"] = queue_module.FAILED
    assert queue_module.unreturned(record) == ["x.example!a"]
    record["state"]["x.example!a"]["returned"] = True
    record["state"]["y.example!b"]["status"] = queue_module.DELIVERED
    assert queue_module.nothing_pending(record) and queue_module.unreturned(record) == []
    assert queue_module.return_path("h!alice") == ("h!alice", "/dev/null")
    assert queue_module.return_path("/dev/null") == ("postmaster", "double-bounce")
    assert queue_module.return_path("double-bounce") is None


# -- item 9: upas-runq logs, routes as the server does, loses nothing ---------

UPAS_RUNQ = [sys.executable, "-c", "from upasmail.tap_runq import runq_main; runq_main()"]


def runq(*args):
    return subprocess.run([*UPAS_RUNQ, *args], env=env(), capture_output=True, text=True,
                          timeout=60)


def test_runq_routes_as_the_server_recorded_and_logs(server, dns_port, tmp_path):
    sink = Sink()
    try:
        s = server("--no-queue-runner", "--smarthost", sink.dial, "--no-outbound-tls",
                   "-h", "example.net")
        send(s.port, "alice@example.org", ["x@far.example"], "via the smarthost")
        r = runq("--root", s.root, "--resolver", "127.0.0.1:%d" % dns_port,
                 "--logfile", str(tmp_path / "runq.log"))
        assert r.returncode == 0, r.stderr
        assert sink.subjects() == ["via the smarthost"]
        assert jobs(s.root) == []
        line = "to=far.example!x relay=(%s:%s) status=sent" % (SINK_IP, SINK_IP)
        assert line in r.stderr
        assert line in (tmp_path / "runq.log").read_text()
        assert "differs" not in r.stderr
        [(rcpts, data)] = sink.messages
        assert b"MAILER-DAEMON" not in data and rcpts == ["x@far.example"]

        send(s.port, "alice@example.org", ["y@far.example"], "told otherwise")
        r = runq("--root", s.root, "--resolver", "127.0.0.1:%d" % dns_port,
                 "--smarthost", "tcp!127.0.0.3!1")  # nothing listens there
        assert r.returncode == 0, r.stderr
        assert ("--smarthost 'tcp!127.0.0.3!1' differs from the server's %r"
                % sink.dial) in r.stderr
        assert "to=far.example!y relay=none status=deferred" in r.stderr
        [qid] = jobs(s.root)
        r = mailq(s.root, "--delete", qid)
        assert r.returncode == 0
        assert "%s: deleted by the administrator" % qid in r.stderr  # mailq logs too
    finally:
        sink.close()


def test_runq_log_has_no_dns_or_connector_chatter(server, dns_port):
    # far.example's MX is 127.0.0.2 (tests/test_twistd.py ZONE): a real DNS query
    sink = Sink()
    try:
        s = server("--no-queue-runner", "--no-outbound-tls")
        send(s.port, "alice@example.org", ["z@far.example"], "by MX")
        r = runq("--root", s.root, "--resolver", "127.0.0.1:%d" % dns_port,
                 "--mx-port", str(sink.server_address[1]))
        assert r.returncode == 0, r.stderr
        assert sink.subjects() == ["by MX"]
        assert "to=far.example!z relay=(" in r.stderr
        for noise in ("DNSDatagramProtocol", "UDP Port", "Starting factory", "Stopping factory"):
            assert noise not in r.stderr
    finally:
        sink.close()


def test_runq_makes_the_directories_its_returns_need(server):
    sink = Sink(refuse={"x@far.example"})
    try:
        s = server("--no-queue-runner", "--smarthost", sink.dial, "--no-outbound-tls")
        send(s.port, "carol", ["x@far.example"], "refused far away")
        s.stop()
        import shutil
        shutil.rmtree(os.path.join(s.root, "tmp"))  # a root no server runs on now
        r = runq("--root", s.root)
        assert r.returncode == 0, r.stderr
        assert "sender non-delivery notification: stored in the local mailbox of carol" \
            in r.stderr, r.stderr
        assert jobs(s.root) == []
        [bounce] = mailbox.mbox(os.path.join(s.root, "box", "carol", "mbox"))
        assert "x@far.example" in bounce.as_string()
    finally:
        sink.close()


def test_runq_without_a_server_record_warns(tmp_path):
    os.makedirs(tmp_path / "mail" / "queue")
    r = runq("--root", str(tmp_path / "mail"))
    assert r.returncode == 0
    assert "no routing recorded by a server" in r.stderr
    (tmp_path / "mail" / "routing.json").write_text('{"smarthost": 7}')
    r = runq("--root", str(tmp_path / "mail"))
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "no routing recorded by a server" in r.stderr


def test_a_mailer_server_leaves_the_routing_record_alone(tmp_path):
    from twisted.logger import capturedLogs, formatEvent
    from upasmail import testing

    root = str(tmp_path)
    queue_module.record_routing(root, testing.make_settings(root=root, smarthost="tcp!a!25"))
    first = queue_module.recorded_routing(root)
    # a second instance on the same root with -m queues nothing: no say in routing
    queue_module.record_routing(root, testing.make_settings(root=root, mailer="/bin/true"))
    assert queue_module.recorded_routing(root) == first
    with capturedLogs() as events:
        queue_module.record_routing(root, testing.make_settings(root=root, smarthost="tcp!b!25"))
    assert queue_module.recorded_routing(root)["smarthost"] == "tcp!b!25"
    assert any("routing record changed (smarthost)" in formatEvent(e) for e in events)


def test_routing_reconciled():
    recorded = {"smarthost": "tcp!relay!25", "domain": "example.net", "mx_port": 25}
    own = {"smarthost": None, "domain": "laptop.local", "mx_port": 2525, "sysname": "x"}
    assert queue_module.reconcile(recorded, own, given={"mx_port"}) == (
        {"smarthost": "tcp!relay!25", "domain": "example.net", "mx_port": 2525,
         "sysname": "x"}, ["mx_port"])
    assert queue_module.reconcile(recorded, own, given=set())[1] == []


# -- in process, on a task.Clock ---------------------------------------------


class InProcess(Case):
    def captured_log(self):
        import io
        out = io.StringIO()
        self.addCleanup(tap_runq.start_logging(out))
        return out

    @defer.inlineCallbacks
    def test_a_job_settled_by_another_runner_is_finished_at_the_next_scan(self):
        s = self.sink()
        r = self.runner(self.settings(queue_scan=60))
        yield self.settle(r)
        qid = self.enqueue(["a.example!bob", "a.example!eve"])
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        # a job as a runner killed after saving its outcome leaves it
        r.stopService()
        qid = self.enqueue(["a.example!bob", "a.example!eve"])
        q = queue_module.Queue(self.root.queue)
        record = q.load(qid)
        record["state"]["a.example!bob"]["status"] = queue_module.DELIVERED
        record["state"]["a.example!eve"].update(status=queue_module.FAILED, dsn="5.1.1",
                                                error="550 5.1.1 eve: no such user")
        q.save(record)
        r.startService()
        self.clock.advance(60)
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [bounce] = self.mbox("alice")
        self.assertIn("Final-Recipient: rfc822; eve@a.example", bounce.as_string())
        self.assertEqual(len(s.sessions), 1)  # bob was not sent again

    @defer.inlineCallbacks
    def test_undeliverable_bounce_goes_to_the_postmaster(self):
        s = self.sink(replies={"RCPT TO:<bob@a.example>": "550 5.1.1 bob: no such user",
                               "RCPT TO:<zed@far.example>": "550 5.1.1 zed: gone"})
        log = self.captured_log()
        self.enqueue(sender="far.example!zed")
        r = self.runner()
        yield self.until(lambda: len(s.sessions) == 2 and s.sessions[1].commands[2:3])
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(s.sessions[1].commands[1:3], ["MAIL FROM:<>",
                                                       "RCPT TO:<zed@far.example>"])
        [copy] = self.mbox("postmaster")
        # Postfix's envelope sender for these, in the mailbox's @ form
        self.assertTrue(copy.get_from().split()[0].startswith("double-bounce@"))
        self.assertTrue(copy["Return-Path"].startswith("<double-bounce@"))
        self.assertEqual(copy["Subject"], "Postmaster Copy: Undelivered Mail Returned to Sender")
        self.assertIn("Final-Recipient: rfc822; zed@far.example", copy.as_string())
        self.assertIn("a bounce from <> failed; the postmaster gets it", log.getvalue())

    @defer.inlineCallbacks
    def test_a_failed_postmaster_copy_is_dropped_not_looped(self):
        s = self.sink(replies={"RCPT": "550 5.1.1 no"})
        log = self.captured_log()
        self.enqueue(sender="double-bounce")
        r = self.runner()
        yield s.seen("RCPT")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        self.assertEqual(self.mbox("postmaster"), [])
        self.assertEqual(len(s.sessions), 1)
        self.assertIn("could not be delivered either; discarded", log.getvalue())

    @defer.inlineCallbacks
    def test_relay_is_the_server_dialled_or_none(self):
        s = self.sink()
        log = self.captured_log()
        self.enqueue(["a.example!bob"])
        r = self.runner(self.settings(smarthost="tcp!127.0.0.2!%d" % self.port))
        yield s.seen(".")
        yield self.settle(r)
        yield r.stopService()
        self.enqueue(["b.example!carol"])  # nothing listens on 127.0.0.3
        yield self.settle(self.runner())
        text = log.getvalue()
        self.assertIn("to=a.example!bob relay=(127.0.0.2:127.0.0.2) status=sent", text)
        self.assertIn("to=b.example!carol relay=none status=deferred", text)
        self.assertNotIn("relay=smarthost", text)
