"""Running as a user other than the one that starts us (``twistd --uid/--gid``).

twistd builds the service (``makeService``) and binds the listener
(``privilegedStartService``) as the user it was started as, usually root,
then switches to ``--uid``/``--gid`` and starts the service.  What start-up
creates before the switch (the mail root and its parents, ``tmp/``,
``box/``, ``queue/``, ``routing.json``, the ``-d`` trace directory,
twistd's ``--logfile``) would be root's, and the server could not write
it: ``hand_over`` gives what did not exist before start-up to the run
user, as the last thing done as root.  Nothing that existed before is
chowned: an administrator's directory keeps its owner.

After the switch (or at start, when there is none: systemd's ``User=``),
``RunUserNeeds.problem`` checks that the run user can
write what the server writes and read what it reads again later (on
SIGHUP or when the file changes), so that wrong ownership is one line at
start-up rather than a ``451`` or a failed reload hours later.
"""

import glob
import grp
import os
import pwd
import sys
from dataclasses import dataclass
from typing import Optional

from .mailer import resolve as resolve_mailer
from .queue import CORRUPT, ROUTING


@dataclass(frozen=True)
class RunUser:
    """The user and group twistd switches to (None: that one stays)."""

    uid: Optional[int]
    gid: Optional[int]

    def describe(self):
        """``nobody (uid 65534, group nogroup)``, for error lines."""
        uid = os.geteuid() if self.uid is None else self.uid
        gid = os.getegid() if self.gid is None else self.gid
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = "uid %d" % uid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return "%s (uid %d, group %s)" % (name, uid, group)


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


@dataclass(frozen=True)
class RunUserNeeds:
    """What the server must be able to do with its files, as the run user."""

    directories: tuple  # (path, what it is) to write in
    files: tuple  # (path, why) to read (or, with ``writes``, write too)
    programs: tuple = ()  # paths to run
    writes: tuple = ()  # (path, what) files written
    mailboxes: str = ""  # box/: each mailbox directory is written in
    # modules are imported lazily, long after the switch: Python's own
    # library must be readable too (not so under a 0700 /root, e.g. pyenv's)
    library: str = os.path.dirname(os.__file__)

    def problem(self, user, can=can):
        """The first thing the run user cannot do, as one line; None if none."""
        for path, what in self.directories:
            if not can(path, os.W_OK | os.X_OK):
                return ("%s %s is not writable by %s; make it (and what is in it) the "
                        "run user's, e.g. chown -R" % (what, path, user.describe()))
        for path, what in self.writes:
            if os.path.exists(path) and not can(path, os.R_OK | os.W_OK):
                return "%s %s is not writable by %s" % (what, path, user.describe())
        for path, why in self.files:
            if os.path.exists(path) and not can(path, os.R_OK):
                return ("%s is not readable by %s: it is read again %s; make it readable "
                        "by that user or its group" % (path, user.describe(), why))
        if not can(self.library, os.R_OK | os.X_OK):
            return ("Python's library %s is not readable by %s: modules imported after "
                    "start-up would fail; run a Python installed where that user can read "
                    "it" % (self.library, user.describe()))
        for path in self.programs:
            if os.path.exists(path) and not can(path, os.X_OK):
                return "%s is not executable by %s" % (path, user.describe())
        return None

    def mailbox_problems(self, user, can=can):
        """Mailbox directories (and mboxes) the run user cannot write in:
        not fatal, as only mail to those users fails (451), but said at once."""
        lines = []
        for directory in sorted(glob.glob(os.path.join(glob.escape(self.mailboxes), "*"))):
            if not os.path.isdir(directory):
                continue
            mbox = os.path.join(directory, "mbox")
            for path, mode in ((directory, os.W_OK | os.X_OK), (mbox, os.R_OK | os.W_OK)):
                if os.path.exists(path) and not can(path, mode):
                    lines.append("%s is not writable by %s: mail to %s gets 451"
                                 % (path, user.describe(), os.path.basename(directory)))
                    break
        return lines


AGAIN = "on SIGHUP and when it changes"


def endpoint_files(listen):
    """The certificate and key an ``ssl:`` endpoint string names."""
    from .service import endpoint_parts

    return [part.split("=", 1)[1] for part in endpoint_parts(listen or "")
            if part.split("=", 1)[0] in ("privateKey", "certKey", "extraCertChain")]


def needs(settings, conf=None, workers=1, listen=None):
    """``RunUserNeeds`` for a server with these settings (after
    ``MailRoot.prepare``: the root's directories exist)."""
    root, lib = settings.root, settings.path("lib")
    directories = [(root, "mail root")] + [
        (os.path.join(root, d), "mail root directory") for d in ("tmp", "box", "queue")]
    optional = [os.path.join(root, "queue", CORRUPT), os.path.join(root, "queue.dump"),
                settings.path("grey"), os.path.join(settings.path("grey"), "tmp")]
    if settings.debug:
        optional.append(os.path.join(settings.path("log_dir"), "smtpdb"))
    directories += [(d, "directory") for d in optional if os.path.isdir(d)]
    files = [(conf, "on SIGHUP")] if conf else []
    files += [(settings.path(name), AGAIN) for name in ("blocked", "passwd")]
    files += [(os.path.join(lib, name), AGAIN)
              for name in ("aliases", "users", "names.blocked", "senders")]
    why_tls = "when it changes" + (" and by each worker process" if workers > 1 else "")
    files += [(path, why_tls) for path in (settings.cert, settings.key) if path]
    if workers > 1:  # each worker parses --listen again, reading them
        files += [(path, "by each worker process") for path in endpoint_files(listen)]
    if settings.relay_auth_file:  # mode 0600 only: it must be the run user's
        files.append((settings.relay_auth_file, "for each AUTH at the smarthost"))
    programs = [os.path.join(lib, "validateaddress"), os.path.join(lib, "validatesender")]
    if settings.mailer:
        programs.append(resolve_mailer(settings.mailer))
    if workers > 1:  # each worker runs the interpreter again
        programs.append(os.path.realpath(sys.executable))
    return RunUserNeeds(
        directories=tuple(directories),
        files=tuple(files),
        programs=tuple(p for p in programs if p),
        writes=((os.path.join(settings.path("grey"), "whitelist"), "greylist whitelist"),
                (os.path.join(root, ROUTING), "routing record")),
        mailboxes=os.path.join(root, "box"),
    )
