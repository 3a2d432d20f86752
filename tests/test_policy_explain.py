"""``upas-policy explain`` (issue 16): what it shows is what a live server
replies, and explaining writes nothing.

Each verdict kind is explained (``policytool.main`` with ``--dns FILE``)
and the same session is then driven through a real ``UpasESMTP`` over a
StringTransport (``testing.Dialogue``) built from the same options, on
the same mail root, with a ``FakeResolver`` serving the same zone: the
replies must be the same, command by command, in the text and in the
JSON.  Explain runs first, so the live server also sees whether explain
left any state behind.
"""

import base64
import io
import json
import os
import re
import smtplib
import subprocess
import sys

import pytest
from twisted.internet import task

from test_twistd import dns_port, server  # noqa: F401 (fixtures)
from upasmail import greylist, policytool, simulate
from upasmail.testing import Dialogue, FakeResolver, make_mailboxes, zone_from_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = "192.0.2.9"
ZONE = """\
# the sending host: its name and its PTR agree
mx.sender.org A 192.0.2.9
9.2.0.192.in-addr.arpa PTR mx.sender.org
sender.org MX 10 mx.sender.org
"""
SESSION = ("--peer", PEER, "--helo", "mx.sender.org", "--from", "alice@sender.org")
GO_AHEAD = "354 Input message; end with <CRLF>.<CRLF>"
RELAY = "550 5.7.1 we don't relay.  send to your-path@[] for loopback."
LIAR = "554 5.7.0 Liar!"
GREY = "451 please try again soon from the same IP."
DIALUP = "554 5.7.1 We don't accept mail from dial-up ports."


class Site:
    """A mail root with the user bob, a zone file, and both ways to ask."""

    def __init__(self, tmp_path):
        self.root = str(tmp_path / "mail")
        make_mailboxes(self.root, "bob")
        os.makedirs(os.path.join(self.root, "lib"))
        self.zone = str(tmp_path / "zone")
        with open(self.zone, "w") as f:
            f.write(ZONE)

    def lib(self, name, text, mode=0o644):
        path = os.path.join(self.root, "lib", name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)

    def argv(self, args):
        return ["--root", self.root, "--sysname", "gnot.example.org", "--tarpit-unit", "0",
                "--dns", self.zone] + list(args)

    def explain(self, *args):
        out, err = io.StringIO(), io.StringIO()
        status = policytool.main(["explain"] + self.argv(args), out=out, err=err)
        assert err.getvalue() == ""
        return status, out.getvalue()

    def live(self, *args, lines=None):
        """The replies of a live server to the session ``args`` describe:
        [greeting, reply to line 1, ...], and whether it hung up."""
        options = policytool.ExplainOptions()
        options.parseOptions(self.argv(args))
        with open(self.zone) as f:
            resolver = FakeResolver(zone_from_lines(f))
        d = Dialogue(options["settings"], peer=options["peer"], local=options["local"],
                     resolver=resolver, implicit_tls=options["tls"])
        replies = [d.greeting]
        for line in lines or options.command_lines():
            if d.transport.disconnecting:
                break
            replies.append(d.send(line))
        hung_up = d.transport.disconnecting
        d.close()
        return replies, hung_up


def compared(site, *args):
    """Explain ``args`` as text and as JSON, check both against the live
    server, and return (status, text, JSON)."""
    status, text = site.explain(*args)
    json_status, out = site.explain("--json", *args)
    report = json.loads(out)
    live, hung_up = site.live(*args)
    assert json_status == status
    assert [phase["reply"] for phase in report["phases"]] == live
    shown = [line[len("  reply: "):] for line in text.splitlines() if line.startswith("  reply: ")]
    assert shown == [line for reply in live for line in reply]
    assert text.splitlines()[-1] == report["outcome"]["text"]
    assert hung_up == (report["outcome"]["result"] == "hang-up")
    return status, text, report


def checks_of(report, phase):
    return [(c["check"], c["verdict"]) for p in report["phases"] if p["phase"] == phase
            for c in p["checks"]]


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def test_accepted(site):
    status, text, report = compared(site, *SESSION, "--rcpt", "bob")
    assert status == 0
    assert report["outcome"]["text"] == "accepted: 354"
    assert report["phases"][-1]["reply"] == [GO_AHEAD]
    # every check of a phase, in table order
    assert [c for c, _ in checks_of(report, "data")] == [
        "rejectcheck", "sender_given", "recipient_given", "null_to_many", "validatesender",
        "filter_action", "greylisting", "mailer_ready", "go_ahead"]
    helo = report["phases"][1]
    assert helo["facts"] == {"helo_dns": "exists"}
    assert "  helo_lie: accept" in text.splitlines()


def test_relay_refused(site):
    status, text, report = compared(site, *SESSION, "--rcpt", "eve@elsewhere.org")
    assert status == 1
    assert report["outcome"]["text"] == "refused at rcpt by relaying: " + RELAY
    relaying = report["phases"][3]["checks"][-1]
    assert relaying == {"check": "relaying", "verdict": "refuse", "code": 550,
                        "reply": [RELAY[4:]], "reason": "relay", "detail": None}
    assert "  relaying: %s [relay]" % RELAY in text.splitlines()


def test_ratify_deny_is_refused_at_data(site):
    site.lib("blocked", "*deny sender.org!*\n")
    status, text, report = compared(site, *SESSION, "--rcpt", "bob")
    assert status == 1
    outcome = report["outcome"]
    assert (outcome["phase"], outcome["check"], outcome["code"]) == ("data", "filter_action", 554)
    assert outcome["text"].startswith("refused at data by filter_action: 554-")
    assert ("filterstate", "accept") in checks_of(report, "mail")
    mail = next(p for p in report["phases"] if p["phase"] == "mail")
    assert mail["checks"][-4]["effects"] == {"filterstate": "deny"}


def test_helo_lie_hangs_up(site):
    status, text, report = compared(site, "--peer", PEER, "--helo", "nowhere.sender.org",
                                    "--from", "alice@sender.org", "--rcpt", "bob")
    assert status == 1
    assert text.splitlines()[-1] == "hang-up at helo by helo_lie: " + LIAR
    assert [p["phase"] for p in report["phases"]] == ["connect", "helo"]
    # not in DNS, and not the peer's PTR name either
    assert report["phases"][1]["facts"] == {"helo_dns": "nxdomain",
                                            "peer_ptr": ["mx.sender.org"]}


def test_greylisted(site):
    status, text, report = compared(site, "-g", *SESSION, "--rcpt", "bob")
    assert status == 1
    assert report["outcome"]["text"] == "hang-up at data by greylisting: " + GREY
    assert report["phases"][-1]["facts"]["greylist"] == [False, [["bob", "new"]]]


def test_dialup_hard_reject_refuses_the_next_command(site):
    site.lib("blocked", "dial %s\n" % PEER)
    status, text, report = compared(site, *SESSION, "--rcpt", "bob", "--then",
                                    "MAIL FROM:<alice@sender.org>")
    assert status == 1
    assert report["outcome"]["text"] == "refused at data by filter_action: " + DIALUP
    data, after = report["phases"][-2:]
    assert data["checks"][-1]["effects"] == {"hardreject": True}
    assert after["checks"] == [{"check": "rejectcheck", "verdict": "refuse", "code": 554,
                                "reply": [DIALUP[4:]], "reason": "ratify",
                                "detail": "dialup"}]


def test_auth_required(site):
    site.lib("passwd", "joe:secret\n", 0o600)
    status, text, report = compared(site, "-a", *SESSION, "--rcpt", "bob")
    assert status == 1
    assert report["outcome"]["text"] == (
        "refused at mail by auth_required: 530 5.7.0 Authentication required")


def test_auth_as_a_user(site):
    """--auth runs AUTH PLAIN through the table; the password is not checked."""
    site.lib("passwd", "joe:secret\n", 0o600)
    args = ("-a", "--tls") + SESSION + ("--rcpt", "bob", "--auth", "joe")
    status, text, report = compared_auth(site, args)
    assert status == 0
    assert "note: AUTH PLAIN as joe: the password is not checked " \
           "(the user is in the password file)" in text
    assert report["session"]["password_checked"] is False
    # without TLS (and without -p) PLAIN is refused, as the server refuses it
    status, text = site.explain("-a", *SESSION, "--rcpt", "bob", "--auth", "joe")
    assert status == 1
    assert "  encryption: 538 5.7.1 Encryption required for requested " \
           "authentication mechanism [tls, encryption-required]" in text.splitlines()
    assert text.splitlines()[-1].startswith("refused at auth by encryption: 538")


def compared_auth(site, args):
    status, text = site.explain(*args)
    report = json.loads(site.explain("--json", *args)[1])
    lines = report["session"]["commands"]
    plain = base64.b64encode(b"\0joe\0secret").decode()
    live, _ = site.live(*args, lines=[l + " " + plain if l == "AUTH PLAIN" else l
                                      for l in lines])
    assert [p["reply"] for p in report["phases"]] == live
    assert live[2] == ["235 2.0.0 Authentication successful"]
    assert "  reply: 235 2.0.0 Authentication successful\n" \
           "  (if the password is right: it is not checked)\n" in text
    return status, text, report


# -- nothing is written ---------------------------------------------------------

def tree(root):
    """Every path under ``root`` with its kind, mode, mtime and content."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            content = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    content = f.read()
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, content)
    return found


def test_greylist_is_only_peeked(site):
    """A sender waiting out its greylist delay: explaining does not restart
    its wait (no mtime touched), nor whitelist it, nor make a file."""
    grey = os.path.join(site.root, "grey", "tmp", "127.0.0.1", PEER)
    os.makedirs(grey)
    waiting = os.path.join(grey, "bob")
    open(waiting, "w").close()
    ten_minutes_ago = os.stat(waiting).st_mtime - 600
    os.utime(waiting, (ten_minutes_ago, ten_minutes_ago))
    make_mailboxes(site.root, "carol")
    before = tree(site.root)
    status, out = site.explain("-g", "--json", *SESSION, "--rcpt", "bob", "--rcpt", "carol")
    report = json.loads(out)
    assert status == 0
    assert report["phases"][-1]["facts"]["greylist"] == [
        False, [["bob", "recent"], ["carol", "new"]]]
    assert tree(site.root) == before
    assert not os.path.exists(os.path.join(site.root, "grey", "whitelist"))


def test_explaining_leaves_the_root_byte_identical(site):
    site.lib("blocked", "dial 198.51.100.0/24\n")
    site.lib("passwd", "joe:secret\n", 0o600)
    os.makedirs(os.path.join(site.root, "lib", "trusted.d"))
    os.makedirs(os.path.join(site.root, "grey", "tmp"))
    before = tree(site.root)
    for args in (["-g"] + list(SESSION) + ["--rcpt", "bob", "--rcpt", "eve@elsewhere.org"],
                 ["-r", "-a", "--tls", "--auth", "joe"] + list(SESSION) + ["--rcpt", "bob"],
                 ["--peer", "198.51.100.7", "--helo", "x.sender.org", "--from", "a@b.org",
                  "--rcpt", "bob"]):
        site.explain(*args)
        site.explain("--json", *args)
    assert tree(site.root) == before
    # no tmp/, queue/ or the like: the mail root was never prepared
    assert sorted(os.listdir(site.root)) == ["box", "grey", "lib"]


def test_a_missing_root_is_not_made(tmp_path):
    zone = tmp_path / "zone"
    zone.write_text(ZONE)
    root = tmp_path / "nothere"
    out = io.StringIO()
    status = policytool.main(["explain", "--root", str(root), "--dns", str(zone), "-g"]
                             + list(SESSION) + ["--rcpt", "bob"], out=out, err=io.StringIO())
    assert status == 1  # bob has no mailbox here
    assert "rcpt: RCPT TO:<bob>" in out.getvalue()
    assert not root.exists()


def test_a_live_roots_greylist_wait_is_not_restarted(server, dns_port):
    """Explain against a running server's root, DNS from a real server and a
    real validator: the sender's greylist wait is left as it was, so its
    retry passes."""
    s = server("-g")

    def attempt():
        with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                          local_hostname="client.sender.net") as c:
            c.helo("client.sender.net")
            c.mail("alice@example.org")
            c.rcpt("bob")
            reply = c.docmd("DATA")
            if reply[0] == 354:
                c.send(b"Subject: retry\r\n\r\nhello\r\n.\r\n")
                assert c.getreply()[0] == 250
            return reply

    assert attempt() == (451, b"please try again soon from the same IP.")
    waiting = os.path.join(s.root, "grey", "tmp", "127.0.0.1", "127.0.0.2", "bob")
    ten_minutes_ago = os.stat(waiting).st_mtime - 600
    os.utime(waiting, (ten_minutes_ago, ten_minutes_ago))
    validator = os.path.join(s.root, "lib", "validateaddress")
    os.makedirs(os.path.dirname(validator), exist_ok=True)
    with open(validator, "w") as f:
        f.write('#!/bin/sh\n[ "$1" != carol ]\n')  # carol is unknown
    os.chmod(validator, 0o755)
    before = tree(s.root)
    run = subprocess.run(
        [sys.executable, "-m", "upasmail.policytool", "explain", "--json", "--root", s.root,
         "--sysname", "gnot.example.org", "-g", "--resolver", "127.0.0.1:%d" % dns_port,
         "--peer", "127.0.0.2", "--helo", "client.sender.net", "--from", "alice@example.org",
         "--rcpt", "bob", "--rcpt", "carol"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env=dict(os.environ,
                                                                        PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["phases"][1]["facts"] == {"helo_dns": "exists"}  # asked the DNS server
    carol = report["phases"][4]
    assert (carol["facts"]["validateaddress"], carol["reply"]) == (
        "unknown", ["550 5.1.1 carol ... user unknown"])
    assert report["phases"][-1]["facts"]["greylist"] == [False, [["bob", "recent"]]]
    assert report["outcome"]["text"] == "accepted: 354"
    assert tree(s.root) == before
    assert attempt()[0] == 354  # the wait explain looked at is the one that ends now


def test_greylist_peek_outcomes(tmp_path):
    clock = task.Clock()
    clock.advance(100000)
    g = greylist.Greylist(str(tmp_path / "grey"), clock)
    assert g.peek("10.0.0.1", PEER, ["bob"]) == [("bob", greylist.NEW)]
    assert not (tmp_path / "grey").exists()
    g.attempt("10.0.0.1", PEER, ["bob", "carol"])
    clock.advance(greylist.MIN_AGE)
    assert g.peek("10.0.0.1", PEER, ["bob", "x!y!carol", "dave", "a/b"]) == [
        ("bob", greylist.RECENT), ("x!y!carol", greylist.RECENT), ("dave", greylist.NEW)]
    clock.advance(greylist.MAX_AGE)
    assert g.peek("10.0.0.1", PEER, ["bob"]) == [("bob", greylist.OTHER)]
    # what attempt then finds is what peek said, peek having changed nothing
    assert g.attempt("10.0.0.1", PEER, ["bob"]) == [("bob", greylist.OTHER)]


# -- the command ---------------------------------------------------------------

def test_the_console_script_runs(site):
    site.lib("blocked", "*deny sender.org!*\n")
    run = subprocess.run([sys.executable, "-m", "upasmail.policytool", "explain", "--json"]
                         + site.argv(SESSION + ("--rcpt", "bob")),
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["outcome"]["check"] == "filter_action"
    site.lib("blocked", "")
    run = subprocess.run([sys.executable, "-m", "upasmail.policytool", "explain"]
                         + site.argv(SESSION + ("--rcpt", "bob")),
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "accepted: 354"


def test_setup_cfg_names_the_console_script():
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        assert "upas-policy = upasmail.cli.policytool:main" in f.read()


@pytest.mark.parametrize("args, status, said", [
    (["explain"], 64, "--peer IP is required"),
    (["explain", "--peer", "nonsense"], 64, "--peer wants an IP address"),
    (["explain", "--peer", PEER, "--helo", "a.org", "--ehlo", "a.org"], 64, "give one"),
    (["explain", "--peer", PEER, "--max-recipients", "3"], 64, "at least 100"),
    (["explain", "--peer", PEER, "--conf", "/nonexistent/smtpd.conf"], 2, "smtpd.conf"),
    (["explain", "--peer", PEER, "--dns", "/nonexistent/zone"], 2, "/nonexistent/zone"),
    (["frobnicate"], 64, "usage: upas-policy explain"),
    ([], 64, "usage: upas-policy explain"),
])
def test_errors(tmp_path, args, status, said):
    err = io.StringIO()
    assert policytool.main(args + ["--root", str(tmp_path)] if args[:1] == ["explain"]
                           else args, out=io.StringIO(), err=err) == status
    assert said in err.getvalue()


def test_a_bad_zone_line_is_named(site):
    with open(site.zone, "a") as f:
        f.write("broken.sender.org A 999.1.1.1\n")
    err = io.StringIO()
    assert policytool.main(["explain"] + site.argv(SESSION), out=io.StringIO(), err=err) == 2
    assert "zone:5: 'broken.sender.org A 999.1.1.1'" in err.getvalue()


def test_replay_without_the_module(monkeypatch):
    monkeypatch.setattr(policytool, "_replay_module", lambda: None)
    err = io.StringIO()
    assert policytool.main(["replay", "x"], out=io.StringIO(), err=err) == 70
    assert err.getvalue() == "upas-policy: replay is not available in this build\n"


def test_replay_is_handed_its_arguments(monkeypatch):
    seen = []

    class Replay:
        @staticmethod
        def main(argv):
            seen.append(argv)
            return 3

    monkeypatch.setattr(policytool, "_replay_module", lambda: Replay)
    assert policytool.main(["replay", "--log", "f"]) == 3
    assert seen == [["--log", "f"]]


def test_zone_from_lines():
    records = zone_from_lines(ZONE.splitlines() + ["", "mx.sender.org A 192.0.2.10  # two"])
    assert sorted(records) == ["9.2.0.192.in-addr.arpa", "mx.sender.org", "sender.org"]
    assert [r.dottedQuad() for r in records["mx.sender.org"]] == ["192.0.2.9", "192.0.2.10"]
    assert str(records["9.2.0.192.in-addr.arpa"][0].name) == "mx.sender.org"
    for bad in ("a", "a FOO b", "a MX 10"):
        with pytest.raises(ValueError, match="zone:1"):
            zone_from_lines([bad])


def test_the_documented_example(tmp_path, monkeypatch):
    """docs/policy.rst's example session is what explain prints."""
    import shlex

    with open(os.path.join(ROOT, "docs", "policy.rst"), encoding="utf-8") as f:
        doc = f.read()
    block = doc.split("    $ upas-policy explain ", 1)[1].split("\n\n", 1)[0]
    command, _, shown = block.partition(" -g\n")
    argv = shlex.split(command.replace("\\\n", " ")) + ["-g"]
    expected = "".join(line[4:] + "\n" for line in shown.splitlines())
    assert expected.endswith("hang-up at data by greylisting: %s\n" % GREY)
    monkeypatch.chdir(tmp_path)
    make_mailboxes("mail", "bob")
    zone = doc.split("holds::\n\n", 1)[1]
    zone = zone[:re.search(r"^\S", zone, re.M).start()]  # the literal block only
    (tmp_path / "zone").write_text(zone.replace("    ", ""))
    out = io.StringIO()
    assert policytool.main(["explain"] + argv, out=out, err=io.StringIO()) == 1
    assert out.getvalue() == expected


def test_a_banned_peer_gets_nothing(site):
    status, text = site.explain("-k", "192.0.2.0/24", *SESSION, "--rcpt", "bob")
    assert status == 1
    assert text.splitlines()[-2:] == ["  banned: no reply [banned] (hangup=true)",
                                      "hang-up at connect by banned"]


def test_a_fact_it_cannot_read_safely_is_undecidable(site):
    """A fact ReadOnlyLookups does not know is not looked up some other way
    (which might write): the session stops there, exit status 2."""
    options = policytool.ExplainOptions()
    options.parseOptions(site.argv(SESSION + ("--rcpt", "bob")))
    clock = task.Clock()
    with open(site.zone) as f:
        resolver = FakeResolver(zone_from_lines(f))
    lookups = policytool.ReadOnlyLookups(options["settings"], resolver, clock, clock)
    with pytest.raises(simulate.Undecidable):
        lookups("a_new_fact", None, None, 0)

    def gather(name, arg, session, index):
        if name == "validate_to":
            raise simulate.Undecidable(name, arg)
        return lookups(name, arg, session, index)

    d = simulate.run_session(options["settings"], PEER, "127.0.0.1", options.command_lines(),
                             gather)
    explanation = policytool.Explanation(options, *d.result, [])
    assert explanation.status == 2
    assert explanation.text().splitlines()[-2:] == [
        "  (stopped: the fact validate_to cannot be had)",
        "undecidable at rcpt: the fact validate_to cannot be had"]


def test_helo_lie_with_E_asks_for_auth(site):
    status, text, report = compared(site, "-E", "--peer", PEER, "--helo", "nowhere.sender.org",
                                    "--from", "alice@sender.org", "--rcpt", "bob")
    assert status == 1
    helo = report["phases"][1]
    assert helo["reply"][0].startswith("250-") and len(helo["reply"]) == 2
    assert helo["checks"][1]["effects"]["require_auth"] is True
    assert report["outcome"]["text"] == (
        "refused at mail by auth_required: 530 5.7.0 Authentication required")
