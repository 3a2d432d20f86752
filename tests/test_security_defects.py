"""Issue 13, items 5-8: a PROXY listener refused, malformed CRAM-MD5
responses, the AUTH failure budget per client address, over-long paths.

Sessions run over ``testing.Dialogue`` (StringTransport, task.Clock);
several connections from one address share the Dialogue's factory.  The
start-up check runs a real ``twistd``.
"""

import base64
import hashlib
import hmac
import ipaddress
import os
import shutil
import tempfile

import pytest
from twisted.cred import checkers, credentials, error
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.testing import StringTransport
from twisted.plugin import IPlugin
from twisted.protocols.haproxy._parser import unparseEndpoint
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer

from test_twistd import twistd
from upasmail import auth, conf, service, tap_smtpd, testing
from upasmail.listening import ListeningService
from upasmail.smtpd.proxylistener import ProxyEndpoint

SECRET = "s3cret-Pa55"
POOR_CRAM = "501 5.5.4 Poorly formed CRAM-MD5 response"
FAILED = "535 5.7.1 Authentication failed"
TOO_MANY = ("421 4.7.0 gnot.example.org Too many failed authentication attempts; "
            "closing connection")
NOOP_OK = ["250 2.0.0 Nothing to see here. Move along ..."]


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def plain(password=SECRET):
    return b64("\0alice\0" + password)


class Case(unittest.TestCase):
    peer = "127.0.0.2"

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="upasmail-security-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def dialogue(self, checker=None, **kw):
        lib = self.root + "/lib"
        os.makedirs(lib, exist_ok=True)
        with open(lib + "/passwd", "w") as f:
            f.write("alice:%s\n" % SECRET)
        os.chmod(lib + "/passwd", 0o600)
        s = testing.make_settings("norelay on\n", root=self.root, **kw)
        d = testing.Dialogue(s, peer=self.peer, checker=checker)
        self.addCleanup(d.close)
        return d


# -- item 6: malformed CRAM-MD5 responses -------------------------------------

HEX = b"0123456789abcdef" * 2
POORLY_FORMED = [
    b"\0 ",  # "ACA=", the input hypothesis found: blank user, empty digest
    b"alice ",  # empty digest
    b" " + HEX,  # empty user
    b"alice",  # no blank at all
    b"alice " + HEX[:31],  # too short
    b"alice " + HEX + b"0",  # too long
    b"alice " + b"g" * 32,  # not hex
    b"alice  " + HEX,  # two blanks
    b"alice " + HEX + b" ",  # a blank after the digest
    b"al ice " + HEX,  # a blank inside the user
    b"alice\t" + HEX,  # a tab instead of the blank
    b"al\0ice " + HEX,  # NUL in the user
    b"alice " + HEX[:16] + b"\0" + HEX[17:],  # NUL in the digest
    b"\xff\xfe " + HEX,  # a user that is not UTF-8
    b"alice\r\n " + HEX,  # control characters
]


class CramTests(Case):
    def challenge(self, d):
        [line] = d.send("AUTH CRAM-MD5")
        self.assertTrue(line.startswith("334 "), line)
        return base64.b64decode(line[4:])

    def test_poorly_formed_responses_get_501_and_count(self):
        d = self.dialogue(auth_max_failures=100)
        d.send("EHLO h.sender.net")
        for n, blob in enumerate(POORLY_FORMED, 1):
            self.challenge(d)
            self.assertEqual(d.send(b64(blob)), [POOR_CRAM], blob)
            self.assertEqual(d.proto.session.rejects, n, blob)
            self.assertEqual(d.factory.store.throttle._records[self.peer].failures, n, blob)
        self.assertEqual(d.send("NOOP"), NOOP_OK)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_the_reported_input(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net", "AUTH CRAM-MD5")
        self.assertEqual(d.send("ACA="), [POOR_CRAM])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_malformed_responses_spend_the_failure_budget(self):
        d = self.dialogue(auth_max_failures=2)
        d.send("EHLO h.sender.net", "AUTH CRAM-MD5")
        self.assertEqual(d.send("ACA="), [POOR_CRAM])
        d.send("AUTH CRAM-MD5")
        self.assertEqual(d.send(b64(b"alice ")), [TOO_MANY])
        self.assertTrue(d.transport.disconnecting)

    def test_well_formed_responses_are_checked(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        challenge = self.challenge(d)
        digest = hmac.new(SECRET.encode(), challenge, hashlib.md5).hexdigest()
        self.assertEqual(d.send(b64("bob " + digest)), [FAILED])  # a wrong user
        challenge = self.challenge(d)
        digest = hmac.new(SECRET.encode(), challenge, hashlib.md5).hexdigest()
        # upper-case hex is the same digest
        self.assertEqual(d.send(b64("alice " + digest.upper())),
                         ["235 2.0.0 Authentication successful"])

    def test_parse_cram(self):
        for blob in POORLY_FORMED:
            self.assertIsNone(auth.parse_cram(blob), blob)
        self.assertEqual(auth.parse_cram(b"\xc3\xa9 " + HEX.upper()), b"\xc3\xa9 " + HEX)


# -- item 7: the failure budget per address -----------------------------------


class Connection:
    """Another connection from ``peer`` to the Dialogue's factory."""

    def __init__(self, d, peer, port):
        self.proto = d.factory.buildProtocol(testing.address(peer, port))
        self.transport = testing.FakeTLSTransport(
            peerAddress=testing.address(peer, port), hostAddress=testing.address("127.0.0.1", 25))
        self.proto.makeConnection(self.transport)
        self.take()

    def take(self):
        out = self.transport.value().decode()
        self.transport.clear()
        return out.splitlines()

    def send(self, *lines):
        self.proto.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))
        return self.take()

    def close(self):
        if not self.transport.disconnecting:
            self.proto.connectionLost(None)
        self.proto.setTimeout(None)


class BudgetTests(Case):
    def connections(self, d, n, peer=None):
        conns = [Connection(d, peer or self.peer, 5000 + i) for i in range(n)]
        for c in conns:
            self.addCleanup(c.close)
            c.send("EHLO h.sender.net")
        return conns

    def test_parallel_connections_are_answered_one_after_another(self):
        d = self.dialogue(clear_passwords=True, auth_fail_delay=1.0, auth_max_failures=3)
        c1, c2, c3, c4 = self.connections(d, 4)
        for c in (c1, c2, c3):
            self.assertEqual(c.send("AUTH PLAIN " + plain("guess")), [])
        # the budget (3) is taken by the checks under way: the fourth is not
        # checked at all, even with the right password
        self.assertEqual(c4.send("AUTH PLAIN " + plain()), [TOO_MANY])
        self.assertTrue(c4.transport.disconnecting)
        answers = []
        for t in range(8):
            answers.append([c.take() for c in (c1, c2, c3)])
            d.clock.advance(1)
        # the n-th failure waits 2^(n-1) s after the previous one was answered
        self.assertEqual(answers, [
            [[], [], []],
            [[FAILED], [], []],  # t=1
            [[], [], []],
            [[], [FAILED], []],  # t=3
            [[], [], []], [[], [], []], [[], [], []],
            [[], [], [TOO_MANY]],  # t=7
        ])
        self.assertFalse(c1.transport.disconnecting)
        self.assertTrue(c3.transport.disconnecting)
        # spent for every connection of the address, until it is forgotten
        self.assertEqual(c1.send("AUTH PLAIN " + plain()), [TOO_MANY])
        [c5] = self.connections(d, 1)
        self.assertEqual(c5.send("AUTH PLAIN " + plain()), [TOO_MANY])
        # another address is not affected
        [other] = self.connections(d, 1, peer="127.0.0.3")
        self.assertEqual(other.send("AUTH PLAIN " + plain()),
                         ["235 2.0.0 Authentication successful"])
        d.clock.advance(900)
        [c6] = self.connections(d, 1)
        self.assertEqual(c6.send("AUTH PLAIN " + plain()),
                         ["235 2.0.0 Authentication successful"])

    def test_hang_up_counts_per_address(self):
        d = self.dialogue(clear_passwords=True, auth_max_failures=3)
        c1, c2 = self.connections(d, 2)
        self.assertEqual(c1.send("AUTH PLAIN " + plain("one")), [FAILED])
        self.assertEqual(c1.send("AUTH PLAIN " + plain("two")), [FAILED])
        self.assertEqual(c1.send("QUIT"), ["221 2.0.0 Successful termination"])
        self.assertEqual(c2.send("AUTH PLAIN " + plain("three")), [TOO_MANY])
        self.assertTrue(c2.transport.disconnecting)

    def test_a_temporary_failure_gives_the_attempt_back(self):
        d = self.dialogue(clear_passwords=True, auth_max_failures=1,
                          checker=FlakyChecker())
        [c] = self.connections(d, 1)
        self.assertEqual(c.send("AUTH PLAIN " + plain()),
                         ["454 4.7.0 Temporary authentication failure"])
        self.assertEqual(c.send("AUTH PLAIN " + plain()),
                         ["235 2.0.0 Authentication successful"])
        self.flushLoggedErrors()


@implementer(checkers.ICredentialsChecker)
class FlakyChecker:
    """Cannot check the first time, then accepts alice's password."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self):
        self.calls = 0

    def requestAvatarId(self, creds):
        self.calls += 1
        if self.calls == 1:
            return defer.fail(RuntimeError("the password database is down"))
        if creds.checkPassword(SECRET.encode()):
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin())


# -- item 8: over-long paths ----------------------------------------------------


def domain(octets):
    """A valid domain of exactly ``octets`` octets (labels of at most 63)."""
    labels = []
    while octets > 0:
        n = min(63, octets)
        if octets - n == 1:  # a lone "." would be left over
            n -= 2
        labels.append("d" * n)
        octets -= n + 1
    return ".".join(labels)


class PathTests(Case):
    def session(self, **kw):
        d = self.dialogue(**kw)
        d.send("EHLO h.sender.net")
        return d

    def mail(self, d, path):
        [reply] = d.send("MAIL FROM:%s" % path)
        d.send("RSET")
        return reply

    def test_the_reported_probe(self):
        d = self.session()
        path = "<" + "a" * 3000 + "@probe.example>"
        self.assertEqual(d.send("MAIL FROM:" + path), ["501 5.1.7 Path too long"])
        d.send("MAIL FROM:<a@probe.example>")
        self.assertEqual(d.send("RCPT TO:" + path), ["501 5.1.3 Path too long"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)
        self.assertEqual(d.proto.session.rejects, 2)

    def test_limits_at_the_boundary(self):
        d = self.session()
        ok, long = "250 2.0.0 sender is", "501 5.1.7 Path too long"
        cases = [
            ("<%s@x.example>" % ("a" * 64), ok),
            ("<%s@x.example>" % ("a" * 65), long),
            ('<"%s"@x.example>' % ("a" * 62), ok),  # quotes count
            ('<"%s"@x.example>' % ("a" * 63), long),
            ("<a@%s>" % domain(252), ok),  # 256 octets in all
            ("<a@%s>" % domain(253), long),  # 257
            ("<%s@%s>" % ("a" * 60, domain(193)), ok),
            ("<%s@%s>" % ("a" * 60, domain(194)), long),
            ("<%s>" % ("h!" * 32)[:64], ok),  # a bang path is all local part
            ("<%s>" % ("h!" * 33)[:65], long),
            ("<%s@x.example>" % ("\u00e9" * 32), ok),  # octets, not characters
            ("<%s@x.example>" % ("\u00e9" * 32 + "a"), long),
        ]
        for path, expected in cases:
            params = " SMTPUTF8" if not path.isascii() else ""
            self.assertTrue(self.mail(d, path + params).startswith(expected), path)

    def test_configurable_and_source_routes_measured_as_sent(self):
        d = self.session(max_path=1000, max_local_part=100, max_domain=300)
        ok, long = "250 2.0.0 sender is", "501 5.1.7 Path too long"
        self.assertTrue(self.mail(d, "<%s@x.example>" % ("a" * 100)).startswith(ok))
        self.assertTrue(self.mail(d, "<%s@x.example>" % ("a" * 101)).startswith(long))
        self.assertTrue(self.mail(d, "<@%s:a@x.example>" % domain(300)).startswith(ok))
        self.assertTrue(self.mail(d, "<@%s:a@x.example>" % domain(301)).startswith(long))
        self.assertTrue(self.mail(d, "<@r.example,@%s:a@x.example>" % domain(301))
                        .startswith(long))
        route = ",".join("@%s" % domain(200) for _ in range(5))  # 1023 octets in all
        self.assertTrue(self.mail(d, "<%s:a@x.example>" % route).startswith(long))

    def test_options(self):
        o = tap_smtpd.Options()
        o.parseOptions(["--max-path", "1000", "--max-local-part", "128", "--max-domain", "300",
                        "--root", self.root])
        s = o["settings"]
        self.assertEqual((s.max_path, s.max_local_part, s.max_domain), (1000, 128, 300))
        o = tap_smtpd.Options()
        o.parseOptions(["--root", self.root])
        s = o["settings"]
        self.assertEqual((s.max_path, s.max_local_part, s.max_domain), (256, 64, 255))
        for bad in (["--max-path", "255"], ["--max-local-part", "63"],
                    ["--max-domain", "254"], ["--max-path", "x"]):
            self.assertRaises(usage.UsageError, tap_smtpd.Options().parseOptions, bad)


# -- item 5: no PROXY-protocol listener Twisted's wrapper would read -------------
# (issue 18 made haproxy: listeners ours: tests/test_proxy.py)


# Every spelling Twisted's own parser turns into a PROXY endpoint.
PROXY_SPELLINGS = [
    "haproxy:tcp:0:interface=127.0.0.1",
    "HAProxy:tcp:0:interface=127.0.0.1",
    "haproxy:interface=127.0.0.1:tcp:2611",  # options first: Twisted sorts them last
    "haproxy:backlog=5:interface=127.0.0.1:tcp:0",
    "h\\aproxy:tcp:0",  # a backslash escapes any character
    "HAPROXY:unix:/run/smtp.sock",
    "haproxy:tcp6:0:interface=\\:\\:1",
    "haproxy:interface=\\:\\:1:tcp6:0",
]


def endpoint(listen):
    return service.listener_endpoint(task.Clock(), listen)


@pytest.mark.parametrize("listen", PROXY_SPELLINGS)
def test_proxy_listener_is_ours_however_spelled(listen):
    e = endpoint(listen)
    assert isinstance(e, ProxyEndpoint)
    assert type(e.endpoint).__module__ == endpoints.__name__  # Twisted's, without a wrapper


@pytest.mark.parametrize("listen", ["haproxy:haproxy:tcp:0:interface=127.0.0.1",
                                    "haproxy:ssl:0", "HAProxy:interface=127.0.0.1:S\\SL:0"])
def test_proxy_listener_we_cannot_serve_refused(listen):
    with pytest.raises(conf.ConfigError, match="haproxy: twice|before TLS"):
        endpoint(listen)


@pytest.mark.parametrize("listen", [
    "tcp:0:interface=127.0.0.1", "unix:haproxy", "unix:haproxy:mode=660",
    "tcp:0:interface=haproxy", "unix:a\\:haproxy\\:b", "unix:/run/haproxy.sock",
    "tcp6:0:interface=\\:\\:1",
])
def test_other_listeners_pass(listen):
    assert not isinstance(endpoint(listen), ProxyEndpoint)


@implementer(IStreamServerEndpoint)
class Hidden:
    """A third-party wrapper endpoint that keeps what it wraps out of sight."""

    def __init__(self, inner):
        self.listen = inner.listen


@implementer(IStreamServerEndpoint)
class Shown:
    def __init__(self, inner):
        self.inner = inner

    def listen(self, factory):
        return self.inner.listen(factory)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class WrapperParser:
    """``prefix:ENDPOINT``, like a wrapper plugin from outside Twisted."""

    def __init__(self, prefix, kind):
        self.prefix, self.kind = prefix, kind

    def parseStreamServer(self, reactor, *args, **kw):
        return self.kind(endpoints.serverFromString(reactor, unparseEndpoint(args, kw)))


@pytest.fixture
def wrapper_plugins(monkeypatch):
    real = endpoints.getPlugins
    extra = [WrapperParser("hidden", Hidden), WrapperParser("shown", Shown)]
    monkeypatch.setattr(endpoints, "getPlugins", lambda iface: [*real(iface), *extra])


@pytest.mark.parametrize("listen", [
    "shown:haproxy:tcp:0",  # found inside it
    "hidden:HAProxy:tcp:0",  # cannot be seen: the string decides
    "hidden:interface=127.0.0.1:h\\aproxy:tcp:0",
    "hidden:unix:/run/haproxy.sock",  # not a PROXY one, but we cannot be sure
])
def test_proxy_inside_a_foreign_wrapper_refused(wrapper_plugins, listen):
    with pytest.raises(conf.ConfigError, match="PROXY protocol"):
        endpoint(listen)


@pytest.mark.parametrize("listen", ["shown:tcp:0", "hidden:unix:/run/smtp.sock"])
def test_foreign_wrapper_without_proxy_passes(wrapper_plugins, listen):
    endpoint(listen)


@pytest.mark.parametrize("listen", [PROXY_SPELLINGS[1], PROXY_SPELLINGS[2], PROXY_SPELLINGS[4]])
def test_proxy_listener_without_proxy_from_stops_startup(tmp_path, listen):
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--listen", listen, "--root", str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert ("upas-smtpd: --listen %s: a PROXY listener needs --proxy-from" % listen) in out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("listen", PROXY_SPELLINGS)
def test_makeSmtpdService_refuses_a_proxy_listener_without_proxy_from(tmp_path, listen):
    s = testing.make_settings("", root=str(tmp_path), queue_runner=False)
    with pytest.raises(conf.ConfigError):
        service.makeSmtpdService(s, listen, reactor=task.Clock())


def test_ssl_listener_however_spelled_closes_refused_peers(tmp_path):
    """-k: an endpoint wrapping our factory cannot take None, and gets none:
    a protocol that drops the connection without a byte."""
    cert, key = testing.self_signed_pem("localhost")
    (tmp_path / "both.pem").write_text(cert + key)
    s = testing.make_settings("", root=str(tmp_path / "mail"), queue_runner=False,
                              evil=(ipaddress.ip_network("127.0.0.3/32"),))
    for listen in ("tcp:0", "s\\sl:0:privateKey=%s" % (tmp_path / "both.pem")):
        top = service.makeSmtpdService(s, listen, reactor=task.Clock(),
                                       resolver=testing.FakeResolver({}))
        [server] = [c for c in top if isinstance(c, ListeningService)]
        p = server.factory.buildProtocol(testing.address("127.0.0.3", 1))
        transport = StringTransport()
        p.makeConnection(transport)
        assert transport.value() == b"" and transport.disconnecting
