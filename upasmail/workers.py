"""``--workers N``: N processes serving one listening socket.

The server is CPU-bound Python, so one process uses one core.  With
``--workers N`` the main process binds the listener as always (so a
privileged port is bound before twistd drops privileges), serves on it
and runs the queue runner, and starts N-1 workers: the same Python
running this module, handed the listening socket (fd 3) and one end of a
socket pair (fd 4) as its state channel.  A worker adopts the socket
(``adoptStreamPort``; an ``ssl:`` listener's TLS is put back around the
factory) and serves with the same options, policy, mail root and limits;
the kernel spreads new connections over every process that accepts on it.

Everything connections share lives in the main process's
``LocalStateStore``; a worker asks it over AMP (``statestore``) and tells
it about the jobs it queues (the queue runner wakes up).  A worker's
standard output is a pipe to the main process: its log events, one JSON
object a line with all their fields (``log_relay``), which the main
process publishes as its own with ``worker`` set (and ``w<id>`` after the
level in the text log), so its JSON log and its metrics see them whole.
SIGHUP in the main process reloads every worker; stopping (SIGTERM)
stops every worker the same graceful way and waits for them.  A worker
that dies is logged and started again after a delay that doubles up to
``MAX_BACKOFF``; its connections stop counting at once.  A worker whose
main process is gone (its channel closes) stops.
"""

import json
import os
import signal
import socket
import sys
from time import time as time_now

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorSSL, IStreamServerEndpoint
from twisted.logger import (FilteringLogObserver, Logger, LogLevel, globalLogBeginner,
                            globalLogPublisher)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from . import logs
from .smtpd import statestore
from .smtpd.proxylistener import ProxyEndpoint

log = Logger(namespace="smtpd")

LISTEN_FD, CHANNEL_FD = 3, 4
MIN_BACKOFF, MAX_BACKOFF = 1.0, 30.0
STEADY = 60.0  # a worker that ran this long restarts without waiting
def share_accepts(port):
    """Make ``port`` (a ``tcp.Port``) accept one connection per wake-up.

    Every process sharing the socket is woken for a new connection, and
    Twisted accepts up to a hundred at once: a burst of connections (ten
    clients that connect at once and stay, as ``smtp-source -d`` does)
    would all go to whichever process woke first.  One at a time, each
    process takes one while the others take the next.
    """
    read = port.doRead

    def doRead():
        port.numberAccepts = 1
        return read()

    port.doRead = doRead
    return port


def relayed_event(worker, time, namespace, system, level, text, fields=()):
    """A worker's log event as the main process logs it: its ``fields``,
    its ``text`` as the worker formatted it, and twistd's ``[system]``
    (``namespace#level`` by default) with `` w<id>``."""
    event = dict(fields)
    level = LogLevel.levelWithName(level)
    event.update(log_format="{log_relayed}", log_relayed=text, log_time=time,
                 log_namespace=namespace, log_level=level, worker=worker,
                 log_system="%s w%d" % (system or "%s#%s" % (namespace, level.name), worker))
    return event


def _relayed_line(worker, line):
    """A line of a worker's standard output as an event (``log_relay``)."""
    try:
        fields = json.loads(line)
        if isinstance(fields, dict):
            return relayed_event(worker, fields.pop("log_time"), fields.pop("log_namespace"),
                                 fields.pop("log_system"), fields.pop("log_level"),
                                 fields.pop("log_relayed"), fields)
    except (ValueError, TypeError, KeyError):
        pass
    # not ours: something printed
    return relayed_event(worker, time_now(), "stdout", "", "info",
                         line.decode("utf-8", "replace"))


class Worker(protocol.ProcessProtocol):
    """One worker process seen from the main process; what it writes to
    its standard output are its log events (``log_relay``)."""

    def __init__(self, pool, number, publish=globalLogPublisher):
        self.pool = pool
        self.number = number
        self.publish = publish
        self.channel = None  # its StateServer
        self.started = None
        self.ended = defer.Deferred()
        self._partial = b""

    def outReceived(self, data):
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.publish(_relayed_line(self.number, line))

    def processEnded(self, reason):
        if self._partial:  # its last words, without their line end
            self.outReceived(b"\n")
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """Starts, reloads, restarts and stops the workers of the main process.

    ``top`` is the main process's SmtpdService (its listener, store and
    mail root); ``argv`` the upas-smtpd options the workers parse again.
    """

    def __init__(self, top, argv, count, reactor, clock=None, executable=sys.executable):
        self.top = top
        self.argv = list(argv)
        self.count = count
        self.reactor = reactor
        self.clock = clock or reactor
        self.executable = executable
        self.workers = {}  # number -> Worker while its process runs
        self.backoff = {}  # number -> seconds before its next restart
        self.restarts = {}  # number -> the pending restart's call
        self.port = None

    def startService(self):
        service.Service.startService(self)
        # the listener was bound in privilegedStartService (twistd binds
        # before it drops privileges); its port is there already
        self.top.server.listening.addCallback(self._listening)

    def _listening(self, port):
        self.port = share_accepts(port)
        for number in range(1, self.count + 1):
            self.spawn(number)
        return port

    def spawn(self, number):
        self.restarts.pop(number, None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = Worker(self, number)
        try:
            transport = self.reactor.spawnProcess(
                worker, self.executable,
                [self.executable, "-m", "upasmail.workers", str(number), *self.argv],
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: 2, LISTEN_FD: self.port.fileno(),
                          CHANNEL_FD: theirs.fileno()})
        finally:
            theirs.close()
        worker.started = self.clock.seconds()
        store = self.top.factory.store
        worker.channel = statestore.StateServer(store, enqueued=self.enqueued)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           protocol.Factory.forProtocol(lambda: worker.channel))
        ours.close()  # the reactor has its own copy
        self.workers[number] = worker
        log.info("worker {n} started (pid {pid})", n=number, pid=transport.pid,
                 event="worker.started")
        return worker

    def enqueued(self, qid):
        """A worker queued a job: wake the queue runner as our own enqueues do."""
        for hook in list(self.top.factory.root.enqueued):
            try:
                hook(qid)
            except Exception:
                log.failure("queue wake-up failed", event="error")

    def workerEnded(self, worker, reason):
        self.workers.pop(worker.number, None)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = "signal %s" % sig if sig else "status %s" % code
        if not self.running:
            log.info("worker {n} stopped ({how})", n=worker.number, how=how,
                     event="worker.stopped")
            return
        ran = self.clock.seconds() - worker.started
        before = self.backoff.get(worker.number)
        wait = (MIN_BACKOFF if before is None or ran >= STEADY
                else min(before * 2, MAX_BACKOFF))
        self.backoff[worker.number] = wait
        log.error("worker {n} died ({how}); starting it again in {wait:g} s",
                  n=worker.number, how=how, wait=wait, event="worker.died")
        self.restarts[worker.number] = self.clock.callLater(wait, self.spawn, worker.number)

    def reload(self):
        """SIGHUP: every worker reads its settings again."""
        for worker in list(self.workers.values()):
            worker.channel.callRemote(statestore.Reload).addErrback(
                lambda f, n=worker.number: log.warn("worker {n}: reload not delivered: {err}",
                                                    n=n, err=f.getErrorMessage(),
                                                    event="smtpd.reload", ok=False))

    def stopService(self):
        service.Service.stopService(self)
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts = {}
        waits = []
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess("TERM")  # its own graceful stop
            except (OSError, ProcessExitedAlready):  # processEnded is on its way
                pass
            waits.append(worker.ended)
        return defer.DeferredList(waits)


# -- the worker process ---------------------------------------------------------

@implementer(IStreamServerEndpoint)
class AdoptedTLSEndpoint:
    """An adopted listening socket with TLS around each connection, as the
    ``ssl:`` endpoint the main process bound puts it."""

    def __init__(self, adopted, contextFactory):
        self.adopted = adopted
        self.contextFactory = contextFactory

    def listen(self, factory):
        return self.adopted.listen(TLSMemoryBIOFactory(self.contextFactory, False, factory))


@implementer(IReactorSSL)
class _ListenSSLSeen:
    """A reactor that only notes what an ``ssl:`` endpoint would listen
    with: its TLS context, which Twisted's endpoint keeps to itself."""

    contextFactory = None

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.contextFactory = contextFactory
        return None  # nothing listens

    def connectSSL(self, *args, **kwargs):
        raise NotImplementedError("a listener only")


def tls_context(description):
    """The TLS context the ``ssl:`` listen string names (its certificate
    and options, as the main process's endpoint has them)."""
    seen = _ListenSSLSeen()
    endpoints.serverFromString(seen, description).listen(protocol.Factory())
    return seen.contextFactory


def adopted_endpoint(reactor, original, fd=LISTEN_FD, description=None):
    """The worker's endpoint for the socket at ``fd`` bound from ``original``
    (made from the listen string ``description``); a PROXY listener's
    layer is put back around it."""
    if isinstance(original, ProxyEndpoint):
        return ProxyEndpoint(adopted_endpoint(reactor, original.endpoint, fd, description),
                             original.networks, original.clock, original.cap)
    family = socket.socket(fileno=os.dup(fd)).family  # closed with the object
    adopted = endpoints.AdoptedStreamServerEndpoint(reactor, fd, family)
    if isinstance(original, endpoints.SSL4ServerEndpoint):
        return AdoptedTLSEndpoint(adopted, tls_context(description))
    return adopted


class WorkerChannel(statestore.Channel):
    """The worker's end of its channel: a lost channel stops the worker."""

    def __init__(self, reactor, reload):
        statestore.Channel.__init__(self)
        self.reactor = reactor
        self.reload = reload

    @statestore.Reload.responder
    def reloaded(self):
        try:
            self.reload()
        except Exception:  # AMP would close the channel, and so stop the worker
            log.failure("reload failed", event="smtpd.reload", ok=False)
        return {}

    def connectionLost(self, reason):
        statestore.Channel.connectionLost(self, reason)
        if self.reactor.running:
            log.warn("main process gone; stopping", event="worker.stopped")
            self.reactor.stop()


def log_relay(write, reactor):
    """A log observer writing the events as JSON lines with ``write`` (the
    worker's standard output): those of one reactor turn together.

    A line is the event's own fields (``logs.event_fields``; a value JSON
    cannot hold is sent as its text), its text as formatted here
    (``log_relayed``, a failure's traceback after it) and the ``log_``
    keys the main process needs: the main process's text log shows the
    worker's text, its JSON log and observers get the fields."""
    pending = []

    def send():
        if not pending:  # already sent (a flush came before the reactor's turn)
            return
        data = "".join(pending).encode("utf-8")
        del pending[:]
        try:
            write(data)
        except OSError:  # the main process is gone: there is no log to write to
            pass

    def observe(event):
        fields = logs.event_fields(event)
        fields.update(log_relayed=logs.event_text(event),
                      log_time=event.get("log_time") or time_now(),
                      log_namespace=event.get("log_namespace") or "-",
                      log_system=event.get("log_system") or "",
                      log_level=(event.get("log_level") or LogLevel.info).name)
        if not pending:
            reactor.callLater(0, send)
        pending.append(json.dumps(fields, default=str) + "\n")

    observer = FilteringLogObserver(observe, [logs.DNSNoise()])
    observer.flush = send  # events logged after the reactor's last turn
    return observer


def write_all(fd):
    def write(data):
        while data:
            data = data[os.write(fd, data):]
    return write


def run(number, argv, reactor=None):
    """The worker process: serve on the inherited socket until stopped."""
    from .cli import options as smtpd_options
    from . import service as smtpd_service

    if reactor is None:
        from twisted.internet import reactor
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process relays its SIGHUP
    channel = WorkerChannel(reactor, lambda: reload())
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX,
                                  protocol.Factory.forProtocol(lambda: channel))
    os.close(CHANNEL_FD)  # the reactor has its own copy
    relay = log_relay(write_all(sys.stdout.fileno()), reactor)
    globalLogBeginner.beginLoggingTo([relay], redirectStandardIO=False)
    options = smtpd_options.SmtpdOptions()
    try:
        options.parseOptions(argv)
    except (SystemExit, usage.UsageError) as e:
        log.error("worker {n}: {err}", n=number, err=getattr(e, "code", e), event="worker.died")
        return 1
    # the main process runs the queue; a worker's jobs wake it (Enqueued)
    options["mergeArgs"]["queue_runner"] = False
    settings = smtpd_options.reloaded_settings(options)
    store = statestore.RemoteStateStore(channel)
    original = smtpd_service.listener_endpoint(reactor, options["listen"], settings.proxy_from)
    top = smtpd_service.makeSmtpdService(
        settings, options["listen"], reactor,
        endpoint=adopted_endpoint(reactor, original, description=options["listen"]),
        store=store, resolver=smtpd_service.makeResolver(reactor, options.get("resolverAddress")))
    smtpd_options.open_decision_log(top.factory, options, reactor)
    top.factory.root.enqueued.append(
        # the id is enough: the main process reads that one envelope
        lambda qid, record=None, inode=None: channel.callRemote(statestore.Enqueued, qid=qid))

    def reload():
        smtpd_options.reload_service(top, options)

    top.privilegedStartService()
    top.server.listening.addCallback(share_accepts)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    relay.flush()  # the lines of the last sessions, logged as the reactor stopped
    return 0


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), sys.argv[2:]))
