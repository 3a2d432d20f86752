"""AUTH (upas smtpd.c ``auth``, ``passauth``): mechanisms, exchanges, throttling.

Spec upas-behaviour.md §1.11.1.  Everything here decides; the protocol
sends the replies and asks the ``twisted.cred`` portal.

Mechanisms, in upas's order: CRAM-MD5 (allowed in the clear: the password
never crosses the wire), PLAIN and LOGIN (only on an encrypted channel,
or with ``-p``; otherwise ``538`` and not advertised).  CRAM-MD5 is left
out when the checker cannot do it (hashed secrets, ``passwd``).

An ``Exchange`` is fed the client's lines and answers with a ``Prompt``
(send ``334 <text>``), a ``Reject`` verdict, or an ``Accept`` carrying the
``twisted.cred`` credentials to check.  Where upas is loose this is strict
(each case has its own reply, see docs/deviations.rst): base64 must be
valid, ``*`` cancels, ``=`` is an empty initial response (RFC 4954), a
PLAIN blob needs exactly two NULs and an empty authorization identity (or
the user's own), and CRAM-MD5 takes no initial response.

``Throttle`` keeps the failure budget of each client address across its
connections: failures are answered one after another, each waiting
``unit·2^(n-1)`` seconds (at most ``cap``) after the previous one; the
``limit``'th closes its connection and later attempts are refused
unchecked until the address is forgotten.  A response that is not well
formed (bad base64, a poorly formed PLAIN or CRAM-MD5 response, a foreign
PLAIN authorization identity) is a failure too (``is_failure``).
"""

import base64
import binascii
import re
import secrets

from twisted.cred import credentials, portal
from twisted.mail.smtp import IMessageDelivery
from zope.interface import implementer

from .. import replies
from ..decision import Accept, reject
from ..interfaces import ICredentialsSource
from .tarpit import doubling

CRAM_MD5, PLAIN, LOGIN = "CRAM-MD5", "PLAIN", "LOGIN"
CLEARTEXT = (PLAIN, LOGIN)


# refusals of a response that count as failed attempts: a client that
# cannot form its response is treated as one that guessed wrong
_FAILURES = frozenset([replies.AUTH_CANNOT_DECODE, replies.AUTH_POOR_PLAIN,
                       replies.AUTH_POOR_CRAM, replies.AUTH_NOT_AUTHORIZED])


def is_failure(verdict):
    """Does this refusal of an exchange count against the address's AUTH budget?"""
    return not verdict.ok and verdict.text() in _FAILURES


def offered(encrypted, clear_ok, cram_ok):
    """The mechanisms to advertise and accept, upas order."""
    mechs = [CRAM_MD5] if cram_ok else []
    if encrypted or clear_ok:
        mechs += [PLAIN, LOGIN]
    return mechs


def session_mechanisms(portal, encrypted, clear_ok):
    """(a checker exists, the mechanisms a session may use) for a cred
    ``portal`` (None: no AUTH): what EHLO offers.  With ``encrypted`` and
    ``clear_ok`` true: what the checkers take, the auth table's fact (the
    server's and ``upas-policy explain``'s)."""
    if portal is None:
        return False, []

    def usable(checker):
        if ICredentialsSource.providedBy(checker):
            return checker.available()
        return checker is not None

    clear = portal.checkers.get(credentials.IUsernamePassword)
    hashed = portal.checkers.get(credentials.IUsernameHashedPassword)
    clear_usable, cram_ok = usable(clear), usable(hashed)
    if not (clear_usable or cram_ok):
        return False, []
    if ICredentialsSource.providedBy(hashed):
        cram_ok = cram_ok and hashed.cram_md5_ok()
    mechanisms = offered(encrypted, clear_ok, cram_ok)
    if not clear_usable:
        mechanisms = [m for m in mechanisms if m not in CLEARTEXT]
    return True, mechanisms


class Cancelled(Exception):
    pass


class Undecodable(Exception):
    pass


def decode(line):
    """One client response line → bytes (``*`` cancels, ``=`` is empty)."""
    text = line.strip(b" \t\r")
    if text == b"*":
        raise Cancelled()
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Undecodable() from None


class Prompt:
    """Send ``334 <text>`` and wait for the next line."""

    ok = False

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return "Prompt(%r)" % self.text


def parse_plain(blob):
    """``authzid NUL user NUL password`` → verdict carrying UsernamePassword."""
    fields = blob.split(b"\0")
    if len(fields) != 3:
        return reject(501, replies.AUTH_POOR_PLAIN, reason="auth-failed", detail="malformed")
    authzid, user, password = fields
    if authzid and authzid != user:
        return reject(535, replies.AUTH_NOT_AUTHORIZED, reason="auth-failed")
    return Accept(credentials.UsernamePassword(user, password))


_CRAM_DIGEST = re.compile(rb"[0-9A-Fa-f]{32}\Z")


def parse_cram(blob):
    """``user SP digest`` (RFC 2195) → the same, digest lowercased; None if poorly formed.

    Only this shape may reach ``CramMD5Credentials.setResponse``, which
    splits at any blank and raises on anything with fewer than two words.
    The user must be printable UTF-8 without blanks (no user name could
    match otherwise, and a blank would move the split), and the digest
    exactly 32 hex digits (an HMAC-MD5); any case is taken, as the check
    compares lowercase hex.  Everything else is poorly formed, not a wrong
    password.
    """
    user, space, digest = blob.partition(b" ")
    if not space or not _CRAM_DIGEST.match(digest):
        return None
    try:
        name = user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not name or not name.isprintable() or " " in name:
        return None
    return user + b" " + digest.lower()


class Exchange:
    """One AUTH exchange for ``mech`` (already checked by ``start_verdict``)."""

    def __init__(self, mech, initial, host, now):
        self.mech = mech
        self.initial = initial.encode("ascii") if isinstance(initial, str) else initial
        self.user = None
        self.cram = None
        if mech == CRAM_MD5:
            self.cram = credentials.CramMD5Credentials(host)
            # Twisted's challenge comes from ``random``; a CRAM challenge must
            # never be guessable or repeated (RFC 2195)
            self.cram.challenge = replies.AUTH_CRAM_CHALLENGE % (
                secrets.randbits(62), int(now), host.encode("idna"))

    def start(self):
        if self.mech == CRAM_MD5:
            if self.initial is not None:
                return reject(501, replies.AUTH_NO_INITIAL, reason="syntax")
            return Prompt(base64.b64encode(self.cram.challenge).decode())
        if self.initial is None:
            return Prompt("" if self.mech == PLAIN else replies.AUTH_USERNAME_PROMPT)
        return self.respond(self.initial)

    def respond(self, line):
        try:
            blob = decode(line)
        except Cancelled:
            return reject(501, replies.AUTH_CANCELLED, reason="auth-failed", detail="cancelled")
        except Undecodable:
            return reject(501, replies.AUTH_CANNOT_DECODE, reason="auth-failed",
                          detail="malformed")
        if self.mech == PLAIN:
            return parse_plain(blob)
        if self.mech == LOGIN:
            if self.user is None:
                self.user = blob
                return Prompt(replies.AUTH_PASSWORD_PROMPT)
            return Accept(credentials.UsernamePassword(self.user, blob))
        response = parse_cram(blob)
        if response is None:
            return reject(501, replies.AUTH_POOR_CRAM, reason="auth-failed", detail="malformed")
        self.cram.setResponse(response)
        return Accept(self.cram)


def printable_user(name, limit=64):
    """A user name safe for logs and the Received: comment."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    text = "".join(c if c.isprintable() and c not in "()\\\ufffd" else "?" for c in text)
    return text[:limit] + ("..." if len(text) > limit else "")


class _Record:
    """One address: failures remembered, checks under way, when the last reply goes out."""

    __slots__ = ("failures", "pending", "answered")

    def __init__(self, now):
        self.failures = 0
        self.pending = 0
        self.answered = now


class Throttle:
    """AUTH failures per client address, across all of its connections.

    An address may have ``limit`` failures (checks under way count too,
    so parallel connections cannot start more); then ``begin`` refuses
    until the record is forgotten, ``memory`` seconds after the last
    failure was answered, or a login from the address succeeds.  Failures
    are answered one after another: the n-th goes out ``unit``·2^(n-1)
    seconds (at most ``cap``) after the previous one from the address,
    whichever connection either came on, so opening more connections
    buys no faster answers.
    """

    def __init__(self, clock, unit=1.0, cap=30.0, limit=3, memory=900.0, size=10000):
        self.clock = clock
        self.unit = unit
        self.cap = cap
        self.limit = limit
        self.memory = memory
        self.size = size
        self._records = {}  # ip -> _Record

    @classmethod
    def configured(cls, clock, settings):
        return cls(clock, settings.auth_fail_delay, limit=settings.auth_max_failures)

    def _record(self, ip):
        now = self.clock.seconds()
        r = self._records.get(ip)
        if r is not None and not r.pending and now - r.answered >= self.memory:
            r = None  # forgiven
        if r is None:
            if len(self._records) >= self.size:
                self._forget_some(now)
            r = self._records[ip] = _Record(now)
        return r

    def _forget_some(self, now):
        self._records = {k: r for k, r in self._records.items()
                         if r.pending or now - r.answered < self.memory}
        if len(self._records) >= self.size:  # still full: forget the oldest
            del self._records[min(self._records, key=lambda k: self._records[k].answered)]

    def begin(self, ip):
        """May a check for ``ip`` start?  If so it is counted until it ends."""
        r = self._record(ip)
        if r.failures + r.pending >= self.limit:
            return False
        r.pending += 1
        return True

    def failed(self, ip):
        """The check failed: (seconds its reply must wait, failures of ``ip`` so far)."""
        r = self._record(ip)
        r.pending = max(r.pending - 1, 0)
        r.failures += 1
        now = self.clock.seconds()
        r.answered = max(now, r.answered) + doubling(r.failures, self.unit, self.cap)
        return r.answered - now, r.failures

    def succeeded(self, ip):
        r = self._record(ip)
        r.pending = max(r.pending - 1, 0)
        r.failures = 0

    def abandoned(self, ip):
        """The check could not be made (a temporary error): it does not count."""
        r = self._record(ip)
        r.pending = max(r.pending - 1, 0)


@implementer(portal.IRealm)
class SessionRealm:
    """The realm of ``portal.Portal(SessionRealm(), [checker])``.

    A login changes nothing about delivery: the avatar is None, meaning
    "keep the session's IMessageDelivery".  An embedder's realm may return
    its own per-user IMessageDelivery instead.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("smtpd asks for IMessageDelivery only")
        return IMessageDelivery, None, lambda: None
