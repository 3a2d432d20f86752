"""Returning a queued job's failures to whoever gets them.

The report is an RFC 3464 DSN (``bounce``), handed to the mail root as
any message is: stored in a local mailbox or queued as a job of its own.
A failure goes back to the sender, never to ``<>``: a bounce that cannot
be delivered goes to the local ``postmaster`` (from ``double-bounce``, as
Postfix), and a failed postmaster copy is dropped.  A return that cannot
be stored goes to the postmaster too; ``NotReturned`` when nobody got it.

Log lines (namespace ``queue``): ``<id>: sender non-delivery
notification: <bounce id>`` (as Postfix), and returns that failed.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger

from ..mailroot import bounce
from ..smtp import convert
from .. import relay
from ..address import NULL_SENDER
from ..mailroot.local import at_form
from ..session import Transaction
from ..mailroot.store import by_relay

log = Logger(namespace="queue")

POSTMASTER = "postmaster"
# the postmaster's copy of a failed bounce comes from here, and a failure
# of that copy is discarded, so returns can never loop
DOUBLE_BOUNCE = bounce.DOUBLE_BOUNCE
HEAD = 256 * 1024  # of the original message, read for its header


class NotReturned(Exception):
    """The failures of a job could be returned to nobody this time (why: the text)."""


def return_path(sender):
    """Who gets the report of a failure, and from which envelope sender.

    A failed bounce (from ``<>``) is a double bounce: the postmaster gets it,
    as in Postfix.  A failed postmaster copy is dropped (None): nobody is left.
    """
    if sender == DOUBLE_BOUNCE:
        return None
    if sender == NULL_SENDER:
        return POSTMASTER, DOUBLE_BOUNCE
    return sender, NULL_SENDER


@defer.inlineCallbacks
def give_back(root, settings, clock, job, message, failed, to, envelope_sender):
    """Bounce the ``failed`` recipients of ``job`` (its message file:
    ``message``) to ``to``; when that cannot be stored or queued, to the
    postmaster, as a double bounce; NotReturned when nobody got it."""
    try:
        yield _bounce(root, settings, clock, job, message, failed, to, envelope_sender)
        return
    except OSError as e:
        err, why = e, "to %s (%s)" % (to, e)
        if to == POSTMASTER:
            raise NotReturned("not " + why)
    log.warn("{id}: failures not returned {why}; the postmaster gets them",
             id=job.id, why=why, event="queue.bounce_failed", queue_id=job.id)
    try:
        yield _bounce(root, settings, clock, job, message, failed, POSTMASTER, DOUBLE_BOUNCE,
                      why_lines=[
                          "The report could not be given to its sender <%s>, so this copy is "
                          "for the postmaster: %s" % (convert.shown(at_form(to, settings.dom)),
                                                      err)])
    except OSError as e2:
        raise NotReturned("not %s, nor to %s (%s)" % (why, POSTMASTER, e2))


def _bounce(root, settings, clock, job, message, failed, to, envelope_sender, why_lines=()):
    """Queue (or store) the DSN for ``to``; fires once it is durable.

    From ``double-bounce`` it is the postmaster's copy: of a bounce that
    failed, or (``why_lines`` say so) of a return that could not be stored.
    """
    s = settings
    qid = job.id
    with open(message, "rb") as f:
        head = f.read(HEAD)
    # an address with a control character (refused by the client, never
    # sent) is shown escaped: it must not make a header line of its own
    failures = [(convert.shown(convert.bangtoat(r)), job.state[r].dsn or "5.0.0",
                 _mx_name(job.state[r].relay), job.state[r].error) for r in failed]
    double = envelope_sender == DOUBLE_BOUNCE
    data = bounce.dsn(failures, convert.shown(at_form(to, s.dom)),
                      bounce.original_header(head),
                      s.dom, job.created, clock.seconds(), qid,
                      why_lines=why_lines, double=double)
    kind, where = relay.route(to, s.ours)
    tx = Transaction(sender=envelope_sender, recipients=(to,),
                     local=(where,) if kind == "local" else (),
                     remote=(to,) if kind == "remote" else (), peer="", helo="")
    path, spool = root.open_spool()

    def unlink(result):
        try:
            os.unlink(path)
        except OSError:
            pass
        return result

    try:
        with spool:
            spool.write(data)
        d = root.deliver(path, tx)
    except BaseException:
        unlink(None)
        raise

    def done(result):
        users, remote = by_relay(result.value)  # what became of the bounce
        if double and not why_lines:
            log.warn("{id}: a bounce from <> failed; the postmaster gets it ({n} "
                     "recipients failed)", id=qid, n=len(failed), event="queue.bounce_failed",
                     queue_id=qid)
        # as Postfix: the line that joins this job to the bounce's
        log.info("{id}: {who} non-delivery notification: {where} (to {to}, {n} "
                 "recipients failed)", id=qid, who="postmaster" if double else "sender",
                 where=notification_place(root.queue_id(path), users, remote),
                 to=to, n=len(failed), event="queue.bounce", queue_id=qid,
                 kind="postmaster" if double else "sender", failed=len(failed))
        return result

    return d.addBoth(unlink).addCallback(done)


def notification_place(bounce_id, users, remote):
    """Where a bounce went, for the log: its queue id, local mailboxes, or both."""
    places = [bounce_id] if remote else []
    if users:
        places.append("stored in the local mailbox of %s" % ", ".join(users))
    return "; ".join(places)


def _mx_name(relay_text):
    """``(mx.example.net:192.0.2.1)`` → ``mx.example.net``."""
    return relay_text.strip("()").split(":", 1)[0] if relay_text else ""
