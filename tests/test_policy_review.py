"""Found by the review of the policy-as-data refactor (issue 16): each test
failed before its fix."""

from test_policy_replay import BODY, Recorder, json_replay


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
