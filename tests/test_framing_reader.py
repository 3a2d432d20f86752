"""framing.Reader: the client's bytes cut as the protocol's phase wants
them, without a protocol or a transport (sans I/O)."""

from hypothesis import given, settings, strategies as st

from upasmail import framing
from upasmail.framing import TOO_LONG, Reader


def lines_of(reader, limit=100, crlf_only=False):
    out = []
    while True:
        line = reader.line(limit, crlf_only)
        if line is None:
            return out
        out.append(line)


def test_command_lines_end_at_lf_and_lose_a_cr_before_it():
    r = Reader()
    r.feed(b"EHLO a\r\nNOOP\nRSET\r")
    assert lines_of(r) == [b"EHLO a", b"NOOP"]
    r.feed(b"\n")
    assert lines_of(r) == [b"RSET"]
    assert r.pending() == 0


def test_in_data_only_crlf_ends_a_line():
    r = Reader()
    r.feed(b"one\ntwo\r\n")
    assert lines_of(r, crlf_only=True) == [b"one\ntwo"]


def test_an_over_long_line_is_said_once_and_its_tail_skipped():
    r = Reader()
    r.feed(b"x" * 30)
    assert r.line(10) is TOO_LONG
    assert r.line(10) is None
    r.feed(b"y" * 30)
    assert r.line(10) is None  # still the same line
    r.feed(b"zz\r\nNOOP\r\n")
    assert lines_of(r, 10) == [b"NOOP"]


def test_a_whole_over_long_line_is_too_long_and_the_next_one_comes():
    r = Reader()
    r.feed(b"x" * 11 + b"\r\nNOOP\r\n")
    assert lines_of(r, 10) == [TOO_LONG, b"NOOP"]


def test_a_line_exactly_at_the_limit_whose_crlf_is_split():
    r = Reader()
    r.feed(b"x" * 10 + b"\r")  # the CR may start the CRLF: not over yet
    assert r.line(10) is None
    r.feed(b"\n")
    assert r.line(10) == b"x" * 10


def test_data_comes_in_blocks_up_to_the_end():
    r = Reader()
    r.feed(b"a\r\n..b\r\nc")
    assert r.data(100) == (b"a\r\n..b\r\n", False, False)
    r.feed(b"\r\n.\r\nMAIL")
    assert r.data(100) == (b"c\r\n", True, False)
    r.compact()
    assert r.buf == b"MAIL"


def test_an_over_long_data_line_still_arriving():
    r = Reader()
    r.feed(b"ok\r\n" + b"x" * 50)
    assert r.data(10) == (b"ok\r\n", False, True)
    assert r.skipping


def test_discard_drops_what_was_pipelined():
    r = Reader()
    r.feed(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n")
    assert r.line(100) == b"STARTTLS"
    assert r.discard() == len(b"MAIL FROM:<a@b>\r\n")
    assert r.line(100) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"NOOP\r\n", b"x" * 30 + b"\r\n", b"\r", b"\n", b"AB"]),
                max_size=20),
       st.integers(min_value=1, max_value=7))
def test_any_split_gives_the_same_lines(pieces, cut):
    """However the bytes are cut into reads, the same lines come out."""
    data = b"".join(pieces)
    whole = Reader()
    whole.feed(data)
    expected = lines_of(whole, 20)
    r, got = Reader(), []
    for i in range(0, len(data), cut):
        r.feed(data[i:i + cut])
        got += lines_of(r, 20)
        r.compact()
    assert got == expected


def test_partial_too_long_does_not_count_a_trailing_cr():
    assert not framing.partial_too_long(b"x" * 10 + b"\r", 0, 10)
    assert framing.partial_too_long(b"x" * 11, 0, 10)
