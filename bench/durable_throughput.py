"""Durable throughput: messages per second through a real upas-smtpd.

Starts ``twistd -n upas-smtpd`` on 127.0.0.1 with a fresh mail root and
sends N messages over C parallel smtplib connections to local mailboxes,
each acknowledged only after fsync.  Prints messages per second.

    python bench/durable_throughput.py [--messages 2000] [--clients 8]
"""

import argparse
import os
import re
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096, help="body bytes")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="upasmail-bench-")
    for i in range(16):  # only existing users get mail
        os.makedirs(os.path.join(work, "mail", "box", "user%d" % i))
    log = open(os.path.join(work, "log"), "w+")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "upas-smtpd", "--listen",
                                      "tcp:0:interface=127.0.0.1", "--root",
                                      os.path.join(work, "mail"), "--sysname", "bench.example"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        port = None
        while port is None:
            time.sleep(0.1)
            log.seek(0)
            m = re.search(r"starting on (\d+)", log.read())
            port = m and int(m.group(1))
            if proc.poll() is not None:
                sys.exit("server did not start")
        body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (args.size // 78)
        per = args.messages // args.clients

        def client(n):
            with smtplib.SMTP("127.0.0.1", port) as c:
                for i in range(per):
                    c.sendmail("bench@example.org", ["user%d" % (i % 16)], body)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        total = per * args.clients
        print("messages: %d  clients: %d  body: %d bytes" % (total, args.clients, len(body)))
        print("elapsed: %.2f s  durable throughput: %.0f msg/s" % (elapsed, total / elapsed))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
