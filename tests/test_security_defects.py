"""Issue 13, items 5-8: a PROXY listener refused, malformed CRAM-MD5
responses, the AUTH failure budget per client address, over-long paths.

Sessions run over ``testing.Dialogue`` (StringTransport, task.Clock);
several connections from one address share the Dialogue's factory.  The
start-up check runs a real ``twistd``.
"""

import base64
import hashlib
import hmac
import os
import shutil
import tempfile

import pytest
from twisted.cred import checkers, credentials, error
from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer

from test_twistd import twistd
from upasmail import auth, conf, service, tap_smtpd, testing

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


# -- item 5: no PROXY-protocol listener ----------------------------------------


@pytest.mark.parametrize("listen", [
    "haproxy:tcp:0:interface=127.0.0.1",
    "HAProxy:tcp:0:interface=127.0.0.1",
    "haproxy:haproxy:tcp:0:interface=127.0.0.1",
    "wrapper:/some/dir:haproxy:tcp:0",
])
def test_proxy_listener_refused_by_the_library(listen):
    with pytest.raises(conf.ConfigError, match="PROXY protocol"):
        service.refuse_proxy_listener(listen)


@pytest.mark.parametrize("listen", [
    "tcp:0:interface=127.0.0.1", "unix:haproxy", "unix:haproxy:mode=660",
    "tcp:0:interface=haproxy", "unix:a\\:haproxy\\:b",
])
def test_other_listeners_pass(listen):
    service.refuse_proxy_listener(listen)


def test_proxy_listener_stops_startup(tmp_path):
    listen = "HAProxy:tcp:0:interface=127.0.0.1"
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--listen", listen, "--root", str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert ("upas-smtpd: --listen %s: PROXY protocol (haproxy:) listeners are not supported"
            % listen) in out
    assert "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


def test_makeSmtpdService_refuses_a_proxy_listener(tmp_path):
    s = testing.make_settings("", root=str(tmp_path), queue_runner=False)
    with pytest.raises(conf.ConfigError):
        service.makeSmtpdService(s, "haproxy:tcp:0:interface=127.0.0.1",
                                 reactor=task.Clock())
