"""``upas-mailq`` and ``upas-runq``: look at the outbound queue, run it once.

``upas-mailq [--root DIR]`` lists the queue like ``mailq``;
``--flush`` asks the running server to retry everything now;
``--delete ID`` removes one message (``ID`` must be a queue id).

``upas-runq [options]`` makes one pass over the queue without a server
(upas runq): every message that is due (every message with ``--flush``)
is tried once, then it exits.  It takes the server's queue options; what
it is not told (smarthost and its AUTH, domain, host name, ourdomains,
mx port) it takes from the routing the server recorded in
``<root>/routing.json``, and it warns when a flag it is given differs
from that record, so it cannot route differently by accident.  Two runners
never deliver the same message at once (each holds a lock on the message
it is sending).

Both log to stderr, and also to ``--logfile FILE`` when given.
"""

import dataclasses
import os
import sys

from twisted.internet import defer, task
from twisted.logger import FilteringLogObserver, Logger, globalLogPublisher, textFileLogObserver
from twisted.python import usage

from .. import conf as smtpdconf
from ..smtp import mxdial
from ..runq import queue
from .. import settings
from ..logs import DNSNoise
from ..runq.mailq import delete, listing
from .options import QUEUE_FLAGS, QUEUE_PARAMETERS, parse_hostport, queue_settings
from ..mailroot.store import MailRoot

log = Logger(namespace="queue")
EX_CANTCREAT = 73

# the routing keys and the flags that set them, for warnings
ROUTING_FLAGS = {"sysname": "--sysname", "domain": "--domain",
                 "ourdomains": "ourdomains (--conf)", "smarthost": "--smarthost",
                 "smarthost_user": "--smarthost-user", "relay_auth_file": "--relay-auth-file",
                 "mx_port": "--mx-port"}

def start_logging(err, logfile=None):
    """Log events to ``err`` and, when given, appended to ``logfile``.

    Returns the function that stops it; OSError when ``logfile`` cannot be opened.
    """
    files = [open(logfile, "a")] if logfile else []
    quiet = DNSNoise()  # one predicate: it pairs each DNS port's opening with its closing
    observers = [FilteringLogObserver(textFileLogObserver(f), [quiet]) for f in [err] + files]
    for observer in observers:
        globalLogPublisher.addObserver(observer)

    def stop():
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
        for f in files:
            f.close()

    return stop


def _cannot_log(program, logfile, err, e):
    err.write("%s: %s: %s\n" % (program, logfile, e.strerror or e))
    return EX_CANTCREAT


LOGFILE = ["logfile", None, None, "also append the log to this file (it always goes to "
                                  "stderr)"]


class MailqOptions(usage.Options):
    synopsis = "[--root DIR] [--logfile FILE] [--flush | --delete ID]"
    optFlags = [["flush", None, "ask the running queue to retry every message now"]]
    optParameters = [["root", None, "mail", "mail root directory"],
                     ["delete", None, None, "remove this message from the queue"], LOGFILE]


def mailq(argv=None, out=None, err=None, now=None):
    out, err = out or sys.stdout, err or sys.stderr
    o = MailqOptions()
    try:
        o.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        err.write("upas-mailq: %s\n%s\n" % (e, o))
        return 64
    try:
        stop = start_logging(err, o["logfile"])
    except OSError as e:
        return _cannot_log("upas-mailq", o["logfile"], err, e)
    try:
        return _mailq(o, out, err, now)
    finally:
        stop()


def _mailq(o, out, err, now):
    q = queue.Queue(os.path.join(os.path.abspath(o["root"]), "queue"))
    if not os.path.isdir(q.dir):
        err.write("upas-mailq: no queue at %s\n" % q.dir)
        return 66
    if o["delete"]:
        try:
            if not delete(q, o["delete"]):
                err.write("upas-mailq: %s: no such message\n" % o["delete"])
                return 1
        except queue.BadQueueId as e:
            err.write("upas-mailq: %s\n" % e)
            return 64
        except OSError as e:
            err.write("upas-mailq: %s: %s\n" % (o["delete"], e.strerror or e))
            return 75
        out.write("%s: deleted\n" % o["delete"])
        return 0
    if o["flush"]:
        q.request_flush()
        out.write("flush requested: the running queue retries every message within "
                  "%d seconds\n" % queue.FLUSH_POLL)
        return 0
    out.write(listing(q, queue.now() if now is None else now))
    return 0


def mailq_main():
    sys.exit(mailq())


class RunqOptions(usage.Options):
    synopsis = "[--root DIR] [--conf smtpd.conf] [--flush] [--logfile FILE] [queue options]"
    optFlags = [["flush", None, "try every message now, not only those that are due"]] + \
        QUEUE_FLAGS
    optParameters = [
        ["root", None, "mail", "mail root directory"],
        ["conf", None, None, "upas smtpd.conf (defaultdomain, ourdomains, smarthost)"],
        ["sysname", None, None, "our host name (default: the server's, else the machine's)"],
        ["domain", "h", None, "our mail domain (bounces come from MAILER-DAEMON@it)"],
        ["resolver", None, None, "DNS server HOST:PORT (default: resolv.conf)"],
        LOGFILE,
    ] + [p[:2] + [None] + p[3:] if p[0] == "mx-port" else p for p in QUEUE_PARAMETERS]
    # --mx-port has no default here: unset, it comes from the server's record

    def postOptions(self):
        config = smtpdconf.SmtpdConf()
        if self["conf"]:
            try:
                config = smtpdconf.load(self["conf"])
            except smtpdconf.ConfigError as e:
                raise usage.UsageError(str(e))
        if self["resolver"]:
            self["resolverAddress"] = parse_hostport(self["resolver"])
        given = {key for key, told in (
            ("sysname", self["sysname"]), ("domain", self["domain"] or config.defaultdomain),
            ("ourdomains", config.ourdomains), ("smarthost", self["smarthost"] or
                                                config.smarthost),
            ("smarthost_user", self["smarthost-user"]),
            ("relay_auth_file", self["relay-auth-file"]),
            ("mx_port", self["mx-port"] is not None)) if told}
        root = os.path.abspath(self["root"])
        recorded = queue.recorded_routing(root)
        if self["mx-port"] is None:
            self["mx-port"] = (recorded or {}).get("mx_port") or 25
        own = settings.merge(config, sysname=self["sysname"], domain=self["domain"],
                             root=root, **queue_settings(self))
        self["recorded"] = recorded
        self["settings"], self["differ"] = own, []
        if recorded is not None:
            routing, self["differ"] = queue.reconcile(recorded, queue.routing_of(own), given)
            self["settings"] = dataclasses.replace(
                settings.merge(config, sysname=routing["sysname"], domain=routing["domain"],
                               root=root, **dict(queue_settings(self),
                                                 smarthost=routing["smarthost"],
                                                 relay_user=routing["smarthost_user"],
                                                 relay_auth_file=routing["relay_auth_file"])),
                ourdomains=tuple(routing["ourdomains"]))


@defer.inlineCallbacks
def runq(reactor, argv, err=None, resolver=None, clock=None, deliver=None):
    """One pass over the queue; fires with the exit status."""
    err = err or sys.stderr
    o = RunqOptions()
    try:
        o.parseOptions(argv)
    except usage.UsageError as e:
        err.write("upas-runq: %s\n" % e)
        return 64
    s = o["settings"]
    from ..service import makeResolver, threadRunner
    root = MailRoot(s.root, threadRunner(reactor), clock or reactor, s.dom, s.path("lib"),
                    s.ours)
    if not os.path.isdir(root.queue):
        err.write("upas-runq: no queue at %s\n" % root.queue)
        return 66
    try:
        stop = start_logging(err, o["logfile"])
    except OSError as e:
        return _cannot_log("upas-runq", o["logfile"], err, e)
    try:
        _warn_routing(o, root.root)
        root.make_directories()  # returns are spooled in tmp/ and may go to box/
        resolver = resolver or makeResolver(reactor, o.get("resolverAddress"))
        runner = queue.QueueRunner(root, s, reactor, resolver, clock, deliver=deliver,
                                   ours=mxdial.local_addresses, once=True,
                                   flush=o["flush"])
        runner.startService()
        yield runner.done
        yield runner.stopService()
    finally:
        stop()
    return 0


def _warn_routing(o, mail_root):
    where = os.path.join(mail_root, queue.ROUTING)
    if o["recorded"] is None:
        log.warn("no routing recorded by a server in {where} (or not readable): routing "
                 "with upas-runq's own options only", where=where, event="queue.routing")
    own = queue.routing_of(o["settings"])
    for key in o["differ"]:
        log.warn("{flag} {value!r} differs from the server's {recorded!r} ({where}); using "
                 "{value!r}", flag=ROUTING_FLAGS[key], value=own[key],
                 recorded=o["recorded"][key], where=where, event="queue.routing")


def runq_main():
    def start(reactor):
        return runq(reactor, sys.argv[1:]).addCallback(
            lambda code: _exit(code) if code else None)

    task.react(start)


def _exit(code):
    raise SystemExit(code)
