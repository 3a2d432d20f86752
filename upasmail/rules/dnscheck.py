"""DNS facts for the smtpd checks, through a ``twisted.names`` IResolver.

upas asks ndb/dns; here every lookup goes to an injected resolver and is
bounded by ``timeout`` seconds on the injected clock.  Errors map as the
spec (§4) says: ``DNSNameError`` (NXDOMAIN) is a permanent "no such name";
server failures and timeouts are temporary.  These functions never fail:
they fire with a status.

``name_status(name)``: EXISTS (some record), NODATA (the name exists but
has none of ANY/A/AAAA/MX), NXDOMAIN, or TEMPFAIL.  ANY is tried first (as
upas's ``dnsquery(..., "any")``); servers that refuse ANY or answer it
minimally (RFC 8482) get A, AAAA and MX queries instead.
"""

import ipaddress

from twisted.internet import defer
from twisted.names import dns, error
from twisted.python.failure import Failure

EXISTS, NODATA, NXDOMAIN, TEMPFAIL = "exists", "nodata", "nxdomain", "tempfail"
DNS_TIMEOUT = 20.0
_PERMANENT_REFUSALS = (error.DNSQueryRefusedError, error.DNSNotImplementedError,
                       error.DNSFormatError)


def query(resolver, method, name, clock, timeout):
    """Fire with (status, answers); never fails."""
    try:
        d = getattr(resolver, method)(name)
    except Exception:
        d = defer.fail(Failure())
    d.addTimeout(timeout, clock)

    def ok(result):
        answers = result[0] if isinstance(result, tuple) else result
        return (EXISTS if answers else NODATA), list(answers)

    def failed(f):
        if f.check(error.DNSNameError):
            return NXDOMAIN, []
        if f.check(*_PERMANENT_REFUSALS):
            return NODATA, []
        return TEMPFAIL, []

    return d.addCallbacks(ok, failed)


@defer.inlineCallbacks
def name_status(resolver, name, clock, timeout=DNS_TIMEOUT):
    status, answers = yield query(resolver, "lookupAllRecords", name, clock, timeout)
    if status in (EXISTS, NXDOMAIN, TEMPFAIL):
        return status
    results = yield defer.gatherResults([
        query(resolver, m, name, clock, timeout)
        for m in ("lookupAddress", "lookupIPV6Address", "lookupMailExchange")
    ])
    statuses = [s for s, _ in results]
    if EXISTS in statuses:
        return EXISTS
    if NXDOMAIN in statuses:
        return NXDOMAIN
    if TEMPFAIL in statuses:
        return TEMPFAIL
    return NODATA


def _names_of(answers, rtype):
    out = []
    for rr in answers:
        if rr.type == rtype:
            out.append(str(rr.payload.name).rstrip(".").lower())
    return out


def ptr_names(resolver, ip, clock, timeout=DNS_TIMEOUT):
    """Fire with the PTR names of ``ip`` (lowercased, no final dot); [] on failure."""
    try:
        rev = ipaddress.ip_address(ip).reverse_pointer
    except ValueError:
        return defer.succeed([])
    d = query(resolver, "lookupPointer", rev, clock, timeout)
    return d.addCallback(lambda r: _names_of(r[1], dns.PTR))


@defer.inlineCallbacks
def addresses(resolver, name, clock, timeout=DNS_TIMEOUT):
    """Fire with (status, [ip text]) from the A and AAAA records of ``name``."""
    results = yield defer.gatherResults([
        query(resolver, m, name, clock, timeout)
        for m in ("lookupAddress", "lookupIPV6Address")
    ])
    ips = []
    for _, answers in results:
        for rr in answers:
            if rr.type in (dns.A, dns.AAAA):
                ips.append(rr.payload.dottedQuad() if rr.type == dns.A
                           else ipaddress.ip_address(rr.payload.address).compressed)
    statuses = [s for s, _ in results]
    if ips:
        return EXISTS, ips
    if TEMPFAIL in statuses:
        return TEMPFAIL, []
    return (NXDOMAIN if NXDOMAIN in statuses else NODATA), []
