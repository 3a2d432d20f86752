"""Prometheus metrics, counted from the log events and served by twisted.web.

``--metrics ENDPOINT`` (``tcp:9125:interface=127.0.0.1``) serves
``/metrics`` in the server's own reactor.  Nothing in the server counts:
``EventCounter`` is a ``twisted.logger`` observer of the stable events
(docs/logging.rst), so a count and the log lines it comes from can never
disagree.  With ``--workers N`` each worker's events reach the main
process's log whole (``workers.log_relay``), so the main process's
observer sees every process's events and its endpoint reports the sum;
only the main process serves.  What is not an event (the queue's length
and the age of its oldest message) is read when scraped (``QueueGauges``):
from the queue runner's index when it runs in this process, else from the
queue directory.

Every metric lives in a registry of our own (``Metrics.registry``), never
prometheus_client's process-global one, so an application can run two
servers and tests see only their own counts.

prometheus_client is an optional dependency (the ``metrics`` extra): this
module is imported only when metrics are asked for.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.application import service
from twisted.logger import Logger, globalLogPublisher
from twisted.web import resource, server

from .runq import queue as outbound
from .smtpd.listening import ListeningService

log = Logger(namespace="smtpd")

PREFIX = "upasmail"
# fsync latencies: a batch's fsync on a disk with a cache takes
# well under a millisecond, on a busy spinning disk tens of milliseconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


# Every label's values, from docs/logging.rst.  Anything else (a client's
# made-up command word, an event of a newer version) is counted as
# "other": no client can make the number of series grow.
OTHER = "other"
ENDS = frozenset(["quit", "lost", "timeout", "session-limit", "hangup", "banned", "limit",
                  "shutdown", "error", "state-unavailable"])
VERBS = frozenset(["", "HELO", "EHLO", "MAIL", "SEND", "SOML", "SAML", "RCPT", "DATA", "RSET",
                   "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "AUTH", "STARTTLS"])
REASONS = frozenset(["relay", "ratify", "helo", "greylist", "tarpit", "auth-required",
                     "auth-failed", "auth-throttled", "auth-error", "size", "smuggling",
                     "syntax", "sequence", "unknown-user", "sender-check", "recipients",
                     "busy", "tls", "spam", "loop", "store", "local-error", "rate",
                     "state-unavailable"])
CLASSES = frozenset(["2xx", "4xx", "5xx"])
DELIVERY_STATUSES = frozenset(["sent", "queued", "deferred", "bounced", "expired"])
# queue.delivery's relay names the server for remote deliveries; as a
# label only its kind (a label per server would grow without bound).
# "none": no server was reached (no MX, none answered)
RELAY_KINDS = frozenset(["local", "mailer", "queue", "none"])
BOUNCE_KINDS = frozenset(["sender", "postmaster"])
TLS_STATUSES = frozenset(["started", "failed", "unavailable"])
PROXY_STATUSES = frozenset(["refused", "invalid", "timeout", "limit"])
AUTH_RESULTS = frozenset(["success", "failure", "throttled", "tempfail"])
MECHANISMS = frozenset(["PLAIN", "LOGIN", "CRAM-MD5"])
RATE_KINDS = frozenset(["connection", "message", "recipient"])
# the store's facts a check could not have (state.unavailable's ``fact``)
STATE_FACTS = frozenset(["granted", "connection_rate", "connection_slot", "message_rate",
                         "recipient_rate", "greylist"])


def closed(value, values):
    return value if value in values else OTHER


def reply_class(code):
    """``2xx``, ``4xx`` or ``5xx`` for a reply code (an int or its text)."""
    return closed("%sxx" % str(code)[:1], CLASSES)


def relay_kind(relay):
    return relay if relay in RELAY_KINDS else "remote"


def queued_at(qid):
    """When a job was queued: its id starts with the seconds (``store.new_id``)."""
    return int(qid.split(".", 1)[0])


class Metrics:
    """The registry, and the ``twisted.logger`` observer that counts into it.

    Call it with an event (it is an observer); events without a stable
    ``event`` name, or with one it does not count, are ignored.
    """

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge(
            PREFIX + "_connections_open", "SMTP connections open now", registry=r)
        self.connections = Counter(
            PREFIX + "_connections", "SMTP connections by how they ended "
            "(smtpd.disconnect's end)", ["end"], registry=r)
        self.messages = Counter(
            PREFIX + "_messages", "Messages accepted (250 after DATA) and refused "
            "(a refused DATA or final dot), by reply class", ["result", "class"], registry=r)
        self.refusals = Counter(
            PREFIX + "_refusals", "Refused commands and messages (every 4xx and 5xx "
            "reply), by command, policy reason and reply class",
            ["command", "reason", "class"], registry=r)
        self.received_bytes = Counter(
            PREFIX + "_received_bytes", "Bytes of the messages accepted, as stored",
            registry=r)
        self.recipients = Counter(
            PREFIX + "_accepted_recipients", "Recipients of the messages accepted",
            registry=r)
        self.fsync_seconds = Histogram(
            PREFIX + "_store_fsync_seconds", "How long a store batch's fsyncs took "
            "(one batch holds every message finished meanwhile)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.store_seconds = Histogram(
            PREFIX + "_store_seconds", "From a message's final dot to its 250: "
            "storing it durably in every mailbox and queue file it goes to",
            buckets=LATENCY_BUCKETS, registry=r)
        self.fsync_messages = Counter(
            PREFIX + "_store_fsync_messages", "Messages made durable by the store's "
            "fsync batches", registry=r)
        self.deliveries = Counter(
            PREFIX + "_deliveries", "Delivery tries per recipient, by status and by "
            "where to (local mailbox, mailer, queue, remote server)",
            ["status", "relay"], registry=r)
        self.bounces = Counter(
            PREFIX + "_bounces", "Non-delivery notifications made, by who gets them",
            ["kind"], registry=r)
        self.tls = Counter(
            PREFIX + "_tls_sessions", "STARTTLS and implicit TLS sessions, by status "
            "(started, failed, unavailable)", ["status"], registry=r)
        self.auth = Counter(
            PREFIX + "_auth", "AUTH exchanges by result (success, failure, throttled, "
            "tempfail) and mechanism", ["result", "mechanism"], registry=r)
        self.rate_limited = Counter(
            PREFIX + "_rate_limited", "Connections, MAIL and RCPT commands refused by the "
            "per-client rate limits (--conn-rate, --msg-rate, --rcpt-rate), by kind",
            ["kind"], registry=r)
        self.state_unavailable = Counter(
            PREFIX + "_state_unavailable", "Checks answered with a temporary failure because "
            "the shared state could not answer, by the fact they needed", ["fact"],
            registry=r)
        self.proxy_closed = Counter(
            PREFIX + "_proxy_closed", "Connections to a PROXY listener closed before "
            "their header was read (smtpd.proxy), by status", ["status"], registry=r)
        self.errors = Counter(
            PREFIX + "_errors", "Unexpected errors logged with a traceback", registry=r)
        self._children = {}  # (metric, label values) -> its child: labels() is slow
        # session -> the worker that has it (None: this process): the open
        # connections, so that a worker that dies takes its own with it
        self.sessions = {}
        self.handlers = {
            "smtpd.connect": self.connected,
            "smtpd.disconnect": self.disconnected,
            "smtpd.accepted": self.accepted,
            "smtpd.refused": self.refused,
            "store.sync": self.synced,
            "queue.delivery": self.delivered,
            "queue.bounce": self.bounced,
            "smtpd.tls": self.tls_session,
            "smtpd.auth": self.authenticated,
            "smtpd.rate": self.rate,
            "state.unavailable": self.state,
            "smtpd.proxy": self.proxy_refused,
            "worker.died": self.worker_gone,
            "worker.stopped": self.worker_gone,
            "error": self.error,
        }

    def __call__(self, event):
        handler = self.handlers.get(event.get("event"))
        if handler is not None:
            handler(event)

    def _count(self, metric, *labels, amount=1):
        """``metric.labels(*labels).inc(amount)``, the child looked up once."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[metric, labels] = metric.labels(*labels)
        child.inc(amount)

    def _open(self):
        self.connections_open.set(len(self.sessions))

    def connected(self, event):
        self.sessions[event.get("session")] = event.get("worker")
        self._open()

    def disconnected(self, event):
        self._count(self.connections, closed(event.get("end"), ENDS))
        self.sessions.pop(event.get("session"), None)
        self._open()

    def worker_gone(self, event):
        """A worker's connections went with it, without their disconnect lines."""
        number = event.get("n")
        if number is None:  # a worker's own word that it stops: its sessions end on their own
            return
        self.sessions = {s: w for s, w in self.sessions.items() if w != number}
        self._open()

    def accepted(self, event):
        self._count(self.messages, "accepted", reply_class(event.get("code", 250)))
        self.received_bytes.inc(event.get("size") or 0)
        self.recipients.inc(event.get("nrcpt") or 0)
        if event.get("store_seconds") is not None:
            self.store_seconds.observe(event["store_seconds"])

    def refused(self, event):
        cls = reply_class(event.get("code", ""))
        command = closed(event.get("command") or "", VERBS)
        if command == "DATA":
            self._count(self.messages, "refused", cls)
        self._count(self.refusals, command, closed(event.get("reason"), REASONS), cls)

    def synced(self, event):
        self.fsync_seconds.observe(event.get("seconds") or 0.0)
        self.fsync_messages.inc(event.get("messages") or 0)

    def delivered(self, event):
        self._count(self.deliveries, closed(event.get("status"), DELIVERY_STATUSES),
                    relay_kind(event.get("relay")))

    def bounced(self, event):
        self._count(self.bounces, closed(event.get("kind"), BOUNCE_KINDS))

    def tls_session(self, event):
        self._count(self.tls, closed(event.get("status"), TLS_STATUSES))

    def proxy_refused(self, event):
        self._count(self.proxy_closed, closed(event.get("status"), PROXY_STATUSES))

    def authenticated(self, event):
        self._count(self.auth, closed(event.get("result"), AUTH_RESULTS),
                    closed(event.get("mechanism"), MECHANISMS))

    def rate(self, event):
        self._count(self.rate_limited, closed(event.get("kind"), RATE_KINDS))

    def state(self, event):
        self._count(self.state_unavailable, closed(event.get("fact"), STATE_FACTS))

    def error(self, event):
        self.errors.inc()


class QueueGauges:
    """A collector: the queue's length and its oldest job's age, when scraped.

    ``runner`` (a running ``QueueRunner``) answers from its index, with
    no I/O; without one, the queue directory is listed (one ``listdir``).
    """

    def __init__(self, queue_dir, clock, runner=None):
        self.queue = outbound.Queue(queue_dir)
        self.clock = clock
        self.runner = runner

    def ids(self):
        if self.runner is not None and self.runner.running:
            return list(self.runner.known)
        return self.queue.ids()

    def collect(self):
        ids = self.ids()
        length = GaugeMetricFamily(PREFIX + "_queue_messages",
                                   "Messages in the outbound queue")
        length.add_metric([], len(ids))
        age = GaugeMetricFamily(PREFIX + "_queue_oldest_age_seconds",
                                "Age of the oldest message in the outbound queue "
                                "(0 when it is empty)")
        oldest = min(map(queued_at, ids), default=None)
        age.add_metric([], 0 if oldest is None else max(self.clock.seconds() - oldest, 0))
        return [length, age]


class MetricsResource(resource.Resource):
    """``/metrics``: the registry in the format the scraper asks for (Accept).

    prometheus_client's own ``MetricsResource`` runs the exposition in the
    reactor's thread pool; ours renders in the reactor thread, where the
    queue runner's index may be read safely.  ``name[]`` parameters
    restrict the output to those metrics, as prometheus_client's servers do.
    """

    isLeaf = True

    def __init__(self, registry):
        resource.Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        encoder, content_type = choose_encoder(
            (request.getHeader("accept") or "").strip())
        registry = self.registry
        names = request.args.get(b"name[]")
        if names:
            registry = registry.restricted_registry([n.decode("utf-8", "replace")
                                                     for n in names])
        request.setHeader("content-type", content_type)
        return encoder(registry)


class QuietSite(server.Site):
    """A site that writes no access-log line per scrape (one every 15 s)."""

    noisy = False

    def log(self, request):
        pass


def site(registry):
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return QuietSite(root)


class MetricsService(service.MultiService):
    """The observer on ``publisher`` while running, and the web endpoint.

    The endpoint is bound in ``privilegedStartService`` (before twistd
    drops privileges) and a port that cannot be bound stops start-up, as
    for the SMTP listener.
    """

    def __init__(self, metrics, endpoint, publisher=globalLogPublisher):
        service.MultiService.__init__(self)
        self.metrics = metrics
        self.publisher = publisher
        self.server = ListeningService(endpoint, site(metrics.registry))
        self.server.setServiceParent(self)

    def _listening(self, port):
        where = port.getHost()
        log.info("metrics on http://{host}:{port}/metrics", host=where.host, port=where.port)
        return port

    def startService(self):
        self.publisher.addObserver(self.metrics)
        service.MultiService.startService(self)
        # bound by now: in privilegedStartService under twistd, else just now
        self.server.listening.addCallback(self._listening)

    def stopService(self):
        self.publisher.removeObserver(self.metrics)
        return service.MultiService.stopService(self)
