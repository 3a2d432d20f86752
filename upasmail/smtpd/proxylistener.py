"""PROXY protocol listeners (``--listen haproxy:...``): the client's real
address from the load balancer's header, before anything else happens.

``ProxyHeaderFactory`` is the outermost layer of a listener: for each
connection it checks that the peer is one of the balancers
(``--proxy-from``), reads the header (``proxyheader``) without writing a
byte, and only then asks the factory it wraps for a protocol, with the
client's address.  That protocol's transport answers ``getPeer()`` with
the header's source and ``getHost()`` with its destination; everything
else is the real connection's (``policies.ProtocolWrapper``), so TLS,
producers and closing work as without the header.

Twisted's own ``haproxy:`` wrapper builds the wrapped protocol with the
balancer's address and connects it at once (the greeting would go out
before the header, and -k, the per-peer limits and the decision log
would see the balancer), and it gives up on a header split across reads:
hence this one.
"""

from twisted.internet import address, protocol
from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides, implementer, providedBy

from ..relay import in_nets, normalize_ip
from . import proxyheader

log = Logger(namespace="smtpd")

# Seconds a balancer has to send the header.  HAProxy sends it with the
# connection, so only a broken or foreign peer waits; Postfix gives
# smtpd_upstream_proxy_timeout 5 s for the same.  Not the idle timeout:
# a connection without a header is no session yet, and holds a file.
HEADER_TIMEOUT = 5.0
# Connections a PROXY listener holds beyond the session factory's own cap
# (``UpasSMTPFactory.maxConnections``, the open-file limit less its
# reserve): room for the factory's 421 to be written once the header is
# read; past it a connection is closed before its header, so connections
# still waiting for one cannot eat the files kept for mailboxes and the
# queue.
OVER_CAP = 16


def _address(ip, port):
    kind = address.IPv6Address if ":" in ip else address.IPv4Address
    return kind("TCP", ip, port)


def allowed(peer, networks):
    """Is the connection's peer (an ``IAddress``) one of the balancers?"""
    host = getattr(peer, "host", None)
    if host is None:  # a UNIX socket: only its owner's processes can connect
        return True
    return in_nets(host, networks)


@implementer(IHandshakeListener)
class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """One connection: the header first, then the wrapped protocol."""

    def __init__(self, factory):
        policies.ProtocolWrapper.__init__(self, factory, None)
        self._buffer = b""
        self._timer = None
        self._peer = self._host = None

    def logPrefix(self):
        return "ProxyHeaderProtocol"

    def makeConnection(self, transport):
        # ProtocolWrapper's, except that the wrapped protocol waits for the header
        directlyProvides(self, providedBy(transport))
        self.factory.registerProtocol(self)
        protocol.Protocol.makeConnection(self, transport)

    def connectionMade(self):
        balancer = self.transport.getPeer()
        if not allowed(balancer, self.factory.networks):
            self._refuse("refused", "not in --proxy-from")
            return
        cap = self.factory.cap
        if cap is not None and len(self.factory.protocols) > cap + OVER_CAP:
            self._refuse("limit", "%d connections open" % (len(self.factory.protocols) - 1))
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _timedOut(self):
        self._timer = None
        self._refuse("timeout", "no PROXY header in %g s" % self.factory.timeout)

    def _refuse(self, status, why):
        """Close without a byte, saying why in one line."""
        balancer = normalize_ip(getattr(self.transport.getPeer(), "host", "unix"))
        log.info("PROXY connection from {balancer} closed: {why}", balancer=balancer, why=why,
                 status=status, event="smtpd.proxy")
        self._buffer = b""
        self.disconnecting = True
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:  # refused: the rest is not read
            return
        self._buffer += data
        result = proxyheader.parse(self._buffer)
        if result is proxyheader.NEED_MORE:
            return
        self._stopTimer()
        if isinstance(result, proxyheader.Invalid):
            self._refuse("invalid", result.reason)
            return
        self._buffer = b""
        self._start(*result)

    def _start(self, header, rest):
        if header.source is not None:
            self._peer = _address(*header.source)
            self._host = _address(*header.destination)
        # a refusal (-k, over a limit) is a protocol too (listening.Dropped)
        inner = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest:
            inner.dataReceived(rest)

    def handshakeCompleted(self):
        # STARTTLS puts TLS under this wrapper: the session must hear of it
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def getPeer(self):
        return self._peer or self.transport.getPeer()

    def getHost(self):
        return self._host or self.transport.getHost()

    def _stopTimer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connectionLost(self, reason):
        self._stopTimer()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps a listener's factory: connections from ``networks`` (the
    ``--proxy-from`` ip_networks) only, each with its PROXY header read
    before ``wrappedFactory.buildProtocol`` is asked, with the client's
    address."""

    protocol = ProxyHeaderProtocol

    def __init__(self, wrappedFactory, networks, clock, timeout=HEADER_TIMEOUT, cap=None):
        policies.WrappingFactory.__init__(self, wrappedFactory)
        self.networks = tuple(networks)
        self.clock = clock
        self.timeout = timeout
        self.cap = cap  # the sessions' cap (the open-file limit's); None: none

    def buildProtocol(self, addr):
        return self.protocol(self)


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """``haproxy:ENDPOINT``: Twisted's ``endpoint``, every connection read
    through ``ProxyHeaderFactory`` (the outermost layer: HAProxy sends
    the header in clear, before a ``--smtps`` handshake)."""

    def __init__(self, endpoint, networks, clock, cap=None):
        self.endpoint = endpoint
        self.networks = tuple(networks)
        self.clock = clock
        self.cap = cap

    def wrap(self, factory):
        """What each connection meets first."""
        return ProxyHeaderFactory(factory, self.networks, self.clock, cap=self.cap)

    def listen(self, factory):
        return self.endpoint.listen(self.wrap(factory))
