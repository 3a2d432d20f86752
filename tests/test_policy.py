"""Pure policy modules: address, grammar, conf, relay.  No sockets."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from upasmail import address, conf, grammar, policy, relay
from upasmail.decision import Accept, Reject, reject


# -- address ---------------------------------------------------------------

@pytest.mark.parametrize("path,bang", [
    ("<>", "/dev/null"),
    ("<bob>", "bob"),
    ("<bob@example.com>", "example.com!bob"),
    ("<Alice@B.Example>", "B.Example!Alice"),
    ("<@r1.example,@r2.example:joe@c.example>", "r1.example!r2.example!c.example!joe"),
    ("<joe@[]>", "[]!joe"),
    ("<joe@[192.0.2.1]>", "[192.0.2.1]!joe"),
    ("<joe@[IPv6:2001:db8::1]>", "[2001:db8::1]!joe"),
    ("<host!bob>", "host!bob"),
    ('<"a b"@example.com>', 'example.com!"a b"'),
    # a quoted-pair that must stay quoted keeps its backslash (else "a"b"); others need none
    ('<"a\\"b"@example.com>', 'example.com!"a\\"b"'),
    ('<"a\\\\b"@example.com>', 'example.com!"a\\\\b"'),
    ('<"a\\b"@example.com>', 'example.com!"ab"'),
    ("<bob@example.com.>", "example.com!bob"),
    ("<x@#123>", "#123!x"),
])
def test_parse_path(path, bang):
    assert address.parse_path(path) == bang


@pytest.mark.parametrize("path", ['<"a\\"b"@x.example>', '<"a\\\\b"@x.example>',
                                  '<"a b"@x.example>'])
def test_quoted_local_parts_leave_as_they_came(path):
    from upasmail import convert, local

    bang = address.parse_path(path)
    # the relay's MAIL FROM and the mailbox's Return-Path name the same mailbox
    assert convert.mail_from(bang, "h.example") == path
    assert "<%s>" % local.at_form(bang, "d.example") == path
    assert address.parse_path(convert.mail_from(bang, "h.example")) == bang


@pytest.mark.parametrize("path", [
    "bob@example.com", "<bob@example.com", "<bob@-bad.example>", "<bob@ex..ample>",
    "<.bob@example.com>", "<bob@[300.1.1.1]>", "<b(o)b@example.com>", "<bob@>",
    '<"unterminated@example.com>', "<@r1:>",
])
def test_parse_path_errors(path):
    with pytest.raises(address.AddressError):
        address.parse_path(path)


# -- grammar ---------------------------------------------------------------

def test_grammar_verbs_and_values():
    c = grammar.parse(b"mail FROM:   <a@b.example>  auth=<>")
    assert (c.verb, c.arg, c.params) == ("MAIL", "b.example!a", {"AUTH": "<>"})
    assert grammar.parse(b"SEND FROM:<a@b.example>").verb == "MAIL"
    assert grammar.parse(b"MAIL FROM:<a@b.example> AUTH= <>").params == {"AUTH": "<>"}
    assert grammar.parse(b"EHLO mx.example.net.").arg == "mx.example.net"
    assert grammar.parse(b"HELO [IPv6:::1]").arg == "[::1]"
    assert grammar.parse(b"AUTH cram-md5").arg == "CRAM-MD5"
    assert grammar.parse(b"AUTH PLAIN AGJvYgBwdw==").extra == "AGJvYgBwdw=="
    assert grammar.parse(b"NOOP\r").verb == "NOOP"


@pytest.mark.parametrize("line", [
    b"", b"XYZZY", b"RCPT TO:<a@b.example> NOTIFY=NEVER", b"DATA now", b"VRFY john.doe",
    b"MAIL FROM:<a@b.example> SIZE=ten", b"MAIL FROM:<a@b.example> AUTH=<> AUTH=<>",
    b"MAIL FROM:<a@b.example>junk", b"AUTH", b"HELO", b"\xc3\xa9HLO x.example",
])
def test_grammar_errors(line):
    with pytest.raises(grammar.CommandSyntaxError):
        grammar.parse(line)


# -- conf ------------------------------------------------------------------

def test_conf_keywords():
    c = conf.parse(
        "defaultdomain Example.ORG\n"
        "norelay on  # comment\n"
        "ournets 10.0.0.0/8, 192.168.1.0/24\n"
        "ournets 2001:db8::/32\n"
        "ourdomains *.Example.com example.net\n"
        "verifysenderdom off\n"
        "saveblockedmsg off\n"
    )
    assert c.defaultdomain == "example.org"
    assert c.norelay is True
    assert c.ournets == tuple(ipaddress.ip_network(n) for n in
                              ("10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"))
    assert c.ourdomains == ("*.example.com", "example.net")


def test_conf_tokenizer():
    assert conf.tokenize("a,b\tc  d # e") == ["a", "b", "c", "d"]
    assert conf.tokenize(r"x a\,b \#c") == ["x", "a,b", "#c"]


@pytest.mark.parametrize("text,where", [
    ("norelay maybe\n", "smtpd.conf:1: expected 'on' or 'off'"),
    ("\n\nournets 10.0.0.300/8\n", "smtpd.conf:3: bad address or CIDR '10.0.0.300/8'"),
    ("ournets 10.1.2\n", "smtpd.conf:1: bad address or CIDR '10.1.2'"),
    ("relayhost x\n", "smtpd.conf:1: unknown keyword 'relayhost'"),
    ("ourdomains bad..example\n", "smtpd.conf:1: bad domain pattern 'bad..example'"),
    ("defaultdomain\n", "smtpd.conf:1: missing domain"),
])
def test_conf_errors_name_file_and_line(text, where):
    with pytest.raises(conf.ConfigError) as e:
        conf.parse(text)
    assert str(e.value) == where


def test_conf_unreadable(tmp_path):
    with pytest.raises(conf.ConfigError) as e:
        conf.load(str(tmp_path / "missing.conf"))
    assert "missing.conf: cannot read" in str(e.value)
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"norelay on\nourdomains caf\xe9\n")
    with pytest.raises(conf.ConfigError) as e:
        conf.load(str(bad))
    assert str(e.value) == "%s:2: not UTF-8 text" % bad


# -- relay -----------------------------------------------------------------

OURS = relay.Ours(["gnot.example.org", "gnot"], ["*.example.com", "example.net"], ["192.0.2.1"])


@pytest.mark.parametrize("path,ok", [
    ("bob", True), ("gnot!bob", True), ("gnot.example.org!bob", True),
    ("GNOT.Example.ORG!bob", True), ("example.com!bob", True), ("a.b.example.com!bob", True),
    ("badexample.com!bob", False), ("example.net!bob", True), ("sub.example.net!bob", False),
    ("[192.0.2.1]!bob", True), ("[192.0.2.2]!bob", False),
    ("example.com!foreign.example!bob", False),
])
def test_check_recipient_untrusted(path, ok):
    v = relay.check_recipient(path, "198.51.100.9", False, True, OURS)
    assert v.ok is ok
    if not ok:
        assert v == reject(550, "5.7.1 we don't relay.  send to your-path@[] for loopback.")


def test_loopback_rewrite():
    assert relay.check_recipient("[]!joe", "198.51.100.9", False, True, OURS) == \
        Accept("[198.51.100.9]!joe")
    assert relay.check_recipient("gnot.example.org![]!joe", "198.51.100.9", False, True,
                                 OURS) == Accept("[198.51.100.9]!joe")
    assert relay.check_recipient("[]!joe", "::ffff:198.51.100.9", True, True, OURS) == \
        Accept("[198.51.100.9]!joe")


def test_trusted_or_relay_off_accepts_anything():
    assert relay.check_recipient("far.example!x", "198.51.100.9", True, True, OURS).ok
    assert relay.check_recipient("far.example!x", "198.51.100.9", False, False, OURS).ok


def test_is_trusted():
    assert relay.is_trusted("127.0.0.1", None)
    assert relay.is_trusted("::1", None)
    assert relay.is_trusted("::ffff:127.0.0.1", None)
    assert not relay.is_trusted("127.0.0.2", None)
    nets = (ipaddress.ip_network("192.168.1.0/24"),)
    assert relay.is_trusted("192.168.1.7", nets)
    assert not relay.is_trusted("127.0.0.1", nets)
    assert relay.is_trusted("203.0.113.5", nets, authenticated=True)


def test_route():
    assert relay.route("bob", OURS) == ("local", "bob")
    assert relay.route("example.com!bob", OURS) == ("local", "bob")
    assert relay.route("example.com!far.example!bob", OURS) == ("remote", "far.example!bob")
    assert relay.route("[198.51.100.9]!joe", OURS) == ("remote", "[198.51.100.9]!joe")


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32), st.ip_addresses(v=4))
def test_in_nets_agrees_with_ipaddress(net_ip, prefix, ip):
    net = ipaddress.ip_network("%s/%d" % (net_ip, prefix), strict=False)
    assert relay.in_nets(str(ip), [net]) == (ip in net)


@given(st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,3}", fullmatch=True),
       st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,2}", fullmatch=True))
def test_domain_wildcard_matches_self_and_below(sub, base):
    assert relay.domain_matches(base, "*." + base)
    assert relay.domain_matches(sub + "." + base, "*." + base.upper())
    assert not relay.domain_matches("x" + base, "*." + base)


# -- decision --------------------------------------------------------------

def test_a_table_stops_at_first_refusal():
    calls = []

    def ok(s, cmd, conf, looked):
        calls.append("ok")
        return Accept()

    def no(s, cmd, conf, looked):
        calls.append("no")
        return reject(550, "no")

    outcome = policy.run((ok, no, ok), None, None, None, policy.Facts())
    assert outcome.decision == Reject(550, ("no",))
    assert outcome.check == "no"
    assert calls == ["ok", "no"]
    assert reject(451, "later").temporary
