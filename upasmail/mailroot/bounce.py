"""Bounces: what runq does with a message it cannot deliver, as an RFC 3464 DSN.

upas runq mails the sender smtp's stderr.  Here the returned message is a
``multipart/report; report-type=delivery-status`` with three parts: a
short text for people (with upas's explanation lines), a
``message/delivery-status`` part (one block per failed recipient:
``Final-Recipient``, ``Action: failed``, ``Status``, ``Remote-MTA``,
``Diagnostic-Code``) and the original header as ``text/rfc822-headers``.

``dsn(...)`` returns the bounce as the byte stream smtpd hands its mailer
(``From /dev/null <date> remote from`` first, LF line ends), so the mail
root stores or queues it like any accepted message.  Its envelope sender
is ``<>``: a bounce that fails is never bounced again.  The queue sends the
report of a failed bounce (a double bounce) to the postmaster instead,
with ``double=True``: from ``double-bounce`` (Postfix's
``double_bounce_sender``), whose own failures are dropped.
"""

import email.utils
import re
import secrets

from ..address import NULL_SENDER
from .pipemsg import envelope_line, plan9_date

DOUBLE_BOUNCE = "double-bounce"

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def status_of(reply, permanent=True):
    """RFC 3463 status for a failure: the reply's enhanced code, else a default."""
    m = _ENHANCED.search(reply or "")
    if m and m.group(1) in "45":
        return "%s.%s.%s" % (m.group(1) if not permanent else "5", m.group(2), m.group(3))
    return "5.0.0" if permanent else "4.0.0"


def original_header(message_bytes, limit=64 * 1024):
    """The header of a queued message (its ``From `` line dropped)."""
    head = message_bytes.split(b"\n\n", 1)[0][:limit]
    lines = head.split(b"\n")
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    return b"\n".join(lines).decode("utf-8", "replace")


def _clean(text):
    return " ".join(str(text).split())


def dsn(failures, sender_addr, header_text, reporting_mta, arrival, now, queue_id,
        why_lines=(), double=False):
    """The bounce message bytes.

    ``failures``: [(recipient address, status "5.x.y", remote MTA or "",
    diagnostic text)].  ``sender_addr``: who gets it in ``@`` form, the
    original sender (or, ``double``, the postmaster).
    """
    boundary = "%s/%s" % (queue_id, secrets.token_hex(8))
    date = email.utils.formatdate(now, localtime=True)
    if double and not why_lines:
        why_lines = ["The message was itself a bounce (from <>), so it was not returned "
                     "to its sender; this copy is for the postmaster."]
    lines = [
        envelope_line(DOUBLE_BOUNCE if double else NULL_SENDER, plan9_date(now)).rstrip("\n"),
        "From: Mail Delivery System <MAILER-DAEMON@%s>" % reporting_mta,
        "To: <%s>" % sender_addr,
        "Subject: %sUndelivered Mail Returned to Sender" % (
            "Postmaster Copy: " if double else ""),
        "Date: %s" % date,
        "Message-ID: <%s.%s@%s>" % (queue_id, secrets.token_hex(6), reporting_mta),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status;',
        '\tboundary="%s"' % boundary,
        "",
        "This is a MIME-encapsulated message.",
        "",
        "--" + boundary,
        "Content-Type: text/plain; charset=utf-8",
        "",
        "This is the mail system at %s." % reporting_mta,
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for rcpt, status, mta, diagnostic in failures:
        lines.append("<%s>: %s" % (rcpt, _clean(diagnostic) or status))
    if why_lines:
        lines += [""] + [_clean(w) for w in why_lines if _clean(w)]
    lines += [
        "",
        "--" + boundary,
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; %s" % reporting_mta,
        "X-Upas-Queue-ID: %s" % queue_id,
        "Arrival-Date: %s" % email.utils.formatdate(arrival, localtime=True),
    ]
    for rcpt, status, mta, diagnostic in failures:
        lines += ["", "Final-Recipient: rfc822; %s" % rcpt, "Action: failed",
                  "Status: %s" % status]
        if mta:
            lines.append("Remote-MTA: dns; %s" % mta)
        if diagnostic:
            lines.append("Diagnostic-Code: smtp; %s" % _clean(diagnostic))
    lines += [
        "",
        "--" + boundary,
        "Content-Type: text/rfc822-headers",
        "",
        header_text.rstrip("\n"),
        "",
        "--" + boundary + "--",
        "",
    ]
    return "\n".join(lines).encode("utf-8")
