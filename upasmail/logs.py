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

Every line also names its event (``event``) and carries its fields: the
catalogue is docs/logging.rst.  ``LogService`` adds the JSON log
(``--log-json``), keeps debug events out of twistd's text log, writes
plain lines for journald, and reopens the log files on SIGUSR1 (logrotate).
``DNSNoise`` is a ``FilteringLogObserver`` predicate that drops the four
lines ``twisted.names`` writes for every UDP query, and nothing else.
"""

import os
import re
import secrets
import signal
import sys

from twisted.application.service import Service
from twisted.logger import (FileLogObserver, FilteringLogObserver, Logger, LogLevel,
                            PredicateResult, globalLogPublisher)

# how a line is written: in logformat; these names stay importable from here
from .logformat import (  # noqa: F401
    ClassicText, event_fields, event_text, faster_text_observer, format_event, journal_line,
    json_line)

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


def under_journald(out, environ=os.environ):
    """Is ``out`` systemd's journal stream (``JOURNAL_STREAM`` = its dev:inode)?"""
    stream = environ.get("JOURNAL_STREAM")
    try:
        st = os.fstat(out.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return bool(stream) and stream == "%d:%d" % (st.st_dev, st.st_ino)


class LogFileError(Exception):
    """A log file that cannot be opened (a start-up error, one line)."""


class ReopenableFile:
    """A log file written at its path, reopened there on demand (logrotate)."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, text):
        self._file.write(text)

    def flush(self):
        self._file.flush()

    def reopen(self):
        old, self._file = self._file, open(self.path, "a", encoding="utf-8")
        old.close()

    def close(self):
        self._file.close()


def info_and_up(observer):
    """``observer`` without the debug events.  Not a FilteringLogObserver
    with a LogLevelFilterPredicate: this runs for every event twistd logs,
    and those cost microseconds each."""
    debug = LogLevel.debug

    def observe(event):
        if event.get("log_level") is not debug:
            observer(event)

    return observe


class LogService(Service):
    """The log as an administrator wants it, once twistd has set up its own.

    * twistd's text observers (``FileLogObserver``) see no debug events
      (``store.sync``: one per fsync batch, for the metrics); under
      journald, the one on standard output writes plain lines instead.
    * ``json_path``: every event as a JSON line (``-``: standard output).
    * SIGUSR1 reopens twistd's log file and the JSON file at their paths
      (logrotate renames them first).  twistd's own SIGUSR1 would rename
      the file itself, and it renames it at 1 MB too: both fight
      logrotate, so its size rotation is turned off.  twistd installs its
      handler as logging starts, after the services are built, hence
      here, at start.

    twistd's observers are reached in ``LogPublisher._observers``, as
    ``QuietDNS`` does: ``twisted.logger`` has no public way to it.
    """

    def __init__(self, json_path=None, publisher=globalLogPublisher, environ=os.environ,
                 signals=signal, reactor=None, stdout=None):
        self.json_path = json_path
        self.publisher = publisher
        self.environ = environ
        self.signals = signals
        self.reactor = reactor
        self.stdout = stdout
        self._json_file = None
        self._json_observer = None
        self._replaced = []  # (twistd's observer, ours in its place)
        self._log_files = []  # twistd's LogFile, reopened on SIGUSR1
        self._previous_handler = None

    def privilegedStartService(self):
        # before twistd gives up root (--uid), as its own log file is opened
        if self.json_path not in (None, "-"):
            try:
                self._json_file = ReopenableFile(self.json_path)
            except OSError as e:
                raise LogFileError("--log-json %s: %s" % (self.json_path, e.strerror or e))
        Service.privilegedStartService(self)

    def startService(self):
        if self.json_path is not None and self._json_file is None:
            if self.json_path == "-":
                # the real one: twistd has made sys.stdout a file that logs
                self._json_file = self.stdout or sys.__stdout__
            else:  # not started through twistd's privileged start
                self._json_file = ReopenableFile(self.json_path)
        Service.startService(self)
        for observer in list(self.publisher._observers):
            out = getattr(observer, "_outFile", None)
            if not isinstance(observer, FileLogObserver) or out is None:
                continue
            if hasattr(out, "reopen") and hasattr(out, "rotateLength"):
                out.rotateLength = None  # logrotate's job now
                self._log_files.append(out)
            if under_journald(out, self.environ):
                mine = info_and_up(FileLogObserver(out, journal_line))
            else:
                mine = info_and_up(faster_text_observer(observer) or observer)
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(mine)
            self._replaced.append((observer, mine))
        if self._json_file is not None:
            self._json_observer = info_and_up(FileLogObserver(self._json_file, json_line))
            self.publisher.addObserver(self._json_observer)
        self._previous_handler = self.signals.signal(self.signals.SIGUSR1, self._sigusr1)

    def _sigusr1(self, signum, frame):
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callFromThread(self.reopen)

    def reopen(self):
        """Reopen every log file at its path: logrotate has moved it away."""
        log = Logger(namespace="smtpd", observer=self.publisher)
        files = list(self._log_files)
        if isinstance(self._json_file, ReopenableFile):
            files.append(self._json_file)
        for f in files:
            try:
                f.reopen()
            except OSError as e:  # logrotate's "create" failed, say: say so, go on
                log.error("cannot reopen {path}: {err}", path=f.path, err=e.strerror or e,
                          event="log.reopen_failed")
        log.info("log files reopened", event="log.reopened")

    def stopService(self):
        Service.stopService(self)
        if self._previous_handler is not None:  # None: not set from Python
            self.signals.signal(self.signals.SIGUSR1, self._previous_handler)
        self._previous_handler = None
        self._log_files = []
        for observer, mine in self._replaced:
            self.publisher.removeObserver(mine)
            self.publisher.addObserver(observer)
        self._replaced = []
        if self._json_observer is not None:
            self.publisher.removeObserver(self._json_observer)
            self._json_observer = None
        if isinstance(self._json_file, ReopenableFile):
            self._json_file.close()
        self._json_file = None
