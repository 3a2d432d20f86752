"""Greylisting (``-g``; upas greylist.c ``vfysenderhostok``).

Spec upas-behaviour.md §1.10.2.  State lives in files, so it survives a
restart, in upas's layout under the mail root:

``grey/whitelist``                  one IP or CIDR per line (first token),
                                    ``#`` comments; a bare IP is that host
``grey/tmp/<lsys>/<rsys>/<user>``   one file per (our IP, peer IP,
                                    recipient user); its mtime is the time
                                    of the last attempt

At DATA, a peer that is not whitelisted passes when, for some recipient,
its previous attempt was between 5 minutes and 14 hours ago; every
attempt (passing or not) refreshes the mtime, so an impatient retry
restarts the 5 minutes.  A peer that passes is appended to the whitelist
as ``<rsys> <ptr name>``.  Otherwise: ``451 please try again soon from
the same IP.`` and the connection is closed.

Times come from the injected clock (the mtime is set with ``os.utime``),
so tests need no real waiting.  The decision is ``policy.greylisting``.  Trusted and authenticated peers are not
greylisted (upas [9F] greylists trusted peers too; see deviations).
"""

import errno
import os

from zope.interface import implementer

from ..conf import ConfigError, WatchedFile, parse_network, tokenize
from ..interfaces import IReloadable
from ..relay import in_nets

MIN_AGE = 5 * 60
MAX_AGE = 14 * 60 * 60
# what an attempt found for one recipient
NEW, RECENT, OTHER = "new", "recent", "other"
OUTCOME_LINES = {
    NEW: "no call registered for {rsys}/{rcpt}; registering",
    RECENT: "{rsys}/{rcpt} was grey; adding IP to white",
    OTHER: "call for {rsys}/{rcpt} was just minutes ago or long ago",
}


def parse_whitelist(text, filename="whitelist"):
    nets = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        tokens = tokenize(raw.split(None, 1)[0] if raw.strip() else "")
        if not tokens:
            continue
        try:
            nets.append(parse_network(tokens[0]))
        except ValueError as e:
            raise ConfigError("%s:%d: %s" % (filename, lineno, e)) from None
    return tuple(nets)


def user_of(rcpt):
    """The greylist file name for a recipient, or None to skip it."""
    user = rcpt.rsplit("!", 1)[-1]
    if not user or "/" in user or user in (".", "..") or "\0" in user:
        return None
    return user


def is_recent(age, min_age=MIN_AGE, max_age=MAX_AGE):
    return min_age <= age <= max_age


@implementer(IReloadable)
class Greylist:
    def __init__(self, directory, clock, min_age=MIN_AGE, max_age=MAX_AGE):
        """``min_age``..``max_age`` (seconds): how old an earlier attempt
        must be for a retry to pass (upas: 5 minutes to 14 hours;
        ``--greylist-min``, ``--greylist-max``)."""
        self.min_age, self.max_age = min_age, max_age
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.whitelist_path = os.path.join(directory, "whitelist")
        self.clock = clock
        self._whitelist = WatchedFile(self.whitelist_path, parse_whitelist, ())

    def reread(self):
        self._whitelist.reread()

    def whitelisted(self, rsys):
        return in_nets(rsys, self._whitelist.current())

    def attempt(self, lsys, rsys, recipients):
        """Record this attempt: ``[(rcpt, NEW | RECENT | OTHER)]``, RECENT
        when that recipient's earlier attempt was recent."""
        now = self.clock.seconds()
        outcomes = []
        for rcpt, path in self._files(lsys, rsys, recipients):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                outcomes.append((rcpt, NEW))
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                outcomes.append((rcpt, self._earlier(path, now)))
            os.utime(path, (now, now))
        return outcomes

    def peek(self, lsys, rsys, recipients):
        """What ``attempt`` would find now, ``[(rcpt, NEW | RECENT | OTHER)]``,
        without recording it: no file is made or touched (``upas-policy
        explain`` must not restart a real sender's wait)."""
        now = self.clock.seconds()
        outcomes = []
        for rcpt, path in self._files(lsys, rsys, recipients):
            try:
                outcomes.append((rcpt, self._earlier(path, now)))
            except FileNotFoundError:
                outcomes.append((rcpt, NEW))
        return outcomes

    def _earlier(self, path, now):
        """RECENT or OTHER: what the earlier attempt recorded in ``path`` was."""
        age = now - os.stat(path).st_mtime
        return RECENT if is_recent(age, self.min_age, self.max_age) else OTHER

    def _files(self, lsys, rsys, recipients):
        """(rcpt, its attempt file) for each recipient that names one."""
        for rcpt in recipients:
            user = user_of(rcpt)
            if user is not None:
                yield rcpt, os.path.join(self.tmp, lsys, rsys, user)

    def whitelist(self, rsys, name=None):
        os.makedirs(self.directory, exist_ok=True)
        with open(self.whitelist_path, "a") as f:
            f.write("%s %s\n" % (rsys, name) if name else "%s\n" % rsys)
