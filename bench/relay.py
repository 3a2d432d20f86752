"""Relaying through a smarthost, end to end, with a real server.

    .venv/bin/python bench/relay.py [--messages N] [--sessions S] [--mode MODE] [--reps R]
                                    [--server-args '--max-per-destination 20']

A real ``twistd upas-smtpd`` (127.0.0.1 is trusted, so relaying is
allowed) with ``--smarthost tcp!127.0.0.1!SINK`` gets ``smtp-source -s S
-l 1024 -m N`` to one remote domain; the smarthost is a stock Twisted
ESMTP sink in this process that counts messages and does not fsync.
Modes:

``runner``   the queue runner on: acceptance (until smtp-source is done)
             and end to end (until the sink holds all N), msgs/s;
``norunner`` ``--no-queue-runner``: acceptance alone;
``runq``     queue N with ``--no-queue-runner``, stop the server, then
             time ``upas-runq --flush`` until it exits.

The queue backlog (jobs in ``<root>/queue``) is sampled during the run.
Prints one line per rep, then the medians.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.mail import smtp
from zope.interface import implementer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = sys.executable
TWISTD = [PYTHON, "-c", "import sys; sys.argv[0] = 'twistd'; "
          "from twisted.scripts.twistd import run; run()"]


# -- the sink: stock Twisted ESMTP, counts, no fsync ---------------------------

@implementer(smtp.IMessage)
class _Message:
    def __init__(self, sink):
        self.sink = sink

    def lineReceived(self, line):
        pass

    def eomReceived(self):
        self.sink.count += 1
        return defer.succeed(b"ok")

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink):
        self.sink = sink

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: _Message(self.sink)


class Sink(smtp.SMTPFactory):
    noisy = False

    def __init__(self):
        smtp.SMTPFactory.__init__(self)
        self.count = 0
        self.connections = 0

    def buildProtocol(self, addr):
        p = smtp.ESMTP()
        p.factory = self
        p.delivery = _Delivery(self)
        p.host = b"sink.example"
        self.connections += 1
        return p


# -- the server -----------------------------------------------------------------

def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Server:
    def __init__(self, work, sink_port, *args):
        self.root = os.path.join(work, "mail")
        self.logpath = os.path.join(work, "twistd.log")
        self.log = open(self.logpath, "w+")
        self.proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "upas-smtpd", "--listen",
             "tcp:0:interface=127.0.0.1", "--root", self.root, "--sysname",
             "gnot.example.org", "--smarthost", "tcp!127.0.0.1!%d" % sink_port,
             "--no-outbound-tls", *args],
            env=env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=work)
        self.port = None

    @defer.inlineCallbacks
    def started(self):
        for _ in range(600):
            self.log.seek(0)
            m = re.search(r"starting on (\d+)", self.log.read())
            if m:
                self.port = int(m.group(1))
                return self.port
            if self.proc.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.log.seek(0)
        raise RuntimeError("server did not start:\n" + self.log.read())

    def cpu(self):
        """user+system seconds of the server process (all threads)."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @defer.inlineCallbacks
    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        for _ in range(600):
            if self.proc.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        else:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def backlog(root):
    try:
        return sum(1 for n in os.listdir(os.path.join(root, "queue")) if n.endswith(".env"))
    except FileNotFoundError:
        return 0


class _Done(protocol.ProcessProtocol):
    def __init__(self):
        self.d = defer.Deferred()
        self.out = b""

    def outReceived(self, data):
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.d.callback((reason.value.exitCode, self.out.decode("utf-8", "replace")))


def run(argv):
    p = _Done()
    reactor.spawnProcess(p, argv[0], argv, env=env(), path=ROOT)
    return p.d


def smtp_source(port, n, sessions, size):
    return run(["/usr/sbin/smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(n),
                "-d", "-f", "alice@example.org", "-t", "bob@remote.example",
                "127.0.0.1:%d" % port])


@defer.inlineCallbacks
def one(mode, n, sessions, size, extra=()):
    work = tempfile.mkdtemp(prefix="upasmail-relay-")
    sink = Sink()
    listening = reactor.listenTCP(0, sink, interface="127.0.0.1")
    sink_port = listening.getHost().port
    server = Server(work, sink_port, *(["--no-queue-runner"] if mode != "runner" else []),
                    *extra)
    result = {}
    try:
        port = yield server.started()
        peak = [0]
        sampling = task.LoopingCall(lambda: peak.__setitem__(0, max(peak[0],
                                                                   backlog(server.root))))
        sampling.start(0.25)
        cpu0 = server.cpu()
        start = time.monotonic()
        code, out = yield smtp_source(port, n, sessions, size)
        accepted = time.monotonic() - start
        if code:
            raise RuntimeError("smtp-source: %s" % out)
        result["accept"] = n / accepted
        if mode == "runner":
            timeout = time.monotonic() + 600
            while sink.count < n:
                if time.monotonic() > timeout:
                    raise RuntimeError("sink has %d of %d" % (sink.count, n))
                yield task.deferLater(reactor, 0.01, lambda: None)
            result["end2end"] = n / (time.monotonic() - start)
            result["cpu_ms"] = (server.cpu() - cpu0) * 1000 / n
        sampling.stop()
        result["peak_backlog"] = peak[0]
        if mode == "runq":
            yield server.stop()
            assert backlog(server.root) == n, backlog(server.root)
            start = time.monotonic()
            code, out = yield run([PYTHON, "-c", "from upasmail.tap_runq import runq_main; "
                                   "runq_main()", "--root", server.root, "--flush",
                                   "--logfile", os.path.join(work, "runq.log"), *extra])
            took = time.monotonic() - start
            if code or sink.count != n:
                raise RuntimeError("upas-runq exit %s, sink %d of %d" % (code, sink.count, n))
            result["runq"] = n / took
        result["connections"] = sink.connections
    finally:
        yield server.stop()
        yield listening.stopListening()
        shutil.rmtree(work, True)
    return result


@defer.inlineCallbacks
def main(reactor_, args):
    rows = []
    for rep in range(args.reps):
        r = yield one(args.mode, args.messages, args.sessions, args.size,
                      args.server_args.split())
        rows.append(r)
        print("rep %d: %s" % (rep + 1, "  ".join(
            "%s=%.1f" % (k, v) for k, v in r.items() if v is not None)), flush=True)
    keys = [k for k in rows[0] if rows[0][k] is not None]
    print("median (%s, %d msgs, s%d): %s" % (args.mode, args.messages, args.sessions, "  ".join(
        "%s=%.1f" % (k, statistics.median(r[k] for r in rows)) for k in keys)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--mode", choices=("runner", "norunner", "runq"), default="runner")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--server-args", default="", help="more options for the server "
                    "(and upas-runq), e.g. '--max-per-destination 20'")
    a = ap.parse_args()
    task.react(main, [a])
