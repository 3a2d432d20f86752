"""The ratify lists: upas's ``/mail/ratify`` (ratfs) without a file server.

upas smtpd asks ratfs whether files exist; ratfs builds them from two
files.  Here one file in upas's ``blocked`` format (``<root>/lib/blocked``
by default) is parsed directly (spec upas-behaviour.md §1.13, §4):

* the scanner of smtpd.conf (blanks and commas separate, ``#`` comments,
  backslash escapes, everything lowercased);
* the first token is the verb: ``allow`` (``accept``), ``block``, ``deny``,
  ``dial``, ``delay`` (``relay`` is an alias of delay, as in ratfs), and
  ``trusted`` (ratfs takes these from ``ournets`` lines of its second file;
  ``ournets`` is accepted here too);
* a verb written ``*block`` (or ``* block``) takes sender account patterns
  (``[domain]!user``, ``*.dom``, ``name*``), otherwise IP addresses and
  CIDR ranges (``#`` may stand for ``/``).

Precedence is fixed by action, not by line order: allow > block > deny >
dial > delay.  Unknown verbs, bad addresses and patterns that would match
everything (``*``, ``!``, ``*!``, ``!*``, ``*!*``) are errors naming the
file and line; the file is then not used, and the last good version stays
in force (``conf.WatchedFile``).

Temporary trusted grants (POP/IMAP-before-SMTP, ratfs ``trusted/<ip>#32``)
are files in a directory (``<root>/lib/trusted.d``) named by IP or CIDR;
a grant lasts two hours from the file's mtime.
"""

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

from twisted.logger import Logger

from ..conf import parse_network, read_text, report, tokenize
from ..relay import NetSet, domain_matches, in_nets, normalize_ip

log = Logger(namespace="smtpd")

ACTIONS = ("allow", "block", "deny", "dial", "delay")  # precedence order
VERBS = {"allow": "allow", "accept": "allow", "block": "block", "deny": "deny",
         "dial": "dial", "delay": "delay", "relay": "delay"}
TRUSTED_VERBS = ("trusted", "ournets")
MATCH_ALL = frozenset(["*", "!", "*!", "!*", "*!*"])
GRANT_LIFETIME = 2 * 60 * 60  # ratfs: temporary trusted entries last 2 h

# filter states (upas smtpd.h): the ratify actions plus these
ACCEPT, TRUSTED, REFUSED, TEMPFAIL = "accept", "trusted", "refused", "tempfail"


def account_match(pattern, name):
    """ratfs accountmatch: does a ``[domain]!user`` pattern match a bang path?

    Both are lowercased by the caller.  A pattern without a user (no
    ``!``, an empty user or ``*``) matches when any domain component of the
    name matches; otherwise the user must match (``*`` any, ``x*`` prefix,
    else exact) and the pattern's domain, unless empty or ``*``, must match
    the name's last domain component.
    """
    parts = name.split("!")
    user, domains = parts[-1], parts[:-1]
    pdom, bang, puser = pattern.rpartition("!")
    if not bang:
        pdom, puser = pattern, ""
    if puser in ("", "*"):
        return any(domain_matches(d, pdom) for d in domains)
    if puser.endswith("*"):
        if not user.startswith(puser[:-1]):
            return False
    elif user != puser:
        return False
    if pdom in ("", "*"):
        return True
    return bool(domains) and domain_matches(domains[-1], pdom)


class AccountPatterns:
    """One action's sender patterns, indexed so a lookup does not try each.

    Same answers as ``any(account_match(p, name) for p in patterns)``:
    domain-only patterns are found by the name's domain components and
    their parent domains, user patterns by the user (exact, or a prefix of
    each length the list uses).
    """

    __slots__ = ("patterns", "_domains", "_below", "_users", "_prefixes")

    def __init__(self, patterns):
        self.patterns = tuple(patterns)
        self._domains = set()  # ``dom``: a domain component equal to it
        self._below = set()  # ``*.dom``: dom or any name below it
        self._users = {}  # user -> its patterns' domain parts
        self._prefixes = {}  # prefix length -> {prefix: domain parts}
        for pattern in self.patterns:
            pdom, bang, puser = pattern.rpartition("!")
            if not bang:
                pdom, puser = pattern, ""
            pdom = pdom.lower()
            if puser in ("", "*"):
                if pdom.startswith("*."):
                    self._below.add(pdom[2:])
                else:
                    self._domains.add(pdom)
            elif puser.endswith("*"):
                prefix = puser[:-1]
                self._prefixes.setdefault(len(prefix), {}).setdefault(prefix, []).append(pdom)
            else:
                self._users.setdefault(puser, []).append(pdom)

    def _domain_listed(self, domain):
        domain = domain.lower()
        if domain in self._domains or domain in self._below:
            return True
        if self._below:
            parts = domain.split(".")
            return any(".".join(parts[i:]) in self._below for i in range(1, len(parts)))
        return False

    def match(self, name):
        parts = name.split("!")
        user, domains = parts[-1], parts[:-1]
        if (self._domains or self._below) and any(self._domain_listed(d) for d in domains):
            return True
        pdoms = list(self._users.get(user, ()))
        for length, prefixes in self._prefixes.items():
            if len(user) >= length:
                pdoms.extend(prefixes.get(user[:length], ()))
        return any(pdom in ("", "*") or (domains and domain_matches(domains[-1], pdom))
                   for pdom in pdoms)


@dataclass(frozen=True)
class RatifyLists:
    ip: Dict[str, Tuple[object, ...]] = field(default_factory=dict)
    account: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    trusted: Tuple[object, ...] = ()

    def __post_init__(self):
        # the lists as given stay readable; lookups go through indexes
        object.__setattr__(self, "_ip", {a: NetSet(n) for a, n in self.ip.items()})
        object.__setattr__(self, "_account",
                           {a: AccountPatterns(p) for a, p in self.account.items()})
        object.__setattr__(self, "_trusted", NetSet(self.trusted))

    def ip_action(self, ip):
        """The peer IP's action (``accept`` when no list has it)."""
        for action in ACTIONS:
            nets = self._ip.get(action)
            if nets is not None and nets.contains(ip):
                return ACCEPT if action == "allow" else action
        return ACCEPT

    def account_action(self, sender):
        """The sender account's action; ``sender`` is the bang path."""
        name = sender.lower()
        for action in ACTIONS:
            patterns = self._account.get(action)
            if patterns is not None and patterns.match(name):
                return ACCEPT if action == "allow" else action
        return ACCEPT

    def is_trusted(self, ip):
        return self._trusted.contains(ip)


EMPTY = RatifyLists()


def _value_network(value):
    return parse_network(value.replace("#", "/"))


def parse(text, filename="blocked", errors=None):
    """Parse a ``blocked`` file; raise ConfigError naming file and line
    (``conf.report``)."""
    ip = {a: [] for a in ACTIONS}
    account = {a: [] for a in ACTIONS}
    trusted = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        tokens = tokenize(raw)
        if not tokens:
            continue
        verb, values = tokens[0], tokens[1:]
        is_account = False
        if verb == "*" and values:
            verb, values, is_account = values[0], values[1:], True
        elif verb.startswith("*"):
            verb, is_account = verb[1:], True
        try:
            if verb in TRUSTED_VERBS and not is_account:
                trusted.extend(_value_network(v) for v in values)
            elif verb not in VERBS:
                raise ValueError("unknown verb %r" % verb)
            elif is_account:
                for v in values:
                    if v in MATCH_ALL:
                        raise ValueError("pattern %r would match every sender" % v)
                account[VERBS[verb]].extend(values)
            else:
                ip[VERBS[verb]].extend(_value_network(v) for v in values)
            if not values:
                raise ValueError("%s without values" % verb)
        except ValueError as e:
            report(errors, "%s:%d: %s" % (filename, lineno, e))
    return RatifyLists(
        ip={a: tuple(v) for a, v in ip.items() if v},
        account={a: tuple(v) for a, v in account.items() if v},
        trusted=tuple(trusted),
    )


def load(path):
    """Read and parse a ``blocked`` file; raise ConfigError."""
    return parse(read_text(path), path)


class TrustedGrants:
    """Temporary trust for a peer that logged in by POP or IMAP.

    A file named after the IP (``192.0.2.7``, or a CIDR with ``#`` for
    ``/``: ``192.0.2.0#24``) in ``directory`` trusts that peer for
    ``lifetime`` seconds from the file's mtime.  ``grant(ip)`` is the call
    a POP/IMAP server embedded in the same process would make.
    """

    def __init__(self, directory, clock, lifetime=GRANT_LIFETIME):
        self.directory = directory
        self.clock = clock
        self.lifetime = lifetime

    def is_trusted(self, ip):
        try:
            names = os.listdir(self.directory)
        except OSError:
            return False
        now = self.clock.seconds()
        for name in names:
            try:
                net = _value_network(name)
                mtime = os.stat(os.path.join(self.directory, name)).st_mtime
            except (ValueError, OSError):
                continue
            if 0 <= now - mtime < self.lifetime and in_nets(ip, (net,)):
                return True
        return False

    def grant(self, ip, duration=None):
        """Trust ``ip`` for ``duration`` seconds (at most, and by default,
        ``lifetime``: the file's age is all it says)."""
        ip = normalize_ip(ip)
        ipaddress.ip_address(ip)  # refuse anything that is not an address
        if duration is not None and not 0 < duration <= self.lifetime:
            raise ValueError("a grant in %s lasts at most %g seconds" % (self.directory,
                                                                         self.lifetime))
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, ip)
        with open(path, "a"):
            pass
        # dated as if made earlier, so that it ends ``duration`` from now
        when = self.clock.seconds() - (self.lifetime - (duration or self.lifetime))
        os.utime(path, (when, when))
