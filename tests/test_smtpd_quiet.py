"""``UpasESMTP.whenQuiet`` fires only once every pipelined command is answered."""

from twisted.internet import defer
from twisted.trial import unittest

from upasmail import testing


class WhenQuietTests(unittest.TestCase):
    def test_quiet_waits_for_commands_pipelined_behind_a_fast_reply(self):
        root = self.mktemp()
        d = testing.Dialogue(testing.make_settings(root=root))
        self.addCleanup(d.close)
        self.assertEqual(d.send("HELO h.sender.net")[0][:3], "250")
        pending = defer.Deferred()
        d.proto.delivery.validateFrom = lambda helo, origin: pending
        # MAIL waits on the back end; the HELO behind it is answered at once
        # (its DNS answer is there), the NOOP after that only then
        replies = []
        d.sendAndWait("MAIL FROM:<a@b.sender.net>", "HELO h2.sender.net", "NOOP").addCallback(
            replies.extend)
        self.assertEqual(replies, [])
        pending.callback(None)
        self.assertEqual([r[:3] for r in replies], ["250", "250", "250"], replies)
