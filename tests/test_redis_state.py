"""Every IStateStore question, asked of the local store and of the Redis
store alike (one test body, two stores): the Redis store must mean what
the local one means (the greylist's windows, the AUTH budget, grants,
connection limits, rate windows).  The Redis store talks to a real
redis-server on a free 127.0.0.1 port (tests/realservers.py); decisions
run on a ``task.Clock``.
"""

import os
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from realservers import RedisServer
from upasmail.interfaces import CONNECTION, MESSAGE, IStateStore, StateUnavailable
from upasmail.rules import greylist
from upasmail.rules.ratify import GRANT_LIFETIME
from upasmail.smtpd import redisstate, statestore
from upasmail.testing import make_settings

START = 1_800_000_000.0  # every node's clock starts here: their leases compare


class Contract:
    """The shared body: ``self.store`` from ``makeStore``."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.root = self.mktemp()
        self.settings = make_settings("", root=self.root, greylist_min=300.0,
                                      greylist_max=3600.0, auth_max_failures=3,
                                      auth_fail_delay=1.0)
        return defer.maybeDeferred(self.makeStore).addCallback(
            lambda store: setattr(self, "store", store))

    @defer.inlineCallbacks
    def test_it_provides_the_interface(self):
        self.assertTrue(IStateStore.providedBy(self.store))
        yield None

    @defer.inlineCallbacks
    def test_connections_per_peer_and_in_all(self):
        s = self.store
        self.assertIsNone((yield s.acquireConnection("10.0.0.1", False, 2, 3)))
        self.assertIsNone((yield s.acquireConnection("10.0.0.1", False, 2, 3)))
        self.assertEqual((yield s.acquireConnection("10.0.0.1", False, 2, 3)), statestore.PEER)
        # trusted (exempt) connections count in all, not per peer
        self.assertIsNone((yield s.acquireConnection("10.0.0.1", True, 2, 3)))
        self.assertEqual((yield s.acquireConnection("10.0.0.2", False, 2, 3)), statestore.TOTAL)
        yield s.releaseConnection("10.0.0.1", False)
        self.assertIsNone((yield s.acquireConnection("10.0.0.2", False, 2, 3)))
        yield s.releaseConnection("10.0.0.1", True)
        self.assertIsNone((yield s.acquireConnection("10.0.0.1", False, 2, 3)))

    @defer.inlineCallbacks
    def test_auth_failures_wait_longer_and_cut_off_at_the_limit(self):
        s, ip = self.store, "10.0.0.5"
        waits = []
        for n in (1, 2, 3):
            self.assertTrue((yield s.authBegin(ip)))
            wait, failures, limit = yield s.authFailed(ip)
            self.assertEqual((failures, limit), (n, 3))
            waits.append(wait)
        # each reply goes out after the previous one, doubling (no time passed)
        self.assertEqual(waits, [1.0, 3.0, 7.0])
        self.assertFalse((yield s.authBegin(ip)))
        self.assertTrue((yield s.authBegin("10.0.0.6")))  # per address
        # forgiven 900 s after the last answer
        self.clock.advance(7 + 899)
        self.assertFalse((yield s.authBegin(ip)))
        self.clock.advance(1)
        self.assertTrue((yield s.authBegin(ip)))

    @defer.inlineCallbacks
    def test_checks_under_way_count_and_success_forgets(self):
        s, ip = self.store, "10.0.0.7"
        for _ in range(3):
            self.assertTrue((yield s.authBegin(ip)))
        self.assertFalse((yield s.authBegin(ip)))
        yield s.authAbandoned(ip)
        self.assertTrue((yield s.authBegin(ip)))
        yield s.authFailed(ip)
        yield s.authFailed(ip)
        yield s.authSucceeded(ip)
        for _ in range(3):
            self.assertTrue((yield s.authBegin(ip)))

    @defer.inlineCallbacks
    def test_greylist_windows(self):
        s = self.store
        got = yield s.greylistAttempt("192.0.2.1", "10.1.1.1", ["alice", "x!bob", "../x", "a/b"])
        self.assertEqual(got, [("alice", greylist.NEW), ("x!bob", greylist.NEW)])
        self.clock.advance(299)  # too soon: restarts the wait
        self.assertEqual((yield s.greylistAttempt("192.0.2.1", "10.1.1.1", ["alice"])),
                         [("alice", greylist.OTHER)])
        self.clock.advance(300)
        self.assertEqual((yield s.greylistPeek("192.0.2.1", "10.1.1.1", ["alice"])),
                         [("alice", greylist.RECENT)])
        self.assertEqual((yield s.greylistAttempt("192.0.2.1", "10.1.1.1", ["alice", "bob"])),
                         [("alice", greylist.RECENT), ("bob", greylist.RECENT)])
        # keyed by our address and the peer's too
        self.assertEqual((yield s.greylistPeek("192.0.2.2", "10.1.1.1", ["alice"])),
                         [("alice", greylist.NEW)])
        self.clock.advance(3601)  # too late
        self.assertEqual((yield s.greylistAttempt("192.0.2.1", "10.1.1.1", ["alice"])),
                         [("alice", greylist.OTHER)])

    @defer.inlineCallbacks
    def test_peek_records_nothing(self):
        s = self.store
        self.assertEqual((yield s.greylistPeek("192.0.2.1", "10.1.1.2", ["carol"])),
                         [("carol", greylist.NEW)])
        self.clock.advance(400)
        self.assertEqual((yield s.greylistAttempt("192.0.2.1", "10.1.1.2", ["carol"])),
                         [("carol", greylist.NEW)])

    @defer.inlineCallbacks
    def test_whitelist_file_and_added_entries(self):
        s = self.store
        os.makedirs(self.settings.path("grey"), exist_ok=True)
        with open(os.path.join(self.settings.path("grey"), "whitelist"), "w") as f:
            f.write("10.9.0.0/16\n")
        self.assertTrue((yield s.isWhitelisted("10.9.8.7")))
        self.assertFalse((yield s.isWhitelisted("10.8.0.1")))
        yield s.addToWhitelist("10.8.0.1", "mx.example.net")
        self.assertTrue((yield s.isWhitelisted("10.8.0.1")))

    @defer.inlineCallbacks
    def test_grants_last_their_lifetime(self):
        s = self.store
        self.assertFalse((yield s.isGranted("10.2.0.1")))
        yield s.grant("10.2.0.1")
        self.assertTrue((yield s.isGranted("10.2.0.1")))
        self.assertFalse((yield s.isGranted("10.2.0.2")))
        self.clock.advance(GRANT_LIFETIME)
        self.assertFalse((yield s.isGranted("10.2.0.1")))
        with self.assertRaises(ValueError):
            yield s.grant("not-an-address")

    @defer.inlineCallbacks
    def test_grant_files_of_the_trusted_directory_count(self):
        d = self.settings.path("trusted_dir")
        os.makedirs(d)
        open(os.path.join(d, "10.3.0.0#24"), "w").close()
        os.utime(os.path.join(d, "10.3.0.0#24"), (START, START))
        self.assertTrue((yield self.store.isGranted("10.3.0.9")))

    @defer.inlineCallbacks
    def test_attempts_count_in_fixed_windows(self):
        s = self.store
        self.clock.advance(60 - START % 60)  # the start of a window
        counts = []
        for _ in range(3):
            counts.append((yield s.countAttempt(CONNECTION, "10.4.0.1", 60)))
        self.assertEqual(counts, [1, 2, 3])
        self.assertEqual((yield s.countAttempt(MESSAGE, "10.4.0.1", 60)), 1)
        self.clock.advance(59)
        self.assertEqual((yield s.countAttempt(CONNECTION, "10.4.0.1", 60)), 4)
        self.clock.advance(1)
        self.assertEqual((yield s.countAttempt(CONNECTION, "10.4.0.1", 60)), 1)


class LocalStore(Contract, unittest.TestCase):
    def makeStore(self):
        return statestore.LocalStateStore(self.settings, self.clock)


class RedisCase:
    """One redis-server for the class, emptied before each test; stores
    made here are stopped after it."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.redis = RedisServer(cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls.redis.stop()
        cls.tmp.cleanup()

    def node(self, name, clock=None, settings=None, **kw):
        """A started RedisStateStore (a Deferred of it) named ``name``."""
        kw.setdefault("timeout", 0.5)
        kw.setdefault("backoff", (0.05, 0.2))
        store = redisstate.RedisStateStore(self.redis.url, settings or self.settings,
                                           clock or self.clock, reactor, node=name, **kw)
        store.startService()
        self.addCleanup(lambda: store.stopService() if store.running else None)
        return store.started.addCallback(lambda _: store)


class RedisStore(RedisCase, Contract, unittest.TestCase):
    def makeStore(self):
        self.redis.command("FLUSHALL")
        return self.node("a")


class Workers(unittest.TestCase):
    """A worker asks the main process, whose Redis store cannot answer:
    the worker's store fails with StateUnavailable too (not an unknown
    remote error), so it answers as the main process would."""

    @defer.inlineCallbacks
    def test_state_unavailable_crosses_the_channel(self):
        from twisted.protocols import loopback

        settings = make_settings("", root=self.mktemp())
        down = redisstate.RedisStateStore("redis://127.0.0.1:1/0", settings, task.Clock())
        server = statestore.StateServer(down)
        client = statestore.Channel()
        remote = statestore.RemoteStateStore(client)
        pump = loopback.loopbackAsync(server, client)
        for call in (lambda: remote.acquireConnection("10.0.0.1", False, 1, 10),
                     lambda: remote.authBegin("10.0.0.1"),
                     lambda: remote.authFailed("10.0.0.1"),
                     lambda: remote.greylistAttempt("192.0.2.1", "10.0.0.1", ["bob"]),
                     lambda: remote.isGranted("10.0.0.1"),
                     lambda: remote.countAttempt(CONNECTION, "10.0.0.1", 60)):
            with self.assertRaises(StateUnavailable):
                yield call()
        client.transport.loseConnection()
        yield pump
