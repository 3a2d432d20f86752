"""Outside testing of issue 13's result: mail loops, addresses in the local
mailbox, folding of added fields, long headers and obsolete field names."""

import email
import email.policy
import email.utils
import mailbox
import os
import smtplib
import socket
import time
from email.headerregistry import Address

import pytest
from hypothesis import given, settings, strategies as st

from upasmail import convert, local, pipemsg, replies

from test_local_delivery import GO, SENT, Case
from test_rfc822 import stream
from test_twistd import dns_port, server  # noqa: F401 (fixtures)

HOPS = "554 " + replies.TOO_MANY_HOPS


def one_address(text):
    """``text`` is exactly one RFC 5322 addr-spec, by every parser we use."""
    assert Address(addr_spec=text).addr_spec
    msg = email.message_from_string("From: %s\n\n" % text, policy=email.policy.default)
    assert len(msg["From"].addresses) == 1 and not msg["From"].defects, text
    assert len(email.utils.getaddresses([text])) == 1, text


def parsed(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


class MboxCase(Case):
    def copies(self, user="bob"):
        """Each stored copy as bytes, with its ``From `` line."""
        box = mailbox.mbox(os.path.join(self.root, "box", user, "mbox"), create=False)
        return [(m.get_from(), parsed(m.as_bytes())) for m in box]

    def header(self, user="bob"):
        with open(os.path.join(self.root, "box", user, "mbox"), "rb") as f:
            return f.read().decode().split("\n\n")[0]

    def spooled(self):
        return os.listdir(os.path.join(self.root, "tmp"))


def received(n):
    return tuple("Received: from h%d.example by h%d.example; Mon, 1 Jan 2024 00:00:00 +0000"
                 % (i, i + 1) for i in range(n))


# Item 1: mail loops

def test_hop_count_includes_ours_and_delivered_to():
    s, data = stream([*map(str.encode, received(31)), b"", b"x"], hop_limit=32)
    assert s.error is None and data.count(b"Received:") == 32
    s, data = stream([*map(str.encode, received(32)), b"", b"x"], hop_limit=32)
    assert s.error.reply == replies.TOO_MANY_HOPS and data == b""
    s, data = stream([*map(str.encode, received(30)), b"Delivered-To: a@b.example",
                      b"DELIVERED-TO : c@d.example", b"", b"x"], hop_limit=32)
    assert s.error.reply == replies.TOO_MANY_HOPS and data == b""


def test_hops_past_upas_16k_are_counted():
    filler = [b"X-Filler: " + b"f" * 1000] * 17
    s, _ = stream([*filler, *map(str.encode, received(40)), b"", b"x"], hop_limit=32)
    assert s.error is not None


class LoopTests(MboxCase):
    def test_too_many_hops_is_refused_after_data_and_nothing_stored(self):
        d = self.dialogue(hop_limit=5)
        d.send("HELO h.sender.net", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob>")
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send(*received(5), "Subject: loop", "", "x", "."), [HOPS])
        self.assertFalse(os.path.exists(os.path.join(self.root, "box", "bob", "mbox")))
        self.assertEqual(self.spooled(), [])
        self.assertEqual(d.proto.session.rejects, 1)
        # the session goes on, and one hop fewer is delivered
        d.send("MAIL FROM:<alice@example.org>", "RCPT TO:<bob>", "DATA")
        self.assertEqual(d.send(*received(3), "Subject: fine", "", "x", "."), [SENT])
        self.assertEqual(len(self.copies()), 1)

    def test_delivered_to_naming_a_recipient_is_a_forwarding_loop(self):
        d = self.dialogue(mailboxes=("bob", "carol"))
        d.send("HELO h.sender.net", "MAIL FROM:<alice@example.org>", "RCPT TO:<Bob>")
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send("Delivered-To: bob@GNOT.example.org", "", "x", "."),
                         ["554 " + replies.FORWARDING_LOOP.format(addr="Bob@gnot.example.org")])
        self.assertFalse(os.path.exists(os.path.join(self.root, "box", "bob", "mbox")))
        # someone else's Delivered-To is no loop here
        d.send("MAIL FROM:<alice@example.org>", "RCPT TO:<carol>", "DATA")
        self.assertEqual(d.send("Delivered-To: bob@gnot.example.org", "", "x", "."), [SENT])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_forwarding_loop_through_a_real_server_stops(server):
    """The outside tester's loop: an alias to a remote address, the smarthost is us."""
    port = free_port()
    s = server("--listen", "tcp:%d:interface=127.0.0.1" % port,
               "--smarthost", "tcp!127.0.0.1!%d" % port, "--hop-limit", "8",
               "--tarpit-unit", "0")
    os.makedirs(os.path.join(s.root, "lib"))
    with open(os.path.join(s.root, "lib", "aliases"), "w") as f:
        f.write("lp: lp@other.example\n")
    with smtplib.SMTP("127.0.0.1", port) as c:
        # a local sender, so that the bounce ends in a mailbox, not in the loop
        assert c.sendmail("carol", ["lp"], b"Subject: loop\r\n\r\nx\r\n") == {}
    s.wait_for("status=bounced (554 %s)" % replies.TOO_MANY_HOPS)
    s.wait_for("sender non-delivery notification: stored in the local mailbox of carol")
    queue = os.path.join(s.root, "queue")
    for _ in range(600):  # the bounced job leaves the queue: nothing is left to send
        if not [f for f in os.listdir(queue) if f.endswith(".env")]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the queue did not empty:\n" + s.output())
    # the client's copy (queued through the alias: orig_to=lp) and 7 more make
    # 8 Received: fields; the copy with a 9th was refused
    assert s.output().count("relay=queue status=queued") == 8
    assert s.output().count("orig_to=lp relay=queue status=queued") == 1
    [bounce] = mailbox.mbox(os.path.join(s.root, "box", "carol", "mbox"))
    assert replies.TOO_MANY_HOPS in bounce.as_string()


# Item 2: one valid addr-spec in the mailbox

@pytest.mark.parametrize("path, want", [
    ('x.example!"a!b"', '"a!b"@x.example'),
    ("!bob", "bob@gnot.example.org"),
    ("vm!vm!bob", "bob@vm"),
    ("a.example!b.example!carol", "carol@b.example"),
    ("x!a@b", '"a@b"@x'),
    ("x.example!a b", '"a b"@x.example'),
    ('x.example!a"b\\', '"a\\"b\\\\"@x.example'),
    ("a b!c", '"a b!c"@gnot.example.org'),
    ("x.example!", '""@x.example'),
    ("[::1]!al", "al@[IPv6:::1]"),
])
def test_at_form_gives_one_addr_spec(path, want):
    assert local.at_form(path, "gnot.example.org") == want
    one_address(want)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_HOP = st.one_of(st.just(""), st.builds(".".join, st.lists(_LABEL, min_size=1, max_size=3)),
                 st.ip_addresses().map(str), st.ip_addresses(v=4).map("[{}]".format),
                 st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8))
_USER = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(_HOP, max_size=4), _USER)
def test_at_form_always_one_valid_address(hops, user):
    path = "!".join(hops + [user])
    result = local.at_form(path, "gnot.example.org")
    if path == "/dev/null":
        assert result == ""
        return
    one_address(result)
    assert "!" not in result.rsplit("@", 1)[1]


class MboxAddressTests(MboxCase):
    def deliver_from(self, sender, rcpt="bob", header=("Subject: hi",), peer=None):
        d = self.dialogue(peer=peer)
        d.send("HELO h.sender.net", "MAIL FROM:<%s>" % sender)
        self.assertTrue(d.send("RCPT TO:<%s>" % rcpt)[0].startswith("250 "))
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send(*header, "", "body", "."), [SENT])
        [(envelope, msg)] = self.copies()
        return envelope.split(" ")[0], msg

    def test_quoted_bang_sender(self):
        envelope, msg = self.deliver_from('"a!b"@x.example')
        self.assertEqual(envelope, '"a!b"@x.example')
        self.assertEqual(msg["Return-Path"], '<"a!b"@x.example>')
        [a] = msg["From"].addresses
        self.assertEqual((a.username, a.domain), ("a!b", "x.example"))

    def test_empty_first_hop(self):
        envelope, msg = self.deliver_from("!alice", rcpt="!bob")
        self.assertEqual(envelope, "alice@gnot.example.org")
        self.assertEqual(msg["Return-Path"], "<alice@gnot.example.org>")
        self.assertEqual(msg["From"], "alice@gnot.example.org")
        self.assertEqual(msg["To"], "bob@gnot.example.org")

    def test_routes_are_dropped(self):
        _, msg = self.deliver_from("a.example!b.example!carol", rcpt="vm!vm!bob")
        self.assertEqual(msg["From"], "carol@b.example")
        self.assertEqual(msg["To"], "bob@vm")
        self.assertEqual(len(email.utils.getaddresses([str(msg["To"])])), 1)

    def test_bang_header_addresses_are_not_mixed(self):
        _, msg = self.deliver_from("alice@example.org", header=(
            "From: vm!alice", 'Reply-To: "Al" <vm!alice>', "To: bob, x.example!y!carol"))
        self.assertEqual(msg["From"], "alice@vm")
        self.assertEqual(msg["Reply-To"].addresses[0].addr_spec, "alice@vm")
        self.assertEqual([a.addr_spec for a in msg["To"].addresses],
                         ["bob@h.sender.net", "carol@y"])

    def test_trusted_bare_header_address_is_ours(self):
        envelope, msg = self.deliver_from("alice", header=("From: alice", "Subject: s"),
                                          peer="127.0.0.1")
        self.assertEqual(envelope, "alice@gnot.example.org")
        self.assertEqual(msg["From"], "alice@gnot.example.org")

    def test_untrusted_bare_header_address_keeps_helo(self):
        _, msg = self.deliver_from("alice@example.org", header=("From: alice",))
        self.assertEqual(msg["From"], "alice@h.sender.net")


def test_mailer_stream_keeps_upas_addresses():
    _, data = stream([b"From: vm!alice", b"", b"x"], recipients=["vm!vm!bob"])
    assert b"\nFrom: vm!alice@h.example\n" in data and b"\nTo: vm!vm!bob\n" in data


# Item 3: added fields folded

def test_upas_field_folded_only_past_998():
    short = ["a.example!user%d" % i for i in range(10)]
    assert pipemsg.upas_field("To", short) == "To: " + ", ".join(short) + "\n"
    many = ["a.example!user%d" % i for i in range(80)]
    folded = pipemsg.upas_field("To", many)
    assert max(map(len, folded.split("\n"))) <= 78
    assert folded.replace("\n", "") == "To: " + ", ".join(many)


class FoldTests(MboxCase):
    def test_41_recipients_fold_in_mbox_and_queue(self):
        rcpts = ["bob"] + ["user%02d@far%02d.example" % (i, i) for i in range(40)]
        d = self.dialogue(peer="127.0.0.1")  # trusted: may relay
        d.send("HELO a.example", "MAIL FROM:<alice@example.org>")
        for r in rcpts:
            self.assertTrue(d.send("RCPT TO:<%s>" % r)[0].startswith("250 "), r)
        self.assertEqual(d.send("DATA"), [GO])
        self.assertEqual(d.send("Subject: many", "", "x", "."), [SENT])
        header = self.header()
        self.assertLessEqual(max(map(len, header.split("\n"))), 78)
        [(_, msg)] = self.copies()
        self.assertEqual(len(msg["To"].addresses), 41)
        queue = os.path.join(self.root, "queue")
        [job] = [f for f in os.listdir(queue) if f.endswith(".msg")]
        with open(os.path.join(queue, job), "rb") as f:
            head = f.read().split(b"\n\n")[0]
            self.assertLessEqual(max(map(len, head.split(b"\n"))), 78)
            # and so on the wire to the next server
            f.seek(0)
            wire = b"".join(convert.OutboundMessage(f, "example.org!alice",
                                                    "gnot.example.org").wire("x"))
        self.assertLessEqual(max(map(len, wire.split(b"\r\n"))), 78)


# Item 4: long headers, obsolete field names

class HeaderScanTests(MboxCase):
    def test_message_id_past_16k_is_seen(self):
        d = self.dialogue()
        filler = ["X-Filler: " + "f" * 1000] * 17
        self.deliver(d, "bob", header=(*filler, "Message-ID: <late@x.example>",
                                       "Date: Mon, 1 Jan 2024 00:00:00 +0000"))
        [(_, msg)] = self.copies()
        self.assertEqual(msg.get_all("Message-ID"), ["<late@x.example>"])
        self.assertEqual(len(msg.get_all("Date")), 1)

    def test_obsolete_date_with_space_before_colon(self):
        d = self.dialogue()
        self.deliver(d, "bob", header=("DATE : Mon, 1 Jan 2024 00:00:00 +0000",
                                       "Subject: s"))
        self.assertNotIn("\nDate:", self.header())
