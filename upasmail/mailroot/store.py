"""The mail root and its durable store (the embedded default delivery).

Layout under ``<root>`` (upas's /mail, relocated):

``tmp/``            spool files being received (removed when done)
``box/<user>/mbox`` local mailboxes (``mbox``; ``mbox.lock`` while one is
                    written, see ``mbox``)
``queue/``          outbound jobs: ``<id>.msg`` (the mailer stream) and
                    ``<id>.env`` (JSON envelope), for the outbound queue
``queue.dump/<MonD>/<n>``  blocked messages kept with ``-s`` (upas [4E]
                    directory names such as ``Mar7``; ``n`` a decimal number)

Durability promise: a message is acknowledged (250) only after every file
it went into, and every directory entry that was created for it, has been
fsynced.  A message being received is kept in memory (``Spool``) unless it
is large.  The ``Batcher`` writes every message finished since the last
batch together (each mailbox locked once, queue jobs with them) and syncs
them together; each message still waits for an fsync that started after
its own write, and replies follow the order batches were written, so the
promise is not weakened.  ``GroupCommit`` does the same for the queue's
state writes.  Both are in ``groupcommit``.

Mailboxes: when another program holds a mailbox (``mbox.Busy``), its
copies wait in the reactor (a ``DeferredLock`` per held mailbox) and are
tried again on the clock (``LOCK_RETRY`` doubling up to
``LOCK_RETRY_MAX``); no thread waits, and other mailboxes go on at once;
after ``LOCK_TIMEOUT`` seconds the message fails (451).  ``prepare``
breaks the mailbox locks a crash left behind and cuts back the partial
message they record (``mbox.recover``).

One thing, the mail root (``MailRoot``: routing a message to mailboxes
and the queue, the writer's batches, held mailboxes, the spool); how a
batch is synced is ``groupcommit``'s, how an mbox is written ``mbox``'s.
"""

import errno
import json
import os
import secrets
import time
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import local, mbox
from .. import logs
from .job import Job, to_record
from .pipemsg import MONTHS
from ..rules.tarpit import doubling
from ..decision import ACCEPT, Accept
from ..interfaces import IMessageStore
from ..relay import Ours, route
# the group commit lives in groupcommit; these names stay importable from here
from .groupcommit import Batcher, GroupCommit, SyncThread, fsync_paths  # noqa: F401

log = Logger(namespace="smtpd")

LOCK_TIMEOUT = 30.0  # seconds a message waits for a mailbox another program holds
LOCK_RETRY = 0.002  # first wait before trying a held mailbox again; it doubles
# (short: the usual holder is another of our processes, for a millisecond)
LOCK_RETRY_MAX = 1.0
SPOOL_MEMORY = 256 * 1024  # a message larger than this is spooled to a file


class Spool:
    """A message being received: in memory up to ``limit`` bytes, then in a
    file under ``tmp/`` written in big pieces.

    Most mail is small: keeping it in memory saves a file's create, write
    and unlink per message; a large one never sits in memory whole.
    """

    __slots__ = ("directory", "name", "limit", "path", "size", "_chunks", "_file")

    def __init__(self, directory, name, limit):
        self.directory = directory
        self.name = name
        self.limit = limit
        self.path = None  # the file, once there is one
        self.size = 0
        self._chunks = []
        self._file = None

    @classmethod
    def from_path(cls, path):
        """A spool for a stream already in a file."""
        spool = cls(os.path.dirname(path), os.path.basename(path), 0)
        spool.path = path
        return spool

    def write(self, data):
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self.limit:
            self._spill()

    def _spill(self):
        self.path = os.path.join(self.directory, self.name)
        self._file = open(self.path, "xb", buffering=256 * 1024)
        self._file.writelines(self._chunks)
        self._chunks = []

    def close(self):
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def data(self):
        """The stream's bytes, or None when it is in a file."""
        return b"".join(self._chunks) if self.path is None else None

    def source(self):
        """What ``mbox.append_many`` reads: the bytes, or the file's path."""
        return self.path if self.path is not None else self.data()

    def materialize(self):
        """The stream in a file (for a -m mailer, a link into the queue)."""
        if self.path is None:
            self._spill()
        self.close()
        return self.path

    def discard(self):
        try:
            self.close()
        except OSError:
            pass
        self._chunks = []
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def write_envelope(path, record):
    """JSON into ``path`` all at once: a temp file, fsync, an atomic rename.

    The caller fsyncs the directory (the new name) when it needs to.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def dump_dir_name(seconds):
    """upas [4E] dump directory: month and unpadded day, e.g. ``Mar7``."""
    t = time.localtime(seconds)
    return "%s%d" % (MONTHS[t.tm_mon - 1], t.tm_mday)


def dump_number(sender, attempt):
    """upas dumpfile: a hash of the sender plus a random number."""
    h = 0
    for b in sender.encode("utf-8", "replace"):
        h = (h * 257 + b) & 0xFFFFFFFF
    return str((h + secrets.randbelow(1 << 31) + attempt) & 0x7FFFFFFF)


def _log_notes(result, notes, log=log):
    """Log, in the reactor thread, what mbox noted in a pool thread."""
    for note in notes:
        log.warn("{note}", note=note, event="store.note")
    return result


def _in_memory(jobs):
    """Only messages held in memory (see ``Batcher``): their writes are a few
    non-blocking system calls each."""
    return all(job[2].path is None if job[0] == "mbox" else job[1].path is None
               for job in jobs)


def _log_notes_only(notes, log):
    _log_notes(None, notes, log)


def _logger(tx):
    """Lines about a message a session accepted carry its session and queue
    ids; others (the queue runner's bounces) keep the module's form."""
    if tx.session:
        return logs.SessionLogger(tx.session).forMessage(tx.queue_id or None)
    return log


@dataclass(frozen=True)
class Route:
    """Where one recipient's copy went, as Postfix logs it (``orig_to``)."""

    relay: str  # "local" (a mailbox) or "queue" (a remote path)
    to: str  # mailbox name or bang path
    orig: str  # the recipient it was for


def by_relay(routes):
    """(mailbox names, remote paths) of ``routes``, each once, in order."""
    users = tuple(dict.fromkeys(r.to for r in routes if r.relay == "local"))
    remote = tuple(dict.fromkeys(r.to for r in routes if r.relay == "queue"))
    return users, remote


def new_id(clock_seconds):
    return "%d.%s" % (int(clock_seconds), secrets.token_hex(6))


@implementer(IMessageStore)
class MailRoot:
    """Built-in delivery into ``<root>``: local mboxes and the queue."""

    def __init__(self, root, run_blocking, clock, domain="localhost", lib=None, ours=None,
                 lock_timeout=LOCK_TIMEOUT, sync_blocking=None, collect=None):
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, "tmp")
        self.boxes = os.path.join(self.root, "box")
        self.queue = os.path.join(self.root, "queue")
        self.mailboxes = local.Mailboxes(self.boxes, lib or os.path.join(self.root, "lib"))
        self.configure(domain, ours)
        self._run = self.run_blocking = run_blocking
        self._clock = clock
        # ``sync_blocking``: where the writer's batches run off the reactor
        # thread (a ``SyncThread`` in the server; ``run_blocking`` if not given)
        # ``collect``: see Batcher (the server gives the reactor's end of turn)
        self.writer = Batcher(sync_blocking or run_blocking, self._write_batch,
                              self._sync_batch, inline=_in_memory, collect=collect)
        self.lock_timeout = lock_timeout
        self.spool_limit = SPOOL_MEMORY
        self.fsync = fsync_paths
        self._mailboxes = {}  # mbox path -> DeferredLock, while another program holds it
        self.enqueued = []  # callables(queue id, Job, inode): the queue runner wakes up
        self._queued = {}  # queue id -> (Job, inode of its .env) until the hooks have it

    def configure(self, domain, ours=None):
        """Our domain (Delivered-To, bare senders) and which alias targets are local.

        Called again on SIGHUP: smtpd.conf may name other domains.
        """
        self.domain = domain
        self.ours = ours or Ours([domain])

    def prepare(self, tidy=True):
        """Create the directories; a root we cannot write is a start-up error.

        Spool files left in ``tmp/`` by a crash were never acknowledged
        (the client got no 250 and will send again), so they go, and so
        does a partial message a crash left in a mailbox.  ``tidy=False``
        (a worker process, started beside a main process that is already
        taking mail) leaves both alone: they may be a live process's.
        """
        self.make_directories()
        for name in os.listdir(self.tmp) if tidy else ():
            try:
                os.unlink(os.path.join(self.tmp, name))
            except OSError as e:
                log.warn("cannot remove stale spool file {name}: {err}", name=name, err=e,
                         event="store.note")
        probe = os.path.join(self.tmp, ".probe.%d" % os.getpid())
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
        if tidy:
            self._recover_mailboxes()
        self.mailboxes.load()

    def make_directories(self):
        """The root's directories, for a tool (upas-runq) that must not tidy
        a running server's spool as ``prepare`` does."""
        for d in (self.root, self.tmp, self.boxes, self.queue):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def _recover_mailboxes(self):
        for user in sorted(os.listdir(self.boxes)):
            notes = []
            try:
                mbox.recover(os.path.join(self.boxes, user, "mbox"), notes)
            except OSError as e:
                notes.append("cannot recover mailbox %s: %s" % (user, e))
            _log_notes(None, notes)

    def open_spool(self):
        """A new spool file for a message being received: (path, file)."""
        path = os.path.join(self.tmp, new_id(self._clock.seconds()))
        return path, open(path, "xb")

    def new_spool(self):
        """A new ``Spool``; its name is the message's queue id."""
        return Spool(self.tmp, new_id(self._clock.seconds()), self.spool_limit)

    @staticmethod
    def queue_id(spool):
        """A message keeps its spool's name as its id, in the queue and the log."""
        return spool.name if isinstance(spool, Spool) else os.path.basename(spool)

    def mailbox_path(self, user):
        return os.path.join(self.boxes, local.fold(user), "mbox")

    def deliver(self, spool, envelope):
        """Store the message for every recipient; fires when durable.

        ``spool`` is a ``Spool`` or the path of a file holding the mailer
        stream.  ``envelope`` has ``local`` (user names) and ``remote``
        (bang paths), ``sender``, ``peer`` and ``helo``.  Local names go
        through the aliases, which may add remote paths.  Fires with
        Accept(routes): what became of each recipient (``Route``), for the
        log.
        """
        if not isinstance(spool, Spool):
            spool = Spool.from_path(spool)
        log = _logger(envelope)
        routes = self.destinations(envelope, log)
        users, remote = by_relay(routes)
        d = self._store(spool, envelope, users, remote, log)
        if remote:
            d.addCallback(self._wake, self.queue_id(spool))
        return d.addCallback(lambda _: Accept(routes))

    def local_user(self, path):
        kind, where = route(path, self.ours)
        return where if kind == "local" else None

    def destinations(self, envelope, log=log):
        """The ``Route`` of every mailbox and remote path after alias expansion.

        A name that is not (or no longer) a known user goes to postmaster,
        through postmaster's own alias: no directory is ever made for a name
        nobody created.
        """
        routes = [Route("queue", path, path) for path in envelope.remote]
        for user in envelope.local:
            try:
                names, paths = self.mailboxes.expand(user, self.local_user)
            except local.ExpansionTooLarge as e:  # grew since RCPT: postmaster sees it
                log.warn("{err}; delivering to postmaster", err=e, event="store.postmaster")
                names, paths = (local.POSTMASTER,), ()
            routes.extend(Route("queue", path, user) for path in paths)
            for name in names:
                if name == local.POSTMASTER or self.mailboxes.is_user(name):
                    routes.append(Route("local", name, user))
                    continue
                log.warn("no mailbox for {user}; delivering to postmaster", user=name,
                         event="store.postmaster")
                pm_names, pm_paths = self.postmaster()
                routes.extend(Route("local", n, user) for n in pm_names)
                routes.extend(Route("queue", p, user) for p in pm_paths)
        return tuple(dict.fromkeys(routes))

    def postmaster(self):
        """(mailboxes, remote paths) for mail that falls back to postmaster.

        postmaster's alias decides; where it loops, is too large or names
        no mailbox, box/postmaster takes the mail rather than nobody.
        """
        try:
            names, paths = self.mailboxes.expand(local.POSTMASTER, self.local_user)
        except local.ExpansionTooLarge:
            return (local.POSTMASTER,), ()
        names = (n if self.mailboxes.is_user(n) else local.POSTMASTER for n in names)
        return tuple(dict.fromkeys(names)), paths

    def _wake(self, result, qid):
        # the runner gets the job it would otherwise read back from disk
        job, inode = self._queued.pop(qid, (None, None))
        for hook in list(self.enqueued):
            try:
                hook(qid, job, inode)
            except Exception:
                log.failure("queue wake-up failed", event="error")
        return result

    def ready(self):
        return ACCEPT

    def dump(self, spool, sender):
        """Keep a blocked message under queue.dump (``-s``); fires with its path."""
        if not isinstance(spool, Spool):
            spool = Spool.from_path(spool)
        return defer.maybeDeferred(spool.materialize).addCallback(
            lambda path: self._run(self._dump, path, sender))

    def _dump(self, spool_path, sender):
        d = os.path.join(self.root, "queue.dump", dump_dir_name(self._clock.seconds()))
        os.makedirs(d, mode=0o700, exist_ok=True)
        for attempt in range(50):
            path = os.path.join(d, dump_number(sender, attempt))
            try:
                os.link(spool_path, path)
            except FileExistsError:
                continue
            fsync_paths([path, d])
            return path
        raise OSError("no free name in %s" % d)

    def _store(self, spool, envelope, users, remote, log=log):
        """Every copy, each through the writer; fires when all are durable.

        A copy that fails fails the message (451) and the copies already
        stored stay, as before: the client's retry may duplicate them.
        """
        deadline = self._clock.seconds() + self.lock_timeout
        copies = [self._append(user, spool, envelope.sender, deadline, log) for user in users]
        if remote:
            copies.append(self.writer.submit(("queue", spool, envelope, remote)))
        return defer.gatherResults(copies, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)

    def _mbox_head(self, sender, user):
        """The mbox's first lines for one copy: Postfix local(8)'s fields added."""
        envelope = local.mbox_envelope(sender, self.domain).encode()
        fields = local.delivery_fields(sender, user, self.domain).encode()

        def head(first):
            # the stream's ``From <sender> <date> ...`` with the sender in ``@`` form
            prefix = b"From %s " % sender.encode()
            rest = first[len(prefix):] if first.startswith(prefix) else first.split(b" ", 2)[-1]
            return mbox.mbox_from_line(b"From %s %s" % (envelope, rest)) + fields

        return head

    def _append(self, user, spool, sender, deadline, log):
        """One mailbox's copy, through the writer with the others.

        A mailbox another program holds is tried again on the clock until
        ``deadline``; while it is held, its copies wait their turn in the
        reactor (a ``DeferredLock``) and one tries at a time.
        """
        path = self.mailbox_path(user)
        head = self._mbox_head(sender, user)
        if path in self._mailboxes:
            return self._held(path, spool, head, deadline, log)
        d = self.writer.submit(("mbox", path, spool, head, 1))
        d.addCallback(_log_notes_only, log)

        def busy(failure):
            failure.trap(mbox.Busy)
            return self._held(path, spool, head, deadline, log, wait=True)

        return d.addErrback(busy)

    def _held(self, path, spool, head, deadline, log, wait=False):
        lock = self._mailboxes.setdefault(path, defer.DeferredLock())
        d = lock.run(self._try_append, path, spool, head, deadline, 2 if wait else 1, log)

        def done(result):
            if not lock.locked and not lock.waiting:
                self._mailboxes.pop(path, None)
            return result

        return d.addBoth(done)

    def _try_append(self, path, spool, head, deadline, tries, log):
        if tries > 1:
            left = deadline - self._clock.seconds()
            if left <= 0:
                # the caller logs this with the session's and message's ids
                raise mbox.Busy(errno.EAGAIN, "locked by another program for %.0f s"
                                % self.lock_timeout, path)
            wait = min(doubling(tries - 1, LOCK_RETRY, LOCK_RETRY_MAX), left)
            d = task.deferLater(self._clock, wait, self.writer.submit,
                                ("mbox", path, spool, head, tries))
        else:
            d = self.writer.submit(("mbox", path, spool, head, tries))
        d.addCallback(_log_notes_only, log)

        def busy(failure):
            failure.trap(mbox.Busy)
            return self._try_append(path, spool, head, deadline, tries + 1, log)

        return d.addErrback(busy)

    def _write_batch(self, jobs):
        """The writer's batch (in a thread): append every mailbox copy, each
        mailbox locked once, and write the queue jobs.  Returns one ``(ok,
        value)`` per job and, for ``_sync_batch``, the files and new
        directories to fsync with the jobs that need each."""
        results = [None] * len(jobs)
        boxes = {}  # mbox path -> indexes of its copies, in order
        for i, job in enumerate(jobs):
            if job[0] == "mbox":
                boxes.setdefault(job[1], []).append(i)
        synced = {}  # path -> indexes of jobs whose durability needs it
        for path, indexes in boxes.items():
            notes = []
            try:
                items = [(jobs[i][2].source(), jobs[i][3]) for i in indexes]
                paths = mbox.append_many(path, items, notes)
                if any(jobs[i][4] > 1 for i in indexes):
                    # an earlier try may have made the mailbox and its directory
                    directory = os.path.dirname(path)
                    paths = paths + [directory, os.path.dirname(directory)]
            except Exception:
                failure = Failure()
                for i in indexes:
                    results[i] = (False, failure)
                continue
            for p in paths:
                synced.setdefault(p, []).extend(indexes)
            for i in indexes:
                results[i] = (True, notes)
        queued = []  # (index, .msg, .env temp file, .env) to finish when synced
        for i, job in enumerate(jobs):
            if job[0] != "queue":
                continue
            try:
                queued.append((i,) + self._enqueue(*job[1:]))
            except Exception:
                results[i] = (False, Failure())
                continue
            results[i] = (True, [])
        return results, synced, queued

    def _sync_batch(self, written):
        """fsync what a batch wrote, each file and directory once; then make
        its queue jobs whole (``_enqueue``)."""
        results, synced, queued = written
        for path, indexes in synced.items():
            try:
                self.fsync([path])
            except Exception:
                failure = Failure()
                for i in indexes:
                    results[i] = (False, failure)
        if not queued:
            return results
        renamed = []
        for i, msg, tmp, env, job in queued:
            try:
                self.fsync([msg, tmp])
                os.rename(tmp, env)
                inode = os.stat(env).st_ino
            except Exception:
                results[i] = (False, Failure())
                continue
            renamed.append((i, job, inode))
        try:
            self.fsync([self.queue])
        except Exception:
            failure = Failure()
            for i, _, _ in renamed:
                results[i] = (False, failure)
            return results
        if self.enqueued:  # the runner gets the job instead of reading it back
            for i, job, inode in renamed:
                self._queued[job.id] = (job, inode)
        return results

    def _enqueue(self, spool, envelope, remote):
        """Write one job's files, unsynced: ``(.msg, .env temp file, .env,
        Job)``.

        ``_sync_batch`` fsyncs both and only then renames the temp file:
        the ``.env`` file appears last, whole and atomically, and marks the
        job; then the queue directory is synced, once for the batch.
        """
        qid = self.queue_id(spool)
        msg = os.path.join(self.queue, qid + ".msg")
        env = os.path.join(self.queue, qid + ".env")
        data = spool.data()
        if data is None:
            os.link(spool.path, msg)
        else:
            with open(msg, "xb") as f:
                f.write(data)
        job = Job(id=qid, sender=envelope.sender, recipients=list(remote),
                  created=self._clock.seconds(), peer=envelope.peer, helo=envelope.helo,
                  smtputf8=envelope.smtputf8)
        with open(env + ".tmp", "w") as f:
            json.dump(to_record(job), f)
        return msg, env + ".tmp", env, job
