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
fsynced.  ``GroupCommit`` lets many messages that finish together share
one batch of fsyncs: each caller still waits for a batch that started after
its own write, so the promise is not weakened.

Mailboxes: appends to one mailbox are serialised here, in the reactor (a
``DeferredLock`` per mailbox), so at most one pool thread works on a
mailbox at a time.  When another program holds a mailbox, the retries are
scheduled on the clock (``LOCK_RETRY`` doubling up to ``LOCK_RETRY_MAX``)
and no thread waits; after ``LOCK_TIMEOUT`` seconds the message fails
(451).  ``prepare`` breaks the mailbox locks a crash left behind and cuts
back the partial message they record (``mbox.recover``).
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

from . import local, logs, mbox
from .pipemsg import MONTHS
from .tarpit import doubling
from .decision import ACCEPT, Accept
from .relay import Ours, route

log = Logger(namespace="smtpd")

LOCK_TIMEOUT = 30.0  # seconds a message waits for a mailbox another program holds
LOCK_RETRY = 0.05  # first wait before trying a held mailbox again; it doubles
LOCK_RETRY_MAX = 1.0


def fsync_paths(paths):
    """fsync each file or directory once (an fd on the inode is enough)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GroupCommit:
    """Batch fsync requests; at most one batch runs at a time.

    ``run_blocking(f, *args)`` runs f off the reactor thread and returns a
    Deferred (``deferToThreadPool`` in production, synchronous in tests).
    """

    def __init__(self, run_blocking, fsync=fsync_paths):
        self._run = run_blocking
        self._fsync = fsync
        self._waiting = []
        self._busy = False
        self.batches = 0

    def sync(self, paths):
        d = defer.Deferred()
        self._waiting.append((list(paths), d))
        self._kick()
        return d

    def _kick(self):
        if self._busy or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        paths = list(dict.fromkeys(p for ps, _ in batch for p in ps))
        self._busy = True
        self.batches += 1

        def done(result):
            self._busy = False
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            self._kick()

        defer.maybeDeferred(self._run, self._fsync, paths).addBoth(done)


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
        log.warn("{note}", note=note)
    return result


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


class MailRoot:
    """Built-in delivery into ``<root>``: local mboxes and the queue."""

    def __init__(self, root, run_blocking, clock, domain="localhost", lib=None, ours=None,
                 lock_timeout=LOCK_TIMEOUT):
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, "tmp")
        self.boxes = os.path.join(self.root, "box")
        self.queue = os.path.join(self.root, "queue")
        self.mailboxes = local.Mailboxes(self.boxes, lib or os.path.join(self.root, "lib"))
        self.configure(domain, ours)
        self._run = self.run_blocking = run_blocking
        self._clock = clock
        self.commit = GroupCommit(run_blocking)
        self.lock_timeout = lock_timeout
        self._mailboxes = {}  # mbox path -> DeferredLock, while in use
        self.enqueued = []  # callables(queue id, record, inode): the queue runner wakes up
        self._queued = {}  # queue id -> (record, inode of its .env) until the hooks have it

    def configure(self, domain, ours=None):
        """Our domain (Delivered-To, bare senders) and which alias targets are local.

        Called again on SIGHUP: smtpd.conf may name other domains.
        """
        self.domain = domain
        self.ours = ours or Ours([domain])

    def prepare(self):
        """Create the directories; a root we cannot write is a start-up error.

        Spool files left in ``tmp/`` by a crash were never acknowledged
        (the client got no 250 and will send again), so they go, and so
        does a partial message a crash left in a mailbox.
        """
        self.make_directories()
        for name in os.listdir(self.tmp):
            try:
                os.unlink(os.path.join(self.tmp, name))
            except OSError as e:
                log.warn("cannot remove stale spool file {name}: {err}", name=name, err=e)
        probe = os.path.join(self.tmp, ".probe.%d" % os.getpid())
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
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

    @staticmethod
    def queue_id(spool_path):
        """A message keeps its spool file's name as its id, in the queue and the log."""
        return os.path.basename(spool_path)

    def mailbox_path(self, user):
        return os.path.join(self.boxes, local.fold(user), "mbox")

    def deliver(self, spool_path, envelope):
        """Store the message for every recipient; fires when durable.

        ``envelope`` has ``local`` (user names) and ``remote`` (bang paths),
        ``sender``, ``peer`` and ``helo``.  Local names go through the
        aliases, which may add remote paths.  Fires with Accept(routes):
        what became of each recipient (``Route``), for the log.
        """
        log = _logger(envelope)
        routes = self.destinations(envelope, log)
        users, remote = by_relay(routes)
        d = self._store(spool_path, envelope, users, remote, log)
        d.addCallback(self.commit.sync)
        if remote:
            d.addCallback(self._wake, self.queue_id(spool_path))
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
                log.warn("{err}; delivering to postmaster", err=e)
                names, paths = (local.POSTMASTER,), ()
            routes.extend(Route("queue", path, user) for path in paths)
            for name in names:
                if name == local.POSTMASTER or self.mailboxes.is_user(name):
                    routes.append(Route("local", name, user))
                    continue
                log.warn("no mailbox for {user}; delivering to postmaster", user=name)
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
        # the runner gets the record it would otherwise read back from disk
        record, inode = self._queued.pop(qid, (None, None))
        for hook in list(self.enqueued):
            try:
                hook(qid, record, inode)
            except Exception:
                log.failure("queue wake-up failed")
        return result

    def ready(self):
        return ACCEPT

    def dump(self, spool_path, sender):
        """Keep a blocked message under queue.dump (``-s``); fires with its path."""
        return self._run(self._dump, spool_path, sender)

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

    @defer.inlineCallbacks
    def _store(self, spool_path, envelope, users, remote, log=log):
        deadline = self._clock.seconds() + self.lock_timeout
        paths = []
        for user in users:
            paths.extend((yield self._append(user, spool_path, envelope.sender, deadline, log)))
        if remote:
            paths.extend((yield self._run(self._enqueue, spool_path, envelope, remote)))
        return paths

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

    def _append(self, user, spool_path, sender, deadline, log):
        """Append in turn with the other messages for this mailbox."""
        path = self.mailbox_path(user)
        lock = self._mailboxes.setdefault(path, defer.DeferredLock())
        d = lock.run(self._try_append, path, spool_path, self._mbox_head(sender, user),
                     deadline, 1, log)

        def done(result):
            if not lock.locked and not lock.waiting:
                self._mailboxes.pop(path, None)
            return result

        return d.addBoth(done)

    def _try_append(self, path, spool_path, head, deadline, tries, log):
        notes = []
        d = self._run(mbox.append, path, spool_path, notes, head)
        d.addBoth(_log_notes, notes, log)
        if tries > 1:
            # an earlier try may have made the mailbox and its directory: sync their entries
            directory = os.path.dirname(path)
            d.addCallback(lambda paths: paths + [directory, os.path.dirname(directory)])

        def busy(failure):
            failure.trap(mbox.Busy)
            left = deadline - self._clock.seconds()
            if left <= 0:
                # the caller logs this with the session's and message's ids
                raise mbox.Busy(errno.EAGAIN, "locked by another program for %.0f s"
                                % self.lock_timeout, path)
            wait = min(doubling(tries, LOCK_RETRY, LOCK_RETRY_MAX), left)
            return task.deferLater(self._clock, wait, self._try_append, path, spool_path,
                                   head, deadline, tries + 1, log)

        return d.addErrback(busy)

    def _enqueue(self, spool_path, envelope, remote):
        qid = self.queue_id(spool_path)
        msg = os.path.join(self.queue, qid + ".msg")
        env = os.path.join(self.queue, qid + ".env")
        os.link(spool_path, msg)
        # the message must be on disk before the .env file makes it a job
        fsync_paths([msg])
        record = {
            "id": qid,
            "sender": envelope.sender,
            "recipients": list(remote),
            "created": self._clock.seconds(),
            "peer": envelope.peer,
            "helo": envelope.helo,
            "smtputf8": envelope.smtputf8,
        }
        # the .env file appears last and atomically: it marks a whole job
        write_envelope(env, record)
        if self.enqueued:
            self._queued[qid] = (record, os.stat(env).st_ino)
        return [self.queue]
