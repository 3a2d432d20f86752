"""``upas-smtpd --check-config``: check a configuration without starting.

Takes every flag ``twistd upas-smtpd`` takes (the same ``Options``, so the
effective configuration is the server's), plus ``--uid``/``--gid`` (the
user and group ``twistd --uid/--gid`` will run the server as: access is
judged for them, from each file's owner, group and mode and the user's
groups, without switching user) and ``--changed``.

Everything start-up reads goes through the server's own parsers and checks
(``options.SmtpdOptions.value_problems`` and ``check_files``, ``conf``,
``ratify``, ``local``, ``passwd``, ``tls``), collecting every problem
instead of stopping at the first.  On top of that it judges, for the run
user, the list the server checks right after dropping privileges
(``privileges.needs``: files re-read on change readable, the mail root's
directories writable or creatable, the ``-m`` mailer and the validator
programs executable, Python's library readable...), and the
certificate's dates.

Errors go to ``err`` one a line (``FILE:LINE: message``, ``FILE: message``
or ``--flag: message``) and make the exit status 1; warnings
(``FILE: warning: message``) go there too but do not.  With no error the
effective configuration is printed to ``out``, ``name = value`` sorted by
name (``--changed``: only what differs from the defaults).
docs/operations.rst lists the checks.

``python -m upasmail.checkconfig [flags]`` runs it too.
"""

import dataclasses
import datetime
import grp
import os
import pwd
import stat
import sys

from twisted.internet import ssl
from twisted.python import usage

from .. import conf as smtpdconf
from . import options as smtpd_options
from .. import privileges, relay, service, settings
from ..mailroot.mailer import resolve as resolve_mailer
from ..privileges import R, W, X

SECRET_FILES = ("passwd", "key", "relay_auth_file")
EXPIRY_WARNING = datetime.timedelta(days=14)
PATHS = ("lib", "blocked", "passwd", "trusted_dir", "log_dir")  # Settings.path


class Options(smtpd_options.SmtpdOptions):
    synopsis = "--check-config [--uid USER] [--gid GROUP] [--changed] [upas-smtpd options]"
    optFlags = [
        ["check-config", None, "check the configuration (what this program does)"],
        ["changed", None, "print only the settings that differ from the defaults"],
    ]
    optParameters = [
        ["uid", None, None, "user (name or number) the server will run as "
                            "(twistd --uid; default: this process's)"],
        ["gid", None, None, "group (name or number) the server will run as "
                            "(twistd --gid; default: the --uid user's group)"],
    ]

    def postOptions(self):
        # nothing here stops: check() looks at everything and lists it all
        pass


def owner_text(st):
    """``root:root, mode 0600`` for a stat result."""
    def name(lookup, ident, attr):
        try:
            return getattr(lookup(ident), attr)
        except KeyError:
            return str(ident)

    return "%s:%s, mode %04o" % (name(pwd.getpwuid, st.st_uid, "pw_name"),
                                 name(grp.getgrgid, st.st_gid, "gr_name"),
                                 stat.S_IMODE(st.st_mode))


def access_problem(path, want, user, what):
    """Why ``user`` cannot ``what`` (read, write...) ``path`` (rwx bits
    ``want``), every directory above it included; None when it can."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    try:
        for i in range(1, len(parts)):
            directory = os.sep.join(parts[:i]) or os.sep
            st = os.stat(directory)
            if not user.bits(st) & X:
                return "%s cannot %s it: %s is not searchable by %s (%s)" % (
                    user.name, what, directory, user.name, owner_text(st))
        st = os.stat(path)
    except OSError as e:  # a checker run by a user who cannot look
        return "cannot stat %s: %s" % (e.filename, e.strerror)
    if user.bits(st) & want != want:
        return "not %s by %s (%s)" % (
            {R: "readable", R | X: "readable", R | W: "readable and writable",
             W | X: "writable", W: "writable", X: "executable"}[want],
            user.name, owner_text(st))
    return None


class Report:
    """The problems found: errors (exit 1) and warnings."""

    def __init__(self):
        self.errors = []  # the parsers add to it too (conf.report)
        self.warnings = []

    def error(self, text):
        self.errors.append(text)

    def warn(self, where, text):
        self.warnings.append("%s: warning: %s" % (where, text))

    def add(self, severity, path, text):
        if severity == privileges.WARNING:
            self.warn(path, text)
        else:
            self.error("%s: %s" % (path, text))


def check(options, user, now):
    """Every problem with these options for ``user`` at ``now`` (an aware
    datetime): (Report, Settings or None when they could not be made)."""
    report = Report()
    config = smtpdconf.SmtpdConf()
    if options["conf"]:
        try:
            text = smtpdconf.read_text(options["conf"])
        except smtpdconf.ConfigError as e:
            report.error(str(e))
        else:
            config = smtpdconf.parse(text, options["conf"], errors=report.errors)
    for problem in options.value_problems():
        report.error(problem)
    mailer = resolve_mailer(options["mailer"]) if options["mailer"] else None
    if options["mailer"] and mailer is None:
        report.error("-m %s: no such executable" % options["mailer"])
    try:
        s = settings.merge(config, **options.merge_args())
    except usage.UsageError as e:
        report.error(str(e))
        return report, None
    smtpd_options.check_files(s, options["require-auth"], bool(options["passwd"]),
                          errors=report.errors)
    check_needs(report, privileges.needs(s, options["conf"], options["workers"],
                                         options["listen"]), user)
    check_secrets(report, s)
    if options["decision-log"]:
        check_decision_log(report, options["decision-log"], user)
    if s.cert:
        check_dates(report, s.cert, now)
    if service.open_relay(s, options["listen"]):
        report.warn("--listen", service.OPEN_RELAY.format(listen=options["listen"]))
    return report, s


def check_decision_log(report, path, user):
    """--decision-log: the file writable by the run user, or its directory
    (the server creates it at start-up, as root before a --uid switch, but
    logrotate's new one is made at the path)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        report.error("--decision-log %s: a directory, not a file" % path)
        return
    if os.path.lexists(path):
        problem = access_problem(path, W, user, "write")
    else:
        problem = access_problem(os.path.dirname(path), W | X, user, "create")
    if problem:
        report.error("--decision-log %s: %s" % (path, problem))


def check_secrets(report, s):
    for name in SECRET_FILES:
        path = s.path(name) if name == "passwd" else getattr(s, name)
        if name == "key" and not path:
            path = s.cert  # the key is in the -c file
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        if st and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            report.warn(path, "holds secrets and is open to other users (%s); chmod 600 it"
                        % owner_text(st))


def check_dates(report, path, now):
    """An expired certificate fails every handshake; one about to expire
    is a warning."""
    try:
        with open(path, "rb") as f:
            cert = ssl.Certificate.loadPEM(f.read()).original
    except Exception:  # unusable: check_files has said why
        return
    after = _asn1_time(cert.get_notAfter())
    before = _asn1_time(cert.get_notBefore())
    if now >= after:
        report.error("%s: the certificate expired on %s" % (path, after.isoformat()))
    elif now < before:
        report.error("%s: the certificate is not valid before %s" % (path, before.isoformat()))
    elif after - now < EXPIRY_WARNING:
        report.warn(path, "the certificate expires on %s" % after.isoformat())


def _asn1_time(raw):
    return datetime.datetime.strptime(raw.decode("ascii"), "%Y%m%d%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)


VERBS = {privileges.DIRECTORY: "write", privileges.MAILBOX: "write",
         privileges.MBOX: "deliver to", privileges.WRITE: "write", privileges.FILE: "read",
         privileges.LIBRARY: "read", privileges.PROGRAM: "run"}


def check_needs(report, needs, user):
    """The server's own start-up list (``privileges.needs``), judged for
    ``user`` from each file's owner, group and mode and every directory
    above it, without switching user; errors and warnings as the server
    makes them.  The mail root may not be made yet: a directory the server
    makes must then be creatable by the user."""
    uncreatable = set()  # a missing root's directories: said once, for the root
    for need in needs.needs:
        path = need.path
        directory = need.kind in (privileges.DIRECTORY, privileges.MAILBOX)
        if directory and os.path.isdir(path):
            problem = access_problem(path, need.want, user, VERBS[need.kind])
            if problem:
                report.add(need.severity, path, problem)
            else:  # usable, but perhaps not as it should be
                check_ownership(report, path, user)
        elif directory and os.path.lexists(path):
            report.add(need.severity, path, "not a directory")
        elif os.path.lexists(path):
            problem = access_problem(path, need.want, user, VERBS[need.kind])
            if problem and need.kind == privileges.LIBRARY:
                problem += ": modules imported after start-up would fail"
            if problem:
                report.add(need.severity, path, problem)
        elif need.required and need.kind == privileges.FILE:
            report.add(need.severity, path, "no such file")
        elif need.required:
            parent = privileges.nearest_existing(path)
            problem = access_problem(parent, W | X, user, "create")
            if problem and parent not in uncreatable:
                uncreatable.add(parent)
                report.add(need.severity, path, "does not exist, and %s cannot create it: "
                           "%s: %s" % (user.name, parent, problem))


def check_ownership(report, path, user):
    st = os.stat(path)
    if st.st_uid != user.effective_uid:
        report.warn(path, "owned by %s, not by the run user %s: what the server creates "
                          "there is %s's" % (owner_text(st).split(",")[0], user.name,
                                             user.name))
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        report.warn(path, "anyone may write here (%s)" % owner_text(st))


def effective(s, options):
    """The effective configuration: {name: value text}, every setting.

    Names are ``settings.Settings`` fields (``--max-recipients`` sets
    ``max_recipients``), the identity's parts, resolved paths, and the
    options that are not settings (``listen``, ``workers``, ``resolver``).
    """
    # twistd gives flags as 0/1: the field's type says which are yes/no
    values = {f.name: bool(getattr(s, f.name)) if f.type is bool else getattr(s, f.name)
              for f in dataclasses.fields(s) if f.name not in ("identity", "conf")}
    values.update(sysname=s.identity.sysname, me=s.me, dom=s.dom, names=s.identity.names)
    for name in PATHS:
        values[name] = s.path(name)
    if s.ournets is None:
        values["ournets"] = relay.DEFAULT_OURNETS
    values.update(listen=options["listen"], workers=options["workers"],
                  resolver=options["resolver"])
    return {name: value_text(v) for name, v in values.items()}


def value_text(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    return str(value)


def defaults(root):
    """The effective configuration of no flags and no smtpd.conf, but for
    paths that follow the mail root: those follow ``root``, so that only a
    path set on its own counts as changed."""
    plain = Options()
    s = settings.merge(smtpdconf.SmtpdConf(), **plain.merge_args())
    values = effective(s, plain)
    s = dataclasses.replace(s, root=root)
    values.update((name, s.path(name)) for name in PATHS)
    return values


def main(argv=None, out=None, err=None, now=None):
    """Check; print problems to ``err`` and, when there is no error, the
    effective configuration to ``out``.  0 good, 1 not.  ``argv`` may
    start with the program's name (``upas-smtpd --check-config ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if argv and not argv[0].startswith("-"):
        argv = argv[1:]
    options = Options()
    try:
        options.parseOptions(argv)
        user = privileges.RunUser.named(options["uid"], options["gid"])
    except (usage.UsageError, ValueError) as e:
        print("upas-smtpd: %s" % e, file=err)
        return 1
    report, s = check(options, user, now or datetime.datetime.now(datetime.timezone.utc))
    for line in report.errors + report.warnings:
        print(line, file=err)
    if report.errors:
        return 1
    values = effective(s, options)
    unchanged = defaults(s.root) if options["changed"] else {}
    for name in sorted(values):
        if values[name] != unchanged.get(name):
            print(("%s = %s" % (name, values[name])).rstrip(), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
