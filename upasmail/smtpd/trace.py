"""``-d``: a trace of every byte in and out, one file per connection.

upas [9F] echoes the session to ``/sys/log/smtpd.db``; [4E] makes a file
per connection under ``/sys/log/smtpdb/``.  Here each connection gets
``<log dir>/smtpdb/<unix time>.<n>.<peer ip>``, written by Twisted's
``TrafficLoggingProtocol``: ``C n: b'...'`` lines for client bytes and
``S n: b'...'`` for ours (Python byte reprs, so every byte is visible).
Banned peers (``-k``) get no file: the factory drops them before any byte.

The trace holds whole sessions, message bodies included: the directory
is created mode 0700.  Passwords never reach it: client bytes are logged
a whole line at a time, and ``AuthRedactor`` replaces an AUTH command's
initial response and the response lines the mechanism will send with
``<removed>`` (counted from the client's side, so a refused or cancelled
AUTH may hide one harmless line too).  With STARTTLS or ``--smtps`` the
trace records the decrypted session.
"""

import os

from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols import policies
from zope.interface import implementer

from ..relay import normalize_ip
from .listening import Dropped

LONG_LINE = 64 * 1024  # log a line without its end once it is this long
REMOVED = b"<removed>"


class AuthRedactor:
    """Decides, line by line, which client bytes are AUTH secrets."""

    # response lines each mechanism sends after AUTH, without / with an
    # initial response; unknown mechanisms: assume one secret line
    _RESPONSES = {b"PLAIN": (1, 0), b"LOGIN": (2, 1), b"CRAM-MD5": (1, 1)}

    def __init__(self):
        self.secret_lines = 0
        self.in_data = False

    def server(self, data):
        """Our bytes: a 354 means the client's next lines are a message."""
        if data.startswith(b"354"):
            self.in_data = True

    def line(self, line):
        """One client line (its end included) as it may be logged."""
        end = line[len(line.rstrip(b"\r\n")):]
        if self.in_data:
            if line.rstrip(b"\r\n") == b".":
                self.in_data = False
            return line
        if self.secret_lines:
            self.secret_lines -= 1
            return REMOVED + end
        words = line.split()
        if len(words) >= 2 and words[0].upper() == b"AUTH":
            without, with_initial = self._RESPONSES.get(words[1].upper(), (1, 1))
            if len(words) > 2:
                self.secret_lines = with_initial
                return words[0] + b" " + words[1] + b" " + REMOVED + end
            self.secret_lines = without
        return line

    def secret(self):
        """Is the line now arriving a secret (for lines too long to wait for)?"""
        return self.secret_lines > 0


@implementer(IHandshakeListener)
class TraceProtocol(policies.TrafficLoggingProtocol):
    def __init__(self, *args, **kw):
        policies.TrafficLoggingProtocol.__init__(self, *args, **kw)
        self._redactor = AuthRedactor()
        self._pending = b""
        self._skipping = False  # the rest of an over-long secret line

    def dataReceived(self, data):
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        out = []
        for line in lines:
            if self._skipping:
                self._skipping = False
                out.append(b"\n")
                continue
            out.append(self._redactor.line(line + b"\n"))
        if len(self._pending) >= LONG_LINE:
            head = self._pending[:4].upper()
            if self._skipping or (not self._redactor.in_data and (
                    self._redactor.secret() or head == b"AUTH")):
                if not self._skipping:
                    out.append(REMOVED)
                self._skipping = True
            else:
                out.append(self._pending)
            self._pending = b""
        if out:
            self._log("C %d: %r" % (self._number, self._mungeData(b"".join(out))))
        return policies.ProtocolWrapper.dataReceived(self, data)

    def write(self, data):
        self._redactor.server(data)
        return policies.TrafficLoggingProtocol.write(self, data)

    def writeSequence(self, iovec):
        self._redactor.server(b"".join(iovec))
        return policies.TrafficLoggingProtocol.writeSequence(self, iovec)

    def handshakeCompleted(self):
        self._log("C %d: * TLS" % self._number)
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason):
        try:
            if self._pending and not self._skipping:
                self._log("C %d: %r" % (self._number, self._redactor.line(self._pending)))
            return policies.TrafficLoggingProtocol.connectionLost(self, reason)
        finally:
            self.logfile.close()  # Twisted's version leaves it open


class TraceFactory(policies.TrafficLoggingFactory):
    protocol = TraceProtocol

    def __init__(self, wrappedFactory, log_dir, clock):
        self.directory = os.path.join(log_dir, "smtpdb")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        policies.TrafficLoggingFactory.__init__(self, wrappedFactory, self.directory)
        self.clock = clock

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(addr)
        if isinstance(inner, Dropped):  # a -k ban carries no byte: nothing to trace
            return inner
        self._counter += 1
        name = "%d.%d.%s" % (self.clock.seconds(), self._counter,
                             normalize_ip(getattr(addr, "host", "unix")))
        logfile = open(os.path.join(self.directory, name), "w")
        logfile.write("%d smtpd %s\n" % (os.getpid(), name))
        return self.protocol(self, inner, logfile, self.lengthLimit, self._counter)
