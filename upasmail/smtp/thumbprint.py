"""Certificate pinning for the smtp client: Plan 9's thumbprint files.

upas smtp accepts a TLS server only when the SHA-256 (or SHA-1) hash of its
certificate is listed in ``/sys/lib/tls/smtp`` and not in
``/sys/lib/tls/smtp.exclude``.  The files hold lines such as::

    x509 sha256=8vGw2...base64...= server=mx.example.com
    x509 sha1=3f7a...hex...

(``#`` starts a comment; attributes other than ``sha256=``/``sha1=`` are
ignored).  ``Thumbprints.load`` raises ConfigError naming the line for a
malformed hash; the client treats that as a permanent failure, as upas
does with ``bad thumbprints``.
"""

import base64
import binascii
import hashlib

from ..conf import ConfigError, read_text


def parse(text, filename="thumbprints"):
    """The set of ("sha256"|"sha1", digest bytes) listed."""
    prints = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] != "x509":
            raise ConfigError("%s:%d: expected 'x509 sha256=...'" % (filename, n))
        found = False
        for word in words[1:]:
            kind, eq, value = word.partition("=")
            if kind not in ("sha256", "sha1") or not eq:
                continue
            try:
                digest = (base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
                          if kind == "sha256" else bytes.fromhex(value))
            except (binascii.Error, ValueError):
                raise ConfigError("%s:%d: bad %s value" % (filename, n, kind)) from None
            if len(digest) != (32 if kind == "sha256" else 20):
                raise ConfigError("%s:%d: %s has the wrong length" % (filename, n, kind))
            prints.add((kind, digest))
            found = True
        if not found:
            raise ConfigError("%s:%d: no sha256= or sha1= hash" % (filename, n))
    return prints


class Thumbprints:
    """The allow list and the exclude list, read from files."""

    def __init__(self, allowed, excluded=frozenset()):
        self.allowed = frozenset(allowed)
        self.excluded = frozenset(excluded)

    @classmethod
    def load(cls, path, exclude_path=None):
        allowed = parse(read_text(path), path)
        excluded = parse(read_text(exclude_path), exclude_path) if exclude_path else ()
        return cls(allowed, excluded)

    @staticmethod
    def of(der):
        return {("sha256", hashlib.sha256(der).digest()), ("sha1", hashlib.sha1(der).digest())}

    def accepts(self, der):
        mine = self.of(der)
        return bool(mine & self.allowed) and not (mine & self.excluded)


def line_for(der):
    """The thumbprint line for a certificate (for admins pinning a server)."""
    return "x509 sha256=" + base64.b64encode(hashlib.sha256(der).digest()).decode()
