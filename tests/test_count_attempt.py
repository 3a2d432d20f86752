"""IStateStore.countAttempt: attempts per client in fixed windows, locally and over AMP."""

from twisted.internet import task
from twisted.protocols import loopback
from twisted.trial import unittest

from upasmail.interfaces import CONNECTION, MESSAGE
from upasmail.testing import make_settings
from upasmail.smtpd import statestore


class LocalCountAttempt(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1200)  # the start of a 60 s window
        self.store = statestore.LocalStateStore(
            make_settings("", root=self.mktemp()), self.clock)

    def counts(self, kind, ip, n=1):
        return [self.successResultOf(self.store.countAttempt(kind, ip, 60)) for _ in range(n)]

    def test_counts_per_kind_and_client(self):
        self.assertEqual(self.counts(CONNECTION, "10.0.0.1", 3), [1, 2, 3])
        self.assertEqual(self.counts(CONNECTION, "10.0.0.2"), [1])
        self.assertEqual(self.counts(MESSAGE, "10.0.0.1"), [1])

    def test_a_new_window_starts_again_and_forgets_the_old(self):
        self.counts(CONNECTION, "10.0.0.1", 5)
        self.clock.advance(59)
        self.assertEqual(self.counts(CONNECTION, "10.0.0.1"), [6])
        self.clock.advance(1)
        self.assertEqual(self.counts(CONNECTION, "10.0.0.1"), [1])
        self.assertEqual(len(self.store.attempts), 1)


class RemoteCountAttempt(unittest.TestCase):
    def test_a_worker_counts_in_the_main_process(self):
        clock = task.Clock()
        local = statestore.LocalStateStore(make_settings("", root=self.mktemp()), clock)
        server = statestore.StateServer(local)
        client = statestore.Channel()
        remote = statestore.RemoteStateStore(client)
        pump = loopback.loopbackAsync(server, client)
        got = []
        d = remote.countAttempt(MESSAGE, "10.0.0.9", 60).addCallback(got.append)
        d.addCallback(lambda _: remote.countAttempt(MESSAGE, "10.0.0.9", 60))
        d.addCallback(got.append)
        d.addCallback(lambda _: self.assertEqual(got, [1, 2]))
        d.addCallback(lambda _: client.transport.loseConnection())
        return d.addCallback(lambda _: pump)
