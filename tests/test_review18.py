"""Issue 18 reviewed from outside: defects found probing the merged PROXY
listeners, the Redis state store and the rate limits, each with the test
that showed it."""

import os

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from test_redis_nodes import clock
from realservers import RedisServer
from test_redis_state import RedisCase
from test_twistd import dns_port  # noqa: F401 (a fixture)
from upasmail.smtpd import redisstate, statestore
from upasmail.testing import make_settings


class Redis(RedisCase):
    """A real redis-server, emptied before each test, and a clock."""

    def setUp(self):
        self.redis.command("FLUSHALL")
        self.clock = clock()
        self.settings = make_settings("", root=self.mktemp(), auth_fail_delay=1.0)


class AuthChecksThatNeverEnd(Redis, unittest.TestCase):
    """An AUTH check counted in Redis (``authBegin``) whose end never
    arrives -- its node killed with kill -9, or Redis not answering the
    ``authFailed``/``authAbandoned`` -- must not keep the address locked
    out for good: locally such a check dies with the process (or the
    worker channel abandons it); in Redis it has to be forgotten too."""

    @defer.inlineCallbacks
    def test_pending_checks_of_a_dead_node_are_forgotten_after_the_memory(self):
        dead = yield self.node("dead")
        for _ in range(3):  # the limit: checks under way, never ended
            self.assertTrue((yield dead.authBegin("10.9.0.1")))
        alive = yield self.node("alive")
        self.assertFalse((yield alive.authBegin("10.9.0.1")))  # still under way: refused
        memory = alive.throttle.memory
        for _ in range(3):  # the client keeps trying, each attempt refused
            self.clock.advance(memory / 2)
            yield alive.authBegin("10.9.0.1")
        self.clock.advance(memory)
        self.assertTrue((yield alive.authBegin("10.9.0.1")))
        ttl = self.redis.command("TTL", "upas:auth:10.9.0.1")
        self.assertGreater(ttl, 0)


class LeaseLapsedWithoutAFailure(Redis, unittest.TestCase):
    """A live node whose lease lapsed while nothing failed on its side (its
    process stalled longer than the lease, or its clock ran behind): the
    other nodes dropped its counts as a dead node's.  Its next admission
    must not quietly take the lease back over an empty count, or the
    connections it still holds would count nowhere for as long as they
    last: the next renewal writes them back."""

    @defer.inlineCallbacks
    def test_the_next_renewal_writes_back_what_the_node_holds(self):
        stalled = yield self.node("stalled", lease=30)
        other = yield self.node("other", lease=30)
        for _ in range(2):
            self.assertIsNone((yield stalled.acquireConnection("10.9.1.1", False, 3, 100)))
        stalled.renewal.stop()  # the stall: no renewal for longer than the lease
        self.clock.advance(31)
        yield other.renew()
        self.assertIsNone((yield other.acquireConnection("10.9.1.2", False, 3, 100)))
        self.assertIsNone(self.redis.command("HGET", "upas:{conn}:node:stalled", "*"))
        # the stall ends: one more connection, then the renewal every lease/3
        self.assertIsNone((yield stalled.acquireConnection("10.9.1.1", False, 3, 100)))
        yield stalled.renew()
        self.assertEqual(self.redis.command("HGET", "upas:{conn}:node:stalled", "10.9.1.1"), "3")
        self.assertEqual((yield other.acquireConnection("10.9.1.1", False, 3, 100)),
                         "peer")


class FallbackSaysOncePerOutage(Redis, unittest.TestCase):
    """--state-failure local: an answer the Redis store gives without Redis
    (the whitelist file, which the local store appends to meanwhile) is
    not Redis answering again: no "answering again" line, and no second
    "unavailable" line, within one outage."""

    def setUp(self):
        Redis.setUp(self)
        self.events = []  # every event: the test picks the fallback's lines
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(lambda: self.redis.proc.poll() is None or self.redis.start())

    @defer.inlineCallbacks
    def test_a_whitelisted_peer_during_the_outage(self):
        shared = yield self.node("a")
        store = redisstate.FallbackStateStore(shared,
                                              statestore.LocalStateStore(self.settings, self.clock))
        os.makedirs(self.settings.path("grey"), exist_ok=True)
        with open(os.path.join(self.settings.path("grey"), "whitelist"), "w") as f:
            f.write("10.9.2.1\n")
        self.redis.stop()
        for _ in range(2):
            self.assertFalse((yield store.isGranted("10.9.2.1")))  # local: no grant
            self.assertTrue((yield store.isWhitelisted("10.9.2.1")))  # the file, no Redis
        fallback = [e for e in self.events if e.get("event") == "state.store"
                    and "local state" in e["log_format"]]
        self.assertEqual([e["ok"] for e in fallback], [False])


class AdmittedWhileConnecting(Redis, unittest.TestCase):
    """A connection admitted while the store makes its first connection
    (stdio mode: the session's first question; a daemon's first clients)
    stays counted: the first renewal, which writes the node's counts whole,
    must not run after that admission and wipe it."""

    @defer.inlineCallbacks
    def test_the_first_renewal_does_not_wipe_an_admission(self):
        from twisted.internet import reactor

        store = redisstate.RedisStateStore(self.redis.url, self.settings, self.clock, reactor,
                                           node="stdio", timeout=0.5, backoff=(0.05, 0.2))
        store.startService()
        self.addCleanup(lambda: store.stopService() if store.running else None)
        admitted = store.acquireConnection("10.9.3.1", False, 1, 100)  # before connected
        yield store.started
        self.assertIsNone((yield admitted))
        yield store.isGranted("10.9.3.2")  # after the first renewal's answer
        self.assertEqual(self.redis.command("HGET", "upas:{conn}:node:stdio", "10.9.3.1"), "1")
        other = yield self.node("other")
        self.assertEqual((yield other.acquireConnection("10.9.3.1", False, 1, 100)), "peer")


    @defer.inlineCallbacks
    def test_an_admission_answered_after_a_renewal_is_written_back_at_the_next(self):
        """The same race after an outage: the renewal that writes the counts
        whole is sent while an admission is on its way; Redis runs the
        admission, then the renewal, which does not know of it yet."""
        node = yield self.node("n")
        node.rewrite = True  # as after an outage
        admitted = node.acquireConnection("10.9.3.3", False, 1, 100)
        renewed = node.renew()
        self.assertIsNone((yield admitted))
        yield renewed
        yield node.renew()  # the next tick
        self.assertEqual(self.redis.command("HGET", "upas:{conn}:node:n", "10.9.3.3"), "1")


class RedisURL(unittest.TestCase):
    def test_port_zero_is_refused_not_taken_for_the_default(self):
        with self.assertRaises(ValueError):
            redisstate.parse_url("redis://127.0.0.1:0/0")
        self.assertEqual(redisstate.parse_url("redis://127.0.0.1/3"), ("127.0.0.1", 6379, 3))

    def test_a_password_is_refused_not_silently_dropped(self):
        """The client would connect without it and every call would fail
        (NOAUTH) while the server runs: say so at start-up instead."""
        for url in ("redis://:secret@127.0.0.1:6379/0", "redis://user:pw@127.0.0.1/0"):
            with self.assertRaises(ValueError) as e:
                redisstate.parse_url(url)
            self.assertNotIn("secret", str(e.exception))
            self.assertNotIn("pw", str(e.exception))


class GrantDuration(unittest.TestCase):
    """``upas-grant --duration`` that is not a finite number is a usage
    error (64, one line), not a traceback (inf, with Redis) nor an error
    about the trusted directory."""

    def test_not_finite_is_a_usage_error(self):
        import io

        from upasmail.cli import granttool

        for value in ("inf", "nan", "x"):
            err = io.StringIO()
            status = granttool.main(["--state", "redis://127.0.0.1:1/0", "--root",
                                     self.mktemp(), "--duration", value, "192.0.2.1"], err=err)
            self.assertEqual(status, granttool.EX_USAGE, err.getvalue())
            self.assertIn("--duration wants a number, not %r" % value, err.getvalue())


def counted(r, ip):
    """``ip``'s connections in Redis ``r``, over the nodes in force."""
    nodes = r.command("ZRANGE", "upas:{conn}:nodes", 0, -1)
    return sum(int(r.command("HGET", "upas:{conn}:node:" + n, ip) or 0) for n in nodes)


def test_a_stdio_session_counts_in_redis_while_it_lasts(tmp_path, dns_port):  # noqa: F811
    """Black box: ``upas-smtpd`` per connection with --state redis:// --
    its session's connection counts towards the per-peer limit of every
    node while it lasts.  (Whether the session's admission went ahead of
    the first renewal depends on timing here; AdmittedWhileConnecting
    makes that order certain.)"""
    from test_stdio import client_on, on_socketpair

    r = RedisServer(tmp_path / "redis")
    try:
        session, sock = on_socketpair(tmp_path, "-n", "192.0.2.7", "--state", r.url,
                                      "--resolver", "127.0.0.1:%d" % dns_port)
        c = client_on(sock)  # the greeting: admitted
        assert c.noop()[0] == 250  # a round trip after the first renewal
        assert counted(r, "192.0.2.7") == 1
        c.quit()
        assert session.wait() == 0
    finally:
        r.stop()


def test_stdio_sessions_given_one_node_name_keep_their_own_counts(tmp_path, dns_port):  # noqa: F811
    """Under inetd every session is a process of its own; the command line
    (and so ``--node``) is the same for all.  One session ending must not
    take the counts of another still under way with it (nor its first
    renewal overwrite them): each process is a node of its own, under the
    name given and its pid."""
    from test_stdio import client_on, on_socketpair

    r = RedisServer(tmp_path / "redis")
    args = ("-n", "192.0.2.7", "--state", r.url, "--node", "mx1",
            "--resolver", "127.0.0.1:%d" % dns_port)

    try:
        first, sock1 = on_socketpair(tmp_path / "1", *args)
        c1 = client_on(sock1)
        assert c1.noop()[0] == 250
        second, sock2 = on_socketpair(tmp_path / "2", *args)
        c2 = client_on(sock2)
        assert c2.noop()[0] == 250
        assert counted(r, "192.0.2.7") == 2
        c2.quit()
        assert second.wait() == 0
        assert counted(r, "192.0.2.7") == 1  # the first session still counts
        c1.quit()
        assert first.wait() == 0
        assert counted(r, "192.0.2.7") == 0
    finally:
        r.stop()
