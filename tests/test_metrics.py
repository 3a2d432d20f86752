"""``--metrics``: Prometheus counts from the log events, served by twisted.web."""

import os
import re
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

from test_twistd import Server, dns_port, server  # noqa: F401
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
    # none of them said how it ended
    assert m.registry.get_sample_value("upasmail_connections_total", {"end": "lost"}) is None


def test_messages_bytes_and_refusals_by_reason_and_class():
    m = metrics.Metrics()
    m(session("a", event="smtpd.accepted", code=250, size=1200, nrcpt=2,
              queue_id="1.000000000001"))
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
    assert value(m, "upasmail_deliveries_total", status="bounced", relay="remote") == 1
    assert value(m, "upasmail_deliveries_total", status="expired", relay="remote") == 1
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
