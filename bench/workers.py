"""``--workers 1`` against ``--workers 2``: durable acceptance with smtp-source.

    .venv/bin/python bench/workers.py [--messages 5000] [--reps 3] [--workers 1,2]
                                      [--untrusted] [--mailboxes K] [--sessions S]

For each repetition, each worker count in turn (interleaved, so the noise
of a shared machine falls on both alike): a fresh mail root, ``twistd -n
upas-smtpd --workers N`` on a free loopback port, Postfix's
``smtp-source -s 10 -l 1024 -m M -d`` to ``user0`` (``--sessions S`` for
another -s; ``--mailboxes K``: K generators at once, each to its own
mailbox, the sessions shared out),
timed from the start to the end; the server's CPU is the user + system time of the main
process and every worker (``/proc/<pid>/stat``) over that span.  Every
message must be in the mailbox at the end.  ``--untrusted`` sets
``ournets`` to a network the generator does not use, so the full policy
runs (HELO checks against a local ``twisted.names`` server, per-peer
counts, the state store over AMP).  Prints msgs/s and CPU per message
for each run, then the medians.  Every process it starts is stopped by pid.
"""

import argparse
import json
import mailbox
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
TICKS = os.sysconf("SC_CLK_TCK")
HELO = "client.bench-sender.net"  # not a reserved name: the HELO checks look it up


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def wait_for(path, pattern, proc, count=1):
    for _ in range(1200):
        with open(path) as f:
            found = re.findall(pattern, f.read())
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    sys.exit("server did not start:\n" + open(path).read())


def start_dns(work):
    zone = os.path.join(work, "zone.json")
    with open(zone, "w") as f:
        json.dump({HELO: [["A", "127.0.0.1"]],
                   "1.0.0.127.in-addr.arpa": [["PTR", HELO]]}, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "dnsserver.py"), zone],
                            env=env, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline().split()[1])


def run_once(workers, messages, untrusted, dns_port, mailboxes=1, sessions=10):
    work = tempfile.mkdtemp(prefix="upasmail-workers-")
    root = os.path.join(work, "mail")
    for i in range(mailboxes):
        os.makedirs(os.path.join(root, "box", "user%d" % i))
    args = ["--workers", str(workers), "--root", root, "--sysname", "bench.example"]
    if untrusted:
        conf = os.path.join(work, "smtpd.conf")
        with open(conf, "w") as f:
            f.write("ournets 10.99.0.0/16\n")
        # one generator address: the per-peer limit must not refuse its sessions
        args += ["--conf", conf, "--resolver", "127.0.0.1:%d" % dns_port,
                 "--max-connections-per-peer", "1000"]
    logpath = os.path.join(work, "log")
    log = open(logpath, "w")
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "upas-smtpd", "--listen",
                                      "tcp:0:interface=127.0.0.1", *args],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        port = int(wait_for(logpath, r"starting on (\d+)", proc)[0])
        pids = [proc.pid]
        if workers > 1:
            pids += [int(p) for p in wait_for(logpath, r"worker \d+ started \(pid (\d+)\)",
                                              proc, workers - 1)]
            wait_for(logpath, r"#info w\d+\] Starting factory", proc, workers - 1)
        cpu0 = [cpu_seconds(p) for p in pids]
        t0 = time.perf_counter()
        # one generator per mailbox, the sessions shared out among them
        gens = [subprocess.Popen(["smtp-source", "-s", str(sessions // mailboxes), "-l", "1024",
                                  "-m", str(messages // mailboxes), "-d", "-M", HELO,
                                  "-f", "a@b.example", "-t", "user%d@bench.example" % i,
                                  "127.0.0.1:%d" % port]) for i in range(mailboxes)]
        for g in gens:
            if g.wait(600) != 0:
                sys.exit("smtp-source failed")
        elapsed = time.perf_counter() - t0
        each = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
        cpu = sum(each)
        stored = sum(len(mailbox.mbox(os.path.join(root, "box", "user%d" % i, "mbox")))
                     for i in range(mailboxes))
        if stored != messages:
            sys.exit("only %d of %d messages stored" % (stored, messages))
        print("  CPU seconds per process (main first): %s over %.1f s"
              % (" ".join("%.1f" % c for c in each), elapsed), flush=True)
        return messages / elapsed, cpu / messages * 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--untrusted", action="store_true")
    ap.add_argument("--mailboxes", type=int, default=1, choices=(1, 2, 5, 10),
                    help="spread the messages over this many mailboxes")
    ap.add_argument("--sessions", type=int, default=10, help="smtp-source -s, in all")
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    dns, dns_port = start_dns(tempfile.mkdtemp(prefix="upasmail-dns-"))
    results = {n: [] for n in counts}
    try:
        for rep in range(args.reps):
            for n in counts:
                rate, cpu = run_once(n, args.messages, args.untrusted, dns_port,
                                     args.mailboxes, args.sessions)
                results[n].append((rate, cpu))
                print("rep %d  --workers %d: %7.0f msgs/s  %.2f ms CPU/msg" % (rep + 1, n, rate,
                                                                               cpu), flush=True)
    finally:
        dns.terminate()
        dns.wait(30)
    for n in counts:
        rates = [r for r, _ in results[n]]
        cpus = [c for _, c in results[n]]
        print("--workers %d: median %7.0f msgs/s (%.0f-%.0f)  %.2f ms CPU/msg"
              % (n, statistics.median(rates), min(rates), max(rates), statistics.median(cpus)))


if __name__ == "__main__":
    main()
