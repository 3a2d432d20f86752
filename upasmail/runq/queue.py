"""The outbound queue: upas runq and remotemail, as a Twisted service.

smtpd puts mail for other hosts into ``<root>/queue/`` (``store``): one
job per message, ``<id>.msg`` (the mailer stream) and ``<id>.env`` (JSON
envelope, written last with fsync and an atomic rename).  A job is a
``job.Job``; ``job`` defines the envelope (its version, reading, checking,
migrating, writing), the schedule and how a delivery's result changes a
job (``apply_result``); ``returns`` makes and hands over the DSNs;
``mailq`` lists and deletes for ``upas-mailq``.  This module has the
queue directory (``Queue``) and ``QueueRunner``, which schedules, locks,
calls the client and writes; it is long because the runner is one thing:
its index, its timers, its connections and its writes answer to each
other, and they are read together.
``QueueRunner`` delivers the jobs:

* the recipients of a job are grouped by destination domain (the first
  hop of the bang path), so one connection carries all recipients of a
  domain, as upas remotemail does; with a smarthost, one group;
* each group goes through ``client.deliver`` (MX lookup, STARTTLS when
  offered, AUTH at a smarthost); the result of every recipient is written
  back to ``<id>.env`` (fsync, rename) as soon as the server has answered
  the message, before QUIT or the next message on the connection, so a
  crash or restart retries only recipients that have not had their 250
  (at least once: a crash between that 250 and the fsync sends again);
  when that result leaves nothing to do (every recipient delivered, or
  failed and returned), the job's removal is the durable outcome instead;
* outcome writes and removals of jobs that finish together are one
  ``GroupCommit`` batch: one thread hop, each envelope fsynced, one fsync
  of the queue directory for all;
* connections are reused (``client.Connections``, Postfix's scache): a
  connection whose server finished a message waits up to 2 s for the
  next message to the same destination, at most 100 messages each;
  MAIL and the RCPTs are pipelined when the server offers PIPELINING;
* a job with nothing pending, or with failures not yet returned (a crash
  between saving an outcome and acting on it), is finished when it is
  first looked at;
* temporary failures wait ``retry_min``·2^(attempts-1) seconds, at most
  ``retry_max``; a job older than ``max_queue_age`` (2 days, upas runq)
  gives up; permanent failures and give-ups are returned to the sender
  as an RFC 3464 DSN (``bounce``, ``returns``), never to ``<>``: a bounce that cannot
  be delivered goes to the local ``postmaster`` (from ``double-bounce``),
  and a failed postmaster copy is dropped with a log line; a return that
  cannot be stored goes to the postmaster too, and if that cannot be
  stored either the job waits;
* work on a job that fails (a return nobody could get, a queue that cannot
  be written) is one log line, and the job waits the same backoff before
  it is tried again (``held``): no scan repeats it at once, and a
  one-pass runner tries each job at most once;
* at most ``max_deliveries`` deliveries at once, ``max_per_destination``
  per domain; a job being delivered is ``flock``\\ed, so two runners (the
  service and ``upas-runq``) never send the same job twice at once;
* a job file that cannot be read or parsed is moved to
  ``<root>/queue/corrupt/`` with a log line; ``.msg`` files left without an
  ``.env`` for an hour (a crash while queueing, never acknowledged) too;
* ``upas-mailq --flush`` creates ``queue/.flush``; the runner looks for it
  every few seconds and then retries everything at once.

The runner keeps an index of the jobs (when each is next due), so that
an enqueue, a wake-up and a scan cost nothing per job queued: the enqueue
hook (``MailRoot.enqueued``) hands over the new ``Job``, the
runner's own outcomes give each job its next time, and a scan takes only
the jobs that are due.  The directory is listed (names only) at start-up
and for a flush, and at a timed scan (``queue_scan``) when its mtime
changed: that is how a job another program queued (stdio smtpd, a second
server), delivered or deleted (``upas-runq``, ``upas-mailq --delete``) is
noticed.  Envelopes are read when a job's turn comes, never to scan; a
job handed over by the hook is checked against the envelope's inode
once the job is locked, so a second runner's write is never overlooked.

The server records its routing in ``<root>/routing.json`` for
``upas-runq`` (``record_routing``, ``reconcile``).

Log lines (namespace ``queue``): ``<id>: to=<rcpt> relay=(<mx>:<ip>)|none
status=sent|deferred|bounced (<reply>)`` (for ``sent`` the server's final
reply to the message), ``<id>: sender non-delivery notification: <bounce
id>`` (as Postfix), plus queueing, bouncing and quarantine; the
client's lines for a job start with ``<id>:`` too.

Only names of ``store.new_id``'s form are queue ids (``QUEUE_ID``): no
other name, from the command line or the queue directory, becomes a path.
"""

import copy
import errno
import fcntl
import heapq
import json
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..smtp import client, factotum
from ..mailroot import crashpoint
from . import returns
from ..mailroot import job as _job
from ..interfaces import IMessageStore
# re-exported: names this module had before ``job``, ``mailq`` and
# ``returns`` took them over
from ..mailroot.job import (  # noqa: F401
    DELIVERED, FAILED, PENDING, CorruptJob, Job, backoff, destination, from_record, to_record)
from ..logs import printable
from .mailq import delete, listing  # noqa: F401
from .returns import (  # noqa: F401
    DOUBLE_BOUNCE, POSTMASTER, NotReturned, notification_place, return_path)
from ..mailroot.store import GroupCommit, fsync_paths, write_envelope

log = Logger(namespace="queue")

CORRUPT = "corrupt"
FLUSH = ".flush"
ROUTING = "routing.json"  # in the mail root
FLUSH_POLL = 5.0
# jobs looked at in one turn of the reactor: a start-up over a long queue
# (every envelope read once) lets the server answer in between
SCAN_BATCH = 500
ORPHAN_AGE = 3600.0
# the only names a job has: ``store.new_id``'s seconds, a dot, 12 hex digits
# (the spool file's name).  Nothing else becomes a path in the queue.
QUEUE_ID = re.compile(r"[0-9]+\.[0-9a-f]{12}")
class BadQueueId(ValueError):
    """A name that is not a queue id (``../precious``): never made a path."""

    def __init__(self, qid):
        ValueError.__init__(self, "%s: not a queue id" % printable(qid))


def is_queue_id(name):
    return isinstance(name, str) and QUEUE_ID.fullmatch(name) is not None


# -- decisions (pure) -----------------------------------------------------
# The schedule is ``job``'s; these take a ``Job`` or, as before ``job``
# existed, an envelope as a dict (``normalize``).

def _typed(job):
    return job if isinstance(job, Job) else from_record(job)


def normalize(record, qid):
    """The envelope ``record`` checked and migrated, as a dict; CorruptJob if bad."""
    return to_record(from_record(record, qid))


def due_groups(job, now, smarthost=None):
    return _job.due_groups(_typed(job), now, smarthost)


def next_due(job, smarthost=None, busy=()):
    return _job.next_due(_typed(job), smarthost, busy)


def nothing_pending(job):
    return _job.nothing_pending(_typed(job))


def unreturned(job):
    return _job.unreturned(_typed(job))


def routing_of(settings):
    """What decides where queued mail goes and in whose name (``queue/.routing``)."""
    return {"sysname": settings.identity.sysname, "domain": settings.dom,
            "ourdomains": list(settings.ourdomains), "smarthost": settings.smarthost,
            "smarthost_user": settings.relay_user,
            "relay_auth_file": settings.relay_auth_file, "mx_port": settings.mx_port}


def reconcile(recorded, own, given):
    """A second runner's routing: its own for the keys in ``given``, the
    server's ``recorded`` routing for the rest; (routing, [keys that differ])."""
    routing, differ = dict(own), []
    for key in own:
        if key not in recorded:
            continue
        if key not in given:
            routing[key] = recorded[key]
        elif own[key] != recorded[key]:
            differ.append(key)
    return routing, differ


# -- files ----------------------------------------------------------------

@dataclass(eq=False)
class Write:
    """One change to a job's files: its envelope (``record``, ``job.to_record``'s)
    or, with None, removal."""

    qid: str
    record: Optional[dict]


class Queue:
    """The queue directory: listing, loading, saving, quarantine, deletion."""

    def __init__(self, directory):
        self.dir = directory
        self.corrupt_dir = os.path.join(directory, CORRUPT)

    def paths(self, qid):
        if not is_queue_id(qid):
            raise BadQueueId(qid)
        return os.path.join(self.dir, qid + ".msg"), os.path.join(self.dir, qid + ".env")

    def _names(self):
        try:
            return os.listdir(self.dir)
        except FileNotFoundError:
            return []

    def ids(self):
        return sorted(n[:-4] for n in self._names() if n.endswith(".env") and is_queue_id(n[:-4]))

    def strays(self):
        """Envelopes whose names are no queue ids: not jobs of ours."""
        return sorted(n for n in self._names() if n.endswith(".env") and not is_queue_id(n[:-4]))

    def load(self, qid):
        """The job's envelope as stored (a dict: ``job`` reads it as a ``Job``)."""
        msg, env = self.paths(qid)
        record = _job.read_record(env)
        if not os.path.exists(msg):
            raise CorruptJob("message file missing")
        return record

    def job(self, qid):
        """The ``Job`` ``qid``, of whatever version it was written in; CorruptJob if bad."""
        return from_record(self.load(qid), qid)

    def save(self, job):
        """Write the envelope (of a ``Job``, or a dict) durably, in the current
        version: temp file, fsync, rename, fsync the directory."""
        job = _typed(job)
        self.apply([Write(job.id, to_record(job))])

    def remove(self, qid):
        self.apply([Write(qid, None)])

    def apply(self, writes):
        """Envelope writes and removals, in order, then one fsync of the
        directory for all of them (``GroupCommit`` hands over a batch)."""
        for w in writes:
            msg, env = self.paths(w.qid)
            if w.record is not None:
                write_envelope(env, w.record)
                continue
            # the envelope goes first: a crash in between leaves an orphan
            # message (quarantined later), never a job without its message
            for path in (env, msg):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        fsync_paths([self.dir])

    def quarantine(self, stem, why):
        """Move ``<stem>.msg`` and ``<stem>.env`` into ``corrupt/``.

        ``stem`` is a queue id or a name listed in the queue directory
        (no ``/``): both stay in it.
        """
        if "/" in stem or "\0" in stem:
            raise BadQueueId(stem)
        os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
        for name in (stem + ".msg", stem + ".env"):
            try:
                os.rename(os.path.join(self.dir, name), os.path.join(self.corrupt_dir, name))
            except FileNotFoundError:
                pass
        log.error("{id}: corrupt job moved to queue/corrupt: {why}", id=printable(stem),
                  why=why, event="queue.corrupt", queue_id=printable(stem))

    def tidy(self, now):
        """Start-up: drop half-written envelopes; quarantine old orphan messages."""
        try:
            names = set(os.listdir(self.dir))
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.dir, name)
            if name.endswith(".env.tmp"):
                os.unlink(path)
            elif name.endswith(".msg") and name[:-4] + ".env" not in names:
                try:
                    if now - os.stat(path).st_mtime > ORPHAN_AGE:
                        self.quarantine(name[:-4], "message without envelope")
                except FileNotFoundError:
                    pass

    def lock(self, qid):
        """An exclusive flock on the job's message, or None if someone holds it."""
        msg, _ = self.paths(qid)
        try:
            fd = os.open(msg, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def flush_requested(self):
        path = os.path.join(self.dir, FLUSH)
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def request_flush(self):
        # O_EXCL: a ``.flush`` that is there (even a symlink planted there)
        # already asks for a flush, and nothing it points to is opened
        try:
            os.close(os.open(os.path.join(self.dir, FLUSH),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            pass


def record_routing(root, settings):
    """The server notes its routing in the mail root, so ``upas-runq`` can route alike.

    A server with ``-m`` queues nothing, so it leaves the record to the one
    that does.  A changed record (a reload, or another server on the same
    root that routes otherwise) is logged with what changed: two servers
    that queue into one root should route alike.
    """
    if settings.mailer is not None:
        return
    mine = routing_of(settings)
    before = recorded_routing(root)
    changed = sorted(k for k in mine if before is not None and before.get(k) != mine[k])
    if changed:
        log.warn("{path}: routing record changed ({keys}); upas-runq follows the new one",
                 path=os.path.join(root, ROUTING), keys=", ".join(changed), event="queue.routing")
    write_envelope(os.path.join(root, ROUTING), mine)


_ROUTING_TYPES = {"sysname": str, "domain": str, "ourdomains": list,
                  "smarthost": (str, type(None)), "smarthost_user": (str, type(None)),
                  "relay_auth_file": (str, type(None)), "mx_port": int}


def recorded_routing(root):
    """The server's routing record; None when there is none or it is unreadable."""
    try:
        with open(os.path.join(root, ROUTING), "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(
            isinstance(record.get(k), t) for k, t in _ROUTING_TYPES.items()):
        return None  # not written by us: route with our own options, and say so
    return record


# -- the runner -------------------------------------------------------------

class QueueRunner(service.Service):
    """Delivers queued jobs; ``once=True`` makes one pass and then stops."""

    name = "queue"

    def __init__(self, root, settings, reactor, resolver, clock=None, deliver=None,
                 ours=(), once=False, flush=False):
        self.root = root
        self.queue = Queue(root.queue)
        self.settings = settings
        self.reactor = reactor
        self.resolver = resolver
        self.clock = clock or reactor
        self.deliver = deliver or client.deliver
        # our own addresses are never dialled (upas: an illegal address).
        # Given as a function (``mxdial.local_addresses``: getaddrinfo may
        # wait on DNS) they are found once, in a thread, before the first
        # delivery; until then ``ours`` is None
        self.ours = None if callable(ours) else tuple(ours)
        self._find_ours = ours if callable(ours) else None
        self._finding_ours = None
        self.once = once
        self.flush_all = flush
        self.jobs = {}  # qid -> live Job while deliveries are under way
        self.locks = {}  # qid -> fd holding the job's flock
        self.inflight = {}  # (qid, dest) -> Deferred
        self.per_dest = Counter()
        self.wires = set()
        # as many idle connections per destination as may be busy at once
        self.connections = client.Connections(self.clock,
                                              max_idle=settings.max_per_destination)
        # outcome writes and removals of jobs that finish together share
        # one thread hop and one fsync of the queue directory
        self.writes = GroupCommit(root.run_blocking, lambda ws: self.queue.apply(ws))
        self.stopping = False
        self.done = defer.Deferred()  # once=True: fires after the pass
        self._scan_call = None
        self._poll_call = None
        self._saving = set()  # envelope writes under way
        self._idle_waiters = []
        self._save_locks = {}  # qid -> DeferredLock
        # qid -> (failed tries, when it may be tried again): work on the job
        # raised (a full disk, a mailbox that cannot be written); it waits
        # the usual backoff, so a scan never repeats it at once
        self.held = {}
        self.started = set()  # once=True: (qid, dest) already tried in this pass
        # the index: every job we know of, and when to look at it next
        # (``due_at``; ``_heap`` orders it, stale entries are skipped), so a
        # scan touches only what is due.  ``fresh`` holds the jobs the
        # enqueue hook handed over (with the envelope's inode, to notice a
        # second runner's write), ``blocked`` the jobs waiting for a slot at
        # a destination, ``elsewhere`` the jobs another runner holds.
        self.known = set()
        self.due_at = {}
        self._heap = []
        self.fresh = {}
        self.blocked = {}
        self.elsewhere = set()
        self.flushing = set()
        self._listed = None  # the queue directory's mtime when it was last listed
        self._relist_at = 0.0  # when a scan next checks that mtime

    # -- service ---------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self.stopping = False
        self.queue.tidy(self.clock.seconds())
        self._reindex(self.clock.seconds(), force=True)
        if IMessageStore.providedBy(self.root) and self.wake not in self.root.enqueued:
            self.root.enqueued.append(self.wake)
        self._schedule(0)
        if not self.once:
            self._poll_call = self.clock.callLater(FLUSH_POLL, self._poll)

    def stopService(self):
        service.Service.stopService(self)
        self.stopping = True
        for call in (self._scan_call, self._poll_call):
            if call is not None and call.active():
                call.cancel()
        self._scan_call = self._poll_call = None
        idle = self.connections.wires()
        closing = self.connections.close()  # idle ones say QUIT
        for wire in list(self.wires - idle):
            wire.transport.abortConnection()  # their recipients stay pending
        if IMessageStore.providedBy(self.root) and self.wake in self.root.enqueued:
            self.root.enqueued.remove(self.wake)
        return defer.DeferredList(list(self.inflight.values()) + [closing]).addCallback(
            lambda _: defer.DeferredList(list(self._saving)))

    def whenIdle(self):
        """Fires once no delivery is under way (now, if none is)."""
        if not self.inflight:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def wake(self, qid=None, record=None, inode=None):
        """New mail (the enqueue hook: its id, ``Job`` and envelope inode), or
        a nudge (no id: look at the disk, where another program may have
        written); O(1) for new mail: nothing is read."""
        if self.stopping:
            return
        if qid is None:
            self._listed = None  # the next scan lists the directory
        elif is_queue_id(qid):
            if record is not None:
                try:
                    # an embedder's store may hand over an envelope (a dict)
                    job = copy.deepcopy(record) if isinstance(record, Job) else from_record(
                        record, qid)
                    self.fresh[qid] = (job, inode)
                except CorruptJob:
                    pass  # read from disk when its turn comes, and judged there
            self._due(qid, self.clock.seconds())
        self._schedule(0)

    def flush(self):
        """Retry everything now (``upas-mailq --flush``)."""
        self.flush_all = True
        self.wake()

    # -- the index ---------------------------------------------------------

    def _due(self, qid, when):
        """Look at ``qid`` at ``when`` (earlier than a time it already has)."""
        self.known.add(qid)
        if self.due_at.get(qid, when + 1) <= when:
            return
        self.due_at[qid] = when
        heapq.heappush(self._heap, (when, qid))

    def _forget(self, qid):
        self.known.discard(qid)
        self.due_at.pop(qid, None)
        self.fresh.pop(qid, None)
        self.elsewhere.discard(qid)
        self.flushing.discard(qid)

    def _pop_due(self, now):
        """The next job whose time has come, or None; stale entries go."""
        while self._heap and self._heap[0][0] <= now:
            when, qid = heapq.heappop(self._heap)
            if self.due_at.get(qid) == when:
                del self.due_at[qid]
                return qid
        return None

    def _reindex(self, now, force=False, flush=False):
        """Bring the index in line with the directory, when it changed (a job
        another program queued, delivered or deleted) or when ``force``d.

        One ``listdir`` and one ``stat``; no envelope is read here (a job
        new to us is looked at, and read, when its turn comes).
        """
        try:
            mtime = os.stat(self.queue.dir).st_mtime_ns
        except FileNotFoundError:
            return
        if not force and mtime == self._listed:
            return
        self._listed = mtime  # before listing: a change meanwhile is seen next time
        for name in self.queue.strays():
            try:
                self.queue.quarantine(name[:-4], "not a queue id")
            except OSError as e:
                log.error("{name}: cannot move it to queue/corrupt: {err}", name=name, err=e,
                          event="queue.corrupt")
        on_disk = set(self.queue.ids())
        for qid in [q for q in self.known if q not in on_disk and q not in self.jobs]:
            self._forget(qid)
        for qid in on_disk:
            if flush:
                self.flushing.add(qid)
                self._due(qid, now)
            elif qid not in self.known:
                self._due(qid, now)  # news to us: read when its turn comes

    def _poll(self):
        self._poll_call = None
        if self.stopping:
            return
        if self.queue.flush_requested():
            log.info("flush requested: retrying every queued message now", event="queue.flush")
            self.flush()
        self._poll_call = self.clock.callLater(FLUSH_POLL, self._poll)

    def _schedule(self, delay):
        if self.stopping:
            return
        if self._scan_call is not None and self._scan_call.active():
            if self._scan_call.getTime() <= self.clock.seconds() + delay:
                return
            self._scan_call.cancel()
        self._scan_call = self.clock.callLater(delay, self.scan)

    # -- scanning --------------------------------------------------------

    def scan(self):
        self._scan_call = None
        if self.stopping:
            return
        now = self.clock.seconds()
        flush, self.flush_all = self.flush_all, False
        if flush:
            self.held.clear()
        try:
            earliest = self._scan_jobs(now, flush)
        except Exception:
            # the queue directory itself: look again after the usual wait
            _log_trouble(Failure(), "cannot scan the queue", self.settings.retry_min)
            earliest = now + self.settings.retry_min
        if self.once:
            if earliest is not None and earliest <= now and not self._full():
                self._schedule(0)  # the rest of what is due, after other events
            elif not self.inflight:
                self._finish_pass()
            return
        wait = self.settings.queue_scan
        if earliest is not None and not self._full():
            # when full, a delivery that ends scans again: no busy loop
            wait = min(wait, max(earliest - now, 0))
        self._schedule(wait)

    def _scan_jobs(self, now, flush):
        """Consider the jobs that are due; return when the index next has one.

        The directory is listed only at start-up, for a flush, and when it
        changed since the last timed look (``queue_scan``): a wake-up for
        new mail reads nothing but what it was handed.
        """
        if flush:
            self.held.clear()
            self._reindex(now, force=True, flush=True)
        elif self._listed is None or now >= self._relist_at:
            self._reindex(now)
            self._relist_at = now + self.settings.queue_scan
        for qid in list(self.elsewhere):  # held by another runner: ask again
            self.elsewhere.discard(qid)
            self._due(qid, now)
        for _ in range(SCAN_BATCH):
            if self._full():
                break
            qid = self._pop_due(now)
            if qid is None:
                break
            self._look(qid, now)
        return self._heap[0][0] if self._heap else None

    def _look(self, qid, now):
        """Consider one job and put it back in the index for its next time."""
        flush = qid in self.flushing
        self.flushing.discard(qid)
        try:
            try:
                when = self._consider(qid, now, flush)
            except CorruptJob as e:
                self._forget(qid)
                self._quarantine(qid, str(e))
                return
        except FileNotFoundError:
            self._forget(qid)  # deleted meanwhile (upas-mailq --delete)
            return
        except Exception:
            when = self._hold(qid, Failure(), "cannot handle this job")
        if when is not None:
            self._due(qid, when)

    def _hold(self, qid, failure, what):
        """Work on a job failed: log it once and hold the job for the usual backoff."""
        tries = self.held.get(qid, (0, 0))[0] + 1
        wait = backoff(tries, self.settings.retry_min, self.settings.retry_max)
        until = self.clock.seconds() + wait
        self.held[qid] = (tries, until)
        _log_trouble(failure, "%s: %s" % (qid, what), wait)
        return until

    def _full(self):
        return len(self.inflight) >= self.settings.max_deliveries

    def _consider(self, qid, now, flush):
        """Start what is due in one job; return when it next wants attention."""
        held = self.held.get(qid)
        if held is not None and held[1] > now:
            return held[1]
        job, inode = self.jobs.get(qid), None
        if job is None:
            job, inode = self.fresh.pop(qid, (None, None))
        if job is None:
            job = self.queue.job(qid)
        smarthost = self.settings.smarthost
        idle = not any(k[0] == qid for k in self.inflight)
        if idle and (qid, "") in self.started:
            return None  # one pass: its finishing was tried already
        if idle and _job.expired(job, now, self.settings.max_queue_age):
            self._expire(job, now)
            return None
        if idle and (_job.nothing_pending(job) or _job.unreturned(job)):
            # a run was cut off after saving an outcome and before acting on it
            if _job.nothing_pending(job):
                self._finish_off(job, self._complete, "finishing the job")
            else:
                self._finish_off(job, self._return_failures, "returning failures")
            return None
        if flush:
            job.next = {}
        full = False
        for dest, rcpts in _job.due_groups(job, now, smarthost).items():
            if (qid, dest) in self.inflight or (qid, dest) in self.started:
                continue
            if self._full():
                full = True  # a delivery that ends scans again
                break
            if self.per_dest[dest] >= self.settings.max_per_destination:
                # a delivery to ``dest`` that ends brings it back
                self.blocked.setdefault(dest, deque()).append(qid)
                continue
            if qid not in self.locks:
                fd = self.queue.lock(qid)
                if fd is None:
                    self.fresh.pop(qid, None)
                    self._elsewhere(qid)
                    return None
                self.locks[qid] = fd
                if inode is not None and inode != self._inode(qid):
                    self._unlock(qid)  # another runner wrote it first: read that
                    return self._consider(qid, now, flush)
                self.jobs[qid] = job
            self._start(job, dest, rcpts)
        if inode is not None and qid not in self.locks:
            self.fresh[qid] = (job, inode)  # not started: keep it for its turn
        if full:
            return now
        busy = {dest for (q, dest) in self.inflight if q == qid}
        when = _job.next_due(job, smarthost, busy)
        return when if when is not None and when > now else None

    def _elsewhere(self, qid):
        """Another runner holds the job: ask again at the next scan; a job
        that is gone is forgotten."""
        _, env = self.queue.paths(qid)
        if os.path.exists(env):
            self.elsewhere.add(qid)
        else:
            self._forget(qid)

    def _inode(self, qid):
        try:
            return os.stat(self.queue.paths(qid)[1]).st_ino
        except FileNotFoundError:
            return None

    def _quarantine(self, qid, why):
        self._unlock(qid)
        self.queue.quarantine(qid, why)

    def _unlock(self, qid):
        fd = self.locks.pop(qid, None)
        self.jobs.pop(qid, None)
        if fd is None:
            return
        if qid in self.known:
            os.close(fd)
        else:
            # the last close of a removed job's message frees its blocks: a
            # file-system transaction, kept off the reactor
            self.root.run_blocking(os.close, fd).addErrback(
                lambda f: log.failure("closing a removed job's message", f, event="error"))

    def _reschedule(self, qid):
        """A job's work ended: its next time, from the job in hand (no read)."""
        if qid not in self.known:
            return  # removed
        held = self.held.get(qid)
        if held is not None:
            self._due(qid, held[1])
            return
        job = self.jobs.get(qid)
        when = _job.next_due(job, self.settings.smarthost) if job is not None else None
        if when is None:
            when = self.clock.seconds()  # left to finish off, or a job we lack
        self._due(qid, when)

    def _unblock(self, dest):
        """A slot at ``dest`` is free: the first job waiting for one is due."""
        waiting = self.blocked.get(dest)
        while waiting:
            qid = waiting.popleft()
            if qid in self.known:
                self._due(qid, self.clock.seconds())
                break
        if not waiting:
            self.blocked.pop(dest, None)

    # -- delivering ------------------------------------------------------

    def _knowOurs(self):
        """Fires once ``ours`` is known: at once, or when the lookup is done."""
        if self.ours is not None:
            return defer.succeed(None)
        if self._finding_ours is None:
            self._finding_ours = self.root.run_blocking(self._find_ours)
            self._finding_ours.addCallbacks(self._foundOurs, self._oursUnknown)
        known = defer.Deferred()
        self._finding_ours.addCallback(lambda _: known.callback(None))
        return known

    def _foundOurs(self, addresses):
        self.ours = tuple(addresses)

    def _oursUnknown(self, failure):
        log.failure("cannot find this host's addresses", failure, event="error")
        self.ours = ()

    def client_options(self):
        s = self.settings
        auth = bool(s.smarthost and (s.relay_user or s.relay_auth_file))

        def credentials(server, user):
            return factotum.lookup(server, user or s.relay_user, s.relay_auth_file)

        return client.ClientOptions(
            sysname=s.identity.sysname, domain=s.dom, starttls=s.outbound_tls, auth=auth,
            user=s.relay_user, credentials=credentials, ipv6=s.ipv6, ours=self.ours)

    def dial_string(self, dest):
        if self.settings.smarthost:
            return self.settings.smarthost
        return "net!%s!%d" % (dest, self.settings.mx_port)

    def _start(self, job, dest, rcpts):
        self._track(job.id, dest, defer.maybeDeferred(self._attempt, job, dest, rcpts),
                    "delivery to %s" % dest)

    def _track(self, qid, dest, d, what):
        """Count a delivery (or finishing a job) as under way until ``d`` fires.

        When it fails, the job is held (``_hold``); when it succeeds, it is
        no longer.  Either way the next scan comes at once, for the slot.
        """
        self.per_dest[dest] += 1
        self.inflight[(qid, dest)] = d
        if self.once:
            self.started.add((qid, dest))

        def finished(result):
            self.inflight.pop((qid, dest), None)
            self.per_dest[dest] -= 1
            if not self.per_dest[dest]:
                del self.per_dest[dest]
            if not any(k[0] == qid for k in self.inflight):
                if qid in self.locks:
                    self._reschedule(qid)
                self._unlock(qid)
            self._unblock(dest)
            self._schedule(0)  # a slot is free: see what else is due
            if not self.inflight:
                waiters, self._idle_waiters = self._idle_waiters, []
                for w in waiters:
                    w.callback(None)
            return None

        d.addCallbacks(lambda _: self.held.pop(qid, None),
                       lambda f: self._hold(qid, f, "returning failures" if f.check(
                           NotReturned) else what + " failed"))
        d.addBoth(finished)

    @defer.inlineCallbacks
    def _attempt(self, job, dest, rcpts):
        qid = job.id
        msg, _ = self.queue.paths(qid)
        recorded = []

        def outcome(result):
            recorded.append(result)
            return self._record(job, dest, result)

        yield self._knowOurs()
        with open(msg, "rb") as source:
            result = yield self.deliver(source, self.dial_string(dest), job.sender,
                                        rcpts, self.client_options(), self.reactor,
                                        self.resolver, self.clock, watch=self._watch,
                                        outcome=outcome, queue_id=qid,
                                        smtputf8=job.smtputf8,
                                        connections=self.connections)
        if not recorded:  # no conversation took place (DNS, dialling)
            yield self._record(job, dest, result)
        if qid not in self.jobs:
            return  # deleted while we were away
        if _job.nothing_pending(job):
            yield self._complete(job)
        else:
            yield self._return_failures(job)  # now, not when the others are done

    def _record(self, job, dest, result):
        """Note every recipient's outcome in the envelope; fires once it is durable."""
        qid = job.id
        if qid not in self.jobs:
            return defer.succeed(None)
        now = self.clock.seconds()
        # cut off by our own shutdown: no penalty
        notes = _job.apply_result(job, dest, result, now, self.settings.retry_min,
                                  self.settings.retry_max, penalize=not self.stopping)
        for n in notes:
            log.info("{id}: to={rcpt} relay={relay} status={word} ({reply})",
                     id=qid, rcpt=printable(n.rcpt), relay=n.relay or "none", word=n.word,
                     reply=printable(n.reply, client.LOG_LIMIT), event="queue.delivery",
                     queue_id=qid, status=n.word, delay=now - job.created)
        others = any(q == qid and d != dest for q, d in self.inflight)
        if _job.nothing_pending(job) and not _job.unreturned(job) and not others:
            d = self._remove(qid)  # all done: the removal is the durable outcome
        else:
            d = self._save(job)
        return d.addCallback(lambda _: crashpoint.reached("queue.after-save"))

    def _watch(self, wire):
        self.wires.add(wire)
        wire.whenClosed().addCallback(lambda _: self.wires.discard(wire))

    def _save(self, job):
        """Write a snapshot of the envelope; writes of one job never overlap."""
        qid = job.id
        lock = self._save_locks.setdefault(qid, defer.DeferredLock())
        d = lock.run(self.writes.sync, [Write(qid, to_record(job))])
        self._saving.add(d)

        def done(result):
            self._saving.discard(d)
            if not lock.locked and not lock.waiting:
                self._save_locks.pop(qid, None)
            return result

        return d.addBoth(done)

    def _written(self, qid):
        """Fires once the writes of ``qid`` under way are durable."""
        lock = self._save_locks.get(qid)
        return lock.run(lambda: None) if lock is not None else defer.succeed(None)

    @defer.inlineCallbacks
    def _return_failures(self, job):
        """Return the failed recipients not yet returned; then remember that."""
        qid = job.id
        failed = _job.unreturned(job)
        if not failed:
            return
        route = return_path(job.sender)
        if route is None:
            log.error("{id}: the postmaster's copy of a failed bounce could not be "
                      "delivered either; discarded: {rcpts}", id=qid, rcpts=", ".join(failed),
                      event="queue.bounce_failed", queue_id=qid)
        else:
            # durable before it is marked
            yield returns.give_back(self.root, self.settings, self.clock, job,
                                    self.queue.paths(qid)[0], failed, *route)
        _job.mark_returned(job, failed)
        yield self._save(job)

    @defer.inlineCallbacks
    def _complete(self, job):
        """Every recipient is done: return the failures, then remove the job."""
        qid = job.id
        yield self._return_failures(job)
        if qid in self.known:  # not removed with its last outcome already
            yield self._remove(qid)

    def _remove(self, qid):
        """Remove the job once its earlier writes are done; fires when durable."""
        d = self._written(qid)  # a removal is the last word
        d.addCallback(lambda _: self.writes.sync([Write(qid, None)]))

        def removed(_):
            self._forget(qid)
            log.info("{id}: removed from the queue", id=qid, event="queue.removed", queue_id=qid)

        return d.addCallback(removed)

    def _expire(self, job, now):
        qid = job.id
        for n in _job.expire(job, self.settings.max_queue_age):
            log.info("{id}: to={rcpt} status=expired ({why})", id=qid, rcpt=n.rcpt, why=n.reply,
                     event="queue.delivery", queue_id=qid, relay=n.relay or "none",
                     status="expired", reply=n.reply, delay=now - job.created)
        self._finish_off(job, self._complete, "giving up")

    def _finish_off(self, job, work, what):
        """Run ``work(job)`` on a job that has no delivery under way, holding its lock."""
        qid = job.id
        fd = self.queue.lock(qid)
        if fd is None:
            return  # another runner has it
        self.locks[qid] = fd
        self.jobs[qid] = job
        self._track(qid, "", defer.maybeDeferred(work, job), what)

    def _finish_pass(self):
        if not self.done.called:
            self.done.callback(None)


def _log_trouble(failure, what, wait):
    """One line for trouble of the system (an OSError) or a return that
    failed; a traceback for anything else, a bug."""
    if failure.check(OSError, NotReturned):
        log.error("{what}: {err}; next try in {wait:.0f} s", what=what, err=failure.value,
                  wait=wait, event="queue.trouble")
    else:
        log.failure("{what}; next try in {wait:.0f} s", failure, what=what, wait=wait,
                    event="queue.trouble")


def now():
    return time.time()
