"""Random input never crashes the parsers or the session."""

import shutil
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from upasmail import grammar, rfc822, testing

VERBS = [b"HELO ", b"EHLO ", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP",
         b"QUIT", b"VRFY ", b"AUTH ", b"STARTTLS", b""]
line_bytes = st.binary(max_size=80).filter(lambda b: b"\n" not in b)
command = st.builds(lambda v, rest: v + rest, st.sampled_from(VERBS), line_bytes)


@given(command)
def test_grammar_only_raises_syntax_errors(line):
    try:
        grammar.parse(line)
    except grammar.CommandSyntaxError:
        pass


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60)
                .map(lambda t: t.replace("\n", " ") + "\n"), max_size=10))
def test_header_parse_never_raises(lines):
    header = rfc822.parse(lines, "h.example")
    assert all(line.endswith("\n") for line in header.lines)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=60)
@given(st.lists(command, min_size=1, max_size=12))
def test_session_answers_every_command(lines):
    root = tempfile.mkdtemp(prefix="upasmail-fuzz-")
    try:
        d = testing.Dialogue(testing.make_settings("", root=root))
        replies = []
        for line in lines:
            if d.transport.disconnecting:
                break
            if d.proto.mode == "DATA":
                d.raw(b".\r\n")
            out = d.raw(line + b"\r\n")
            replies.extend(out)
            if d.proto.mode != "DATA":
                assert out, line
            assert all(r[:3].isdigit() for r in out)
        d.close()
    finally:
        shutil.rmtree(root, True)
