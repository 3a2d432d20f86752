"""Test helpers: drive a UpasESMTP over a StringTransport, fake effects.

Importable by users' own tests too.
"""

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from . import conf as smtpdconf
from . import settings as smtpdsettings
from .service import makeSmtpdFactory


def run_now(f, *args):
    """A synchronous ``run_blocking``: the call happens before it returns."""
    return defer.maybeDeferred(f, *args)


def address(ip, port):
    cls = IPv6Address if ":" in ip else IPv4Address
    return cls("TCP", ip, port)


def make_settings(conf_text="", root="mail", sysname="gnot.example.org", **kw):
    config = smtpdconf.parse(conf_text, "smtpd.conf")
    kw.setdefault("fqdn", sysname)
    return smtpdsettings.merge(config, sysname=sysname, root=root, **kw)


def _wire(lines):
    return b"".join((l if isinstance(l, bytes) else l.encode()) + b"\r\n" for l in lines)


class Dialogue:
    """One SMTP connection over a StringTransport.

    ``send(line)`` feeds a command (CRLF added) and returns the reply lines
    written since; ``clock`` is a task.Clock unless a reactor is given.
    """

    def __init__(self, settings, peer="127.0.0.2", local="127.0.0.1", clock=None,
                 reactor=None, run_blocking=run_now):
        self.clock = clock or task.Clock()
        self.factory = makeSmtpdFactory(settings, reactor=reactor or self.clock,
                                        run_blocking=run_blocking, clock=self.clock)
        self.root = self.factory.root
        self.proto = self.factory.buildProtocol(address(peer, 4321))
        self.transport = StringTransport(
            peerAddress=address(peer, 4321), hostAddress=address(local, 25)
        )
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self):
        out = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return out.splitlines()

    def raw(self, data):
        self.proto.dataReceived(data)
        return self.take()

    def send(self, *lines):
        return self.raw(_wire(lines))

    def sendAndWait(self, *lines):
        """Send, then wait (really) for pending replies; fires with them."""
        self.raw(_wire(lines))
        return self.proto.whenQuiet().addCallback(lambda _: self.take())

    def close(self):
        if not self.transport.disconnecting:
            self.proto.connectionLost(None)
        self.proto.setTimeout(None)
