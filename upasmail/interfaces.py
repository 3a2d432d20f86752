"""The extension points: what the server asks of the objects it is given.

Each place where upasmail calls an object that another module, or an
embedder, may provide is declared here as a ``zope.interface`` Interface.
The server asks ``IFoo.providedBy(obj)`` and falls back to Twisted's
plain behaviour for an object that does not declare it, so a plain
``smtp.IMessageDelivery``, ``smtp.IMessage`` or ``twisted.cred`` checker
works exactly as it does under Twisted's own ESMTP.

* ``IUpasDelivery``: a delivery that may say "not now" before DATA.
* ``IUpasMessage``: a message fed DATA in blocks, told of a refusal, and
  carrying its size and its log.
* ``ICredentialsSource``: a checker that may have nothing to check against,
  or no plaintext secrets for CRAM-MD5.
* ``IReloadable``: anything that re-reads its files on SIGHUP.
* ``IMailBackend``: where accepted mail goes (the built-in store, ``-m``).
* ``IMessageStore``: the built-in store the server and the queue runner share.
* ``IStateStore``: the state every connection shares (also importable from ``statestore``).

This module imports nothing of upasmail at import time, so that every
module may import it.
"""

from twisted.cred.checkers import ICredentialsChecker
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import Attribute, Interface

__all__ = ["IUpasDelivery", "IUpasMessage", "ICredentialsSource", "IReloadable",
           "IMailBackend", "IMessageStore", "IStateStore", "StateUnavailable",
           "CONNECTION", "MESSAGE", "RECIPIENT"]


class IReloadable(Interface):
    """An object whose files are read again on SIGHUP (``factory.reload``)."""

    def reread():
        """Read every watched file again at its next use, changed or not.

        Returns nothing and raises nothing: a file that cannot be read is
        logged then and its last good version stays in force.  The server
        calls it on the state store and on each of the portal's checkers
        that provide this interface.
        """


class IUpasDelivery(IMessageDelivery):
    """An ``IMessageDelivery`` that is asked whether DATA may start.

    A plain ``IMessageDelivery`` is always ready.
    """

    def ready():
        """May a message be taken now?  Asked after a DATA command passes
        the policy and before the ``354`` (the policy fact ``mailer_ready``).

        Returns a ``decision.Decision`` at once: ``ACCEPT``, or a ``Reject``
        whose reply the client gets instead of ``354`` (upas: the mailer
        cannot be started, ``450 4.3.2``).
        """


class IUpasMessage(IMessageSMTP):
    """An ``IMessage`` that takes DATA in blocks and learns of a refusal.

    For a plain ``IMessage`` the server splits blocks into lines
    (``lineReceived``), refuses without telling it (its ``eomReceived`` is
    not called; ``connectionLost`` is), logs a size of 0 and logs through
    the session's logger.
    """

    size = Attribute("Bytes written so far (the mailer stream); read after "
                     "``eomReceived`` for the accepted line's ``size``.")

    log = Attribute("The ``logs.SessionLogger`` naming this message (its "
                    "``queue_id``, or None while it has none); the server logs "
                    "the message's outcome through it.")

    def linesReceived(data):
        """Many clean DATA lines at once, instead of as many ``lineReceived``.

        ``data`` is bytes of whole LF-terminated lines (CRLF already made
        LF, dots unstuffed).  An exception refuses the message, as one
        from ``lineReceived`` does.
        """

    def refuse(decision):
        """The protocol refuses the message being received (a bare CR or LF,
        a line or message too long): ``decision`` is the ``Reject`` the
        client will get after the dot.  Stop writing; ``connectionLost``
        follows instead of ``eomReceived``.  Returns nothing.
        """


class ICredentialsSource(ICredentialsChecker):
    """A ``twisted.cred`` checker that says what it can check now.

    A checker that does not provide it is taken as always usable and able
    to check CRAM-MD5 (if it takes ``IUsernameHashedPassword``).
    """

    def available():
        """Is there anything to check against (e.g. a readable, non-empty
        password file)?  Asked whenever the mechanisms are offered (EHLO,
        AUTH); False: the checker's
        mechanisms are not offered.  Returns a bool at once."""

    def cram_md5_ok():
        """Can CRAM-MD5 be checked (every secret held in plaintext)?  Asked
        with ``available``; False: CRAM-MD5 is not offered.  Returns a bool
        at once."""


class IMailBackend(Interface):
    """Where ``UpasDelivery`` hands accepted mail: the built-in store
    (``store.MailRoot``) or the ``-m`` mailer (``mailer.Mailer``)."""

    def ready():
        """May a message be taken now (``IUpasDelivery.ready``): a Decision."""

    def deliver(message, tx):
        """Deliver one message: ``message`` the mailer stream (a
        ``store.Spool`` for the built-in store, else the path of a file
        holding it), ``tx`` its ``session.Transaction``.

        Returns a Decision or a Deferred of one: ``Accept`` once the
        message is durable (the client gets ``250``), a ``Reject`` for the
        client's reply.  A failure is answered ``451``.
        """


class IMessageStore(IMailBackend):
    """The mail root (``store.MailRoot``): mailboxes and the outbound
    queue, shared by the server's deliveries and the queue runner."""

    queue = Attribute("The queue directory.")

    run_blocking = Attribute("``run_blocking(f, *args)``: a Deferred of ``f(*args)`` "
                             "run off the reactor thread.")

    enqueued = Attribute("A list of callables ``(queue id, job, inode)``, called "
                         "when a delivery has queued a job (a ``job.Job``, or its "
                         "envelope as a dict): the queue runner adds its wake-up "
                         "here while it runs.")

    def new_spool():
        """A new ``store.Spool`` for a message being received; its name is
        the message's queue id."""

    def open_spool():
        """A new spool file for a message the queue makes (a bounce):
        ``(path, file)``."""

    def queue_id(spool):
        """The queue id of a message held in ``spool`` (a Spool or a path)."""

    def dump(spool, sender):
        """Keep a blocked message under ``queue.dump`` (``-s``); a Deferred
        of its path."""


# what ``IStateStore.countAttempt`` counts per client (the rate limits)
CONNECTION, MESSAGE, RECIPIENT = "connection", "message", "recipient"


class StateUnavailable(Exception):
    """The shared state cannot be reached now (its server is down, slow or
    refusing): a store's Deferred fails with this, and the checks that
    need the answer either reply with a temporary failure (4xx) or, with
    ``--state-failure local``, the store answers from this node's own
    state instead and says so in the log."""


class IStateStore(Interface):
    """Anti-abuse state shared by every connection of every process (and,
    with a shared store such as Redis, of every node).  Every method
    returns a Deferred; one that cannot reach the state fails with
    ``StateUnavailable``."""

    def acquireConnection(ip, exempt, perPeer, total):
        """Count a new connection from ``ip``; fires with None when it may
        go on, else ``TOTAL`` or ``PEER`` (the limit it would pass; it is
        not counted).  ``exempt`` (trusted) connections count in all but
        not per peer."""

    def releaseConnection(ip, exempt):
        """A connection ``acquireConnection`` admitted is gone."""

    def authBegin(ip):
        """May an AUTH check for ``ip`` start? (``auth.Throttle.begin``)"""

    def authFailed(ip):
        """The check failed: fires with (seconds its reply waits, failures
        so far, the limit)."""

    def authSucceeded(ip):
        """The check succeeded: the address's failures are forgotten."""

    def authAbandoned(ip):
        """The check could not be made: it does not count."""

    def isWhitelisted(rsys):
        """Is the peer on the greylist's whitelist?"""

    def greylistAttempt(lsys, rsys, recipients):
        """Record an attempt; fires with ``[(rcpt, state)]``, ``state`` one
        of ``greylist.NEW``, ``RECENT``, ``OTHER`` (recipients that name no
        file are left out)."""

    def addToWhitelist(rsys, name):
        """Whitelist the peer (``name``: its PTR name, or None)."""

    def isGranted(ip):
        """Has ``ip`` a temporary trusted grant in force?"""

    def grant(ip):
        """Trust ``ip`` temporarily (POP/IMAP-before-SMTP)."""

    def countAttempt(kind, ip, window):
        """Count one attempt of ``kind`` (``CONNECTION``, ``MESSAGE`` or
        ``RECIPIENT``) by ``ip``; fires with how many attempts of that kind
        ``ip`` has made in the current window of ``window`` seconds, this
        one included (the rate limits compare it with theirs)."""
