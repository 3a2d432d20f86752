"""The servers under test, each a child process group on 127.0.0.1.

Every server here is started in a new session (its own process group) and
stopped by that group id: SIGTERM, a bounded wait, then SIGKILL.  Each
knows where it stores mail (``messages()`` for the verifier,
``stored_count()`` for loads without ids), which processes to charge CPU
and memory to (``pids()``), and its queue backlog.

Names and addresses the load uses (the DNS zone answers them):

* the generators say ``EHLO loadgen.benchnet.net`` (A 127.0.0.1, and the
  PTR of 127.0.0.1 names it back);
* senders are ``sender@benchnet.net``; local recipients ``user<N>@benchdom.net``;
* relayed mail goes to ``user<N>@far-away.net`` (MX there is never asked:
  the relaying servers send everything to their smarthost, the sink).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from . import procstat, verify

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PYTHON = sys.executable
TWISTD = [PYTHON, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]

EHLO = "loadgen.benchnet.net"
SENDER = "sender@benchnet.net"
LOCAL_DOMAIN = "benchdom.net"
REMOTE_DOMAIN = "far-away.net"
USERS = ["user%d" % i for i in range(8)]
UNTRUSTED_NETS = "192.0.2.0/24"  # documentation addresses: never the generators'
BLOCKED_ENTRIES = 3000

ZONE = {
    EHLO: [["A", "127.0.0.1"]],
    "1.0.0.127.in-addr.arpa": [["PTR", EHLO]],
    "benchnet.net": [["MX", "10 " + EHLO]],
    LOCAL_DOMAIN: [["MX", "10 mx." + LOCAL_DOMAIN]],
    "mx." + LOCAL_DOMAIN: [["A", "127.0.0.1"]],
    REMOTE_DOMAIN: [["MX", "10 mx." + REMOTE_DOMAIN]],
    "mx." + REMOTE_DOMAIN: [["A", "127.0.0.1"]],
}


def local_recipients():
    return ["%s@%s" % (u, LOCAL_DOMAIN) for u in USERS]


def remote_recipients():
    return ["%s@%s" % (u, REMOTE_DOMAIN) for u in USERS]


def env(src=ROOT):
    e = dict(os.environ)
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port():
    """A loopback TCP port free right now (for servers that must be told one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until true; RuntimeError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


class Child:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, argv, log_path, cwd=None, src=ROOT):
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env(src), cwd=cwd,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, pattern, timeout=60):
        def found():
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s):\n%s" % (
                    os.path.basename(self.log_path), self.proc.returncode, self.output()[-3000:]))
            return None
        return wait_until(found, timeout, "%r in %s" % (pattern, self.log_path))

    def stop(self, grace=30):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(grace)
        self.log.close()


class DNSServer:
    """The bench's twisted.names server (tests/dnsserver.py) serving ZONE."""

    def __init__(self, work):
        path = os.path.join(work, "zone.json")
        with open(path, "w") as f:
            json.dump(ZONE, f)
        self.child = Child([PYTHON, os.path.join(ROOT, "tests", "dnsserver.py"), path],
                           os.path.join(work, "dns.log"))
        self.port = int(self.child.wait_for(r"port (\d+)").group(1))

    def stop(self):
        self.child.stop()


class Server:
    """What every server under test offers the scenarios."""

    name = "?"
    child = None
    port = None

    def __init__(self, work):
        self.work = os.path.join(work, self.name)
        os.makedirs(self.work)

    def pids(self):
        return [self.child.pid]

    def cpu_seconds(self):
        return procstat.cpu_seconds(self.pids())

    def memory_kib(self):
        return procstat.memory_kib(self.pids())

    def messages(self):
        """Every stored message, raw."""
        raise NotImplementedError

    def stored_count(self):
        raise NotImplementedError

    def backlog(self):
        """Messages accepted but not yet delivered (0 for servers without a queue)."""
        return 0

    def settle(self, timeout):
        """Wait (bounded) until every accepted message is where messages() reads."""

    # lines of the server's log that say something went wrong inside it
    problem_pattern = re.compile(r"Traceback|Unhandled|#critical|#error\]")

    def log_text(self):
        return self.child.output() if self.child else ""

    def log_problems(self):
        """(number of problem lines in the server's log, the first of them)."""
        lines = [line for line in self.log_text().splitlines()
                 if self.problem_pattern.search(line)]
        return len(lines), (lines[0][:200] if lines else None)

    def stop(self):
        if self.child:
            self.child.stop()
            self.child = None


class Upasmail(Server):
    """``twistd -n upas-smtpd`` with the full upas policy (or trusted load)."""

    def __init__(self, work, dns_port, trusted=False, smarthost=None, extra=(), src=ROOT):
        self.name = "upasmail-trusted" if trusted else "upasmail"
        Server.__init__(self, work)
        self.root = os.path.join(self.work, "mail")
        for user in USERS:  # only existing local users get mail
            os.makedirs(os.path.join(self.root, "box", user))
        lib = os.path.join(self.root, "lib")
        os.makedirs(lib)
        with open(os.path.join(lib, "blocked"), "w") as f:
            f.write(blocked_list(BLOCKED_ENTRIES))
        conf = os.path.join(self.work, "smtpd.conf")
        with open(conf, "w") as f:
            f.write("defaultdomain %s\nnorelay on\nournets %s\nourdomains %s, *.%s\n"
                    % (LOCAL_DOMAIN, "127.0.0.1" if trusted else UNTRUSTED_NETS,
                       LOCAL_DOMAIN, LOCAL_DOMAIN))
        argv = TWISTD + [
            "-n", "--pidfile=", "upas-smtpd",
            "--listen", "tcp:0:interface=127.0.0.1:backlog=4096",
            "--root", self.root, "--conf", conf, "--sysname", "mx." + LOCAL_DOMAIN,
            "--resolver", "127.0.0.1:%d" % dns_port,
            # one address is every client here: lift the per-peer cap, keep the rest
            "--max-connections-per-peer", "100000"]
        if smarthost:
            argv += ["--smarthost", "tcp!127.0.0.1!%d" % smarthost]
        self.child = Child(argv + list(extra), os.path.join(self.work, "twistd.log"),
                           cwd=self.work, src=src)
        # behind a PROXY listener the factory's name carries its wrapper's
        self.port = int(self.child.wait_for(r"UpasSMTPFactory[^\n]*? starting on (\d+)").group(1))

    def mboxes(self):
        return verify.mbox_files(os.path.join(self.root, "box"))

    def messages(self):
        return verify.mbox_messages(self.mboxes())

    def stored_count(self):
        return verify.count_mbox(self.mboxes())

    def backlog(self):
        try:
            return sum(1 for n in os.listdir(os.path.join(self.root, "queue"))
                       if n.endswith(".env"))
        except OSError:
            return 0


def blocked_list(n):
    """A ratify list of ``n`` entries, none of which matches the bench's load."""
    lines = ["# bench: %d entries that never match 127.0.0.1 or benchnet.net" % n]
    verbs = ["block", "deny", "dial", "delay"]
    for i in range(n // 2):
        lines.append("%s 10.%d.%d.0/24" % (verbs[i % 4], i // 256 % 256, i % 256))
    for i in range(n - n // 2):
        lines.append("*%s spammer%d.biz" % (verbs[i % 4], i))
    return "\n".join(lines) + "\n"


class FileServer(Server):
    """A reference server from bench/ that stores one file per message."""

    script = None

    def __init__(self, work, fsync=True):
        Server.__init__(self, work)
        self.spool = os.path.join(self.work, "spool")
        os.makedirs(self.spool)
        argv = [PYTHON, os.path.join(BENCH, self.script), "--dir", self.spool]
        if not fsync:
            argv.append("--no-fsync")
        self.child = Child(argv, os.path.join(self.work, "server.log"))
        self.port = int(self.child.wait_for(r"listening on (\d+)").group(1))

    def messages(self):
        return verify.file_messages(self.spool)

    def stored_count(self):
        return sum(1 for n in os.listdir(self.spool) if not n.startswith("."))


class TwistedESMTP(FileServer):
    name = "twisted"
    script = "twisted_server.py"


class Sink(TwistedESMTP):
    """The relay target: stock Twisted ESMTP, one file per message, no fsync."""
    name = "sink"

    def __init__(self, work):
        TwistedESMTP.__init__(self, work, fsync=False)


class Aiosmtpd(FileServer):
    name = "aiosmtpd"
    script = "aiosmtpd_server.py"


def remove(path):
    shutil.rmtree(path, ignore_errors=True)
