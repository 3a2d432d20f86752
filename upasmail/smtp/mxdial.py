"""Finding and dialling the server (upas mxdial.c), through ``twisted.names``.

Spec upas-behaviour.md §2.2 and §2.4.  A destination is a Plan 9 dial
string ``[/netdir/][net|tcp!]host[!service]``: no ``!`` means ``net!host``
on the smtp service; the service is a name (``smtp`` 25, ``ssmtp``/
``smtps``/``submissions`` 465, ``submission`` 587, or any name the
system knows) or a port number; a netdir is accepted and ignored.

``plan`` answers where to connect, in order:

* a host that is an IP address: that address;
* otherwise its MX records, lowest preference first (answer order within
  a preference), each MX host's A records (and AAAA with ``ipv6``), MX
  hosts named with ``-b`` skipped;
* with no MX records at all, the host's own addresses (upas's "ip" query).

Refusals are ``DialError``\\s, permanent or temporary as upas decides;
the permanence is set here, where the reason is known (upas reads it
back from the text, docs/deviations.rst):

* ``[literal]`` as the last component: ``illegal address``;
* a ``$meta`` name (Plan 9 cs): ``can't translate``;
* an MX host resolving to 127.0.0.1, ::1, 0.0.0.0, :: or one of our own
  addresses: ``illegal: domain D lists IP as mail server``, and no
  connection at all;
* a null MX (RFC 7505, ``MX 0 .``): ``illegal: domain D accepts no mail``;
* NXDOMAIN, or a name with neither MX nor address: ``can't translate``.
  NXDOMAIN for the MX question still leads to the address lookup, where
  the resolver's hosts file (``/etc/hosts``) can answer: ``localhost``
  is dialled at its hosts address;
* a DNS server failure or timeout: temporary.

Unlike upas, a domain whose MX hosts all fail is not retried on its own A
record (RFC 5321 5.1); see docs/deviations.rst.  ``ddomain`` is the owner
name of the first MX (or address) answer, else the host itself.
"""

import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.names import dns

from .. import replies
from ..rules.dnscheck import EXISTS, NODATA, NXDOMAIN, TEMPFAIL, addresses, query

NEVER_MAIL_SERVERS = frozenset(ipaddress.ip_address(a) for a in
                               ("127.0.0.1", "::1", "0.0.0.0", "::"))
_SERVICES = {"smtp": 25, "ssmtp": 465, "smtps": 465, "submissions": 465, "submission": 587}
DNS_TIMEOUT = 60.0


class DialError(Exception):
    def __init__(self, text, permanent):
        Exception.__init__(self, text)
        self.text = text
        self.permanent = permanent


@dataclass(frozen=True)
class DialString:
    host: str
    port: int
    proto: str = "net"


@dataclass(frozen=True)
class Target:
    ip: str
    port: int
    mx: Optional[str] = None  # the MX host name, None for an address lookup

    def describe(self):
        """upas's ``(<mxhost>:<ip>)``."""
        return "(%s:%s)" % (self.mx or self.ip, self.ip)


def local_addresses():
    """Our own addresses, as the machine's name resolves (best effort)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return ()
    return tuple(sorted({info[4][0].split("%")[0] for info in infos}))


def service_port(service):
    if service.isdigit() and 0 < int(service) < 65536:
        return int(service)
    if service in _SERVICES:
        return _SERVICES[service]
    try:
        return socket.getservbyname(service, "tcp")
    except OSError:
        raise DialError("can't translate service %s" % service, True) from None


def parse_dial(text, default_service="smtp"):
    """A dial string → DialString; DialError for what upas refuses."""
    if text.startswith("/"):  # an explicit network directory: no meaning here
        text = text.split("/", 2)[-1] if text.count("/") >= 2 else ""
    parts = text.split("!")
    if parts and parts[-1].startswith("["):
        raise DialError(replies.ILLEGAL_ADDRESS.format(kind="delivery", way="to", addr=text),
                        True)
    if len(parts) == 1:
        proto, host, service = "net", parts[0], default_service
    elif len(parts) == 2:
        proto, host, service = parts[0], parts[1], default_service
    elif len(parts) == 3:
        proto, host, service = parts
    else:
        raise DialError("illegal dial string %s" % text, True)
    if proto not in ("net", "tcp"):
        raise DialError("illegal network %s in %s" % (proto, text), True)
    if not host:
        raise DialError("illegal dial string %s" % text, True)
    if host.startswith("$"):
        raise DialError("can't translate %s: no meta-names here" % host, True)
    return DialString(host.rstrip(".").lower(), service_port(service), proto)


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _never(ip, ours):
    addr = ipaddress.ip_address(ip)
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return addr in NEVER_MAIL_SERVERS or addr in ours


@defer.inlineCallbacks
def _addresses(resolver, name, clock, ipv6, timeout):
    if ipv6:
        status, ips = yield addresses(resolver, name, clock, timeout)
        return status, ips
    status, answers = yield query(resolver, "lookupAddress", name, clock, timeout)
    ips = [rr.payload.dottedQuad() for rr in answers if rr.type == dns.A]
    return (EXISTS if ips else status if status != EXISTS else NODATA), ips


@defer.inlineCallbacks
def plan(resolver, clock, dial, busted=(), ipv6=False, ours=(), timeout=DNS_TIMEOUT):
    """Fire with (ddomain, [Target, ...]) or fail with DialError."""
    host, port = dial.host, dial.port
    if _is_ip(host):
        return "", [Target(host, port)]
    ours = frozenset(ipaddress.ip_address(a) for a in ours)
    busted = {b.rstrip(".").lower() for b in busted}
    ddomain = host if "." in host else ""
    mx_status, answers = yield query(resolver, "lookupMailExchange", host, clock, timeout)
    if mx_status == TEMPFAIL:
        raise DialError("dns failure looking up MX for %s" % host, False)
    # NXDOMAIN from DNS is not the last word: a hosts file has names but no
    # MX, so the address lookup below still gets its turn
    mxs = [rr for rr in answers if rr.type == dns.MX]
    if mxs:
        owner = str(mxs[0].name).rstrip(".")
        ddomain = owner if "." in owner else ddomain
        named = [(rr.payload.preference, str(rr.payload.name).rstrip(".").lower())
                 for rr in mxs]
        named.sort(key=lambda pn: pn[0])  # stable: answer order within a preference
        real = [(p, n) for p, n in named if n]
        if not real:
            raise DialError("illegal: domain %s accepts no mail (null MX)" % host, True)
        wanted = [(p, n) for p, n in real if n not in busted]
        if not wanted:
            raise DialError("no MX for %s left after -b" % host, False)
        results = yield defer.gatherResults(
            [_addresses(resolver, n, clock, ipv6, timeout) for _, n in wanted])
        targets = []
        for (_, name), (_, ips) in zip(wanted, results):
            for ip in ips:
                if _never(ip, ours):
                    raise DialError("illegal: domain %s lists %s as mail server" % (host, ip),
                                    True)
                targets.append(Target(ip, port, name))
        if targets:
            return ddomain, targets
        if any(s == TEMPFAIL for s, _ in results):
            raise DialError("dns failure looking up the mail servers of %s" % host, False)
        raise DialError("can't translate the mail servers of %s" % host, True)
    status, ips = yield _addresses(resolver, host, clock, ipv6, timeout)
    if status == TEMPFAIL:
        raise DialError("dns failure looking up %s" % host, False)
    if not ips:
        why = "no such domain" if NXDOMAIN in (mx_status, status) else "no MX and no address"
        raise DialError("can't translate %s: %s" % (host, why), True)
    return ddomain, [Target(ip, port) for ip in ips]


@defer.inlineCallbacks
def gateway_targets(resolver, clock, dial, ipv6=False, timeout=DNS_TIMEOUT):
    """``-g``: the gateway's own addresses (no MX), or DialError."""
    if _is_ip(dial.host):
        return [Target(dial.host, dial.port, dial.host)]
    status, ips = yield _addresses(resolver, dial.host, clock, ipv6, timeout)
    if not ips:
        raise DialError("can't translate gateway %s" % dial.host, status != TEMPFAIL)
    return [Target(ip, dial.port, dial.host) for ip in ips]
