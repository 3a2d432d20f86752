"""``upas-smtpd``: one SMTP session on standard input and output.

upas smtpd is started by listen(8) once per call: "Standard input and
output are the protocol connection", and ``-n netdir`` names the call so
the peer's address can be found.  This is the same for inetd, xinetd and
a systemd ``Accept=yes`` socket: one process per connection, which ends
with the session.  Everything else is the daemon's: the same options
(``options.SmtpdOptions``), settings, factory, protocol, policy, store and
limits; ``--listen`` and ``--workers`` are refused, as there is nothing to
listen on.

The connection:

* fd 0 a stream socket (inetd, xinetd, systemd ``StandardInput=socket``):
  it is adopted by the reactor (``adoptStreamConnection``) and used both
  ways.  That gives the same TCP transport as the daemon's, so STARTTLS
  works (``StandardIO`` cannot start TLS).
* anything else (pipes, a terminal): ``StandardIO`` on fds 0 and 1;
  STARTTLS is then not offered (``--smtps`` still works: TLS sits on top).

The peer's address, in order: ``-n`` (an ``ip!port`` or ``ip``, or a
directory with upas's ``remote`` and ``local`` files), else getpeername on
fd 0 when it is an IP socket, else unknown (``UNKNOWN_PEER``, untrusted:
no ``ournets`` entry, ratify entry or grant can match a name that is not
an address).  ``-n`` wins, as in upas: whatever wrote it (tcpd, a proxy,
a test) knows better than the socket, which may be the proxy's.

Logs go to stderr, the daemon's lines in twistd's format (inetd and
systemd hand stderr to syslog or the journal).  When stderr is the
connection itself (inetd and xinetd give the socket as fds 0, 1 and 2),
they go to syslog (facility mail) instead, and fd 2 is pointed at
/dev/null so nothing can reach the client that is not protocol.

The process exits once the connection is gone and no reply is pending:
a message whose end the client has sent is stored (fsynced) first, even
when the client hung up without waiting for its ``250``.  There is no
queue runner here: relayed mail waits in ``<root>/queue/`` for the daemon
or ``upas-runq``.
"""

import ipaddress
import os
import signal
import socket
import sys
from dataclasses import dataclass, replace

import syslog

from twisted.internet import defer, stdio
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.logger import (FileLogObserver, FilteringLogObserver, LegacyLogObserverWrapper,
                            Logger, globalLogBeginner)
from twisted.protocols import policies
from twisted.python import usage
from twisted.python.syslog import SyslogObserver
from zope.interface import implementer

from .. import conf, logs, relay
from .options import SmtpdOptions, open_decision_log
from ..runq.queue import record_routing, recorded_routing, routing_of
from ..service import connectionFactory, makeResolver, makeSmtpdFactory, makeStateStore

log = Logger(namespace="smtpd")

EX_OK, EX_USAGE = 0, 64
PROG = "upas-smtpd"

# Placeholders when nothing names an address.  Neither is an IP address, so
# no network (ournets, the ratify list, grants, -k) can hold them and no DNS
# question is asked about them; they read sensibly in ``Received: from
# him ([unknown])``.  They differ, so a HELO with our own name from an
# unknown peer is still a lie (``helo.claims_to_be_us`` lets rsys == lsys by).
UNKNOWN_PEER = "unknown"
UNKNOWN_LOCAL = "stdio"


@implementer(IAddress)
@dataclass(frozen=True)
class UnknownAddress:
    """An end of the connection nobody could name."""

    host: str
    port: int = 0


class NetdirError(ValueError):
    """A ``-n`` that names no address: a usage error before any byte is sent."""


def ip_address(text, where):
    """Twisted's address for ``ip!port`` or ``ip`` (v4-mapped IPv6 as IPv4)."""
    host, sep, port = text.strip().partition("!")
    host = host.strip("[]")
    try:
        ip = relay.normalize_ip(str(ipaddress.ip_address(host)))
    except ValueError:
        raise NetdirError("%s: %r is not an IP address" % (where, host)) from None
    if sep and not (port.isdigit() and int(port) < 65536):
        raise NetdirError("%s: %r is not a port number" % (where, port))
    cls = IPv6Address if ":" in ip else IPv4Address
    return cls("TCP", ip, int(port) if sep else 0)


def _read_address(path):
    try:
        with open(path) as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise NetdirError("-n: cannot read %s: %s" % (path, getattr(e, "strerror", None) or e))
    return ip_address(line, path)


def parse_netdir(arg):
    """(remote, local or None) from ``-n``: a directory holding upas's
    ``remote`` (required) and ``local`` files, or ``ip!port``/``ip``."""
    if os.path.isdir(arg):
        local = os.path.join(arg, "local")
        return (_read_address(os.path.join(arg, "remote")),
                _read_address(local) if os.path.lexists(local) else None)
    if "/" in arg:  # meant as a directory
        raise NetdirError("-n %s: no such directory" % arg)
    return ip_address(arg, "-n %s" % arg), None


def stdin_socket(fd=0):
    """fd 0 as a stream socket (a duplicate), or None for a pipe or a file."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def socket_addresses(sock):
    """(peer, our address) of an IP socket; None for what is not an IP socket."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None, None

    def address(name):
        try:
            host, port = name()[:2]
            return ip_address("%s!%d" % (host, port), "fd 0")
        except (OSError, NetdirError):
            return None

    return address(sock.getpeername), address(sock.getsockname)


def connection_addresses(netdir, sock):
    """The (peer, our) addresses the session sees: ``-n``, else the socket,
    else the placeholders.  The second item says where the peer came from."""
    remote = local = None
    source = "-n"
    if netdir is not None:
        remote, local = parse_netdir(netdir)
    peer, ours = socket_addresses(sock)
    if remote is None:
        remote, source = peer, "socket"
    if remote is None:
        remote, source = UnknownAddress(UNKNOWN_PEER), None
    return remote, local or ours or UnknownAddress(UNKNOWN_LOCAL), source


@implementer(IHandshakeListener)
class NamedConnection(policies.ProtocolWrapper):
    """The connection as the session sees it: the addresses it was given,
    whatever the transport says; ``ended`` fires when it is gone."""

    def __init__(self, factory, wrappedProtocol):
        policies.ProtocolWrapper.__init__(self, factory, wrappedProtocol)
        self.ended = defer.Deferred()

    def getPeer(self):
        return self.factory.remote

    def getHost(self):
        return self.factory.local

    def abortConnection(self):
        # StandardIO cannot abort; a refused peer (-k) has nothing to flush
        getattr(self.transport, "abortConnection", self.transport.loseConnection)()

    def handshakeCompleted(self):  # STARTTLS on the adopted socket
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason):
        policies.ProtocolWrapper.connectionLost(self, reason)
        self.ended.callback(None)


class NamedConnectionFactory(policies.WrappingFactory):
    protocol = NamedConnection

    def __init__(self, wrappedFactory, remote, local):
        policies.WrappingFactory.__init__(self, wrappedFactory)
        self.remote, self.local = remote, local
        self.connection = None

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(self.remote)
        self.connection = self.protocol(self, inner)
        return self.connection


def stderr_is_connection():
    """Is fd 2 the connection on fd 0 (inetd, xinetd), or closed?"""
    try:
        err, conn = os.fstat(2), os.fstat(0)
    except OSError:
        return True
    return (err.st_dev, err.st_ino) == (conn.st_dev, conn.st_ino)


class Output:
    """Where this process's lines go: stderr, or syslog when stderr is the
    connection (and fd 2 then /dev/null, so no stray write reaches the client)."""

    def __init__(self, to_syslog):
        self.to_syslog = to_syslog
        if to_syslog:
            syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_MAIL)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)

    def say(self, line):
        """One line before logging has begun (usage and start-up errors)."""
        if self.to_syslog:
            syslog.syslog(syslog.LOG_ERR, line)
        else:
            print(line, file=sys.stderr, flush=True)

    def observers(self, json_path=None):
        """The daemon's log as its ``LogService`` makes it: no debug events
        (one per fsync batch), journald's plain lines when stderr is the
        journal (systemd's StandardError=journal), ``--log-json`` too."""
        if self.to_syslog:
            observer = LegacyLogObserverWrapper(
                SyslogObserver(PROG, facility=syslog.LOG_MAIL).emit)
        elif logs.under_journald(sys.stderr):
            observer = FileLogObserver(sys.stderr, logs.journal_line)
        else:  # twistd's text lines, made as the daemon makes them
            observer = FileLogObserver(sys.stderr, logs.ClassicText())
        observers = [observer]
        if json_path is not None:  # one line per event, so sessions may share a file
            out = sys.stderr if json_path == "-" else open(json_path, "a", encoding="utf-8")
            observers.append(FileLogObserver(out, logs.json_line))
        return [FilteringLogObserver(logs.info_and_up(o), [logs.DNSNoise()])
                for o in observers]


def options_class():
    class StdioOptions(SmtpdOptions):
        synopsis = SmtpdOptions.synopsis.replace(" [--listen ENDPOINT]", "")

        def opt_listen(self, value):
            raise usage.UsageError("--listen: in stdio mode the connection is stdin/stdout; "
                                   "use twistd upas-smtpd to listen")

        def opt_workers(self, value):
            raise usage.UsageError("--workers: stdio mode serves one connection "
                                   "in one process")

        def opt_metrics(self, value):
            raise usage.UsageError("--metrics: a stdio session lives for one connection; "
                                   "scrape twistd upas-smtpd, or count its log lines")

    return StdioOptions


def check_config(argv):
    """``upas-smtpd --check-config ...``: the checker's own main (imported
    only then: a session need not load it)."""
    from . import checkconfig
    return checkconfig.main(argv, sys.stdout, sys.stderr)


def main(argv=None, reactor=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check-config" in argv:
        return check_config(argv)
    out = Output(stderr_is_connection())
    options = options_class()()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        out.say("%s: %s" % (PROG, e))
        return EX_USAGE
    except SystemExit as e:  # a file the server cannot work without, in one line
        if isinstance(e.code, str):
            out.say(e.code)
            return 1
        raise
    sock = stdin_socket()
    if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        # inetd's "wait", systemd's Accept=no: a port to accept on, not a call
        out.say("%s: standard input is a listening socket, not a connection; run one "
                "session per connection (inetd nowait, systemd Accept=yes), or use "
                "twistd upas-smtpd --listen systemd:..." % PROG)
        return EX_USAGE
    try:
        remote, local, source = connection_addresses(options["netdir"], sock)
    except NetdirError as e:
        out.say("%s: %s" % (PROG, e))
        return EX_USAGE
    if reactor is None:
        from twisted.internet import reactor
    try:
        observers = out.observers(options["log-json"])
    except OSError as e:
        out.say("%s: --log-json %s: %s" % (PROG, options["log-json"], e.strerror or e))
        return 1
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    return serve(options, reactor, sock, remote, local, source, out)


def serve(options, reactor, sock, remote, local, source, out):
    s = options["settings"]
    if options["node"]:
        # every session's process has the same command line: a node of its
        # own needs a name of its own, or one session's renewal and end
        # would overwrite and delete the others' connection counts
        s = replace(s, node="%s-%d" % (options["node"], os.getpid()))
    try:
        # tidy=False: the other sessions' processes share tmp/ and the mailboxes
        # --state redis://: this session's process is a node of its own
        store, shared = makeStateStore(s, reactor)
        factory = makeSmtpdFactory(s, reactor, tidy=False, store=store,
                                   resolver=makeResolver(reactor, options.get("resolverAddress")))
    except OSError as e:
        out.say("%s: mail root %s: %s" % (PROG, s.root, e.strerror or e))
        return 1
    except conf.ConfigError as e:
        out.say("%s: %s" % (PROG, e))
        return 1
    try:
        open_decision_log(factory, options, reactor)
    except SystemExit as e:
        out.say(e.code)
        return 1
    # upas-runq routes what we queue as we would: record it, once it changes
    if s.mailer is None and recorded_routing(factory.root.root) != routing_of(s):
        record_routing(factory.root.root, s)
    if source is None:
        log.info("peer address unknown (standard input is not an IP socket, and no -n): "
                 "{peer}, untrusted", peer=UNKNOWN_PEER)
    if shared is not None:
        shared.startService()  # the session's questions wait for its connection
    wrapper = NamedConnectionFactory(connectionFactory(factory, s, reactor), remote, local)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the next session reads the files anew
    if sock is not None:
        family = sock.family
        sock.close()
        reactor.adoptStreamConnection(0, family, wrapper)
        # the reactor holds its own copy: once it closes it, the client must
        # see the end, so no other descriptor may keep the socket open
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os.close(devnull)
    else:
        stdio.StandardIO(wrapper.buildProtocol(remote), 0, 1, reactor=reactor)
    sessions = list(factory.connections)

    def finish():
        """Every way out (the session's end, SIGTERM from systemd) passes
        here: as in the daemon, a message in DATA may finish within the
        grace period, and one whose end has been read is stored (fsynced)
        even when the connection is already gone."""
        d = factory.shutdown(s.shutdown_grace)
        d.addCallback(lambda _: defer.gatherResults([p.whenQuiet() for p in sessions]))
        if shared is not None:  # its connection released first
            d.addBoth(lambda _: shared.stopService())
        return d

    reactor.addSystemEventTrigger("before", "shutdown", finish)

    def stop(_):
        try:
            reactor.stop()
        except ReactorNotRunning:  # already stopping (SIGTERM)
            pass

    wrapper.connection.ended.addCallback(lambda _: reactor.callWhenRunning(stop, None))
    reactor.run()
    return EX_OK


def run():
    """The console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
