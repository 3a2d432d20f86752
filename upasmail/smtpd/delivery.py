"""The hand-off of accepted mail: ``IMessageDelivery`` and ``IMessage``.

``UpasDelivery`` is asked by the protocol after the upas policy has said
yes: ``validateFrom`` returns the sender, ``validateTo`` checks that the
recipient can be delivered by the back end and returns a message factory.
All recipients of one transaction share one ``UpasMessage``, which writes
the mailer stream (``pipemsg``) to a spool file while DATA arrives and, at
the final dot, hands it to the back end:

* ``store.MailRoot``: local mboxes and the outbound queue (the default);
* ``mailer.Mailer``: the ``-m`` command.

A message whose transaction the ratify lists block or delay is read but
never delivered: with ``-s`` it is kept under ``queue.dump``, and the
reply is ``554 5.7.1 we believe this is spam.`` or ``450 4.3.0 There will
be a delay in delivery of this message.``.  With relay control on, mail
from untrusted peers that claims our domains gets ``X-warning:`` lines.

``eomReceived`` fires with a verdict (never fails for an outcome): Accept
means "250 2.5.0 sent"; the reply for a refusal rides in a Reject.
Any failure to store turns into ``451 4.3.0`` and no mailbox keeps a
partial message.
"""

import dataclasses
import functools

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from ..mailroot import local, pipemsg
from .. import logs, relay, replies
from ..decision import reject
from ..interfaces import IUpasDelivery, IUpasMessage
from ..session import Transaction

log = Logger(namespace="smtpd")

MESSAGE_LIMIT = 128 * 1024 * 1024  # upas send's MSGLIMIT

@implementer(IUpasDelivery)
class UpasDelivery:
    """One per connection; ``session`` and ``settings`` are the facts."""

    def __init__(self, session, settings, root, backend, clock):
        self.session = session
        self.settings = settings
        self.root = root
        self.backend = backend
        self.clock = clock

    def receivedHeader(self, helo, origin, recipients):
        date = pipemsg.plan9_date(self.clock.seconds())
        s = self.session
        return pipemsg.received_line(s.him, s.rsys, self.settings.me, date,
                                     s.tls, s.user).encode()

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        # with -m the mailer decides who exists, as in upas
        if self.backend is self.root:
            kind, where = relay.route(user.path, self.session.ours)
            if kind == "local":
                standing = self.root.mailboxes.standing(where, self.root.local_user)
                verdict = local.recipient_verdict(user.path, where, standing)
                if not verdict.ok:
                    # not SMTPBadRcpt: it parses the path again as an RFC 5321
                    # address, which a bang path or a UTF-8 name may not be
                    raise RefusedRecipient(verdict)
        envelope = self.session.envelope
        return lambda: self._message(envelope)

    def ready(self):
        """May DATA start?  The mailer must be startable (upas startcmd)."""
        return self.backend.ready()

    def _message(self, envelope):
        if envelope.message is None:
            envelope.message = UpasMessage(self, envelope)
        return envelope.message

    def transaction(self, envelope, queue_id=""):
        users, remote = [], []
        for path in envelope.recipients:
            kind, where = relay.route(path, self.session.ours)
            (users if kind == "local" else remote).append(where if kind == "local" else path)
        s = self.session
        sender = envelope.sender
        if self.backend is self.root:  # a -m mailer gets upas's sender
            sender = local.home_sender(sender, envelope.bare_sender,
                                       s.trusted or s.authenticated, self.settings.dom)
        return Transaction(
            sender=sender,
            recipients=tuple(envelope.recipients),
            local=tuple(users),
            remote=tuple(remote),
            peer=self.session.rsys,
            helo=self.session.him,
            session=self.session.id,
            queue_id=queue_id,
            smtputf8=envelope.smtputf8,
        )


class RefusedRecipient(smtp.SMTPServerError):
    """``validateTo``'s refusal (Twisted's way), with our verdict (its reason) in it."""

    def __init__(self, verdict):
        smtp.SMTPServerError.__init__(self, verdict.code, verdict.text())
        self.verdict = verdict


@implementer(IUpasMessage)
class UpasMessage:
    """The message of one transaction, spooled while DATA arrives."""

    def __init__(self, delivery, envelope):
        self.delivery = delivery
        self.root = delivery.root
        self.failure = None
        self.size = 0
        self.action = envelope.action
        self.spool = self.root.new_spool()
        s = delivery.session
        # the spool's name is the message's queue id from now on
        self.queue_id = self.spool.name
        self.tx = delivery.transaction(envelope, self.queue_id)
        self.log = logs.SessionLogger(s.id).forMessage(self.queue_id)
        settings = delivery.settings
        date = pipemsg.plan9_date(delivery.clock.seconds())
        forgery = None
        if settings.relay_control and not (s.trusted or s.authenticated):
            # upas tags forgeries only when it controls relaying (-f)
            forgery = functools.partial(relay.forgery_warnings, him=s.him, ours=s.ours)
        sender, last_sender, form = envelope.sender, envelope.last_sender, None
        if delivery.backend is self.root and self.action == "deliver":
            # the built-in store writes RFC 5322 addresses; -m and -s keep upas's stream
            sender = last_sender = self.tx.sender
            form = pipemsg.StoredForm(settings.dom, delivery.clock.seconds(),
                                      s.trusted or s.authenticated)
        self.stream = pipemsg.MailerStream(
            self._write, sender, last_sender,
            list(envelope.recipients), s.him, s.rsys, settings.me, date, forgery,
            tls=s.tls, user=s.user, form=form, hop_limit=settings.hop_limit,
        )

    def _write(self, data):
        if self.failure is not None:
            return
        self.size += len(data)
        try:
            self.spool.write(data)
        except OSError as e:
            self.log.error("spool write failed: {err}", err=e, event="smtpd.store_failed")
            self.failure = reject(451, replies.STORE_FAILED, reason="store")

    def refuse(self, verdict):
        """The protocol found the message unacceptable (e.g. a huge line)."""
        if self.failure is None:
            self.failure = verdict

    def lineReceived(self, line):
        if self.failure is None:
            self.stream.line(line)

    def linesReceived(self, data):
        """Many LF-terminated lines at once (the protocol's bulk DATA path)."""
        if self.failure is None:
            self.stream.lines(data)

    def eomReceived(self):
        self.stream.end()
        try:
            self.spool.close()
        except OSError as e:
            self.log.error("spool close failed: {err}", err=e, event="smtpd.store_failed")
            self.failure = self.failure or reject(451, replies.STORE_FAILED,
                                                         reason="store")
        if self.failure is None and self.stream.error is not None:
            self.failure = reject(554, self.stream.error.reply, reason="syntax",
                                  detail="header")
        if (self.failure is None and self.action == "deliver"
                and self.delivery.backend is self.root):  # delivered here before: a loop
            looped = local.forwarding_loop(self.stream.delivered_to, self.tx.local,
                                           self.delivery.settings.dom)
            if looped is not None:
                self.failure = reject(554, replies.FORWARDING_LOOP.format(addr=looped),
                                      reason="loop")
        if self.stream.message_id is not None:
            self.tx = dataclasses.replace(self.tx,
                                          message_id=logs.printable(self.stream.message_id))
            self.log = self.log.forMessage(self.queue_id, self.tx.message_id)
        if self.action != "deliver":
            return self._blocked()
        if self.failure is not None:
            self._discard()
            return defer.succeed(self.failure)
        backend = self.delivery.backend
        # the built-in store takes the message from memory; others get a file
        spool = self.spool if backend is self.root else None
        d = defer.maybeDeferred(lambda: backend.deliver(spool or self.spool.materialize(),
                                                        self.tx))
        d.addCallbacks(self._delivered, self._storeFailed)
        d.addBoth(self._cleanup)
        return d

    def _blocked(self):
        """Block or delay: keep the stream with -s, never deliver it."""
        s = self.delivery.session
        if self.action == "delay":
            verdict = reject(450, replies.DELAYED, reason="spam", detail="delay")
        else:
            why = str(self.stream.error) if self.stream.error is not None else None
            if self.failure is not None:
                why = self.failure.text().split(" ", 1)[-1]
            verdict = reject(554, replies.REFUSED.format(text=(why or replies.SPAM_WHY)[:127]),
                             reason="spam", detail="block")
            self.log.info("++[{him}/{rsys}] blocked: {why}", him=s.him, rsys=s.rsys,
                          event="smtpd.blocked",
                          why=why or replies.SPAM_WHY)
        if not self.delivery.settings.save_blocked or self.failure is not None:
            self._discard()
            return defer.succeed(verdict)

        def saved(path):
            self.log.info("saved blocked message from {sender} as {path}",
                          sender=self.tx.sender, path=path, event="smtpd.blocked")

        d = self.root.dump(self.spool, self.tx.sender)
        d.addCallbacks(saved, lambda f: self.log.failure("saving blocked message failed", f,
                                                         event="error"))
        d.addBoth(self._cleanup)
        return d.addCallback(lambda _: verdict)

    def _delivered(self, verdict):
        """Durable (or refused by the mailer): one line per recipient, as Postfix."""
        if not verdict.ok:
            return verdict
        if self.log.message_id is not None:
            self.log.info("message-id={message_id}", event="smtpd.message_id")
        tx = self.tx
        if self.delivery.backend is self.root:
            # what became of each recipient: an alias's targets, postmaster's fallback
            for route in verdict.value:
                same = route.to in (route.orig, local.fold(route.orig))
                orig = "" if same else " orig_to={orig}"
                status = ("status=sent (delivered to mailbox)" if route.relay == "local"
                          else "status=queued")
                self.log.info("to={rcpt}" + orig + " relay={relay} " + status,
                              rcpt=route.to, orig=route.orig, relay=route.relay,
                              event="queue.delivery", orig_rcpt=None if same else route.orig,
                              status="sent" if route.relay == "local" else "queued",
                              reply="delivered to mailbox" if route.relay == "local" else "",
                              delay=0.0)
        else:
            for path in tx.recipients:
                self.log.info("to={rcpt} relay=mailer status=sent", rcpt=path,
                              event="queue.delivery", relay="mailer", status="sent",
                              reply="", delay=0.0)
        return verdict

    def _storeFailed(self, failure):
        if failure.check(OSError):  # a locked, full or broken mailbox: no traceback needed
            self.log.error("not stored: {err}", err=failure.getErrorMessage(),
                           event="smtpd.store_failed")
        else:
            self.log.failure("storing message failed", failure, event="error")
        return reject(451, replies.STORE_FAILED, reason="store")

    def _cleanup(self, result):
        self._discard()
        return result

    def _discard(self):
        self.spool.discard()

    def connectionLost(self):
        self._discard()
