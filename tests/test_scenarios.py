"""Golden scenarios (issue 16): every ``tests/scenarios/*.in`` run through
the real policy tables must give its ``.ref`` exactly; every
``tests/scenarios/*.dialogue`` replayed through the real server must get
every reply it lists.  ``UPDATE_SCENARIOS=1`` rewrites the .ref files:
review each against spec §3 before committing (the .ref is the spec).
The formats: tests/scenarios/README.rst."""

import glob
import os

import pytest

import scenario

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")
INS = sorted(glob.glob(os.path.join(HERE, "*.in")))
DIALOGUES = sorted(glob.glob(os.path.join(HERE, "*.dialogue")))


def _name(path):
    return os.path.basename(path)


@pytest.mark.parametrize("path", INS, ids=_name)
def test_scenario(path, tmp_path):
    with open(path) as f:
        got = scenario.run(f.read(), str(tmp_path))
    ref = path[:-3] + ".ref"
    if os.environ.get("UPDATE_SCENARIOS"):
        with open(ref, "w") as f:
            f.write(got)
    with open(ref) as f:
        assert got == f.read()


@pytest.mark.parametrize("path", DIALOGUES, ids=_name)
def test_dialogue(path, tmp_path):
    with open(path) as f:
        text = f.read()
    for sent, expected, got in scenario.replay(text, str(tmp_path)):
        assert got == expected, sent


def test_every_in_file_has_its_ref():
    assert INS, "no scenarios"
    for path in INS:
        assert os.path.exists(path[:-3] + ".ref"), path


def test_a_wrong_ref_fails(tmp_path):
    """The comparison can fail: one reply changed is a difference."""
    text = "client 192.0.2.1\nHELO mx.sender.net\n"
    got = scenario.run(text, str(tmp_path))
    assert "250 gnot.example.org you are mx.sender.net" not in got  # no DNS: a liar
    assert "< 554 5.7.0 Liar!" in got


def test_facts_are_positional(tmp_path):
    text = ("client 192.0.2.1\nfact helo_dns \"exists\"\nHELO mx.sender.net\n"
            "MAIL FROM:<a@mx.example.net>\nfact validateaddress \"unknown\"\n"
            "RCPT TO:<x@y.example>\nfact validateaddress \"ok\"\nRCPT TO:<x@z.example>\n")
    got = scenario.run(text, str(tmp_path))
    assert "< 550 5.1.1 y.example!x ... user unknown" in got
    assert "< 250 2.0.0 receiver is z.example!x" in got or "we don't relay" in got


def test_a_dialogue_must_list_every_reply_line(tmp_path):
    text = ("dns *\nclient 127.0.0.2\nS: 220 gnot.example.org ESMTP\n"
            "C: EHLO mx.sender.net\nS: 250-gnot.example.org you are mx.sender.net\n")
    results = list(scenario.replay(text, str(tmp_path)))
    assert results[0][1] == results[0][2]  # the greeting
    sent, expected, got = results[1]
    assert expected != got and got[0] == expected[0]  # the extension lines are missing


@pytest.mark.parametrize("path", INS, ids=_name)
def test_the_server_gives_the_tables_replies(path, tmp_path):
    """The real server, fed the same sessions, replies as the .ref says
    (the sessions whose facts the server can look up itself)."""
    with open(path) as f:
        text = f.read()
    (tmp_path / "sim").mkdir()
    (tmp_path / "server").mkdir()
    for sent, want, got in scenario.served(text, str(tmp_path / "sim"),
                                           str(tmp_path / "server")):
        assert got == want, sent
