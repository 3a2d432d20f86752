"""The local cluster's throughput: HAProxy -> 1, 2, 3 nodes, state in Redis or local.

    /work/main/.venv/bin/python bench/cluster.py [--reps 3] [--nodes 1,2,3]
        [--states redis,local] [--total 3000] [--concurrency 30] [--quick] [--json FILE]

Each run starts, on 127.0.0.1: ``redis-server`` (for ``redis``), N
``twistd upas-smtpd`` nodes with a PROXY listener (``--proxy-from
127.0.0.1/32``), and ``haproxy -db`` with ``examples/cluster/haproxy.cfg``
cut to N servers; then the bench's asyncio load generator sends TOTAL
1 KiB messages through HAProxy on CONCURRENCY connections (50 messages
each, one command at a time) and every acknowledged message is looked
for, intact and once, in the nodes' mailboxes.  The configurations are
interleaved and their order rotates from one repetition to the next; the
table shows medians (min-max).

The policy is the full one of ``bench/run``'s ``upasmail`` (untrusted
load, HELO checked in DNS, a ratify list of 3,000 entries) plus what
issue 18 puts in the shared state: greylisting (``-g``) with
``--greylist-min 0`` and every (client, recipient) entry made before the
clock starts (one greylisted attempt per recipient and node, straight to
the node), so that no message is refused with 451 (the first to pass
whitelists the client; later ones cost a whitelist look-up); and the rate
limits on (``--conn-rate``, ``--msg-rate``, ``--rcpt-rate``) with limits
the load never reaches, so each connection, message and recipient is
counted.  ``local`` is the same with each node's own state (the
embedded default: no Redis; the greylist in each node's files), so the
difference is what Redis costs.

Measured per run: msgs/s, latency p50/p99, CPU ms per message of the
nodes (all of them), of ``redis-server`` and of ``haproxy`` (``/proc``),
and Redis commands per message (``INFO commandstats``, the bench's own
``INFO`` left out).  All of it shares the machine's cores with the load
generator.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import procstat, report, scenarios, servers  # noqa: E402

EXAMPLE_HAPROXY = os.path.join(servers.ROOT, "examples", "cluster", "haproxy.cfg")
# limits the load never reaches: every connection, message, recipient counted
RATES = ["--conn-rate", "1000000", "--msg-rate", "1000000", "--rcpt-rate", "1000000"]


def program(name):
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin"]:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    sys.exit("bench/cluster.py: %s not found (Debian package %s)" % (
        name, "redis-server" if name == "redis-server" else name))


def haproxy_config(front, ports):
    """examples/cluster/haproxy.cfg with these ports, cut to len(ports) servers."""
    with open(EXAMPLE_HAPROXY) as f:
        text = f.read().replace("${UPAS_CLUSTER_PORT}", str(front))
    out = []
    for line in text.splitlines():
        if line.strip().startswith("server node"):
            n = int(line.split()[1][len("node"):])
            if n > len(ports):
                continue
            line = line.replace("${UPAS_NODE%d_PORT}" % n, str(ports[n - 1]))
        out.append(line)
    return "\n".join(out) + "\n"


def wait_accepting(port, child, what):
    def up():
        if child.proc.poll() is not None:
            raise RuntimeError("%s exited:\n%s" % (what, child.output()[-2000:]))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    servers.wait_until(up, 60, what)


class Redis:
    def __init__(self, work):
        self.port = servers.free_port()
        self.child = servers.Child(
            [program("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", work, "--daemonize", "no"],
            os.path.join(work, "redis.log"))
        wait_accepting(self.port, self.child, "redis-server")

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def info(self, section):
        """INFO ``section`` as {key: value} (RESP by hand: one command)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"INFO %s\r\n" % section.encode())
            f = s.makefile("rb")
            size = int(f.readline()[1:])
            text = f.read(size).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def commands(self):
        """{command: calls so far}, the bench's own INFO left out.  A
        script's own commands count too; each EVALSHA is one round trip."""
        calls = {k[len("cmdstat_"):]: int(v.split("calls=")[1].split(",")[0])
                 for k, v in self.info("commandstats").items() if k.startswith("cmdstat_")}
        calls.pop("info", None)
        return calls

    def stop(self):
        self.child.stop()


class Node(servers.Upasmail):
    """bench/run's full-policy upasmail behind HAProxy, one of N."""

    def __init__(self, work, dns_port, name, state):
        os.makedirs(work)
        extra = ["--listen", "haproxy:tcp:0:interface=127.0.0.1:backlog=4096",
                 "--proxy-from", "127.0.0.1/32", "-g", "--greylist-min", "0", *RATES]
        if state != "local":
            extra += ["--state", state, "--node", name]
        servers.Upasmail.__init__(self, work, dns_port, extra=extra)
        self.name = name


class Cluster(servers.Server):
    """What the scenarios need of a server: its port is HAProxy's, its
    processes the nodes', its store every node's mailboxes."""

    def __init__(self, work, dns_port, count, state):
        self.name = "%s-%d" % (state, count)
        servers.Server.__init__(self, work)
        self.redis = Redis(self.work) if state == "redis" else None
        self.nodes = []
        try:
            for i in range(count):
                self.nodes.append(Node(os.path.join(self.work, "node%d" % (i + 1)), dns_port,
                                       "node%d" % (i + 1),
                                       self.redis.url if self.redis else "local"))
            self.port = servers.free_port()
            cfg = os.path.join(self.work, "haproxy.cfg")
            with open(cfg, "w") as f:
                f.write(haproxy_config(self.port, [n.port for n in self.nodes]))
            self.haproxy = servers.Child([program("haproxy"), "-db", "-f", cfg],
                                         os.path.join(self.work, "haproxy.log"))
            self.child = self.haproxy
            wait_accepting(self.port, self.haproxy, "haproxy")
        except BaseException:
            self.stop()
            raise

    def pids(self):
        return [n.child.pid for n in self.nodes]

    def messages(self):
        return [m for n in self.nodes for m in n.messages()]

    def log_text(self):
        return "\n".join(n.log_text() for n in self.nodes)

    def greylist_warm_up(self):
        """One greylisted attempt per recipient on every node, straight to it
        with the PROXY header HAProxy would write: the entries exist (in Redis,
        or in each node's files) before the clock starts."""
        header = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 %d\r\n" % self.port
        for n in self.nodes:
            for rcpt in servers.local_recipients():
                with socket.create_connection(("127.0.0.1", n.port), timeout=60) as s:
                    s.sendall(header)
                    f = s.makefile("rb")
                    for line in (None, "EHLO " + servers.EHLO, "MAIL FROM:<%s>" % servers.SENDER,
                                 "RCPT TO:<%s>" % rcpt, "DATA"):
                        if line:
                            s.sendall(line.encode() + b"\r\n")
                        reply = f.readline()
                        while reply[3:4] == b"-":
                            reply = f.readline()
                        if line == "DATA" and reply[:1] == b"3":
                            s.sendall(b".\r\n")  # already passed (shared entry)
                            f.readline()

    def stop(self):
        for part in [getattr(self, "haproxy", None)] + self.nodes[::-1]:
            if part is not None:
                part.stop()
        self.child = None
        if self.redis:
            self.redis.stop()


def run_one(bench_work, dns_port, count, state, sc, rep, serial):
    work = os.path.join(bench_work, "run%d" % serial)
    os.makedirs(work)
    tag = "r%d-%s-%d-%d" % (rep, state, count, serial)
    c = None
    try:
        c = Cluster(work, dns_port, count, state)
        c.greylist_warm_up()
        redis_pids = [c.redis.child.pid] if c.redis else []
        r_cpu0 = procstat.cpu_seconds(redis_pids)
        h_cpu0 = procstat.cpu_seconds([c.haproxy.pid])
        cmds0 = c.redis.commands() if c.redis else {}
        result = scenarios.run_load(c, sc, tag)
        acked = result["acked"] or 1
        result["redis_cpu_ms_per_msg"] = (
            (procstat.cpu_seconds(redis_pids) - r_cpu0) * 1000.0 / acked if c.redis else None)
        result["haproxy_cpu_ms_per_msg"] = (
            (procstat.cpu_seconds([c.haproxy.pid]) - h_cpu0) * 1000.0 / acked)
        # the warm-up session of run_load counts too: a handful of commands
        if c.redis:
            per_msg = {k: (v - cmds0.get(k, 0)) / acked for k, v in c.redis.commands().items()}
            result["redis_calls_per_msg"] = {k: round(v, 3) for k, v in per_msg.items() if v}
            result["redis_cmds_per_msg"] = sum(per_msg.values())
            result["redis_evalsha_per_msg"] = per_msg.get("evalsha", 0)
        count_problems, first = c.log_problems()
        if count_problems:
            result["log_problems"] = ["%d: %s" % (count_problems, first)]
    except Exception as e:
        result = {"failed": "%s: %s" % (type(e).__name__, e), "verified_ok": False,
                  "verified": "not run"}
    finally:
        if c is not None:
            c.stop()
        servers.remove(work)
    result.update(scenario="cluster", server="%s x%d" % (state, count), rep=rep,
                  nodes=count, state=state)
    return result


def table(results):
    rows = [["state", "nodes", "msgs/s", "p50 ms", "p99 ms", "nodes CPU ms/msg",
             "redis CPU ms/msg", "haproxy CPU ms/msg", "redis cmds/msg", "EVALSHA/msg",
             "errors", "verified"]]
    for (_, name), rs in report.summarize(results).items():
        def col(key, fmt="%.1f"):
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            return report.spread(vals, fmt)
        ok = all(r.get("verified_ok") for r in rs)
        rows.append([rs[0]["state"], str(rs[0]["nodes"]), col("msgs_per_s", "%.0f"),
                     col("p50_ms"), col("p99_ms", "%.0f"), col("cpu_ms_per_msg", "%.2f"),
                     col("redis_cpu_ms_per_msg", "%.2f"), col("haproxy_cpu_ms_per_msg", "%.2f"),
                     col("redis_cmds_per_msg"), col("redis_evalsha_per_msg"), str(sum(r.get("errors", 0) for r in rs)),
                     "ok" if ok else "; ".join(
                         r.get("failed") or r["verified"] for r in rs if not r.get("verified_ok"))])
    return report.format_rst(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/cluster.py", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nodes", default="1,2,3")
    ap.add_argument("--states", default="redis,local")
    ap.add_argument("--total", type=int, default=3000, help="messages per run")
    ap.add_argument("--concurrency", type=int, default=30, help="connections at once")
    ap.add_argument("--quick", action="store_true", help="300 messages a run: a smoke run")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--work", metavar="DIR")
    args = ap.parse_args(argv)
    total = 300 if args.quick else args.total
    sc = scenarios.Scenario("cluster", "load", args.concurrency, 50, total, 1024,
                            "asyncio, %d connections x 50 msgs, 1 KiB, through HAProxy"
                            % args.concurrency)
    configs = [(state, int(n)) for n in args.nodes.split(",") for state in args.states.split(",")]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
    started = datetime.datetime.now(datetime.timezone.utc)
    work = args.work or None
    with _Work(work) as bench_work:
        dns = servers.DNSServer(bench_work)
        results = []
        serial = 0
        try:
            for rep in range(args.reps):
                shift = rep % len(configs)
                for state, count in configs[shift:] + configs[:shift]:
                    serial += 1
                    r = run_one(bench_work, dns.port, count, state, sc, rep, serial)
                    print("rep %d %-5s x%d: %s msgs/s, nodes %s ms/msg, redis %s ms/msg, "
                          "%s cmds/msg, %s" % (
                              rep, state, count, _f(r.get("msgs_per_s"), "%.0f"),
                              _f(r.get("cpu_ms_per_msg")), _f(r.get("redis_cpu_ms_per_msg")),
                              _f(r.get("redis_cmds_per_msg"), "%.1f"),
                              r.get("failed") or r.get("verified")), flush=True)
                    results.append(r)
        finally:
            dns.stop()
    print()
    print("%s UTC  %s, %d cores, load average %s  reps %d, %d msgs a run, %d connections" % (
        started.isoformat()[:16].replace("T", " "), platform.node(), os.cpu_count(),
        " ".join("%.1f" % x for x in os.getloadavg()), args.reps, total, args.concurrency))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started.isoformat(), "results": results}, f, indent=1,
                      default=str)
    return 1 if any(r.get("failed") or not r.get("verified_ok") for r in results) else 0


def _f(v, fmt="%.2f"):
    return "-" if v is None else fmt % v


class _Work:
    """The bench's directory: the one given, or a temporary one removed at the end."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        import tempfile
        if self.path:
            os.makedirs(self.path, exist_ok=True)
            self.own = False
            return self.path
        self.own = True
        self.path = tempfile.mkdtemp(prefix="upasmail-cluster-")
        return self.path

    def __exit__(self, *exc):
        if self.own:
            servers.remove(self.path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
