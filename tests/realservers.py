"""Real servers the tests start themselves: ``redis-server`` and ``haproxy``.

Each runs on a free 127.0.0.1 port, in the test's own directory, and is
stopped by the pid it was started with.  When the program is not
installed the test is skipped, saying which Debian package to install;
``UPASMAIL_REQUIRE_REAL_SERVERS=1`` (``.ci/run``, which installs them)
turns that skip into a failure, so CI cannot pass without them.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

REQUIRE = "UPASMAIL_REQUIRE_REAL_SERVERS"


def need(program, package):
    """The path of ``program``, or skip (fail under ``REQUIRE``) naming ``package``."""
    path = shutil.which(program) or next(
        (p for p in ("/usr/sbin/" + program, "/usr/bin/" + program) if os.access(p, os.X_OK)),
        None)
    if path is None:
        why = "%s is not installed (Debian: apt-get install %s)" % (program, package)
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(why + " (%s=1)" % REQUIRE)
        pytest.skip(why)
    return path


def free_port():
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, log, what, tries=400):
    """Poll until ``port`` accepts (starting a child is not a timed test)."""
    for _ in range(tries):
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise AssertionError("%s did not start on %d:\n%s" % (what, port, _read(log)))


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class _Child:
    """A child process stopped by its own pid."""

    proc = None

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)

    def kill(self):
        """kill -9, as a crash."""
        self.stop(signal.SIGKILL)


class RedisServer(_Child):
    """``redis-server`` on a free port, no persistence, in ``directory``."""

    def __init__(self, directory, port=None):
        self.binary = need("redis-server", "redis-server")
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        self.log = os.path.join(self.directory, "redis-%d.log" % self.port)
        self.start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self):
        """Start (again, on the same port: Redis "returns")."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.directory,
             "--logfile", self.log, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, self.log, "redis-server")

    def command(self, *args):
        """One command over a plain socket (RESP), for tests to look inside;
        the reply decoded as far as tests need (integers, bulk strings,
        simple strings, arrays of those)."""
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(out)
            f = s.makefile("rb")
            return _resp(f)


def _resp(f):
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp(f) for _ in range(n)]
    raise RuntimeError("unexpected reply %r" % line)


class HAProxy(_Child):
    """``haproxy`` in the foreground with ``config`` (a string; ``{port}``
    in it is its own free frontend port)."""

    def __init__(self, directory, config, port=None):
        self.binary = need("haproxy", "haproxy")
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        self.config = os.path.join(self.directory, "haproxy-%d.cfg" % self.port)
        with open(self.config, "w") as f:
            f.write(config.format(port=self.port))
        self.log = os.path.join(self.directory, "haproxy-%d.log" % self.port)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", self.config],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, self.log, "haproxy")
