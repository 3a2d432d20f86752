"""The state every connection shares: one interface, local and over AMP.

Connections at once (in all and per peer address), the AUTH failure
budget per client address, the greylist and its whitelist, and the
temporary trusted grants outlive one connection and must be the same for
every connection, whichever process serves it.  ``IStateStore`` names
them; every method returns a Deferred so that a store across the network
(Redis, a later issue) fits the same callers.

``LocalStateStore`` is today's behaviour: counts and the AUTH budget in
memory, the greylist and the grants in their files under the mail root.
It is the store of a single process and of the main process of
``--workers``, which serves it to its workers over AMP
(``StateServer``: one per worker, remembering the connections that worker
holds so that they are released when it dies); a worker's store is a
``RemoteStateStore`` on the other end of that channel.

The same channel carries what the main process and its workers tell each
other besides: ``Enqueued`` (a worker queued a job: the queue runner of
the main process wakes up) and ``Reload`` (SIGHUP).
"""

from collections import Counter

from twisted.internet import defer
from twisted.protocols import amp
from zope.interface import implementer

from ..rules import auth
from ..rules.greylist import Greylist
from ..interfaces import IReloadable, IStateStore, StateUnavailable
from ..rules.ratify import TrustedGrants

# acquireConnection's refusals
TOTAL, PEER = "total", "peer"
# a file the store cannot use is an OSError on the worker's side too
# (the greylist lets the peer through and logs why), and a shared state
# that cannot answer is StateUnavailable there (a temporary failure)
STORE_ERRORS = {OSError: b"OS_ERROR", StateUnavailable: b"STATE_UNAVAILABLE"}


def take_one(counts, key):
    """One fewer ``key`` in the Counter ``counts``, forgotten at none;
    False when it held none (there is nothing to give back)."""
    if counts[key] <= 0:
        return False
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
    return True


@implementer(IStateStore, IReloadable)
class LocalStateStore:
    """Memory and files of this process; correct for every process on the
    same mail root only when they ask the one that owns it."""

    def __init__(self, settings, clock):
        self.throttle = auth.Throttle.configured(clock, settings)
        self.greylist = Greylist(settings.path("grey"), clock, settings.greylist_min,
                                 settings.greylist_max)
        self.grants = TrustedGrants(settings.path("trusted_dir"), clock)
        self.perPeer = Counter()
        self.total = 0
        self.clock = clock
        self.attempts = {}  # (kind, window, window index) -> Counter of ip -> attempts

    def reread(self):
        """SIGHUP: the whitelist is read again."""
        self.greylist.reread()

    def acquireConnection(self, ip, exempt, perPeer, total):
        if self.total >= total:
            return defer.succeed(TOTAL)
        if not exempt and self.perPeer[ip] >= perPeer:
            return defer.succeed(PEER)
        self.total += 1
        if not exempt:
            self.perPeer[ip] += 1
        return defer.succeed(None)

    def releaseConnection(self, ip, exempt):
        self.total = max(self.total - 1, 0)
        if not exempt:
            take_one(self.perPeer, ip)
        return defer.succeed(None)

    def authBegin(self, ip):
        return defer.succeed(self.throttle.begin(ip))

    def authFailed(self, ip):
        return defer.succeed(self.throttle.failed(ip) + (self.throttle.limit,))

    def authSucceeded(self, ip):
        return defer.succeed(self.throttle.succeeded(ip))

    def authAbandoned(self, ip):
        return defer.succeed(self.throttle.abandoned(ip))

    def isWhitelisted(self, rsys):
        return defer.maybeDeferred(self.greylist.whitelisted, rsys)

    def greylistAttempt(self, lsys, rsys, recipients):
        return defer.maybeDeferred(self.greylist.attempt, lsys, rsys, recipients)

    def greylistPeek(self, lsys, rsys, recipients):
        """``greylistAttempt``'s outcomes, nothing recorded (``Greylist.peek``;
        local only: ``upas-policy explain`` reads the files itself)."""
        return defer.maybeDeferred(self.greylist.peek, lsys, rsys, recipients)

    def addToWhitelist(self, rsys, name):
        return defer.maybeDeferred(self.greylist.whitelist, rsys, name)

    def isGranted(self, ip):
        return defer.maybeDeferred(self.grants.is_trusted, ip)

    def grant(self, ip):
        return defer.maybeDeferred(self.grants.grant, ip)

    def countAttempt(self, kind, ip, window):
        # fixed windows aligned on the clock, as a shared store keys them,
        # so every node counts in the same minute; past windows are dropped
        index = int(self.clock.seconds() // window)
        counts = self.attempts.get((kind, window, index))
        if counts is None:
            for key in [k for k in self.attempts if k[:2] == (kind, window)]:
                del self.attempts[key]
            counts = self.attempts[kind, window, index] = Counter()
        counts[ip] += 1
        return defer.succeed(counts[ip])


# -- the channel between the main process and a worker ----------------------

class AcquireConnection(amp.Command):
    arguments = [(b"ip", amp.Unicode()), (b"exempt", amp.Boolean()),
                 (b"perPeer", amp.Integer()), (b"total", amp.Integer())]
    response = [(b"refused", amp.Unicode(optional=True))]
    errors = STORE_ERRORS


class ReleaseConnection(amp.Command):
    arguments = [(b"ip", amp.Unicode()), (b"exempt", amp.Boolean())]
    response = []
    requiresAnswer = False


class AuthBegin(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = [(b"ok", amp.Boolean())]
    errors = STORE_ERRORS


class AuthFailed(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = [(b"wait", amp.Float()), (b"failures", amp.Integer()), (b"limit", amp.Integer())]
    errors = STORE_ERRORS


class AuthSucceeded(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = []
    errors = STORE_ERRORS


class AuthAbandoned(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = []
    errors = STORE_ERRORS


class IsWhitelisted(amp.Command):
    arguments = [(b"rsys", amp.Unicode())]
    response = [(b"yes", amp.Boolean())]
    errors = STORE_ERRORS


class GreylistAttempt(amp.Command):
    arguments = [(b"lsys", amp.Unicode()), (b"rsys", amp.Unicode()),
                 (b"recipients", amp.ListOf(amp.Unicode()))]
    response = [(b"outcomes", amp.AmpList([(b"rcpt", amp.Unicode()),
                                           (b"state", amp.Unicode())]))]
    errors = STORE_ERRORS


class AddToWhitelist(amp.Command):
    arguments = [(b"rsys", amp.Unicode()), (b"name", amp.Unicode(optional=True))]
    response = []
    errors = STORE_ERRORS


class IsGranted(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = [(b"yes", amp.Boolean())]
    errors = STORE_ERRORS


class Grant(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    response = []
    errors = STORE_ERRORS


class CountAttempt(amp.Command):
    arguments = [(b"kind", amp.Unicode()), (b"ip", amp.Unicode()), (b"window", amp.Float())]
    response = [(b"count", amp.Integer())]
    errors = STORE_ERRORS


class Enqueued(amp.Command):
    """A worker queued a job: the main process's queue runner should know."""
    arguments = [(b"qid", amp.Unicode())]
    response = []
    requiresAnswer = False


class Reload(amp.Command):
    """SIGHUP reached the main process: the worker reloads too."""
    arguments = []
    response = []


class Channel(amp.AMP):
    """AMP without its log lines at connect and disconnect: a worker's
    channel opening and closing is logged as the worker's start and end."""

    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class StateServer(Channel):
    """The main process's end of one worker's channel.

    It answers from ``store`` and keeps what the worker holds, so a worker
    that dies takes its connections out of the counts.  ``enqueued`` and
    ``lost`` are the main process's callables.
    """

    def __init__(self, store, enqueued=lambda qid: None, lost=lambda: None):
        Channel.__init__(self)
        self.store = store
        self.enqueued = enqueued
        self.lost = lost
        self.held = Counter()  # (ip, exempt) -> connections of this worker
        self.checking = Counter()  # ip -> AUTH checks of this worker under way

    @AcquireConnection.responder
    def acquireConnection(self, ip, exempt, perPeer, total):
        def counted(refused):
            if refused is None:
                self.held[ip, exempt] += 1
            return {"refused": refused}
        return self.store.acquireConnection(ip, exempt, perPeer, total).addCallback(counted)

    @ReleaseConnection.responder
    def releaseConnection(self, ip, exempt):
        if take_one(self.held, (ip, exempt)):  # never release what this worker does not hold
            self.store.releaseConnection(ip, exempt)
        return {}

    @AuthBegin.responder
    def authBegin(self, ip):
        def begun(ok):
            if ok:
                self.checking[ip] += 1
            return {"ok": ok}

        return self.store.authBegin(ip).addCallback(begun)

    def _checked(self, ip):
        """One of this worker's AUTH checks for ``ip`` has ended."""
        take_one(self.checking, ip)

    @AuthFailed.responder
    def authFailed(self, ip):
        self._checked(ip)
        return self.store.authFailed(ip).addCallback(
            lambda r: {"wait": r[0], "failures": r[1], "limit": r[2]})

    @AuthSucceeded.responder
    def authSucceeded(self, ip):
        self._checked(ip)
        return self.store.authSucceeded(ip).addCallback(lambda _: {})

    @AuthAbandoned.responder
    def authAbandoned(self, ip):
        self._checked(ip)
        return self.store.authAbandoned(ip).addCallback(lambda _: {})

    @IsWhitelisted.responder
    def isWhitelisted(self, rsys):
        return self.store.isWhitelisted(rsys).addCallback(lambda yes: {"yes": yes})

    @GreylistAttempt.responder
    def greylistAttempt(self, lsys, rsys, recipients):
        return self.store.greylistAttempt(lsys, rsys, recipients).addCallback(
            lambda outcomes: {"outcomes": [{"rcpt": r, "state": s} for r, s in outcomes]})

    @AddToWhitelist.responder
    def addToWhitelist(self, rsys, name=None):
        return self.store.addToWhitelist(rsys, name).addCallback(lambda _: {})

    @IsGranted.responder
    def isGranted(self, ip):
        return self.store.isGranted(ip).addCallback(lambda yes: {"yes": yes})

    @Grant.responder
    def grant(self, ip):
        return self.store.grant(ip).addCallback(lambda _: {})

    @CountAttempt.responder
    def countAttempt(self, kind, ip, window):
        return self.store.countAttempt(kind, ip, window).addCallback(lambda n: {"count": n})

    @Enqueued.responder
    def jobEnqueued(self, qid):
        self.enqueued(qid)
        return {}

    def releaseAll(self):
        """The worker is gone: nothing it held counts any more (its
        connections, and the AUTH checks it had under way, which would
        otherwise count against their addresses for ever)."""
        held, self.held = self.held, Counter()
        for (ip, exempt), n in held.items():
            for _ in range(n):
                self.store.releaseConnection(ip, exempt)
        checking, self.checking = self.checking, Counter()
        for ip, n in checking.items():
            for _ in range(n):
                # a shared store that cannot answer forgets them with its TTL
                self.store.authAbandoned(ip).addErrback(lambda f: f.trap(StateUnavailable))

    def connectionLost(self, reason):
        Channel.connectionLost(self, reason)
        self.releaseAll()
        self.lost()


@implementer(IStateStore)
class RemoteStateStore:
    """A worker's store: every question goes to the main process over
    ``amp`` (an ``amp.AMP`` connected to its ``StateServer``)."""

    def __init__(self, amp):
        self.amp = amp

    def acquireConnection(self, ip, exempt, perPeer, total):
        return self.amp.callRemote(AcquireConnection, ip=ip, exempt=exempt, perPeer=perPeer,
                                   total=total).addCallback(lambda r: r.get("refused"))

    def releaseConnection(self, ip, exempt):
        self.amp.callRemote(ReleaseConnection, ip=ip, exempt=exempt)
        return defer.succeed(None)

    def authBegin(self, ip):
        return self.amp.callRemote(AuthBegin, ip=ip).addCallback(lambda r: r["ok"])

    def authFailed(self, ip):
        return self.amp.callRemote(AuthFailed, ip=ip).addCallback(
            lambda r: (r["wait"], r["failures"], r["limit"]))

    def authSucceeded(self, ip):
        return self.amp.callRemote(AuthSucceeded, ip=ip).addCallback(lambda _: None)

    def authAbandoned(self, ip):
        return self.amp.callRemote(AuthAbandoned, ip=ip).addCallback(lambda _: None)

    def isWhitelisted(self, rsys):
        return self.amp.callRemote(IsWhitelisted, rsys=rsys).addCallback(lambda r: r["yes"])

    def greylistAttempt(self, lsys, rsys, recipients):
        return self.amp.callRemote(GreylistAttempt, lsys=lsys, rsys=rsys,
                                   recipients=list(recipients)).addCallback(
            lambda r: [(o["rcpt"], o["state"]) for o in r["outcomes"]])

    def addToWhitelist(self, rsys, name):
        kw = {} if name is None else {"name": name}
        return self.amp.callRemote(AddToWhitelist, rsys=rsys, **kw).addCallback(lambda _: None)

    def isGranted(self, ip):
        return self.amp.callRemote(IsGranted, ip=ip).addCallback(lambda r: r["yes"])

    def grant(self, ip):
        return self.amp.callRemote(Grant, ip=ip).addCallback(lambda _: None)

    def countAttempt(self, kind, ip, window):
        return self.amp.callRemote(CountAttempt, kind=kind, ip=ip,
                                   window=float(window)).addCallback(
            lambda r: r["count"])
