"""Embedding API: build the upas smtpd service or factory for any reactor.

The stable API and its extension points: docs/embedding.rst.

    from upasmail import conf, service, settings
    s = settings.merge(conf.load("smtpd.conf"), root="/var/mail/upas")
    service.makeSmtpdService(s, "tcp:2525:interface=127.0.0.1").setServiceParent(app)

``makeSmtpdFactory`` gives just the protocol factory, for callers that do
their own listening.  Everything with effects (reactor/clock, thread pool
runner, mailer) is injectable; nothing here imports the global reactor
unless no reactor is given.  The DNS resolver (any ``twisted.names``
IResolver) defaults to ``makeResolver``: /etc/hosts, then resolv.conf's
servers, on the reactor given.

AUTH: pass a ``twisted.cred`` ``checker`` (or a whole ``portal``) or get
``passwd.PasswordFile`` on ``settings.path("passwd")``.  TLS: pass a
server ``contextFactory`` or set ``settings.cert`` (``tls.CertificateFile``).
"""

import functools
import re

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import endpoints, threads
from twisted.internet.interfaces import IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger

from .rules.auth import SessionRealm
from .conf import ConfigError
from .smtpd.delivery import UpasDelivery
from .smtpd.listening import ListeningService
from .mailroot.mailer import Mailer
from .smtpd.factory import UpasSMTPFactory
from .smtpd.proxylistener import ProxyEndpoint
from .smtpd.spam import SpamFilter
from .smtpd.redisstate import FallbackStateStore, RedisStateStore
from .smtpd.statestore import LocalStateStore
from .smtp.mxdial import local_addresses
from .passwd import PasswordFile
from .runq.queue import QueueRunner, record_routing
from .mailroot.groupcommit import SyncThread
from .mailroot.store import MailRoot
from .smtpd.tls import CertificateFile, ImplicitTLSFactory
from .smtpd.trace import TraceFactory

log = Logger(namespace="smtpd")

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def threadRunner(reactor):
    """``run_blocking`` for MailRoot: the reactor's thread pool."""
    return lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)


def makeResolver(reactor, address=None, hosts=None):
    """A twisted.names resolver: resolv.conf, or the server at (host, port).

    Without ``address``, /etc/hosts (or the ``hosts`` file) answers first;
    with one, a ``hosts`` file answers first only when given.
    """
    from twisted.names import cache, client
    from twisted.names import hosts as hostsfile
    from twisted.names.resolve import ResolverChain

    if address is not None:
        dns = client.Resolver(servers=[address], reactor=reactor)
        return dns if hosts is None else ResolverChain([hostsfile.Resolver(hosts), dns])
    # client.createResolver's chain, built here because it takes no reactor
    # (its cache and resolver would run on the global one)
    return ResolverChain([hostsfile.Resolver(hosts or b"/etc/hosts"),
                          cache.CacheResolver(reactor=reactor),
                          client.Resolver(resolv=b"/etc/resolv.conf", reactor=reactor)])


def makeSmtpdFactory(settings, reactor=None, run_blocking=None, portal=None,
                     contextFactory=None, clock=None, resolver=None, checker=None,
                     store=None, tidy=True, makeDelivery=None):
    """The protocol factory; ``factory.root`` is its MailRoot.

    ``reactor`` starts mailer and validator processes; ``clock`` (default:
    the reactor) times sessions, tarpits, AUTH failures, dates messages and
    limits helper programs; ``resolver`` answers every DNS question;
    ``store`` (an ``IStateStore``; default: a ``LocalStateStore``) keeps
    the state every connection shares.  ``makeDelivery(session)``, when
    given, returns the ``IMessageDelivery`` of a new connection instead of
    the built-in one (mailboxes and queue, or ``settings.mailer``): the
    upas policy still decides who may send what, it only stores.
    A ``settings.cert`` that cannot be used raises ConfigError.
    """
    reactor = _reactor(reactor)
    clock = clock or reactor
    resolver = resolver or makeResolver(reactor)
    own_threads = run_blocking is None
    run_blocking = run_blocking or threadRunner(reactor)
    if portal is None:
        checker = checker or PasswordFile(settings.path("passwd"), run_blocking)
        portal = Portal(SessionRealm(), [checker])
    if contextFactory is None and settings.cert:
        contextFactory = CertificateFile(settings.cert, settings.key)
        contextFactory.load()
    sync_blocking = collect = None
    if own_threads and IReactorCore.providedBy(reactor):  # else tests run it their way
        sync_blocking = SyncThread(reactor)
        reactor.addSystemEventTrigger("after", "shutdown", sync_blocking.stop)
        collect = functools.partial(reactor.callLater, 0)  # a batch per reactor turn
    root = MailRoot(settings.root, run_blocking, clock, settings.dom, settings.path("lib"),
                    settings.ours, sync_blocking=sync_blocking, collect=collect)
    root.prepare(tidy)  # a worker (tidy=False) must not clear a live process's spool
    backend = root
    if settings.mailer:
        backend = Mailer(settings.mailer, reactor, settings.mailer_timeout, clock)

    def builtInDelivery(session):
        # factory.settings, not settings: SIGHUP may have replaced them
        return UpasDelivery(session, factory.settings, root, backend, clock)

    spamfilter = SpamFilter(settings, resolver, reactor, clock, store)
    factory = UpasSMTPFactory(settings, makeDelivery or builtInDelivery, clock, portal=portal,
                              contextFactory=contextFactory, spamfilter=spamfilter)
    factory.root = root
    return factory


def makeStateStore(settings, reactor, clock=None):
    """The store ``settings.state`` names: (the store, the service that
    connects it and holds this node's lease), or (None, None) for the local
    default.  An unreachable Redis is no error: the store fails (or falls
    back, ``--state-failure local``) until it answers."""
    if settings.state == "local":
        return None, None
    clock = clock or reactor
    shared = RedisStateStore(settings.state, settings, clock, reactor, node=settings.node,
                             lease=settings.state_lease)
    store = shared
    if settings.state_failure == "local":
        store = FallbackStateStore(shared, LocalStateStore(settings, clock))
    return store, shared


FD_RESERVE = 64  # open files kept for mailboxes, the queue, DNS, helpers


def raise_fd_limit():
    """Raise the soft open-file limit as far as the hard one allows; (soft, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_cap():
    """How many connections the current open-file limit leaves room for."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, 1)


class SessionDrain(service.Service):
    """Stopping (SIGTERM): sessions in DATA may finish within the grace
    period (``settings.shutdown_grace``), the others get ``421`` at once."""

    def __init__(self, factory):
        self.factory = factory

    def stopService(self):
        service.Service.stopService(self)
        return self.factory.shutdown(self.factory.settings.shutdown_grace)


class SmtpdService(service.MultiService):
    """The queue runner, the session drain and the listener, stopped in
    reverse: listening ends first, then sessions, then the queue."""

    def startService(self):
        # Not when the service is built: under twistd --uid that is as root,
        # in a mail root the run user owns, where root's rewrite would leave
        # routing.json root's (the next start-up check fails) and would
        # follow a routing.json.tmp link the run user planted.  startService
        # runs after twistd's switch.
        self.recordRouting(self.factory.settings)
        service.MultiService.startService(self)

    def recordRouting(self, settings):
        """The record is upas-runq's hint: one that cannot be written is said,
        and the server goes on."""
        if not self.recordsRouting:
            return
        try:
            record_routing(self.factory.root.root, settings)
        except OSError as e:
            log.error("{root}: cannot record the routing for upas-runq: {err}", event="queue.routing",
                      root=self.factory.root.root, err=e.strerror or e)

    def reload(self, settings):
        """SIGHUP: new settings (smtpd.conf) for new sessions and the queue."""
        self.factory.reload(settings)
        self.factory.root.configure(settings.dom, settings.ours)
        self.factory.root.mailboxes.reread()
        if self.queue is not None:
            self.queue.settings = settings
        self.recordRouting(settings)
        log.info("settings reloaded", event="smtpd.reload", ok=True)


def listens_on_loopback_only(description):
    """Does an endpoint string bind only to a loopback interface?"""
    description = proxy_listener(description) or description
    ifaces = [p[len("interface="):] for p in endpoint_parts(description)
              if p.startswith("interface=")]
    if not ifaces:
        return description.startswith("unix:")
    return ifaces[0] in ("localhost", "::1") or ifaces[0].startswith("127.")


def endpoint_parts(description):
    """The ``:``-separated parts of an endpoint string (``\\:`` escapes a colon)."""
    return [p.replace("\0", ":") for p in description.replace("\\:", "\0").split(":")]


def _raw_parts(description):
    """The ``:``-separated parts as written, escapes kept (Twisted's rule:
    a backslash escapes any character)."""
    parts, part, chars = [], "", iter(description)
    for c in chars:
        if c == "\\":
            part += c + next(chars, "")
        elif c == ":":
            parts.append(part)
            part = ""
        else:
            part += c
    return parts + [part]


def _unescaped(part):
    return re.sub(r"\\(.)", r"\1", part)


def proxy_listener(description):
    """For a PROXY listener (``haproxy:ENDPOINT``, any letter case or
    escape), the description of the endpoint under it; else None.

    The PROXY layer is ours (``proxylistener``); the endpoint under it is
    Twisted's.  As Twisted's ``haproxy:`` parser does, options written
    before the endpoint type go after it.
    """
    first, *rest = _raw_parts(description)
    if _unescaped(first).lower() != "haproxy" or not rest:
        return None
    options = []
    while len(rest) > 1 and "=" in _unescaped(rest[0]):
        options.append(rest.pop(0))
    return ":".join(rest + options)


def _nested_endpoints(endpoint):
    """The endpoint and those it wraps, as far as they are its attributes."""
    yield endpoint
    for value in getattr(endpoint, "__dict__", {}).values():
        if IStreamServerEndpoint.providedBy(value):
            yield from _nested_endpoints(value)


def hides_proxy_protocol(endpoint, description):
    """Might the endpoint Twisted built read PROXY headers itself, where
    our layer cannot be put outside it?

    Twisted's own ``haproxy:`` can only come first (``proxy_listener``);
    an endpoint type Twisted does not ship might keep a nested one where
    we cannot see it: then a ``haproxy`` anywhere in the string is
    enough, as we cannot be sure it is not one.
    """
    foreign = any(type(e).__module__ != endpoints.__name__ for e in _nested_endpoints(endpoint))
    return foreign and "haproxy" in _unescaped(description).lower()


PROXY_FROM_NEEDED = ("--listen {listen}: a PROXY listener needs --proxy-from "
                     "(the load balancers' addresses)")
PROXY_FROM_UNUSED = ("--proxy-from is only for a PROXY listener (--listen haproxy:...), "
                     "not {listen}: every client here has the address it connects from")


def proxy_from_problem(listen, proxy_from):
    """Start-up's one-line error when ``--proxy-from`` and the listener
    do not go together, or None."""
    if proxy_listener(listen) is not None and not proxy_from:
        return PROXY_FROM_NEEDED.format(listen=listen)
    if proxy_from and proxy_listener(listen) is None:
        return PROXY_FROM_UNUSED.format(listen=listen)
    return None


OPEN_RELAY = ("relay control is OFF (norelay off) and {listen} is not loopback-only: "
              "this server is an OPEN RELAY for anyone who can reach it")


def open_relay(settings, listen):
    """Do these settings on this listener make an open relay (``OPEN_RELAY``)?

    Behind a PROXY listener the clients are whoever reaches the load
    balancer, however the listener itself is bound."""
    loopback = proxy_listener(listen) is None and listens_on_loopback_only(listen)
    return not (settings.relay_control or loopback)


PROXY_HIDDEN = ("--listen {listen}: a PROXY protocol (haproxy:) listener must be written "
                "haproxy:ENDPOINT, not inside another endpoint type")
PROXY_OVER_TLS = ("--listen {listen}: the PROXY header comes before TLS: write "
                  "haproxy:tcp:... with --smtps")
PROXY_TWICE = "--listen {listen}: haproxy: twice (one PROXY header is read)"


def listener_endpoint(reactor, description, proxy_from=(), clock=None):
    """The server endpoint for ``description``: Twisted's, inside our
    PROXY layer for ``haproxy:ENDPOINT`` (headers believed from the
    ``proxy_from`` networks only; the header timeout on ``clock``,
    default the reactor; connections bounded by the open-file limit).
    ConfigError for a PROXY listener we cannot serve; a description
    Twisted cannot parse raises whatever its parser raises.
    """
    under = proxy_listener(description)
    kind = _unescaped(_raw_parts(under)[0]).lower() if under is not None else None
    refusal = {"ssl": PROXY_OVER_TLS, "haproxy": PROXY_TWICE}.get(kind)
    if refusal:
        raise ConfigError(refusal.format(listen=description))
    endpoint = endpoints.serverFromString(reactor, under or description)
    if hides_proxy_protocol(endpoint, under or description):
        raise ConfigError(PROXY_HIDDEN.format(listen=description))
    if under is None:
        return endpoint
    return ProxyEndpoint(endpoint, proxy_from, clock or reactor, cap=fd_cap())


# the listeners --workers can share: a worker adopts the plain TCP socket
# and puts TLS back on top (workers.adopted_endpoint)
ADOPTABLE = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
             endpoints.SSL4ServerEndpoint)


def adoptable(endpoint):
    if isinstance(endpoint, ProxyEndpoint):
        endpoint = endpoint.endpoint
    return isinstance(endpoint, ADOPTABLE)


def connectionFactory(factory, settings, clock):
    """What a connection meets: the protocol factory, inside the ``-d``
    trace, inside implicit TLS (``--smtps``).  The listener and stdio mode
    both serve through this."""
    listening = factory
    if settings.debug:
        listening = TraceFactory(factory, settings.path("log_dir"), clock)
    if settings.smtps:
        if factory.contextFactory is None:
            raise ConfigError("--smtps needs a certificate (-c)")
        # the trace sits inside TLS, so it records the clear text
        listening = ImplicitTLSFactory(factory.contextFactory, listening)
    return listening


def makeSmtpdService(settings, listen=DEFAULT_LISTEN, reactor=None, endpoint=None, **kw):
    """The listener plus, unless ``settings.queue_runner`` is off, the queue
    runner (``top.queue``) on the same mail root, resolver and clock.

    A ``haproxy:`` listener without ``settings.proxy_from`` raises
    ConfigError (``PROXY_FROM_NEEDED``), as do those ``listener_endpoint``
    refuses.
    ``endpoint``, when given, is used instead of ``listen``'s (a worker's
    adopted socket: the process that bound it has given the warnings).
    """
    reactor = _reactor(reactor)
    adopted = endpoint is not None
    if proxy_listener(listen) is not None and not settings.proxy_from:
        raise ConfigError(PROXY_FROM_NEEDED.format(listen=listen))
    if not adopted:
        endpoint = listener_endpoint(reactor, listen, settings.proxy_from,
                                     kw.get("clock") or reactor)
    kw["resolver"] = kw.get("resolver") or makeResolver(reactor)
    shared = None
    if kw.get("store") is None:
        kw["store"], shared = makeStateStore(settings, reactor, kw.get("clock"))
    factory = makeSmtpdFactory(settings, reactor, tidy=not adopted, **kw)
    if not adopted and open_relay(settings, listen):
        log.warn("WARNING: " + OPEN_RELAY, listen=listen, event="smtpd.config")
    factory.fdCap = fd_cap()
    top = SmtpdService()
    # upas-runq on the same root routes as we do (smarthost, our domains);
    # of the processes sharing a listener, the one that bound it says so
    # (at startService: see there)
    top.recordsRouting = not adopted
    top.factory = factory
    top.queue = None
    if shared is not None:  # first: connected before the listener, stopped after it
        shared.setServiceParent(top)
    if settings.queue_runner:
        top.queue = QueueRunner(factory.root, settings, reactor, kw["resolver"],
                                kw.get("clock") or reactor, ours=local_addresses)
        top.queue.setServiceParent(top)
    SessionDrain(factory).setServiceParent(top)
    listening = connectionFactory(factory, settings, kw.get("clock") or reactor)
    top.server = ListeningService(endpoint, listening)  # a port not bound stops start-up
    top.server.setServiceParent(top)
    return top
