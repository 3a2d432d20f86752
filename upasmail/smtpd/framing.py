"""The client's bytes cut into commands and DATA blocks (sans I/O).

``Reader`` holds what the client has sent and not yet been taken, and
gives it as the protocol's phase wants it: command lines, or DATA in
blocks of whole lines.  It decides nothing about what a line means; the
protocol asks for the next piece only when it is ready for it, so what a
client pipelines waits here.

DATA framing works on whole buffers.

The protocol used to cut DATA into lines and pass each through three
layers of calls; for a 100 KiB body that was most of its CPU.  These
functions work on every complete line received so far at once, with
bytes methods (C loops), and leave anything unusual to the line-by-line
path, which stays the one definition of what is refused and why:

* only CRLF ends a line; the end of data is a line that is exactly ``.``
  (so ``<LF>.<LF>`` and its friends never end a message);
* a block with a bare CR or LF, or a line longer than the limit, is not
  handled here (``clean`` says no) and goes line by line;
* dot-stuffing is undone and CRLF becomes LF for the mailer stream.
"""

END = b".\r\n"
CRLF = b"\r\n"


def next_block(buf, pos):
    """The complete lines of ``buf[pos:]`` up to the end-of-data line.

    Returns ``(consumed, block, ended)``: ``buf[pos:consumed]`` was used,
    ``block`` holds its message lines (CRLF-terminated, still stuffed) and
    ``ended`` says the terminating ``.`` line was among them.  ``pos`` must
    be at the start of a line.
    """
    if buf.startswith(END, pos):
        return pos + len(END), b"", True
    end = buf.find(b"\r\n.\r\n", pos)
    if end >= 0:
        return end + 5, buf[pos:end + 2], True
    last = buf.rfind(CRLF, pos)
    if last < 0:
        return pos, b"", False
    return last + 2, buf[pos:last + 2], False


def clean(block, limit):
    """Does ``block`` end every line in CRLF, with no CR or LF elsewhere and
    no line over ``limit`` octets?"""
    lf = block.count(b"\n")
    if block.count(b"\r") != lf or block.count(CRLF) != lf:
        return False
    if len(block) <= limit + 2:
        return True
    return max(map(len, block.split(CRLF))) <= limit


def unstuff(block):
    """Clean CRLF lines as sent -> the message's lines, LF-terminated."""
    if block[:1] == b".":
        block = block[1:]
    return block.replace(b"\r\n.", CRLF).replace(CRLF, b"\n")


def lines(block):
    """The lines of a CRLF block, without their line ends."""
    return block.split(CRLF)[:-1]


TOO_LONG = object()  # Reader.line: a line over the limit (said once per line)


def partial_too_long(buf, start, limit):
    """Is the line still arriving at ``buf[start:]`` already over ``limit``?
    A CR at its end may be the start of its CRLF, so it is not counted."""
    return len(buf) - start - buf.endswith(b"\r") > limit


class Reader:
    """What the client has sent and the protocol has not yet taken.

    ``feed`` adds bytes; ``line`` and ``data`` take the next piece;
    ``compact`` drops what was taken (once per batch of reads, not per
    line).  An over-long line is reported once (``TOO_LONG``) and its
    tail skipped up to its line end, in commands and in DATA alike.
    """

    __slots__ = ("buf", "pos", "skipping")

    def __init__(self):
        self.buf = b""
        self.pos = 0
        self.skipping = False  # dropping the tail of an over-long line

    def feed(self, data):
        self.buf += data

    def pending(self):
        """Bytes received and not yet taken."""
        return len(self.buf) - self.pos

    def compact(self):
        if self.pos:
            self.buf = self.buf[self.pos:]
            self.pos = 0

    def discard(self):
        """Drop everything not yet taken; returns how many bytes that was."""
        n = self.pending()
        self.buf, self.pos = b"", 0
        return n

    def line(self, limit, crlf_only=False):
        """The next whole line without its line end, ``TOO_LONG``, or None
        (no whole line yet).

        A command line ends at LF (a CR before it is dropped); in DATA
        (``crlf_only``) only CRLF ends one, so a bare LF stays inside it.
        """
        buf, pos = self.buf, self.pos
        delim = CRLF if crlf_only else b"\n"
        while True:
            end = buf.find(delim, pos)
            if end < 0:
                if partial_too_long(buf, pos, limit):
                    self.pos = len(buf) - 1  # keep a CR that may start CRLF
                    if not self.skipping:
                        self.skipping = True
                        return TOO_LONG
                else:
                    self.pos = pos
                return None
            line, pos = buf[pos:end], end + len(delim)
            if self.skipping:  # the tail of an over-long line
                self.skipping = False
                continue
            self.pos = pos
            if not crlf_only and line.endswith(b"\r"):
                line = line[:-1]
            return TOO_LONG if len(line) > limit else line

    def data(self, limit):
        """In DATA, at the start of a line: ``(block, ended, too_long)``.

        ``block`` holds every whole message line received (CRLF-ended,
        still dot-stuffed, maybe empty), ``ended`` says the ``.`` line came
        after them, ``too_long`` that the line still arriving is already
        over ``limit`` (its tail is then skipped, as ``line`` does).
        """
        consumed, block, ended = next_block(self.buf, self.pos)
        self.pos = consumed
        too_long = False
        if not ended and partial_too_long(self.buf, consumed, limit):
            self.pos = len(self.buf) - 1  # keep a CR that may start CRLF
            self.skipping = too_long = True
        return block, ended, too_long
