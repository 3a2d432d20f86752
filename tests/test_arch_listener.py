"""Issue 17, the listener: a -k ban is a protocol made by the factory (not
None passed through wrappers), no private Twisted APIs, the injected
reactor for DNS, and no blocking look-up of our own addresses while the
service is built."""

import base64
import ipaddress
import os
import pathlib
import socket

import pytest
from twisted.cred import checkers, portal
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.mail.smtp import IMessageDelivery
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from upasmail import client, queue, service, testing, tls
from upasmail.listening import Dropped, ListeningService
from upasmail.session import Transaction
from upasmail.store import MailRoot

BANNED = "192.0.2.7"
PACKAGE = pathlib.Path(service.__file__).parent


def banned_settings(tmp_path, **kw):
    return testing.make_settings("", root=str(tmp_path / "mail"), queue_runner=False,
                                 evil=(ipaddress.ip_network(BANNED + "/32"),), **kw)


def connect(proto, peer=BANNED):
    transport = StringTransport(peerAddress=testing.address(peer, 1),
                                hostAddress=testing.address("127.0.0.1", 25))
    proto.makeConnection(transport)
    return transport


# -- 1. -k: one protocol, made by the factory --------------------------------

def test_the_factory_gives_a_banned_peer_a_protocol_that_closes_without_a_byte(tmp_path):
    factory = service.makeSmtpdFactory(banned_settings(tmp_path), reactor=task.Clock(),
                                       run_blocking=testing.run_now,
                                       resolver=testing.FakeResolver())
    with capturedLogs() as events:
        p = factory.buildProtocol(testing.address(BANNED, 1))
        assert p is not None  # an endpoint wrapping the factory cannot take None
        transport = connect(p)
    assert transport.value() == b"" and transport.disconnecting
    assert [e for e in events if BANNED in repr(e)] == []
    assert factory.connections == set()


def test_an_endpoints_own_tls_around_the_factory_writes_nothing_for_a_ban(tmp_path):
    """What ``ssl:``/``tls:`` endpoints do: wrap our factory in TLS themselves."""
    cert, key = testing.self_signed_pem("localhost")
    (tmp_path / "both.pem").write_text(cert + key)
    s = banned_settings(tmp_path)
    factory = service.makeSmtpdFactory(s, reactor=task.Clock(), run_blocking=testing.run_now,
                                       resolver=testing.FakeResolver())
    context = tls.CertificateFile(str(tmp_path / "both.pem"))
    listening = service.connectionFactory(factory, s, task.Clock())
    wrapped = TLSMemoryBIOFactory(context, False, listening)
    transport = connect(wrapped.buildProtocol(testing.address(BANNED, 1)))
    assert transport.value() == b"" and transport.disconnecting


def test_smtps_and_trace_hand_on_the_ban_without_a_file(tmp_path):
    cert, key = testing.self_signed_pem("localhost")
    (tmp_path / "both.pem").write_text(cert + key)
    s = banned_settings(tmp_path, debug=True, smtps=True, cert=str(tmp_path / "both.pem"))
    clock = task.Clock()
    factory = service.makeSmtpdFactory(s, reactor=clock, run_blocking=testing.run_now,
                                       resolver=testing.FakeResolver())
    listening = service.connectionFactory(factory, s, clock)
    p = listening.buildProtocol(testing.address(BANNED, 1))
    assert isinstance(p, Dropped)  # on the bare socket: a plain close, not a TLS abort
    transport = connect(p)
    assert transport.value() == b"" and transport.disconnecting
    assert os.listdir(os.path.join(s.path("log_dir"), "smtpdb")) == []


def test_no_pass_through_wrapper_for_refusals_is_left():
    assert not hasattr(service, "RefusalsClose")
    assert [p.name for p in PACKAGE.glob("*.py") if "inner is None" in p.read_text()] == []


# -- 2. no private Twisted APIs ----------------------------------------------

@pytest.mark.parametrize("name", ["_onLogout", "_raiseSynchronously", "_waitingForPort"])
def test_the_package_uses_no_private_twisted_attribute(name):
    assert [p.name for p in PACKAGE.glob("*.py") if name in p.read_text()] == []


@implementer(portal.IRealm)
class LoggingRealm:
    def __init__(self):
        self.logouts = []

    def requestAvatar(self, avatarId, mind, *interfaces):
        return IMessageDelivery, None, lambda: self.logouts.append(avatarId)


def test_the_realms_logout_is_called_once_when_the_connection_ends(tmp_path):
    checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    s = testing.make_settings("", root=str(tmp_path / "mail"))
    d = testing.Dialogue(s, checker=checker, implicit_tls=True)
    realm = LoggingRealm()
    d.proto.portal = portal.Portal(realm, [checker])
    d.send("EHLO h.sender.net")
    answer = d.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode())
    assert answer == ["235 2.0.0 Authentication successful"]
    assert realm.logouts == []
    d.close()
    assert realm.logouts == [b"alice"]


class FakePort:
    stopped = False

    def stopListening(self):
        self.stopped = True


class Endpoint:
    def __init__(self, result):
        self.result = result
        self.factories = []

    def listen(self, factory):
        self.factories.append(factory)
        return self.result


def test_a_port_that_cannot_be_bound_raises_from_the_start():
    svc = ListeningService(Endpoint(defer.fail(CannotListenError("127.0.0.1", 25, OSError()))),
                           object())
    with pytest.raises(CannotListenError):
        svc.privilegedStartService()


def test_the_port_is_bound_once_and_stopped_with_the_service():
    port = FakePort()
    endpoint = Endpoint(defer.succeed(port))
    factory = object()
    svc = ListeningService(endpoint, factory)
    svc.privilegedStartService()
    svc.startService()  # bound already: not twice
    assert endpoint.factories == [factory]
    seen = []
    svc.listening.addCallback(lambda p: seen.append(p) or p)
    assert seen == [port]
    svc.stopService()
    assert port.stopped


def test_a_later_failure_to_listen_is_logged_not_raised():
    later = defer.Deferred()
    svc = ListeningService(Endpoint(later), object())
    svc.startService()
    with capturedLogs() as events:
        later.errback(CannotListenError("127.0.0.1", 25, OSError()))
    assert [e for e in events if e.get("log_failure") is not None]


# -- 3. the injected reactor answers DNS -------------------------------------

class UDPReactor(MemoryReactorClock):
    """A memory reactor that also takes UDP listeners: what they send is kept."""

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.sent = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        reactor = self

        class Transport:
            def write(self, data, addr=None):
                reactor.sent.append(data)

            def stopListening(self):
                pass

        protocol.makeConnection(Transport())
        return protocol.transport


def test_the_default_resolver_runs_on_the_reactor_it_is_given(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    reactor = UDPReactor()
    resolver = service.makeResolver(reactor, hosts=str(hosts).encode())
    # resolv.conf is re-read on the given reactor's clock, not the global one's
    assert reactor.getDelayedCalls()
    d = resolver.lookupAddress("nothing.example.invalid")
    assert any(b"nothing" in datagram for datagram in reactor.sent)
    failed = []
    d.addErrback(failed.append)
    for _ in range(10):
        reactor.advance(60)  # every try times out on the given clock
    assert failed


# -- 4. our own addresses: found in a thread, not at build -------------------

def test_building_the_service_looks_up_no_address(tmp_path, monkeypatch):
    looked = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **kw: looked.append(a) or [])
    s = testing.make_settings("", root=str(tmp_path / "mail"))
    top = service.makeSmtpdService(s, "tcp:0:interface=127.0.0.1", reactor=MemoryReactorClock(),
                                   resolver=testing.FakeResolver())
    assert top.queue is not None
    assert looked == []


class OursTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.dir = self.mktemp()
        self.found = defer.Deferred()
        self.hops = []

        def run_blocking(f, *args):
            if f == self.lookup:
                self.hops.append(f)
                return self.found
            return testing.run_now(f, *args)

        self.root = MailRoot(os.path.join(self.dir, "mail"), run_blocking, self.clock)
        self.root.prepare()
        self.options = []

    def lookup(self):
        raise AssertionError("run on the reactor thread")

    def deliver(self, source, dest, sender, rcpts, options, reactor, resolver, clock=None,
                outcome=None, **kw):
        self.options.append(options)
        result = client.Result("", [client.RecipientResult(r, r, client.DELIVERED, "250 ok")
                                    for r in rcpts])
        outcome(result)
        return defer.succeed(result)

    def enqueue(self):
        path, f = self.root.open_spool()
        with f:
            f.write(b"From a Wed Mar  7 23:47:45 -0400 2024 remote from g\nSubject: q\n\nb\n")
        tx = Transaction(sender="g!a", recipients=("far.example!bob",), local=(),
                         remote=("far.example!bob",), peer="127.0.0.1", helo="h")
        self.successResultOf(self.root.deliver(path, tx))
        os.unlink(path)

    def test_found_once_in_a_thread_before_the_first_dial(self):
        self.enqueue()
        self.enqueue()
        settings = testing.make_settings("", root=self.root.root)
        r = queue.QueueRunner(self.root, settings, None, None, self.clock, deliver=self.deliver,
                              ours=self.lookup)
        r.startService()
        self.addCleanup(lambda: r.stopService() if r.running else None)
        self.clock.advance(0)
        self.assertEqual((self.hops, self.options), ([self.lookup], []))  # waiting for it
        self.found.callback(["192.0.2.9"])
        self.clock.advance(0)
        self.assertEqual([o.ours for o in self.options], [("192.0.2.9",)] * 2)
        self.assertEqual(self.hops, [self.lookup])  # once
