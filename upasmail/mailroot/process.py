"""Running helper programs: the ``-m`` mailer and the validator hooks.

upas runs ``/bin/upas/send``, ``validateaddress`` and ``validatesender``
with ``proc_start`` and waits for them with no time limit.  Here every
program runs under ``reactor.spawnProcess`` (never a shell), its standard
error (and output) is collected up to a bound, and it is killed when it
outlives ``timeout`` seconds on the injected clock, so a hung program can
never hang a session.
"""

import os
import shutil
from dataclasses import dataclass

from twisted.internet import defer, error, protocol

OUTPUT_LIMIT = 64 * 1024


def resolve(program):
    """Absolute path of an executable (``$PATH`` for bare names), or None."""
    path = program if os.sep in program else shutil.which(program)
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


@dataclass(frozen=True)
class Outcome:
    """How a program ended: ``ok`` is exit status 0 (upas: empty status)."""

    ok: bool
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    started: bool = True

    def status(self):
        """The upas-style status string: last stderr line, else stdout's."""
        for stream in (self.stderr, self.stdout):
            lines = [l for l in stream.decode("utf-8", "replace").splitlines() if l.strip()]
            if lines:
                return lines[-1].strip()
        if self.timed_out:
            return "timed out"
        return "" if self.ok else "failed"


class _Collector(protocol.ProcessProtocol):
    def __init__(self, done):
        self.done = done
        self.out = {1: [], 2: []}
        self.size = {1: 0, 2: 0}

    def childDataReceived(self, fd, data):
        if fd in self.out and self.size[fd] < OUTPUT_LIMIT:
            self.out[fd].append(data[: OUTPUT_LIMIT - self.size[fd]])
            self.size[fd] += len(data)

    def processEnded(self, reason):
        self.done.callback(reason.check(error.ProcessDone) is not None)


def run(reactor, clock, argv, timeout, stdin_path=None):
    """Run ``argv`` (argv[0] an absolute path); fires with an Outcome.

    Standard input is the file ``stdin_path`` (or empty).  Never fails:
    a program that cannot start gives ``Outcome(ok=False, started=False)``.
    """
    done = defer.Deferred()
    proto = _Collector(done)
    fd = os.open(stdin_path or os.devnull, os.O_RDONLY)
    try:
        transport = reactor.spawnProcess(
            proto, argv[0], list(argv), env=dict(os.environ),
            childFDs={0: fd, 1: "r", 2: "r"},
        )
    except OSError:
        return defer.succeed(Outcome(ok=False, started=False))
    finally:
        os.close(fd)
    state = {"timed_out": False}

    def kill():
        state["timed_out"] = True
        try:
            transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    timer = clock.callLater(timeout, kill)

    def finished(ok):
        if timer.active():
            timer.cancel()
        return Outcome(ok=ok and not state["timed_out"], stdout=b"".join(proto.out[1]),
                       stderr=b"".join(proto.out[2]), timed_out=state["timed_out"])

    return done.addCallback(finished)
