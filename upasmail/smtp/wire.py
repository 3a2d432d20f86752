"""The client's side of the SMTP wire: replies read, commands written, a
connection made.

``Wire`` is a ``LineOnlyReceiver`` that reads replies (CRLF or LF
lines, bounded) and hands each whole reply to the conversation, with a
watchdog on the injected clock; ``connect`` opens one TCP (or implicit
TLS) connection to one address.  No ``ESMTPSender``: ``client`` says why.
"""

from collections import deque
from dataclasses import dataclass
from typing import List

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols import basic
from zope.interface import implementer

from .. import replies


@dataclass
class Reply:
    code: int  # -1: not a reply (garbage, EOF)
    lines: List[str]  # as received, codes included

    @property
    def kind(self):
        return self.code // 100 if self.code > 0 else -1

    @property
    def texts(self):
        return [line[4:] for line in self.lines]

    def __str__(self):
        return "\n".join(self.lines)


class Closed(Exception):
    def __init__(self, timed_out):
        Exception.__init__(self, "timed out" if timed_out else replies.CONNECTION_CLOSED)
        self.timed_out = timed_out


class Failed(Exception):
    """Ends the conversation with its Outcome and the reply that caused it."""

    def __init__(self, outcome, reply=None, note=None):
        Exception.__init__(self, outcome.status)
        self.outcome = outcome
        self.reply = reply
        self.note = note

    @property
    def status(self):
        return self.outcome.status


@implementer(IHandshakeListener)
class Wire(basic.LineOnlyReceiver):
    """Reads replies (CRLF or LF, upas getreply) and writes commands."""

    delimiter = b"\n"
    MAX_LENGTH = 16384
    MAX_LINES = 1000

    def __init__(self, clock, debug=None):
        self.clock = clock
        self.debug = debug
        self._lines = []
        self._replies = deque()
        self._waiting = None
        self._timer = None
        self._discarding = False
        self.timed_out = False
        self.closed = False
        self._handshaken = False
        self._handshake_waiters = []
        self._close_waiters = []
        self.connected_d = None

    def connectionMade(self):
        if self.connected_d is not None:
            d, self.connected_d = self.connected_d, None
            d.callback(self)

    def dataReceived(self, data):
        try:
            basic.LineOnlyReceiver.dataReceived(self, data)
        finally:
            self._discarding = False

    def lineReceived(self, line):
        if self._discarding:
            return
        # a bare CR, an escape sequence or a NUL inside a reply is no text
        # of the server's worth keeping: it goes as "?" into the bounce,
        # stderr and the log
        text = "".join(c if c.isprintable() else "?" for c in
                       line.rstrip(b"\r").decode("utf-8", "replace"))
        if self.debug:
            self.debug("<- " + text)
        self._lines.append(text)
        if len(text) >= 3 and text[:3].isdigit() and text[3:4] in ("", " ", "-"):
            if text[3:4] == "-" and len(self._lines) < self.MAX_LINES:
                return
            code = int(text[:3])
        else:
            code = -1
        reply, self._lines = Reply(code, self._lines), []
        self._deliver(reply)

    def lineLengthExceeded(self, line):
        self._lines = []
        self._deliver(Reply(-1, [replies.REPLY_TOO_LONG]))
        self.transport.loseConnection()

    def _deliver(self, reply):
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(reply)
        else:
            self._replies.append(reply)

    def read(self):
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.closed:
            return defer.fail(Closed(self.timed_out))
        self._waiting = defer.Deferred()
        return self._waiting

    def send(self, line, shown=None):
        if self.debug:
            self.debug("-> " + (shown if shown is not None else line))
        self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def command(self, line, shown=None):
        self.send(line, shown)
        return self.read()

    def flush_input(self):
        """After STARTTLS's 220: whatever else came in the clear is dropped."""
        self._replies.clear()
        self._lines = []
        self._buffer = b""
        self._discarding = True

    def arm(self, seconds):
        self.disarm()
        self._timer = self.clock.callLater(seconds, self._expired)

    def disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self):
        self._timer = None
        self.timed_out = True
        self.transport.abortConnection()

    def handshake(self):
        """Fires when the TLS handshake is done; fails if the connection ends first."""
        if self._handshaken:
            return defer.succeed(None)
        if self.closed:
            return defer.fail(Closed(self.timed_out))
        d = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def handshakeCompleted(self):
        self._handshaken = True
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.callback(None)

    def whenClosed(self):
        if self.closed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def connectionLost(self, reason=None):
        self.closed = True
        self.disarm()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(Closed(self.timed_out))
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.errback(Closed(self.timed_out))


class _Connector(protocol.ClientFactory):
    noisy = False  # a "Starting factory" line per attempt says nothing the log lines don't

    def __init__(self, clock, debug, d):
        self.clock = clock
        self.debug = debug
        self.d = d

    def buildProtocol(self, addr):
        p = Wire(self.clock, self.debug)
        p.factory = self
        p.connected_d = self.d
        return p

    def clientConnectionFailed(self, connector, reason):
        if not self.d.called:
            self.d.errback(reason)


def connect(reactor, clock, target, timeout, tls_options=None, debug=None):
    """Fire with a connected Wire (TLS from the start when ``tls_options``)."""
    d = defer.Deferred()
    factory = _Connector(clock, debug, d)
    if tls_options is not None:
        reactor.connectSSL(target.ip, target.port, factory, tls_options, timeout=timeout)
    else:
        reactor.connectTCP(target.ip, target.port, factory, timeout=timeout)
    return d
