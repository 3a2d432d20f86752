"""``upas-smtp`` and ``twistd -n upas-smtp``: send one message from stdin.

usage: upas-smtp [-aAdfipst] [-b busted-mx] [-g gateway] [-h host] [-u user]
                 [.domain] destaddr sender rcpt-list

The console script is the primary interface: its exit status is real
(0 delivered, 75 temporary failure, 69 permanent failure, 64 bad command
line), and the last line on stderr is upas's status string (``Retry,
Temporary Failure`` or ``Permanent Failure``) for a Plan 9 style runq.
``twistd -n --pidfile= upas-smtp ...`` runs the same thing as a one-shot
and exits with the same status (twistd itself would always exit 0).
"""

import os
import pwd
import sys
import tempfile

from twisted.application import service
from twisted.internet import defer, task
from twisted.python import usage

from ..smtp import client, factotum, mxdial, thumbprint
from .. import settings
from ..conf import ConfigError
from .options import parse_hostport

USAGE = ("usage: upas-smtp [-aAdfipst] [-b busted-mx] [-g gw] [-h host] [-u user] "
         "[.domain] destaddr sender rcpt-list")
MAX_BUSTED = 100
HOSTS = "/etc/hosts"


class Options(usage.Options):
    synopsis = ("[-aAdfipst] [-b busted-mx] [-g gateway] [-h host] [-u user] [.domain] "
                "destaddr sender rcpt-list")
    optFlags = [
        ["auth", "a", "authenticate (on an encrypted session, or with -i); implies -s"],
        ["avoidant", "A", "the server does not greet: send NOOP first"],
        ["debug", "d", "show the conversation on stderr (passwords removed)"],
        ["filter", "f", "write the converted message to stdout; no network"],
        ["insecure", "i", "with -a: authenticate even without TLS"],
        ["ping", "p", "check the recipients (MAIL, RCPT, QUIT): no DATA; 10 s time units"],
        ["starttls", "s", "use STARTTLS when the server offers it"],
        ["tls", "t", "TLS from the first byte (port 465 unless the destination names one)"],
        ["ipv6", None, "also dial the IPv6 addresses of mail servers"],
    ]
    optParameters = [
        ["gateway", "g", None, "dial this when the destination has no MX or address, "
                               "or none answers"],
        ["host", "h", None, "our system name for addresses (default: the sysname)"],
        ["user", "u", None, "user name for AUTH (default: the ~/.netrc entry's, "
                            "else the login name)"],
        ["resolver", None, None, "DNS server HOST:PORT (default: resolv.conf); "
                                 "/etc/hosts is read first either way"],
        ["sysname", None, None, "our host name, also the EHLO name (default: the machine's)"],
        ["auth-file", None, None, "file of 'server user password' lines, mode 0600 "
                                  "(then ~/.netrc)"],
        ["thumbprints", None, None, "pin TLS servers: only certificates listed here "
                                    "(lines 'x509 sha256=...') are accepted"],
        ["thumbprints-exclude", None, None, "certificates never accepted"],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["busted"] = []
        self.argv = []

    def parseOptions(self, options=None):
        # twistd's one-shot re-parses these in ``run``, as the console script does
        self.argv = list(sys.argv[1:] if options is None else options)
        usage.Options.parseOptions(self, options)

    def opt_b(self, host):
        """skip this MX host (repeatable)"""
        if len(self["busted"]) >= MAX_BUSTED:
            raise usage.UsageError("more than %d busted mxs given" % MAX_BUSTED)
        self["busted"].append(host)

    opt_busted_mx = opt_b

    def parseArgs(self, *args):
        args = list(args)
        self["domain"] = args.pop(0) if args and args[0].startswith(".") else None
        if len(args) < 2:
            raise usage.UsageError("need destaddr and sender")
        self["destaddr"], self["sender"], self["rcpts"] = args[0], args[1], args[2:]

    def postOptions(self):
        if self["resolver"]:
            self["resolverAddress"] = parse_hostport(self["resolver"])


def _full_name(user):
    try:
        name = pwd.getpwnam(user).pw_gecos.split(",")[0].strip()
    except (KeyError, OSError):
        return None
    return name or None


def client_options(o, stderr):
    """ClientOptions from the parsed command line; ConfigError for bad files."""
    ident = settings.identity(o["sysname"])  # the server's rule for our names
    sysname = ident.sysname
    domain = o["domain"]
    if domain is None:  # upas: the machine's FQDN from its first dot on
        domain = ident.dom[ident.dom.find("."):] if "." in ident.dom else ""
    pins = None
    if o["thumbprints"]:
        pins = thumbprint.Thumbprints.load(o["thumbprints"], o["thumbprints-exclude"])

    def credentials(server, user):
        return factotum.lookup(server, user, o["auth-file"])

    def debug(line):
        stderr.write(line + "\n")
        stderr.flush()

    return client.ClientOptions(
        sysname=sysname, host=o["host"], domain=domain, starttls=o["starttls"],
        implicit_tls=o["tls"], auth=o["auth"], auth_in_clear=o["insecure"],
        avoidant=o["avoidant"], ping=o["ping"], busted=tuple(o["busted"]),
        gateway=o["gateway"], user=o["user"], credentials=credentials, thumbprints=pins,
        ipv6=o["ipv6"], ours=mxdial.local_addresses(), debug=debug if o["debug"] else None,
        full_name=_full_name,
    )


def spool_stdin(stdin):
    """The message, kept in memory up to 1 MiB and on disk beyond."""
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
    while True:
        data = stdin.read(1 << 16)
        if not data:
            break
        spool.write(data)
    spool.seek(0)
    return spool


@defer.inlineCallbacks
def run(reactor, argv, stdin, stdout, stderr, resolver=None, clock=None, hosts=HOSTS):
    """The whole command; fires with the exit status.

    Names in ``hosts`` are found even with ``--resolver`` (upas asks ndb,
    its local database, before DNS).
    """
    o = Options()
    try:
        o.parseOptions(argv)
        opts = client_options(o, stderr)
    except (usage.UsageError, ConfigError) as e:
        stderr.write("upas-smtp: %s\n%s\n%s\n" % (e, USAGE, client.PERMANENT))
        return client.EX_USAGE
    illegal = client.address_errors(o["sender"], o["rcpts"],
                                    "ping" if o["ping"] else "delivery")
    if illegal:  # before anything is read or dialled, as for a [literal] destination
        return _end(stderr, client.Outcome.give_up(),
                    [client.dial_report(text, o["destaddr"]) for text in illegal.values()])
    try:
        message = spool_stdin(stdin)
    except OSError as e:
        return _end(stderr, client.Outcome.retry(),
                    ["upas-smtp: reading the message: %s" % e])
    if o["filter"]:
        client.filter_message(message, o["sender"], opts, stdout)
        stdout.flush()
        return client.EX_OK
    if resolver is None:
        from ..service import makeResolver
        resolver = makeResolver(reactor, o.get("resolverAddress"), hosts)
    result = yield client.deliver(message, o["destaddr"], o["sender"], o["rcpts"], opts,
                                  reactor, resolver, clock)
    return _end(stderr, result.outcome, result.report)


def _end(stderr, outcome, report):
    """upas's ending: the report, the status line (none when delivered),
    and the exit code of the outcome's kind."""
    for line in report:
        stderr.write(line + "\n")
    if outcome.status:
        stderr.write(outcome.status + "\n")
    stderr.flush()
    return outcome.exit_code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv

    def start(reactor):
        d = run(reactor, argv, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
        return d.addCallback(lambda code: _exit(code) if code else None)

    task.react(start)


def _exit(code):
    raise SystemExit(code)


class OneShot(service.Service):
    """``twistd -n upas-smtp``: send, stop the reactor, exit with the status."""

    def __init__(self, argv):
        self.argv = argv

    def startService(self):
        from twisted.internet import reactor

        service.Service.startService(self)

        def done(code):
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, code)
            reactor.stop()

        # twistd puts log files in place of sys.stdout/stderr; the message
        # and the report belong on the real ones
        d = run(reactor, self.argv, sys.stdin.buffer, sys.__stdout__.buffer, sys.__stderr__)
        d.addCallback(done)


def makeService(options):
    return OneShot(options.argv)


if __name__ == "__main__":
    main()
