"""The listener's factory: one protocol per connection, and what the
connections have in common.

For each new connection it runs the policy's connect table (``-k`` bans,
shutting down, the process's limit) before anything is read, builds the
protocol (``server.UpasESMTP``) with everything injected, and asks the
state store to admit it (the connection rate, connections in all and per
peer; a store that cannot answer is a ``421`` and the connection closes).  It also
reloads the settings of every connection (SIGHUP) and shuts them down
with grace (SIGTERM).  A banned peer gets ``listening.Dropped``, a full
server ``_Busy``.
"""

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp

from .. import grammar, logs, relay, replies
from ..rules import policy
from ..interfaces import IReloadable
from .listening import Dropped
from .server import UpasESMTP
from .spam import unless_unavailable

log = Logger(namespace="smtpd")


def _refusedAtConnect(emit, format, ip, end, **kwargs):
    """A connection refused before its greeting: its one smtpd.disconnect line."""
    emit(format, ip=ip, event="smtpd.disconnect", peer=ip, helo="", tls="none",
         auth_user=None, accepted=0, refused=0, duration=0.0, end=end, **kwargs)


class _Busy(protocol.Protocol):
    """Over a connection limit: one 421, then the connection closes."""

    def __init__(self, text):
        self.text = text

    def connectionMade(self):
        self.transport.write(b"421 " + self.text.encode() + b"\r\n")
        self.transport.loseConnection()


class UpasSMTPFactory(smtp.SMTPFactory):
    """Builds one ``UpasESMTP`` per connection with everything injected.

    It counts connections (in all, and per untrusted peer address: over a
    limit the peer gets ``421`` and is closed), and can reload its settings
    (SIGHUP) and shut down gracefully (SIGTERM).  The counts over every
    process are the store's (``spamfilter.store``); this process's own
    connections are bounded by the open-file limit here, at once.
    """

    protocol = UpasESMTP

    def __init__(self, settings, makeDelivery, clock, portal=None,
                 contextFactory=None, spamfilter=None):
        smtp.SMTPFactory.__init__(self, portal)
        self.spam = spamfilter
        self.settings = settings
        self.makeDelivery = makeDelivery
        self.clock = clock
        self.contextFactory = contextFactory
        self.domain = settings.dom
        # connection counts and the AUTH budget, shared by every process
        self.store = spamfilter.store
        self.connections = set()
        self._admitting = {}  # protocol -> the connect table waiting for the store
        self.decisions = None  # the decision log (``--decision-log``), when kept
        self.fdCap = None  # what the open-file limit allows; set at start-up
        self.closing = False

    @property
    def maxConnections(self):
        limit = self.settings.max_connections
        return limit if self.fdCap is None else min(limit, self.fdCap)

    def buildProtocol(self, addr):
        ip = relay.normalize_ip(getattr(addr, "host", ""))
        # the connect table's first checks need no lookup: -k, shutting
        # down, this process's own limit are decided before any protocol
        cmd = grammar.Command("CONNECT", ip)
        looked = policy.Facts(closing=self.closing, connections=len(self.connections),
                              connection_cap=self.fdCap)
        trace = [] if self.decisions is not None else None  # the decision log's
        r = policy.run(policy.CONNECT, None, cmd, self.settings, looked, trace=trace)
        if isinstance(r, policy.Outcome):
            return self._refused(r.decision, ip, looked, trace)
        p = self.protocol(self.settings, self.makeDelivery, self.clock,
                          self.contextFactory, self.spam, self.store)
        p.factory = self
        p.portal = self.portal
        p.peerIP = ip
        p.exempt = None  # counted by the store: exempt from the per-peer limit?
        self.connections.add(p)
        self._admitting[p] = (cmd, looked, r, trace)
        return p

    def _refused(self, decision, ip, looked, trace=None):
        """A connection refused before its greeting: its one smtpd.disconnect
        line (a refused connection is a session too: its line has an id),
        and a protocol that says 421 and closes, or (-k) one that drops
        the connection without a word."""
        if trace is not None:  # the decision log: -k too
            self.decisions.refused(ip, looked, trace, decision.reason)
        if not decision.code:  # -k: nothing is written, nothing logged (upas)
            return Dropped()
        session = logs.SessionLogger(logs.new_session_id())
        note = decision.note
        if note == "connect.shutdown":
            _refusedAtConnect(session.info, "connection from {ip} refused: shutting down", ip,
                              "shutdown")
        elif note == "connect.peer":
            _refusedAtConnect(session.info, "too many connections from {ip}", ip, "limit")
        elif note == "connect.rate":
            session.info("rate limit: {n} connections from {ip} in {window} seconds (limit "
                         "{limit})", n=looked["connection_rate"], ip=ip,
                         window=self.settings.rate_window, limit=self.settings.conn_rate,
                         event="smtpd.rate", peer=ip, kind="connection")
            _refusedAtConnect(session.info, "too many connections from {ip} in the rate window",
                              ip, "limit")
        elif note == "connect.state":
            _refusedAtConnect(session.warn, "connection from {ip} refused: shared state "
                              "unavailable", ip, "state-unavailable")
        else:
            n = looked["connections"] if note == "connect.limit" else self.settings.max_connections
            _refusedAtConnect(session.warn, "too many connections ({n}); refusing {ip}", ip,
                              "limit", n=n)
        return _Busy(decision.text())

    def admit(self, p):
        """Finish the connect table for ``p``, with the store's answers: fires
        with (trusted, IP action), the greeting's outcome, the connect facts
        and the trace (for the decision log), or None once the connection
        has been refused (``421``) and closed."""
        cmd, looked, pending, trace = self._admitting.pop(p)
        ip = p.peerIP
        s = self.settings

        def gather(name, arg):
            if name == "connection_slot":
                return unless_unavailable(self.store.acquireConnection(
                    ip, policy.peer_facts(ip, s, looked)[0], s.max_connections_per_peer,
                    s.max_connections), name, ip)
            return self.spam.gather(name, ip, None)

        def decided(outcome):
            facts = policy.peer_facts(ip, s, looked)
            trusted = facts[0]
            if outcome.decision.ok:
                if p not in self.connections:  # gone while the store answered
                    self.store.releaseConnection(ip, trusted)
                    return None
                p.exempt = trusted
                return facts, outcome, looked, trace
            self.connections.discard(p)  # refused: no session to count or close
            self._refused(outcome.decision, ip, looked, trace).makeConnection(p.transport)
            return None

        def failed(failure):
            # a bug, not an outage (that is UNAVAILABLE, a refusal of the
            # table): the client still gets its 421 (RFC 5321 3.8), not a
            # bare close it cannot tell from a network fault
            log.failure("connection state unavailable; closing the connection from {ip}",
                        failure, ip=ip, event="error")
            _refusedAtConnect(logs.SessionLogger(logs.new_session_id()).info,
                              "connection from {ip} closed: local error", ip, "error")
            if trace is not None:  # the decision log
                self.decisions.refused(ip, looked, trace, "error")
            self.connections.discard(p)
            _Busy(replies.LOCAL_ERROR).makeConnection(p.transport)
            return None

        r = policy.resume(pending, policy.CONNECT, None, cmd, s, gather, looked, trace)
        return defer.maybeDeferred(lambda: r).addCallback(decided).addErrback(failed)

    def connectionGone(self, p):
        if p in self.connections:
            self.connections.discard(p)
            if p.exempt is not None:
                d = self.store.releaseConnection(p.peerIP, p.exempt)
                unless_unavailable(d, "connection release", p.peerIP)

    def reload(self, settings):
        """New settings for new connections (SIGHUP); sessions under way keep theirs.

        The ratify lists, the helper files and the password file are read
        again at once, changed or not.
        """
        self.settings = settings
        self.spam.settings = settings
        self.domain = settings.dom
        self.spam.reread()
        for checker in set((self.portal.checkers if self.portal else {}).values()):
            if IReloadable.providedBy(checker):
                checker.reread()

    def shutdown(self, grace):
        """Close every session: those in DATA get up to ``grace`` seconds to finish.

        Fires once every connection is gone.
        """
        self.closing = True
        waits = [p.closeGracefully() for p in list(self.connections)]
        done = defer.DeferredList(waits)
        if not waits:
            return done

        def overdue():
            for p in list(self.connections):
                p.closeNow()

        timer = self.clock.callLater(grace, overdue)

        def finished(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)
