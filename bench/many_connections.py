"""A new session's reply time with many idle connections open.

    .venv/bin/python bench/many_connections.py [IDLE]    (default 10000)

Starts ``twistd -n upas-smtpd`` on a free loopback port, measures how long
a fresh session takes from connect to the reply to EHLO (median of 50),
then opens IDLE connections that only read the greeting and stay silent,
and measures again.  Both processes raise their open-file limit first;
the server logs what it obtained.  Prints the two medians.
"""

import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raise_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def session_time(port):
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        f = c.makefile("rb")
        f.readline()
        c.sendall(b"EHLO bench.example\r\n")
        while f.readline()[3:4] == b"-":
            pass
        took = time.perf_counter() - start
        c.sendall(b"QUIT\r\n")
        f.readline()
    return took


def median_ms(port, n=50):
    return statistics.median(session_time(port) for _ in range(n)) * 1000


def main(idle):
    hard = raise_limit()
    work = tempfile.mkdtemp(prefix="upasmail-conns-")
    log = open(os.path.join(work, "twistd.log"), "w+")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.argv[0]='twistd'; "
         "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "upas-smtpd",
         "--listen", "tcp:0:interface=127.0.0.1:backlog=4096", "--root",
         os.path.join(work, "mail"), "--sysname", "bench.example", "--no-queue-runner",
         "--max-connections", str(idle + 1000)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        for _ in range(400):
            log.seek(0)
            m = re.search(r"starting on (\d+)", log.read())
            if m:
                break
            time.sleep(0.05)
        port = int(m.group(1))
        quiet = median_ms(port)
        held = []
        for i in range(min(idle, hard - 200)):
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(c)
        for c in held:
            c.recv(100)  # the greeting: every connection is a live session
        busy = median_ms(port)
        log.seek(0)
        limits = re.search(r"open files: .*", log.read())
        print("server: %s" % (limits.group(0) if limits else "(no fd log line)"))
        print("median connect-to-EHLO-reply: %.2f ms with no other connection, "
              "%.2f ms with %d idle connections" % (quiet, busy, len(held)))
        for c in held:
            c.close()
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
