"""Local delivery defects an outside tester found after issue 13 was fixed:
unknown users however written, postmaster's alias for the fallback, ids on
store lines, broken aliases/users files, huge aliases, ASCII-only folding,
per-recipient log lines for aliases."""

import mailbox
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.logger import LogLevel, capturedLogs, formatEvent

from upasmail import mbox, testing
from upasmail.session import Transaction

from test_local_delivery import Case as LocalCase
from test_twistd import twistd

LOCAL_ERROR = "451 4.3.0 Error: local error"


def make_dialogue(root, aliases=None, users=None, mailboxes=("bob",)):
    lib = os.path.join(root, "lib")
    os.makedirs(lib, exist_ok=True)
    for name, text in (("aliases", aliases), ("users", users)):
        if text is not None:
            with open(os.path.join(lib, name), "w") as f:
                f.write(text)
    return testing.Dialogue(testing.make_settings("", root=root), peer="127.0.0.2",
                            mailboxes=mailboxes)


def critical(events):
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]


class Case(LocalCase):
    """test_local_delivery's helpers, with SMTPUTF8 and the lib files given."""

    def dialogue(self, **kw):
        d = make_dialogue(self.root, **kw)
        self.addCleanup(d.close)
        return d

    def rcpt(self, d, *rcpts, sender="x@y.example"):
        d.send("EHLO h.sender.net", "MAIL FROM:<%s> SMTPUTF8" % sender)
        return [d.send("RCPT TO:<%s>" % r)[0] for r in rcpts]


class UnknownUserTests(Case):
    """Item 1: every unknown local user gets 550 5.1.1, no traceback."""

    FORMS = ["nobody@[127.0.0.1]", '"no body"@[127.0.0.1]', "[127.0.0.1]!nobody",
             "@gnot.example.org:nobody@[127.0.0.1]", "ünïcode", "ünïcode@gnot.example.org"]

    def test_address_literals_and_utf8_names(self):
        with capturedLogs() as events:
            d = self.dialogue()
            replies = self.rcpt(d, *self.FORMS)
        for form, reply in zip(self.FORMS, replies):
            self.assertTrue(reply.startswith("550 5.1.1 ") and reply.endswith(
                " ... user unknown"), (form, reply))
        self.assertEqual(critical(events), [])


local_part = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"],
                                   blacklist_characters="<>\r\n"), min_size=1, max_size=20),
    st.sampled_from(["nobody", '"no body"', "bob", "postmaster", "ünïcode", "\u212aaren"]))
domain = st.sampled_from(["", "@[127.0.0.1]", "@gnot.example.org", "@GNOT.example.org",
                          "@[IPv6:::1]", "@far.example"])
route = st.sampled_from(["", "@vm.test:", "@a.example,@b.example:"])
bang = st.sampled_from(["", "[127.0.0.1]!", "gnot.example.org!", "a!b!"])
rcpt_form = st.builds(lambda r, b, l, dom: r + b + l + dom, route, bang, local_part, domain)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=150)
@given(st.lists(rcpt_form, min_size=1, max_size=5))
def test_no_rcpt_gives_a_local_error(forms):
    """Item 1, fuzzed: no RCPT form gets 451 "local error" or a logged traceback."""
    root = tempfile.mkdtemp(prefix="upasmail-fuzz2-")
    try:
        with capturedLogs() as events:
            d = make_dialogue(root)
            d.send("EHLO h.sender.net", "MAIL FROM:<x@y.example> SMTPUTF8")
            for form in forms:
                reply = d.send("RCPT TO:<%s>" % form)
                assert reply and not reply[0].startswith(LOCAL_ERROR), (form, reply)
            d.close()
        assert critical(events) == [], critical(events)
    finally:
        shutil.rmtree(root, True)


class PostmasterAliasTests(Case):
    """Item 2: the fallback to postmaster goes through postmaster's alias."""

    ALIASES = "postmaster: alice\nloop1: loop2\nloop2: loop1\nself: self, bob\n"

    def test_alias_loop_and_self_alias_reach_alice(self):
        d = self.dialogue(aliases=self.ALIASES, mailboxes=("bob", "alice"))
        self.deliver(d, "loop1", "self")
        self.assertEqual(self.boxes(), ["alice", "bob"])
        self.assertEqual(len(self.mbox("alice")), 1)
        self.assertEqual(len(self.mbox("bob")), 1)

    def test_bounce_to_a_local_sender_without_a_mailbox(self):
        d = self.dialogue(aliases=self.ALIASES, mailboxes=("alice",))
        path, spool = d.root.open_spool()
        with spool:
            spool.write(b"From MAILER-DAEMON Thu Jan  1 00:00:00 GMT 1970\nSubject: dsn\n\nx\n")
        tx = Transaction(sender="/dev/null", recipients=("ghost",), local=("ghost",),
                         remote=(), peer="", helo="")
        self.successResultOf(d.root.deliver(path, tx))
        self.assertEqual(self.boxes(), ["alice"])

    def test_postmasters_own_alias_looping_or_unknown_means_box_postmaster(self):
        for aliases in ("postmaster: pm\npm: postmaster\nloop1: loop1\n",
                        "postmaster: nosuch\nloop1: loop1\n",
                        "postmaster: bob, nosuch\nloop1: loop1\n"):
            root = tempfile.mkdtemp(dir=self.root)
            d = make_dialogue(root, aliases=aliases)
            self.deliver(d, "loop1")
            d.close()
            self.assertEqual(len(list(mailbox.mbox(os.path.join(root, "box", "postmaster",
                                                                "mbox")))), 1, aliases)


class StoreLogIdTests(Case):
    """Item 3: the store's lines name the session and the message."""

    def test_fallback_and_stale_lock_lines_carry_the_ids(self):
        with capturedLogs() as events:
            d = self.dialogue(aliases="loop1: loop2\nloop2: loop1\n")
            with open(os.path.join(self.root, "box", "bob", "mbox.lock"), "wb") as f:
                f.write(mbox.lock_header(999999, os.uname().nodename, "x"))
            self.deliver(d, "loop1", "bob")
        sid = d.proto.session.id
        lines = [formatEvent(e) for e in events
                 if "no mailbox for" in formatEvent(e) or "stale lock" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines)
        for line in lines:
            self.assertRegex(line, r"^%s: \d+\.[0-9a-f]{12}: " % sid)


class BrokenFileTests(Case):
    """Item 4: a broken aliases/users file never makes names permanently unknown."""

    def test_broken_aliases_without_a_good_version_is_a_temporary_refusal(self):
        d = self.dialogue(aliases="sales: bob\npostmaster: bob\n|bad\n")
        self.assertEqual(self.rcpt(d, "sales", "bob", "postmaster"), [
            "451 4.3.0 sales ... cannot read the aliases or users file; try again later",
            "250 2.0.0 receiver is bob", "250 2.0.0 receiver is postmaster"])

    def test_users_file_created_broken_after_start_likewise(self):
        d = self.dialogue(mailboxes=())
        with open(os.path.join(self.root, "lib", "users"), "wb") as f:
            f.write(b"carol\n\xff\n")
        self.assertEqual(self.rcpt(d, "carol", "postmaster"), [
            "451 4.3.0 carol ... cannot read the aliases or users file; try again later",
            "250 2.0.0 receiver is postmaster"])

    def test_a_broken_edit_keeps_the_version_read_at_start(self):
        d = self.dialogue(aliases="sales: bob\n")
        with open(os.path.join(self.root, "lib", "aliases"), "w") as f:
            f.write("sales: bob\n|bad and longer\n")
        self.assertEqual(self.rcpt(d, "sales", "nosuch"), [
            "250 2.0.0 receiver is sales", "550 5.1.1 nosuch ... user unknown"])


def test_broken_aliases_or_users_file_stops_startup(tmp_path):
    lib = tmp_path / "mail" / "lib"
    lib.mkdir(parents=True)
    for name, text in (("aliases", "sales: bob\n\n|bad\n"), ("users", b"bob\ncarol\n\xff\n")):
        path = lib / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        r = twistd("-n", "--pidfile=", "upas-smtpd", "--listen", "tcp:0:interface=127.0.0.1",
                   "--root", str(tmp_path / "mail"))
        assert r.returncode != 0
        out = (r.stdout + r.stderr).strip().splitlines()
        assert out == ["upas-smtpd: %s:3: " % path + out[0].split(":3: ", 1)[1]], out
        assert "Traceback" not in r.stdout + r.stderr
        path.unlink()


class HugeAliasTests(Case):
    """Item 5: an alias past the expansion limit is refused at RCPT."""

    def test_refused_at_rcpt_without_a_traceback(self):
        targets = ", ".join("u%d@far.example" % i for i in range(1001))
        with capturedLogs() as events:
            d = self.dialogue(aliases="big: %s\nsmall: bob\n" % targets)
            self.assertEqual(self.rcpt(d, "big", "small"), [
                "451 4.3.0 big ... alias expands to more than 1000 addresses; "
                "try again later", "250 2.0.0 receiver is small"])
        self.assertEqual(critical(events), [])


class FoldingTests(Case):
    """Item 6: only ASCII letters fold; the Kelvin sign is not a K."""

    def test_kelvin_sign_is_not_karen(self):
        d = self.dialogue(mailboxes=("karen",))
        self.assertEqual(self.rcpt(d, "\u212aaren", "KAREN"), [
            "550 5.1.1 \u212aaren ... user unknown", "250 2.0.0 receiver is KAREN"])


class RecipientLineTests(Case):
    """Item 7: one line per copy, saying where it went and for whom."""

    def lines(self, *rcpts, **kw):
        with capturedLogs() as events:
            d = self.dialogue(**kw)
            self.deliver(d, *rcpts)
        prefix = "%s: " % d.proto.session.id
        return [formatEvent(e).split(": ", 2)[2] for e in events
                if formatEvent(e).startswith(prefix) and " relay=" in formatEvent(e)]

    def test_alias_targets_and_the_fallback(self):
        lines = self.lines("sales", "lp", "loop1", "bob",
                           aliases="sales: alice\nlp: lp@far.example\nloop1: loop2\n"
                                   "loop2: loop1\n", mailboxes=("bob", "alice"))
        self.assertEqual(lines, [
            "to=alice orig_to=sales relay=local status=sent (delivered to mailbox)",
            "to=far.example!lp orig_to=lp relay=queue status=queued",
            "to=postmaster orig_to=loop1 relay=local status=sent (delivered to mailbox)",
            "to=bob relay=local status=sent (delivered to mailbox)",
        ])
