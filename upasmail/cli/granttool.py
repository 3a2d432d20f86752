"""``upas-grant``: trust a client address for a while (POP/IMAP-before-SMTP).

    upas-grant [--state URL] [--root DIR] [--trusted-dir DIR] [--duration SECS] IP

A POP or IMAP server outside upasmail runs it after a login.  With the
local state (the default) it writes the grant as those servers always
have: a file named after the address in the trusted directory
(``<root>/lib/trusted.d``), dated so that it lasts ``--duration`` seconds
(at most the 2 hours such files last).  With ``--state redis://...`` the
grant goes to Redis (``upas:grant:IP``), where every node sees it, for
any duration.  Why a command rather than an importer that watches the
directory: the POP/IMAP server already runs a program per login, the
grant reaches every node at once, and nothing more has to run.

Exit status: 0 granted, 1 the grant could not be written, 64 a usage error.
"""

import os
import sys

from twisted.internet import defer, task
from twisted.python import usage

from .. import conf as smtpdconf
from .. import settings as upassettings
from ..interfaces import StateUnavailable
from ..rules.ratify import GRANT_LIFETIME, TrustedGrants
from ..smtpd import redisstate
from .options import named_coercions

EX_USAGE = 64


class GrantOptions(usage.Options):
    synopsis = "[--state URL] [--root DIR] [--trusted-dir DIR] [--duration SECS] IP"
    optParameters = named_coercions([
        ["state", None, "local", "local (a file in the trusted directory) or "
                                 "redis://HOST:PORT/DB"],
        ["root", None, "mail", "mail root directory"],
        ["trusted-dir", None, None, "the trusted directory (default: <root>/lib/trusted.d)"],
        ["duration", None, GRANT_LIFETIME, "seconds the grant lasts", float],
    ])

    def parseArgs(self, ip):
        self["ip"] = ip

    def postOptions(self):
        if self["duration"] <= 0:
            raise usage.UsageError("--duration must be positive")
        if self["state"] != "local":
            try:
                redisstate.parse_url(self["state"])
            except ValueError as e:
                raise usage.UsageError("--state: %s" % e)


def grant(options, reactor):
    """A Deferred that fires once the grant is written."""
    s = upassettings.merge(smtpdconf.SmtpdConf(), sysname="upas-grant",
                           root=os.path.abspath(options["root"]),
                           trusted_dir=options["trusted-dir"] and os.path.abspath(
                               options["trusted-dir"]))
    if options["state"] == "local":
        return defer.maybeDeferred(TrustedGrants(s.path("trusted_dir"), reactor).grant,
                                   options["ip"], options["duration"])
    store = redisstate.RedisStateStore(options["state"], s, reactor, reactor)
    d = store.connect()
    d.addCallback(lambda _: store.grant(options["ip"], options["duration"]))
    return d.addBoth(lambda result: store.disconnect().addCallback(lambda _: result))


def main(argv=None, err=None):
    err = err or sys.stderr
    options = GrantOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print("upas-grant: %s\nusage: upas-grant %s" % (e, GrantOptions.synopsis), file=err)
        return EX_USAGE
    failed = []

    def run(reactor):
        def said(failure):
            failure.trap(StateUnavailable, ValueError, OSError)
            e = failure.value
            failed.append("upas-grant: %s: %s" % (options["ip"], getattr(e, "strerror", None)
                                                  and "%s: %s" % (e.filename, e.strerror) or e))
        return grant(options, reactor).addErrback(said)

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            return e.code
    if failed:
        print(failed[0], file=err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
