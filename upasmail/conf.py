"""smtpd.conf: upas's configuration file (spam.c ``getconf``).

Syntax is upas's line scanner: tokens are separated by blanks and commas,
``#`` starts a comment, a backslash makes the next character literal, and
every character is lowercased.  The first token is the keyword.

Keywords (spec upas-behaviour.md §1.3):

``defaultdomain DOM``       our mail domain, unless ``-h`` is given
``norelay on|off``          relay control; ON by default here (upas: off)
``verifysenderdom on|off``  the ``-r`` check (anti-abuse issue)
``saveblockedmsg on|off``   the ``-s`` dump (anti-abuse issue)
``ournets CIDR ...``        trusted networks; values add up across lines
``ourdomains PAT ...``      our mail domains; ``*.dom`` is dom and below
``smarthost DIALSTRING``    send all outbound mail through this relay (ours)

Deviations: unknown keywords, bad values and unreadable files are errors
that name the file and line (upas ignores them silently); short IPv4 forms
such as ``10.1.2`` are refused rather than guessed.
"""

import ipaddress
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IReloadable

log = Logger(namespace="smtpd")


class ConfigError(Exception):
    """A configuration problem, with file and line where known."""


def report(errors, text):
    """A broken line: raised when ``errors`` is None (the server stops at
    the first), else added to it and the line skipped (``--check-config``
    lists them all)."""
    if errors is None:
        raise ConfigError(text)
    errors.append(text)


@dataclass(frozen=True)
class SmtpdConf:
    defaultdomain: Optional[str] = None
    norelay: Optional[bool] = None  # None: not said, so the built-in default
    verifysenderdom: bool = False
    saveblockedmsg: bool = False
    ournets: Optional[Tuple[object, ...]] = None  # None: never given
    ourdomains: Tuple[str, ...] = ()
    smarthost: Optional[str] = None


def tokenize(line):
    """Split one line as upas's getline does; return lowercased tokens."""
    tokens, cur, have = [], [], False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur.append(line[i + 1])
            have = True
            i += 2
            continue
        if c == "#":
            break
        if c in " \t,\r\n":
            if have:
                tokens.append("".join(cur).lower())
                cur, have = [], False
        else:
            cur.append(c)
            have = True
        i += 1
    if have:
        tokens.append("".join(cur).lower())
    return tokens


def parse_network(text):
    """An IP or CIDR; a bare address means that one host (upas [9F])."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError("bad address or CIDR %r" % text)


def valid_domain_pattern(pattern):
    body = pattern[2:] if pattern.startswith("*.") else pattern
    labels = body.split(".")
    return bool(body) and all(
        label and all(c.isalnum() or c in "-_" for c in label) for label in labels
    )


def _onoff(values):
    if len(values) != 1 or values[0] not in ("on", "off"):
        raise ValueError("expected 'on' or 'off'")
    return values[0] == "on"


def parse(text, filename="smtpd.conf", errors=None):
    """Parse smtpd.conf text into an SmtpdConf; raise ConfigError (see ``report``)."""
    fields = {}
    ournets = None
    ourdomains = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        tokens = tokenize(raw)
        if not tokens:
            continue
        keyword, values = tokens[0], tokens[1:]
        try:
            if keyword in ("norelay", "verifysenderdom", "saveblockedmsg"):
                fields[keyword] = _onoff(values)
            elif keyword == "defaultdomain":
                if not values:
                    raise ValueError("missing domain")
                # upas uses only the first value, and only the first line
                if not valid_domain_pattern(values[0]) or values[0].startswith("*."):
                    raise ValueError("bad domain %r" % values[0])
                fields.setdefault("defaultdomain", values[0])
            elif keyword == "smarthost":
                if len(values) != 1:
                    raise ValueError("expected one dial string, e.g. tcp!relay.example.net!587")
                from .smtp.mxdial import DialError, parse_dial
                try:
                    parse_dial(values[0])
                except DialError as e:
                    raise ValueError(e.text) from None
                fields["smarthost"] = values[0]
            elif keyword == "ournets":
                if not values:
                    raise ValueError("missing networks")
                ournets = (ournets or []) + [parse_network(v) for v in values]
            elif keyword == "ourdomains":
                if not values:
                    raise ValueError("missing domains")
                for v in values:
                    if not valid_domain_pattern(v):
                        raise ValueError("bad domain pattern %r" % v)
                ourdomains.extend(values)
            else:
                raise ValueError("unknown keyword %r" % keyword)
        except ValueError as e:
            report(errors, "%s:%d: %s" % (filename, lineno, e))
    return SmtpdConf(
        ournets=tuple(ournets) if ournets is not None else None,
        ourdomains=tuple(ourdomains),
        **fields,
    )


def read_text(path):
    """A policy file's text; unreadable or undecodable files are ConfigErrors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError("%s:%d: not UTF-8 text" % (path, line)) from None


def load(path):
    """Read and parse smtpd.conf; raise ConfigError."""
    text = read_text(path)
    return parse(text, path)


@implementer(IReloadable)
class WatchedFile:
    """A parsed file that is re-read when it changes, as ratfs does.

    ``current()`` stats the file and re-parses it when its mtime, size or
    inode changed.  A missing file gives ``empty``.  A file that cannot be
    read or parsed is logged with the reason (``FILE:LINE: ...``) and the
    last good version stays in force; ``broken`` says there is none (the
    file was never good since start), so its ``empty`` value is a guess.
    """

    def __init__(self, path, parse, empty):
        self.path = path
        self._parse = parse
        self._value = empty
        self._empty = empty
        self._stamp = None
        self._good = False
        self.broken = False

    def reread(self):
        """Read the file again at the next ``current()``, changed or not (SIGHUP)."""
        self._stamp = None

    def current(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                log.info("{path} removed; its entries no longer apply", path=self.path,
                         event="smtpd.config")
            self._stamp, self._value = None, self._empty
            self.broken = False
            return self._value
        except OSError as e:
            log.error("{path}: cannot stat: {err}", path=self.path, err=e.strerror or e,
                      event="smtpd.config")
            self.broken = not self._good
            return self._value
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self._value
        self._stamp = stamp
        try:
            self._value = self._parse(read_text(self.path), self.path)
            self._good, self.broken = True, False
        except ConfigError as e:
            self.broken = not self._good
            log.error("{err}; {what}", err=e, what="no good version to keep" if self.broken
                      else "keeping the previous version", event="smtpd.config", path=self.path)
        return self._value
