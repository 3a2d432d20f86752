"""The bench's main loop: scenarios x servers x repetitions, interleaved.

Each (rep, scenario, server) gets a freshly started server on an empty
store, stopped by its process group as soon as the run is over, whatever
happens (an exception, Ctrl-C).  Results are a list of dicts; ``bench.report``
turns them into the table.
"""

import os
import tempfile
import time
import traceback

from . import loadgen, scenarios, servers

SERVERS = ["upasmail", "upasmail-trusted", "postfix", "twisted", "aiosmtpd"]
# not run unless asked for: upasmail's full policy with --workers 2 (both cores);
# the same from another checkout (UPASMAIL_BENCH_BASE=<its top directory>), to
# measure a change before and after, interleaved in one run
MORE_SERVERS = ["upasmail-w2", "upasmail-base"]
# the relay needs a peer that may relay: "upasmail" runs as upasmail-trusted
# there (Postfix's mynetworks holds 127.0.0.1)
RELAY_SERVERS = {"upasmail", "postfix"}
# Postfix spends a process on each connection: its idle test is capped
POSTFIX_IDLE_MAX = 1000


class Bench:
    def __init__(self, work=None, log=print):
        self.own_work = work is None
        self.work = work or tempfile.mkdtemp(prefix="upasmail-bench-")
        self.log = log
        self.dns = None
        self.running = []  # started and not yet stopped, to stop on the way out
        self.serial = 0

    def __enter__(self):
        self.fd_limit = loadgen.raise_fd_limit()
        self.dns = servers.DNSServer(self.work)
        return self

    def __exit__(self, *exc):
        for s in reversed(self.running):
            s.stop()
        self.running = []
        if self.dns:
            self.dns.stop()
        if self.own_work:
            servers.remove(self.work)

    def _dir(self):
        self.serial += 1
        path = os.path.join(self.work, "run%d" % self.serial)
        os.makedirs(path)
        return path

    def start(self, name, work, smarthost=None):
        if name in ("upasmail", "upasmail-trusted", "upasmail-w2", "upasmail-base"):
            src = servers.ROOT
            if name == "upasmail-base":
                src = os.environ.get("UPASMAIL_BENCH_BASE")
                if not src:
                    raise ValueError("upasmail-base needs UPASMAIL_BENCH_BASE=<checkout>")
            s = servers.Upasmail(work, self.dns.port, trusted=name.endswith("trusted"),
                                 smarthost=smarthost, src=os.path.abspath(src),
                                 extra=("--workers", "2") if name.endswith("w2") else ())
            s.name = name
        elif name == "postfix":
            from . import postfix
            s = postfix.Postfix(work, relayhost=smarthost)
        elif name == "twisted":
            s = servers.TwistedESMTP(work)
        elif name == "aiosmtpd":
            s = servers.Aiosmtpd(work)
        elif name == "sink":
            s = servers.Sink(work)
        else:
            raise ValueError("unknown server %r" % name)
        self.running.append(s)
        return s

    def stop(self, server):
        server.stop()
        self.running.remove(server)

    def idle_count(self, name, wanted):
        # each idle session costs the bench one descriptor and the server one
        n = min(wanted, self.fd_limit - 500)
        if name == "postfix":
            n = min(n, POSTFIX_IDLE_MAX)
        return n

    def run_one(self, rep, sc, name):
        work = self._dir()
        tag = "r%d-%s-%s-%d" % (rep, sc.name, name, self.serial)
        sink = server = None
        result = {}
        started = time.time()
        try:
            if sc.kind == "relay":
                sink = self.start("sink", work)
                trusted = "upasmail-trusted" if name == "upasmail" else name
                server = self.start(trusted, work, smarthost=sink.port)
                result = scenarios.run_relay(server, sink, sc, tag)
            else:
                server = self.start(name, work)
                if sc.kind == "load":
                    result = scenarios.run_load(server, sc, tag)
                elif sc.kind == "source":
                    result = scenarios.run_source(server, sc, tag)
                else:
                    result = scenarios.run_idle(server, sc, tag,
                                                self.idle_count(name, sc.total))
                    if result["idle_wanted"] < sc.total:
                        result["idle_capped"] = (
                            "%d asked; %s" % (sc.total, "Postfix cap (a process each)"
                                              if name == "postfix" else
                                              "open-file limit %d" % self.fd_limit))
        except Exception as e:
            # one broken run is a row of errors, not the end of the bench
            first = (str(e).strip().splitlines() or [""])[0]
            result = {"failed": "%s: %s" % (type(e).__name__, first), "errors": None,
                      "verified": "run failed", "verified_ok": False,
                      "traceback": traceback.format_exc()}
        finally:
            for s in (server, sink):
                if s is not None and s.child is not None:
                    n, first = s.log_problems()
                    if n:
                        result.setdefault("log_problems", []).append(
                            "%s: %d, first: %s" % (s.name, n, first))
                if s is not None:
                    self.stop(s)
            servers.remove(work)
        result.update({"rep": rep, "scenario": sc.name, "server": name,
                       "wall_s": round(time.time() - started, 1)})
        return result

    def run(self, scenario_list, server_names, reps):
        results = []
        for rep in range(1, reps + 1):
            for sc in scenario_list:
                names = [n for n in server_names
                         if sc.kind != "relay" or n in RELAY_SERVERS]
                # rotate the order each rep: no server always runs first (cold cache)
                k = (rep - 1) % len(names) if names else 0
                for name in names[k:] + names[:k]:
                    self.log("rep %d  %-10s %-17s ..." % (rep, sc.name, name), end="",
                             flush=True)
                    r = self.run_one(rep, sc, name)
                    results.append(r)
                    self.log(" %s" % one_line(r))
        return results


def one_line(r):
    if r.get("failed"):
        return "FAILED " + r["failed"]
    if "kib_per_conn" in r:
        return "%d idle, %.1f KiB each (PSS), NOOP p99 %.2f ms" % (
            r["idle_connections"], r["kib_per_conn"]["pss"] or 0, r["noop_p99_ms"] or 0)
    text = "%.0f msgs/s, errors %s, verified %s" % (r["msgs_per_s"], r["errors"],
                                                     r["verified"])
    if "end_to_end_msgs_per_s" in r:
        text += ", end to end %.0f msgs/s" % r["end_to_end_msgs_per_s"]
    return text
