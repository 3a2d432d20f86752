"""Stop reading from a client that does not read its replies.

The protocol answers every pipelined command it reads.  A client that
sends commands and never reads (``NOOP`` a million times) would make the
replies pile up in the server's memory without bound: each six-byte
``NOOP`` costs a 47-byte reply, so 20 MB sent held about 350 MB.  Here
the connection's transport tells us, as it tells any streaming producer,
when its send buffer is over its size (64 KiB) and when it has drained;
in between nothing more is read from the client.  The protocol pauses
reading for reasons of its own (a reply it is waiting for): reading
resumes when neither reason holds.
"""

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.protocols import policies
from zope.interface import implementer


# what is held back from the protocol while the send buffer is full,
# before reading from the client stops too
HOLD = 64 * 1024


@implementer(IPushProducer)
class _SendBuffer:
    """The producer the transport pauses while its send buffer is full."""

    def __init__(self, connection):
        self.connection = connection

    def pauseProducing(self):
        self.connection._sendBufferFull(True)

    def resumeProducing(self):
        self.connection._sendBufferFull(False)

    def stopProducing(self):
        pass  # the connection is going: nothing of ours to stop


@implementer(IHandshakeListener)
class ReadWhileSending(policies.ProtocolWrapper):
    """The connection as the SMTP protocol sees it: what the client sends
    while the send buffer is full is held back from the protocol (so it
    writes no more replies), and past ``HOLD`` bytes reading stops.

    Reading is not stopped as soon as the buffer is full: TLS also says
    "full" while its handshake is under way, and the handshake needs to
    read.
    """

    def __init__(self, factory, wrappedProtocol):
        policies.ProtocolWrapper.__init__(self, factory, wrappedProtocol)
        self._full = False
        self._held = []
        self._heldSize = 0
        self._reasons = set()  # why reading is paused: "protocol", "held"

    def makeConnection(self, transport):
        # before the protocol's connectionMade, which may write at once
        transport.registerProducer(_SendBuffer(self), True)
        policies.ProtocolWrapper.makeConnection(self, transport)

    def dataReceived(self, data):
        if not self._full:
            return policies.ProtocolWrapper.dataReceived(self, data)
        self._held.append(data)
        self._heldSize += len(data)
        if self._heldSize > HOLD:
            self._pause("held", True)

    def _sendBufferFull(self, full):
        self._full = full
        if full or not self._held:
            return
        data, self._held, self._heldSize = b"".join(self._held), [], 0
        policies.ProtocolWrapper.dataReceived(self, data)
        if not self._held:
            self._pause("held", False)

    def _pause(self, reason, on):
        before = bool(self._reasons)
        if on:
            self._reasons.add(reason)
        else:
            self._reasons.discard(reason)
        if before == bool(self._reasons) or not self.connected:
            return
        if self._reasons:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # the protocol's own pauses (a reply it waits for)
    def pauseProducing(self):
        self._pause("protocol", True)

    def resumeProducing(self):
        self._pause("protocol", False)

    def loseConnection(self):
        # TLS closes only once no producer is registered
        self.transport.unregisterProducer()
        policies.ProtocolWrapper.loseConnection(self)

    def logPrefix(self):  # the protocol's own, as without this wrapper
        return self.wrappedProtocol.logPrefix()

    def handshakeCompleted(self):  # STARTTLS
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()


class ReadWhileSendingFactory(policies.WrappingFactory):
    protocol = ReadWhileSending

    def logPrefix(self):
        # the listener's line stays "UpasSMTPFactory starting on <port>",
        # which scripts wait for
        return self.wrappedFactory.logPrefix()

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:  # -k: refused before a byte
            return None
        return self.protocol(self, inner)
