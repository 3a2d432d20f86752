"""The ``-m mailer`` hand-off (upas smtpd.c ``startcmd``/``pipemsg``).

Instead of the built-in store, run ``<mailer> -r <rcpt1> <rcpt2> ...``
(recipients in RCPT order, bang form, no shell) with the mailer stream on
standard input, and answer from its exit status and standard error
(spec upas-behaviour.md §1.10.5, §1.19):

* exit 0: ``250 2.5.0 sent`` (anything on stderr is logged)
* non-zero, stderr mentions ``mail refused``: ``554 5.7.1 <first line>``
* other non-zero: one ``450-4.0.0 <line>`` per stderr line, then
  ``450 4.0.0 mail process terminated abnormally``
* cannot start: ``450 4.3.2 We're busy right now, try later``

A relative mailer name is looked up in ``$PATH`` (upas: ``/bin/upas/<name>``).
A mailer that runs longer than ``timeout`` seconds is killed and the
message gets the 450 reply, so a hung mailer never hangs the session.
"""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from .. import logs, replies
from . import process
from ..decision import ACCEPT, reject
from ..interfaces import IMailBackend
from .process import resolve

log = Logger(namespace="smtpd")


def verdict(exited_ok, stderr, timed_out=False):
    """Map the mailer's outcome to a verdict (pure; spec §1.10.5)."""
    text = stderr.decode("utf-8", "replace")
    if exited_ok and not timed_out:
        return ACCEPT
    lines = text.split("\n")
    if "mail refused" in text and not timed_out:
        return reject(554, replies.REFUSED.format(text=lines[0][:127]), reason="store",
                      detail="mailer")
    complete = lines[:-1]  # only newline-terminated lines, as upas
    if timed_out:
        complete = complete + [replies.MAILER_TIMED_OUT]
    return reject(
        450, *([replies.MAILER_SAID.format(line=line) for line in complete]
               + [replies.MAILER_FAILED]),
        reason="store", detail="mailer")


@implementer(IMailBackend)
class Mailer:
    """Deliver by running an external mailer command."""

    def __init__(self, command, reactor, timeout=600.0, clock=None):
        self.command = command
        self.reactor = reactor
        self.timeout = timeout
        self.clock = clock or reactor

    def ready(self):
        """Can the mailer be started now?  (checked before the 354)"""
        if resolve(self.command) is None:
            return reject(450, replies.BUSY, reason="busy")
        return ACCEPT

    def deliver(self, stream_path, tx):
        """Back-end entry point: run the mailer for one transaction."""
        log = logs.SessionLogger(tx.session).forMessage(tx.queue_id, tx.message_id)

        def logged(result):
            v, stderr = result
            if v.ok and stderr:
                log.info("{mailer} returned good status, but said: {err}",
                         mailer=self.command, err=stderr.decode("utf-8", "replace"),
                         event="smtpd.mailer")
            elif not v.ok:
                first = stderr.decode("utf-8", "replace").split("\n")[0]
                log.info("++[{him}/{rsys}] {sender} {mailer} returned {code} {line}",
                         him=tx.helo, rsys=tx.peer, sender=tx.sender,
                         mailer=self.command, code=v.code, line=first, event="smtpd.mailer")
            return v

        return self.run(stream_path, tx.recipients).addCallback(logged)

    def run(self, stream_path, recipients):
        """Run the mailer on the stream; fires with (verdict, stderr)."""
        path = resolve(self.command)
        if path is None:
            return defer.succeed((reject(450, replies.BUSY, reason="busy"), b""))
        argv = [path, "-r"] + list(recipients)

        def finished(outcome):
            if not outcome.started:
                return reject(450, replies.BUSY, reason="busy"), b""
            return verdict(outcome.ok, outcome.stderr, outcome.timed_out), outcome.stderr

        d = process.run(self.reactor, self.clock, argv, self.timeout, stream_path)
        return d.addCallback(finished)
