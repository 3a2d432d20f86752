"""One SMTP conversation of the client (upas smtp.c's), over a ``Wire``.

Greeting, EHLO (HELO after a 5xx), STARTTLS and pinning, AUTH, MAIL,
every RCPT, DATA through a pull producer (``_Body``), QUIT; upas's time
limit for each phase on the injected clock; the report upas prints when
it fails.  Testable over ``StringTransport`` and ``task.Clock``.
"""

import base64
import hashlib
import hmac

from twisted.internet import defer, ssl
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

from . import convert
from .. import replies
from .factotum import NoCredentials
from ..logs import SessionLogger, printable
from ..mailroot.pipemsg import plan9_date
from .clientresult import (ACCEPTED, DELIVERED, NOT_SENT, PERMANENT_FAILURE, TEMPORARY, Kind,
                           Outcome)
from .wire import Closed, Failed, Reply

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


def needs_smtputf8(sender, recipients, flagged, header):
    """Must the message go with SMTPUTF8?  A non-ASCII address needs it; a
    message that came with SMTPUTF8 needs it too when its header is not
    ASCII (Postfix: an all-ASCII one goes without)."""
    return (not sender.isascii() or not all(r.isascii() for r in recipients)
            or (flagged and not header.isascii()))


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
