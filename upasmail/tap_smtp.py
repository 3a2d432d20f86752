"""``upas-smtp`` and ``twistd -n upas-smtp``: send one message from stdin.

usage: upas-smtp [-aAdfipst] [-b host] [-g gateway] [-h host] [-u user]
                 [.domain] destaddr sender rcpt-list

The command line is parsed here already; the sending itself comes with the
client issue, and until then both entry points say so and exit with the
usage status rather than pretend to have sent anything.
"""

import sys

from twisted.python import usage

USAGE = ("usage: upas-smtp [-aAdfipst] [-b busted-mx] [-g gw] [-h host] [-u user] "
         "[.domain] destaddr sender rcpt-list")
EX_USAGE = 64


class Options(usage.Options):
    synopsis = "[-aAdfipst] [-b host] [-g gateway] [-h host] [-u user] [.domain] destaddr sender rcpt-list"
    optFlags = [
        ["auth", "a", "authenticate to the server (PLAIN over TLS)"],
        ["auth-any", "A", "authenticate with any offered mechanism"],
        ["debug", "d", "debugging to standard error"],
        ["filter", "f", "write the converted message to stdout instead of sending"],
        ["insecure", "i", "allow AUTH without TLS"],
        ["ping", "p", "ping: MAIL and RCPT only, no DATA"],
        ["starttls", "s", "use STARTTLS when the server offers it"],
        ["tls", "t", "implicit TLS"],
    ]
    optParameters = [
        ["busted-mx", "b", None, "skip this MX host"],
        ["gateway", "g", None, "gateway when there is no MX or address"],
        ["host", "h", None, "our system name"],
        ["user", "u", None, "user name for AUTH"],
        ["resolver", None, None, "DNS server HOST:PORT"],
        ["sysname", None, None, "our host name"],
    ]

    def parseArgs(self, *args):
        args = list(args)
        self["domain"] = args.pop(0) if args and args[0].startswith(".") else None
        if len(args) < 2:
            raise usage.UsageError("need destaddr and sender")
        self["destaddr"], self["sender"], self["rcpts"] = args[0], args[1], args[2:]


def makeService(options):
    raise SystemExit("upas-smtp: sending is not yet supported by this release")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print("upas-smtp: %s\n%s" % (e, USAGE), file=sys.stderr)
        return EX_USAGE
    print("upas-smtp: sending is not yet supported by this release", file=sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
