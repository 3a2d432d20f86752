"""Local delivery: which users exist (issue 13 item 18) and the headers a
mailbox copy gets (item 16)."""

import json
import mailbox
import os
import shutil
import signal
import smtplib
import sys
import tempfile

import pytest

from twisted.internet import reactor, task
from twisted.trial import unittest

from upasmail import local, store, testing
from upasmail.conf import ConfigError
from upasmail.session import Transaction

from test_mailer import SCRIPT
from test_queue import Case as QueueCase
from test_twistd import dns_port, server  # noqa: F401 (fixtures)

GO = "354 Input message; end with <CRLF>.<CRLF>"
SENT = "250 2.5.0 sent"


class Case(unittest.TestCase):
    peer = "127.0.0.2"

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="upasmail-local-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def dialogue(self, peer=None, mailboxes=("bob",), **kw):
        s = testing.make_settings("", root=self.root, **kw)
        d = testing.Dialogue(s, peer=peer or self.peer, mailboxes=mailboxes)
        self.addCleanup(d.close)
        return d

    def write(self, name, text):
        path = os.path.join(self.root, "lib", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def boxes(self):
        return sorted(os.listdir(os.path.join(self.root, "box")))

    def mbox(self, user):
        return list(mailbox.mbox(os.path.join(self.root, "box", user, "mbox"), create=False))

    def rcpt(self, d, *rcpts, sender="alice@example.org"):
        d.send("HELO h.sender.net", "MAIL FROM:<%s>" % sender)
        return [d.send("RCPT TO:<%s>" % r)[0] for r in rcpts]

    def deliver(self, d, *rcpts, header=("Subject: hi",), sender="alice@example.org"):
        for reply in self.rcpt(d, *rcpts, sender=sender):
            self.assertTrue(reply.startswith("250 2.0.0 receiver is "), reply)
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send(*header, "", "body", "."), [SENT])


class WhoExistsTests(Case):
    """Item 18: only users that exist get mail; unknown ones get 550 at RCPT."""

    def test_unknown_user_is_refused_and_gets_no_directory(self):
        d = self.dialogue()
        self.assertEqual(self.rcpt(d, "nosuch", "nosuch@gnot.example.org", "bob"),
                         ["550 5.1.1 nosuch ... user unknown",
                          "550 5.1.1 gnot.example.org!nosuch ... user unknown",
                          "250 2.0.0 receiver is bob"])
        self.assertEqual(self.boxes(), ["bob"])
        # the session goes on and the known recipient gets the message
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send("Subject: s", "", "x", "."), [SENT])
        self.assertEqual(self.boxes(), ["bob"])

    def test_trusted_peers_cannot_make_mailboxes_either(self):
        d = self.dialogue(peer="127.0.0.1")
        self.assertEqual(self.rcpt(d, "dict1", "dict2"),
                         ["550 5.1.1 dict1 ... user unknown", "550 5.1.1 dict2 ... user unknown"])
        self.assertEqual(self.boxes(), ["bob"])

    def test_names_fold_to_lower_case(self):
        d = self.dialogue()
        self.assertEqual(self.rcpt(d, "BOB"), ["250 2.0.0 receiver is BOB"])
        d.send("DATA", "Subject: s", "", "x", ".")
        self.assertEqual(len(self.mbox("bob")), 1)
        self.assertEqual(self.boxes(), ["bob"])

    def test_users_file_makes_a_user_and_the_box_appears_on_delivery(self):
        self.write("users", "# our people\ncarol\n  Dave  # trailing comment\n")
        d = self.dialogue()
        self.deliver(d, "carol", "dave")
        self.assertEqual(self.boxes(), ["bob", "carol", "dave"])
        self.assertEqual(len(self.mbox("carol")), 1)
        self.assertEqual(len(self.mbox("dave")), 1)

    def test_postmaster_is_always_accepted_and_its_box_made(self):
        d = self.dialogue(mailboxes=())
        self.assertEqual(self.rcpt(d, "PostMaster", "postmaster@gnot.example.org"),
                         ["250 2.0.0 receiver is PostMaster",
                          "250 2.0.0 receiver is gnot.example.org!postmaster"])
        d.send("DATA", "Subject: s", "", "x", ".")
        self.assertEqual(self.boxes(), ["postmaster"])
        self.assertEqual(len(self.mbox("postmaster")), 1)  # one copy per mailbox

    def test_postmaster_alias(self):
        self.write("aliases", "postmaster: root\n")
        d = self.dialogue(mailboxes=("root",))
        self.deliver(d, "postmaster")
        self.assertEqual(self.boxes(), ["root"])
        [msg] = self.mbox("root")
        self.assertEqual(msg["Delivered-To"], "root@gnot.example.org")

    def test_aliases_local_and_remote_targets(self):
        self.write("aliases", "# comment\nAlice.Smith: alice\nteam: alice,\n"
                              "  bob@gnot.example.org, carol@example.net\n"
                              "bob: bob, example.com!bob\n")
        d = self.dialogue(mailboxes=("alice", "bob"))
        self.deliver(d, "alice.smith", "team")
        self.assertEqual(self.boxes(), ["alice", "bob"])
        self.assertEqual(len(self.mbox("alice")), 1)
        self.assertEqual(len(self.mbox("bob")), 1)
        [env] = [f for f in os.listdir(os.path.join(self.root, "queue")) if f.endswith(".env")]
        with open(os.path.join(self.root, "queue", env)) as f:
            record = json.load(f)
        self.assertEqual(sorted(record["recipients"]), ["example.com!bob", "example.net!carol"])
        self.assertEqual(record["sender"], "example.org!alice")

    def test_aliases_file_is_read_again_when_it_changes(self):
        d = self.dialogue()
        self.assertEqual(self.rcpt(d, "sales"), ["550 5.1.1 sales ... user unknown"])
        self.write("aliases", "sales: bob\n")
        self.assertEqual(d.send("RCPT TO:<sales>"), ["250 2.0.0 receiver is sales"])
        d.send("DATA", "Subject: s", "", "x", ".")
        self.assertEqual(len(self.mbox("bob")), 1)

    def test_a_broken_aliases_file_keeps_the_last_good_one(self):
        self.write("aliases", "sales: bob\n")
        d = self.dialogue()
        self.assertEqual(self.rcpt(d, "sales"), ["250 2.0.0 receiver is sales"])
        self.write("aliases", "sales: |/bin/sh -c evil\n")
        self.assertEqual(d.send("RCPT TO:<sales>"), ["250 2.0.0 receiver is sales"])

    def test_an_alias_never_makes_an_unsafe_mailbox(self):
        self.write("aliases", "odd/name: odd/name\n")
        d = self.dialogue(mailboxes=())
        self.deliver(d, "odd/name")
        self.assertEqual(self.boxes(), ["postmaster"])

    def test_with_a_mailer_the_mailer_decides(self):
        d = self.dialogue(mailer="/bin/true", mailboxes=())
        self.assertEqual(self.rcpt(d, "anyone"), ["250 2.0.0 receiver is anyone"])
        self.assertFalse(os.path.exists(os.path.join(self.root, "box", "anyone")))

    def test_store_sends_mail_for_a_vanished_user_to_postmaster(self):
        root = store.MailRoot(os.path.join(self.root, "r"), testing.run_now, task.Clock(),
                              domain="gnot.example.org")
        root.prepare()
        path, f = root.open_spool()
        with f:
            f.write(b"From /dev/null Sun Nov 29 19:00:00 +0000 2026 remote from \n"
                    b"Subject: b\n\nx\n")
        tx = Transaction("/dev/null", ("ghost",), ("ghost",), (), "", "")
        self.successResultOf(root.deliver(path, tx))
        self.assertEqual(sorted(os.listdir(root.boxes)), ["postmaster"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class AliasesFileTests(unittest.TestCase):
    def test_format(self):
        table = local.parse_aliases("# c\nA: b, c@d.example # why\n\nlist: x,\n\ty, z\n")
        self.assertEqual(table, {"a": ("b", "c@d.example"), "list": ("x", "y", "z")})

    def test_errors_name_file_and_line(self):
        for text, line in (("ok: b\nno colon here\n", 2), ("a:\n", 1), ("a: |cmd\n", 1),
                           ("a: /var/mail/x\n", 1), ("a: :include:/etc/list\n", 1),
                           ("  b\n", 1)):
            with self.assertRaises(ConfigError) as e:
                local.parse_aliases(text, "lib/aliases")
            self.assertTrue(str(e.exception).startswith("lib/aliases:%d: " % line), text)

    def test_expansion_stops_at_loops_and_self(self):
        def is_local(path):
            return None if "!" in path else path

        users, remote = local.expand("a", {"a": ("b",), "b": ("a", "c@x.example")}, is_local)
        self.assertEqual((users, remote), (("a",), ("x.example!c",)))
        self.assertEqual(local.expand("bob", {"bob": ("bob", "c@x.example")}, is_local),
                         (("bob",), ("x.example!c",)))


class AddressFormTests(unittest.TestCase):
    def test_at_form_never_mixes(self):
        for path, want in (("example.org!alice", "alice@example.org"),
                           ("vm!alice", "alice@vm"),
                           ("alice", "alice@gnot.example.org"),
                           ("127.0.0.1!alice", "alice@[127.0.0.1]"),
                           ("[127.0.0.1]!alice", "alice@[127.0.0.1]"),
                           ("::1!alice", "alice@[IPv6:::1]"),
                           ("a.b!c.d!bob", "bob@c.d"),
                           ("alice@example.org", "alice@example.org"),
                           ("/dev/null", "")):
            self.assertEqual(local.at_form(path, "gnot.example.org"), want)


class MailboxHeaderTests(Case):
    """Item 16: RFC 5322 addresses, Return-Path, Delivered-To, Date, Message-ID."""

    def raw_mbox(self, user="bob"):
        with open(os.path.join(self.root, "box", user, "mbox"), "rb") as f:
            return f.read().decode()

    def test_added_fields_are_in_at_form(self):
        d = self.dialogue()
        self.deliver(d, "bob")
        text = self.raw_mbox()
        lines = text.split("\n")
        self.assertRegex(lines[0], r"^From alice@example\.org \w{3} \w{3} [ \d]\d ")
        self.assertEqual(lines[1:3], ["Return-Path: <alice@example.org>",
                                      "Delivered-To: bob@gnot.example.org"])
        self.assertTrue(lines[3].startswith("Received: from h.sender.net ([127.0.0.2]) by gnot;"))
        [msg] = self.mbox("bob")
        self.assertEqual(msg["From"], "alice@example.org")
        self.assertEqual(msg["To"], "bob@gnot.example.org")
        self.assertRegex(msg["Date"], r"^\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$")
        self.assertRegex(msg["Message-ID"], r"^<\d+\.[0-9a-f]{12}@gnot\.example\.org>$")
        self.assertNotIn("!", text.split("\n\n")[0])

    def test_date_and_message_id_are_kept_when_present(self):
        d = self.dialogue()
        self.deliver(d, "bob", header=("Date: Mon, 1 Jan 2024 00:00:00 +0000",
                                       "Message-ID: <x@y.example>", "From: a@b.example",
                                       "To: c@d.example"))
        [msg] = self.mbox("bob")
        self.assertEqual(msg.get_all("Date"), ["Mon, 1 Jan 2024 00:00:00 +0000"])
        self.assertEqual(msg.get_all("Message-ID"), ["<x@y.example>"])
        self.assertEqual(msg.get_all("From"), ["a@b.example"])

    def test_each_mailbox_has_its_own_delivered_to(self):
        d = self.dialogue(mailboxes=("bob", "carol"))
        self.deliver(d, "bob", "Carol@gnot.example.org")
        self.assertEqual(self.mbox("bob")[0]["Delivered-To"], "bob@gnot.example.org")
        self.assertEqual(self.mbox("carol")[0]["Delivered-To"], "carol@gnot.example.org")
        self.assertEqual(self.mbox("carol")[0]["To"],
                         "bob@gnot.example.org, Carol@gnot.example.org")

    def test_bare_sender_from_a_trusted_peer_is_ours_in_mbox_and_queue(self):
        d = self.dialogue(peer="127.0.0.1")
        d.send("HELO vm")  # dotless: upas takes the peer's address as the name
        self.assertEqual(d.send("MAIL FROM:<alice>"), ["250 2.0.0 sender is 127.0.0.1!alice"])
        d.send("RCPT TO:<bob>", "RCPT TO:<x@far.example>", "DATA")
        self.assertEqual(d.send("Subject: s", "", "x", "."), [SENT])
        [msg] = self.mbox("bob")
        self.assertEqual(msg["Return-Path"], "<alice@gnot.example.org>")
        self.assertEqual(msg["From"], "alice@gnot.example.org")
        self.assertTrue(msg.get_from().startswith("alice@gnot.example.org "))
        queue = os.path.join(self.root, "queue")
        [env] = [f for f in os.listdir(queue) if f.endswith(".env")]
        with open(os.path.join(queue, env)) as f:
            self.assertEqual(json.load(f)["sender"], "gnot.example.org!alice")

    def test_bare_sender_from_an_untrusted_peer_keeps_its_helo_name(self):
        d = self.dialogue()
        self.deliver(d, "bob", sender="alice")
        [msg] = self.mbox("bob")
        self.assertEqual(msg["Return-Path"], "<alice@h.sender.net>")

    def test_null_sender(self):
        d = self.dialogue()
        self.deliver(d, "bob", sender="")
        [msg] = self.mbox("bob")
        self.assertTrue(msg.get_from().startswith("MAILER-DAEMON "))
        self.assertEqual(msg["Return-Path"], "<>")
        self.assertEqual(msg["From"], "MAILER-DAEMON@gnot.example.org")


class MailerStreamTests(unittest.TestCase):
    """-m keeps upas's stream exactly: bang form, no Date/Message-ID, HELO sender."""

    async def test_mailer_gets_upas_stream(self):
        out = tempfile.mkdtemp(prefix="upasmail-local-m-")
        self.addCleanup(shutil.rmtree, out, True)
        script = os.path.join(out, "fakemail")
        with open(script, "w") as f:
            f.write(SCRIPT.format(python=sys.executable, out=out, stderr="", code=0))
        os.chmod(script, 0o700)
        s = testing.make_settings("", root=os.path.join(out, "root"), mailer=script)
        d = testing.Dialogue(s, peer="127.0.0.1", reactor=reactor)
        self.addCleanup(d.close)
        d.send("HELO vm", "MAIL FROM:<alice>", "RCPT TO:<nosuch>", "DATA")
        self.assertEqual(await d.sendAndWait("Subject: hi", "", "x", "."), [SENT])
        with open(os.path.join(out, "stdin"), "rb") as f:
            lines = f.read().split(b"\n")
        self.assertTrue(lines[0].startswith(b"From 127.0.0.1!alice "))
        self.assertEqual(lines[2:5], [b"From: 127.0.0.1!alice", b"To: nosuch", b"Subject: hi"])


class BounceAddressTests(QueueCase):
    async def test_bounce_to_a_dotless_sender_is_not_mixed(self):
        s = self.sink(replies={"RCPT": "550 5.1.1 no such user"})
        self.enqueue(["a.example!eve"], sender="vm!alice")
        r = self.runner()
        await s.seen("RCPT")
        await self.settle(r)
        [bounce] = self.mbox("alice")  # vm is dotless, so ours: the bounce is local
        self.assertEqual(bounce["To"], "<alice@vm>")


def test_readme_session_with_a_real_server(server):
    """The README's steps: unknown until ``mkdir -p mail/box/bob``, then RFC 5322 headers."""
    s = server("--tarpit-unit", "0", mailboxes=())  # the 550 counts for the tarpit
    msg = b"Subject: hello\r\n\r\nHi Bob.\r\n"
    with smtplib.SMTP("127.0.0.1", s.port) as c:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            c.sendmail("alice@example.org", ["bob"], msg)
        assert e.value.recipients == {"bob": (550, b"5.1.1 bob ... user unknown")}
        assert not os.path.exists(os.path.join(s.root, "box", "bob"))
        os.makedirs(os.path.join(s.root, "box", "bob"))
        assert c.sendmail("alice", ["bob"], msg) == {}
    [m] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    assert m.get_from().startswith("alice@gnot.example.org ")
    assert m["Return-Path"] == "<alice@gnot.example.org>"
    assert m["Delivered-To"] == "bob@gnot.example.org"
    assert (m["From"], m["To"]) == ("alice@gnot.example.org", "bob@gnot.example.org")
    assert m["Date"] and m["Message-ID"].endswith("@gnot.example.org>")


def test_sighup_new_ourdomains_apply_to_alias_targets(server, tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("ourdomains a.example\n")
    s = server("--conf", str(conf), "--tarpit-unit", "0", "--no-queue-runner",
               mailboxes=("carol",))
    os.makedirs(os.path.join(s.root, "lib"))
    with open(os.path.join(s.root, "lib", "aliases"), "w") as f:
        f.write("team: carol@b.example\n")
    queue = os.path.join(s.root, "queue")
    mbox_path = os.path.join(s.root, "box", "carol", "mbox")

    def send():
        with smtplib.SMTP("127.0.0.1", s.port) as c:
            assert c.sendmail("alice@example.org", ["team"], b"Subject: t\r\n\r\nt\r\n") == {}

    send()
    assert len([f for f in os.listdir(queue) if f.endswith(".env")]) == 1  # b.example: remote
    assert not os.path.exists(mbox_path)
    conf.write_text("ourdomains a.example, b.example\n")
    s.proc.send_signal(signal.SIGHUP)
    s.wait_for("settings reloaded")
    send()
    assert len(mailbox.mbox(mbox_path)) == 1
