"""Embedding API: build the upas smtpd service or factory for any reactor.

    from upasmail import conf, service, settings
    s = settings.merge(conf.load("smtpd.conf"), root="/var/mail/upas")
    service.makeSmtpdService(s, "tcp:2525:interface=127.0.0.1").setServiceParent(app)

``makeSmtpdFactory`` gives just the protocol factory, for callers that do
their own listening.  Everything with effects (reactor/clock, thread pool
runner, mailer) is injectable; nothing here imports the global reactor
unless no reactor is given.  The DNS resolver (any ``twisted.names``
IResolver) defaults to ``client.createResolver``, i.e. resolv.conf.
"""

import re

from twisted.application import internet, service
from twisted.internet import endpoints, threads
from twisted.logger import Logger

from .delivery import UpasDelivery
from .mailer import Mailer
from .server import UpasSMTPFactory
from .spam import SpamFilter
from .store import MailRoot
from .trace import TraceFactory

log = Logger(namespace="smtpd")

DEFAULT_LISTEN = "tcp:2525:interface=127.0.0.1"


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def threadRunner(reactor):
    """``run_blocking`` for MailRoot: the reactor's thread pool."""
    return lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)


def makeResolver(reactor, address=None):
    """A twisted.names resolver: resolv.conf, or the server at (host, port)."""
    from twisted.names import client

    if address is not None:
        return client.Resolver(servers=[address], reactor=reactor)
    return client.createResolver()  # resolv.conf and /etc/hosts, global reactor


def makeSmtpdFactory(settings, reactor=None, run_blocking=None, portal=None,
                     challengers=None, contextFactory=None, clock=None, resolver=None):
    """The protocol factory; ``factory.root`` is its MailRoot.

    ``reactor`` starts mailer and validator processes; ``clock`` (default:
    the reactor) times sessions, tarpits, dates messages and limits
    helper programs; ``resolver`` answers every DNS question.
    """
    reactor = _reactor(reactor)
    clock = clock or reactor
    resolver = resolver or makeResolver(reactor)
    root = MailRoot(settings.root, run_blocking or threadRunner(reactor), clock)
    root.prepare()
    backend = root
    if settings.mailer:
        backend = Mailer(settings.mailer, reactor, settings.mailer_timeout, clock)

    def makeDelivery(session):
        return UpasDelivery(session, settings, root, backend, clock)

    spamfilter = SpamFilter(settings, resolver, reactor, clock)
    factory = UpasSMTPFactory(settings, makeDelivery, clock, portal=portal,
                              challengers=challengers, contextFactory=contextFactory,
                              spamfilter=spamfilter)
    factory.root = root
    return factory


def listens_on_loopback_only(description):
    """Does an endpoint string bind only to a loopback interface?"""
    m = re.search(r"(?:^|:)interface=([^:]+)", description.replace("\\:", "\0"))
    if not m:
        return description.startswith("unix:")
    iface = m.group(1).replace("\0", ":")
    return iface in ("localhost", "::1") or iface.startswith("127.")


def makeSmtpdService(settings, listen=DEFAULT_LISTEN, reactor=None, **kw):
    reactor = _reactor(reactor)
    factory = makeSmtpdFactory(settings, reactor, **kw)
    if not settings.relay_control and not listens_on_loopback_only(listen):
        log.warn(
            "WARNING: relay control is OFF (norelay off) and {listen} is not "
            "loopback-only: this server is an OPEN RELAY for anyone who can reach it",
            listen=listen,
        )
    top = service.MultiService()
    listening = factory
    if settings.debug:
        listening = TraceFactory(factory, settings.path("log_dir"), kw.get("clock") or reactor)
    server = internet.StreamServerEndpointService(
        endpoints.serverFromString(reactor, listen), listening
    )
    server._raiseSynchronously = True  # a port we cannot bind stops start-up
    server.setServiceParent(top)
    top.factory = factory
    return top
