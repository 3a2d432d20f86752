"""One list of what the run user needs (``privileges.needs``), judged by
the server at start-up (the real ``access()`` after the switch) and by
``upas-smtpd --check-config`` (from the files' modes, for ``--uid``): the
two must never disagree again.

The end-to-end tests need root (``twistd --uid``); without it they are
skipped, unless UPASMAIL_REQUIRE_ROOT_TESTS=1.
"""

import os
import subprocess
import sys

import pytest

from test_privdrop import (NOBODY, nobody_can_list, nobody_env, one_line,
                           python_for_nobody, world)  # noqa: F401 (a fixture)
from upasmail import checkconfig, privileges, testing
from upasmail.conf import SmtpdConf
from upasmail.settings import merge

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def server_line(world, python, args):
    """The one line ``twistd --uid nobody upas-smtpd ARGS`` stops with."""
    r = subprocess.run([python, "-c", TWISTD, "-n", "--pidfile=", "--uid", str(NOBODY),
                        "--gid", str(NOBODY), "upas-smtpd", *args],
                       env=nobody_env(), cwd=world, capture_output=True, text=True, timeout=60)
    return one_line(r)


def check_config(world, python, args):
    """``upas-smtpd --check-config --uid nobody ARGS`` run by root with the
    same interpreter (so the same Python library): (status, error lines)."""
    r = subprocess.run([python, "-m", "upasmail.checkconfig", "--check-config", "--uid",
                        "nobody", *args], env=nobody_env(), cwd=world, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, [line for line in r.stderr.splitlines() if ": warning: " not in line]


def root_only(path, mode=0o600):
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def unreadable_conf(world, mail):
    root_only(os.path.join(world, "etc", "smtpd.conf"))
    return [], os.path.join(world, "etc", "smtpd.conf")


def unreadable_relay_auth_file(world, mail):
    auth = write(os.path.join(world, "etc", "relay-auth"), "relay.example.net alice pw\n", 0o600)
    return ["--relay-auth-file", auth], auth


def ssl_listener_key_with_workers(world, mail):
    cert, key = testing.self_signed_pem("localhost", days=30)
    cert = write(os.path.join(world, "etc", "cert.pem"), cert)
    key = write(os.path.join(world, "etc", "key.pem"), key, 0o600)
    return ["--workers", "2", "--listen",
            "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (key, cert)], key


def validator_nobody_cannot_run(world, mail):
    lib = os.path.join(mail, "lib")
    os.makedirs(lib)
    program = write(os.path.join(lib, "validatesender"), "#!/bin/sh\nexit 0\n", 0o744)
    return [], program


def greylist_whitelist_nobody_cannot_write(world, mail):
    grey = os.path.join(mail, "grey")
    os.makedirs(grey)
    os.chown(grey, NOBODY, NOBODY)
    whitelist = write(os.path.join(grey, "whitelist"), "", 0o644)
    return ["-g"], whitelist


@pytest.mark.parametrize("broken", [
    unreadable_conf, unreadable_relay_auth_file, ssl_listener_key_with_workers,
    validator_nobody_cannot_run, greylist_whitelist_nobody_cannot_write])
def test_the_server_and_check_config_name_the_same_problem(world, broken):
    python = python_for_nobody(world)
    mail = os.path.join(world, "mail")
    for d in (mail, os.path.join(mail, "box")):
        os.makedirs(d, 0o755, exist_ok=True)
        os.chown(d, NOBODY, NOBODY)
    more, path = broken(world, mail)
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--root", mail, "--sysname",
            "gnot.example.org", "--conf", os.path.join(world, "etc", "smtpd.conf"),
            "--blocked", os.path.join(world, "etc", "blocked"), "--passwd",
            os.path.join(world, "etc", "passwd"), *more]
    line = server_line(world, python, args)
    assert path in line, line
    status, errors = check_config(world, python, args)
    assert status == 1
    assert [e for e in errors if e.startswith(path + ": ")], (line, errors)


def test_an_unreachable_python_library_is_named_by_both(world):
    """The interpreter running the tests may be under a 0700 /root (pyenv):
    then nobody cannot import from it, and both say so."""
    library = os.path.dirname(os.__file__)
    if os.access(library, os.R_OK | os.X_OK, effective_ids=True) and nobody_can_list(library):
        pytest.skip("nobody can read this Python's library (%s)" % library)
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--root", os.path.join(world, "mail")]
    assert library in server_line(world, sys.executable, args)
    status, errors = check_config(world, sys.executable, args)
    assert status == 1
    assert [e for e in errors if e.startswith(library + ": nobody cannot read it: ")], errors


# -- without root ------------------------------------------------------------------

def a_mail_root(tmp_path):
    root = tmp_path / "mail"
    for d in ("tmp", "queue", "box/bob", "lib"):
        (root / d).mkdir(parents=True)
    return root


def test_check_config_judges_every_need_of_the_servers_list(tmp_path, monkeypatch):
    """A user who may do nothing at all (no file is theirs or their group's,
    every mode is 0700): every error of the server's list is an error line
    of --check-config, every warning a warning line."""
    root = a_mail_root(tmp_path)
    (tmp_path / "smtpd.conf").write_text("")
    (root / "lib" / "aliases").write_text("")
    (root / "lib" / "validateaddress").write_text("")
    (root / "box" / "bob" / "mbox").write_text("")
    (root / "grey").mkdir()
    (root / "grey" / "whitelist").write_text("")
    auth = tmp_path / "relay-auth"
    auth.write_text("")
    python = tmp_path / "python"
    python.mkdir()
    monkeypatch.setattr(privileges, "PYTHON_LIBRARY", str(python))
    for d, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            os.chmod(os.path.join(d, name), 0o700)
    s = merge(SmtpdConf(), root=str(root), greylist=True, relay_auth_file=str(auth))
    needs = privileges.needs(s, conf=str(tmp_path / "smtpd.conf"))
    stranger = privileges.RunUser(NOBODY + 1000, NOBODY + 1000, frozenset())
    report = checkconfig.Report()
    checkconfig.check_needs(report, needs, stranger)
    named = {line.split(": ", 1)[0] for line in report.errors}
    warned = {line.split(": warning: ", 1)[0] for line in report.warnings}
    there = [n for n in needs.needs if os.path.lexists(n.path)]
    assert {n.path for n in there if n.severity == privileges.ERROR} <= named
    assert {n.path for n in there if n.severity == privileges.WARNING} <= warned
    kinds = {n.kind for n in there}
    assert kinds == {privileges.DIRECTORY, privileges.WRITE, privileges.FILE,
                     privileges.LIBRARY, privileges.PROGRAM, privileges.MAILBOX,
                     privileges.MBOX}


def test_the_servers_check_stops_at_an_error_and_logs_warnings(tmp_path):
    root = a_mail_root(tmp_path)
    needs = privileges.needs(merge(SmtpdConf(), root=str(root)))
    user = privileges.RunUser(NOBODY, NOBODY)
    box = str(root / "box" / "bob")
    assert needs.problem(user, can=lambda path, mode: path != box) is None
    assert needs.mailbox_problems(user, can=lambda path, mode: path != box) != []


def test_a_missing_relay_auth_file_stops_both(tmp_path):
    root = a_mail_root(tmp_path)
    auth = str(tmp_path / "relay-auth")
    s = merge(SmtpdConf(), root=str(root), relay_auth_file=auth)
    needs = privileges.needs(s)
    assert needs.problem(privileges.RunUser(None, None), can=lambda path, mode: True) == (
        "%s does not exist: it is read for each AUTH at the smarthost" % auth)
    report = checkconfig.Report()
    checkconfig.check_needs(report, needs, privileges.RunUser.named())
    assert "%s: no such file" % auth in report.errors


def test_a_greylist_directory_is_made_by_the_run_user(tmp_path):
    """-g: grey/ is made after the switch; missing is fine while the run
    user can make it, for the server as for --check-config."""
    root = a_mail_root(tmp_path)
    needs = privileges.needs(merge(SmtpdConf(), root=str(root), greylist=True))
    grey = str(root / "grey")
    user = privileges.RunUser(None, None)
    assert needs.problem(user, can=lambda path, mode: True) is None
    assert needs.problem(user, can=lambda path, mode: path != str(root)).startswith(
        "mail root %s is not writable" % root)
    assert needs.problem(user, can=lambda path, mode: path not in (str(root), grey)) is not None
    report = checkconfig.Report()
    checkconfig.check_needs(report, needs, privileges.RunUser.named())
    assert report.errors == []
