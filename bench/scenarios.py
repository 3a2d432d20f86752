"""Scenarios: one load against one freshly started server, measured and checked.

Each ``run_*`` function takes a started server and returns a result dict
(msgs/s, latencies, CPU per message, errors, the verifier's verdict, and
whatever the scenario adds).  Starting and stopping servers is the
caller's business (``bench.runner``), so every run starts from an empty
store.
"""

import asyncio
import subprocess
import threading
import time
from dataclasses import dataclass

from . import loadgen, postfix, servers, verify


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "load" (asyncio), "source" (smtp-source), "idle", "relay"
    concurrency: int = 10
    per_connection: int = 100
    total: int = 1000
    size: int = 1024
    description: str = ""


def scenarios(quick=False):
    """The scenarios by name, full size or ``quick`` (a smoke run of seconds)."""
    q = quick
    return {s.name: s for s in [
        Scenario("source-c10", "source", 10, 0, 500 if q else 20000, 1024,
                 "smtp-source -s 10 -l 1024 -m %d -d" % (500 if q else 20000)),
        Scenario("c10", "load", 10, 100, 100 if q else 5000, 1024,
                 "asyncio, 10 connections, 100 msgs each in turn, 1 KiB"),
        Scenario("c100", "load", 100, 100 if not q else 5, 500 if q else 10000, 1024,
                 "asyncio, 100 connections x %d msgs, 1 KiB" % (5 if q else 100)),
        Scenario("fresh-c10", "load", 10, 1, 200 if q else 3000, 1024,
                 "asyncio, 10 at once, a new connection per message, 1 KiB"),
        Scenario("c10-100k", "load", 10, 100 if not q else 10, 100 if q else 2000, 100 * 1024,
                 "asyncio, 10 connections, 100 KiB bodies"),
        Scenario("idle", "idle", 0, 0, 200 if q else 10000, 0,
                 "idle connections (EHLO, then silent): memory each, NOOP p99"),
        Scenario("relay", "relay", 10, 200 if not q else 20, 200 if q else 2000, 1024,
                 "asyncio c10 to a remote domain via smarthost to a sink (upasmail: trusted peer)"),
    ]}


def _ms(seconds):
    return None if seconds is None else seconds * 1000.0


def warm_up(server):
    """One session before the clock starts: first-connection costs (imports,
    Postfix spawning its smtpd, caches) are not what the scenarios measure."""
    asyncio.run(loadgen.noop_latencies("127.0.0.1", server.port, servers.EHLO, count=1))


def run_load(server, sc, tag, recipients=None):
    """The asyncio generator against ``server``; stored mail verified by id."""
    warm_up(server)
    cpu0 = server.cpu_seconds()
    res = asyncio.run(loadgen.run_load(
        "127.0.0.1", server.port, concurrency=sc.concurrency,
        per_connection=sc.per_connection, total=sc.total, size=sc.size,
        ehlo=servers.EHLO, sender=servers.SENDER,
        recipients=recipients or servers.local_recipients(), tag=tag))
    settled = settle(server)
    cpu = server.cpu_seconds() - cpu0
    verdict = verify.verify(res.acked, server.messages())
    out = _load_result(sc, len(res.acked), res.elapsed, cpu, res.errors, verdict,
                       res.latencies, res.error_samples)
    out["settle_s"] = settled
    return out


def settle(server, timeout=300):
    """Seconds until every accepted message was in its mailbox (Postfix's 250
    comes before delivery); the wait is bounded."""
    start = time.perf_counter()
    server.settle(timeout)
    return time.perf_counter() - start


def _load_result(sc, acked, elapsed, cpu, errors, verdict, latencies=(), samples=()):
    return {
        "acked": acked,
        "elapsed": elapsed,
        "msgs_per_s": acked / elapsed if elapsed else 0.0,
        "p50_ms": _ms(loadgen.percentile(latencies, 50)),
        "p99_ms": _ms(loadgen.percentile(latencies, 99)),
        "cpu_ms_per_msg": cpu * 1000.0 / acked if acked else None,
        "errors": errors + verdict.errors,
        "verified": str(verdict),
        "found": verdict.found,
        "expected": verdict.expected,
        "verified_ok": verdict.errors == 0 and verdict.found == verdict.expected,
        "error_samples": list(samples),
    }


def run_source(server, sc, tag):
    """Postfix's smtp-source: no ids, so only the count stored is checked."""
    argv = [postfix.find("smtp-source"), "-s", str(sc.concurrency), "-l", str(sc.size),
            "-m", str(sc.total), "-d", "-f", servers.SENDER,
            "-t", servers.local_recipients()[0], "-M", servers.EHLO,
            "127.0.0.1:%d" % server.port]
    warm_up(server)
    cpu0 = server.cpu_seconds()
    start = time.perf_counter()
    # bounded: even the slowest server here does 20,000 messages well inside this
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    settled = settle(server)
    cpu = server.cpu_seconds() - cpu0
    stored = server.stored_count()
    samples = []
    errors = 0
    if proc.returncode != 0:
        # smtp-source stops at the first refusal: what it did not send is lost
        samples.append((proc.stderr or proc.stdout).strip()[-300:])
        errors = 1
    acked = sc.total if proc.returncode == 0 else stored
    verdict = verify.verify_count(acked, stored)
    out = _load_result(sc, acked, elapsed, cpu, errors, verdict, (), samples)
    out["settle_s"] = settled
    return out


def run_idle(server, sc, tag, count):
    """``count`` idle sessions: server memory each and a new client's NOOP time."""
    async def go():
        quiet = await loadgen.noop_latencies("127.0.0.1", server.port, servers.EHLO)
        mem0 = server.memory_kib()
        sessions, errors = await loadgen.idle_connections(
            "127.0.0.1", server.port, count, servers.EHLO)
        await asyncio.sleep(1.0)  # let the server finish what the greetings started
        mem1 = server.memory_kib()
        busy = await loadgen.noop_latencies("127.0.0.1", server.port, servers.EHLO)
        for s in sessions:
            s.abort()
        return quiet, busy, mem0, mem1, len(sessions), errors

    quiet, busy, mem0, mem1, opened, errors = asyncio.run(go())
    per = {k: (mem1[k] - mem0[k]) / opened if opened else None for k in mem0}
    return {
        "idle_connections": opened,
        "idle_wanted": count,
        "kib_per_conn": per,
        "memory_before_kib": mem0,
        "memory_after_kib": mem1,
        "noop_p50_ms": _ms(loadgen.percentile(busy, 50)),
        "noop_p99_ms": _ms(loadgen.percentile(busy, 99)),
        "noop_p99_quiet_ms": _ms(loadgen.percentile(quiet, 99)),
        "errors": len(errors),
        "error_samples": [str(e) for e in errors[:5]],
        "verified": "%d/%d open" % (opened, count),
        "verified_ok": opened == count,
    }


class Sampler(threading.Thread):
    """Samples ``fn()`` every ``interval`` seconds until stopped."""

    def __init__(self, fn, interval=0.25):
        threading.Thread.__init__(self, daemon=True)
        self.fn, self.interval = fn, interval
        self.samples = []
        self.done = threading.Event()

    def run(self):
        start = time.monotonic()
        while not self.done.is_set():
            try:
                self.samples.append((round(time.monotonic() - start, 2), self.fn()))
            except OSError:
                pass
            self.done.wait(self.interval)

    def stop(self):
        self.done.set()
        self.join(10)


def run_relay(server, sink, sc, tag, timeout=900):
    """Mail to a remote domain through ``server`` to ``sink``: acceptance rate,
    and the end-to-end rate until the sink holds every acknowledged message."""
    warm_up(server)
    sampler = Sampler(server.backlog)
    sampler.start()
    cpu0 = server.cpu_seconds()
    start = time.perf_counter()
    try:
        res = asyncio.run(loadgen.run_load(
            "127.0.0.1", server.port, concurrency=sc.concurrency,
            per_connection=sc.per_connection, total=sc.total, size=sc.size,
            ehlo=servers.EHLO, sender=servers.SENDER,
            recipients=servers.remote_recipients(), tag=tag))
        backlog_at_end = server.backlog()
        acked = len(res.acked)
        try:
            servers.wait_until(lambda: sink.stored_count() >= acked, timeout,
                               "the sink to hold %d messages" % acked, interval=0.02)
        except RuntimeError as e:
            res.error(e)
        end_to_end = time.perf_counter() - start
    finally:
        sampler.stop()
    cpu = server.cpu_seconds() - cpu0
    verdict = verify.verify(res.acked, sink.messages())
    out = _load_result(sc, acked, res.elapsed, cpu, res.errors, verdict, res.latencies,
                       res.error_samples)
    out.update({
        "end_to_end_s": end_to_end,
        "end_to_end_msgs_per_s": acked / end_to_end if end_to_end else 0.0,
        "backlog_when_load_ended": backlog_at_end,
        "backlog_max": max((n for _, n in sampler.samples), default=0),
        "backlog_samples": sampler.samples[::4],
    })
    return out
