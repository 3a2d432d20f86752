"""The ratify matcher, list parsing, DNS facts and the -d trace, without sessions."""

import ipaddress
import os

import pytest
from hypothesis import given, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.names import client, dns
from twisted.trial import unittest

from upasmail import conf, dnscheck, greylist, helo, listening, ratify, tarpit, testing, trace


# -- account patterns --------------------------------------------------------

@pytest.mark.parametrize("pattern,name,match", [
    ("cyberpromo.com!*", "cyberpromo.com!joe", True),
    ("cyberpromo.com", "relay.example!cyberpromo.com!joe", True),  # any component
    ("*.cyberpromo.com", "mx.cyberpromo.com!joe", True),
    ("*.cyberpromo.com", "cyberpromo.com!joe", True),
    ("*.cyberpromo.com", "badcyberpromo.com!joe", False),
    ("*!freeporn*", "spam.example!freeporn4u", True),
    ("*!freeporn*", "spam.example!porn", False),
    ("cse.psu.edu!owner-9fans", "cse.psu.edu!owner-9fans", True),
    ("cse.psu.edu!owner-9fans", "cse.psu.edu!owner-9fansx", False),
    ("cse.psu.edu!owner-9fans", "x.example!cse.psu.edu!owner-9fans", True),  # last domain
    ("cse.psu.edu!owner-9fans", "cse.psu.edu!x.example!owner-9fans", False),
    ("!bob", "any.example!bob", True),
    ("example.org!bob", "bob", False),
])
def test_account_match(pattern, name, match):
    assert ratify.account_match(pattern, name) is match


def test_sample_blocked_file():
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "blocked")) as f:
        lists = ratify.parse(f.read())
    assert lists.account_action("cyberpromo.com!joe") == "block"
    assert lists.account_action("cse.psu.edu!owner-9fans") == "accept"
    assert lists.ip_action("152.167.1.1") == "dial"
    assert lists.ip_action("63.12.1.1") == "accept"


@pytest.mark.parametrize("text,error", [
    ("blokc 10.0.0.1\n", "blocked:1: unknown verb 'blokc'"),
    ("\n\ndial 10.0.0.300\n", "blocked:3: bad address or CIDR '10.0.0.300'"),
    ("*block *\n", "blocked:1: pattern '*' would match every sender"),
    ("*block *!*\n", "blocked:1: pattern '*!*' would match every sender"),
    ("deny\n", "blocked:1: deny without values"),
])
def test_parse_errors_name_file_and_line(text, error):
    with pytest.raises(conf.ConfigError) as e:
        ratify.parse(text, "blocked")
    assert str(e.value) == error


def test_parse_syntax_as_smtpd_conf():
    lists = ratify.parse("Dial 10.0.0.0\\#8,10.1.0.0/16 # comment\n* Block Spam.Example\n"
                         "accept 10.0.0.1\ntrusted 192.0.2.0/24\n")
    assert lists.ip_action("10.2.3.4") == "dial"
    assert lists.ip_action("10.0.0.1") == "accept"
    assert lists.account_action("SPAM.example!x") == "block"
    assert lists.is_trusted("192.0.2.9") and not lists.is_trusted("10.0.0.1")


# -- property: the matcher agrees with a simple reference --------------------

def ref_ip_action(entries, ip):
    """Reference: integers and masks by hand, first action in precedence order."""
    addr = int(ipaddress.IPv4Address(ip))
    for action in ratify.ACTIONS:
        for net, plen in entries.get(action, ()):
            mask = ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
            if addr & mask == int(ipaddress.IPv4Address(net)) & mask:
                return "accept" if action == "allow" else action
    return "accept"


def ref_domain(d, pat):
    if pat.startswith("*."):
        return d == pat[2:] or d.endswith("." + pat[2:])
    return d == pat


def ref_account(pattern, name):
    *doms, user = name.split("!")
    if "!" in pattern:
        i = pattern.rindex("!")
        pdom, puser = pattern[:i], pattern[i + 1:]
    else:
        pdom, puser = pattern, ""
    if puser in ("", "*"):
        return any(ref_domain(d, pdom) for d in doms)
    ok = user.startswith(puser[:-1]) if puser.endswith("*") else user == puser
    return ok and (pdom in ("", "*") or (bool(doms) and ref_domain(doms[-1], pdom)))


octet = st.integers(0, 255)
ipv4 = st.tuples(octet, octet, octet, octet).map(lambda t: "%d.%d.%d.%d" % t)
label = st.sampled_from(["a", "b", "ab", "x1"])
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
user = st.sampled_from(["bob", "bo", "bobby", "eve", "b"])


@given(st.dictionaries(st.sampled_from(ratify.ACTIONS),
                       st.lists(st.tuples(ipv4, st.integers(0, 32)), min_size=1, max_size=4),
                       max_size=5),
       ipv4)
def test_ip_matcher_agrees_with_reference(entries, ip):
    text = "".join("%s %s\n" % (a, ", ".join("%s/%d" % e for e in es))
                   for a, es in entries.items())
    assert ratify.parse(text).ip_action(ip) == ref_ip_action(entries, ip)


account_pattern = st.one_of(
    domain, domain.map(lambda d: "*." + d),
    st.tuples(st.sampled_from(["", "*", "a", "*.a", "a.b"]),
              st.sampled_from(["bob", "bo*", "*", "", "eve"])).map("!".join),
).filter(lambda p: p not in ratify.MATCH_ALL)


@given(account_pattern, st.lists(domain, max_size=3), user)
def test_account_matcher_agrees_with_reference(pattern, doms, u):
    name = "!".join(doms + [u])
    assert ratify.account_match(pattern, name) == ref_account(pattern, name)


# -- other pure decisions ----------------------------------------------------

def test_tarpit_delay_and_limits():
    assert tarpit.delay(0, 1, 300) == 0
    assert [tarpit.delay(n, 1, 1e9) for n in (1, 2, 3)] == [8, 16, 32]
    assert tarpit.delay(1000, 1, 300) == 300
    assert tarpit.delay(5, 0, 300) == 0
    assert tarpit.rejectcheck(100, False).ok
    assert tarpit.rejectcheck(101, False).lines == (tarpit.TOO_MANY,)
    assert tarpit.rejectcheck(3, True).code == 554


def test_helo_static_checks():
    assert helo.static_lie("gnot") and helo.static_lie("x.LocalHost")
    assert helo.static_lie("www.example.org") and helo.static_lie("[192.0.2.1]")
    assert not helo.static_lie("mx.sender.net")
    assert helo.claims_to_be_us("192.0.2.1", "1.2.3.4", "5.6.7.8", "d.example", ())
    assert not helo.claims_to_be_us("[192.0.2.1]", "1.2.3.4", "5.6.7.8", "d.example", ())
    assert not helo.claims_to_be_us("d.example", "1.2.3.4", "1.2.3.4", "d.example", ())


def test_greylist_rules():
    assert greylist.user_of("example.com!bob") == "bob"
    assert greylist.user_of("x!..") is None and greylist.user_of("x!") is None
    assert not greylist.is_recent(299) and greylist.is_recent(300)
    assert greylist.is_recent(14 * 3600) and not greylist.is_recent(14 * 3600 + 1)


# -- DNS facts against a real twisted.names server on 127.0.0.1 ---------------

class DNSCheckTests(unittest.TestCase):
    def setUp(self):
        zone = {"mx.sender.net": [dns.Record_A("192.0.2.7"), dns.Record_AAAA("2001:db8::7")],
                "mailonly.sender.net": [dns.Record_MX(10, "mx.sender.net")],
                "7.2.0.192.in-addr.arpa": [dns.Record_PTR("mx.sender.net")]}
        port = testing.serveDNS(reactor, testing.FakeResolver(zone, failing=["broken.sender.net"]))
        self.addCleanup(port.tcpPort.stopListening)
        self.addCleanup(port.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port.getHost().port)],
                                        timeout=(2,))
        self.addCleanup(lambda: [c.cancel() for c in reactor.getDelayedCalls()
                                 if "maybeParseConfig" in repr(c)])

    @defer.inlineCallbacks
    def test_status_of_names(self):
        statuses = yield defer.gatherResults([
            dnscheck.name_status(self.resolver, n, reactor)
            for n in ("mx.sender.net", "mailonly.sender.net", "none.sender.net",
                      "broken.sender.net")])
        self.assertEqual(statuses, [dnscheck.EXISTS, dnscheck.EXISTS, dnscheck.NXDOMAIN,
                                    dnscheck.TEMPFAIL])

    @defer.inlineCallbacks
    def test_ptr_and_addresses(self):
        names = yield dnscheck.ptr_names(self.resolver, "192.0.2.7", reactor)
        self.assertEqual(names, ["mx.sender.net"])
        status, ips = yield dnscheck.addresses(self.resolver, "mx.sender.net", reactor)
        self.assertEqual((status, sorted(ips)), (dnscheck.EXISTS, ["192.0.2.7", "2001:db8::7"]))
        status, ips = yield dnscheck.addresses(self.resolver, "broken.sender.net", reactor)
        self.assertEqual((status, ips), (dnscheck.TEMPFAIL, []))


def test_timeout_is_a_temporary_failure():
    clock = task.Clock()
    d = dnscheck.name_status(testing.FakeResolver(hanging=["slow.example"]), "slow.example",
                             clock, timeout=5)
    clock.advance(5)
    assert d.result == dnscheck.TEMPFAIL


# -- -d trace ------------------------------------------------------------------

def test_trace_records_every_byte(tmp_path):
    s = testing.make_settings("", root=str(tmp_path / "mail"))
    clock = task.Clock()
    factory = testing.Dialogue(s, clock=clock).factory
    traced = trace.TraceFactory(factory, str(tmp_path / "log"), clock)
    proto = traced.buildProtocol(testing.address("127.0.0.2", 1))
    proto.makeConnection(StringTransport(peerAddress=testing.address("127.0.0.2", 1),
                                         hostAddress=testing.address("127.0.0.1", 25)))
    proto.dataReceived(b"NOOP\r\n")
    proto.connectionLost(None)
    [name] = os.listdir(tmp_path / "log" / "smtpdb")
    assert name.endswith(".1.127.0.0.2")
    text = (tmp_path / "log" / "smtpdb" / name).read_text()
    assert "C 1: b'NOOP\\r\\n'" in text
    assert "SV 1: [b'220 gnot.example.org ESMTP', b'\\r\\n']" in text
    assert "250 2.0.0 Nothing to see here" in text


def test_trace_skips_banned_peers(tmp_path):
    s = testing.make_settings("", root=str(tmp_path / "mail"),
                              evil=(ipaddress.ip_network("127.0.0.2/32"),))
    factory = testing.Dialogue(s, peer="127.0.0.3").factory
    traced = trace.TraceFactory(factory, str(tmp_path / "log"), task.Clock())
    assert isinstance(traced.buildProtocol(testing.address("127.0.0.2", 1)), listening.Dropped)
    assert os.listdir(tmp_path / "log" / "smtpdb") == []
