"""Header rewriting (rfc822) and the mailer stream (pipemsg)."""

import pytest

from upasmail import pipemsg, rfc822


@pytest.mark.parametrize("value,want", [
    (" alice", " alice@h.example"),
    (" host!bob", " host!bob@h.example"),
    (" bob@example.com", " bob@example.com"),
    (" Alice Smith <alice>", " Alice Smith <alice@h.example>"),
    (" alice (Alice, the boss)", " alice@h.example (Alice, the boss)"),
    (" a, b@x.example,\n\tc", " a@h.example, b@x.example,\n\tc@h.example"),
    (" <>", " <pOsTmAsTeR@h.example>"),
    (" team: a, b@x.example;", " team: a@h.example, b@x.example;"),
    (" undisclosed-recipients:;", " undisclosed-recipients:;"),
    (' "Smith, J" <j>', ' "Smith, J" <j@h.example>'),
    (" <@r.example:u>", " <@r.example:u@h.example>"),
    ("", ""),
])
def test_qualify(value, want):
    assert rfc822.qualify(value, "h.example") == want


@pytest.mark.parametrize("value", [" <a", " a>", " (open", ' "open', " a <b> <c>"])
def test_qualify_errors(value):
    with pytest.raises(rfc822.HeaderSyntaxError):
        rfc822.qualify(value, "h.example")


def parse(text, him="h.example"):
    return rfc822.parse(text.splitlines(True), him)


def test_parse_fields_and_flags():
    h = parse("From: alice\nSubject: hi\nCc: bob,\n\tcarol\nMessage-ID: <1@x>\n\n")
    assert "".join(h.lines) == ("From: alice@h.example\nSubject: hi\n"
                                "Cc: bob@h.example,\n\tcarol@h.example\nMessage-ID: <1@x>\n\n")
    assert h.has_originator and h.has_destination and h.has_message_id


def test_badheader_and_from_line():
    h = parse("From alice Wed Mar  7 23:47:45 -0400 2024\ngarbage without colon\nSubject: x\n\n")
    assert h.lines == ["BadHeader: garbage without colon\n", "Subject: x\n", "\n"]
    assert not h.has_originator


def test_name_with_blank_stops_parse():
    h = parse("Subject: a\nX Foo: bar\nFrom: alice\n\nbody\n")
    assert h.lines == ["Subject: a\n", "X Foo: bar\n", "From: alice\n", "\n", "body\n"]
    assert not h.has_originator


def test_return_path_is_not_an_originator():
    assert not parse("Return-Path: <x@y>\n\n").has_originator


def test_broken_address_field_becomes_badheader():
    h = parse("To: <<broken\n\n")
    assert h.lines == ["BadHeader: To: <<broken\n", "\n"]
    assert not h.has_destination


def stream(lines, **kw):
    out = []
    args = dict(sender="example.org!alice", last_sender="example.org!alice",
                recipients=["bob"], him="h.example", rsys="192.0.2.1", me="gnot",
                date="Wed Mar  7 23:47:45 -0400 2024")
    args.update(kw)
    s = pipemsg.MailerStream(out.append, **args)
    for line in lines:
        s.line(line)
    s.end()
    return s, b"".join(out)


def test_stream_order():
    s, data = stream([b"Subject: x", b"", b"body"],
                     forgery=lambda sender, fields: ["suspect envelope domain"])
    assert data == (b"From example.org!alice Wed Mar  7 23:47:45 -0400 2024 remote from \n"
                    b"Received: from h.example ([192.0.2.1]) by gnot; "
                    b"Wed Mar  7 23:47:45 -0400 2024\n"
                    b"X-warning: suspect envelope domain\n"
                    b"From: example.org!alice\nTo: bob\nSubject: x\n\nbody\n")
    assert s.size == len(data)


def test_stream_header_only_and_nul():
    _, data = stream([b"Subject: a\x00b"])
    assert data.endswith(b"From: example.org!alice\nTo: bob\nSubject: ab\n")


def test_stream_invalid_utf8_header():
    s, _ = stream([b"Subject: caf\xe9", b"", b"x"])
    assert str(s.error) == "mail refused: illegal header chars"


def test_stream_8bit_body_kept():
    _, data = stream([b"Subject: x", b"", b"caf\xe9 \xff"])
    assert data.endswith(b"\n\ncaf\xe9 \xff\n")


def test_stream_huge_header_passes_verbatim():
    lines = [b"X-Long: " + b"a" * 1000] * 20 + [b"From: alice", b"", b"body"]
    _, data = stream(lines)
    assert b"\nFrom: alice\n" in data  # past 16 KiB: not rewritten


def test_plan9_date_shape():
    assert pipemsg.plan9_date(0)[-4:] == "1970"
    assert len(pipemsg.plan9_date(0).split()) == 6
