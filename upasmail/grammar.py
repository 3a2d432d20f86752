"""The command grammar of upas smtpd.y, as a plain parser.

``parse(line)`` turns one command line (bytes, line end removed) into a
``Command`` or raises ``CommandSyntaxError``, which the protocol answers
with ``500 5.5.1 illegal command or bad syntax`` (spec upas-behaviour.md
§1.5).  Verbs are case-insensitive; values keep their case; a lone CR
counts as white space; paths need angle brackets.

ESMTP parameters (ours; upas knows only ``AUTH=``): MAIL takes ``AUTH=``
(ignored, as upas), ``SIZE=<digits>``, ``BODY=7BIT|8BITMIME`` and
``SMTPUTF8``; RCPT takes none.  An unknown parameter raises
``ParameterError`` with ``555 5.5.4``, a bad value or a repeated one
``501 5.5.4``.  Commands are UTF-8; characters beyond ASCII are allowed
only inside MAIL and RCPT paths (``Command.utf8`` says so; the protocol
wants SMTPUTF8 for them).

Unlike yacc's error recovery, a bad line never re-synchronises on a
verb inside it (quirk Q15): the whole line is one syntax error.
"""

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from . import replies
from .address import AddressError, parse_domain, parse_path, split_at

# C0 controls but tab and CR, DEL and C1 controls: never in a command line
_CONTROL = re.compile("[\x00-\x08\x0a-\x0c\x0e-\x1f\x7f-\x9f]")
_WS = re.compile(r"[ \t\r]+")
_STRING = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?\[\]^_`{|}~\"\\]+\Z")
_MECH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")

BARE = frozenset(["DATA", "RSET", "QUIT", "STARTTLS"])
MAIL_VERBS = frozenset(["MAIL", "SEND", "SOML", "SAML"])
MAIL_PARAMS = frozenset(["AUTH", "SIZE", "BODY", "SMTPUTF8"])
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


def _check_param(name, value):
    if name == "SIZE" and not (value and value.isdigit() and len(value) <= 20):
        raise ParameterError(501, replies.BAD_SIZE)
    if name == "BODY" and (value or "").upper() not in ("7BIT", "8BITMIME"):
        raise ParameterError(501, replies.BAD_BODY)
    if name == "SMTPUTF8" and value is not None:
        raise ParameterError(501, replies.SMTPUTF8_VALUE)
    if name == "AUTH" and value is None:
        raise ParameterError(501, replies.AUTH_PARAM_EMPTY)


class CommandSyntaxError(ValueError):
    pass


class ParameterError(CommandSyntaxError):
    """A MAIL/RCPT parameter we do not take: its own reply, not a 500."""

    def __init__(self, code, text):
        CommandSyntaxError.__init__(self, text)
        self.code = code
        self.text = text


NO_PARAMS = MappingProxyType({})  # one for every command without parameters


@dataclass(frozen=True, slots=True)  # the last command stays with an idle connection
class Command:
    verb: str
    arg: Optional[str] = None  # domain, bang path, string or mechanism
    extra: Optional[str] = None  # AUTH initial response
    params: Mapping[str, str] = field(default_factory=lambda: NO_PARAMS)
    utf8: bool = False  # the path has characters beyond ASCII
    path: Optional[str] = None  # MAIL/RCPT: the path as sent, brackets included


def _octets(text):
    return len(text.encode("utf-8"))


def path_too_long(path, max_path, max_local_part, max_domain):
    """Is a path as sent (``<...>``) over the RFC 5321 §4.5.3.1 limits?

    Counted in octets on the text the client sent, before any rewriting
    to bang form: the whole path with its brackets and source route, the
    local part (quotes and backslashes included; a bang path without
    ``@`` is all local part) and every domain, those of a source route too.
    """
    if _octets(path) > max_path:
        return True
    inner = path[1:-1]
    domains = []
    if inner.startswith("@"):
        route, _, inner = inner.partition(":")
        domains = [hop[1:] for hop in route.split(",")]
    local, domain = split_at(inner)
    if domain is not None:
        domains.append(domain)
    return _octets(local) > max_local_part or any(_octets(d) > max_domain for d in domains)


def _split_path(rest):
    """Split ``<path> more`` at the closing bracket (quotes respected)."""
    if not rest.startswith("<"):
        raise CommandSyntaxError("angle brackets required")
    if '"' not in rest and "\\" not in rest:  # the usual path: no quoting to follow
        end = rest.find(">")
        if end < 0:
            raise CommandSyntaxError("unclosed path")
        return rest[: end + 1], rest[end + 1 :]
    quoted = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return rest[: i + 1], rest[i + 1 :]
        i += 1
    raise CommandSyntaxError("unclosed path")


def _path_command(verb, rest, keyword, allowed):
    if rest[: len(keyword)].upper() != keyword:
        raise CommandSyntaxError("expected " + keyword)
    path, tail = _split_path(rest[len(keyword):].lstrip(" \t"))
    params = {}
    if tail and tail[0] not in " \t":
        raise CommandSyntaxError("junk after path")
    # upas allows blanks after "AUTH=": glue "AUTH= <x>" back together
    words = re.sub(r"(?i)(\bAUTH=)[ \t]+", r"\1", tail).split()
    try:
        bang = parse_path(path)
    except AddressError as e:
        raise CommandSyntaxError(str(e))
    for word in words:
        name, eq, value = word.partition("=")
        name = name.upper()
        if not _KEYWORD.match(name) or not word.isascii():
            raise CommandSyntaxError("bad parameter " + word)
        if name not in allowed:
            raise ParameterError(555, replies.UNSUPPORTED_PARAM.format(name=name))
        if name in params:
            raise ParameterError(501, replies.PARAM_TWICE.format(name=name))
        _check_param(name, value if eq else None)
        params[name] = value if eq else None
    return Command(verb, bang, params=params, utf8=not path.isascii(), path=path)


def parse(line):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandSyntaxError("not UTF-8")
    if _CONTROL.search(text):
        raise CommandSyntaxError("control character")
    text = text.replace("\r", " ").strip(" \t")
    if not text:
        raise CommandSyntaxError("empty command")
    parts = _WS.split(text, 1)
    verb = parts[0].upper()
    rest = parts[1] if len(parts) > 1 else ""
    if not text.isascii() and verb not in MAIL_VERBS and verb != "RCPT":
        raise CommandSyntaxError("characters beyond ASCII outside a path")
    if verb in ("HELO", "EHLO"):
        if not rest or _WS.search(rest):
            raise CommandSyntaxError("HELO needs one domain")
        try:
            return Command(verb, parse_domain(rest))
        except AddressError as e:
            raise CommandSyntaxError(str(e))
    if verb in MAIL_VERBS:
        return _path_command("MAIL", rest, "FROM:", MAIL_PARAMS)
    if verb == "RCPT":
        return _path_command("RCPT", rest, "TO:", frozenset())
    if verb in BARE:
        if rest:
            raise CommandSyntaxError(verb + " takes no argument")
        return Command(verb)
    if verb in ("NOOP", "HELP"):
        return Command(verb, rest or None)
    if verb in ("VRFY", "EXPN"):
        if not _STRING.match(rest):
            raise CommandSyntaxError("bad string")
        return Command(verb, rest)
    if verb == "AUTH":
        words = rest.split()
        if not words or len(words) > 2 or not _MECH.match(words[0]):
            raise CommandSyntaxError("bad AUTH")
        return Command(verb, words[0].upper(), extra=words[1] if len(words) > 1 else None)
    raise CommandSyntaxError("unknown command")
