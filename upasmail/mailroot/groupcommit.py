"""Group commit: many writes, one fsync (sans policy: what is written is the caller's).

``Batcher`` takes jobs, writes them in batches and syncs each batch while
the next one writes, answering in the order the batches were written;
``SyncThread`` runs its syncs on a few dedicated threads; ``GroupCommit``
batches plain fsync requests, one batch at a time (the queue's state
writes).  The mail root (``store``) gives them what to write and sync.
"""

import collections
import os
import queue
import threading
import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

sync_log = Logger(namespace="store")  # not a session's line: a batch's


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


class Batcher:
    """Group commit: write jobs in batches, and sync each batch while the
    next one writes.

    ``submit(job)`` returns a Deferred for the job's result.  Jobs that
    arrive while a batch writes, or while ``depth`` batches are syncing,
    wait and then all go together: ``write(jobs)`` returns what ``sync``
    needs, and ``sync(written)`` returns one ``(ok, value)`` per job.
    Under load a batch carries every message finished since the last one,
    so they share locks and fsyncs.  Several syncs may be under way at once
    because the file system merges concurrent fsyncs into one journal
    commit (measured here: 1,000 fsyncs/s from one thread, 4,000 to 8,000
    from four); results are still given in the order the batches were
    written, because a batch may rely on an earlier one's fsync (of the
    directory entry of a mailbox that batch created, say).

    ``sync`` always runs through ``run_blocking`` (off the reactor thread).
    ``write`` does too, unless ``inline(jobs)`` says the batch's writes are
    quick enough for the reactor's own thread (appends of messages held in
    memory: a few non-blocking system calls into the page cache), which
    saves a thread hand-off and the contention for the interpreter lock
    that comes with it.

    ``collect(f)``, when given, runs ``f`` once the reactor has handled
    everything that was ready to read (``reactor.callLater(0, f)``): a
    batch then starts with every message whose final dot came in the same
    turn, not with the first of them alone.  Measured with ``smtp-source
    -s 10``: 1.2 instead of 1.5 ms of CPU per message, 15 to 25% more
    messages a second (fewer locks, links and fsyncs per message).
    Without it (tests) a batch starts at once.

    Each batch's sync is logged at debug level (``store.sync``: how long
    its fsyncs took, hand-off to the thread included, for the metrics;
    ``timer`` measures it).
    """

    def __init__(self, run_blocking, write, sync, inline=lambda jobs: False, depth=4,
                 timer=time.monotonic, collect=None):
        self._run = run_blocking
        self._collect = collect
        self._collecting = False
        self._timer = timer
        self._write = write
        self._sync = sync
        self._inline = inline
        self._depth = depth
        self._waiting = []
        self._writing = False
        self._syncing = 0
        self._order = collections.deque()  # [batch, results once synced], oldest first
        self.batches = 0

    def submit(self, job):
        d = defer.Deferred()
        self._waiting.append((job, d))
        if self._collect is None:
            self._kick()
        elif not self._collecting:
            self._collecting = True
            self._collect(self._collected)
        return d

    def _collected(self):
        self._collecting = False
        self._kick()

    def _kick(self):
        if self._writing or self._syncing >= self._depth or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._writing = True
        self.batches += 1
        jobs = [job for job, _ in batch]
        entry = [batch, None]
        self._order.append(entry)

        def written(result):
            self._writing = False
            if isinstance(result, Failure):
                return result
            self._syncing += 1
            start = self._timer()
            d = self._run(self._sync, result).addBoth(synced, start)
            self._kick()  # the next batch writes while this one syncs
            return d

        def synced(result, start):
            self._syncing -= 1
            if not isinstance(result, Failure):
                sync_log.debug("synced {messages} in {seconds:.6f} s", event="store.sync",
                               seconds=self._timer() - start, messages=len(batch))
            return result

        def done(results):
            if isinstance(results, Failure):
                results = [(False, results)] * len(batch)
            entry[1] = results
            # in the order written: a later batch relies on what an earlier
            # one synced (a new mailbox's directory entry, say)
            while self._order and self._order[0][1] is not None:
                finished, outcomes = self._order.popleft()
                for (_, d), (ok, value) in zip(finished, outcomes):
                    if ok:
                        d.callback(value)
                    else:
                        d.errback(value)
            self._kick()

        if self._inline(jobs):
            d = defer.maybeDeferred(self._write, jobs)
        else:
            d = defer.maybeDeferred(self._run, self._write, jobs)
        d.addBoth(written).addBoth(done)


class SyncThread:
    """``run_blocking`` on a few dedicated threads, for the writer's fsyncs.

    The reactor's pool hands each call through a coordinator to one of
    ten threads; measured under load that was tens of futex calls per
    message (lock hand-offs and threads woken for the interpreter lock).
    Threads that take calls from one queue do the same work with one
    wake-up each way; there are as many as the ``Batcher`` lets sync at
    once.
    """

    def __init__(self, reactor, threads=4):
        self._reactor = reactor
        self._calls = queue.SimpleQueue()
        self._size = threads
        self._threads = 0

    def __call__(self, f, *args):
        if self._threads < self._size:
            self._threads += 1
            threading.Thread(target=self._loop, name="upasmail-fsync", daemon=True).start()
        d = defer.Deferred()
        self._calls.put((f, args, d))
        return d

    def _loop(self):
        while True:
            call = self._calls.get()
            if call is None:
                return
            f, args, d = call
            try:
                result = f(*args)
            except BaseException:
                result = Failure()
            self._reactor.callFromThread(self._fire, d, result)

    @staticmethod
    def _fire(d, result):
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def stop(self):
        """End the threads once the calls already given are done."""
        for _ in range(self._threads):
            self._calls.put(None)
        self._threads = 0
