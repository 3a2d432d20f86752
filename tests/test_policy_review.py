"""Found by the review of the policy-as-data refactor (issue 16): each test
failed before its fix."""

import os

from test_auth_tls import pem
from test_policy_replay import BODY, PASSWORD, Recorder, b64, json_replay
from upasmail import testing, tls


def test_free_text_of_noop_and_help_is_not_in_the_decision_log(tmp_path):
    # a client that sends its message although DATA was refused: its lines
    # arrive as commands, and a body line may begin with a command word
    rec = Recorder(tmp_path)
    replies = rec.session("192.0.2.7", "EHLO mx.sender.net", "MAIL FROM:<ann@good.example>",
                          "RCPT TO:<x@far.example>", "DATA",
                          "Help me with %s" % BODY, "noop %s" % BODY, "NOOP", "HELP", "QUIT")
    assert replies[3][0].startswith("503 ")  # DATA refused: no recipient
    with open(rec.path) as f:
        assert BODY not in f.read()
    [r] = rec.records()
    assert [c["line"] for c in r["commands"]][4:] == ["HELP", "NOOP", "NOOP", "HELP", "QUIT"]
    # and the session replays as it was decided
    code, result = json_replay(rec)
    assert (code, result["changes"], result["undecidable"]) == (0, [], [])


def test_a_failed_auth_before_a_good_one_does_not_authenticate_in_replay(tmp_path):
    rec = Recorder(tmp_path, clear_passwords=True, require_auth=True)
    rec.write("passwd", "alice:%s\n" % PASSWORD)
    os.chmod(os.path.join(rec.root, "lib", "passwd"), 0o600)
    replies = rec.session("192.0.2.7", "EHLO mx.sender.net", "AUTH PLAIN " + b64("\0alice\0no"),
                          "MAIL FROM:<ann@good.example>",
                          "AUTH PLAIN " + b64("\0alice\0" + PASSWORD),
                          "MAIL FROM:<ann@good.example>", "QUIT")
    assert [r[0][:3] for r in replies[1:5]] == ["535", "530", "235", "250"]
    # the same policy decides the same: the first MAIL was not authenticated
    code, result = json_replay(rec, "-p", "-a")
    assert (code, result["changes"], result["undecidable"]) == (0, [], [])


def test_only_the_starttls_that_brought_tls_up_is_replayed_as_such(tmp_path):
    rec = Recorder(tmp_path)
    cert = tmp_path / "cert.pem"
    cert.write_text("".join(pem()))
    d = testing.Dialogue(rec.settings, peer="192.0.2.7", clock=rec.clock, decisions=rec.log,
                         contextFactory=tls.CertificateFile(str(cert)), mailboxes=["bob"])
    replies = [d.send(line) for line in (
        "EHLO mx.sender.net", "STARTTLS now", "MAIL FROM:<ann@good.example>", "RSET",
        "STARTTLS")]
    d.proto.session.cipher = "TLSv1.3/TLS_AES_256_GCM_SHA384"  # what the handshake sets
    replies += [d.send(line) for line in (
        "EHLO mx.sender.net", "STARTTLS", "MAIL FROM:<ann@good.example>", "QUIT")]
    d.proto.connectionLost(None)
    d.proto.setTimeout(None)
    assert [r[-1][:3] for r in replies] == [
        "250", "500", "250", "250", "220", "250", "503", "250", "221"]
    # the same policy decides the same: the refused STARTTLS lines forgot nothing
    code, result = json_replay(rec)
    assert (code, result["changes"], result["undecidable"]) == (0, [], [])


def test_replay_with_p_lets_plain_through_instead_of_calling_it_unrecognised(tmp_path):
    rec = Recorder(tmp_path)
    rec.write("passwd", "alice:%s\n" % PASSWORD)
    os.chmod(os.path.join(rec.root, "lib", "passwd"), 0o600)
    replies = rec.session("192.0.2.7", "EHLO mx.sender.net",
                          "AUTH PLAIN " + b64("\0alice\0" + PASSWORD), "QUIT")
    assert replies[1][0].startswith("538 ")  # PLAIN needs TLS or -p
    code, result = json_replay(rec, "-p")
    # with -p the server starts the exchange (not 501 "unrecognised"); its
    # outcome was never checked
    assert result["changes"] == []
    assert [u["missing"] for u in result["undecidable"]] == ["authenticated"]


def test_an_auth_the_old_policy_refused_has_an_unknown_outcome_in_replay(tmp_path):
    rec = Recorder(tmp_path)
    rec.write("passwd", "alice:%s\n" % PASSWORD)
    os.chmod(os.path.join(rec.root, "lib", "passwd"), 0o600)
    rec.session("192.0.2.7", "EHLO mx.sender.net", "AUTH PLAIN " + b64("\0alice\0" + PASSWORD),
                "MAIL FROM:<ann@good.example>", "QUIT")
    # -p -a: the exchange would now run, and whether the password is good
    # was never checked; replay must not guess that it failed (MAIL 530)
    code, result = json_replay(rec, "-p", "-a")
    assert result["changes"] == []
    [undecided] = result["undecidable"]
    assert (undecided["command"], undecided["missing"]) == ("AUTH PLAIN", "authenticated")
