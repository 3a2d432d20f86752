"""The byte stream smtpd hands to its mailer (upas smtpd.c ``pipemsg``).

In order (spec upas-behaviour.md §1.10.3):

1. ``From <first sender> <date> remote from `` (empty system name, as upas)
2. ``Received: from <him> ([<rsys>]) by <me>; <date>``; with TLS or AUTH,
   Postfix's comments and an RFC 3848 ``with`` keyword are added
   (``received_line``)
3. any ``X-warning:`` lines (forgery tagging: ``forgery(sender, fields)``
   is called once the header is parsed)
4. ``From: <last sender>`` when the header has no originator field
5. ``To: <r1>, <r2>`` when it has no destination field
6. the header, rewritten by ``rfc822.parse`` (``@him`` qualification,
   ``BadHeader:``), then the blank line and the body verbatim.

The built-in store asks for its ``form`` (``StoredForm``) instead of upas's
for what is added in 4 and 5: addresses in RFC 5322 ``@`` form, and
``Date:`` and ``Message-ID:`` when the header has none, as Postfix's
cleanup does.  A ``-m`` mailer gets upas's stream unchanged.

Lines end in LF; the protocol has already removed the SMTP dot-stuffing
and CRLF.  NUL bytes are dropped.  A header line that is not valid UTF-8
refuses the message with ``mail refused: illegal header chars``.  The
header is collected up to 16 KiB, as upas does; beyond that it passes
through unparsed.  Unlike upas, the parser state is fresh for every
message (quirk Q5) and a header-only message ends at the dot (Q4).
"""

import email.utils
import secrets
import time
from dataclasses import dataclass

from . import rfc822
from .local import at_form

HEADER_LIMIT = 16 * 1024
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def plan9_date(seconds):
    """[9F] date: ``Wed Mar  7 23:47:45 -0400 2024`` in local time."""
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


@dataclass(frozen=True)
class StoredForm:
    """What the built-in store adds differently from upas (see above)."""

    domain: str  # qualifies bare addresses; names the Message-ID
    seconds: float  # when the message arrived

    def address(self, path):
        return at_form(path, self.domain) or "MAILER-DAEMON@" + self.domain

    def date(self):
        return email.utils.formatdate(self.seconds, localtime=True)

    def message_id(self):
        return "<%d.%s@%s>" % (self.seconds, secrets.token_hex(6), self.domain)


class MessageRefused(Exception):
    """The message is refused for its content (reply 554 5.7.1 <text>)."""


class MailerStream:
    """Turn unstuffed message lines into the mailer stream, written to ``write``.

    ``write`` takes bytes.  ``error`` is set (and writing stops) when the
    content is refused.
    """

    def __init__(self, write, sender, last_sender, recipients, him, rsys, me,
                 date, forgery=None, tls=None, user=None, form=None):
        self._write = write
        self._form = form
        self._him = him
        self._last_sender = last_sender
        self._recipients = recipients
        self._header = []
        self._header_size = 0
        self._in_header = True
        self._forgery = forgery
        self.error = None
        self.size = 0
        self.message_id = None  # the Message-ID field's value, for the log
        self._emit(envelope_line(sender, date).encode())
        self._emit(received_line(him, rsys, me, date, tls, user).encode())

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
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.error = MessageRefused("mail refused: illegal header chars")
            return
        self._header.append(text + "\n")
        self._header_size += len(line) + 1
        if text == "" or self._header_size >= HEADER_LIMIT:
            self._flush_header()

    def _flush_header(self):
        self._in_header = False
        header = rfc822.parse(self._header, self._him)
        self.message_id = next((v.strip() for name, v in header.fields
                                if name == "message-id"), None)
        if self._forgery is not None:
            for w in self._forgery(self._last_sender, header.fields):
                self._emit(("X-warning: %s\n" % w).encode())
        form = self._form
        address = form.address if form is not None else str
        if not header.has_originator:
            self._emit(("From: %s\n" % address(self._last_sender)).encode())
        if not header.has_destination:
            self._emit(("To: %s\n" % ", ".join(map(address, self._recipients))).encode())
        if form is not None:
            if not any(name == "date" for name, _ in header.fields):
                self._emit(("Date: %s\n" % form.date()).encode())
            if not header.has_message_id:
                self._emit(("Message-ID: %s\n" % form.message_id()).encode())
        self._emit("".join(header.lines).encode("utf-8"))
        self._header = []

    def end(self):
        """The final dot: flush a header-only message."""
        if self.error is None and self._in_header:
            self._flush_header()
