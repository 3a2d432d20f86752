"""Local delivery: append a message to ``<root>/box/<user>/mbox``.

The mailbox is upas's: messages separated by ``From `` lines.  Body lines
that start with ``From `` (after any number of ``>``) get one more ``>``
(the mboxrd rule, so readers can undo it; upas send's own escaping is not
reversible; see docs/deviations.rst).  Each message ends with an empty
line.

Locking works with other mbox writers: an ``fcntl`` lock on the mbox plus a
``mbox.lock`` dot-lock file, the same pair Python's ``mailbox`` module,
mutt and procmail use.  A failed append is cut back to the old size while
the lock is held, so a reader never sees half a message.

These functions block; ``store`` runs them in a thread.
"""

import errno
import fcntl
import os
import re
import secrets
import time

_FROM = re.compile(rb"^>*From ")
DOTLOCK_STALE = 300  # seconds; a lock file older than this is broken


class LockTimeout(OSError):
    pass


def _lock(fd, path, timeout, sleep=time.sleep):
    """Take the fcntl lock and the dot-lock, or neither; return the lock path.

    Both are tried without blocking and released together on a clash, so
    writers that take them in the other order cannot deadlock with us.
    """
    lock = path + ".lock"
    # unique per process *and* thread: deliveries run in a thread pool
    tmp = "%s.%s.%d.%s" % (lock, os.uname().nodename, os.getpid(), secrets.token_hex(4))
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        else:
            if _try_dotlock(lock, tmp):
                return lock
            fcntl.lockf(fd, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            raise LockTimeout(errno.EAGAIN, "mailbox locked", path)
        sleep(0.05)


def _try_dotlock(lock, tmp):
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        try:
            if time.time() - os.stat(lock).st_mtime > DOTLOCK_STALE:
                os.unlink(lock)
        except FileNotFoundError:
            pass
        return False
    finally:
        os.unlink(tmp)


def mbox_from_line(envelope_line):
    """``From s date remote from \\n`` -> ``From s date\\n``."""
    line = envelope_line.rstrip(b"\n")
    if line.endswith(b" remote from"):
        line = line[: -len(b" remote from")]
    elif b" remote from " in line:
        line = line.rsplit(b" remote from ", 1)[0]
    return line + b"\n"


def escape(lines):
    for line in lines:
        if _FROM.match(line):
            yield b">" + line
        else:
            yield line


def append(mbox_path, stream_path, lock_timeout=30.0):
    """Append the mailer stream in ``stream_path`` to the mbox.

    Returns the list of paths whose data must reach the disk (the mbox, and
    the directories it created) for the message to be durable.
    """
    created = []
    directory = os.path.dirname(mbox_path)
    parent = os.path.dirname(directory)
    if not os.path.isdir(directory):
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
            created.append(parent)
        except FileExistsError:
            pass
    new = not os.path.exists(mbox_path)
    fd = os.open(mbox_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    if new:
        created.append(directory)
    try:
        lock = _lock(fd, mbox_path, lock_timeout)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                with open(stream_path, "rb") as src:
                    first = src.readline()
                    chunks = [mbox_from_line(first)]
                    last = b"\n"
                    for line in escape(src):
                        chunks.append(line)
                        last = line
                        if len(chunks) >= 256:
                            _write_all(fd, b"".join(chunks))
                            chunks = []
                    if not last.endswith(b"\n"):
                        chunks.append(b"\n")
                    chunks.append(b"\n")
                    _write_all(fd, b"".join(chunks))
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.unlink(lock)
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return [mbox_path] + created


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
