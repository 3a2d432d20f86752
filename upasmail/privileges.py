"""Running as a user other than the one that starts us (``twistd --uid/--gid``).

twistd builds the service (``makeService``) and binds the listener
(``privilegedStartService``) as the user it was started as, usually root,
then switches to ``--uid``/``--gid`` and starts the service.  What start-up
creates before the switch (the mail root and its parents, ``tmp/``,
``box/``, ``queue/``, the ``-d`` trace directory,
twistd's ``--logfile``) would be root's, and the server could not write
it: ``hand_over`` gives what did not exist before start-up to the run
user, as the last thing done as root.  Nothing that existed before is
chowned: an administrator's directory keeps its owner.

``needs`` is the one list of what the run user must be able to do: the
directories it writes in, the files it rewrites, the files it reads
again later (on SIGHUP or when they change), Python's library, the
programs it runs, the mailboxes; each an error or (a mailbox) a warning.
After the switch (or at start, when there is none: systemd's ``User=``)
``RunUserNeeds.problem`` checks it with the real ``access()``, so that
wrong ownership is one line at start-up rather than a ``451`` or a failed
reload hours later; ``upas-smtpd --check-config`` judges the same list
for another user from the files' modes (``checkconfig.check_needs``).
"""

import glob
import grp
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from typing import Optional

from twisted.python.util import gidFromString, uidFromString

from .mailroot.mailer import resolve as resolve_mailer
from .runq.queue import CORRUPT, ROUTING


R, W, X = os.R_OK, os.W_OK, os.X_OK  # 4, 2, 1: also the rwx bits of a mode


@dataclass(frozen=True)
class RunUser:
    """The user and group the server runs as (None: this process's).

    ``groups`` are its supplementary groups, for judging access from a
    file's mode without being that user (``--check-config``); None: the
    groups ``initgroups`` gives it, or this process's.
    """

    uid: Optional[int]
    gid: Optional[int]
    groups: Optional[frozenset] = None

    @classmethod
    def named(cls, uid_text=None, gid_text=None):
        """The run user of ``--uid``/``--gid`` (names or numbers), as twistd
        makes it: ``--gid`` defaults to the user's group, the groups are
        those ``initgroups`` gives; without ``--uid``, this process's
        identity.  ValueError names the bad flag."""
        if uid_text is None:
            gid = os.getegid() if gid_text is None else _gid(gid_text)
            return cls(os.geteuid(), gid, frozenset(set(os.getgroups()) | {gid}))
        try:
            entry = pwd.getpwuid(uidFromString(uid_text))
        except (KeyError, ValueError):
            raise ValueError("--uid: no such user: %s" % uid_text) from None
        gid = entry.pw_gid if gid_text is None else _gid(gid_text)
        return cls(entry.pw_uid, gid, frozenset(os.getgrouplist(entry.pw_name, gid)))

    @property
    def effective_uid(self):
        return os.geteuid() if self.uid is None else self.uid

    @property
    def effective_gid(self):
        return os.getegid() if self.gid is None else self.gid

    @property
    def name(self):
        try:
            return pwd.getpwuid(self.effective_uid).pw_name
        except KeyError:
            return str(self.effective_uid)

    def describe(self):
        """``nobody (uid 65534, group nogroup)``, for error lines."""
        uid, gid = self.effective_uid, self.effective_gid
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = "uid %d" % uid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return "%s (uid %d, group %s)" % (name, uid, group)

    def group_ids(self):
        if self.groups is not None:
            return self.groups
        if self.uid is None:
            return frozenset(set(os.getgroups()) | {self.effective_gid})
        return frozenset(os.getgrouplist(self.name, self.effective_gid))

    def bits(self, st):
        """The rwx bits of ``st``'s mode that apply to this user."""
        if self.effective_uid == 0:
            # root reads and writes anything, and executes what anyone may
            x = X if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0
            return R | W | x
        if st.st_uid == self.effective_uid:
            return (st.st_mode >> 6) & 7
        if st.st_gid in self.group_ids():
            return (st.st_mode >> 3) & 7
        return st.st_mode & 7


def _gid(text):
    try:
        return gidFromString(text)
    except (KeyError, ValueError):
        raise ValueError("--gid: no such group: %s" % text) from None


def run_user(twistd_options):
    """The user twistd will run the service as, decided as twistd decides
    (``--gid`` defaults to ``--uid``'s group); None when it switches nothing.

    ``twistd_options`` is twistd's own options (the plugin options'
    ``parent``), or None when we are not run by twistd.
    """
    if twistd_options is None:
        return None
    uid, gid = twistd_options.get("uid"), twistd_options.get("gid")
    if uid is None and gid is None:
        return None
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return RunUser(uid, gid)


def not_yet_there(paths):
    """Those of ``paths``, and of their parents, that do not exist yet."""
    missing = []
    for path in paths:
        path = os.path.abspath(path)
        while not os.path.lexists(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return list(dict.fromkeys(missing))


def hand_over(paths, user):
    """Give the run user what start-up created (``not_yet_there``'s list);
    a path start-up did not create after all is skipped."""
    uid = -1 if user.uid is None else user.uid
    gid = -1 if user.gid is None else user.gid
    for path in paths:
        try:
            os.lchown(path, uid, gid)
        except FileNotFoundError:
            pass


def created_at_startup(settings, twistd_options=None, log_json=None):
    """What start-up may create before twistd switches users (``log_json``:
    the ``--log-json`` file, opened as twistd's own log is)."""
    paths = [os.path.join(settings.root, d) for d in ("tmp", "box", "queue", ROUTING)]
    if settings.debug:
        paths.append(os.path.join(settings.path("log_dir"), "smtpdb"))
    logfile = (twistd_options or {}).get("logfile")
    for path in (logfile, log_json):  # opened after makeService
        if path and path != "-":
            paths.append(path)
    return paths


def can(path, mode):
    """May this process (its effective ids) do ``mode`` to ``path``?"""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


ERROR, WARNING = "error", "warning"
# what a need is, and what the run user must be able to do with it
DIRECTORY = "directory"  # write in (W|X); required: there, or creatable by the user
WRITE = "write"  # a file the server rewrites (R|W)
FILE = "file"  # a file read again later (R)
LIBRARY = "library"  # Python's own library (R|X)
PROGRAM = "program"  # run (X)
MAILBOX = "mailbox"  # box/<user>/ (W|X): only mail to that user fails
MBOX = "mbox"  # box/<user>/mbox (R|W)
WANT = {DIRECTORY: W | X, WRITE: R | W, FILE: R, LIBRARY: R | X, PROGRAM: X,
        MAILBOX: W | X, MBOX: R | W}

# modules are imported lazily, long after the switch: Python's own library
# must be readable too (not so under a 0700 /root, e.g. pyenv's)
PYTHON_LIBRARY = os.path.dirname(os.__file__)


@dataclass(frozen=True)
class Need:
    """One thing the run user must be able to do."""

    kind: str
    path: str
    what: str = ""  # how a line names it ("mail root"); MAILBOX, MBOX: the user
    why: str = ""  # FILE: when it is read again
    required: bool = False  # missing is a problem (else only what is there is checked)

    @property
    def want(self):
        return WANT[self.kind]

    @property
    def severity(self):
        # a mailbox the user cannot write fails only mail to that user (451)
        return WARNING if self.kind in (MAILBOX, MBOX) else ERROR


def there(path):
    """Does ``path`` exist?  One hidden by a directory above it that this
    process cannot search counts as there: it must not be skipped as
    missing when it is only out of reach."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def nearest_existing(path):
    """``path``, or the nearest directory above it that exists."""
    while not there(path):
        path = os.path.dirname(path)
    return path


@dataclass(frozen=True)
class RunUserNeeds:
    """What the server must be able to do with its files, as the run user:
    the one list both the server's start-up check (``problem``, with the
    real ``access()`` after the switch) and ``--check-config`` (from the
    files' modes, for another user) go through."""

    needs: tuple  # of Need, in the order they are checked

    def problem(self, user, can=can):
        """The first error, as one line; None if none."""
        for need in self.needs:
            if need.severity == ERROR:
                line = self._problem(need, user, can)
                if line:
                    return line
        return None

    def _problem(self, need, user, can):
        path, who = need.path, user.describe()
        if not there(path):
            if not need.required:
                return None
            if need.kind == FILE:
                return "%s does not exist: it is read %s" % (path, need.why)
            parent = nearest_existing(path)
            if can(parent, W | X):
                return None
            return ("%s %s does not exist, and %s cannot create it: %s is not writable "
                    "by it" % (need.what, path, who, parent))
        if can(path, need.want):
            return None
        if need.kind == DIRECTORY:
            return ("%s %s is not writable by %s; make it (and what is in it) the "
                    "run user's, e.g. chown -R" % (need.what, path, who))
        if need.kind == WRITE:
            return "%s %s is not writable by %s" % (need.what, path, who)
        if need.kind == FILE:
            return ("%s is not readable by %s: it is read again %s; make it readable "
                    "by that user or its group" % (path, who, need.why))
        if need.kind == LIBRARY:
            return ("Python's library %s is not readable by %s: modules imported after "
                    "start-up would fail; run a Python installed where that user can read "
                    "it" % (path, who))
        return "%s is not executable by %s" % (path, who)

    def mailbox_problems(self, user, can=can):
        """The warnings: mailbox directories (and mboxes) the run user cannot
        write in, one line a mailbox; not fatal, as only mail to those users
        fails (451), but said at once."""
        lines, said = [], set()
        for need in self.needs:
            if (need.severity == WARNING and need.what not in said
                    and there(need.path) and not can(need.path, need.want)):
                said.add(need.what)
                lines.append("%s is not writable by %s: mail to %s gets 451"
                             % (need.path, user.describe(), need.what))
        return lines


AGAIN = "on SIGHUP and when it changes"


def endpoint_files(listen):
    """The certificate and key an ``ssl:`` endpoint string names."""
    from .service import endpoint_parts

    return [part.split("=", 1)[1] for part in endpoint_parts(listen or "")
            if part.split("=", 1)[0] in ("privateKey", "certKey", "extraCertChain")]


def needs(settings, conf=None, workers=1, listen=None):
    """``RunUserNeeds`` for a server with these settings.

    Directories the server makes itself (the mail root's, ``grey/`` with
    ``-g``, the ``-d`` trace directory) are required: there, or creatable
    by the run user (``--check-config`` runs before any start-up); the
    ones made only now and then are checked when they are there.
    """
    root, lib = settings.root, settings.path("lib")
    grey = settings.path("grey")
    made = [(root, "mail root")] + [
        (os.path.join(root, d), "mail root directory") for d in ("tmp", "box", "queue")]
    if settings.greylist:
        made.append((grey, "greylist directory"))
    if settings.debug:
        made.append((os.path.join(settings.path("log_dir"), "smtpdb"), "trace directory"))
    found = [os.path.join(root, "queue", CORRUPT), os.path.join(root, "queue.dump"),
             os.path.join(grey, "tmp")] + ([] if settings.greylist else [grey])
    found = [d for d in found if os.path.isdir(d)]
    wanted = [Need(DIRECTORY, d, what, required=True) for d, what in made]
    wanted += [Need(DIRECTORY, d, "directory") for d in found]
    wanted += [Need(WRITE, os.path.join(grey, "whitelist"), "greylist whitelist"),
               Need(WRITE, os.path.join(root, ROUTING), "routing record")]

    files = [(conf, "on SIGHUP")] if conf else []
    files += [(settings.path(name), AGAIN) for name in ("blocked", "passwd")]
    files += [(os.path.join(lib, name), AGAIN)
              for name in ("aliases", "users", "names.blocked", "senders")]
    why_tls = "when it changes" + (" and by each worker process" if workers > 1 else "")
    files += [(path, why_tls) for path in (settings.cert, settings.key) if path]
    if workers > 1:  # each worker parses --listen again, reading them
        files += [(path, "by each worker process") for path in endpoint_files(listen)]
    wanted += [Need(FILE, path, why=why) for path, why in files]
    if settings.relay_auth_file:  # mode 0600 only: it must be the run user's
        wanted.append(Need(FILE, settings.relay_auth_file, why="for each AUTH at the smarthost",
                           required=True))
    wanted.append(Need(LIBRARY, PYTHON_LIBRARY))

    programs = [os.path.join(lib, "validateaddress"), os.path.join(lib, "validatesender")]
    if settings.mailer:
        programs.append(resolve_mailer(settings.mailer))
    if workers > 1:  # each worker runs the interpreter again
        programs.append(os.path.realpath(sys.executable))
    wanted += [Need(PROGRAM, p) for p in programs if p]

    boxes = os.path.join(root, "box")
    for directory in sorted(glob.glob(os.path.join(glob.escape(boxes), "*"))):
        if os.path.isdir(directory):
            user = os.path.basename(directory)
            wanted += [Need(MAILBOX, directory, user),
                       Need(MBOX, os.path.join(directory, "mbox"), user)]
    return RunUserNeeds(tuple(dict.fromkeys(wanted)))
