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

from twisted.internet import defer, error, ssl
from twisted.python.failure import Failure

from . import convert, mxdial
from .. import replies
# what moved out of this module, still importable from it (the library API)
from .clientresult import (  # noqa: F401
    ACCEPTED, DELIVERED, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, NOT_SENT, PERMANENT,
    PERMANENT_FAILURE, RETRY, TEMPORARY, ClientOptions, Kind, Outcome, RecipientResult, Result,
    exit_code)
from .conversation import (  # noqa: F401
    LOG_LIMIT, ClientLogger, Conversation, _failure_report, needs_smtputf8)
from .wire import Closed, Failed, Reply, Wire, connect  # noqa: F401


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
