"""Local recipients: who exists, where their mail goes, what a mailbox copy adds.

A local user (the part left of a recipient path once our own domains are
dropped, compared in lower case as Postfix local(8) does; only ASCII letters
fold, so the Kelvin sign is not a ``k``) exists when

* ``<root>/box/<user>/`` is a directory, or
* ``<lib>/aliases`` has a line for it (``name: target, target``, the
  sendmail/Postfix aliases(5) format: ``#`` comments, continuation lines
  start with a blank), or
* ``<lib>/users`` lists it (one name a line, ``#`` comments), or
* it is ``postmaster``, which RFC 5321 §4.5.1 requires us to accept, or
  ``abuse`` (RFC 2142 §4), which without a line or a mailbox of its own is
  an alias of postmaster.

Alias targets are local user names or remote addresses (``bob@example.net``
or bang form); local targets are expanded again, a name that reaches
itself (``bob: bob, bob@elsewhere``) is delivered to its own mailbox.
Remote targets go to the outbound queue with the original sender.

A copy stored in a mailbox starts, after its ``From `` line, with
``Return-Path: <sender>`` and ``Delivered-To: user@dom`` as Postfix's
local(8) writes them, addresses in RFC 5322 ``@`` form.

Only ``Mailboxes`` looks at the disk (stat and the two watched files);
the rest is pure.
"""

import enum
import functools
import ipaddress
from collections import ChainMap
import os
import re
import string

from zope.interface import implementer

from .. import replies
from ..address import NULL_SENDER
from ..conf import WatchedFile, report
from ..decision import Accept, reject
from ..interfaces import IReloadable

POSTMASTER = "postmaster"
ABUSE = "abuse"
# RFC 2142's complaints address must reach a person even on a host whose
# aliases file never heard of it: the one nobody wrote goes to postmaster
BUILT_IN_ALIASES = {ABUSE: (POSTMASTER,)}
MAX_EXPANSION = 1000  # alias targets per recipient: a loop or a typo, not a list
_NAME = re.compile(r"[^\s:#,]+\Z")
_MAILBOX_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,63}\Z")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class ExpansionTooLarge(ValueError):
    """An alias reaches more than MAX_EXPANSION targets."""


class Standing(enum.Enum):
    """What the lib files and ``box/`` say of a local name at RCPT."""

    KNOWN = "known"
    UNKNOWN = "unknown"
    UNSURE = "unsure"  # an aliases or users file exists but was never readable
    TOO_LARGE = "too large"


def fold(name):
    """Lower case for ASCII letters only: ``str.lower`` maps the Kelvin sign
    (U+212A) to ``k`` and so would let a non-ASCII name reach box/karen."""
    return name.translate(_ASCII_LOWER)


def mailbox_name_ok(user):
    """Can ``box/<user>`` be a directory of ours (no ``/``, no dot first)?

    Checked on the name as sent, before ``fold``.
    """
    return bool(_MAILBOX_NAME.match(user))


def parse_aliases(text, filename="aliases", errors=None):
    """``name: target, target`` lines -> {name: (target, ...)}; names lowercased.

    Programs (``|cmd``), files (``/path``) and ``:include:`` are not
    supported: such a line is an error naming the file and line
    (``conf.report``).
    """
    table = {}
    entries = []  # [lineno, text] with continuation lines joined
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if line[0] in " \t":
            if not entries:
                report(errors, "%s:%d: continuation line without an alias" % (filename, lineno))
            else:
                entries[-1][1] += " " + line.strip()
            continue
        entries.append([lineno, line])
    for lineno, line in entries:
        name, colon, rest = line.partition(":")
        name = fold(name.strip())
        targets = tuple(t.strip() for t in rest.split(",") if t.strip())
        where = "%s:%d: " % (filename, lineno)
        bad = [t for t in targets
               if t[0] in "|/\"" or t.startswith(":include:") or not _NAME.match(t)]
        if not colon or not _NAME.match(name):
            report(errors, where + "expected 'name: target, target'")
        elif not targets:
            report(errors, where + "alias %r has no target" % name)
        elif bad:
            report(errors, where + "unsupported alias target %r "
                   "(local user names and addresses only)" % bad[0])
        else:
            table[name] = targets
    return table


def parse_users(text, filename="users", errors=None):
    """One name a line; nothing in it can be wrong (``errors`` as the other parsers)."""
    names = set()
    for raw in text.splitlines():
        name = raw.split("#", 1)[0].strip()
        if name:
            names.add(fold(name))
    return frozenset(names)


def as_path(address):
    """An alias target as a bang path: ``bob@example.net`` -> ``example.net!bob``."""
    if "@" in address:
        user, domain = address.rsplit("@", 1)
        return "%s!%s" % (domain, user)
    return address


def expand(user, aliases, is_local):
    """The mailboxes and remote paths mail for ``user`` goes to.

    ``is_local(path)`` gives the local user name for a path that is ours,
    else None.  Returns (users, remote paths), each without repeats.
    """
    users, remote = {}, {}
    seen = set()
    todo = [fold(user)]
    while todo:
        name = todo.pop(0)
        if name in seen or name not in aliases:
            users[name] = None
            continue
        seen.add(name)
        for target in aliases[name]:
            path = as_path(target)
            local = is_local(path)
            if local is None:
                remote[path] = None
            elif fold(local) == name:
                users[name] = None  # "bob: bob, ..." keeps a copy
            else:
                todo.append(fold(local))
        if len(users) + len(remote) + len(todo) > MAX_EXPANSION:
            raise ExpansionTooLarge("alias %s expands to more than %d targets" % (user, MAX_EXPANSION))
    return tuple(users), tuple(remote)


def recipient_verdict(path, user, standing):
    """RCPT for a local ``user``: known users and postmaster, else user unknown.

    An alias too large to deliver, or a name we cannot judge because the
    aliases or users file is broken, is a temporary refusal: both are our
    configuration, which the postmaster can mend before the sender gives up.
    """
    if standing is Standing.KNOWN or fold(user) == POSTMASTER:
        return Accept(path)
    if standing is Standing.TOO_LARGE:
        return reject(451, replies.ALIAS_TOO_LARGE.format(path=path, n=MAX_EXPANSION),
                      reason="recipients", detail="alias-too-large")
    if standing is Standing.UNSURE:
        return reject(451, replies.ALIASES_UNREADABLE.format(path=path), reason="local-error")
    return reject(550, replies.USER_UNKNOWN.format(path=path), reason="unknown-user")


def _host(component):
    """A hop as a domain: IP addresses become RFC 5321 address literals."""
    try:
        ip = ipaddress.ip_address(component.strip("[]"))
    except ValueError:
        return component
    return "[IPv6:%s]" % ip if ip.version == 6 else "[%s]" % ip


# RFC 5322 dot-atom (with RFC 6532's non-ASCII), quoted-string and domain-literal
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(r"[%s]+(?:\.[%s]+)*\Z" % (_ATEXT, _ATEXT))
_QUOTED = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[ -~])*"\Z')
_LITERAL = re.compile(r"\[[!-Z^-~]*\]\Z")


def _split_unquoted(text, sep):
    """Split ``text`` at each ``sep`` that stands outside a quoted string."""
    parts, start, quoted, i = [], 0, False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted:
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return parts + [text[start:]]


def _local_part(user):
    """A local part that needs no quoting is kept; anything else is quoted."""
    if _DOT_ATOM.match(user) or _QUOTED.match(user):
        return user
    return '"%s"' % user.replace("\\", "\\\\").replace('"', '\\"')


@functools.lru_cache(maxsize=4096)  # a busy sender's address, made once
def at_form(path, qualifier):
    """A bang path as one RFC 5322 addr-spec, never mixing the two forms.

    ``example.org!alice`` -> ``alice@example.org``; a bare name or an
    empty hop gets ``@qualifier``; an IP address becomes a literal; of a
    longer route only the last hop is kept (``a!b!bob`` -> ``bob@b``, and
    so our own names leading a path go too): an addr-spec has no route and
    RFC 5321 §3.3 says to ignore one.  ``!`` splits only outside
    quotes, and a local part that needs it is quoted.  ``/dev/null`` -> ``""``.
    """
    if path == NULL_SENDER:
        return ""
    *hops, user = _split_unquoted(path, "!")
    *local, domain = _split_unquoted(user, "@")
    if not hops and local and domain:  # already ``user@domain``
        hops, user = [domain], "@".join(local)
    domain = _host(hops[-1]) if hops and hops[-1] else qualifier
    if not (_DOT_ATOM.match(domain) or _LITERAL.match(domain)):
        # not a domain at all: the whole path is a name at our qualifier
        user, domain = "!".join(hops[-1:] + [user]), qualifier
    return "%s@%s" % (_local_part(user), domain)


def delivery_fields(sender, user, domain):
    """The lines a mailbox copy gets after its ``From `` line (Postfix local(8))."""
    return "Return-Path: <%s>\nDelivered-To: %s@%s\n" % (at_form(sender, domain), user, domain)


def forwarding_loop(delivered_to, users, domain):
    """The ``user@domain`` of ``users`` that a ``Delivered-To:`` already names.

    Postfix local(8) refuses such a message: it has been here before
    (``mail forwarding loop for <addr>``).
    """
    seen = {v.strip("<> \t").lower() for v in delivered_to}
    return next(("%s@%s" % (u, domain) for u in users
                 if ("%s@%s" % (u, domain)).lower() in seen), None)


def mbox_envelope(sender, domain):
    """The sender on a mailbox's ``From `` line: ``MAILER-DAEMON`` for ``<>``."""
    return at_form(sender, domain) or "MAILER-DAEMON"


def home_sender(sender, bare, trusted, domain):
    """A sender that was a bare name, from a trusted or authenticated peer, is ours.

    upas qualifies a bare ``MAIL FROM:<alice>`` with the peer's HELO name
    (``h!alice``), which makes mail from our own users look foreign and
    sends its bounces off-host.
    """
    if bare and trusted and "!" in sender:
        return "%s!%s" % (domain, sender.split("!", 1)[1])
    return sender


@implementer(IReloadable)
class Mailboxes:
    """The facts about local users: ``box/`` directories and the lib files."""

    def __init__(self, boxes, lib):
        self.boxes = boxes
        self._aliases = WatchedFile(os.path.join(lib, "aliases"), parse_aliases, {})
        self._users = WatchedFile(os.path.join(lib, "users"), parse_users, frozenset())

    def reread(self):
        self._aliases.reread()
        self._users.reread()

    def load(self):
        """Read both files now: what start-up found is the good version a
        broken edit before the first RCPT falls back to."""
        self._aliases.current()
        self._users.current()

    def has_box(self, user):
        return os.path.isdir(os.path.join(self.boxes, fold(user)))

    def is_user(self, user):
        """Has ``user`` a mailbox (made, or listed in ``users``)?"""
        if not mailbox_name_ok(user):
            return False
        name = fold(user)
        return name in self._users.current() or self.has_box(name)

    def aliases(self):
        """The aliases file, plus a built-in alias for a role name the
        file does not have and that has no mailbox of its own."""
        table = self._aliases.current()
        builtin = {name: targets for name, targets in BUILT_IN_ALIASES.items()
                   if name not in table and not self.is_user(name)}
        return ChainMap(table, builtin) if builtin else table

    def standing(self, user, is_local):
        """May mail for ``user`` be accepted: a user or an alias?  An alias is
        expanded (cheap) to see that it fits."""
        aliases = self.aliases()
        if fold(user) in aliases:
            try:
                expand(user, aliases, is_local)
            except ExpansionTooLarge:
                return Standing.TOO_LARGE
            return Standing.KNOWN
        if self.is_user(user):
            return Standing.KNOWN
        self._users.current()
        if self._aliases.broken or self._users.broken:
            return Standing.UNSURE
        return Standing.UNKNOWN

    def expand(self, user, is_local):
        return expand(user, self.aliases(), is_local)
