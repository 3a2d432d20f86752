"""The password file: what factotum and the auth server are to upas smtpd.

upas checks AUTH passwords through factotum; here a ``twisted.cred``
checker built on Twisted's ``FilePasswordDB`` reads ``<root>/lib/passwd``
(or ``--passwd``), one ``user:secret`` per line, ``#`` comments and blank
lines skipped, fields after the second ``:`` ignored (so a secret cannot
hold a ``:``; the line end is removed, other blanks are part of it).
User names are case-sensitive.  A secret is one of:

* plaintext, or ``{PLAIN}secret`` when the secret itself starts with
  ``{`` or ``$2``: usable by every mechanism.  CRAM-MD5 needs this: its
  response is an HMAC keyed with the secret itself;
* a bcrypt hash (``$2b$12$...``, also ``$2a$``/``$2y$``, optionally written
  ``{BLF-CRYPT}$2b$...``): PLAIN and LOGIN only.  While any entry is
  hashed, CRAM-MD5 is not offered at all, so no user of a mixed file is
  led into a mechanism that cannot work for them.

The file is re-read when it changes (``conf.WatchedFile``); a broken edit
is logged with ``FILE:LINE`` and the last good version stays; a removed
file turns AUTH off.  Passwords are compared in constant time; bcrypt runs
through ``run_blocking`` (a thread pool) so a slow hash never stalls the
reactor.  Nothing here logs a password.

``python -m upasmail.passwd USER`` prints a bcrypt line for the file.
"""

import getpass
import hashlib
import hmac
import os
import re
import stat
import sys

import bcrypt
from twisted.cred import checkers, credentials, error
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from .conf import ConfigError, WatchedFile, read_text, report  # noqa: F401
from .interfaces import ICredentialsSource, IReloadable

log = Logger(namespace="smtpd")

_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
_SCHEME = re.compile(r"\{([A-Za-z0-9-]+)\}")
_SCHEMES = ("PLAIN", "BLF-CRYPT")


class PasswordFileUnavailable(Exception):
    """No usable password file: AUTH cannot be checked right now."""


def parse_secret(text):
    """``(secret bytes, hashed?)`` for one stored secret, or raise ValueError."""
    m = _SCHEME.match(text)
    scheme = m.group(1).upper() if m else None
    if scheme is not None:
        if scheme not in _SCHEMES:
            raise ValueError("unsupported password scheme {%s} (use {PLAIN} or "
                             "{BLF-CRYPT})" % m.group(1))
        text = text[m.end():]
    if scheme == "PLAIN":
        hashed = False
    elif scheme == "BLF-CRYPT" or text.startswith("$2"):
        if not _BCRYPT.match(text):
            raise ValueError("malformed bcrypt hash (write {PLAIN}%s... for a plaintext "
                             "secret)" % text[:3])
        hashed = True
    else:
        hashed = False
    if not text:
        raise ValueError("empty secret")
    return text.encode("utf-8"), hashed


def parse(text, filename="passwd", errors=None):
    """``{user: (secret, hashed)}`` from the file's text; ConfigError names
    the line (``conf.report``)."""
    entries = {}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 2 or not fields[0]:
            report(errors, "%s:%d: expected user:secret" % (filename, n))
            continue
        user = fields[0].encode("utf-8")
        if user in entries:
            report(errors, "%s:%d: user %s listed twice" % (filename, n, fields[0]))
            continue
        try:
            entries[user] = parse_secret(fields[1])
        except ValueError as e:
            report(errors, "%s:%d: %s" % (filename, n, e))
    return entries


def load(path):
    """Read and check the file now (start-up); raise ConfigError."""
    return parse(read_text(path), path)


def _bcrypt_ok(password, hashed):
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt >= 5 refuses passwords over 72 bytes
        return False


def cram_md5_digest(secret, challenge):
    """The lowercase hex HMAC-MD5 a CRAM-MD5 client answers (RFC 2195)."""
    return hmac.new(secret, challenge, hashlib.md5).hexdigest().encode("ascii")


def exposed(st, egid=None):
    """May users other than its owner and our own group read the file?

    A server that switched to an unprivileged user (twistd ``--gid``)
    reads a root-owned file through the file's group: ``root:<our group>``
    mode 640 is the recommended setting then, not a leak.
    """
    egid = os.getegid() if egid is None else egid
    return bool(st.st_mode & stat.S_IRWXO
                or (st.st_mode & stat.S_IRWXG and st.st_gid != egid))


@implementer(ICredentialsSource, IReloadable)
class PasswordFile(checkers.FilePasswordDB):
    """An ``ICredentialsChecker`` for UsernamePassword and CRAM-MD5 credentials.

    ``FilePasswordDB``'s file and ``getUser``; the table is re-read on
    change with the last good version kept, and secrets may be hashed.
    """

    credentialInterfaces = (credentials.IUsernamePassword,
                            credentials.IUsernameHashedPassword)

    def __init__(self, path, run_blocking=None):
        checkers.FilePasswordDB.__init__(self, path, cache=True)
        self.run_blocking = run_blocking or defer.maybeDeferred
        self._file = WatchedFile(path, self._parse, None)

    def _parse(self, text, path):
        entries = parse(text, path)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and exposed(st) and any(not h for _, h in entries.values()):
            log.warn("{path} holds plaintext secrets and is readable by other users "
                     "(mode {mode:o}); chmod 600 it, or 640 with the server's group",
                     path=path, mode=stat.S_IMODE(st.st_mode), event="smtpd.config")
        return entries

    def entries(self):
        """The current table; PasswordFileUnavailable when there is none."""
        table = self._file.current()
        if table is None:
            raise PasswordFileUnavailable("%s: no usable password file" % self.filename)
        return table

    def reread(self):
        self._file.reread()

    def available(self):
        try:
            return bool(self.entries())
        except PasswordFileUnavailable:
            return False

    def cram_md5_ok(self):
        """May CRAM-MD5 be offered: every secret is stored in plaintext."""
        try:
            return not any(hashed for _, hashed in self.entries().values())
        except PasswordFileUnavailable:
            return False

    def getUser(self, username):
        secret, _ = self.entries()[username]
        return username, secret

    def requestAvatarId(self, creds):
        try:
            entry = self.entries().get(creds.username)
        except PasswordFileUnavailable as e:
            return defer.fail(e)
        if entry is None:
            return defer.fail(error.UnauthorizedLogin("no such user"))
        secret, hashed = entry
        if credentials.IUsernamePassword.providedBy(creds):
            if hashed:
                d = self.run_blocking(_bcrypt_ok, creds.password, secret)
            else:
                d = defer.succeed(hmac.compare_digest(creds.password, secret))
        elif hashed:
            return defer.fail(error.UnauthorizedLogin("CRAM-MD5 needs a plaintext secret"))
        elif isinstance(creds, credentials.CramMD5Credentials):
            expected = cram_md5_digest(secret, creds.challenge)
            d = defer.succeed(hmac.compare_digest(expected, creds.response.lower()))
        else:
            d = defer.maybeDeferred(creds.checkPassword, secret)
        return d.addCallback(self._cbPasswordMatch, creds.username)


def main(argv=None):
    """``python -m upasmail.passwd USER``: print ``USER:<bcrypt hash>``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or ":" in argv[0] or not argv[0]:
        print("usage: python -m upasmail.passwd USER  (password read from the terminal "
              "or stdin)", file=sys.stderr)
        return 64
    if sys.stdin.isatty():
        password = getpass.getpass("password for %s: " % argv[0])
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    data = password.encode("utf-8")
    if not data or len(data) > 72:
        print("passwd: the password must be 1 to 72 bytes", file=sys.stderr)
        return 65
    print("%s:%s" % (argv[0], bcrypt.hashpw(data, bcrypt.gensalt()).decode("ascii")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
