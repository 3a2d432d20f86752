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
