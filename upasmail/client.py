"""upas smtp: deliver one message to one destination (smtp.c), on Twisted.

``deliver(...)`` is the library API used by the ``upas-smtp`` command and
the outbound queue.  It fires (never fails) with a ``Result``: upas's
status string (``""`` delivered, ``Retry, Temporary Failure``,
``Permanent Failure`` or another text upas would exit with) and its
``Outcome`` (delivered / retry / give up, with the exit code), one
``RecipientResult`` per recipient (delivered / temporary / permanent,
with the server's reply), and the lines upas would print on stderr.

The conversation follows spec upas-behaviour.md §2.5-2.8: optional
implicit TLS (``-t``) or NOOP first (``-A``); greeting; EHLO, HELO when
EHLO gets a 5xx; STARTTLS when offered and ``-s`` (no plaintext fallback
once started: any failure is permanent; with thumbprints, only listed
certificates pass); AUTH (``-a``: only encrypted, or with ``-i``;
CRAM-MD5, else LOGIN, else PLAIN); MAIL; every RCPT; DATA only when some
recipient was accepted and no failure was temporary-only; QUIT.  Each
phase has upas's time limit (units of 60 s, or 10 s with ``-p``) on the
injected clock.

Why not ``twisted.mail.smtp.ESMTPSender``: it stuffs dots per 16 KiB chunk
(a line at a chunk boundary is not stuffed: message smuggling), reads
replies injected after a STARTTLS 220 as the post-TLS EHLO reply, prefers
CRAM-MD5 > LOGIN > PLAIN with its own PLAIN retry, fails the whole
transaction when some recipients are refused, has no per-phase timeouts,
no HELO-after-EHLO-5xx rule, no ``-A``/``-p``, and retries by itself
(twisted-notes.md §2.2, §5.13-16).  So the wire is a ``LineOnlyReceiver``
here, the message is converted once for the whole stream
(``convert.Transparency``), and connections use ``connectTCP``/
``connectSSL`` by IP after our own MX lookup (``mxdial``).
"""

import base64
import dataclasses
import enum
import hashlib
import hmac
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from twisted.internet import defer, error, protocol, ssl
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from . import convert, mxdial, replies
from .factotum import NoCredentials
from .logs import SessionLogger, printable
from .pipemsg import plan9_date

LOG_LIMIT = 2000  # characters of one field in a log line (a long multi-line reply)


class ClientLogger(SessionLogger):
    """The client's log: every text field kept to one line, and, when the
    queue drives the delivery, the job's queue id in front (``<qid>: ...``),
    as on the queue's own lines.

    Field values come from the network (replies) and from the command line
    or the queue (addresses, dial strings): a line break in one must never
    start a line of its own in the log.
    """

    def __init__(self, namespace, queue_id=None):
        SessionLogger.__init__(self, None, queue_id, namespace=namespace)

    def emit(self, level, format=None, **kwargs):
        for key, value in kwargs.items():
            if isinstance(value, str) and not key.startswith("log_"):
                kwargs[key] = printable(value, LOG_LIMIT)
        kwargs.setdefault("event", self.namespace)  # smtp.fail: every line is one
        SessionLogger.emit(self, level, format, **kwargs)

# upas smtp's statuses, documented API (docs/embedding.rst)
RETRY, PERMANENT = replies.RETRY, replies.PERMANENT
EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 64, 69, 75
DELIVERED, TEMPORARY, PERMANENT_FAILURE, ACCEPTED, NOT_SENT = (
    replies.DELIVERED, replies.TEMPORARY, replies.PERMANENT_FAILURE, replies.ACCEPTED,
    replies.NOT_SENT)


class Kind(enum.Enum):
    """How a delivery ended, as far as the caller must act on it."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give up"


_EXIT_CODES = {Kind.DELIVERED: EX_OK, Kind.RETRY: EX_TEMPFAIL, Kind.GIVE_UP: EX_UNAVAILABLE}


@dataclass(frozen=True)
class Outcome:
    """The end of one delivery: its kind decides, the texts are upas's.

    ``status`` is the line upas smtp exits with (``""``, ``RETRY``,
    ``PERMANENT``, or another text it gives up with, such as
    ``No supported AUTH method``); ``detail`` is why (upas's last stderr
    line, else the status).  The kind is set where the ending is known (a
    reply's class, a dial error's permanence), never read back from a text.
    """

    kind: Kind
    status: str = ""
    detail: str = ""

    @classmethod
    def delivered(cls):
        return cls(Kind.DELIVERED)

    @classmethod
    def retry(cls):
        return cls(Kind.RETRY, RETRY, RETRY)

    @classmethod
    def give_up(cls, status=PERMANENT):
        return cls(Kind.GIVE_UP, status, status)

    @classmethod
    def of_reply(cls, reply):
        """A reply that is not the one wanted: 5xx gives up, anything else retries."""
        return cls.give_up() if reply.kind == 5 else cls.retry()

    @classmethod
    def of_status(cls, status, detail=""):
        """The outcome of a status text from elsewhere (a Result built by hand,
        ``exit_code(status)``): only upas's own ``RETRY`` is worth a retry."""
        if not status:
            return cls(Kind.DELIVERED, "", detail)
        return cls(Kind.RETRY if status == RETRY else Kind.GIVE_UP, status, detail or status)

    def because(self, detail):
        """The same ending, with upas's last stderr line as its detail."""
        return dataclasses.replace(self, detail=detail or self.status)

    @property
    def exit_code(self):
        return _EXIT_CODES[self.kind]

    @property
    def recipient_status(self):
        """What a recipient without its own answer gets from this ending."""
        return {Kind.DELIVERED: DELIVERED, Kind.RETRY: TEMPORARY,
                Kind.GIVE_UP: PERMANENT_FAILURE}[self.kind]


def exit_code(status):
    """Unix exit code for a upas status string (0, 75, else 69)."""
    return Outcome.of_status(status).exit_code


@dataclass
class ClientOptions:
    """The seed's flags and what upas takes from the system.

    ``domain`` is our mail domain, ``example.org``: an undotted sysname or
    host ``gnot`` becomes ``gnot.example.org`` (EHLO, MAIL FROM, header
    addresses), and a bare recipient ``bob@example.org`` when DNS gave no
    destination domain.  upas's ``.example.org`` (the command line's form)
    means the same.  Any other value gets a dot prepended (``org``:
    ``gnot.org``), except the machine's FQDN, upas's default: a domain
    that starts with the sysname's first label and a dot
    (``gnot.example.org``) counts from its first dot, as in upas.  upas's
    ``domainify`` itself would make ``example.org`` into ``gnot.org``.
    """

    sysname: str
    host: Optional[str] = None  # -h: names addresses; default sysname
    domain: str = ""  # our mail domain; see the class docstring
    starttls: bool = False  # -s
    implicit_tls: bool = False  # -t
    auth: bool = False  # -a (implies -s)
    auth_in_clear: bool = False  # -i
    avoidant: bool = False  # -A: NOOP before the greeting
    ping: bool = False  # -p
    busted: tuple = ()  # -b MX hosts to skip
    gateway: Optional[str] = None  # -g dial string
    user: Optional[str] = None  # -u
    credentials: Optional[Callable] = None  # (server, user) -> (user, password)
    thumbprints: Optional[object] = None  # thumbprint.Thumbprints: pin TLS servers
    ipv6: bool = False  # also dial AAAA addresses
    ours: tuple = ()  # our own addresses: never a mail server
    debug: Optional[Callable] = None  # -d: gets one text line at a time
    full_name: Optional[Callable] = None  # user -> full name for an added From:
    connect_timeout: float = 10.0
    dns_timeout: float = 60.0
    tls_options: Optional[object] = None  # client TLS context factory

    @property
    def dotdomain(self):
        """``domain`` in upas's ``.example.org`` form, for ``convert.domainify``."""
        domain = self.domain
        me = self.sysname.split(".")[0].lower()
        if domain.lower().startswith(me + "."):  # our FQDN, upas's default
            domain = domain[len(me):]
        return domain if not domain or domain.startswith(".") else "." + domain

    @property
    def maildomain(self):
        """What a bare recipient gets without a destination domain from DNS."""
        return self.dotdomain[1:] or self.hostdomain

    @property
    def hostdomain(self):
        return convert.domainify(self.host or self.sysname, self.dotdomain)

    @property
    def hellodomain(self):
        return convert.domainify(self.sysname, self.dotdomain)

    @property
    def unit(self):
        return 10.0 if self.ping else 60.0

    @property
    def try_tls(self):
        return self.starttls or self.auth


@dataclass
class RecipientResult:
    address: str  # as given
    rcpt: str = ""  # as sent in RCPT TO
    status: str = NOT_SENT
    reply: str = ""


@dataclass
class Result:
    status: str
    recipients: List[RecipientResult]
    report: List[str] = field(default_factory=list)  # upas's stderr lines
    phase: str = ""
    target: Optional[object] = None
    outcome: Optional[Outcome] = None  # from the conversation; else from ``status``

    def __post_init__(self):
        if self.outcome is None:
            self.outcome = Outcome.of_status(self.status,
                                             self.report[-1] if self.report else "")
        elif self.outcome.status != self.status:
            raise ValueError("status %r is not the outcome's %r"
                             % (self.status, self.outcome.status))

    @property
    def exit_code(self):
        return self.outcome.exit_code


@dataclass
class Reply:
    code: int  # -1: not a reply (garbage, EOF)
    lines: List[str]  # as received, codes included

    @property
    def kind(self):
        return self.code // 100 if self.code > 0 else -1

    @property
    def texts(self):
        return [line[4:] for line in self.lines]

    def __str__(self):
        return "\n".join(self.lines)


class Closed(Exception):
    def __init__(self, timed_out):
        Exception.__init__(self, "timed out" if timed_out else replies.CONNECTION_CLOSED)
        self.timed_out = timed_out


class Failed(Exception):
    """Ends the conversation with its Outcome and the reply that caused it."""

    def __init__(self, outcome, reply=None, note=None):
        Exception.__init__(self, outcome.status)
        self.outcome = outcome
        self.reply = reply
        self.note = note

    @property
    def status(self):
        return self.outcome.status


@implementer(IHandshakeListener)
class Wire(basic.LineOnlyReceiver):
    """Reads replies (CRLF or LF, upas getreply) and writes commands."""

    delimiter = b"\n"
    MAX_LENGTH = 16384
    MAX_LINES = 1000

    def __init__(self, clock, debug=None):
        self.clock = clock
        self.debug = debug
        self._lines = []
        self._replies = deque()
        self._waiting = None
        self._timer = None
        self._discarding = False
        self.timed_out = False
        self.closed = False
        self._handshaken = False
        self._handshake_waiters = []
        self._close_waiters = []
        self.connected_d = None

    def connectionMade(self):
        if self.connected_d is not None:
            d, self.connected_d = self.connected_d, None
            d.callback(self)

    def dataReceived(self, data):
        try:
            basic.LineOnlyReceiver.dataReceived(self, data)
        finally:
            self._discarding = False

    def lineReceived(self, line):
        if self._discarding:
            return
        # a bare CR, an escape sequence or a NUL inside a reply is no text
        # of the server's worth keeping: it goes as "?" into the bounce,
        # stderr and the log
        text = "".join(c if c.isprintable() else "?" for c in
                       line.rstrip(b"\r").decode("utf-8", "replace"))
        if self.debug:
            self.debug("<- " + text)
        self._lines.append(text)
        if len(text) >= 3 and text[:3].isdigit() and text[3:4] in ("", " ", "-"):
            if text[3:4] == "-" and len(self._lines) < self.MAX_LINES:
                return
            code = int(text[:3])
        else:
            code = -1
        reply, self._lines = Reply(code, self._lines), []
        self._deliver(reply)

    def lineLengthExceeded(self, line):
        self._lines = []
        self._deliver(Reply(-1, [replies.REPLY_TOO_LONG]))
        self.transport.loseConnection()

    def _deliver(self, reply):
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(reply)
        else:
            self._replies.append(reply)

    def read(self):
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self.closed:
            return defer.fail(Closed(self.timed_out))
        self._waiting = defer.Deferred()
        return self._waiting

    def send(self, line, shown=None):
        if self.debug:
            self.debug("-> " + (shown if shown is not None else line))
        self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def command(self, line, shown=None):
        self.send(line, shown)
        return self.read()

    def flush_input(self):
        """After STARTTLS's 220: whatever else came in the clear is dropped."""
        self._replies.clear()
        self._lines = []
        self._buffer = b""
        self._discarding = True

    def arm(self, seconds):
        self.disarm()
        self._timer = self.clock.callLater(seconds, self._expired)

    def disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self):
        self._timer = None
        self.timed_out = True
        self.transport.abortConnection()

    def handshake(self):
        """Fires when the TLS handshake is done; fails if the connection ends first."""
        if self._handshaken:
            return defer.succeed(None)
        if self.closed:
            return defer.fail(Closed(self.timed_out))
        d = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def handshakeCompleted(self):
        self._handshaken = True
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.callback(None)

    def whenClosed(self):
        if self.closed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def connectionLost(self, reason=None):
        self.closed = True
        self.disarm()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(Closed(self.timed_out))
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.errback(Closed(self.timed_out))


class _Connector(protocol.ClientFactory):
    noisy = False  # a "Starting factory" line per attempt says nothing the log lines don't

    def __init__(self, clock, debug, d):
        self.clock = clock
        self.debug = debug
        self.d = d

    def buildProtocol(self, addr):
        p = Wire(self.clock, self.debug)
        p.factory = self
        p.connected_d = self.d
        return p

    def clientConnectionFailed(self, connector, reason):
        if not self.d.called:
            self.d.errback(reason)


def connect(reactor, clock, target, timeout, tls_options=None, debug=None):
    """Fire with a connected Wire (TLS from the start when ``tls_options``)."""
    d = defer.Deferred()
    factory = _Connector(clock, debug, d)
    if tls_options is not None:
        reactor.connectSSL(target.ip, target.port, factory, tls_options, timeout=timeout)
    else:
        reactor.connectTCP(target.ip, target.port, factory, timeout=timeout)
    return d


@implementer(IPullProducer)
class _Body:
    """Writes the converted message chunk by chunk; each chunk rearms the timer."""

    def __init__(self, wire, chunks, seconds):
        self.wire = wire
        self.chunks = chunks
        self.seconds = seconds
        self.done = defer.Deferred()
        self.size = 0

    def resumeProducing(self):
        try:
            chunk = next(self.chunks)
        except StopIteration:
            self.wire.transport.unregisterProducer()
            self.done.callback(self.size)
            return
        except Exception:
            self.wire.transport.unregisterProducer()
            self.done.errback()
            return
        self.wire.arm(self.seconds)
        self.size += len(chunk)
        self.wire.transport.write(chunk)

    def stopProducing(self):
        if not self.done.called:
            self.done.errback(Closed(self.wire.timed_out))


def _peer_der(transport):
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    from OpenSSL import crypto
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


class Conversation:
    """One SMTP conversation on a connected Wire (smtp.c main after dial)."""

    def __init__(self, wire, options, message, sender, results, destaddr, server, ddomain,
                 target, clock, queue_id=None, smtputf8=False):
        self.wire = wire
        self.o = options
        self.message = message
        self.sender = sender
        self.results = results
        self.destaddr = destaddr
        self.server = server  # the credentials key: the host of the destination
        self.ddomain = ddomain
        self.target = target
        self.clock = clock
        self.smtputf8 = smtputf8  # the message came with SMTPUTF8
        self.encrypted = False
        self.offered = None  # the EHLO keywords, once the connection is open
        self.clean = False  # the server finished the last transaction
        self.phase = "hello"
        self.outcome = None  # of the last transaction that ran to its end
        self.report = []
        self.log = ClientLogger("smtp", queue_id)
        self.faillog = ClientLogger("smtp.fail", queue_id)

    # -- helpers ---------------------------------------------------------

    def _expect(self, reply, want):
        if reply.kind == want:
            return reply
        raise Failed(Outcome.of_reply(reply), reply)

    def _rcpt(self, r):
        r.rcpt = convert.rcpt_to(r.address, self.ddomain or self.o.maildomain)
        return r.rcpt

    def _auth_step(self, reply, want):
        """upas: any failed AUTH exchange is worth a retry."""
        if reply.kind == want:
            return reply
        raise Failed(Outcome.retry(), reply)

    @defer.inlineCallbacks
    def _tls(self, start):
        """Start TLS (STARTTLS or implicit), wait for the handshake, check pins."""
        if start:
            self.wire.transport.startTLS(self.o.tls_options or ssl.CertificateOptions())
        try:
            yield self.wire.handshake()
        except Exception as e:
            self.log.info("tlsClient to {d}: {err}", d=self.ddomain or self.server, err=e,
                          event="smtp.tls", domain=self.ddomain or self.server, status="failed")
            raise Failed(Outcome.give_up(), note="tlsClient to %s: %s" % (self.ddomain or self.server,
                                                                   e))
        if self.o.thumbprints is not None:
            der = _peer_der(self.wire.transport)
            if der is None or not self.o.thumbprints.accepts(der):
                note = "cert for %s not recognized: sha256=%s" % (
                    self.ddomain or self.server,
                    base64.b64encode(hashlib.sha256(der or b"").digest()).decode())
                self.log.info("{note}", note=note, event="smtp.tls",
                              domain=self.ddomain or self.server, status="failed")
                raise Failed(Outcome.give_up(), note=note)
        self.encrypted = True
        self.log.info("started TLS to {d}", d=self.ddomain or self.server, event="smtp.tls",
                      domain=self.ddomain or self.server, status="started")

    @defer.inlineCallbacks
    def _hello(self):
        w, o = self.wire, self.o
        reply = yield w.command("EHLO " + o.hellodomain)
        if reply.kind == 5:
            self._expect((yield w.command("HELO " + o.hellodomain)), 2)
            return []
        return self._expect(reply, 2).texts[1:]

    @defer.inlineCallbacks
    def _auth(self, methods):
        w = self.wire
        if "CRAM-MD5" in methods:
            user, password = self._credentials()
            challenge = self._auth_step((yield w.command("AUTH CRAM-MD5")), 3)
            try:
                text = base64.b64decode(challenge.texts[0].strip(), validate=True)
            except (ValueError, IndexError):
                raise Failed(Outcome.retry(), challenge)
            digest = hmac.new(password.encode(), text, hashlib.md5).hexdigest()
            answer = base64.b64encode(("%s %s" % (user, digest)).encode()).decode()
            self._auth_step((yield w.command(answer, "<removed>")), 2)
            return
        user, password = self._credentials()
        if "LOGIN" in methods:
            self._auth_step((yield w.command("AUTH LOGIN")), 3)
            for secret, want in ((user, 3), (password, 2)):
                line = base64.b64encode(secret.encode()).decode()
                self._auth_step((yield w.command(line, "<removed>")), want)
        elif "PLAIN" in methods:
            blob = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
            self._auth_step((yield w.command("AUTH PLAIN " + blob, "AUTH PLAIN <removed>")), 2)
        else:
            raise Failed(Outcome.give_up(replies.NO_AUTH_METHOD))

    def _credentials(self):
        try:
            if self.o.credentials is None:
                raise NoCredentials("failed to get userpasswd: no credentials configured")
            return self.o.credentials(self.server, self.o.user)
        except NoCredentials as e:
            self.faillog.info("{err}", err=e)
            raise Failed(Outcome.give_up(), note=str(e))

    # -- the conversation ------------------------------------------------

    def run(self):
        """Fire with the upas status; per-recipient results in self.results."""
        return self.open().addCallback(lambda _: self.transaction())

    @defer.inlineCallbacks
    def open(self):
        """Greeting, EHLO, STARTTLS and AUTH: the connection is ready for MAIL."""
        w, o = self.wire, self.o
        w.arm(10 * o.unit)  # greeting, EHLO, STARTTLS and AUTH together
        if o.implicit_tls:
            yield self._tls(start=False)
        if o.avoidant:
            w.send("NOOP")
            yield w.read()
        self._expect((yield w.read()), 2)
        while True:
            extensions = yield self._hello()
            restart = False
            for ext in extensions:
                word = ext.strip().upper()
                if word == "STARTTLS" and not self.encrypted and o.try_tls:
                    reply = yield w.command("STARTTLS")
                    if reply.kind != 2:
                        raise Failed(Outcome.give_up(), reply)
                    w.flush_input()  # CVE-2011-0411, client side
                    yield self._tls(start=True)
                    restart = True
                    break
                if (word.startswith("AUTH ") or word.startswith("AUTH=")) and o.auth and (
                        self.encrypted or o.auth_in_clear):
                    yield self._auth(word[5:].split())
                    break
            if not restart:
                break
        self.offered = frozenset(ext.strip().upper() for ext in extensions)

    @defer.inlineCallbacks
    def transaction(self):
        """MAIL, RCPTs, DATA: one message on an open connection; fires with
        the upas status.  ``clean`` tells whether the server finished the
        transaction (its reply to the message, whatever it was), so the
        connection can carry another one.

        With PIPELINING offered (RFC 2920), MAIL and the RCPTs go out
        together and their replies are read in order; DATA still waits for
        them, so it is sent only when upas would send it.
        """
        w, o = self.wire, self.o
        self.phase = "mailfrom"
        self.clean = False
        offered = self.offered
        utf8 = needs_smtputf8(self.sender, [r.address for r in self.results
                                            if r.status == NOT_SENT],
                              self.smtputf8, "".join(self.message.header.lines))
        if utf8 and "SMTPUTF8" not in offered:
            # RFC 6531 3.2: never sent to a server that cannot take it (no downgrade)
            raise Failed(Outcome.give_up(), Reply(0, [replies.SMTPUTF8_NOT_OFFERED.format(
                host="%s[%s]" % (self.target.mx or self.target.ip, self.target.ip))]))
        w.arm(10 * o.unit)
        mail = "MAIL FROM:" + convert.mail_from(self.sender, o.hostdomain) + (
            " SMTPUTF8" if utf8 else "")
        # recipients refused before the connection (illegal addresses) count
        # as refused by the server
        worst = Kind.GIVE_UP if any(r.status == PERMANENT_FAILURE for r in self.results) \
            else None
        todo = [r for r in self.results if r.status == NOT_SENT]
        if "PIPELINING" in offered:
            w.send(mail)
            for r in todo:
                w.send("RCPT TO:<%s>" % self._rcpt(r))
            mail_reply = yield w.read()
            rcpt_replies = []
            for r in todo:  # read all: the stream stays in step even when MAIL failed
                w.arm(10 * o.unit)
                rcpt_replies.append((yield w.read()))
            if mail_reply.kind != 2:
                for r in todo:
                    r.rcpt = ""  # not sent, as far as the report goes
            self._expect(mail_reply, 2)
            replies_in = iter(rcpt_replies)
        else:
            self._expect((yield w.command(mail)), 2)
            replies_in = None
        self.phase = "rcptto"
        for r in todo:
            w.arm(10 * o.unit)
            if replies_in is not None:
                reply = next(replies_in)
            else:
                reply = yield w.command("RCPT TO:<%s>" % self._rcpt(r))
            r.reply = str(reply)
            if reply.kind == 2:
                r.status = ACCEPTED
            else:
                r.status = PERMANENT_FAILURE if reply.kind == 5 else TEMPORARY
                worst = Kind.GIVE_UP if reply.kind == 5 or worst == Kind.GIVE_UP \
                    else Kind.RETRY
        accepted = [r for r in self.results if r.status == ACCEPTED]
        if not accepted or worst == Kind.RETRY:
            if not self.results:
                return self._ended(Outcome.delivered())  # upas: nothing to send is success
            failed = [r for r in self.results if r.status != ACCEPTED]
            raise Failed(Outcome.give_up() if worst == Kind.GIVE_UP else Outcome.retry(),
                         Reply(0, [failed[-1].reply]) if failed else None)
        if o.ping:
            return self._ended(Outcome.delivered())
        self.phase = "data"
        toline = ", ".join(r.rcpt for r in self.results if r.rcpt)
        w.arm(20 * o.unit)
        self._expect((yield w.command("DATA")), 3)
        body = _Body(w, self.message.wire(toline), 10 * o.unit)
        w.transport.registerProducer(body, False)
        size = yield body.done
        w.arm(10 * o.unit)
        final = yield w.read()
        self.clean = final.kind in (2, 4, 5)
        self._expect(final, 2)
        for r in accepted:
            # the server's word on the message (its queue id), not on the RCPT
            r.status, r.reply = DELIVERED, str(final)
        self.log.info("{sender} sent {n} bytes to {toline} {mx}", sender=self.sender, n=size,
                      toline=toline, mx=self.target.describe(), event="smtp.sent", size=size)
        if worst:
            self.report.append(replies.REPORT_CONNECT_PARTIAL.format(
                date=plan9_date(self.clock.seconds()), addr=self.destaddr,
                mx=self.target.describe(), phase=self.phase))
            for r in self.results:
                if r.status != DELIVERED:
                    rcpt = r.rcpt or convert.shown(r.address)  # never sent: illegal
                    self.report.append(replies.REPORT_RCPT_FAILED.format(rcpt=rcpt,
                                                                         reply=r.reply))
                    self.faillog.info("delivery to {rcpt} at {addr} {mx} rcptto, failed: "
                                      "{reply}", rcpt=rcpt, addr=self.destaddr,
                                      mx=self.target.describe(), reply=r.reply)
            return self._ended(Outcome.give_up())  # upas: a partial failure
        return self._ended(Outcome.delivered())

    def _ended(self, outcome):
        """Note how the transaction ended; its status text is what
        ``transaction()`` fires with (``self.outcome`` has the kind)."""
        self.outcome = outcome
        return outcome.status

    def ready_for_more(self):
        """Can this connection carry another message?  Only after a
        transaction the server finished (its reply to the message): the
        next one starts with MAIL (RFC 5321 4.1.4).  Any other ending says
        QUIT, as before."""
        return self.clean and not self.wire.closed

    def hang_up(self):
        """QUIT without waiting for its answer (shutting down); fires once closed."""
        w = self.wire
        if not w.closed:
            w.send("QUIT")
            w.transport.loseConnection()
        return w.whenClosed()

    @defer.inlineCallbacks
    def quit(self):
        w = self.wire
        if w.closed:
            return
        try:
            w.arm(60 * self.o.unit)
            yield w.command("QUIT")
        except Exception:
            pass
        if w.closed:
            return
        w.arm(60 * self.o.unit)  # a peer that never lets go is cut off
        w.transport.loseConnection()
        yield w.whenClosed()


def _failure_report(conv, outcome, reply, note, destaddr, clock):
    kind = "ping" if conv.o.ping else "delivery"
    lines = []
    if note:
        lines.append(note)
    text = str(reply) if reply is not None else ""
    lines.append(replies.REPORT_CONNECT.format(date=plan9_date(clock.seconds()),
                                               addr=destaddr, mx=conv.target.describe(),
                                               phase=conv.phase))
    if text:
        lines.append(text)
    conv.faillog.info("{kind} to {rcpts} at {addr} {mx} {phase} failed: {reply}", kind=kind,
                 rcpts=",".join(r.rcpt or r.address for r in conv.results), addr=destaddr,
                 mx=conv.target.describe(), phase=conv.phase,
                      reply=text or note or outcome.status)
    return lines


@defer.inlineCallbacks
def _dial(reactor, clock, targets, options, errors):
    tls_options = (options.tls_options or ssl.CertificateOptions()) if options.implicit_tls \
        else None
    for target in targets:
        if options.debug:
            options.debug("dialing %s" % target.describe())
        try:
            wire = yield connect(reactor, clock, target, options.connect_timeout, tls_options,
                                 options.debug)
            return target, wire
        except Exception as e:
            errors.append(mxdial.DialError("%s %s" % (_error_text(e), target.describe()),
                                           False))
    return None, None


def _error_text(e):
    if isinstance(e, Failure):
        e = e.value
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "connect timed out"
    return str(e) or e.__class__.__name__


def needs_smtputf8(sender, recipients, flagged, header):
    """Must the message go with SMTPUTF8?  A non-ASCII address needs it; a
    message that came with SMTPUTF8 needs it too when its header is not
    ASCII (Postfix: an all-ASCII one goes without)."""
    return (not sender.isascii() or not all(r.isascii() for r in recipients)
            or (flagged and not header.isascii()))


def address_errors(sender, recipients, kind="delivery"):
    """{address: upas's ``illegal address`` text} for the sender and the
    recipients that hold a control character (``convert.illegal``): a CR or
    LF in one would start a command of its own on the wire."""
    errors = {}
    for way, addrs in (("from", [sender]), ("to", recipients)):
        for addr in addrs:
            if convert.illegal(addr):
                errors[addr] = replies.ILLEGAL_ADDRESS.format(kind=kind, way=way,
                                                              addr=convert.shown(addr))
    return errors


def dial_report(text, destaddr):
    """upas's stderr line when no conversation takes place."""
    return replies.REPORT_DIAL.format(err=text, addr=destaddr)


class Connections:
    """Idle connections by destination, for the next message (Postfix's scache).

    After a message, a connection whose server finished the transaction
    waits here up to ``idle`` seconds for the next message to
    the same destination, which then starts at MAIL.  A connection carries
    at most ``max_messages`` messages; at most ``max_idle`` wait per
    destination; the rest say QUIT.
    """

    def __init__(self, clock, idle=2.0, max_messages=100, max_idle=8):
        self.clock = clock
        self.idle = idle
        self.max_messages = max_messages
        self.max_idle = max_idle
        self._idle = {}  # destination -> [_Idle]

    def take(self, key):
        """An open connection to ``key`` that is ready for MAIL, or None."""
        waiting = self._idle.get(key)
        while waiting:
            cached = waiting.pop()
            if cached.timer.active():
                cached.timer.cancel()
            if not cached.conv.wire.closed:
                if not waiting:
                    del self._idle[key]
                return cached
        self._idle.pop(key, None)
        return None

    def put(self, key, conv, messages):
        """Keep ``conv``'s connection for the next message, or end it; fires when done."""
        waiting = self._idle.setdefault(key, [])
        if messages >= self.max_messages or len(waiting) >= self.max_idle \
                or conv.wire.closed:
            if not waiting:
                del self._idle[key]
            return conv.quit()
        cached = _Idle(conv, messages)
        cached.timer = self.clock.callLater(self.idle, self._expire, key, cached)
        waiting.append(cached)
        return defer.succeed(None)

    def _expire(self, key, cached):
        waiting = self._idle.get(key, [])
        if cached in waiting:
            waiting.remove(cached)
            if not waiting:
                del self._idle[key]
            cached.conv.quit()

    def wires(self):
        """The idle connections' wires."""
        return {cached.conv.wire for waiting in self._idle.values() for cached in waiting}

    def close(self):
        """End every idle connection (QUIT); fires when they are gone."""
        idle, self._idle = self._idle, {}
        done = []
        for waiting in idle.values():
            for cached in waiting:
                if cached.timer.active():
                    cached.timer.cancel()
                done.append(cached.conv.hang_up())
        return defer.DeferredList(done)


class _Idle:
    def __init__(self, conv, messages):
        self.conv = conv
        self.messages = messages
        self.timer = None


@defer.inlineCallbacks
def deliver(source, destaddr, sender, recipients, options, reactor, resolver, clock=None,
            watch=None, outcome=None, queue_id=None, smtputf8=False, connections=None,
            _reuse=True):
    """Send the message in the binary file ``source`` to ``destaddr``; fire with a Result.

    ``watch(wire)``, if given, is called once connected (the queue uses it
    to cut connections at shutdown with ``wire.transport.abortConnection``).
    ``outcome(result)``, if given, gets the Result as soon as the server has
    answered the message (or the conversation failed), before QUIT, whose
    answer may take minutes; QUIT waits for the Deferred it returns, so the
    queue can make the outcome durable first.  ``queue_id`` starts every
    log line of this delivery.  ``smtputf8``: the message was received with
    SMTPUTF8 (its header may need it).

    ``connections`` (a ``Connections``): take an idle connection to
    ``destaddr`` from it if there is one, and leave this one there after
    the message instead of QUIT.  A reused connection that the server
    closed before DATA costs nothing: the message goes on a new one.

    A sender with a control character refuses the whole delivery before
    any connection (permanent); such a recipient is refused alone, as if
    the server had said 5xx to it, and never sent.
    """
    clock = clock or reactor
    recipients = list(recipients)
    results = [RecipientResult(r) for r in recipients]
    default_service = "465" if options.implicit_tls else "smtp"
    kind = "ping" if options.ping else "delivery"
    faillog = ClientLogger("smtp.fail", queue_id)
    illegal = address_errors(sender, recipients, kind)
    for r in results:
        if r.address in illegal:
            r.status, r.reply = PERMANENT_FAILURE, illegal[r.address]
    try:
        if sender in illegal:
            raise mxdial.DialError(illegal[sender], True)
        if results and all(r.status == PERMANENT_FAILURE for r in results):
            raise mxdial.DialError(results[0].reply, True)
        dial = mxdial.parse_dial(destaddr, default_service)
        try:
            message = convert.OutboundMessage(source, sender, options.hostdomain,
                                              options.full_name)
        except OSError as e:
            raise mxdial.DialError("reading the message: %s" % e, False)
        cached = connections.take(destaddr) if connections is not None and _reuse else None
        if cached is not None:
            target, wire, ddomain = cached.conv.target, cached.conv.wire, cached.conv.ddomain
    except mxdial.DialError as e:
        return _dial_failed(results, e, kind, faillog, destaddr)
    if cached is None:
        try:
            target, wire, ddomain = yield _connect(reactor, resolver, clock, dial, options)
        except mxdial.DialError as e:
            return _dial_failed(results, e, kind, faillog, destaddr)
        if watch is not None:
            watch(wire)
    conv = Conversation(wire, options, message, sender, results, destaddr, dial.host,
                        ddomain, target, clock, queue_id, smtputf8)
    report = []
    try:
        if cached is None:
            yield conv.run()
        else:
            conv.offered, conv.encrypted = cached.conv.offered, cached.conv.encrypted
            yield conv.transaction()
        ending = conv.outcome
    except Failed as f:
        ending = f.outcome
        report = _failure_report(conv, ending, f.reply, f.note, destaddr, clock)
    except Closed as c:
        if cached is not None and conv.phase in ("mailfrom", "rcptto"):
            # the server ended a connection it had let wait: nothing was
            # sent, so the message goes on a new connection
            source.seek(0)
            return (yield deliver(source, destaddr, sender, recipients, options, reactor,
                                  resolver, clock, watch, outcome, queue_id, smtputf8,
                                  connections, _reuse=False))
        ending = Outcome.retry()
        if c.timed_out:
            report = [replies.REPORT_TIMEOUT.format(addr=destaddr)]
            faillog.info("{kind} interrupt: {addr}: alarm {mx}", kind=kind, addr=destaddr,
                         mx=target.describe())
        else:
            report = _failure_report(conv, ending, Reply(-1, [replies.CONNECTION_CLOSED]),
                                     None, destaddr, clock)
    except Exception as e:  # a bug here must cost a retry, never the message
        conv.log.failure("delivery to {addr} failed", addr=destaddr, event="error")
        ending = Outcome.retry()
        report = [replies.REPORT_LOCAL_ERROR.format(err=e, addr=destaddr)]
    report = conv.report + report
    ending = ending.because(report[-1] if report else "")
    _settle(results, ending)
    result = Result(ending.status, results, report, conv.phase, target, ending)
    if outcome is not None:
        try:
            yield outcome(result)
        except Exception:  # the caller's trouble must not keep the connection open
            conv.log.failure("recording the outcome for {addr} failed", addr=destaddr,
                             event="error")
    if connections is not None and conv.ready_for_more():
        yield connections.put(destaddr, conv, (cached.messages if cached else 0) + 1)
    else:
        yield conv.quit()
    return result


def _dial_failed(results, e, kind, faillog, destaddr):
    """The Result when no conversation takes place."""
    faillog.info("{kind} {err} ({addr})", kind=kind, err=e.text, addr=destaddr)
    report = [dial_report(e.text, destaddr)]
    ending = (Outcome.give_up() if e.permanent else Outcome.retry()).because(report[-1])
    _settle(results, ending)
    return Result(ending.status, results, report, phase="dial", outcome=ending)


@defer.inlineCallbacks
def _connect(reactor, resolver, clock, dial, options):
    """(target, wire, ddomain) of a new connection; DialError when there is none."""
    ddomain, targets = "", []
    errors = []
    try:
        ddomain, targets = yield mxdial.plan(resolver, clock, dial, options.busted,
                                             options.ipv6, options.ours,
                                             options.dns_timeout)
    except mxdial.DialError as e:
        if not options.gateway or "illegal" in e.text:
            raise
        errors.append(e)
    target, wire = yield _dial(reactor, clock, targets, options, errors)
    if wire is None and options.gateway:
        gw = mxdial.parse_dial(options.gateway)
        try:
            gw_targets = yield mxdial.gateway_targets(resolver, clock, gw, options.ipv6,
                                                      options.dns_timeout)
            target, wire = yield _dial(reactor, clock, gw_targets, options, errors)
        except mxdial.DialError as e:
            errors.append(e)
    if wire is None:
        # the last error decides, with the permanence it was raised with
        raise errors[-1] if errors else mxdial.DialError("no address to dial", False)
    return target, wire, ddomain


def _settle(results, outcome):
    """Give every recipient without its own outcome the transaction's."""
    if outcome.kind == Kind.DELIVERED:
        return
    for r in results:
        if r.status in (ACCEPTED, NOT_SENT):
            r.status, r.reply = outcome.recipient_status, outcome.detail


def filter_message(source, sender, options, out):
    """``-f``: write the converted message (CRLF, stuffed, no final dot) to ``out``.

    No ``To:`` is added: upas builds it from the RCPTs sent, and ``-f`` sends none.
    """
    message = convert.OutboundMessage(source, sender, options.hostdomain, options.full_name)
    for chunk in message.wire("", final_dot=False):
        out.write(chunk)
