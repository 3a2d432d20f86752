"""The decision log (``--decision-log``) and ``upas-policy replay``.

Sessions are recorded through the real server (``testing.Dialogue``, and a
real ``twistd upas-smtpd`` at the end), then replayed against a changed
configuration.
"""

import base64
import hashlib
import hmac
import io
import json
import os
import smtplib
import subprocess
import sys
import time

import pytest
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from upasmail import (checkconfig, conf, decisionlog, listening, ratify, replay, simulate,
                      tap_smtpd, testing)

from test_twistd import ROOT, env, server, dns_port  # noqa: F401 (fixtures)

SYSNAME = "gnot.example.org"
PASSWORD = "Pw-9f3e-unique"
BODY = "BODY-MARKER-7c1d"
HEADER = "HEADER-MARKER-2b8a"


def b64(text):
    return base64.b64encode(text.encode()).decode()


class Recorder:
    """Sessions through the real protocol, all into one decision log."""

    def __init__(self, tmp_path, conf="", **kw):
        self.root = str(tmp_path / "mail")
        os.makedirs(os.path.join(self.root, "lib"), exist_ok=True)
        self.path = str(tmp_path / "decisions.jsonl")
        self.clock = task.Clock()
        self.clock.advance(1796000000)
        self.log = decisionlog.DecisionLog(self.path, self.clock)
        self.settings = testing.make_settings(conf, root=self.root, sysname=SYSNAME, **kw)

    def session(self, peer, *lines, log=None):
        d = testing.Dialogue(self.settings, peer=peer, clock=self.clock,
                             decisions=self.log if log is None else log, mailboxes=["bob"])
        replies = [d.send(line) for line in lines]
        if not isinstance(d.proto, listening.Dropped):  # -k: no session
            d.proto.connectionLost(None)  # also after a hang-up: the session's end
            d.proto.setTimeout(None)
        return replies

    def records(self):
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def write(self, name, text):
        with open(os.path.join(self.root, "lib", name), "w") as f:
            f.write(text)


def mail(sender, *rcpts, body="hello"):
    return (["MAIL FROM:<%s>" % sender] + ["RCPT TO:<%s>" % r for r in rcpts]
            + ["DATA", "Subject: test\r\n\r\n%s\r\n." % body])


def run_replay(rec, *flags):
    out, err = io.StringIO(), io.StringIO()
    code = replay.main(["--root", rec.root, "--sysname", SYSNAME, *flags, rec.path], out, err)
    return code, out.getvalue(), err.getvalue()


def json_replay(rec, *flags):
    code, out, err = run_replay(rec, "--json", *flags)
    assert err == ""
    return code, json.loads(out)


# -- the log ----------------------------------------------------------------


def test_off_by_default(tmp_path):
    options = tap_smtpd.Options()
    options.parseOptions(["--root", str(tmp_path)])
    assert options["decision-log"] is None
    d = testing.Dialogue(testing.make_settings(root=str(tmp_path)))
    assert d.factory.decisions is None
    # an idle connection carries nothing for it
    assert not [k for k in vars(d.proto) if "decision" in k or "trace" in k]
    d.close()


def test_one_line_per_session_with_the_logs_field_names(tmp_path):
    rec = Recorder(tmp_path)
    replies = rec.session("192.0.2.7", "EHLO mx.sender.net",
                          *mail("ann@good.example", "bob@gnot.example.org", "x@far.example"),
                          "QUIT")
    assert replies[-2] == ["250 2.5.0 sent"]
    [r] = rec.records()
    assert (r["peer"], r["local"], r["helo"], r["tls"], r["auth_user"], r["end"]) == (
        "192.0.2.7", "127.0.0.1", "mx.sender.net", "none", None, "quit")
    assert r["time"] == 1796000000 and r["trusted"] is False and len(r["session"]) == 12
    assert r["connect"]["facts"] == {"closing": False, "connections": 0,
                                     "connection_cap": None, "granted": False,
                                     "connection_slot": None}
    assert r["connect"]["decision"]["code"] == 220
    lines = [c["line"] for c in r["commands"]]
    assert lines == ["EHLO mx.sender.net", "MAIL FROM:<ann@good.example>",
                     "RCPT TO:<bob@gnot.example.org>", "RCPT TO:<x@far.example>", "DATA",
                     "QUIT"]
    ehlo, mail_, rcpt, relay, data, _ = r["commands"]
    assert ehlo["facts"] == {"helo_dns": "exists"}
    assert mail_["decision"] == {"check": "sender_ok", "code": 250, "reason": None,
                                 "reply": "2.0.0 sender is good.example!ann"}
    assert "ratify" not in mail_["facts"] and "names_blocked" not in rcpt["facts"]
    assert rcpt["facts"]["validate_to"] == "accept"
    assert relay["checks"][-1] == ["relaying", 550]
    assert relay["decision"]["check"] == "relaying" and relay["decision"]["reason"] == "relay"
    assert data["message"]["code"] == 250 and data["message"]["queue_id"]
    assert r["accepted"] == 1 and r["refused"] == 1


def test_sessions_refused_before_mail_are_recorded(tmp_path):
    rec = Recorder(tmp_path, evil=(conf.parse_network("192.0.2.66"),))
    assert rec.session("192.0.2.8", "HELO localhost") == [["554 5.7.0 Liar!"]]
    assert rec.session("192.0.2.66") == []  # -k: no protocol at all
    lie, banned = rec.records()
    assert lie["end"] == "hangup"
    assert lie["commands"][0]["decision"]["check"] == "helo_lie"
    assert lie["commands"][0]["decision"]["code"] == 554
    assert banned["peer"] == "192.0.2.66" and banned["end"] == "banned"
    assert banned["connect"]["decision"]["check"] == "banned"


def test_no_password_and_no_message_in_the_log(tmp_path):
    rec = Recorder(tmp_path, clear_passwords=True)
    rec.write("passwd", "alice:%s\n" % PASSWORD)
    os.chmod(os.path.join(rec.root, "lib", "passwd"), 0o600)
    plain = b64("\0alice\0" + PASSWORD)
    ok = ["235 2.0.0 Authentication successful"]
    assert rec.session("192.0.2.7", "EHLO mx.sender.net", "AUTH PLAIN " + plain,
                       "MAIL FROM:<alice@gnot.example.org>", "RCPT TO:<bob@gnot.example.org>",
                       "DATA", "Subject: %s\r\n\r\n%s\r\n." % (HEADER, BODY))[1:3] == [
        ok, ["250 2.0.0 sender is gnot.example.org!alice"]]
    assert rec.session("192.0.2.7", "EHLO mx.sender.net", "AUTH LOGIN", b64("alice"),
                       b64(PASSWORD))[-1] == ok
    d = testing.Dialogue(rec.settings, peer="192.0.2.7", clock=rec.clock, decisions=rec.log)
    d.send("EHLO mx.sender.net")
    [challenge] = d.send("AUTH CRAM-MD5")
    digest = hmac.new(PASSWORD.encode(), base64.b64decode(challenge[4:]), hashlib.md5)
    assert d.send(b64("alice " + digest.hexdigest())) == ok
    d.proto.connectionLost(None)
    # a response pipelined behind a refused AUTH arrives as a command line
    assert rec.session("192.0.2.7", "EHLO mx.sender.net", "AUTH BOGUS", plain)[-1][0][:4] == "500 "
    with open(rec.path, "rb") as f:
        data = f.read()
    for secret in (PASSWORD, plain, b64(PASSWORD), b64("alice " + digest.hexdigest()),
                   BODY, HEADER):
        assert secret.encode() not in data, secret
    lines = [[c["line"] for c in r["commands"]] for r in rec.records()]
    assert lines[0][1] == "AUTH PLAIN" and lines[1][1:] == ["AUTH LOGIN"]
    assert lines[3][1:] == ["AUTH BOGUS", "?"]
    assert rec.records()[0]["auth_user"] == "alice"


def test_a_write_error_is_logged_once_and_the_session_goes_on(tmp_path):
    rec = Recorder(tmp_path)
    full = decisionlog.DecisionLog("/dev/full", rec.clock)  # every write: ENOSPC
    with capturedLogs() as events:
        for _ in range(2):
            replies = rec.session("192.0.2.7", "EHLO mx.sender.net",
                                  *mail("ann@good.example", "bob@gnot.example.org"), "QUIT",
                                  log=full)
            assert replies[-2:] == [["250 2.5.0 sent"], ["221 2.0.0 Successful termination"]]
    failures = [e for e in events if e.get("event") == "smtpd.decision_log"]
    assert len(failures) == 1 and "/dev/full" in failures[0]["path"]


def test_the_log_is_reopened_once_logrotate_moves_it(tmp_path):
    rec = Recorder(tmp_path)
    rec.session("192.0.2.7", "QUIT")
    os.rename(rec.path, rec.path + ".1")
    rec.session("192.0.2.8", "QUIT")
    assert [r["peer"] for r in rec.records()] == ["192.0.2.8"]


def test_check_config_checks_the_decision_log(tmp_path):
    root = str(tmp_path / "mail")
    out, err = io.StringIO(), io.StringIO()
    bad = str(tmp_path / "missing" / "d.jsonl")
    assert checkconfig.main(["--root", root, "--decision-log", bad], out, err) == 1
    assert "--decision-log %s" % bad in err.getvalue()
    good = str(tmp_path / "d.jsonl")
    err = io.StringIO()
    assert checkconfig.main(["--root", root, "--decision-log", good], out, err) == 0, \
        err.getvalue()


# -- replay ----------------------------------------------------------------------


def recorded_traffic(tmp_path):
    """Four sessions; with spam.example!bob and 192.0.2.9 denied, exactly
    three transactions change (their DATA), the others not."""
    rec = Recorder(tmp_path)
    ehlo = "EHLO mx.sender.net"
    rec.session("192.0.2.7", ehlo, *mail("bob@spam.example", "bob@gnot.example.org"), "QUIT")
    rec.session("192.0.2.7", ehlo, *mail("ann@good.example", "bob@gnot.example.org"), "QUIT")
    rec.session("192.0.2.9", ehlo, *mail("ann@good.example", "bob@gnot.example.org"), "QUIT")
    rec.session("192.0.2.8", ehlo, *mail("ann@good.example", "bob@gnot.example.org"),
                *mail("bob@spam.example", "bob@gnot.example.org"), "QUIT")
    return rec


def test_replay_of_an_unchanged_policy_changes_nothing(tmp_path):
    rec = recorded_traffic(tmp_path)
    code, out, err = run_replay(rec)
    assert (code, err) == (0, "")
    assert out == "4 sessions replayed: 0 changed, 0 undecidable\n"


def test_replay_reports_exactly_the_transactions_a_new_blocked_file_changes(tmp_path):
    rec = recorded_traffic(tmp_path)
    sessions = [r["session"] for r in rec.records()]
    rec.write("blocked", "*deny spam.example!bob\ndeny 192.0.2.9\n")
    code, result = json_replay(rec)
    assert code == 1
    assert [(sessions.index(r["session"]), r["peer"], r["sender"], r["command"], r["old"]["code"],
             r["new"]["code"], r["new"]["check"]) for r in result["changes"]] == [
        (0, "192.0.2.7", "<bob@spam.example>", "DATA", 354, 554, "filter_action"),
        (2, "192.0.2.9", "<ann@good.example>", "DATA", 354, 554, "filter_action"),
        (3, "192.0.2.8", "<bob@spam.example>", "DATA", 354, 554, "filter_action")]
    assert result["summary"] == {"354 → 554 (filter_action)": 3}
    assert result["changes"][0]["new"]["reply"].startswith("5.7.1 We don't accept mail from spam")
    assert result["undecidable"] == []
    code, out, _ = run_replay(rec)
    assert code == 1
    assert out.splitlines()[0].split() == ["SESSION", "TIME", "PEER", "SENDER",
                                           "RECIPIENT/COMMAND", "OLD", "→", "NEW"]
    assert out.splitlines()[1].split()[1:] == [
        "2026-11-30T00:53:20Z", "192.0.2.7", "<bob@spam.example>", "DATA", "354",
        "(go_ahead)", "→", "554", "(filter_action)"]
    assert "354 → 554 (filter_action): 3\n" in out
    assert out.endswith("4 sessions replayed: 3 changed, 0 undecidable\n")


def test_a_fact_that_was_not_recorded_is_undecidable_and_named(tmp_path):
    rec = recorded_traffic(tmp_path)
    code, result = json_replay(rec, "-r")  # -r asks DNS for the sender's domain
    assert code == 1 and result["changes"] == []
    assert {(u["peer"], u["command"], u["missing"]) for u in result["undecidable"]} == {
        (peer, "MAIL FROM:<%s>" % sender, "sender_domain")
        for peer, sender in (("192.0.2.7", "bob@spam.example"),
                             ("192.0.2.7", "ann@good.example"),
                             ("192.0.2.9", "ann@good.example"),
                             ("192.0.2.8", "ann@good.example"))}
    code, out, _ = run_replay(rec, "-r")
    assert "needs sender_domain, which was not recorded" in out


def test_replay_of_sessions_refused_before_mail(tmp_path):
    rec = Recorder(tmp_path, evil=(conf.parse_network("192.0.2.66"),))
    rec.session("192.0.2.66")
    rec.session("192.0.2.8", "HELO mx.sender.net", "QUIT")
    code, result = json_replay(rec, "-k", "192.0.2.66", "-k", "192.0.2.8")
    assert code == 1
    assert [(r["peer"], r["command"], r["old"]["code"], r["new"]["code"], r["new"]["check"])
            for r in result["changes"]] == [
        ("192.0.2.8", "CONNECT 192.0.2.8", 220, 0, "banned")]
    # no longer banned: whether the store had granted it trust was never asked
    code, result = json_replay(rec)
    assert code == 1 and result["changes"] == []
    assert [(u["peer"], u["command"], u["missing"]) for u in result["undecidable"]] == [
        ("192.0.2.66", "CONNECT 192.0.2.66", "granted")]


def test_replay_errors_exit_2(tmp_path):
    rec = Recorder(tmp_path)
    os.remove(rec.path)
    code, _, err = run_replay(rec)
    assert code == 2 and "decisions.jsonl" in err
    with open(rec.path, "w") as f:
        f.write("not json\n")
    code, _, err = run_replay(rec)
    assert code == 2 and ":1: not a decision log line" in err
    rec.write("blocked", "frobnicate 1.2.3.4\n")
    code, _, err = run_replay(rec)
    assert code == 2 and "blocked:1" in err


def test_simulate_goes_on_after_starttls():
    settings = testing.make_settings(sysname=SYSNAME)

    def gather(name, arg, session, index):
        return {"granted": False, "connection_slot": None, "helo_dns": "exists",
                "ratify": ratify.EMPTY,
                "validate_from": decisionlog.decode_decision("accept")}[name]

    box = []
    simulate.run_session(settings, "192.0.2.7", "127.0.0.1",
                         ["EHLO mx.sender.net", "STARTTLS", "MAIL FROM:<a@b.example>",
                          "EHLO mx.sender.net", "MAIL FROM:<a@b.example>"],
                         gather).addCallback(box.append)
    session, steps = box[0]
    assert session.encrypted
    assert [s.code for s in steps] == [220, 250, 0, 503, 250, 250]


# -- a real server -----------------------------------------------------------------


def test_twistd_decision_log_and_replay(server, tmp_path):
    path = tmp_path / "decisions.jsonl"
    pw = tmp_path / "passwd"
    pw.write_text("alice:%s\n" % PASSWORD)
    pw.chmod(0o600)
    s = server("--decision-log", str(path), "--passwd", str(pw), "--tarpit-unit", "0",
               "--no-queue-runner")
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.3", 0),
                      local_hostname="client.sender.net") as c:
        c.ehlo()
        assert c.login("alice", PASSWORD)[0] == 235  # CRAM-MD5, in the clear
        assert c.sendmail("ann@good.example", ["bob"],
                          "Subject: %s\r\n\r\n%s\r\n" % (HEADER, BODY)) == {}
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.3", 0),
                      local_hostname="nowhere.sender.net") as c:
        assert c.ehlo()[0] == 554
    for _ in range(600):  # the child writes at each session's end: poll
        data = path.read_bytes()
        if data.count(b"\n") == 2:
            break
        time.sleep(0.05)
    assert data.count(b"\n") == 2, data
    for secret in (PASSWORD, BODY, HEADER):
        assert secret.encode() not in data
    first, lie = [json.loads(line) for line in data.splitlines()]
    assert first["auth_user"] == "alice" and first["end"] == "quit"
    assert lie["end"] == "hangup"
    (tmp_path / "mail" / "lib").mkdir(exist_ok=True)
    (tmp_path / "mail" / "lib" / "blocked").write_text("*deny good.example!ann\n")
    done = subprocess.run(
        [sys.executable, "-m", "upasmail.replay", "--root", str(tmp_path / "mail"),
         "--sysname", SYSNAME, "--passwd", str(pw), "--json", str(path)],
        env=env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    # authenticated: the deny list does not apply to her; nothing changes
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["sessions"] == 2


def test_stdio_upas_smtpd_keeps_the_decision_log(tmp_path, dns_port):  # noqa: F811
    from test_stdio import MESSAGE, over_socketpair

    path = tmp_path / "decisions.jsonl"
    session, s = over_socketpair(tmp_path, "--resolver", "127.0.0.1:%d" % dns_port,
                                 "-n", "192.0.2.7!4711", "--decision-log", str(path))
    s.ehlo("client.sender.net")
    assert s.sendmail("alice@example.org", ["bob"], MESSAGE) == {}
    s.quit()
    assert session.wait() == 0
    [r] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (r["peer"], r["end"], r["accepted"]) == ("192.0.2.7", "quit", 1)
    assert [c["line"] for c in r["commands"]][:2] == ["ehlo client.sender.net",
                                                      "mail FROM:<alice@example.org> size=33"]


def test_replay_help_exits_0():
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        assert replay.main(["--help"], out, io.StringIO()) == 0
    assert out.getvalue().startswith("upas-policy replay [--conf new.conf]")


def test_a_store_failure_at_connect_is_recorded_undecided(tmp_path):
    rec = Recorder(tmp_path)
    log = rec.log
    d = testing.Dialogue(rec.settings, peer="192.0.2.7", clock=rec.clock, decisions=log)
    d.close()
    d.factory.store.acquireConnection = lambda *a: defer.fail(OSError("store gone"))
    p = d.factory.buildProtocol(testing.address("192.0.2.8", 4321))
    p.makeConnection(testing.FakeTLSTransport(peerAddress=testing.address("192.0.2.8", 4321),
                                              hostAddress=testing.address("127.0.0.1", 25)))
    [first, failed] = rec.records()
    assert failed["end"] == "error" and "decision" not in failed["connect"]
    code, result = json_replay(rec)
    assert [u["missing"] for u in result["undecidable"]] == ["connection_slot"]
