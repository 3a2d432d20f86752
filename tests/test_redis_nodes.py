"""Several nodes on one Redis: what one node records, the others see;
connections summed over the nodes whose lease is in force; Redis going
away and coming back.  Each node is its own RedisStateStore (its own
name, connection and clock) on one real redis-server."""

import json
import os
import smtplib
import subprocess
import sys
import time

import pytest

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from realservers import RedisServer, free_port
from test_twistd import dns_port, server  # noqa: F401 (fixtures)
from test_redis_state import START, RedisCase
from upasmail.interfaces import StateUnavailable
from upasmail.rules import greylist
from upasmail.smtpd import redisstate, statestore
from upasmail.testing import make_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clock():
    c = task.Clock()
    c.advance(START)
    return c


class Nodes(RedisCase, unittest.TestCase):
    def setUp(self):
        self.redis.command("FLUSHALL")
        self.clock = clock()
        self.settings = make_settings("", root=self.mktemp(), greylist_min=300.0,
                                      greylist_max=3600.0, auth_fail_delay=1.0)

    @defer.inlineCallbacks
    def test_a_greylist_entry_made_on_a_passes_on_b_after_the_delay(self):
        a = yield self.node("a")
        b = yield self.node("b")
        self.assertEqual((yield a.greylistAttempt("192.0.2.1", "10.1.0.1", ["alice"])),
                         [("alice", greylist.NEW)])
        self.clock.advance(300)
        self.assertEqual((yield b.greylistAttempt("192.0.2.1", "10.1.0.1", ["alice"])),
                         [("alice", greylist.RECENT)])
        yield b.addToWhitelist("10.1.0.1", None)
        self.assertTrue((yield a.isWhitelisted("10.1.0.1")))

    @defer.inlineCallbacks
    def test_auth_failures_on_a_slow_the_client_on_b(self):
        a = yield self.node("a")
        b = yield self.node("b")
        yield a.authBegin("10.1.0.2")
        self.assertEqual((yield a.authFailed("10.1.0.2"))[:2], (1.0, 1))
        yield b.authBegin("10.1.0.2")
        self.assertEqual((yield b.authFailed("10.1.0.2"))[:2], (3.0, 2))
        yield a.authBegin("10.1.0.2")
        yield a.authFailed("10.1.0.2")
        self.assertFalse((yield b.authBegin("10.1.0.2")))

    @defer.inlineCallbacks
    def test_connection_limits_are_summed_over_three_nodes(self):
        nodes = yield defer.gatherResults([self.node(n) for n in "abc"])
        for n in nodes:
            self.assertIsNone((yield n.acquireConnection("10.1.0.3", False, 3, 5)))
        self.assertEqual((yield nodes[0].acquireConnection("10.1.0.3", False, 3, 5)),
                         statestore.PEER)
        self.assertIsNone((yield nodes[1].acquireConnection("10.1.0.4", False, 3, 5)))
        self.assertIsNone((yield nodes[2].acquireConnection("10.1.0.5", True, 3, 5)))
        self.assertEqual((yield nodes[0].acquireConnection("10.1.0.6", False, 3, 5)),
                         statestore.TOTAL)
        yield nodes[2].releaseConnection("10.1.0.3", False)
        self.assertIsNone((yield nodes[0].acquireConnection("10.1.0.3", False, 3, 5)))

    @defer.inlineCallbacks
    def test_a_dead_nodes_connections_stop_counting_when_its_lease_ends(self):
        a = yield self.node("a", lease=30)
        dead = yield self.node("dead", clock(), lease=30)
        for _ in range(2):
            yield dead.acquireConnection("10.1.0.7", False, 2, 100)
        self.assertEqual((yield a.acquireConnection("10.1.0.7", False, 2, 100)), statestore.PEER)
        dead.renewal.stop()  # killed: its clock stops, nothing renews its lease
        self.clock.advance(29)
        self.assertEqual((yield a.acquireConnection("10.1.0.7", False, 2, 100)), statestore.PEER)
        self.clock.advance(2)
        self.assertIsNone((yield a.acquireConnection("10.1.0.7", False, 2, 100)))
        self.assertIsNone(self.redis.command("HGET", "upas:{conn}:node:dead", "*"))

    @defer.inlineCallbacks
    def test_a_live_node_keeps_its_lease(self):
        a = yield self.node("a", lease=30)
        b = yield self.node("b", lease=30)
        yield b.acquireConnection("10.1.0.8", False, 1, 100)
        for _ in range(10):  # b renews every 10 s on its clock
            self.clock.advance(10)
            yield b.renew()
        self.assertEqual((yield a.acquireConnection("10.1.0.8", False, 1, 100)), statestore.PEER)

    @defer.inlineCallbacks
    def test_a_restarted_node_does_not_inherit_its_counts_and_a_clean_stop_clears(self):
        old = yield self.node("n1")
        yield old.acquireConnection("10.1.0.9", False, 1, 100)
        old.renewal.stop()  # kill -9: no clean stop
        yield old.disconnect()
        new = yield self.node("n1")
        self.assertIsNone((yield new.acquireConnection("10.1.0.9", False, 1, 100)))
        yield new.stopService()
        self.assertNotIn("upas:{conn}:node:n1", self.redis.command("KEYS", "*"))
        self.assertEqual(self.redis.command("ZSCORE", "upas:{conn}:nodes", "n1"), None)

    @defer.inlineCallbacks
    def test_concurrent_acquires_from_several_nodes_never_pass_the_limit(self):
        nodes = yield defer.gatherResults([self.node("n%d" % i) for i in range(4)])
        answers = yield defer.gatherResults([
            n.acquireConnection("10.1.1.1", False, 5, 100) for n in nodes for _ in range(10)])
        self.assertEqual(answers.count(None), 5)
        total = sum(int(self.redis.command("HGET", "upas:{conn}:node:n%d" % i, "10.1.1.1") or 0)
                    for i in range(4))
        self.assertEqual(total, 5)

    @defer.inlineCallbacks
    def test_every_key_has_a_ttl(self):
        a = yield self.node("a")
        yield a.acquireConnection("10.1.2.1", False, 5, 100)
        yield a.authBegin("10.1.2.1")
        yield a.authFailed("10.1.2.1")
        yield a.greylistAttempt("192.0.2.1", "10.1.2.1", ["alice"])
        yield a.addToWhitelist("10.1.2.2", "mx.example")
        yield a.grant("10.1.2.3")
        yield a.countAttempt("message", "10.1.2.1", 60)
        keys = self.redis.command("KEYS", "*")
        self.assertEqual(len(keys), 7, keys)
        ttls = {k: self.redis.command("TTL", k) for k in keys}
        self.assertTrue(all(t > 0 for t in ttls.values()), ttls)
        self.assertGreaterEqual(ttls["upas:grey:{192.0.2.1/10.1.2.1}:alice"], 2 * 3600)
        self.assertGreaterEqual(ttls["upas:grant:10.1.2.3"], 2 * 3600)
        self.assertLessEqual(ttls["upas:rate:message:60:%d:10.1.2.1" % (START // 60)], 120)

    @defer.inlineCallbacks
    def test_scripts_flushed_from_redis_are_loaded_again(self):
        a = yield self.node("a")
        yield a.countAttempt("message", "10.1.3.1", 60)
        self.redis.command("SCRIPT", "FLUSH")
        self.assertEqual((yield a.countAttempt("message", "10.1.3.1", 60)), 2)


class Unavailable(RedisCase, unittest.TestCase):
    """Redis stopped mid-way: every call fails fast with StateUnavailable,
    said once in the log; the fallback answers locally; both recover."""

    def setUp(self):
        self.clock = clock()
        self.settings = make_settings("", root=self.mktemp())
        self.events = []
        def observer(event):
            if event.get("event") == "state.store":
                self.events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.addCleanup(self.ensureRunning)

    def ensureRunning(self):
        if self.redis.proc.poll() is not None:
            self.redis.start()

    @defer.inlineCallbacks
    def back(self, store):
        """Wait (polling the real reactor) until ``store`` reconnected."""
        for _ in range(100):
            if store.factory.size:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("no reconnection")

    @defer.inlineCallbacks
    def test_calls_fail_fast_then_recover(self):
        a = yield self.node("a")
        self.assertIsNone((yield a.acquireConnection("10.2.0.1", False, 5, 100)))
        self.redis.stop()
        started = reactor.seconds()
        for _ in range(3):
            with self.assertRaises(StateUnavailable):
                yield a.greylistAttempt("192.0.2.1", "10.2.0.1", ["alice"])
        self.assertLess(reactor.seconds() - started, 1.5)  # the 0.5 s timeout at most
        self.assertEqual([e["ok"] for e in self.events], [False])  # one line per outage
        yield a.releaseConnection("10.2.0.1", False)  # never fails: the renewal makes it good
        self.redis.start()  # empty: Redis lost everything
        yield self.back(a)
        self.assertEqual((yield a.greylistAttempt("192.0.2.1", "10.2.0.1", ["alice"])),
                         [("alice", greylist.NEW)])
        self.assertEqual([e["ok"] for e in self.events], [False, True])
        yield a.acquireConnection("10.2.0.2", False, 5, 100)
        yield a.renew()  # this node's counts written whole
        self.assertEqual(self.redis.command("HGETALL", "upas:{conn}:node:a"),
                         ["*", "1", "10.2.0.2", "1"])

    @defer.inlineCallbacks
    def test_unreachable_at_start(self):
        self.redis.stop()
        a = yield self.node("a")
        with self.assertRaises(StateUnavailable):
            yield a.isGranted("10.2.0.3")
        self.redis.start()
        yield self.back(a)
        self.assertFalse((yield a.isGranted("10.2.0.3")))

    @defer.inlineCallbacks
    def test_the_fallback_answers_from_local_state_and_releases_there(self):
        shared = yield self.node("a")
        local = statestore.LocalStateStore(self.settings, self.clock)
        store = redisstate.FallbackStateStore(shared, local)
        self.assertIsNone((yield store.acquireConnection("10.2.0.4", False, 1, 100)))
        self.redis.stop()
        self.assertIsNone((yield store.acquireConnection("10.2.0.5", False, 1, 100)))
        self.assertEqual((yield store.acquireConnection("10.2.0.5", False, 1, 100)),
                         statestore.PEER)
        self.assertEqual(local.perPeer["10.2.0.5"], 1)
        self.assertEqual((yield store.greylistAttempt("192.0.2.1", "10.2.0.4", ["bob"])),
                         [("bob", greylist.NEW)])
        fallback = [e for e in self.events if "local state" in e["log_format"]]
        self.assertEqual(len(fallback), 1)
        self.redis.start()
        yield self.back(shared)
        yield store.releaseConnection("10.2.0.5", False)  # to the store that admitted it
        self.assertEqual(local.perPeer["10.2.0.5"], 0)
        self.assertIsNone((yield store.acquireConnection("10.2.0.6", False, 1, 100)))
        self.assertEqual(local.total, 0)
        self.assertTrue(any("no longer used" in e["log_format"] for e in self.events))


class Urls(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(redisstate.parse_url("redis://127.0.0.1:6380/2"), ("127.0.0.1", 6380, 2))
        self.assertEqual(redisstate.parse_url("redis://localhost"), ("localhost", 6379, 0))
        for bad in ("http://x/0", "redis://", "redis://h:99999/0", "redis://h/x", "redis:/h"):
            with self.assertRaises(ValueError):
                redisstate.parse_url(bad)

    def test_a_bad_url_is_a_one_line_startup_error(self):
        out = subprocess.run(
            [sys.executable, "-m", "twisted", "upas-smtpd", "--state", "redis://h:x/0",
             "--root", self.mktemp()], capture_output=True, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("--state", out.stderr + out.stdout)
        self.assertNotIn("Traceback", out.stderr + out.stdout)


class Grant(RedisCase, unittest.TestCase):
    """upas-grant writes to Redis, or a file in the trusted directory."""

    def grant(self, *args):
        return subprocess.run([sys.executable, "-m", "upasmail.cli.granttool", *args],
                              capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT))

    def test_to_redis(self):
        self.redis.command("FLUSHALL")
        out = self.grant("--state", self.redis.url, "--duration", "600", "10.3.0.1")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertLessEqual(self.redis.command("TTL", "upas:grant:10.3.0.1"), 600 + 3600)

    def test_to_the_trusted_directory(self):
        root = os.path.abspath(self.mktemp())
        out = self.grant("--root", root, "10.3.0.2")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertTrue(os.path.exists(os.path.join(root, "lib", "trusted.d", "10.3.0.2")))

    def test_errors(self):
        self.assertEqual(self.grant("--root", self.mktemp(), "nonsense").returncode, 1)
        self.assertEqual(self.grant("--state", "redis://x:y", "10.3.0.3").returncode, 64)
        out = self.grant("--state", "redis://127.0.0.1:%d/0" % free_port(), "10.3.0.3")
        self.assertEqual(out.returncode, 1)
        self.assertIn("upas-grant: 10.3.0.3:", out.stderr)


# -- real servers ----------------------------------------------------------------

@pytest.fixture
def redis(tmp_path):
    r = RedisServer(tmp_path / "redis")
    yield r
    r.stop()


def data_reply(port):
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0),
                      local_hostname="client.sender.net") as c:
        c.ehlo()
        c.mail("alice@example.org")
        c.rcpt("bob")
        reply = c.docmd("DATA")
        if reply[0] == 354:
            c.send(b"Subject: hello\r\n\r\nhi\r\n.\r\n")
            assert c.getreply()[0] == 250
        return reply


def test_a_client_greylisted_on_node_a_passes_on_node_b(server, redis):
    common = ("-g", "--greylist-min", "1", "--greylist-max", "600", "--state", redis.url)
    a = server(*common, "--node", "a", where="a")
    b = server(*common, "--node", "b", where="b")
    assert data_reply(a.port)[0] == 451
    assert redis.command("EXISTS", "upas:grey:{127.0.0.1/127.0.0.2}:bob") == 1
    time.sleep(1.1)  # the server's own clock: --greylist-min
    assert data_reply(b.port)[0] == 354
    assert not os.path.exists(os.path.join(b.root, "grey", "tmp"))  # nothing local
    assert sorted(redis.command("ZRANGE", "upas:{conn}:nodes", 0, -1)) == ["a", "b"]
    b.stop()  # a clean stop takes its lease and counts away
    assert redis.command("ZRANGE", "upas:{conn}:nodes", 0, -1) == ["a"]


def test_redis_gone_the_server_falls_back_and_keeps_answering(server, redis):
    s = server("-g", "--state", redis.url, "--state-failure", "local", "--node", "n")
    redis.stop()
    assert data_reply(s.port) == (451, b"please try again soon from the same IP.")
    s.wait_for("answering from this node's local state")
    assert os.path.exists(os.path.join(s.root, "grey", "tmp", "127.0.0.1", "127.0.0.2", "bob"))


def test_workers_ask_the_main_process_which_asks_redis(server, redis):
    s = server("-g", "--state", redis.url, "--node", "w", "--workers", "2")
    for _ in range(4):  # whichever process takes them
        assert data_reply(s.port)[0] == 451
    assert redis.command("EXISTS", "upas:grey:{127.0.0.1/127.0.0.2}:bob") == 1
    assert redis.command("ZRANGE", "upas:{conn}:nodes", 0, -1) == ["w"]


def test_policy_explain_reads_the_greylist_in_redis(tmp_path, redis):
    from test_policy_explain import PEER, SESSION, Site

    site = Site(tmp_path)
    redis.command("SET", "upas:grey:{127.0.0.1/%s}:bob" % PEER, time.time() - 600)
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from upasmail.cli.policytool import main; "
                               "sys.exit(main())",
         "explain", *site.argv(["-g", "--json", "--state", redis.url, *SESSION,
                                "--rcpt", "bob"])],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["phases"][-1]["facts"]["greylist"] == [False, [["bob", "recent"]]]
    assert redis.command("KEYS", "upas:grey:*") == ["upas:grey:{127.0.0.1/%s}:bob" % PEER]


def test_stdio_mode_session_is_a_node_of_its_own(tmp_path, redis, dns_port):  # noqa: F811
    from test_stdio import TO_BOB, on_socketpair, received

    session, sock = on_socketpair(tmp_path, "-n", "192.0.2.7", "-g", "--state", redis.url,
                                  "--resolver", "127.0.0.1:%d" % dns_port)
    sock.sendall(TO_BOB)
    assert b"451 please try again soon" in received(sock)
    assert session.wait() == 0
    # lsys is "stdio": a socketpair has no address of ours
    assert redis.command("KEYS", "upas:grey:*") == ["upas:grey:{stdio/192.0.2.7}:bob"]
    assert redis.command("ZRANGE", "upas:{conn}:nodes", 0, -1) == []  # it stopped cleanly
