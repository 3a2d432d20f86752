"""Log lines that can be joined, and a log without Twisted's DNS chatter.

Every line a smtpd session emits carries a ``session`` field and starts
with it (``SessionLogger``); the lines about one message also carry
``queue_id`` (the spool/queue name ``store.new_id`` gave it) and, when the
header has one, ``message_id``.  The queue runner names its jobs with the
same queue id, so one ``grep`` joins an AUTH line, the acceptance and the
relay attempts::

    3f9a0c1b2d4e: connect from 127.0.0.1
    3f9a0c1b2d4e: authenticated alice from 127.0.0.1
    3f9a0c1b2d4e: 1764444444.a1b2c3d4e5f6: message-id=<x@example.org>
    1764444444.a1b2c3d4e5f6: to=far.example!bob relay=(...) status=sent (...)

A JSON observer (``twisted.logger.jsonFileLogObserver``) gets the ids as
fields.  ``DNSNoise`` is a ``FilteringLogObserver`` predicate that drops
the four lines ``twisted.names`` writes for every UDP query, and nothing
else.
"""

import re
import secrets

from twisted.application.service import Service
from twisted.logger import FilteringLogObserver, Logger, PredicateResult, globalLogPublisher

NAMESPACE = "smtpd"


def new_session_id():
    """12 hex digits: short, and unlikely to repeat across restarts."""
    return secrets.token_hex(6)


def printable(text, limit=200):
    """Header text as it may appear in one log line: no controls, bounded."""
    text = " ".join(str(text).split())
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class SessionLogger(Logger):
    """A ``Logger`` whose events name the session (and the message; with no
    session, only the queued message: the client delivering a job).

    The ids are event fields (``session``, ``queue_id``, ``message_id``)
    and a prefix of the format, so text logs show them too.
    """

    def __init__(self, session, queue_id=None, message_id=None, namespace=NAMESPACE,
                 observer=None):
        Logger.__init__(self, namespace=namespace, observer=observer)
        self.session = session
        self.queue_id = queue_id
        self.message_id = message_id

    def forMessage(self, queue_id, message_id=None):
        """The logger for lines about one message of this session."""
        return SessionLogger(self.session, queue_id, message_id, self.namespace,
                             self.observer)

    def emit(self, level, format=None, **kwargs):
        prefix = ""
        if self.session is not None:  # None: lines about a queued job alone
            prefix = "{session}: "
            kwargs["session"] = self.session
        if self.queue_id is not None:
            prefix += "{queue_id}: "
            kwargs["queue_id"] = self.queue_id
            if self.message_id is not None:
                kwargs["message_id"] = self.message_id
        Logger.emit(self, level, prefix + (format or ""), **kwargs)


_DNS_PORT_OPENED = re.compile(r"DNSDatagramProtocol starting on (\d+)\Z")
_DNS_PROTOCOL = re.compile(r"(?:Starting|Stopping) protocol "
                           r"<twisted\.names\.dns\.DNSDatagramProtocol object at 0x[0-9a-f]+>\Z")
_UDP_PORT_CLOSED = re.compile(r"\(UDP Port (\d+) Closed\)\Z")


class DNSNoise:
    """Predicate for ``FilteringLogObserver``: no for the per-query DNS lines.

    ``twisted.names`` opens a UDP port per query, and Twisted logs its
    start, the protocol's start and stop, and the port's closing.  A
    closing port is only DNS noise if it was opened by the DNS protocol,
    so the predicate remembers those port numbers.
    """

    def __init__(self):
        self._ports = set()

    def __call__(self, event):
        if event.get("log_namespace") != "log_legacy":
            return PredicateResult.maybe
        text = event.get("log_text") or ""
        m = _DNS_PORT_OPENED.match(text)
        if m:
            self._ports.add(m.group(1))
            return PredicateResult.no
        if _DNS_PROTOCOL.match(text):
            return PredicateResult.no
        m = _UDP_PORT_CLOSED.match(text)
        if m and m.group(1) in self._ports:
            self._ports.discard(m.group(1))
            return PredicateResult.no
        return PredicateResult.maybe


class QuietDNS(Service):
    """While running, every observer of ``publisher`` sees events through DNSNoise.

    twistd installs its log observer itself and ``twisted.logger`` has no
    public way to filter what reaches it, so the observers present at start
    are wrapped in place (``LogPublisher._observers``) and unwrapped at stop.
    """

    def __init__(self, publisher=globalLogPublisher):
        self.publisher = publisher
        self._wrapped = []

    def startService(self):
        Service.startService(self)
        predicate = DNSNoise()
        for observer in list(self.publisher._observers):
            wrapper = FilteringLogObserver(observer, [predicate])
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(wrapper)
            self._wrapped.append((observer, wrapper))

    def stopService(self):
        Service.stopService(self)
        for observer, wrapper in self._wrapped:
            self.publisher.removeObserver(wrapper)
            self.publisher.addObserver(observer)
        self._wrapped = []
