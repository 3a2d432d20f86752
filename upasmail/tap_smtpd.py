"""``twistd upas-smtpd``: options and service wiring.

Every flag of upas smtpd (seed smtp.8 and spec §1.2) is accepted, with a
long name.  Flags whose behaviour a later release brings are refused at
start-up with a clear "not yet supported" message instead of being
silently ignored.
"""

import os
import sys

from twisted.python import usage

from . import conf as smtpdconf
from . import service, settings
from .mailer import resolve as resolve_mailer

NOT_YET = {
    "debug": "-d (protocol trace)",
    "verify-sender-domain": "-r (sender DNS check)",
    "save-blocked": "-s (save blocked messages)",
    "greylist": "-g (greylisting)",
    "relax-helo": "-e (relaxed HELO checks)",
    "helo-lie-auth": "-E (HELO lie requires AUTH)",
    "delay": "-D (tarpit delay)",
    "require-auth": "-a (require AUTH)",
    "clear-passwords": "-p (plaintext AUTH)",
}


class Options(usage.Options):
    synopsis = ("[-dDeEafgpqrs] [-c cert] [-h mydom] [-k ip] [-m mailer] [-n netdir] "
                "[--conf smtpd.conf] [--listen ENDPOINT] [--root DIR]")
    longdesc = ("Plan 9 upas smtpd: an ESMTP server with upas's relay rules. "
                "Mail for local users goes to <root>/box/<user>/mbox, relayed mail "
                "to <root>/queue/, or everything to the -m mailer.")

    optFlags = [
        ["debug", "d", "protocol trace of every connection (not yet supported)"],
        ["verify-sender-domain", "r", "check the sender's domain in DNS (not yet supported)"],
        ["norelay", "f", "refuse relaying for untrusted peers (the default here; "
                         "also overrides 'norelay off' in smtpd.conf)"],
        ["save-blocked", "s", "save blocked messages under <root>/queue.dump (not yet supported)"],
        ["greylist", "g", "greylist untrusted peers (not yet supported)"],
        ["relax-helo", "e", "relaxed HELO checks (not yet supported)"],
        ["helo-lie-auth", "E", "a HELO lie requires AUTH instead of a hang-up (not yet supported)"],
        ["delay", "D", "tarpit delay before HELO replies (not yet supported)"],
        ["require-auth", "a", "require AUTH before MAIL (not yet supported)"],
        ["clear-passwords", "p", "allow PLAIN/LOGIN without TLS (not yet supported)"],
        ["quiet", "q", "log HELO only after it passes"],
    ]
    optParameters = [
        ["domain", "h", None, "our mail domain (greeting, HELO replies)"],
        ["netdir", "n", None, "upas network directory; accepted and ignored: the peer "
                              "address comes from the connection"],
        ["cert", "c", None, "TLS certificate (not yet supported)"],
        ["mailer", "m", None, "deliver by running MAILER -r rcpt... instead of the mail root"],
        ["conf", None, None, "upas smtpd.conf file (default: built-in defaults)"],
        ["listen", None, service.DEFAULT_LISTEN, "Twisted server endpoint to listen on"],
        ["root", None, "mail", "mail root directory"],
        ["sysname", None, None, "our host name (upas $site); default: the machine's"],
        ["resolver", None, None, "DNS server HOST:PORT for every lookup (default: resolv.conf)"],
        ["mailer-timeout", None, 600.0, "seconds a -m mailer may run", float],
        ["idle-timeout", None, 300.0, "seconds a client may stay silent", float],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["evil"] = []

    def opt_k(self, value):
        """banned peer IP or CIDR; may be repeated (not yet supported)"""
        try:
            self["evil"].append(smtpdconf.parse_network(value))
        except ValueError as e:
            raise usage.UsageError("-k: %s" % e)

    opt_evil = opt_k

    def postOptions(self):
        wanted = [NOT_YET[k] for k in NOT_YET if self[k]]
        if self["evil"]:
            wanted.append("-k (banned peers)")
        if self["cert"]:
            wanted.append("-c (STARTTLS)")
        config = smtpdconf.SmtpdConf()
        if self["conf"]:
            try:
                config = smtpdconf.load(self["conf"])
            except smtpdconf.ConfigError as e:
                raise SystemExit("upas-smtpd: %s" % e)
        if config.verifysenderdom:
            wanted.append("smtpd.conf verifysenderdom on")
        if config.saveblockedmsg:
            wanted.append("smtpd.conf saveblockedmsg on")
        if wanted:
            raise SystemExit("upas-smtpd: not yet supported: " + ", ".join(wanted))
        if self["resolver"]:
            self["resolverAddress"] = parse_hostport(self["resolver"])
        if self["mailer"] and resolve_mailer(self["mailer"]) is None:
            raise SystemExit("upas-smtpd: -m %s: no such executable" % self["mailer"])
        if self["idle-timeout"] <= 0 or self["mailer-timeout"] <= 0:
            raise usage.UsageError("timeouts must be positive")
        self["settings"] = settings.merge(
            config,
            sysname=self["sysname"],
            domain=self["domain"],
            norelay_flag=self["norelay"],
            root=os.path.abspath(self["root"]),
            mailer=self["mailer"],
            mailer_timeout=self["mailer-timeout"],
            idle_timeout=self["idle-timeout"],
            quiet=self["quiet"],
        )


def parse_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError("--resolver wants HOST:PORT, not %r" % text)
    return host.strip("[]"), int(port)


def makeService(options):
    s = options["settings"]
    if options["netdir"]:
        print("upas-smtpd: -n %s ignored: the peer address comes from the connection"
              % options["netdir"], file=sys.stderr)
    try:
        return service.makeSmtpdService(s, options["listen"])
    except OSError as e:
        raise SystemExit("upas-smtpd: mail root %s: %s" % (s.root, e.strerror or e))

