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

import os
import shutil

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from . import replies
from .decision import ACCEPT, reject

STDERR_LIMIT = 64 * 1024
log = Logger(namespace="smtpd")


def resolve(mailer):
    """Absolute path of the mailer, or None when it cannot be run."""
    path = mailer if os.sep in mailer else shutil.which(mailer)
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


def verdict(exited_ok, stderr, timed_out=False):
    """Map the mailer's outcome to a verdict (pure; spec §1.10.5)."""
    text = stderr.decode("utf-8", "replace")
    if exited_ok and not timed_out:
        return ACCEPT
    lines = text.split("\n")
    if "mail refused" in text and not timed_out:
        return reject(554, "5.7.1 " + lines[0][:127])
    complete = lines[:-1]  # only newline-terminated lines, as upas
    if timed_out:
        complete = complete + ["mailer timed out"]
    return reject(
        450, *(["4.0.0 " + line for line in complete] + [replies.MAILER_FAILED])
    )


class _MailerProcess(protocol.ProcessProtocol):
    def __init__(self, done):
        self.done = done
        self.stderr = []
        self.size = 0

    def childDataReceived(self, fd, data):
        if fd == 2 and self.size < STDERR_LIMIT:
            self.stderr.append(data[: STDERR_LIMIT - self.size])
            self.size += len(data)

    def processEnded(self, reason):
        self.done.callback((reason.check(error.ProcessDone) is not None,
                            b"".join(self.stderr)))


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
            return reject(450, replies.BUSY)
        return ACCEPT

    def deliver(self, stream_path, tx):
        """Back-end entry point: run the mailer for one transaction."""

        def logged(result):
            v, stderr = result
            if v.ok and stderr:
                log.info("{mailer} returned good status, but said: {err}",
                         mailer=self.command, err=stderr.decode("utf-8", "replace"))
            elif not v.ok:
                first = stderr.decode("utf-8", "replace").split("\n")[0]
                log.info("++[{him}/{rsys}] {sender} {mailer} returned {code} {line}",
                         him=tx.helo, rsys=tx.peer, sender=tx.sender,
                         mailer=self.command, code=v.code, line=first)
            return v

        return self.run(stream_path, tx.recipients).addCallback(logged)

    def run(self, stream_path, recipients):
        """Run the mailer on the stream; fires with a verdict."""
        path = resolve(self.command)
        if path is None:
            return defer.succeed(reject(450, replies.BUSY))
        argv = [path, "-r"] + list(recipients)
        done = defer.Deferred()
        proto = _MailerProcess(done)
        fd = os.open(stream_path, os.O_RDONLY)
        try:
            transport = self.reactor.spawnProcess(
                proto, path, argv, env=dict(os.environ),
                childFDs={0: fd, 1: "r", 2: "r"},
            )
        except OSError:
            return defer.succeed(reject(450, replies.BUSY))
        finally:
            os.close(fd)
        state = {"timed_out": False}

        def kill():
            state["timed_out"] = True
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        timer = self.clock.callLater(self.timeout, kill)

        def finished(result):
            if timer.active():
                timer.cancel()
            ok, stderr = result
            return verdict(ok, stderr, state["timed_out"]), stderr

        return done.addCallback(finished)
