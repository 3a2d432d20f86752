"""What upas smtp does to addresses and to the message (smtp.c ``bangtoat``,
``domainify``, ``convertheader``, ``printheader``, ``printdate``, ``putcrnl``).

Spec upas-behaviour.md §2.2-2.3 and §2.7.  All pure: the message comes
from a binary file object and goes out as wire bytes.

Addresses: ``bangtoat`` turns bang paths into ``@`` form (``x.org!carol``
→ ``carol@x.org``; leading components with a dot are domains, the last
one becomes ``@dom`` and earlier ones a source route:
``a.b!c.d!bob`` → ``@a.b:bob@c.d``).  ``%XX`` escapes are undone first.

The message (``OutboundMessage``), read from a file that usually starts
with upas's ``From <sender> <date> remote from <sys>`` line:

1. the header is read up to the first empty line (``\\n``; ``\\r\\n`` is
   not one) or EOF, at most ``HEADER_LIMIT`` bytes;
2. address fields are rewritten: bang to at, ``@<hostdomain>`` for
   unqualified addresses, ``BadHeader:`` for lines that are not fields;
3. added, in this order, each only when missing: ``Message-ID: <32
   uppercase hex@hostdomain>``, ``From:``, ``To:`` (the recipients as
   sent), ``Date:`` (from the ``From `` line's date);
4. the ``From `` line is never sent; no ``Received:`` is added;
5. transparency: every LF becomes CRLF (so CRLF input becomes CR CR LF,
   as upas), a ``.`` at a line start is doubled, done once over the whole
   stream; bytes pass unchanged otherwise.  The end is ``.\\r\\n``, after
   an added ``\\r\\n`` when the message did not end in a newline.
"""

import os
import re
import time
import unicodedata

from .. import rfc822
from ..address import NULL_SENDER

HEADER_LIMIT = 256 * 1024
CHUNK = 64 * 1024
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TIME = re.compile(r"\d{1,2}:\d\d(:\d\d)?\Z")
_ZONE = re.compile(r"[+-]\d{4}\Z")


def unescape(text):
    """Undo upas send's ``%XX`` escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def illegal(addr):
    """Does the address hold a control character (CR, LF, NUL, ...), even one
    that a ``%XX`` escape makes?  Such an address never goes on the wire."""
    return any(unicodedata.category(c) == "Cc" for c in unescape(addr))


def shown(addr):
    """The address for an error line: control characters escaped (``al\\nice``)."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) == "Cc" else c for c in addr)


def bangtoat(addr):
    """upas smtp.c ``bangtoat``: bang path → ``@`` form (unchanged without ``!``)."""
    if "!" not in addr or "@" in addr:
        return addr
    fields = addr.split("!")
    d = 0
    while d < len(fields) - 1 and "." in fields[d]:
        d += 1
    out = ""
    if d > 1:  # more than one leading domain: source route
        out = "@" + fields[0] + "".join(",@" + f for f in fields[1:d - 1]) + ":"
    out += "!".join(fields[d:])
    if d:
        out += "@" + fields[d - 1]
    return out


def domainify(host, domain):
    """``host`` made a domain name with ``domain`` (spec §2.3)."""
    if "." in host or not domain:
        return host
    dot = domain.find(".")
    if dot < 0:
        return host + "." + domain
    return host + domain[dot:]


def to_at(addr, qualifier):
    """An envelope or header address in ``@`` form, qualified when bare."""
    addr = bangtoat(unescape(addr))
    if "@" not in addr:
        addr += "@" + qualifier
    return addr


def mail_from(sender, hostdomain):
    """The MAIL FROM path: ``<>`` for ``/dev/null``."""
    if sender == NULL_SENDER:
        return "<>"
    return "<%s>" % to_at(sender, hostdomain)


def rcpt_to(rcpt, ddomain):
    """The address RCPT TO gets (no brackets): ``@ddomain`` when bare."""
    addr = bangtoat(unescape(rcpt))
    if "@" not in addr:
        addr += "@" + ddomain
    return addr


def header_rewrite(hostdomain):
    """The rfc822 ``rewrite`` for the client: bang to at, qualify, bracket routes."""

    def rewrite(word, bracketed):
        addr = to_at(word, hostdomain)
        if addr.startswith("@") and not bracketed:
            return "<%s>" % addr
        return addr

    return rewrite


def from_line_date(line, local_zones=None):
    """RFC 5322 date from a ``From <sender> <date> ...`` line, or None.

    Takes upas's ``Wed Mar  7 23:47:45 -0400 2024`` and ctime's ``Wed Mar
    7 23:47:45 EST 2024``; a zone name that is the local zone's becomes
    the local numeric offset (upas ``printdate``).
    """
    words = line.split()
    if len(words) < 6 or words[0] != "From":
        return None
    w = words[2:]
    if len(w) < 5 or w[0][:3] not in _DAYS or w[1][:3] not in _MONTHS:
        return None
    if not w[2].isdigit() or not _TIME.match(w[3]):
        return None
    if w[4].isdigit():
        zone, year = None, w[4]
    elif len(w) > 5 and w[5].isdigit():
        zone, year = w[4], w[5]
    else:
        return None
    local_zones = time.tzname if local_zones is None else local_zones
    if zone is None or zone in local_zones:
        dst = zone is not None and time.daylight and zone == local_zones[1]
        off = -(time.altzone if dst else time.timezone)
        zone = "%s%02d%02d" % ("-" if off < 0 else "+", abs(off) // 3600, abs(off) % 3600 // 60)
    tod = w[3] if w[3].count(":") == 2 else w[3] + ":00"
    return "%s, %d %s %s %s %s" % (w[0][:3], int(w[2]), w[1][:3], year, tod, zone)


def message_id(hostdomain, random_bytes=os.urandom):
    return "<%s@%s>" % (random_bytes(16).hex().upper(), hostdomain)


class Transparency:
    """``putcrnl``: LF → CRLF and dot-stuffing, carried across chunks."""

    def __init__(self):
        self.at_line_start = True
        self.last = b""

    def feed(self, data):
        if not data:
            return b""
        out = data.replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
        if self.at_line_start and out[:1] == b".":
            out = b"." + out
        self.at_line_start = out.endswith(b"\n")
        self.last = out[-1:]
        return out

    def end(self):
        return b".\r\n" if self.last == b"\n" else b"\r\n.\r\n"


class OutboundMessage:
    """One message from ``source`` (a binary file at its start), read once."""

    def __init__(self, source, sender, hostdomain, full_name=None,
                 random_bytes=os.urandom):
        self.source = source
        self.sender = sender
        self.hostdomain = hostdomain
        self.full_name = full_name
        self.random_bytes = random_bytes
        lines, size = [], 0
        self.ended_header = False
        while size < HEADER_LIMIT:
            line = source.readline(HEADER_LIMIT)
            if not line:
                break
            lines.append(line.decode("utf-8", "surrogateescape"))
            size += len(line)
            if line == b"\n":
                self.ended_header = True
                break
        self.truncated = size >= HEADER_LIMIT and not self.ended_header
        if lines and not lines[-1].endswith("\n") and not self.truncated:
            lines[-1] += "\n"  # a header cut by EOF still ends its last line
        self.body_offset = source.tell()
        self.date = from_line_date(lines[0]) if lines and lines[0].startswith("From ") else None
        self.header = rfc822.parse(lines, hostdomain, header_rewrite(hostdomain))
        names = {name for name, _ in self.header.fields}
        self.has_date = bool(names & {"date", "resent-date"})

    def from_value(self):
        if self.sender == NULL_SENDER:
            return "Postmaster@" + self.hostdomain
        if "!" not in self.sender and "@" not in self.sender:
            addr = "%s@%s" % (unescape(self.sender), self.hostdomain)
            name = self.full_name(self.sender) if self.full_name else None
            return '"%s" <%s>' % (name.replace('"', "'"), addr) if name else addr
        return to_at(self.sender, self.hostdomain)

    def head(self, toline):
        """The converted header (LF line ends) for recipients ``toline``."""
        added = []
        if not self.header.has_message_id:
            added.append("Message-ID: %s\n" % message_id(self.hostdomain, self.random_bytes))
        if not self.header.has_originator:
            added.append("From: %s\n" % self.from_value())
        if not self.header.has_destination and toline:
            added.append("To: %s\n" % ("<%s>" % toline if toline.startswith("@") else toline))
        if not self.has_date and self.date:
            added.append("Date: %s\n" % self.date)
        text = "".join(added) + "".join(self.header.lines)
        if not self.ended_header and not self.truncated and not text.endswith("\n\n"):
            text += "\n"  # no empty line in the input: the header ends here
        return text.encode("utf-8", "surrogateescape")

    def wire(self, toline, final_dot=True, chunk=CHUNK):
        """Yield the message as sent after DATA, in chunks, dot included."""
        t = Transparency()
        yield t.feed(self.head(toline))
        self.source.seek(self.body_offset)
        while True:
            data = self.source.read(chunk)
            if not data:
                break
            yield t.feed(data)
        if final_dot:
            yield t.end()
