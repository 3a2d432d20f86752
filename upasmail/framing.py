"""DATA framing on whole buffers (sans I/O).

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
