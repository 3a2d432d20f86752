"""The optional validator hooks in ``<lib>`` (upas /mail/lib), spam.c.

Spec upas-behaviour.md §1.9 (items 45-47) and §1.10.1:

``validateaddress``  executable; run as ``validateaddress <rcpt>`` at RCPT.
                     Non-zero exit: ``550 5.1.1 <rcpt> ... user unknown``.
``names.blocked``    lines whose first token (ends at a blank or ``#``) is
                     a recipient path refused like an unknown user; any case.
``senders``          lines ``<rcpt> <ip-or-name>``: mail to that recipient
                     (bang path, exact case) must come from one of the
                     listed IPs, or from an A/AAAA record of a listed name;
                     else ``550 5.7.1 <rcpt> ... sending system not allowed``.
``validatesender``   executable; run at DATA for untrusted peers as
                     ``validatesender -n /net <domain> <user> <rsys> <him>``.
                     Exit 0 passes; otherwise the last line of its stderr
                     (or stdout) is the status: ``rejected: ...`` gives
                     ``554 5.7.1 <status>``, anything else ``450 4.7.0 <status>``.

The files are re-read when they change.  Programs run under
``process.run`` with a timeout: a hung or unstartable validator gives a
temporary (4xx) refusal, never a hung session.
"""

import ipaddress
import os
import re

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..rules import dnscheck
from ..mailroot import process
from .. import replies
from ..address import NULL_SENDER
from ..decision import ACCEPT, reject
from ..conf import WatchedFile
from ..interfaces import IReloadable

log = Logger(namespace="smtpd")

_RC_PREFIX = re.compile(r"^validatesender(?: \d+)?: ")


def parse_names_blocked(text, filename="names.blocked"):
    names = set()
    for raw in text.splitlines():
        token = re.split(r"[ \t#]", raw.lstrip(" \t"), 1)[0]
        if token:
            names.add(token.lower())
    return frozenset(names)


def parse_senders(text, filename="senders"):
    table = {}
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        tokens = raw.split()
        if len(tokens) == 2:
            table.setdefault(tokens[0], []).append(tokens[1])
    return table


def _ip_equal(a, b):
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def sender_status(outcome):
    """The verdict for validatesender's outcome (pure)."""
    if outcome.ok:
        return ACCEPT
    if not outcome.started:
        text = replies.VALIDATESENDER_NOT_STARTED
    elif outcome.timed_out:
        text = replies.VALIDATESENDER_TIMED_OUT
    else:
        text = _RC_PREFIX.sub("", outcome.status())
    if text.startswith("rejected:"):
        return reject(554, replies.REFUSED.format(text=text), reason="sender-check")
    return reject(450, replies.SENDER_DEFERRED.format(text=text), reason="sender-check")


@implementer(IReloadable)
class Validators:
    def __init__(self, lib, reactor, clock, resolver, timeout=60.0):
        self.lib = lib
        self.reactor = reactor
        self.clock = clock
        self.resolver = resolver
        self.timeout = timeout
        self.validateaddress_path = os.path.join(lib, "validateaddress")
        self.validatesender = os.path.join(lib, "validatesender")
        self._names_blocked = WatchedFile(os.path.join(lib, "names.blocked"),
                                          parse_names_blocked, frozenset())
        self._senders = WatchedFile(os.path.join(lib, "senders"), parse_senders, {})

    def reread(self):
        self._names_blocked.reread()
        self._senders.reread()

    def _program(self, path):
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None

    def validateaddress(self, rcpt, log=log):
        """Run validateaddress for ``rcpt``: "ok", "unknown", "tempfail" (it
        hung or could not start), or at once "absent" (no executable program).

        ``log`` is the session's logger (logs.SessionLogger).
        """
        program = self._program(self.validateaddress_path)
        if not program:
            return "absent"
        return self._validateaddress(program, rcpt, log)

    @defer.inlineCallbacks
    def _validateaddress(self, program, rcpt, log):
        outcome = yield process.run(self.reactor, self.clock, [program, rcpt], self.timeout)
        if not outcome.started or outcome.timed_out:
            log.warn("validateaddress {rcpt}: {err}", rcpt=rcpt, event="smtpd.validate",
                     why="validateaddress",
                     err="timed out" if outcome.timed_out else "cannot start")
            return "tempfail"
        return "ok" if outcome.ok else "unknown"

    def names_blocked(self):
        """The recipient paths names.blocked refuses, lowercased."""
        return self._names_blocked.current()

    def senders(self, rcpt, rsys):
        """The ``senders`` file: may ``rsys`` send to ``rcpt``?  "ok",
        "refused", or "tempfail" (a listed name's lookup failed)."""
        allowed = self._senders.current().get(rcpt)
        if not allowed:
            return "ok"
        return self._sender_allowed(allowed, rsys)

    @defer.inlineCallbacks
    def _sender_allowed(self, allowed, rsys):
        tempfail = False
        for value in allowed:
            if _ip_equal(value, rsys):
                return "ok"
            try:
                ipaddress.ip_address(value)
                continue
            except ValueError:
                pass
            status, ips = yield dnscheck.addresses(self.resolver, value, self.clock)
            if any(_ip_equal(ip, rsys) for ip in ips):
                return "ok"
            tempfail = tempfail or status == dnscheck.TEMPFAIL
        return "tempfail" if tempfail else "refused"

    def sendermxcheck(self, sender, him, rsys):
        """validatesender for the first MAIL sender (untrusted peers): its
        decision, at once when there is no program to run."""
        program = self._program(self.validatesender)
        if program is None:
            return ACCEPT
        return self._sendermxcheck(program, sender, him, rsys)

    @defer.inlineCallbacks
    def _sendermxcheck(self, program, sender, him, rsys):
        who = "%s!postmaster" % him if sender == NULL_SENDER else sender
        if "!" not in who:
            return reject(554, replies.REFUSED.format(
                text=replies.DOMAINLESS_SENDER.format(who=who)), reason="sender-check")
        domain, user = who.split("!", 1)
        if any(c in s for s in (domain, user, him) for c in "\r\n"):
            return reject(554, replies.REFUSED.format(text=replies.EVIL_SENDER),
                          reason="sender-check")
        argv = [program, "-n", "/net", domain, user, rsys, him]
        outcome = yield process.run(self.reactor, self.clock, argv, self.timeout)
        return sender_status(outcome)
