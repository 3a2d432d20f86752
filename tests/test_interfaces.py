"""The extension points as ``zope.interface`` Interfaces (issue 17).

Our classes provide what they declare (``verifyObject``); the server asks
``providedBy`` instead of looking for a method by name, so an embedder's
plain ``IMessageDelivery``, ``IMessage`` or ``twisted.cred`` checker gets
Twisted's behaviour, even when it happens to have a method of the same
name, and one that declares our interface gets ours.
"""

import os
import shutil
import tempfile

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from twisted.logger import capturedLogs
from twisted.mail import smtp
from twisted.names import dns
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from upasmail import interfaces, queue, replies, statestore, testing
from upasmail.decision import reject
from upasmail.interfaces import (ICredentialsSource, IMailBackend, IMessageStore,
                                 IReloadable, IUpasDelivery, IUpasMessage)
from upasmail.mailer import Mailer
from upasmail.passwd import PasswordFile

ZONE = {"h.sender.net": [dns.Record_A("127.0.0.2")]}
EHLO = "EHLO h.sender.net"
MAIL = ("MAIL FROM:<alice@example.net>", "RCPT TO:<bob@gnot.example.org>")


@implementer(smtp.IMessage)
class PlainMessage:
    """An embedder's message: Twisted's IMessage and nothing more."""

    def __init__(self, stored):
        self.stored = stored
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.stored.append(b"\n".join(self.lines))
        return defer.succeed(None)

    def connectionLost(self):
        self.lines = []


class LookalikeMessage(PlainMessage):
    """Has methods named as ours, but does not declare ``IUpasMessage``."""

    size = 4242

    def __init__(self, stored):
        PlainMessage.__init__(self, stored)
        self.calls = []

    def linesReceived(self, data):
        self.calls.append(("linesReceived", data))

    def refuse(self, verdict):
        self.calls.append(("refuse", verdict))


@implementer(smtp.IMessageDelivery)
class PlainDelivery:
    """An embedder's delivery: every recipient gets ``message(stored)``."""

    message = PlainMessage

    def __init__(self):
        self.stored = []
        self.made = []

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        def make():
            m = self.message(self.stored)
            self.made.append(m)
            return m
        return make


class LookalikeDelivery(PlainDelivery):
    message = LookalikeMessage


class UndeclaredReady(PlainDelivery):
    """A ``ready`` that is not ours: the server must not take it for a refusal."""

    def ready(self):
        return reject(450, replies.BUSY, reason="busy")


@implementer(IUpasDelivery)
class BusyDelivery(PlainDelivery):
    def ready(self):
        return reject(450, replies.BUSY, reason="busy")


class Checker(InMemoryUsernamePasswordDatabaseDontUse):
    """A plain cred checker that can check CRAM-MD5 (plaintext secrets)."""

    def __init__(self):
        InMemoryUsernamePasswordDatabaseDontUse.__init__(self, alice=b"secret")
        self.rereads = 0

    def available(self):  # not declared: the server must not ask
        return False

    def reread(self):
        self.rereads += 1


@implementer(ICredentialsSource, IReloadable)
class SourceChecker(Checker):
    def __init__(self, available=True, cram=True):
        Checker.__init__(self)
        self._available, self._cram = available, cram

    def available(self):
        return self._available

    def cram_md5_ok(self):
        return self._cram


class Case(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="upasmail-iface-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def dialogue(self, delivery=None, checker=None):
        s = testing.make_settings("", root=self.root)
        d = testing.Dialogue(s, checker=checker, mailboxes=("bob",),
                             resolver=testing.FakeResolver(ZONE))
        self.addCleanup(d.close)
        if delivery is not None:  # what makeDelivery would have made
            d.proto.delivery = delivery
        self.assertEqual(d.send(EHLO)[0][:4], "250-")
        return d


class OurImplementations(Case):
    def test_delivery_and_message(self):
        d = self.dialogue()
        verifyObject(IUpasDelivery, d.proto.delivery)
        self.assertEqual(d.send(*MAIL, "DATA")[-1][:4], "354 ")
        message = d.proto.session.envelope.message
        verifyObject(IUpasMessage, message)
        self.assertEqual(d.send("Subject: x", "", "hi", "."), ["250 2.5.0 sent"])

    def test_back_ends_and_the_mail_root(self):
        d = self.dialogue()
        verifyObject(IMessageStore, d.factory.root)
        verifyObject(IMailBackend, Mailer("true", task.Clock()))

    def test_checkers_and_what_rereads_its_files(self):
        checker = PasswordFile(os.path.join(self.root, "passwd"))
        verifyObject(ICredentialsSource, checker)
        verifyObject(IReloadable, checker)
        d = self.dialogue()
        spam = d.factory.spam
        verifyObject(statestore.IStateStore, spam.store)
        for reloadable in (spam, spam.store, spam.store.greylist, spam.ratify,
                           spam.validators, d.factory.root.mailboxes):
            verifyObject(IReloadable, reloadable)

    def test_the_state_store_interface_is_the_one_in_statestore(self):
        self.assertIs(interfaces.IStateStore, statestore.IStateStore)
        self.assertIn("IStateStore", interfaces.__all__)


class PlainTwistedObjects(Case):
    """An embedder's objects that declare none of ours: as Twisted's ESMTP does."""

    def test_a_plain_delivery_and_message_store_the_lines(self):
        delivery = PlainDelivery()
        d = self.dialogue(delivery)
        self.assertEqual(d.send(*MAIL, "DATA")[-1][:4], "354 ")
        self.assertEqual(d.send("Subject: x", "", "..dot", "end", "."), ["250 2.5.0 sent"])
        self.assertEqual(delivery.stored, [b"Subject: x\n\n.dot\nend"])

    def test_a_ready_method_that_is_not_declared_is_not_asked(self):
        d = self.dialogue(UndeclaredReady())
        self.assertEqual(d.send(*MAIL, "DATA")[-1][:4], "354 ")

    def test_a_declared_ready_may_refuse_data(self):
        d = self.dialogue(BusyDelivery())
        self.assertEqual(d.send(*MAIL, "DATA")[-1], "450 " + replies.BUSY)

    def lookalike(self):
        delivery = LookalikeDelivery()
        d = self.dialogue(delivery)
        self.assertEqual(d.send(*MAIL, "DATA")[-1][:4], "354 ")
        return d, delivery

    def test_undeclared_lines_received_is_not_called(self):
        d, delivery = self.lookalike()
        self.assertEqual(d.send("Subject: x", "", "hi", "."), ["250 2.5.0 sent"])
        self.assertEqual(delivery.made[0].calls, [])  # the lines came one by one
        self.assertEqual(delivery.stored, [b"Subject: x\n\nhi"])

    def test_undeclared_size_is_not_logged(self):
        d, delivery = self.lookalike()
        with capturedLogs() as events:
            self.assertEqual(d.send("Subject: x", "", "hi", "."), ["250 2.5.0 sent"])
        [accepted] = [e for e in events if e.get("event") == "smtpd.accepted"]
        self.assertEqual(accepted["size"], 0)  # as for any plain IMessage

    def test_undeclared_refuse_is_not_called(self):
        d, delivery = self.lookalike()
        self.assertEqual(d.raw(b"bare\rCR\r\n.\r\n")[0][:4], "554 ")
        self.assertEqual(delivery.made[0].calls, [])  # not told of the refusal
        self.assertEqual(delivery.stored, [])


class Checkers(Case):
    def test_a_checker_without_available_is_offered(self):
        d = self.dialogue(checker=InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret"))
        self.assertIn("250 AUTH CRAM-MD5", d.send("RSET", EHLO))

    def test_an_undeclared_available_is_not_asked(self):
        d = self.dialogue(checker=Checker())
        self.assertIn("250 AUTH CRAM-MD5", d.send("RSET", EHLO))

    def test_a_declared_source_says_what_is_offered(self):
        for checker, offered in ((SourceChecker(), True),
                                 (SourceChecker(available=False), False),
                                 (SourceChecker(cram=False), False)):
            d = self.dialogue(checker=checker)
            self.assertEqual("250 AUTH CRAM-MD5" in d.send("RSET", EHLO), offered, checker)

    def test_reload_rereads_declared_checkers_only(self):
        for checker, rereads in ((Checker(), 0), (SourceChecker(), 1)):
            d = self.dialogue(checker=checker)
            d.factory.reload(d.factory.settings)
            self.assertEqual(checker.rereads, rereads, checker)


@implementer(statestore.IStateStore)
class RemoteLike:
    """A state store that declares only ``IStateStore``; ``reread`` is not ours."""

    def __init__(self):
        self.rereads = 0

    def reread(self):
        self.rereads += 1


class StateStoreReload(Case):
    def test_the_store_is_reread_only_when_it_declares_it(self):
        d = self.dialogue()
        spam = d.factory.spam
        rereads = []
        spam.store.greylist.reread = lambda: rereads.append("local")
        spam.reread()
        self.assertEqual(rereads, ["local"])
        spam.store = RemoteLike()
        spam.reread()
        self.assertEqual(spam.store.rereads, 0)


class QueueWakeUp(Case):
    def test_the_runner_listens_to_the_store_while_it_runs(self):
        d = self.dialogue()
        root = d.factory.root
        runner = queue.QueueRunner(root, d.factory.settings, None, None, d.clock, once=False)
        runner.startService()
        self.assertIn(runner.wake, root.enqueued)
        runner.stopService()
        self.assertNotIn(runner.wake, root.enqueued)
