"""Relay control: who is trusted and which recipients are ours.

upas smtpd.c ``receiver`` and spam.c ``forwarding``/``isourdom``
(spec upas-behaviour.md §1.14):

* A peer is trusted when its IP is in ``ournets`` or it has authenticated.
  When smtpd.conf gives no ``ournets`` at all, 127.0.0.1/32 and ::1/128 are
  ours (so the local host can send, and 127.0.0.2 can stand for an outside
  peer in tests).
* A recipient path in bang form is "ours" when every component but the
  last (the user) is ours: dotless, equal to ``dom`` or one of our host
  names (our addition, as Postfix's mydestination), matching ``ourdomains``
  (``*.dom`` is dom and every subdomain), or our own address literal.
* ``user@[]`` means "back to the calling machine": ``[]!user`` becomes
  ``[<peer>]!user`` and is allowed.
* With relay control on, an untrusted peer gets
  ``550 5.7.1 we don't relay.  send to your-path@[] for loopback.`` for a
  recipient that is not ours.  Relay control is ON unless ``norelay off``
  (upas defaults to an open relay; see docs/deviations.rst).

Pure functions: no I/O, no reactor.
"""

import ipaddress

from . import replies
from .address import NULL_SENDER
from .decision import Accept
from .rfc822 import tokenize as header_tokens

DEFAULT_OURNETS = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)


def normalize_ip(text):
    """Peer address as text, with IPv4-mapped IPv6 shown as dotted IPv4."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    normal = str(addr)
    # the text itself when it is already normal: each idle connection keeps
    # its peer's address, and need not keep a copy of it
    return text if normal == text else normal


def in_nets(ip, nets):
    """Is the textual IP inside any of the networks?"""
    if isinstance(nets, NetSet):
        return nets.contains(ip)
    try:
        addr = ipaddress.ip_address(normalize_ip(ip))
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in nets)


class NetSet:
    """Networks looked up by prefix length, not one by one.

    A ratify list may hold thousands of ranges and is asked on every
    connection; a lookup costs one set probe per distinct prefix length.
    """

    __slots__ = ("nets", "_by_len")

    def __init__(self, nets):
        self.nets = tuple(nets)
        self._by_len = {}  # (version, prefix length) -> set of network numbers
        for n in self.nets:
            shift = n.max_prefixlen - n.prefixlen
            key = (n.version, n.prefixlen, shift)
            self._by_len.setdefault(key, set()).add(int(n.network_address) >> shift)

    def contains(self, ip):
        try:
            addr = ipaddress.ip_address(normalize_ip(ip))
        except ValueError:
            return False
        number, version = int(addr), addr.version
        return any(v == version and (number >> shift) in numbers
                   for (v, _, shift), numbers in self._by_len.items())

    def __iter__(self):
        return iter(self.nets)

    def __len__(self):
        return len(self.nets)

    def __bool__(self):
        return bool(self.nets)


def is_trusted(peer_ip, ournets, authenticated=False):
    nets = DEFAULT_OURNETS if ournets is None else ournets
    return authenticated or in_nets(peer_ip, nets)


def domain_matches(domain, pattern):
    """upas dommatch: ``*.dom`` is dom and below; else exact; any case."""
    domain, pattern = domain.lower(), pattern.lower()
    if pattern.startswith("*."):
        base = pattern[2:]
        return domain == base or domain.endswith("." + base)
    return domain == pattern


def literal_of(ip):
    return "[%s]" % normalize_ip(ip)


class Ours:
    """What counts as our mail domain: names, ``ourdomains``, local IPs."""

    def __init__(self, names=(), ourdomains=(), local_ips=()):
        self.names = frozenset(n.lower() for n in names if n)
        self.ourdomains = tuple(ourdomains)
        self.local_ips = tuple(local_ips)
        self.literals = frozenset(literal_of(ip) for ip in self.local_ips)
        self._with = {}  # local IP -> Ours: every connection to it shares one

    def is_ours(self, component):
        c = component.lower()
        if "." not in c and not c.startswith("["):
            return True
        if c in self.names or c in self.literals:
            return True
        return any(domain_matches(c, p) for p in self.ourdomains)

    def with_local_ip(self, ip):
        """The same, plus the address a connection came in on."""
        ours = self._with.get(ip)
        if ours is None:
            ours = self._with[ip] = Ours(self.names, self.ourdomains, self.local_ips + (ip,))
        return ours


def loopback_rewrite(path, peer_ip):
    """``[]!user`` or ``dom![]!user`` -> ``[<peer>]!user`` (spam.c forwarding)."""
    parts = path.split("!")
    if len(parts) > 1 and parts[0] == "[]":
        return "!".join([literal_of(peer_ip)] + parts[1:])
    if len(parts) > 2 and parts[1] == "[]":
        return "!".join([literal_of(peer_ip)] + parts[2:])
    return path


def check_recipient(path, peer_ip, trusted, relay_control, ours):
    """Relay decision for one RCPT path in bang form.

    Returns ``Accept(path)`` with the path as it should be shown and
    delivered (after the loopback rewrite), or the relay refusal.
    """
    path = loopback_rewrite(path, peer_ip)
    if path.startswith(literal_of(peer_ip) + "!"):
        return Accept(path)
    if trusted or not relay_control:
        return Accept(path)
    hops = path.split("!")[:-1]
    if all(ours.is_ours(h) for h in hops):
        return Accept(path)
    return replies.no_relay()


def route(path, ours):
    """Where an accepted recipient goes: ("local", user) or ("remote", path).

    Leading components that are ours are stripped; what is left with no
    hop is a local user, otherwise a remote path whose first component is
    the next hop.
    """
    parts = path.split("!")
    while len(parts) > 1 and ours.is_ours(parts[0]):
        parts = parts[1:]
    if len(parts) == 1:
        return ("local", parts[0])
    return ("remote", "!".join(parts))


def first_address(value):
    """The first address in a header field value (rough, as upas's grammar)."""
    tokens = [(k, t) for k, t in header_tokens(value) if k not in ("ws", "comment")]
    texts = [t for _, t in tokens]
    if "<" in texts:
        start = texts.index("<") + 1
        end = texts.index(">", start) if ">" in texts[start:] else len(texts)
        return "".join(texts[start:end])
    out = []
    for k, t in tokens:
        if k == "special" and t in ",;:":
            if t == ":":  # a group name; the address follows
                out = []
                continue
            break
        out.append(t)
    return "".join(out)


def address_domain(addr, him):
    """upas masquerade: after the last ``@``, else the first bang component, else him."""
    if "@" in addr:
        return addr.rsplit("@", 1)[1]
    if "!" in addr:
        return addr.split("!", 1)[0]
    return him


def forgery_warnings(sender, fields, him, ours):
    """The ``X-warning:`` texts for an untrusted peer (spam.c masquerade).

    ``sender`` is the last MAIL sender (bang form), ``fields`` the parsed
    header fields as (lowercased name, value).  Mail from outside that
    claims to come from one of our domains is tagged, unless a ``Sender:``
    that is not ours shows it came through a mailing list.
    """
    warnings = []
    if sender and sender != NULL_SENDER and ours.is_ours(sender.split("!", 1)[0]):
        warnings.append("suspect envelope domain")
    check_from = True
    for name, value in fields:
        if name == "sender":
            if ours.is_ours(address_domain(first_address(value), him)):
                warnings.append("suspect Sender: domain")
            else:
                check_from = False
                break
    if check_from:
        for name, value in fields:
            if name == "from" and ours.is_ours(address_domain(first_address(value), him)):
                warnings.append("suspect From: domain")
    return warnings
