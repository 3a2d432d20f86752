"""Addresses: the smtpd.y ``path`` grammar and upas bang form.

upas hands addresses around in bang form: ``<bob@example.com>`` becomes
``example.com!bob``, a source route ``<@r1,@r2:joe@c>`` becomes
``r1!r2!c!joe`` and the null path ``<>`` becomes ``/dev/null``
(spec upas-behaviour.md §1.5).  Replies and the mailer's argv show that form.

Everything here is pure string work; ``AddressError`` means "500 5.5.1
illegal command or bad syntax" to the protocol.
"""

import ipaddress
import re

NULL_SENDER = "/dev/null"

# dot-string characters of smtpd.y (letters, digits and these)
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?\[\]^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"  # RFC 6531 UTF8-non-ascii; the grammar admits it only
# in MAIL and RCPT paths, and the protocol only with SMTPUTF8
_DOTSTRING_CHAR = re.compile("[%s%s]" % (_ATEXT, _UTF8))
_LD = "A-Za-z0-9" + _UTF8
_NAME = re.compile(r"[%s](?:[%s_-]*[%s])?\Z" % (_LD, _LD, _LD))
_SNUM = re.compile(r"#[0-9]+\Z")


class AddressError(ValueError):
    """The text does not fit the smtpd.y grammar."""


def parse_domain(text):
    """Parse a domain as smtpd.y does; return it without a trailing dot.

    ``[IPv6:...]`` literals lose their ``IPv6:`` prefix, as in [9F].
    """
    if not text:
        raise AddressError("empty domain")
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]
    elements = []
    i = 0
    while i < len(text):
        if text[i] == "[":
            end = text.find("]", i)
            if end < 0:
                raise AddressError("unclosed address literal")
            elements.append(_literal(text[i + 1 : end]))
            i = end + 1
            if i < len(text):
                if text[i] != ".":
                    raise AddressError("junk after address literal")
                i += 1
                if i == len(text):
                    raise AddressError("empty domain element")
            continue
        end = text.find(".", i)
        if end < 0:
            end = len(text)
        element = text[i:end]
        if not (_NAME.match(element) or _SNUM.match(element)):
            raise AddressError("bad domain element %r" % element)
        elements.append(element)
        i = end + 1
        if end < len(text) and i == len(text):
            raise AddressError("empty domain element")
    return ".".join(elements)


def _literal(inner):
    if inner == "":
        return "[]"
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError("bad IPv6 literal")
        return "[%s]" % inner[5:]
    parts = inner.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise AddressError("bad address literal")
    if any(int(p) > 255 for p in parts):
        raise AddressError("bad snum")
    return "[%s]" % inner


def _local_part(text):
    """Parse a dot-string or quoted-string local part; return its value."""
    if text.startswith('"'):
        out = ['"']
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text):
                    raise AddressError("dangling backslash")
                # the value stays a quoted-string: " and \ keep their backslash
                c = text[i + 1]
                out.append("\\" + c if c in '"\\' else c)
                i += 2
                continue
            if c == '"':
                if i != len(text) - 1:
                    raise AddressError("junk after quoted string")
                out.append('"')
                return "".join(out)
            if ord(c) < 32 or ord(c) > 126:
                raise AddressError("bad character in quoted string")
            out.append(c)
            i += 1
        raise AddressError("unclosed quoted string")
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and 32 < ord(text[i + 1]) < 127:
            out.append(text[i + 1])
            i += 2
            continue
        if c != "." and not _DOTSTRING_CHAR.match(c):
            raise AddressError("bad character %r in local part" % c)
        out.append(c)
        i += 1
    value = "".join(out)
    if not value or value.startswith(".") or value.endswith(".") or ".." in value:
        raise AddressError("bad dot-string")
    return value


def split_at(mailbox):
    """Split local@domain at the last @ outside a quoted local part."""
    if mailbox.startswith('"'):
        i = 1
        while i < len(mailbox):
            if mailbox[i] == "\\":
                i += 2
                continue
            if mailbox[i] == '"':
                break
            i += 1
        rest = mailbox[i + 1 :]
        if not rest:
            return mailbox, None
        if not rest.startswith("@"):
            raise AddressError("junk after quoted string")
        return mailbox[: i + 1], rest[1:]
    if "@" in mailbox:
        local, domain = mailbox.rsplit("@", 1)
        return local, domain
    return mailbox, None


def parse_mailbox(text):
    """``local`` or ``local@domain`` -> bang form ``domain!local``."""
    local, domain = split_at(text)
    local = _local_part(local)
    if domain is None:
        return local
    return "%s!%s" % (parse_domain(domain), local)


def parse_path(text):
    """Parse an angle-bracketed path into bang form.

    ``<>`` -> ``/dev/null``; ``<a@b>`` -> ``b!a``;
    ``<@d1,@d2:u@d3>`` -> ``d1!d2!d3!u``.  Angle brackets are required.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("angle brackets required")
    inner = text[1:-1]
    if inner == "":
        return NULL_SENDER
    route = []
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without colon")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            route.append(parse_domain(hop[1:]))
        inner = inner[colon + 1 :]
    mailbox = parse_mailbox(inner)
    return "!".join(route + [mailbox])


def split_bang(path):
    """``a!b!user`` -> (["a", "b"], "user")."""
    parts = path.split("!")
    return parts[:-1], parts[-1]


def user_of(path):
    """The part after the last bang: the user name upas delivers to."""
    return path.rsplit("!", 1)[-1]
