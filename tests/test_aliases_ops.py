"""Aliases for operations (issue 15): postmaster, abuse and root reach a
person; a double bounce follows postmaster's alias, to a mailbox or to a
remote address; an alias to a remote address is queued and sent; the
shipped ``examples/aliases`` and the documented example are valid and do
what their comments say."""

import os
import re
import shutil

from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from upasmail import local
from upasmail.session import Transaction

from test_local_delivery import Case as LocalCase
from test_queue import Case as QueueCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "aliases")


def write_aliases(root, text):
    lib = os.path.join(root, "lib")
    os.makedirs(lib, exist_ok=True)
    with open(os.path.join(lib, "aliases"), "w") as f:
        f.write(text)


class DoubleBounceTests(QueueCase):
    """A bounce that cannot be returned: the postmaster's copy goes where
    postmaster's alias says, not to an unread ``box/postmaster``."""

    REFUSE_BOTH = {"RCPT TO:<bob@a.example>": "550 5.1.1 bob: no such user",
                   "RCPT TO:<zed@far.example>": "550 5.1.1 zed: gone"}

    @defer.inlineCallbacks
    def test_a_double_bounce_reaches_the_user_postmaster_is_aliased_to(self):
        write_aliases(self.root.root, "postmaster: alice\n")
        s = self.sink(replies=self.REFUSE_BOTH)
        self.enqueue(sender="far.example!zed")
        r = self.runner()
        yield self.until(lambda: len(s.sessions) == 2 and s.sessions[1].commands[2:3])
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [copy] = self.mbox("alice")
        self.assertEqual(copy["Subject"], "Postmaster Copy: Undelivered Mail Returned to Sender")
        self.assertTrue(copy["Return-Path"].startswith("<double-bounce@"))
        self.assertEqual(copy["Delivered-To"], "alice@localhost")
        self.assertIn("Final-Recipient: rfc822; zed@far.example", copy.as_string())
        self.assertFalse(os.path.exists(os.path.join(self.root.boxes, "postmaster")))

    @defer.inlineCallbacks
    def test_a_double_bounce_to_a_remote_postmaster_is_queued_and_sent(self):
        write_aliases(self.root.root, "postmaster: pm@b.example\n")
        s = self.sink(replies=self.REFUSE_BOTH)
        pm = self.sink("127.0.0.3", port=self.port)
        sent = pm.seen(".")
        self.enqueue(sender="far.example!zed")
        r = self.runner()
        # the runner's timers are on a task.Clock: let it and the network run
        yield self.until(lambda: sent.called)
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [session] = pm.sessions
        self.assertEqual(session.commands[1:3], ["MAIL FROM:<double-bounce@gnot.example.org>",
                                                 "RCPT TO:<pm@b.example>"])
        self.assertIn(b"Subject: Postmaster Copy: Undelivered Mail", session.data)
        self.assertEqual(len(s.sessions), 2)  # the message, then the bounce to zed
        self.assertFalse(os.path.exists(os.path.join(self.root.boxes, "postmaster")))


class RemoteAliasTests(QueueCase):
    @defer.inlineCallbacks
    def test_an_alias_to_a_remote_address_is_queued_and_sent_with_the_original_sender(self):
        write_aliases(self.root.root, "team: alice, carol@a.example\n")
        s = self.sink()
        path, f = self.root.open_spool()
        with f:
            f.write(b"From example.org!ann Sun Nov 29 23:00:00 +0000 2026 remote from \n"
                    b"Subject: for the team\n\nhello\n")
        tx = Transaction(sender="example.org!ann", recipients=("team",), local=("team",),
                         remote=(), peer="127.0.0.2", helo="h")
        with capturedLogs() as events:
            self.successResultOf(self.root.deliver(path, tx))
        os.unlink(path)
        [qid] = self.jobs()
        self.assertEqual(self.root.queue_id(path), qid)
        self.assertEqual(len(self.mbox("alice")), 1)  # the local target's copy at once
        r = self.runner()
        yield s.seen(".")
        yield self.settle(r)
        self.assertEqual(self.jobs(), [])
        [session] = s.sessions
        self.assertEqual(session.commands[1:3], ["MAIL FROM:<ann@example.org>",
                                                 "RCPT TO:<carol@a.example>"])
        self.assertIn(b"Subject: for the team\r\n", session.data)
        self.assertEqual([formatEvent(e) for e in events if "warn" in str(e["log_level"])], [])


class AbuseTests(LocalCase):
    """RFC 2142: ``abuse`` exists like ``postmaster``; without an alias or a
    mailbox of its own it reaches postmaster's person."""

    def test_abuse_is_accepted_and_reaches_postmasters_alias(self):
        self.write("aliases", "postmaster: alice\n")
        d = self.dialogue(mailboxes=("alice",))
        with capturedLogs() as events:
            self.deliver(d, "Abuse", "abuse@gnot.example.org")
        self.assertEqual(self.boxes(), ["alice"])  # no box/abuse, no box/postmaster
        [msg] = self.mbox("alice")
        self.assertEqual(msg["Delivered-To"], "alice@gnot.example.org")
        # the built-in route, not the "no mailbox" fallback for a vanished user
        self.assertFalse([e for e in events if "no mailbox" in formatEvent(e)])

    def test_without_any_alias_abuse_goes_to_box_postmaster(self):
        d = self.dialogue(mailboxes=())
        self.deliver(d, "abuse")
        self.assertEqual(self.boxes(), ["postmaster"])

    def test_an_alias_or_a_mailbox_of_its_own_wins(self):
        self.write("aliases", "postmaster: alice\nabuse: carol\n")
        d = self.dialogue(mailboxes=("alice", "carol"))
        self.deliver(d, "abuse")
        self.assertEqual((len(self.mbox("carol")), os.path.exists(
            os.path.join(self.root, "box", "alice", "mbox"))), (1, False))
        self.write("aliases", "postmaster: alice\n")
        os.makedirs(os.path.join(self.root, "box", "abuse"))
        d = self.dialogue(mailboxes=())
        self.deliver(d, "abuse")
        self.assertEqual(len(self.mbox("abuse")), 1)

    def test_an_alias_to_abuse_reaches_postmasters_person_too(self):
        self.write("aliases", "postmaster: alice\nsecurity: abuse\n")
        d = self.dialogue(mailboxes=("alice",))
        with capturedLogs() as events:
            self.deliver(d, "security")
        self.assertEqual(len(self.mbox("alice")), 1)
        self.assertFalse([e for e in events if "no mailbox" in formatEvent(e)])

    def test_other_rfc2142_names_are_ordinary(self):
        d = self.dialogue()
        self.assertEqual(self.rcpt(d, "hostmaster", "webmaster"),
                         ["550 5.1.1 hostmaster ... user unknown",
                          "550 5.1.1 webmaster ... user unknown"])


def config_example():
    """The aliases block in docs/configuration.rst, "Local users and aliases"."""
    with open(os.path.join(ROOT, "docs", "configuration.rst"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("``<lib>/aliases`` has the sendmail/Postfix aliases(5) form::", 1)[1]
    lines = re.match(r"\n\n((?:    .*\n|\n)+)", block).group(1)
    return "".join(line[4:] + "\n" for line in lines.splitlines())


class ExampleFileTests(LocalCase):
    def install(self, path):
        os.makedirs(os.path.join(self.root, "lib"), exist_ok=True)
        shutil.copy(path, os.path.join(self.root, "lib", "aliases"))

    def test_the_documented_example_parses(self):
        table = local.parse_aliases(config_example())
        self.assertEqual(table["team"], ("alice", "carol@example.net"))

    def test_examples_aliases_sends_the_role_names_to_one_person(self):
        with open(EXAMPLE, encoding="utf-8") as f:
            table = local.parse_aliases(f.read(), EXAMPLE)
        for name in ("postmaster", "abuse", "root", "mailer-daemon"):
            self.assertIn(name, table)
        self.install(EXAMPLE)
        # the person the file names (its comments say: make her mailbox)
        d = self.dialogue(mailboxes=("alice",))
        self.deliver(d, "postmaster", "abuse", "root", "MAILER-DAEMON", "hostmaster")
        self.assertEqual(self.boxes(), ["alice"])
        self.assertEqual(len(self.mbox("alice")), 1)
        # a list: one copy here, one queued for the address elsewhere
        d = self.dialogue(mailboxes=("alice", "bob"))
        self.deliver(d, "sales")
        self.assertEqual(len(self.mbox("bob")), 1)
        self.assertEqual(len([f for f in os.listdir(os.path.join(self.root, "queue"))
                              if f.endswith(".env")]), 1)
