"""Issue 18: the PROXY protocol header parser (upasmail/smtpd/proxyheader.py),
v1 and v2, as HAProxy's proxy-protocol.txt specifies them."""

import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from upasmail.smtpd import proxyheader as ph
from upasmail.smtpd.proxyheader import NEED_MORE, Invalid, Parsed, ProxyHeader

SIG = ph.V2_SIGNATURE


def v2(command=1, family=0x11, src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=25,
       tlvs=b"", version=2, block=None):
    if block is None:
        if family == 0x11:
            block = (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
                     + struct.pack("!HH", sport, dport))
        elif family == 0x21:
            block = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
                     + struct.pack("!HH", sport, dport))
        else:
            block = b""
    block += tlvs
    return SIG + bytes([version << 4 | command, family]) + struct.pack("!H", len(block)) + block


V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
V1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n"
CLIENT = b"EHLO client.example\r\n"
SEEN4 = ProxyHeader(1, "PROXY", ("192.0.2.7", 40000), ("198.51.100.1", 25))


# -- v1 ----------------------------------------------------------------------

def test_v1_tcp4():
    assert ph.parse(V1 + CLIENT) == Parsed(SEEN4, CLIENT)


def test_v1_tcp6():
    assert ph.parse(V1_6) == Parsed(
        ProxyHeader(1, "PROXY", ("2001:db8::7", 40000), ("2001:db8::1", 25)), b"")


def test_v1_unknown_uses_the_connection_and_ignores_the_rest_of_its_line():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert ph.parse(line + b"x") == Parsed(ProxyHeader(1, "PROXY", None, None), b"x")


def test_v1_longest_line_is_107_bytes():
    line = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(line) <= ph.V1_MAX
    assert isinstance(ph.parse(line), Parsed)
    unknown = b"PROXY UNKNOWN " + b"x" * (ph.V1_MAX - 16) + b"\r\n"
    assert len(unknown) == ph.V1_MAX and isinstance(ph.parse(unknown), Parsed)
    assert isinstance(ph.parse(unknown[:-2] + b"x\r\n"), Invalid)
    assert isinstance(ph.parse(b"PROXY UNKNOWN " + b"x" * 200), Invalid)  # no CRLF in time


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n",  # LF only
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\rX\r\n",
    b"PROXY TCP4  192.0.2.7 198.51.100.1 40000 25\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25 \r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",
    b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 25\r\n",  # the wrong family
    b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 25\r\n",  # leading zero in an octet
    b"PROXY TCP4 192.0.2 198.51.100.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 25\r\n",  # leading zero in a port
    b"PROXY TCP4 192.0.2.7 198.51.100.1 00 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 25\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 \xd9\xa1 25\r\n",  # a non-ASCII digit
    b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 25\r\n",  # a scope id
    b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    b"PROXY tcp4 192.0.2.7 198.51.100.1 40000 25\r\n",  # case matters
    b"proxy TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    b"PROXY\r\n",
    b"PROXY \r\n",
])
def test_v1_strict(line):
    assert isinstance(ph.parse(line), Invalid), line


def test_v1_ports_at_the_edges():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 0 65535\r\n"
    assert ph.parse(line).header.source == ("192.0.2.7", 0)
    assert ph.parse(line).header.destination == ("198.51.100.1", 65535)


# -- v2 ----------------------------------------------------------------------

def test_v2_inet():
    assert ph.parse(v2() + CLIENT) == Parsed(
        ProxyHeader(2, "PROXY", ("192.0.2.7", 40000), ("198.51.100.1", 25)), CLIENT)


def test_v2_inet6():
    assert ph.parse(v2(family=0x21, src="2001:db8::7", dst="2001:db8::1")) == Parsed(
        ProxyHeader(2, "PROXY", ("2001:db8::7", 40000), ("2001:db8::1", 25)), b"")


def test_v2_tlvs_are_skipped():
    tlvs = b"\x01\x00\x04smtp" + b"\x04\x00\x00"  # ALPN, NOOP
    assert ph.parse(v2(tlvs=tlvs) + CLIENT).rest == CLIENT


def test_v2_local_uses_the_connection_whatever_its_family():
    for family in (0x00, 0x11, 0x31):
        r = ph.parse(v2(command=0, family=family, block=b"whatever") + b"x")
        assert r == Parsed(ProxyHeader(2, "LOCAL", None, None), b"x")


def test_v2_proxy_unspec_uses_the_connection():
    assert ph.parse(v2(family=0x00)) == Parsed(ProxyHeader(2, "PROXY", None, None), b"")


@pytest.mark.parametrize("header, why", [
    (v2(version=1), "version 1"),
    (v2(version=3), "version 3"),
    (v2(command=2), "command 2"),
    (v2(family=0x31, block=b"/a" + b"\0" * 214), "UNIX"),  # refused, not taken as LOCAL
    (v2(family=0x12, block=b"\0" * 12), "DGRAM"),
    (v2(family=0x22, block=b"\0" * 36), "DGRAM"),
    (v2(family=0x41, block=b"\0" * 12), "4 over STREAM"),
    (v2(family=0x11, block=b"\0" * 11), "11 bytes"),
    (v2(family=0x21, block=b"\0" * 35), "35 bytes"),
    (v2(family=0x10, block=b"\0" * 12), "INET over UNSPEC"),
])
def test_v2_refused(header, why):
    r = ph.parse(header)
    assert isinstance(r, Invalid) and why in r.reason, r


def test_v2_waits_for_its_whole_length():
    header = v2(tlvs=b"\x04\x00\x10" + b"\0" * 16)
    for n in range(len(header)):
        assert ph.parse(header[:n]) is NEED_MORE, n


# -- neither ---------------------------------------------------------------

@pytest.mark.parametrize("data", [b"EHLO x\r\n", b"\x16\x03\x01", b"GET / HTTP/1.0\r\n",
                                  b"\r\n\r\nX", b"PROXX", b" PROXY", b"\r\n\r\n\x00\r\nQUIX"])
def test_no_header_is_refused_at_the_first_byte_that_tells(data):
    assert isinstance(ph.parse(data), Invalid)


def test_nothing_yet():
    assert ph.parse(b"") is NEED_MORE


# -- properties --------------------------------------------------------------

VALID = [V1, V1_6, b"PROXY UNKNOWN\r\n", v2(), v2(family=0x21, src="::1", dst="::2"),
         v2(command=0, family=0x00), v2(tlvs=b"\x01\x00\x02h2")]


def feed_in_pieces(data, cuts):
    """What the listener does: parse what arrived so far, after each read."""
    seen = b""
    for piece in [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]:
        seen += piece
        r = ph.parse(seen)
        if r is not NEED_MORE:
            return r, len(seen)
    return NEED_MORE, len(seen)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.binary(max_size=40), st.data())
def test_split_anywhere_gives_the_same_header_and_rest(header, after, data):
    whole = header + after
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(whole)), max_size=8))))
    r, used = feed_in_pieces(whole, cuts)
    expected = ph.parse(whole)
    assert isinstance(expected, Parsed)
    assert r.header == expected.header
    assert r.rest == whole[len(header):used]  # the rest of the read that completed it


def test_byte_by_byte():
    for header in VALID:
        r, used = feed_in_pieces(header + CLIENT, list(range(1, len(header + CLIENT))))
        assert used == len(header) and r.rest == b"" and r == ph.parse(header)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_any_byte_mutated_is_refused_or_still_a_wellformed_header(header, data):
    i = data.draw(st.integers(0, len(header) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda b: b != header[i]))
    mutated = header[:i] + bytes([b]) + header[i + 1:]
    r = ph.parse(mutated + CLIENT)
    if isinstance(r, Parsed):
        h = r.header
        assert h.command in ("PROXY", "LOCAL") and h.version in (1, 2)
        for where in (h.source, h.destination):
            assert where is None or (ipaddress.ip_address(where[0]) and 0 <= where[1] <= 65535)
        assert (h.source is None) == (h.destination is None)
    else:
        assert r is NEED_MORE or isinstance(r, Invalid)
    if i < 5 or (header.startswith(SIG) and i < 12):  # the signature: never a header
        assert isinstance(r, Invalid)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data):
    r = ph.parse(data)
    assert r is NEED_MORE or isinstance(r, (Invalid, Parsed))
    if isinstance(r, Parsed):
        assert data.endswith(r.rest)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200).filter(lambda d: not d.startswith(b"P")
                                                  and not d.startswith(b"\r")))
def test_garbage_refused_at_once(data):
    assert isinstance(ph.parse(data), Invalid)


def test_v1_gives_up_within_its_length():
    """A peer that sends no CRLF is refused once 107 bytes came, not later."""
    data = b"PROXY TCP4 " + b"1" * 200
    assert ph.parse(data[:ph.V1_MAX - 1]) is NEED_MORE
    assert isinstance(ph.parse(data[:ph.V1_MAX]), Invalid)


def test_v2_largest_length():
    header = v2(tlvs=b"\x04" + struct.pack("!H", 65535 - 12 - 3) + b"\0" * (65535 - 12 - 3))
    assert len(header) == ph.V2_FIXED + 65535
    assert ph.parse(header[:-1]) is NEED_MORE
    assert ph.parse(header + b"x").rest == b"x"
