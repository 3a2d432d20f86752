"""``upas-mailq``'s work on the queue directory: the listing and deletion.

``queue`` is a ``queue.Queue``; jobs are read through ``job``.
"""

import errno
import os

from twisted.logger import Logger

from ..mailroot.job import PENDING, CorruptJob, nothing_pending, unreturned

log = Logger(namespace="queue")


def _age(seconds):
    seconds = int(max(seconds, 0))
    if seconds < 3600:
        return "%dm" % (seconds // 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


def listing(queue, now):
    """``mailq``-style text for the queue (one block per job)."""
    blocks, total = [], 0
    for qid in queue.ids():
        msg, _ = queue.paths(qid)
        try:
            job = queue.job(qid)
            size = os.path.getsize(msg)
        except FileNotFoundError:
            continue
        except CorruptJob as e:
            blocks.append("%s  (corrupt: %s)" % (qid, e))
            continue
        total += 1
        lines = ["%-24s %8d  %-7s %s" % (qid, size, _age(now - job.created), job.sender)]
        returning = unreturned(job)
        for r in job.recipients:
            st = job.state[r]
            if st.status != PENDING and r not in returning:
                continue
            err = " ".join(st.error.split())
            if r in returning:
                err = "failed, to be returned: " + err
            lines.append("%35s %s%s" % ("", r, "  (%s)" % err if err else ""))
        if nothing_pending(job) and not returning:
            # a run stopped between its last save and the removal
            lines.append("%35s (all delivered; removed at the next queue run)" % "")
        blocks.append("\n".join(lines))
    if not blocks:
        return "Mail queue is empty\n"
    head = "%-24s %8s  %-7s %s" % ("Queue ID", "Size", "Age", "Sender/Recipient (last error)")
    return "\n".join([head] + blocks + ["-- %d message%s in the queue" % (
        total, "" if total == 1 else "s")]) + "\n"


def delete(queue, qid):
    """Remove one job; False if it is not there; OSError if it is being delivered."""
    msg, env = queue.paths(qid)
    if not os.path.exists(env):
        return False
    fd = queue.lock(qid)
    if fd is None:
        raise OSError(errno.EBUSY, "the message is being delivered right now; try again")
    try:
        queue.remove(qid)
    finally:
        os.close(fd)
    log.info("{id}: deleted by the administrator", id=qid, event="queue.deleted", queue_id=qid)
    return True
