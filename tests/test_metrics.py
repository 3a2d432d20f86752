"""``--metrics``: Prometheus counts from the log events, served by twisted.web."""

import os
import re
import time
import smtplib
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.logger import LogPublisher, Logger
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from test_twistd import (client_context, dns_port, server, tls_files,  # noqa: F401
                         twistd)
from upasmail import metrics, tap_smtpd


def value(m, name, **labels):
    return m.registry.get_sample_value(name, labels) or 0


def session(sid, worker=None, **fields):
    event = {"session": sid, "peer": "192.0.2.1"}
    if worker is not None:
        event["worker"] = worker
    event.update(fields)
    return event


# -- the observer, fed events (no sockets) -----------------------------------------

def test_connections_open_and_by_how_they_ended():
    m = metrics.Metrics()
    m(session("a", event="smtpd.connect"))
    m(session("b", event="smtpd.connect"))
    assert value(m, "upasmail_connections_open") == 2
    m(session("a", event="smtpd.disconnect", end="quit"))
    # refused at connect: never open, counted by how it ended
    m(session("c", event="smtpd.disconnect", end="limit"))
    assert value(m, "upasmail_connections_open") == 1
    assert value(m, "upasmail_connections_total", end="quit") == 1
    assert value(m, "upasmail_connections_total", end="limit") == 1


def test_a_dead_workers_connections_are_no_longer_open():
    m = metrics.Metrics()
    m(session("main", event="smtpd.connect"))
    m(session("w1a", worker=1, event="smtpd.connect"))
    m(session("w1b", worker=1, event="smtpd.connect"))
    m(session("w2a", worker=2, event="smtpd.connect"))
    m({"event": "worker.died", "n": 1, "how": "signal 9"})
    assert value(m, "upasmail_connections_open") == 2
    m({"event": "worker.stopped", "n": 2, "how": "status 0"})
    assert value(m, "upasmail_connections_open") == 1
    # a worker says so itself when its main process is gone: no number
    m({"event": "worker.stopped", "worker": 3})
    assert value(m, "upasmail_connections_open") == 1
    # none of them said how it ended
    assert m.registry.get_sample_value("upasmail_connections_total", {"end": "lost"}) is None


def test_messages_bytes_and_refusals_by_reason_and_class():
    m = metrics.Metrics()
    m(session("a", event="smtpd.accepted", code=250, size=1200, nrcpt=2,
              queue_id="1.000000000001", store_seconds=0.003))
    m(session("a", event="smtpd.accepted", code=250, size=800, nrcpt=1,
              queue_id="1.000000000002"))
    m(session("a", event="smtpd.refused", command="RCPT", code=550, reason="relay"))
    m(session("a", event="smtpd.refused", command="RCPT", code=550, reason="relay"))
    m(session("a", event="smtpd.refused", command="MAIL", code=554, reason="ratify",
              detail="block"))
    m(session("a", event="smtpd.refused", command="DATA", code=451, reason="greylist"))
    m(session("a", event="smtpd.refused", command="DATA", code=554, reason="smuggling"))
    assert value(m, "upasmail_messages_total", result="accepted", **{"class": "2xx"}) == 2
    assert value(m, "upasmail_messages_total", result="refused", **{"class": "4xx"}) == 1
    assert value(m, "upasmail_messages_total", result="refused", **{"class": "5xx"}) == 1
    assert value(m, "upasmail_received_bytes_total") == 2000
    assert value(m, "upasmail_accepted_recipients_total") == 3
    # the final dot to the 250, when the event has it
    assert value(m, "upasmail_store_seconds_count") == 1
    assert value(m, "upasmail_store_seconds_bucket", le="0.005") == 1
    assert value(m, "upasmail_refusals_total", command="RCPT", reason="relay",
                 **{"class": "5xx"}) == 2
    assert value(m, "upasmail_refusals_total", command="MAIL", reason="ratify",
                 **{"class": "5xx"}) == 1
    assert value(m, "upasmail_refusals_total", command="DATA", reason="greylist",
                 **{"class": "4xx"}) == 1


def test_deliveries_tls_auth_fsync_and_errors():
    m = metrics.Metrics()
    for status, relay in (("sent", "local"), ("queued", "queue"), ("sent", "mx.far[192.0.2.7]:25"),
                          ("deferred", "mx.far[192.0.2.7]:25"), ("bounced", "none"),
                          ("expired", "none"), ("sent", "mailer")):
        m({"event": "queue.delivery", "queue_id": "1.000000000001", "status": status,
           "relay": relay, "rcpt": "x"})
    m({"event": "queue.bounce", "kind": "sender", "queue_id": "1.000000000001"})
    m(session("a", event="smtpd.tls", status="started"))
    m(session("b", event="smtpd.tls", status="failed"))
    m(session("a", event="smtpd.auth", result="success", mechanism="PLAIN", user="alice"))
    m(session("b", event="smtpd.auth", result="failure", mechanism="CRAM-MD5", user="bob"))
    m({"event": "store.sync", "seconds": 0.003, "messages": 4})
    m({"event": "store.sync", "seconds": 0.2, "messages": 1})
    m({"event": "error", "log_format": "boom"})
    assert value(m, "upasmail_deliveries_total", status="sent", relay="local") == 1
    assert value(m, "upasmail_deliveries_total", status="sent", relay="remote") == 1
    assert value(m, "upasmail_deliveries_total", status="sent", relay="mailer") == 1
    assert value(m, "upasmail_deliveries_total", status="queued", relay="queue") == 1
    assert value(m, "upasmail_deliveries_total", status="deferred", relay="remote") == 1
    assert value(m, "upasmail_deliveries_total", status="bounced", relay="none") == 1
    assert value(m, "upasmail_deliveries_total", status="expired", relay="none") == 1
    assert value(m, "upasmail_bounces_total", kind="sender") == 1
    assert value(m, "upasmail_tls_sessions_total", status="started") == 1
    assert value(m, "upasmail_tls_sessions_total", status="failed") == 1
    assert value(m, "upasmail_auth_total", result="success", mechanism="PLAIN") == 1
    assert value(m, "upasmail_auth_total", result="failure", mechanism="CRAM-MD5") == 1
    assert value(m, "upasmail_store_fsync_seconds_count") == 2
    assert value(m, "upasmail_store_fsync_seconds_bucket", le="0.005") == 1
    assert value(m, "upasmail_store_fsync_seconds_bucket", le="0.25") == 2
    assert value(m, "upasmail_store_fsync_messages_total") == 5
    assert value(m, "upasmail_errors_total") == 1


def test_label_values_outside_the_catalogue_are_other():
    # a client's made-up command words must not make new series
    m = metrics.Metrics()
    for verb in ("XYZZY", "FOO", "BAR"):
        m(session("a", event="smtpd.refused", command=verb, code=500, reason="syntax"))
    m(session("a", event="smtpd.refused", command="RCPT", code=550, reason="new-reason"))
    m(session("a", event="smtpd.disconnect", end="eaten"))
    m(session("a", event="smtpd.auth", result="success", mechanism="X-OAUTH"))
    m(session("a", event="smtpd.refused", command="MAIL", code=999, reason="syntax"))
    assert value(m, "upasmail_refusals_total", command="other", reason="syntax",
                 **{"class": "5xx"}) == 3
    assert value(m, "upasmail_refusals_total", command="RCPT", reason="other",
                 **{"class": "5xx"}) == 1
    assert value(m, "upasmail_refusals_total", command="MAIL", reason="syntax",
                 **{"class": "other"}) == 1
    assert value(m, "upasmail_connections_total", end="other") == 1
    assert value(m, "upasmail_auth_total", result="success", mechanism="other") == 1


def test_events_without_a_counted_name_count_nothing():
    m = metrics.Metrics()
    m({"log_format": "Site starting on 9125"})
    m(session("a", event="smtpd.helo", helo="x"))
    assert [s for f in m.registry.collect() for s in f.samples
            if s.value and not s.name.endswith("_created")] == []


def test_each_service_has_its_own_registry():
    one, two = metrics.Metrics(), metrics.Metrics()
    one(session("a", event="smtpd.connect"))
    assert value(one, "upasmail_connections_open") == 1
    assert value(two, "upasmail_connections_open") == 0
    assert REGISTRY.get_sample_value("upasmail_connections_open") is None


# -- the queue gauges, read when scraped -----------------------------------------

def make_job(queue_dir, qid):
    os.makedirs(queue_dir, exist_ok=True)
    for ext in (".msg", ".env"):
        with open(os.path.join(queue_dir, qid + ext), "w") as f:
            f.write("{}")


class RunningIndex:
    """What QueueGauges reads of a QueueRunner: whether it runs, the jobs it knows."""

    def __init__(self, known, running=True):
        self.known = set(known)
        self.running = running


def test_queue_gauges_from_the_directory(tmp_path):
    clock = task.Clock()
    clock.advance(1_000_500)
    gauges = metrics.QueueGauges(str(tmp_path / "queue"), clock)
    m = metrics.Metrics()
    m.registry.register(gauges)
    assert value(m, "upasmail_queue_messages") == 0  # no directory yet: empty
    assert value(m, "upasmail_queue_oldest_age_seconds") == 0
    make_job(str(tmp_path / "queue"), "1000000.0123456789ab")
    make_job(str(tmp_path / "queue"), "1000400.0123456789ac")
    assert value(m, "upasmail_queue_messages") == 2
    assert value(m, "upasmail_queue_oldest_age_seconds") == 500


def test_queue_gauges_from_a_running_runners_index(tmp_path):
    clock = task.Clock()
    clock.advance(2_000_000)
    make_job(str(tmp_path / "queue"), "1000000.0123456789ab")  # not what the runner knows
    runner = RunningIndex(["1999990.0123456789ab", "1999000.0123456789ac", "1999999.0123456789ad"])
    m = metrics.Metrics()
    m.registry.register(metrics.QueueGauges(str(tmp_path / "queue"), clock, runner))
    assert value(m, "upasmail_queue_messages") == 3
    assert value(m, "upasmail_queue_oldest_age_seconds") == 1000
    runner.running = False  # stopped: the directory is the truth
    assert value(m, "upasmail_queue_messages") == 1


# -- the resource --------------------------------------------------------------------

def render(registry, path=b"/metrics", accept=None, args=None):
    request = DummyRequest([b"metrics"])
    if accept:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    request.args = args or {}
    body = metrics.MetricsResource(registry).render_GET(request)
    return request.responseHeaders.getRawHeaders(b"content-type")[0], body


def test_the_resource_speaks_prometheus_text_and_openmetrics():
    m = metrics.Metrics()
    m(session("a", event="smtpd.connect"))
    kind, body = render(m.registry)
    assert kind.startswith(b"text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["upasmail_connections_open"].samples[0].value == 1
    kind, body = render(m.registry, accept="application/openmetrics-text; version=1.0.0")
    assert kind.startswith(b"application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    _, body = render(m.registry, args={b"name[]": [b"upasmail_connections_open"]})
    assert re.findall(rb"^upasmail_\w+", body, re.M) == [b"upasmail_connections_open"]


# -- the option ----------------------------------------------------------------------

def parse(*args):
    options = tap_smtpd.Options()
    options.parseOptions(["--root", "/nonexistent/mail", *args])
    return options


def test_metrics_endpoint_that_does_not_parse_is_a_usage_error():
    with pytest.raises(usage.UsageError, match=r"^--metrics tcp:notaport: "):
        parse("--metrics", "tcp:notaport")


def test_metrics_without_prometheus_client_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "prometheus_client", None)
    with pytest.raises(SystemExit, match=r"--metrics needs prometheus_client"):
        parse("--metrics", "tcp:0")
    assert parse()["metrics"] is None  # the server itself does not need it


# -- the service, in-process ---------------------------------------------------------

class MetricsServiceTests(unittest.TestCase):
    def test_observes_its_publisher_only_while_running(self):
        from twisted.internet import endpoints, reactor

        publisher = LogPublisher()
        counts = metrics.Metrics()
        svc = metrics.MetricsService(
            counts, endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), publisher)
        svc.startService()
        Logger(observer=publisher).info("connect", event="smtpd.connect", session="a")
        d = svc.stopService()

        def stopped(_):
            Logger(observer=publisher).info("connect", event="smtpd.connect", session="b")
            self.assertEqual(value(counts, "upasmail_connections_open"), 1)

        return d.addCallback(stopped)


# -- a real server, scraped with a real HTTP client ------------------------------------

def metrics_port(s):
    s.wait_for("/metrics")
    return int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", s.output()).group(1))


def scrape(port):
    """{(name, labels...): value} of one scrape (the _created samples left out)."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, *sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if not s.name.endswith("_created")}


def scrape_until(port, key, n):
    """Scrape until ``key`` reaches ``n`` (the server logs a disconnect on its own time)."""
    for _ in range(600):
        got = scrape(port)
        if got.get(key, 0) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError("%r never reached %d: %r" % (key, n, got))


def moved(before, after):
    """What changed between two scrapes (histogram buckets left out)."""
    return {k: after[k] - before.get(k, 0) for k in after
            if after[k] != before.get(k, 0) and not k[0].endswith("_bucket")}


OUTSIDER = ("127.0.0.2", 0)  # not in ournets


def test_counters_move_by_exactly_the_traffic_sent(server, tls_files):
    s = server("--metrics", "tcp:0:interface=127.0.0.1", "--passwd", str(tls_files / "passwd"),
               "-c", str(tls_files / "both.pem"),
               "--auth-fail-delay", "0", "--tarpit-unit", "0", "--no-queue-runner")
    port = metrics_port(s)
    before = scrape(port)
    assert before[("upasmail_connections_open",)] == 0
    body = b"Subject: counted\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
        c.starttls(context=client_context(tls_files))
        assert c.sendmail("alice@example.org", ["bob"], body) == {}  # trusted: local
        assert c.sendmail("alice@example.org", ["x@far.example"], body) == {}  # queued
    with smtplib.SMTP("127.0.0.1", s.port, source_address=OUTSIDER) as c:
        c.ehlo("client.sender.net")
        c.mail("alice@example.org")
        assert c.rcpt("x@foreign.example")[0] == 550  # no relaying for outsiders
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", "wrong one")  # CRAM-MD5
        mid = scrape(port)
        assert mid[("upasmail_connections_open",)] == 1  # this one
    after = scrape_until(port, ("upasmail_connections_total", ("end", "quit")), 3)
    sizes = [int(n) for n in re.findall(r"accepted from=.* size=(\d+)", s.output())]
    assert len(sizes) == 2 and all(n > len(body) for n in sizes)
    assert moved(before, after) == {
        ("upasmail_connections_total", ("end", "quit")): 3,
        ("upasmail_messages_total", ("class", "2xx"), ("result", "accepted")): 2,
        ("upasmail_accepted_recipients_total",): 2,
        ("upasmail_received_bytes_total",): sum(sizes),
        ("upasmail_refusals_total", ("class", "5xx"), ("command", "RCPT"), ("reason", "relay")): 1,
        ("upasmail_refusals_total", ("class", "5xx"), ("command", "AUTH"),
         ("reason", "auth-failed")): 1,
        ("upasmail_auth_total", ("mechanism", "CRAM-MD5"), ("result", "failure")): 1,
        ("upasmail_tls_sessions_total", ("status", "started")): 1,
        ("upasmail_deliveries_total", ("relay", "local"), ("status", "sent")): 1,
        ("upasmail_deliveries_total", ("relay", "queue"), ("status", "queued")): 1,
        # both messages' files made durable, in one fsync batch or two
        ("upasmail_store_fsync_messages_total",): 2,
        ("upasmail_store_fsync_seconds_count",): after[("upasmail_store_fsync_seconds_count",)],
        ("upasmail_store_fsync_seconds_sum",): after[("upasmail_store_fsync_seconds_sum",)],
        ("upasmail_store_seconds_count",): 2,  # each accepted message's dot to 250
        ("upasmail_store_seconds_sum",): after[("upasmail_store_seconds_sum",)],
        # no queue runner here: read from the directory
        ("upasmail_queue_messages",): 1,
        ("upasmail_queue_oldest_age_seconds",): after[("upasmail_queue_oldest_age_seconds",)],
    }
    assert after[("upasmail_connections_open",)] == 0
    assert 1 <= after[("upasmail_store_fsync_seconds_count",)] <= 2
    assert after[("upasmail_queue_oldest_age_seconds",)] < 60


def test_a_port_in_use_stops_startup(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = twistd("-n", "--pidfile=", "upas-smtpd", "--listen", "tcp:0:interface=127.0.0.1",
                   "--root", str(tmp_path / "mail"),
                   "--metrics", "tcp:%d:interface=127.0.0.1" % port)
    assert r.returncode == 1
    assert "upas-smtpd: cannot listen on 127.0.0.1:%d: address already in use" % port \
        in r.stdout + r.stderr


def test_with_workers_the_main_endpoint_counts_every_process(server):
    from test_workers import logged_by, worker_pids

    s = server("--workers", "2", "--tarpit-unit", "0",
               "--metrics", "tcp:0:interface=127.0.0.1")
    worker_pids(s)
    port = metrics_port(s)
    before = scrape(port)
    sent = 0
    for _ in range(300):  # the kernel chooses the process; bounded
        with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
            assert c.sendmail("alice@example.org", ["bob"], b"Subject: n\r\n\r\nn\r\n") == {}
        sent += 1
        if sent >= 4 and set(logged_by(s, " accepted from=")) == {"main", "w1"}:
            break
    assert set(logged_by(s, " accepted from=")) == {"main", "w1"}, s.output()
    after = scrape_until(port, ("upasmail_connections_total", ("end", "quit")), sent)
    change = moved(before, after)
    assert change[("upasmail_messages_total", ("class", "2xx"), ("result", "accepted"))] == sent
    assert change[("upasmail_connections_total", ("end", "quit"))] == sent
    assert change[("upasmail_deliveries_total", ("relay", "local"), ("status", "sent"))] == sent
    assert change[("upasmail_store_fsync_messages_total",)] == sent
    assert after[("upasmail_connections_open",)] == 0
    # one endpoint: the worker did not bind one of its own
    assert s.output().count("metrics on http://") == 1


def test_the_queue_runners_deliveries_and_its_index(server):
    # far.example's MX is 127.0.0.2: a second server there takes the mail
    sink = server("--listen", "tcp:0:interface=127.0.0.2", "--no-queue-runner", where="sink")
    s = server("--metrics", "tcp:0:interface=127.0.0.1", "--mx-port", str(sink.port))
    port = metrics_port(s)
    before = scrape(port)
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
        # broken.sender.net's DNS fails: deferred, no server reached
        assert c.sendmail("alice@example.org", ["x@far.example", "y@broken.sender.net"],
                          b"Subject: out\r\n\r\nout\r\n") == {}
    after = scrape_until(port, ("upasmail_deliveries_total", ("relay", "none"),
                                ("status", "deferred")), 1)
    after = scrape_until(port, ("upasmail_deliveries_total", ("relay", "remote"),
                                ("status", "sent")), 1)
    change = moved(before, after)
    assert change[("upasmail_deliveries_total", ("relay", "queue"), ("status", "queued"))] == 2
    assert change[("upasmail_deliveries_total", ("relay", "remote"), ("status", "sent"))] == 1
    assert change[("upasmail_deliveries_total", ("relay", "none"), ("status", "deferred"))] == 1
    # the job waits for its deferred recipient: one message, from the runner's index
    assert after[("upasmail_queue_messages",)] == 1
    assert 0 <= after[("upasmail_queue_oldest_age_seconds",)] < 60
