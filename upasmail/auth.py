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

``Throttle`` remembers recent failures per peer IP (across connections):
each failure's reply waits ``unit·2^(n-1)`` seconds, at most ``cap``; the
protocol closes the connection after ``max_failures`` failures in it.
"""

import base64
import binascii
import secrets

from twisted.cred import credentials, portal
from twisted.mail.smtp import IMessageDelivery
from zope.interface import implementer

from .decision import ACCEPT, Accept, reject
from .tarpit import doubling

CRAM_MD5, PLAIN, LOGIN = "CRAM-MD5", "PLAIN", "LOGIN"
CLEARTEXT = (PLAIN, LOGIN)
USERNAME_PROMPT = base64.b64encode(b"Username:").decode()  # VXNlcm5hbWU6
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()  # UGFzc3dvcmQ6

# upas's texts
OK = "2.0.0 Authentication successful"
FAILED = "5.7.1 Authentication failed"
BAD_SEQUENCE = "5.5.2 Bad sequence of commands"
ENCRYPTION_REQUIRED = "5.7.1 Encryption required for requested authentication mechanism"
CANNOT_DECODE = "5.5.4 Cannot decode base64"
POOR_CRAM = "5.5.4 Poorly formed CRAM-MD5 response"
UNRECOGNISED = "5.5.1 Unrecognised authentication type {mech}"
TEMPORARY = "4.7.0 Temporary authentication failure"
# ours
CANCELLED = "5.7.0 Authentication cancelled"
POOR_PLAIN = "5.5.4 Poorly formed PLAIN response"
NOT_AUTHORIZED = "5.7.1 Authentication failed: authorization identity must be the user"
NO_INITIAL = "5.5.2 CRAM-MD5 takes no initial response"
IN_TRANSACTION = "5.5.1 AUTH not permitted during a mail transaction"
TOO_MANY = "4.7.0 {dom} Too many failed authentication attempts; closing connection"
NOT_OFFERED = "5.5.1 Error: AUTH not available on this server"


def offered(encrypted, clear_ok, cram_ok):
    """The mechanisms to advertise and accept, upas order."""
    mechs = [CRAM_MD5] if cram_ok else []
    if encrypted or clear_ok:
        mechs += [PLAIN, LOGIN]
    return mechs


def start_verdict(mech, session, available, mechanisms, encrypted, clear_ok):
    """May an AUTH exchange with ``mech`` begin?

    ``available``: is there a password checker at all; ``mechanisms``: what
    ``offered`` gives for this session.
    """
    if not available:
        return reject(502, NOT_OFFERED, counts=False)
    if session.authenticated:
        return reject(503, BAD_SEQUENCE)
    if not session.him:
        return reject(503, "Start by saying HELO, please.")
    if session.envelope.senders:
        return reject(503, IN_TRANSACTION)
    if mech in CLEARTEXT and not (encrypted or clear_ok):
        return reject(538, ENCRYPTION_REQUIRED)
    if mech not in mechanisms:
        return reject(501, UNRECOGNISED.format(mech=mech))
    return ACCEPT


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
        return reject(501, POOR_PLAIN)
    authzid, user, password = fields
    if authzid and authzid != user:
        return reject(535, NOT_AUTHORIZED)
    return Accept(credentials.UsernamePassword(user, password))


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
            self.cram.challenge = b"<%d.%d@%s>" % (secrets.randbits(62), int(now),
                                                    host.encode("idna"))

    def start(self):
        if self.mech == CRAM_MD5:
            if self.initial is not None:
                return reject(501, NO_INITIAL)
            return Prompt(base64.b64encode(self.cram.challenge).decode())
        if self.initial is None:
            return Prompt("" if self.mech == PLAIN else USERNAME_PROMPT)
        return self.respond(self.initial)

    def respond(self, line):
        try:
            blob = decode(line)
        except Cancelled:
            return reject(501, CANCELLED)
        except Undecodable:
            return reject(501, CANNOT_DECODE)
        if self.mech == PLAIN:
            return parse_plain(blob)
        if self.mech == LOGIN:
            if self.user is None:
                self.user = blob
                return Prompt(PASSWORD_PROMPT)
            return Accept(credentials.UsernamePassword(self.user, blob))
        user, space, digest = blob.rpartition(b" ")
        if not space or not user:
            return reject(501, POOR_CRAM)
        self.cram.setResponse(user + b" " + digest)
        return Accept(self.cram)


def printable_user(name, limit=64):
    """A user name safe for logs and the Received: comment."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    text = "".join(c if c.isprintable() and c not in "()\\\ufffd" else "?" for c in text)
    return text[:limit] + ("..." if len(text) > limit else "")


class Throttle:
    """Recent AUTH failures per peer IP, forgotten ``memory`` seconds after the last."""

    def __init__(self, clock, unit=1.0, cap=30.0, memory=900.0, size=10000):
        self.clock = clock
        self.unit = unit
        self.cap = cap
        self.memory = memory
        self.size = size
        self._failures = {}  # ip -> (count, time of the last)

    def _count(self, ip, now):
        count, last = self._failures.get(ip, (0, now))
        return count if now - last < self.memory else 0

    def failed(self, ip):
        """Record a failure; the seconds its reply should wait."""
        now = self.clock.seconds()
        count = self._count(ip, now) + 1
        if len(self._failures) >= self.size and ip not in self._failures:
            self._failures = {k: v for k, v in self._failures.items()
                              if now - v[1] < self.memory}
            if len(self._failures) >= self.size:  # still full: forget the oldest
                del self._failures[min(self._failures, key=lambda k: self._failures[k][1])]
        self._failures[ip] = (count, now)
        return doubling(count, self.unit, self.cap)

    def succeeded(self, ip):
        self._failures.pop(ip, None)


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
