"""Bulk DATA framing agrees with the line-by-line reading it replaces."""

from hypothesis import given, strategies as st

from upasmail import framing


def reference(buf):
    """Line by line, as the protocol reads: (message lines, ended, rest)."""
    out, pos = [], 0
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return out, False, buf[pos:]
        line = buf[pos:end]
        pos = end + 2
        if line == b".":
            return out, True, buf[pos:]
        out.append(line[1:] if line[:1] == b"." else line)


def bulk(buf):
    consumed, block, ended = framing.next_block(buf, 0)
    text = framing.unstuff(block)
    return text.split(b"\n")[:-1], ended, buf[consumed:]


piece = st.sampled_from([b"a", b".", b"..", b"\r\n", b"From ", b"x" * 5, b" "])


@given(st.lists(piece, max_size=30))
def test_next_block_and_unstuff_agree_with_line_reading(pieces):
    buf = b"".join(pieces)
    if not framing.clean(buf[:buf.rfind(b"\r\n") + 2], 1000):
        return
    assert bulk(buf) == reference(buf)


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"xyz"]), max_size=20),
       st.integers(1, 8))
def test_clean_agrees_with_line_checks(pieces, limit):
    block = b"".join(pieces) + b"\r\n"
    lines = block.split(b"\r\n")[:-1]
    expected = all(b"\r" not in l and b"\n" not in l and len(l) <= limit for l in lines)
    assert framing.clean(block, limit) == expected


def test_end_of_data_only_on_a_crlf_dot_line():
    assert framing.next_block(b".\r\nMAIL", 0) == (3, b"", True)
    assert framing.next_block(b"a\r\n.\r\nRSET\r\n", 0) == (6, b"a\r\n", True)
    assert framing.next_block(b"a\n.\nb\r\n", 0) == (7, b"a\n.\nb\r\n", False)
    assert framing.next_block(b"partial", 0) == (0, b"", False)


def test_a_line_of_exactly_the_limit_with_its_cr_and_lf_in_two_reads():
    # found by the review: the CR was counted as part of the line
    from upasmail import testing
    import tempfile
    s = testing.make_settings("", root=tempfile.mkdtemp(), max_data_line=100)
    d = testing.Dialogue(s, peer="127.0.0.1", mailboxes=("bob",))
    d.send("HELO client.example.net")
    d.send("MAIL FROM:<a@example.org>")
    d.send("RCPT TO:<bob>")
    assert d.send("DATA")[0].startswith("354")
    assert d.raw(b"Subject: L\r\n\r\n" + b"x" * 100 + b"\r") == []
    assert d.raw(b"\n.\r\n")[0].startswith("250")
    command = b"NOOP" + b" " * (s.max_command_line - 4)
    assert d.raw(command + b"\r") == []
    assert d.raw(b"\n")[0].startswith("250")
