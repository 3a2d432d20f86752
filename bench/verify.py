"""The end check: is every acknowledged message stored, once, intact?

A server's store is read as raw messages (bytes, headers and body, as
``mailbox.mbox`` gives them or one file each); each is matched to the load
by its ``X-Bench-Id:`` header and its body is hashed again.  Missing,
duplicated and damaged messages are errors: a server that acknowledges
without storing cannot score.
"""

import mailbox
import os
import re
from dataclasses import dataclass

from .loadgen import checksum

_ID = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.MULTILINE | re.IGNORECASE)


@dataclass
class Verdict:
    expected: int = 0
    found: int = 0  # acknowledged and found intact, exactly once
    missing: int = 0
    duplicated: int = 0  # extra copies of an acknowledged message
    damaged: int = 0  # found, but the body differs
    unacknowledged: int = 0  # stored but never acknowledged (not an error: a reply lost)

    @property
    def errors(self):
        return self.missing + self.duplicated + self.damaged

    def __str__(self):
        text = "%d/%d" % (self.found, self.expected)
        problems = ["%d %s" % (n, what) for n, what in
                    ((self.missing, "missing"), (self.duplicated, "duplicated"),
                     (self.damaged, "damaged")) if n]
        return text + (" (%s)" % ", ".join(problems) if problems else "")


def split_message(raw):
    """(header bytes, body bytes) with LF line ends."""
    raw = raw.replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    return head, body


def verify(expected, messages):
    """``expected``: {bench id: body checksum} of acknowledged messages;
    ``messages``: iterable of raw stored messages.  Returns a Verdict."""
    verdict = Verdict(expected=len(expected))
    seen = {}
    for raw in messages:
        head, body = split_message(raw)
        m = _ID.search(head)
        if not m:
            continue  # not ours (a bounce, a notice): not counted either way
        bench_id = m.group(1).decode("ascii", "replace")
        if bench_id not in expected:
            verdict.unacknowledged += 1
            continue
        seen[bench_id] = seen.get(bench_id, 0) + 1
        if seen[bench_id] > 1:
            verdict.duplicated += 1
        elif checksum(body) != expected[bench_id]:
            verdict.damaged += 1
        else:
            verdict.found += 1
    verdict.missing = sum(1 for i in expected if i not in seen)
    return verdict


def verify_count(expected_count, stored_count):
    """For loads without ids (smtp-source): only the number stored can be checked."""
    v = Verdict(expected=expected_count, found=min(expected_count, stored_count))
    if stored_count < expected_count:
        v.missing = expected_count - stored_count
    else:
        v.duplicated = stored_count - expected_count
    return v


def mbox_messages(paths):
    """Every message of the mbox files ``paths`` as bytes (mboxrd escapes undone
    by nothing: our bodies have no ``From `` lines)."""
    for path in paths:
        box = mailbox.mbox(path, create=False)
        try:
            for key in box.iterkeys():
                yield box.get_bytes(key)
        finally:
            box.close()


def count_mbox(paths):
    """Messages in the mbox files, by their From_ separator lines (fast: no parse)."""
    n = 0
    for path in paths:
        with open(path, "rb") as f:
            prev_blank = True
            for line in f:
                if prev_blank and line.startswith(b"From "):
                    n += 1
                prev_blank = line in (b"\n", b"\r\n")
    return n


def file_messages(directory):
    """Every file in ``directory`` (one message each) as bytes."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                yield f.read()


def mbox_files(root):
    """The files named ``mbox`` under ``root`` (``box/<user>/mbox``)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out.extend(os.path.join(dirpath, name) for name in filenames if name == "mbox")
    return sorted(out)
