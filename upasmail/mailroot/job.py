"""A queued job: its type, its on-disk format, and the pure decisions on it.

A job is one message for other hosts: ``<root>/queue/<id>.msg`` (the
mailer stream) and ``<id>.env``, its envelope, JSON.  This module is the
one definition of that envelope; the server writes it (``store``), the
runner, ``upas-mailq`` and ``upas-runq`` read it, all through
``from_record`` and ``to_record``.

The envelope (``version`` 2)::

    {"version": 2, "id": "<seconds>.<12 hex digits>",
     "sender": bang path, "recipients": [bang path, ...],
     "created": seconds, "peer": ip, "helo": name, "smtputf8": bool,
     "state": {recipient: {"status": "pending" | "delivered" | "failed",
                           "error", "relay", "reply", "dsn", "returned"}},
     "attempts": {destination: temporary failures},
     "next": {destination: seconds of the next try},
     "last_error": text}

A recipient's optional fields are written only when they are set.
Version 1 (the releases before this module) is the same without
``version``; its server wrote no ``state``, ``attempts``, ``next`` nor
``last_error`` (the runner added them), so they may be missing.  Reading
migrates it; writing always writes the current version.  A version this
code does not know (a newer release's) is a ``CorruptJob``: it is never
half-understood.

Pure: facts in, decisions out; the only file I/O is ``read_record``
(writing is ``store.write_envelope``'s).
"""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..replies import DELIVERED as SENT
from ..replies import GAVE_UP, NO_ANSWER
from ..replies import PERMANENT_FAILURE as REFUSED
from .bounce import status_of
from ..rules.tarpit import doubling

VERSION = 2
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATUSES = (PENDING, DELIVERED, FAILED)
SMARTHOST = "smarthost"  # the one destination when every job goes to the smarthost


class CorruptJob(Exception):
    """An envelope that is not a job of ours (why: the text)."""


@dataclass
class RecipientState:
    """What became of one recipient; fields named as on disk."""

    status: str = PENDING
    error: str = ""  # the last failure's reply (or why it gave up)
    relay: str = ""  # ``(mx:ip)`` of the last try
    reply: str = ""  # a delivered one: the server's reply to the message
    dsn: str = ""  # a failed one: its RFC 3463 status
    returned: bool = False  # a failed one: the sender has been told

    def to_record(self):
        record = {"status": self.status}
        for name in ("error", "relay", "reply", "dsn", "returned"):
            value = getattr(self, name)
            if value:
                record[name] = value
        return record


@dataclass
class Job:
    """One queued message; fields named as on disk."""

    id: str
    sender: str
    recipients: List[str]
    created: float
    peer: Optional[str] = ""
    helo: Optional[str] = ""
    smtputf8: bool = False
    state: Dict[str, RecipientState] = field(default_factory=dict)
    attempts: Dict[str, int] = field(default_factory=dict)
    next: Dict[str, float] = field(default_factory=dict)
    last_error: str = ""

    def __post_init__(self):
        for r in self.recipients:
            self.state.setdefault(r, RecipientState())


# -- the format -------------------------------------------------------------

def from_record(record, qid=None):
    """The ``Job`` an envelope holds, of any version we know; ``qid`` (the
    file's name) is its id.  CorruptJob when it is not one."""
    if not isinstance(record, dict):
        raise CorruptJob("bad envelope: not an object")
    version = record.get("version", 1)
    if version not in (1, VERSION) or isinstance(version, bool):
        raise CorruptJob("bad envelope: unknown version %r" % (version,))
    try:
        sender = record["sender"]
        recipients = list(record["recipients"])
        created = float(record["created"])
        job_id = qid if qid is not None else record["id"]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptJob("bad envelope: %s" % e) from None
    if not isinstance(sender, str) or not recipients or not all(
            isinstance(r, str) for r in recipients):
        raise CorruptJob("bad envelope: sender or recipients")
    state, attempts, nexts = (record.get(k, {}) for k in ("state", "attempts", "next"))
    if not isinstance(state, dict):
        raise CorruptJob("bad envelope: state")
    if not isinstance(attempts, dict) or not isinstance(nexts, dict):
        raise CorruptJob("bad envelope: attempts or next")
    return Job(id=job_id, sender=sender, recipients=recipients, created=created,
               peer=record.get("peer", ""), helo=record.get("helo", ""),
               smtputf8=bool(record.get("smtputf8")),
               state={r: _recipient_state(state.get(r, {})) for r in recipients},
               attempts=dict(attempts), next=dict(nexts),
               last_error=record.get("last_error") or "")


def _recipient_state(record):
    if not isinstance(record, dict):
        raise CorruptJob("bad envelope: state")
    status = record.get("status", PENDING)
    if status not in STATUSES:
        raise CorruptJob("bad envelope: status %r" % (status,))
    return RecipientState(status=status, error=record.get("error") or "",
                          relay=record.get("relay") or "", reply=record.get("reply") or "",
                          dsn=record.get("dsn") or "", returned=bool(record.get("returned")))


def to_record(job):
    """The envelope of ``job``, in the current version: a new dict, shared with nothing."""
    return {"version": VERSION, "id": job.id, "sender": job.sender,
            "recipients": list(job.recipients), "created": job.created, "peer": job.peer,
            "helo": job.helo, "smtputf8": job.smtputf8,
            "state": {r: job.state[r].to_record() for r in job.recipients},
            "attempts": dict(job.attempts), "next": dict(job.next),
            "last_error": job.last_error}


def read_record(path):
    """The envelope in the file ``path``, as stored (a dict, not yet checked:
    ``from_record``); CorruptJob if it cannot be read or parsed
    (FileNotFoundError as itself: the job is gone)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CorruptJob("unreadable envelope: %s" % e) from None


# -- the schedule -----------------------------------------------------------

def destination(path):
    """The next hop of a bang path: where the recipient's group goes."""
    return path.split("!", 1)[0].lower() if "!" in path else ""


def backoff(attempts, minimum, maximum):
    """Seconds before the next try after ``attempts`` temporary failures."""
    return doubling(attempts, minimum, maximum)


def _pending_by_destination(job, smarthost):
    groups = {}
    for rcpt in job.recipients:
        if job.state[rcpt].status == PENDING:
            dest = SMARTHOST if smarthost else destination(rcpt)
            groups.setdefault(dest, []).append(rcpt)
    return groups


def due_groups(job, now, smarthost=None):
    """{destination: [pending recipients]} whose next try has come."""
    return {d: rs for d, rs in _pending_by_destination(job, smarthost).items()
            if job.next.get(d, 0) <= now}


def next_due(job, smarthost=None, busy=()):
    """When the earliest pending group not in ``busy`` is due; None if there is none."""
    times = [job.next.get(d, 0) for d in _pending_by_destination(job, smarthost)
             if d not in busy]
    return min(times) if times else None


def nothing_pending(job):
    """Has every recipient its final outcome (delivered or failed)?"""
    return all(job.state[r].status != PENDING for r in job.recipients)


def unreturned(job):
    """Failed recipients whose failure has not gone back to the sender yet."""
    return [r for r in job.recipients
            if job.state[r].status == FAILED and not job.state[r].returned]


def expired(job, now, max_age):
    return now - job.created > max_age


# -- outcomes ---------------------------------------------------------------

@dataclass(frozen=True)
class Note:
    """One recipient's outcome, for the log line the runner writes."""

    rcpt: str
    relay: str  # ``""``: none
    word: str  # sent, bounced, deferred, expired
    reply: str  # the reply or why; not yet made printable


def apply_result(job, dest, result, now, retry_min, retry_max, penalize=True):
    """Note one delivery attempt's ``client.Result`` for ``dest`` in ``job``;
    the recipients' notes, in the result's order.

    A recipient the server deferred stays pending; then the destination's
    attempts grow and its next try waits ``backoff`` (not when
    ``penalize`` is false: an attempt cut off by our own shutdown).
    """
    relay_name = result.target.describe() if result.target is not None else ""
    notes, deferred = [], False
    for r in result.recipients:
        st = job.state[r.address]
        st.relay = relay_name
        if r.status == SENT:
            st.status, st.error, st.reply, word = DELIVERED, "", r.reply, "sent"
        elif r.status == REFUSED:
            st.status, st.error, word = FAILED, r.reply or result.status, "bounced"
            st.dsn = status_of(r.reply, permanent=True)
        else:
            st.status, st.error, word = PENDING, r.reply or result.status, "deferred"
            deferred = True
        notes.append(Note(r.address, relay_name, word, r.reply or result.status or "ok"))
    if deferred and penalize:
        attempts = job.attempts.get(dest, 0) + 1
        job.attempts[dest] = attempts
        job.next[dest] = now + backoff(attempts, retry_min, retry_max)
        job.last_error = " ".join(result.outcome.detail.split())
    return notes


def expire(job, max_age):
    """Give up every pending recipient of a job too old to try again; their notes."""
    notes = []
    for r in job.recipients:
        st = job.state[r]
        if st.status != PENDING:
            continue
        last = st.error or job.last_error or NO_ANSWER
        st.status, st.dsn = FAILED, "4.4.7"
        st.error = GAVE_UP.format(days=round(max_age / 86400), why=last)
        notes.append(Note(r, st.relay, "expired", " ".join(last.split())))
    return notes


def mark_returned(job, rcpts):
    for r in rcpts:
        job.state[r].returned = True
