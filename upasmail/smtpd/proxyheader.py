"""The PROXY protocol header (HAProxy's proxy-protocol.txt, v1 and v2).

A load balancer that speaks it sends, before the client's first byte,
who the client is (source) and which of our addresses it reached
(destination).  ``parse(data)`` reads the bytes received so far and
answers ``NEED_MORE``, ``Invalid(why)`` or ``Parsed(header, rest)``;
``rest`` is what followed the header in the same bytes (the client's).
Nothing here does I/O: the listener (``proxylistener``) feeds it.

What is accepted, strictly as the specification says:

* v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (single spaces, at
  most 107 bytes with the CRLF, addresses of the family named, ports
  0-65535 in decimal without leading zeros), or ``PROXY UNKNOWN`` and
  anything up to the CRLF.
* v2: the 12-byte signature, version 2, command LOCAL or PROXY, and for
  PROXY the families UNSPEC, or INET / INET6 over STREAM; TLVs after the
  addresses are skipped.

A header with ``source`` None (v1 UNKNOWN, v2 LOCAL or UNSPEC) means "use
the connection's own addresses", as the specification asks: LOCAL is the
balancer's own health check.  UNIX-socket and DGRAM addresses are refused
(``Invalid``): a mail client has an IP address, and treating them like
LOCAL would give the client the balancer's address, and so its trust.
"""

import ipaddress
import re
import struct
from collections import namedtuple

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length

LOCAL, PROXY = "LOCAL", "PROXY"

NEED_MORE = "need more"

# source, destination: (ip text, port), or None for the connection's own
ProxyHeader = namedtuple("ProxyHeader", "version command source destination")
Parsed = namedtuple("Parsed", "header rest")
Invalid = namedtuple("Invalid", "reason")

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_FAMILIES = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}
# v2 family/transport byte -> (address class, bytes per address)
_V2_FAMILIES = {0x11: (ipaddress.IPv4Address, 4), 0x21: (ipaddress.IPv6Address, 16)}
_V2_NAMES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}


def parse(data):
    """The header at the start of ``data`` (bytes): NEED_MORE, Invalid or Parsed."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _v2(data) if len(data) >= len(V2_SIGNATURE) else NEED_MORE
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _v1(data) if len(data) >= len(V1_PREFIX) else NEED_MORE
    return Invalid("no PROXY header")


def _v1(data):
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data or b"\r" in data[:-1]:
            return Invalid("v1 header without its CRLF in %d bytes" % V1_MAX)
        return NEED_MORE
    line, rest = data[:end], data[end + 2:]
    parts = line.split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:  # the rest of the line is to be ignored
        return Parsed(ProxyHeader(1, PROXY, None, None), rest)
    if len(parts) != 6:
        return Invalid("v1 header with %d fields, not 6" % len(parts))
    _, family, src, dst, sport, dport = parts
    kind = _V1_FAMILIES.get(family)
    if kind is None:
        return Invalid("v1 protocol %r is not TCP4, TCP6 or UNKNOWN" % _text(family))
    if b"%" in src + dst:  # a scope id names an interface of theirs, not an address
        return Invalid("v1 address with a scope id")
    try:
        addresses = [str(kind(a.decode("ascii"))) for a in (src, dst)]
    except (UnicodeDecodeError, ValueError):
        return Invalid("v1 address not %s: %r %r" % (_text(family), _text(src), _text(dst)))
    ports = []
    for port in (sport, dport):
        if not _PORT.fullmatch(port) or int(port) > 65535:
            return Invalid("v1 port %r" % _text(port))
        ports.append(int(port))
    return Parsed(ProxyHeader(1, PROXY, (addresses[0], ports[0]),
                              (addresses[1], ports[1])), rest)


def _v2(data):
    if len(data) < V2_FIXED:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        return Invalid("v2 signature with version %d" % version)
    if command > 1:
        return Invalid("v2 command %d is not LOCAL or PROXY" % command)
    family = data[13]
    (length,) = struct.unpack("!H", data[14:16])
    end = V2_FIXED + length
    if len(data) < end:
        return NEED_MORE
    rest = data[end:]
    if command == 0 or family == 0x00:  # LOCAL, or PROXY with UNSPEC: our own
        return Parsed(ProxyHeader(2, LOCAL if command == 0 else PROXY, None, None), rest)
    known = _V2_FAMILIES.get(family)
    if known is None:
        return Invalid("v2 address family %s over %s is not INET or INET6 over STREAM" % (
            _V2_NAMES.get(family >> 4, str(family >> 4)),
            {0: "UNSPEC", 1: "STREAM", 2: "DGRAM"}.get(family & 0x0F, str(family & 0x0F))))
    kind, size = known
    if length < 2 * size + 4:
        return Invalid("v2 address block of %d bytes, %s needs %d" % (
            length, _V2_NAMES[family >> 4], 2 * size + 4))
    block = data[V2_FIXED:end]
    src, dst = kind(block[:size]), kind(block[size:2 * size])
    sport, dport = struct.unpack("!HH", block[2 * size:2 * size + 4])
    return Parsed(ProxyHeader(2, PROXY, (str(src), sport), (str(dst), dport)), rest)


def _text(b):
    return b.decode("ascii", "replace")
