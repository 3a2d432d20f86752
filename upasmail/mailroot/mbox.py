"""Local delivery: append a message to ``<root>/box/<user>/mbox``.

The mailbox is upas's: messages separated by ``From `` lines.  Body lines
that start with ``From `` (after any number of ``>``) get one more ``>``
(the mboxrd rule, so readers can undo it; upas send's own escaping is not
reversible; see docs/deviations.rst).  Each message ends with an empty
line.

Locking works with other mbox writers: an ``fcntl`` lock on the mbox plus a
``mbox.lock`` dot-lock file, the same pair Python's ``mailbox`` module,
mutt and procmail use.  Both are only ever *tried* (never waited for
here): ``append`` raises ``Busy`` and the caller schedules the next try,
so a mailbox that another program holds never ties up a thread.

The dot-lock says who holds it, so a lock left by a crash is broken at
once instead of after ``DOTLOCK_STALE`` seconds::

    <pid>\\n                                   (liblockfile's format)
    upasmail <host> <token>\\n                 (token: one per process)
    append <dev> <ino> <offset> <done> <upto> <head>\\n

The ``append`` line is the append record, rewritten in place before each
chunk is written: the mbox's device and inode, its size before the
message (``offset``), the size before and after the chunk being written
(``done``, ``upto``; 20 digits each) and, in hex, the first bytes of the
message (our ``From `` line and what follows).  A lock is stale when its
process no longer exists (on this host), when it carries our pid but not
our token (an earlier run that had the same pid), or, for any lock, when
it was not touched for ``DOTLOCK_STALE`` seconds (locks without a pid:
procmail, mutt).  Breaking a stale lock that has an append record cuts
the mbox back to ``offset`` when nothing else changed it since: same
inode, a size in ``[done, upto]``, and our bytes at ``offset``; else the
file is left alone and a note says why.  Stale locks are met on the next
append to that mailbox or at start-up (``recover``).

A failed append is cut back to the old size while the lock is held, so a
reader never sees half a message.

These functions block; ``store`` runs them in a thread.  What they have to
report goes into a ``notes`` list for the caller to log.

One thing, the mbox file and its lock, kept together because the lock's
append record and the recovery that reads it must agree byte for byte.
"""

import collections
import errno
import fcntl
import os
import re
import secrets
import stat
import time

from . import crashpoint

_FROM = re.compile(rb"^>*From ")
DOTLOCK_STALE = 300  # seconds without a touch before any dot-lock is broken
CHUNK = 256 * 1024  # bytes per write; the append record is updated for each
HEAD = 128  # bytes of the message kept in the append record
_TOKEN = secrets.token_hex(8)  # tells our locks from an earlier run's with the same pid
_WIDTH = 20

Record = collections.namedtuple("Record", "dev ino offset done upto head")
LockInfo = collections.namedtuple("LockInfo", "pid host token record")
Recovery = collections.namedtuple("Recovery", "cut why")


class Busy(OSError):
    """Another writer holds the mailbox; try again later."""


def _open_mbox(path, flags, mode=0o600):
    """Open a mailbox that is a regular file, never through a symbolic link.

    A link or a FIFO in a mailbox's place would send mail (and crash
    recovery's cut-back) somewhere else, or block a thread for ever.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "mailbox is not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def me():
    return os.getpid(), os.uname().nodename, _TOKEN


def lock_header(pid, host, token):
    return b"%d\nupasmail %s %s\n" % (pid, host.encode(), token.encode())


def record_line(record):
    return b"append %d %d %d %0*d %0*d %s\n" % (
        record.dev, record.ino, record.offset, _WIDTH, record.done, _WIDTH, record.upto,
        record.head.hex().encode())


def parse_lock(data):
    """The contents of a dot-lock -> LockInfo (fields None when absent)."""
    lines = data.split(b"\n")
    try:
        pid = int(lines[0])
    except ValueError:
        pid = None
    host = token = record = None
    if len(lines) > 1 and lines[1].startswith(b"upasmail "):
        parts = lines[1].split()
        if len(parts) == 3:
            host, token = parts[1].decode("ascii", "replace"), parts[2].decode("ascii", "replace")
    if host is not None and len(lines) > 2 and lines[2].startswith(b"append "):
        try:
            dev, ino, offset, done, upto, head = lines[2].split()[1:]
            record = Record(int(dev), int(ino), int(offset), int(done), int(upto),
                            bytes.fromhex(head.decode("ascii")))
        except ValueError:
            record = None
    if pid is not None and pid <= 0:
        pid = None
    return LockInfo(pid, host, token, record)


def stale_reason(info, age, alive, mine):
    """Why the lock ``info`` is stale, or None while its holder may live.

    ``alive``: does ``info.pid`` exist here; ``mine``: ``me()``.
    """
    pid, host, token = mine
    if info.pid is not None and (info.host is None or info.host == host):
        if info.pid == pid and info.token != token:
            return "left by an earlier run with our pid %d" % pid
        if not alive:
            return "process %d no longer exists" % info.pid
    if age > DOTLOCK_STALE:
        return "not touched for %d seconds" % age
    return None


def cutback(record, dev, ino, size, head):
    """May the mbox be cut back to ``record.offset``?  ``head``: its bytes there."""
    if (dev, ino) != (record.dev, record.ino):
        return Recovery(False, "the mailbox was replaced since (another inode)")
    if size == record.offset:
        return Recovery(False, "no part of the message was written")
    if not record.done <= size <= record.upto:
        return Recovery(False, "its size %d is not what the interrupted append left "
                               "(%d to %d): changed by another program" %
                        (size, record.done, record.upto))
    if not head or head != record.head[:len(head)]:
        return Recovery(False, "the bytes at offset %d are not the interrupted message"
                        % record.offset)
    return Recovery(True, "cut back %d bytes of a partial message to size %d"
                    % (size - record.offset, record.offset))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _break_if_stale(fd, path, lock, notes):
    """Remove ``lock`` if stale (we hold the fcntl lock on ``fd``); was it?"""
    try:
        lockfd = _open_mbox(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        data = os.read(lockfd, 4096)
        age = time.time() - os.fstat(lockfd).st_mtime
    finally:
        os.close(lockfd)
    info = parse_lock(data)
    alive = info.pid is not None and _alive(info.pid)
    why = stale_reason(info, age, alive, me())
    if why is None:
        return False
    if info.record is not None and fd is not None:
        _recover_append(fd, path, info.record, notes)
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    notes.append("%s: broke a stale lock: %s" % (lock, why))
    return True


def _recover_append(fd, path, record, notes):
    st = os.fstat(fd)
    head = os.pread(fd, len(record.head), record.offset) if st.st_size > record.offset else b""
    decision = cutback(record, st.st_dev, st.st_ino, st.st_size, head)
    if decision.cut:
        os.ftruncate(fd, record.offset)
        os.fsync(fd)
        notes.append("%s: interrupted append: %s" % (path, decision.why))
    else:
        notes.append("%s: interrupted append: left alone: %s" % (path, decision.why))


def _lock(fd, path, notes):
    """Take the fcntl lock and the dot-lock, or neither (``Busy``).

    Returns the open dot-lock file, for the append record.  Both are tried
    without blocking and released together on a clash, so writers that
    take them in the other order cannot deadlock with us.
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise Busy(errno.EAGAIN, "mailbox locked", path) from None
        raise
    try:
        return _dotlock(fd, path, notes)
    except BaseException:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        raise


def _dotlock(fd, path, notes):
    lock = path + ".lock"
    # unique per process *and* thread: deliveries run in a thread pool
    tmp = "%s.%s.%d.%s" % (lock, os.uname().nodename, os.getpid(), secrets.token_hex(4))
    lockfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(lockfd, lock_header(*me()))
        for _ in range(2):  # once more after breaking a stale lock
            try:
                os.link(tmp, lock)
                return lockfd
            except FileExistsError:
                if not _break_if_stale(fd, path, lock, notes):
                    break
        raise Busy(errno.EAGAIN, "mailbox locked", path)
    except BaseException:
        os.close(lockfd)
        raise
    finally:
        os.unlink(tmp)


def recover(mbox_path, notes):
    """At start-up: break a stale lock on the mbox, cutting back what it left."""
    lock = mbox_path + ".lock"
    if not os.path.exists(lock):
        return
    try:
        fd = _open_mbox(mbox_path, os.O_RDWR)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                notes.append("%s: locked by another program; left alone" % mbox_path)
                return
        if not _break_if_stale(fd, mbox_path, lock, notes):
            notes.append("%s: held by a running program; left alone" % lock)
    finally:
        if fd is not None:
            os.close(fd)


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


def _rendered(src, head=None):
    """The mbox bytes of the mailer stream ``src``, in chunks of about CHUNK.

    ``head(first line)`` gives the bytes that start the message instead of
    the stream's own ``From `` line (local delivery adds fields there).
    """
    first = src.readline()
    chunks = [mbox_from_line(first) if head is None else head(first)]
    size = len(chunks[0])
    last = b"\n"
    for line in escape(src):
        chunks.append(line)
        size += len(line)
        last = line
        if size >= CHUNK:
            yield b"".join(chunks)
            chunks, size = [], 0
    if not last.endswith(b"\n"):
        chunks.append(b"\n")
    chunks.append(b"\n")
    yield b"".join(chunks)


_FROM_START = re.compile(rb"(?m)^(?=>*From )")


def render(stream, head=None):
    """``_rendered`` for a stream held in memory: one piece, built with
    bytes methods rather than line by line."""
    end = stream.find(b"\n") + 1 or len(stream)
    first, rest = stream[:end], stream[end:]
    if b"From " in rest:  # most bodies have none: skip the regular expression
        rest = _FROM_START.sub(b">", rest)
    out = [mbox_from_line(first) if head is None else head(first), rest]
    if rest and not rest.endswith(b"\n"):
        out.append(b"\n")
    out.append(b"\n")
    return b"".join(out)


def append(mbox_path, stream_path, notes=None, head=None):
    """Append the mailer stream in ``stream_path`` to the mbox (``head``: see _rendered).

    One try: raises ``Busy`` when another writer holds the mailbox.
    Returns the list of paths whose data must reach the disk (the mbox, and
    the directories it created) for the message to be durable.
    """
    return append_many(mbox_path, [(stream_path, head)], notes)


def append_many(mbox_path, items, notes=None):
    """Append several messages under one lock: ``items`` are ``(source,
    head)``, a source being the stream's bytes or a file's path.

    The messages are one append for crash recovery: an interrupted batch is
    cut back whole (none of them was acknowledged), and a failure cuts back
    the whole batch.
    """
    notes = [] if notes is None else notes
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
    fd = _open_mbox(mbox_path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    if new:
        created.append(directory)
    try:
        lockfd = _lock(fd, mbox_path, notes)
        try:
            _append_locked(fd, lockfd, _chunks(items))
        finally:
            os.unlink(mbox_path + ".lock")
            os.close(lockfd)
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return [mbox_path] + created


def _chunks(items):
    """The bytes to append for ``items``: messages in memory together in
    one piece, files in pieces of about CHUNK."""
    held = []
    for source, head in items:
        if isinstance(source, bytes):
            held.append(render(source, head))
            continue
        if held:
            yield b"".join(held)
            held = []
        with open(source, "rb") as src:
            yield from _rendered(src, head)
    if held:
        yield b"".join(held)


def separator(tail):
    """What must come before a new message, after the mbox's last bytes.

    A file that does not end in a line end (a power cut can leave part of
    an unacknowledged message) would glue the next ``From `` line to it,
    and readers would not see the new message.
    """
    if not tail or tail.endswith(b"\n\n") or tail == b"\n":
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


def _append_locked(fd, lockfd, chunks):
    st = os.fstat(fd)
    start = done = os.lseek(fd, 0, os.SEEK_END)
    where = len(lock_header(*me()))
    pad = separator(os.pread(fd, 2, start - 2) if start >= 2 else os.pread(fd, start, 0))
    try:
        start_bytes = None
        for chunk in chunks:
            if start_bytes is None:
                chunk = pad + chunk
                start_bytes = chunk[:HEAD]
            else:
                crashpoint.reached("mbox.mid-append")
            record = Record(st.st_dev, st.st_ino, start, done, done + len(chunk), start_bytes)
            os.pwrite(lockfd, record_line(record), where)
            _write_all(fd, chunk)
            done += len(chunk)
    except BaseException:
        os.ftruncate(fd, start)
        raise


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
