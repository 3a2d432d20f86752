"""The byte stream smtpd hands to its mailer (upas smtpd.c ``pipemsg``).

In order (spec upas-behaviour.md §1.10.3):

1. ``From <first sender> <date> remote from `` (empty system name, as upas)
2. ``Received: from <him> ([<rsys>]) by <me>; <date>``; with TLS or AUTH,
   Postfix's comments and an RFC 3848 ``with`` keyword are added
   (``received_line``)
3. any ``X-warning:`` lines (forgery tagging: ``forgery(sender, fields)``
   is called once the header is parsed)
4. ``From: <last sender>`` when the header has no originator field
5. ``To: <r1>, <r2>`` when it has no destination field (folded only past
   RFC 5322's 998 characters)
6. the header, rewritten by ``rfc822.parse`` (``@him`` qualification,
   ``BadHeader:``), then the blank line and the body verbatim.

The built-in store asks for its ``form`` (``StoredForm``) instead of upas's:
addresses in RFC 5322 ``@`` form (``at_form``) in 4 and 5, folded to 78
columns, and in the header's bang paths (bare names from trusted peers get
our domain); ``Date:`` and ``Message-ID:`` when the header has none, as
Postfix's cleanup does.  A ``-m`` mailer gets upas's stream.

Nothing is written until the header is complete: a message with more
``Received:`` and ``Delivered-To:`` fields than ``hop_limit`` (a mail loop)
is refused with no byte stored.

Lines end in LF; the protocol has already removed the SMTP dot-stuffing
and CRLF.  NUL bytes are dropped.  A header line that is not valid UTF-8
refuses the message with ``mail refused: illegal header chars``.  The
header is parsed up to 16 KiB, as upas does; beyond that it passes
through unparsed, but is read up to ``HEADER_SCAN_LIMIT`` for the fields
that decide what is added or refused (``scan_fields``).  Unlike upas, the parser state is fresh for every
message (quirk Q5) and a header-only message ends at the dot (Q4).
"""

import email.utils
import functools
import re
import secrets
import time
from dataclasses import dataclass

from .. import replies, rfc822
from .local import at_form

HEADER_LIMIT = 16 * 1024  # upas parses and rewrites this much
HEADER_SCAN_LIMIT = 100 * 1024  # Postfix header_size_limit: how far Date: etc. are looked for
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def plan9_date(seconds):
    """[9F] date: ``Wed Mar  7 23:47:45 -0400 2024`` in local time."""
    return _plan9_date(int(seconds))


@functools.lru_cache(maxsize=4)  # every message of one second shares it
def _plan9_date(seconds):
    t = time.localtime(seconds)
    off = t.tm_gmtoff // 60
    sign = "-" if off < 0 else "+"
    off = abs(off)
    return "%s %s %2d %02d:%02d:%02d %s%02d%02d %d" % (
        _DAYS[t.tm_wday], MONTHS[t.tm_mon - 1], t.tm_mday,
        t.tm_hour, t.tm_min, t.tm_sec, sign, off // 60, off % 60, t.tm_year,
    )


def envelope_line(sender, date):
    return "From %s %s remote from \n" % (sender, date)


def received_line(him, rsys, me, date, tls=None, user=None):
    """upas's line; with ``tls`` (a summary) or ``user``, Postfix's form::

        Received: from <him> ([<rsys>])
        \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
        \t(Authenticated sender: <user>)
        \tby <me> with ESMTPSA; <date>

    ``with`` is ESMTPS (TLS), ESMTPA (AUTH) or ESMTPSA (both), RFC 3848.
    """
    if tls is None and user is None:
        return "Received: from %s ([%s]) by %s; %s\n" % (him, rsys, me, date)
    lines = ["Received: from %s ([%s])" % (him, rsys)]
    if tls is not None:
        lines.append("\t(using %s)" % tls)
    if user is not None:
        lines.append("\t(Authenticated sender: %s)" % user)
    protocol = "ESMTP" + ("S" if tls is not None else "") + ("A" if user is not None else "")
    lines.append("\tby %s with %s; %s" % (me, protocol, date))
    return "\n".join(lines) + "\n"


FOLD_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
LINE_LIMIT = 998  # and MUST be at most 998


def address_field(name, addresses, width=FOLD_WIDTH):
    """``Name: a, b`` folded after commas into lines of at most ``width``.

    An address longer than a line still gets a line of its own.
    """
    lines = [name + ":"]
    for i, addr in enumerate(addresses):
        item = " " + addr + ("," if i < len(addresses) - 1 else "")
        if len(lines[-1]) + len(item) > width and lines[-1] != name + ":":
            lines.append("")
        lines[-1] += item
    return "\n".join(lines) + "\n"


def upas_field(name, addresses):
    """upas's added field, one line as upas writes it; folded only past 998."""
    line = "%s: %s\n" % (name, ", ".join(addresses))
    return address_field(name, addresses) if len(line) > LINE_LIMIT + 1 else line


_FIELD_NAME = re.compile(r"([!-9;-~]+)[ \t]*:")  # RFC 5322 obs-optional: WSP before ":"


def scan_fields(lines):
    """(lowercased name, unfolded value) of each field in header lines (str).

    Unlike ``rfc822.parse`` this reads the obsolete ``Name :`` form and goes
    on past anything it does not understand: it only says what is there.
    """
    fields = []
    for line in lines:
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += line
            continue
        m = _FIELD_NAME.match(line)
        if m:
            fields.append([m.group(1).lower(), line[m.end():]])
    return [(name, value.strip()) for name, value in fields]


@dataclass(frozen=True)
class StoredForm:
    """What the built-in store adds differently from upas (see above)."""

    domain: str  # qualifies bare addresses; names the Message-ID
    seconds: float  # when the message arrived
    trusted: bool = False  # trusted or authenticated: bare header names are ours

    def address(self, path):
        return at_form(path, self.domain) or "MAILER-DAEMON@" + self.domain

    def header_qualifier(self, him):
        """What a bare header address is completed with (upas: always ``him``)."""
        return self.domain if self.trusted else him

    @staticmethod
    def header_rewrite(qualifier):
        """A one-word header address: a bang path in ``@`` form, a name qualified."""
        def rewrite(word, bracketed):
            return at_form(word, qualifier) if "!" in word else word + "@" + qualifier
        return rewrite

    def date(self):
        return _rfc5322_date(int(self.seconds))

    def message_id(self):
        return "<%d.%s@%s>" % (self.seconds, secrets.token_hex(6), self.domain)


@functools.lru_cache(maxsize=4)
def _rfc5322_date(seconds):
    return email.utils.formatdate(seconds, localtime=True)


class MessageRefused(Exception):
    """The message is refused for its content: reply 554 ``reply``.

    upas's refusals are ``5.7.1 <text>``; ours bring their own reply.
    """

    def __init__(self, text, reply=None):
        Exception.__init__(self, text)
        self.reply = reply or replies.REFUSED.format(text=text)


def too_many_hops(fields, limit):
    """More than ``limit`` Received: and Delivered-To: fields, ours counted?

    upas's send refuses a message with more than 32 ``Received:`` lines
    ("possible forward loop"); Postfix counts ``Delivered-To:`` too.
    """
    hops = 1 + sum(1 for name, _ in fields if name in ("received", "delivered-to"))
    return limit is not None and hops > limit


class MailerStream:
    """Turn unstuffed message lines into the mailer stream, written to ``write``.

    ``write`` takes bytes.  ``error`` is set (and writing stops) when the
    content is refused.  ``hop_limit`` refuses a looping message.
    """

    def __init__(self, write, sender, last_sender, recipients, him, rsys, me,
                 date, forgery=None, tls=None, user=None, form=None, hop_limit=None):
        self._write = write
        self._form = form
        self._him = him
        self._last_sender = last_sender
        self._recipients = recipients
        self._hop_limit = hop_limit
        self._header = []  # str lines, parsed as upas does (its first 16 KiB)
        self._beyond = []  # bytes lines of the header past upas's 16 KiB
        self._header_size = 0
        self._in_header = True
        self._forgery = forgery
        self._head = [envelope_line(sender, date).encode(),
                      received_line(him, rsys, me, date, tls, user).encode()]
        self.error = None
        self.size = 0
        self.message_id = None  # the Message-ID field's value, for the log
        self.delivered_to = ()  # the Delivered-To: values already in the header

    def _emit(self, data):
        self.size += len(data)
        self._write(data)

    def line(self, line):
        if self.error is not None:
            return
        if b"\0" in line:
            line = line.replace(b"\0", b"")
        if not self._in_header:
            self._emit(line + b"\n")
            return
        before = self._header_size
        self._header_size += len(line) + 1
        if before >= HEADER_LIMIT:
            # past upas's 16 KiB: passed on verbatim, only looked at
            self._beyond.append(line + b"\n")
        else:
            try:
                self._header.append(line.decode("utf-8") + "\n")
            except UnicodeDecodeError:
                self.error = MessageRefused(replies.ILLEGAL_HEADER_CHARS)
                return
        if line == b"" or self._header_size >= HEADER_SCAN_LIMIT:
            self._flush_header()

    def lines(self, data):
        """Several LF-terminated lines at once: the header line by line, then
        the body in one piece."""
        start, size = 0, len(data)
        while self._in_header and start < size and self.error is None:
            end = data.index(b"\n", start)
            self.line(data[start:end])
            start = end + 1
        if self.error is not None or start >= size:
            return
        rest = data[start:] if start else data
        if b"\0" in rest:
            rest = rest.replace(b"\0", b"")
        self._emit(rest)

    def _flush_header(self):
        self._in_header = False
        whole = self._header + [b.decode("utf-8", "replace") for b in self._beyond]
        fields = scan_fields(whole[:next((i for i, x in enumerate(whole) if x == "\n"),
                                         len(whole))])
        if too_many_hops(fields, self._hop_limit):
            self.error = MessageRefused(replies.HOPS_WHY, replies.TOO_MANY_HOPS)
            return
        self.message_id = next((v for name, v in fields if name == "message-id"), None)
        self.delivered_to = tuple(v for name, v in fields if name == "delivered-to")
        for data in self._head:
            self._emit(data)
        form = self._form
        if form is None:
            header = rfc822.parse(self._header, self._him)
            address, field = str, upas_field
        else:
            qualifier = form.header_qualifier(self._him)
            header = rfc822.parse(self._header, qualifier, form.header_rewrite(qualifier))
            address, field = form.address, address_field
        if self._forgery is not None:
            for w in self._forgery(self._last_sender, header.fields):
                self._emit(("X-warning: %s\n" % w).encode())
        if not header.has_originator:
            self._emit(field("From", [address(self._last_sender)]).encode())
        if not header.has_destination:
            self._emit(field("To", list(map(address, self._recipients))).encode())
        if form is not None:
            if not any(name == "date" for name, _ in fields):
                self._emit(("Date: %s\n" % form.date()).encode())
            if self.message_id is None:
                self._emit(("Message-ID: %s\n" % form.message_id()).encode())
        self._emit("".join(header.lines).encode("utf-8"))
        self._emit(b"".join(self._beyond))
        self._header = self._beyond = []

    def end(self):
        """The final dot: flush a header-only message."""
        if self.error is None and self._in_header:
            self._flush_header()
