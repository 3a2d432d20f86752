"""``twistd upas-smtpd``: the service wiring for the options.

Every flag of upas smtpd (seed smtp.8 and spec §1.2) is accepted, with a
long name (``options.SmtpdOptions``, re-exported here as ``Options``, the
name twistd looks for).  Files the server cannot work without (smtpd.conf,
the ratify list, the aliases and users files, the certificate, the
password file when AUTH is required or the file is named) are read once at
start-up: a problem stops ``twistd`` with ``upas-smtpd: FILE:LINE:
reason`` instead of surfacing in a session.
Every other start-up error (a bad option value, an endpoint that does not
parse, a port in use or refused, a mail root we cannot use) is one line
too, naming the option or address, and exit status 1: no traceback and no
page of usage text.
"""

import signal
import sys

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .. import conf as smtpdconf
from .. import logs, privileges, service, workers
from .options import (SmtpdOptions, check_endpoint, failure_reason, metrics_endpoint,
                      open_decision_log, reload_service, reloaded_settings)

log = Logger(namespace="smtpd")
# twistd's ServiceMaker takes this module's Options; the rest were defined
# here before upasmail.options held them
Options = SmtpdOptions
__all__ = ["Options", "StartupError", "TwistdService", "makeService", "check_endpoint",
           "failure_reason", "open_decision_log", "reload_service", "reloaded_settings"]


def listen_error_text(e):
    """``cannot listen on 127.0.0.1:25: permission denied`` for a CannotListenError."""
    where = e.port if e.interface is None else "%s:%s" % (e.interface or "*", e.port)
    why = getattr(e.socketError, "strerror", None) or str(e.socketError)
    return "cannot listen on %s: %s" % (where, why[:1].lower() + why[1:])


class StartupError(SystemExit, Exception):
    """A start-up failure once twistd is under way.

    An Exception, so twistd removes its pid file and, without ``-n``, tells
    the waiting parent process (which otherwise waits forever); a
    SystemExit, so the process ends with its one line and status 1 instead
    of a traceback.
    """


class TwistdService(MultiService):
    """What twistd runs: Twisted's per-query DNS lines filtered out of the
    log (``logs.QuietDNS``), then the server.  A listener that cannot start
    ends twistd with one line and exit 1 instead of a traceback.

    With twistd ``--uid``/``--gid`` (``user``), what start-up created
    (``created``) is given to the run user as the last thing done before
    twistd switches.  Once switched (or not), ``needs`` is checked: a mail
    root or a file the run user cannot use ends start-up with one line.
    """

    def __init__(self, top, listen, user=None, created=(), needs=None, json_path=None):
        MultiService.__init__(self)
        self.top = top
        self.listen = listen
        self.user = user
        self.created = created
        self.needs = needs
        # first: QuietDNS then filters the observers it sets up too
        logs.LogService(json_path).setServiceParent(self)
        logs.QuietDNS().setServiceParent(self)
        top.setServiceParent(self)

    def privilegedStartService(self):
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as e:
            raise StartupError("upas-smtpd: %s" % listen_error_text(e))
        except logs.LogFileError as e:
            raise StartupError("upas-smtpd: %s" % e)
        except Exception as e:  # listening is all that starts here: OverflowError, a lock...
            raise StartupError("upas-smtpd: cannot listen on %s: %s"
                               % (self.listen, failure_reason(e)))
        if self.user is not None:
            try:
                privileges.hand_over(self.created, self.user)
            except OSError as e:
                raise StartupError("upas-smtpd: cannot give %s to %s: %s" % (
                    e.filename, self.user.describe(), failure_reason(e)))

    def startService(self):
        # also without a switch (systemd's User=): a mailbox left root's is said now
        user = self.user or privileges.RunUser(None, None)
        if self.needs is not None:
            problem = self.needs.problem(user)
            if problem:
                raise StartupError("upas-smtpd: %s" % problem)
            for line in self.needs.mailbox_problems(user):
                log.warn("{problem}", problem=line)
        MultiService.startService(self)


def serve_metrics(top, description, reactor):
    """The metrics service for the server ``top`` (its queue, its clock)."""
    from .. import metrics

    counts = metrics.Metrics()
    counts.registry.register(metrics.QueueGauges(top.factory.root.queue, reactor, top.queue))
    return metrics.MetricsService(counts, metrics_endpoint(description))


def makeService(options):
    s = options["settings"]
    if options["netdir"]:
        print("upas-smtpd: -n %s ignored: under twistd each connection's address comes "
              "from its socket; -n names the connection only in stdio mode (upas-smtpd)"
              % options["netdir"], file=sys.stderr)
    from twisted.internet import reactor

    soft, hard = service.raise_fd_limit()
    resolver = service.makeResolver(reactor, options.get("resolverAddress"))
    twistd_options = getattr(options, "parent", None)
    user = privileges.run_user(twistd_options)
    created = (privileges.not_yet_there(
        privileges.created_at_startup(s, twistd_options, options["log-json"])
        + [options["decision-log"]] * bool(options["decision-log"]))
        if user is not None else ())
    try:
        top = service.makeSmtpdService(s, options["listen"], reactor, resolver=resolver)
    except OSError as e:
        raise SystemExit("upas-smtpd: mail root %s: %s; running as %s" % (
            s.root, failure_reason(e), privileges.RunUser(None, None).describe()))
    except smtpdconf.ConfigError as e:  # a file changed since the options were read
        raise SystemExit("upas-smtpd: %s" % e)
    open_decision_log(top.factory, options, reactor)
    log.info("open files: {soft} (hard limit {hard}); at most {n} connections",
             soft=soft, hard=hard, n=top.factory.maxConnections, event="smtpd.limits")
    pool = None
    if options["workers"] > 1:
        pool = workers.WorkerPool(top, options["argv"], options["workers"] - 1, reactor)

    def reload():
        reload_service(top, options)
        if pool is not None:
            pool.reload()

    # twistd leaves SIGHUP alone; the handler only hands over to the reactor
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    twistd_service = TwistdService(top, options["listen"], user, created,
                                   privileges.needs(s, options["conf"], options["workers"],
                                                    options["listen"]),
                                   json_path=options["log-json"])
    if options["metrics"]:  # the main process only: it sees every worker's events
        serve_metrics(top, options["metrics"], reactor).setServiceParent(twistd_service)
    if pool is not None:
        pool.setServiceParent(twistd_service)  # after the listener: it hands on its socket
    return twistd_service

