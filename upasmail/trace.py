"""``-d``: a trace of every byte in and out, one file per connection.

upas [9F] echoes the session to ``/sys/log/smtpd.db``; [4E] makes a file
per connection under ``/sys/log/smtpdb/``.  Here each connection gets
``<log dir>/smtpdb/<unix time>.<n>.<peer ip>``, written by Twisted's
``TrafficLoggingProtocol``: ``C n: b'...'`` lines for client bytes and
``S n: b'...'`` for ours (Python byte reprs, so every byte is visible).
Banned peers (``-k``) get no file: the wrapped factory refuses them first.

The trace holds whole sessions, message bodies included: the directory
is created mode 0700.
"""

import os

from twisted.protocols import policies

from .relay import normalize_ip


class TraceProtocol(policies.TrafficLoggingProtocol):
    def connectionLost(self, reason):
        try:
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
        if inner is None:
            return None
        self._counter += 1
        name = "%d.%d.%s" % (self.clock.seconds(), self._counter,
                             normalize_ip(getattr(addr, "host", "unix")))
        logfile = open(os.path.join(self.directory, name), "w")
        logfile.write("%d smtpd %s\n" % (os.getpid(), name))
        return self.protocol(self, inner, logfile, self.lengthLimit, self._counter)
