"""``--workers``: processes sharing one listener and one state store."""

import mailbox
import os
import re
import signal
import smtplib
import socket
import time

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial import unittest

from test_twistd import PASSWORD, Server, client_context, dns_port, server, tls_files  # noqa: F401
from upasmail import settings as settings_module
from upasmail import statestore, workers
from upasmail.greylist import NEW, OTHER, RECENT

OUTSIDER = ("127.0.0.2", 0)  # not in ournets: limited per address


# -- the store, without sockets --------------------------------------------------

def make_settings(tmp, **kw):
    from upasmail import conf
    return settings_module.merge(conf.SmtpdConf(), root=str(tmp), sysname="gnot.example.org",
                                 **kw)


class LocalStateStoreTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.store = statestore.LocalStateStore(
            make_settings(self.mktemp(), auth_fail_delay=1.0, auth_max_failures=2), self.clock)

    def acquire(self, ip, exempt=False, per_peer=2, total=3):
        return self.successResultOf(self.store.acquireConnection(ip, exempt, per_peer, total))

    def test_connection_limits_per_peer_and_in_all(self):
        self.assertIsNone(self.acquire("192.0.2.1"))
        self.assertIsNone(self.acquire("192.0.2.1"))
        self.assertEqual(self.acquire("192.0.2.1"), statestore.PEER)
        self.assertIsNone(self.acquire("192.0.2.1", exempt=True))  # trusted: in all only
        self.assertEqual(self.acquire("192.0.2.9"), statestore.TOTAL)
        self.store.releaseConnection("192.0.2.1", False)
        self.assertEqual(self.acquire("192.0.2.1", total=4), None)
        self.assertEqual(self.acquire("192.0.2.1", total=9), statestore.PEER)

    def test_auth_budget(self):
        self.assertTrue(self.successResultOf(self.store.authBegin("192.0.2.1")))
        self.assertEqual(self.successResultOf(self.store.authFailed("192.0.2.1")), (1.0, 1, 2))
        self.assertTrue(self.successResultOf(self.store.authBegin("192.0.2.1")))
        self.assertEqual(self.successResultOf(self.store.authFailed("192.0.2.1")), (3.0, 2, 2))  # after the first
        self.assertFalse(self.successResultOf(self.store.authBegin("192.0.2.1")))
        self.assertTrue(self.successResultOf(self.store.authBegin("192.0.2.2")))

    def test_greylist_and_grants(self):
        attempt = lambda: self.successResultOf(  # noqa: E731
            self.store.greylistAttempt("127.0.0.1", "192.0.2.1", ["bob", "x!.."]))
        self.assertEqual(attempt(), [("bob", NEW)])
        self.assertEqual(attempt(), [("bob", OTHER)])  # minutes ago: starts again
        self.clock.advance(301)
        self.assertEqual(attempt(), [("bob", RECENT)])
        self.assertFalse(self.successResultOf(self.store.isWhitelisted("192.0.2.1")))
        self.successResultOf(self.store.addToWhitelist("192.0.2.1", "h.example"))
        self.clock.advance(1)
        self.store.reread()
        self.assertTrue(self.successResultOf(self.store.isWhitelisted("192.0.2.1")))
        self.assertFalse(self.successResultOf(self.store.isGranted("192.0.2.7")))
        self.successResultOf(self.store.grant("192.0.2.7"))
        self.assertTrue(self.successResultOf(self.store.isGranted("192.0.2.7")))


class StateChannelTests(unittest.TestCase):
    """A worker's RemoteStateStore against the main's StateServer, over
    AMP on an in-memory transport pair."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.local = statestore.LocalStateStore(
            make_settings(self.mktemp(), auth_fail_delay=1.0, auth_max_failures=2), self.clock)
        self.jobs = []
        self.server = statestore.StateServer(self.local, enqueued=self.jobs.append)
        self.client = statestore.Channel()
        _, _, self.pump = iosim.connectedServerAndClient(lambda: self.server,
                                                         lambda: self.client)
        self.remote = statestore.RemoteStateStore(self.client)

    def ask(self, d):
        self.pump.flush()
        return self.successResultOf(d)

    def test_every_question_goes_to_the_main_store(self):
        r = self.remote
        self.assertIsNone(self.ask(r.acquireConnection("192.0.2.1", False, 1, 10)))
        self.assertEqual(self.ask(r.acquireConnection("192.0.2.1", False, 1, 10)), "peer")
        self.assertEqual(self.local.perPeer["192.0.2.1"], 1)
        self.assertTrue(self.ask(r.authBegin("192.0.2.1")))
        self.assertEqual(self.ask(r.authFailed("192.0.2.1")), (1.0, 1, 2))
        self.ask(r.authSucceeded("192.0.2.1"))
        self.assertEqual(self.local.throttle._records["192.0.2.1"].failures, 0)
        self.assertEqual(self.ask(r.greylistAttempt("127.0.0.1", "192.0.2.1", ["bob"])),
                         [("bob", NEW)])
        self.assertFalse(self.ask(r.isWhitelisted("192.0.2.1")))
        self.ask(r.addToWhitelist("192.0.2.1", None))
        self.ask(r.grant("192.0.2.7"))
        self.assertTrue(self.ask(r.isGranted("192.0.2.7")))
        self.client.callRemote(statestore.Enqueued, qid="1.abc")
        self.pump.flush()
        self.assertEqual(self.jobs, ["1.abc"])

    def test_a_file_error_reaches_the_worker_as_oserror(self):
        def broken(*a):
            raise OSError(28, "No space left on device")
        self.local.greylist.attempt = broken
        # AMP needs the errback there before the answer comes (as a yield puts it)
        d = self.assertFailure(
            self.remote.greylistAttempt("127.0.0.1", "192.0.2.1", ["bob"]), OSError)
        self.pump.flush()
        self.assertIn("No space left", str(self.successResultOf(d)))
        self.assertTrue(self.server.transport is not None)  # the channel stays open

    def test_a_dead_worker_releases_what_it_held(self):
        for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
            self.assertIsNone(self.ask(self.remote.acquireConnection(ip, False, 5, 10)))
        self.ask(self.remote.acquireConnection("192.0.2.3", True, 5, 10))
        # a release it does not hold changes nothing
        self.remote.releaseConnection("192.0.2.9", False)
        self.remote.releaseConnection("192.0.2.2", False)
        self.pump.flush()
        self.assertEqual((dict(self.local.perPeer), self.local.total), ({"192.0.2.1": 2}, 3))
        self.local.acquireConnection("192.0.2.1", False, 5, 10)  # another worker's
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual((dict(self.local.perPeer), self.local.total), ({"192.0.2.1": 1}, 1))


    def test_a_dead_worker_gives_back_its_auth_checks_under_way(self):
        # two failures, then a check under way when the worker dies (found
        # by the review: it counted for ever and locked the address out)
        for _ in range(2):
            self.assertTrue(self.ask(self.remote.authBegin("192.0.2.1")))
            self.ask(self.remote.authFailed("192.0.2.1"))
        self.local.throttle.limit = 3
        self.assertTrue(self.ask(self.remote.authBegin("192.0.2.1")))
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.local.throttle._records["192.0.2.1"].pending, 0)
        self.assertTrue(self.successResultOf(self.local.authBegin("192.0.2.1")))


class HeldStore(statestore.LocalStateStore):
    """A store whose connection answers wait until the test gives them."""

    def __init__(self, *a):
        statestore.LocalStateStore.__init__(self, *a)
        self.waiting = []

    def acquireConnection(self, *a):
        d = defer.Deferred()
        self.waiting.append((d, statestore.LocalStateStore.acquireConnection(self, *a)))
        return d

    def answer(self):
        d, answer = self.waiting.pop(0)
        answer.chainDeferred(d)


class AdmissionTests(unittest.TestCase):
    """The greeting waits for the store; refusals and early goodbyes."""

    def setUp(self):
        from upasmail import service, testing
        self.clock = task.Clock()
        s = testing.make_settings(root=self.mktemp(), max_connections_per_peer=1)
        self.store = HeldStore(s, self.clock)
        self.factory = service.makeSmtpdFactory(
            s, reactor=self.clock, clock=self.clock, run_blocking=testing.run_now,
            resolver=testing.FakeResolver(everything_exists=True), store=self.store)

    def connect(self, ip="127.0.0.2"):
        from twisted.internet.testing import StringTransport
        from upasmail import testing
        p = self.factory.buildProtocol(testing.address(ip, 1234))
        t = StringTransport(peerAddress=testing.address(ip, 1234),
                            hostAddress=testing.address("127.0.0.1", 25))
        p.makeConnection(t)
        return p, t

    def test_the_greeting_waits_and_early_commands_wait_for_it(self):
        p, t = self.connect()
        p.dataReceived(b"NOOP\r\n")
        self.assertEqual(t.value(), b"")
        self.store.answer()
        self.assertEqual(t.value().splitlines()[0][:4], b"220 ")
        self.assertEqual(t.value().splitlines()[1][:4], b"250 ")  # the NOOP, after it
        q, u = self.connect()
        self.store.answer()
        self.assertEqual(u.value(), b"421 4.7.0 gnot.example.org Error: too many "
                                    b"connections from 127.0.0.2\r\n")
        self.assertTrue(u.disconnecting)
        q.connectionLost(None)  # refused: nothing to release
        self.assertEqual(self.store.perPeer["127.0.0.2"], 1)
        p.connectionLost(None)
        self.assertEqual(self.store.perPeer["127.0.0.2"], 0)

    def test_a_client_gone_before_the_answer_is_not_counted(self):
        with capturedLogs() as events:
            p, t = self.connect()
            p.connectionLost(None)
            self.store.answer()
        self.assertEqual((self.store.perPeer["127.0.0.2"], self.store.total), (0, 0))
        self.assertEqual(t.value(), b"")
        self.assertEqual([e for e in events if "connect" in str(e.get("log_format"))], [])


class RelayedLogTests(unittest.TestCase):
    def test_relayed_event_names_the_worker(self):
        e = workers.relayed_event(2, time=5.0, namespace="smtpd", system="", level="warn",
                                  text="a {brace}")
        self.assertEqual((e["log_system"], e["log_level"], e["log_relayed"]),
                         ("smtpd#warn w2", LogLevel.warn, "a {brace}"))
        e = workers.relayed_event(1, time=5.0, namespace="log_legacy", system="-",
                                  level="info", text="x")
        self.assertEqual(e["log_system"], "- w1")


class LogRelayTests(unittest.TestCase):
    def test_a_workers_events_reach_the_main_log_named_after_it(self):
        written = []
        clock = task.Clock()
        from twisted.logger import Logger
        log = Logger(namespace="smtpd", observer=workers.log_relay(written.append, clock))
        log.info("a {x}", x=1)
        log.warn("b\nsecond line")
        self.assertEqual(written, [])
        clock.advance(0)
        [data] = written  # one write for the reactor turn
        published = []
        worker = workers.Worker(pool=None, number=2, publish=published.append)
        worker.outReceived(data[:5])
        worker.outReceived(data[5:] + b"printed by someone\n")
        self.assertEqual([(e["log_system"], e["log_level"], e["log_relayed"])
                          for e in published],
                         [("smtpd#info w2", LogLevel.info, "a 1"),
                          ("smtpd#warn w2", LogLevel.warn, "b\nsecond line"),
                          ("stdout#info w2", LogLevel.info, "printed by someone")])


    def test_lines_logged_as_the_reactor_stops_are_flushed(self):
        # a worker's last disconnect lines were lost at SIGTERM (the review)
        written = []
        clock = task.Clock()
        relay = workers.log_relay(written.append, clock)
        from twisted.logger import Logger
        Logger(namespace="smtpd", observer=relay).info("disconnect from {ip}", ip="192.0.2.1")
        relay.flush()  # no reactor turn comes any more
        self.assertEqual(len(written), 1)
        self.assertIn(b"disconnect from 192.0.2.1", written[0])
        clock.advance(0)  # the turn that was scheduled finds nothing left
        self.assertEqual(len(written), 1)


class BackoffTests(unittest.TestCase):
    def test_a_dying_worker_waits_longer_each_time_up_to_a_bound(self):
        clock = task.Clock()
        pool = workers.WorkerPool(top=None, argv=[], count=1, reactor=None, clock=clock)
        pool.running = True
        spawned = []
        pool.spawn = spawned.append
        from twisted.python.failure import Failure
        from twisted.internet.error import ProcessTerminated
        waits = []
        for _ in range(7):
            w = workers.Worker(pool, 1)
            w.started = clock.seconds()
            pool.workerEnded(w, Failure(ProcessTerminated(signal=9)))
            waits.append(pool.backoff[1])
            clock.advance(pool.backoff[1])
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        self.assertEqual(spawned, [1] * 7)
        w = workers.Worker(pool, 1)
        w.started = clock.seconds()
        clock.advance(workers.STEADY)  # it ran a while: start afresh
        pool.workerEnded(w, Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(pool.backoff[1], 1)


# -- a real twistd with --workers 2 ------------------------------------------------

def worker_pids(s, n=2):
    """Wait for the workers to serve; {worker number: pid} (the last start of each)."""
    for _ in range(1200):
        out = s.output()
        pids = dict((int(k), int(v)) for k, v in
                    re.findall(r"worker (\d+) started \(pid (\d+)\)", out))
        ready = set(int(k) for k in re.findall(r"#info w(\d+)\] Starting factory", out))
        if len(pids) == n - 1 and set(pids) <= ready:
            return pids
        time.sleep(0.05)
    raise AssertionError("workers did not start:\n" + s.output())


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid):
    for _ in range(600):
        if not alive(pid):
            return
        time.sleep(0.05)
    raise AssertionError("process %d still running" % pid)


def process_of(line):
    """Which process logged a line: 'w1', or 'main'."""
    m = re.search(r"#\w+ (w\d+)\]", line)
    return m.group(1) if m else "main"


def logged_by(s, text):
    return [process_of(line) for line in s.output().splitlines() if text in line]


def wait_count(s, text, n):
    """Poll until ``text`` has been logged ``n`` times; who logged each."""
    for _ in range(600):
        who = logged_by(s, text)
        if len(who) >= n:
            return who
        time.sleep(0.01)
    raise AssertionError("%r not logged %d times:\n%s" % (text, n, s.output()))


def greet(source=OUTSIDER):
    c = socket.create_connection(("127.0.0.1", PORT[0]), source_address=source, timeout=30)
    return c, c.recv(200)


PORT = [None]


def connect(s, source=OUTSIDER):
    PORT[0] = s.port
    return greet(source)


def test_connections_spread_over_both_processes_and_all_is_delivered(server):
    s = server("--workers", "2", "--tarpit-unit", "0")
    pids = worker_pids(s)
    sent = 0
    for _ in range(300):  # the kernel chooses the process; bounded
        with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
            assert c.sendmail("alice@example.org", ["bob"],
                              b"Subject: n%d\r\n\r\nbody\r\n" % sent) == {}
        sent += 1
        if sent >= 6 and set(logged_by(s, "accepted, 0 refused")) == {"main", "w1"}:
            break
    assert set(logged_by(s, "accepted, 0 refused")) == {"main", "w1"}, s.output()
    subjects = sorted(m["Subject"] for m in mailbox.mbox(os.path.join(s.root, "box", "bob",
                                                                      "mbox")))
    assert subjects == sorted("n%d" % i for i in range(sent))
    # SIGHUP reaches the worker
    s.proc.send_signal(signal.SIGHUP)
    s.wait_for("[smtpd#info w1] settings reloaded")
    # SIGTERM stops every process
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(30)
    wait_gone(pids[1])
    assert "worker 1 stopped" in s.output()


def test_per_peer_limit_holds_across_workers_and_a_killed_worker_releases(server):
    s = server("--workers", "2", "--max-connections-per-peer", "2", "--tarpit-unit", "0")
    pids = worker_pids(s)
    held, closed = [], 0
    # two connections held on the worker (those the main process gets are let go)
    for _ in range(200):
        if len(held) == 2:
            break
        c, banner = connect(s)
        assert banner.startswith(b"220 "), banner
        who = wait_count(s, ": connect from 127.0.0.2", len(held) + closed + 1)
        if who[-1] == "w1":
            held.append(c)
        else:
            c.close()
            closed += 1
            wait_count(s, "disconnect from 127.0.0.2", closed)  # released: it is logged first
    assert len(held) == 2, s.output()
    # a third gets 421 whichever process takes it; try until both have refused
    refused = b"421 4.7.0 gnot.example.org Error: too many connections from 127.0.0.2\r\n"
    for _ in range(300):
        c, banner = connect(s)
        c.close()
        assert banner == refused
        if set(logged_by(s, "too many connections from 127.0.0.2")) == {"main", "w1"}:
            break
    assert set(logged_by(s, "too many connections from 127.0.0.2")) == {"main", "w1"}
    # kill -9 the worker holding both: it is started again, its two no longer count
    os.kill(pids[1], signal.SIGKILL)
    s.wait_for("worker 1 died (signal 9)")
    for c in held:
        c.close()
    new = worker_pids(s)
    for _ in range(600):
        if new[1] != pids[1]:
            break
        time.sleep(0.05)
        new = worker_pids(s)
    assert new[1] != pids[1] and alive(new[1])
    a, banner_a = connect(s)
    b, banner_b = connect(s)
    assert banner_a.startswith(b"220 ") and banner_b.startswith(b"220 ")
    a.close()
    b.close()


def test_auth_failure_budget_holds_across_workers(server, tls_files):
    s = server("--workers", "2", "--passwd", str(tls_files / "passwd"), "--auth-fail-delay",
               "0", "--auth-max-failures", "3", "--tarpit-unit", "0")
    worker_pids(s)
    answers = []
    for _ in range(300):
        with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net",
                          source_address=OUTSIDER) as c:
            c.ehlo()
            c.user, c.password = "alice", "wrong"
            try:
                c.auth("CRAM-MD5", c.auth_cram_md5)
            except smtplib.SMTPAuthenticationError as e:
                answers.append(e.smtp_code)
            except smtplib.SMTPServerDisconnected:
                answers.append("closed")
        seen = set(logged_by(s, "authentication failed: alice from 127.0.0.2")
                   + logged_by(s, "authentication refused: too many failures"))
        if len(answers) >= 5 and seen == {"main", "w1"}:
            break
    # the budget is the address's, wherever its connections land
    assert answers[:4] == [535, 535, 421, 421], (answers, s.output())
    assert set(answers[4:]) <= {421}
    assert seen == {"main", "w1"}, s.output()


def test_ssl_listener_is_shared_with_tls(server, tls_files):
    listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        tls_files / "key.pem", tls_files / "cert.pem")
    s = server("--workers", "2", "--listen", listen, "--passwd", str(tls_files / "passwd"))
    worker_pids(s)
    for _ in range(300):
        with smtplib.SMTP_SSL("127.0.0.1", s.port, context=client_context(tls_files),
                              local_hostname="client.sender.net") as c:
            c.ehlo()
            assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        if set(logged_by(s, "disconnect from 127.0.0.1")) == {"main", "w1"}:
            break
    assert set(logged_by(s, "disconnect from 127.0.0.1")) == {"main", "w1"}


def test_workers_stop_when_the_main_process_dies(server):
    s = server("--workers", "3")
    pids = worker_pids(s, 3)
    s.proc.kill()
    s.proc.wait(30)
    for pid in pids.values():
        wait_gone(pid)


@pytest.mark.parametrize("args, error", [
    (["--workers", "0"], "upas-smtpd: --workers must be at least 1"),
    (["--workers", "2", "--listen", "unix:sock"],
     "upas-smtpd: --workers 2: the workers can share only a tcp: or ssl: listener, "
     "not unix:sock"),
])
def test_workers_refused_where_they_cannot_work(tmp_path, args, error):
    from test_twistd import twistd
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--root", str(tmp_path / "mail"), *args,
               cwd=str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == error, r.stderr


def test_a_job_a_worker_queues_wakes_the_main_queue_runner(server):
    far = server("--listen", "tcp:0:interface=127.0.0.2", "-h", "far.example",
                 "--no-queue-runner", where="far")
    # --queue-scan stays 60 s: only a wake-up delivers within the wait below
    near = server("--workers", "2", "--mx-port", str(far.port), where="near")
    worker_pids(near)
    mbox_path = os.path.join(far.root, "box", "bob", "mbox")
    queue = os.path.join(near.root, "queue")

    def delivered(n, seconds):
        for _ in range(int(seconds / 0.05)):
            if os.path.exists(mbox_path) and len(mailbox.mbox(mbox_path)) == n \
                    and not os.listdir(queue):
                return True
            time.sleep(0.05)
        return False

    for sent in range(1, 61):
        with smtplib.SMTP("127.0.0.1", near.port) as c:
            assert c.sendmail("alice@example.org", ["bob@far.example"],
                              b"Subject: q%d\r\n\r\nbody\r\n" % sent) == {}
        who = wait_count(near, "bytes to far.example!bob", sent)
        if who[-1] == "w1":
            break
        assert delivered(sent, 20), near.output()  # the runner is idle again
    assert who[-1] == "w1"
    assert delivered(sent, 20), near.output()
