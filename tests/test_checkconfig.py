"""``upas-smtpd --check-config`` (upasmail.checkconfig): no network, no server."""

import datetime
import io
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from upasmail import checkconfig, conf, local, passwd, privileges, ratify, settings, testing

NOW = datetime.datetime.now(datetime.timezone.utc)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to judge for nobody")


@pytest.fixture
def site(monkeypatch):
    """A complete, good configuration in a directory everyone may search
    (pytest's own tmp directories are mode 0700, which would hide every
    file from ``--uid nobody``).  Python's library is one there too: the
    interpreter running the tests may be under a 0700 /root (pyenv), which
    ``--uid nobody`` rightly reports (test_run_user_needs.py), and these
    tests are about the other files."""
    top = tempfile.mkdtemp(prefix="checkconfig.", dir="/tmp")
    os.chmod(top, 0o755)
    os.mkdir(os.path.join(top, "python"), 0o755)
    monkeypatch.setattr(privileges, "PYTHON_LIBRARY", os.path.join(top, "python"))
    lib = os.path.join(top, "mail", "lib")
    os.makedirs(lib)
    os.makedirs(os.path.join(top, "mail", "box", "bob"))
    files = {
        "smtpd.conf": "defaultdomain example.org\nourdomains example.org, *.example.org\n"
                      "ournets 127.0.0.1, 192.168.1.0/24\n",
        "mail/lib/blocked": "block 192.0.2.0/24\n*deny spammer.example\n",
        "mail/lib/aliases": "postmaster: bob\nabuse: bob, carol@example.net\n",
        "mail/lib/users": "alice\n",
        "mail/lib/passwd": "alice:a long secret\n",
    }
    cert, key = testing.self_signed_pem("localhost", days=90)
    files.update({"cert.pem": cert, "key.pem": key})
    for name, text in files.items():
        with open(os.path.join(top, name), "w") as f:
            f.write(text)
    for name in ("mail/lib/passwd", "key.pem"):
        os.chmod(os.path.join(top, name), 0o600)
    yield top
    shutil.rmtree(top)


def run(*argv, now=NOW):
    out, err = io.StringIO(), io.StringIO()
    status = checkconfig.main(["--check-config"] + list(argv), out, err, now=now)
    return status, out.getvalue(), err.getvalue()


def flags(site, *more):
    return ("--root", os.path.join(site, "mail"), "--conf", os.path.join(site, "smtpd.conf"),
            "-c", os.path.join(site, "cert.pem"), "--key", os.path.join(site, "key.pem"),
            "--sysname", "mx.example.org") + more


def settings_printed(out):
    return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                for line in out.splitlines())


def test_good_config_prints_every_setting_with_its_default(site):
    status, out, err = run(*flags(site))
    assert (status, err) == (0, "")
    printed = settings_printed(out)
    fields = {f.name for f in settings.Settings.__dataclass_fields__.values()} - {"identity",
                                                                                   "conf"}
    assert fields <= set(printed)
    assert printed["max_recipients"] == "1000"  # a default
    assert printed["message_limit"] == str(128 * 1024 * 1024)
    assert printed["ourdomains"] == "example.org, *.example.org"  # from smtpd.conf
    assert printed["ournets"] == "127.0.0.1/32, 192.168.1.0/24"
    assert printed["dom"] == "example.org"
    assert printed["relay_control"] == "yes" and printed["require_auth"] == "no"
    assert printed["passwd"] == os.path.join(site, "mail", "lib", "passwd")
    assert printed["listen"] == "tcp:2525:interface=127.0.0.1"
    assert list(printed) == sorted(printed)


def test_changed_shows_only_what_differs_from_the_defaults(tmp_path):
    (tmp_path / "smtpd.conf").write_text("ourdomains example.org\n")
    (tmp_path / "pw").write_text("alice:secret\n")
    status, out, err = run("--changed", "--root", str(tmp_path / "spool"), "--conf",
                           str(tmp_path / "smtpd.conf"), "--max-recipients", "200", "-a",
                           "--passwd", str(tmp_path / "pw"))
    assert status == 0, err
    # the paths that follow the root (lib, blocked, ...) are not changes of their own
    assert out.splitlines() == ["max_recipients = 200", "ourdomains = example.org",
                                "passwd = %s" % (tmp_path / "pw"), "require_auth = yes",
                                "root = %s" % (tmp_path / "spool")]


def test_the_check_creates_nothing(tmp_path):
    status, out, err = run("--root", str(tmp_path / "mail"))
    assert status == 0, err
    assert not (tmp_path / "mail").exists()


def test_every_error_in_smtpd_conf_with_its_line(site):
    with open(os.path.join(site, "smtpd.conf"), "w") as f:
        f.write("defaultdomain example.org\nrelayhost foo\n# fine\nournets 10.0.0.0/33\n")
    status, out, err = run(*flags(site))
    path = os.path.join(site, "smtpd.conf")
    assert status == 1 and out == ""
    assert err.splitlines() == ["%s:2: unknown keyword 'relayhost'" % path,
                                "%s:4: bad address or CIDR '10.0.0.0/33'" % path]


def test_ratify_aliases_and_passwd_errors_each_with_file_and_line(site):
    lib = os.path.join(site, "mail", "lib")
    for name, text in (("blocked", "block 192.0.2.0/24\nbolck 10.0.0.1\nallow 300.1.1.1\n"),
                       ("aliases", "postmaster: bob\nfred: |/bin/sh\n"),
                       ("passwd", "alice:secret\nbob\nalice:again\n")):
        with open(os.path.join(lib, name), "w") as f:
            f.write(text)
    status, out, err = run(*flags(site))
    assert status == 1
    lines = err.splitlines()
    for where, what in (("blocked:2", "unknown verb 'bolck'"),
                        ("blocked:3", "bad address or CIDR '300.1.1.1'"),
                        ("aliases:2", "unsupported alias target '|/bin/sh'"),
                        ("passwd:2", "expected user:secret"),
                        ("passwd:3", "user alice listed twice")):
        assert any(line.startswith(os.path.join(lib, where) + ": " + what) for line in lines), (
            where, lines)


def test_the_servers_parsers_still_stop_at_the_first_error():
    with pytest.raises(conf.ConfigError, match=r"^c:1: unknown keyword"):
        conf.parse("bogus\nournets x\n", "c")
    with pytest.raises(conf.ConfigError, match=r"^b:1: unknown verb"):
        ratify.parse("bogus 1.2.3.4\nblock x\n", "b")
    with pytest.raises(conf.ConfigError, match=r"^a:1: expected"):
        local.parse_aliases("bad\n: x\n", "a")
    with pytest.raises(conf.ConfigError, match=r"^p:1: expected user:secret"):
        passwd.parse("bad\nx:\n", "p")


def test_a_key_that_is_not_the_certificates(site):
    _, other_key = testing.self_signed_pem("localhost")
    with open(os.path.join(site, "key.pem"), "w") as f:
        f.write(other_key)
    status, out, err = run(*flags(site))
    assert status == 1
    assert "%s: the private key does not belong to the certificate" % os.path.join(
        site, "cert.pem") in err.splitlines()


def test_an_expired_certificate_is_an_error_a_nearly_expired_one_a_warning(site):
    cert = os.path.join(site, "cert.pem")
    status, out, err = run(*flags(site), now=NOW + datetime.timedelta(days=91))
    assert status == 1
    assert err.startswith("%s: the certificate expired on " % cert)
    status, out, err = run(*flags(site), now=NOW + datetime.timedelta(days=80))
    assert status == 0 and out
    assert err.startswith("%s: warning: the certificate expires on " % cert)


@as_root
def test_a_password_file_only_root_can_read_is_an_error_for_nobody(site):
    mail = os.path.join(site, "mail")
    for d in ("", "box", "box/bob"):
        os.chown(os.path.join(mail, d), 65534, 65534)  # the mail root is nobody's
    os.chmod(os.path.join(site, "key.pem"), 0o644)
    pw = os.path.join(mail, "lib", "passwd")
    assert (os.stat(pw).st_uid, os.stat(pw).st_mode & 0o777) == (0, 0o600)
    status, out, err = run(*flags(site), "--uid", "nobody")
    assert status == 1
    assert err.splitlines()[0] == "%s: not readable by nobody (root:root, mode 0600)" % pw
    # the key is readable by everyone: a warning, not an error
    assert "%s: warning: holds secrets and is open to other users" % os.path.join(
        site, "key.pem") in err
    status, out, err = run(*flags(site))  # as root: fine, the key still a warning
    assert status == 0 and "not readable" not in err


@as_root
def test_a_mail_root_the_run_user_cannot_write(site):
    mail = os.path.join(site, "mail")
    for name in ("lib/passwd", "key.pem"):
        os.chown(os.path.join(site, "mail", name) if name.startswith("lib") else
                 os.path.join(site, name), 65534, 65534)
    os.chmod(mail, 0o755)
    status, out, err = run(*flags(site), "--uid", "65534", "--gid", "nogroup")
    assert status == 1
    assert "%s: not writable by nobody (root:root, mode 0755)" % mail in err.splitlines()
    # tmp/ and queue/ are missing and cannot be made in it
    assert ("%s: does not exist, and nobody cannot create it: %s: not writable by nobody "
            "(root:root, mode 0755)" % (os.path.join(mail, "tmp"), mail)) in err.splitlines()
    os.chown(mail, 65534, 65534)
    status, out, err = run(*flags(site), "--uid", "nobody")
    assert "%s: not writable" % mail not in err and "cannot create" not in err
    assert "%s: not writable by nobody" % os.path.join(mail, "box") in err


def test_a_missing_mailer(site):
    status, out, err = run(*flags(site), "-m", "/nonexistent/mailer")
    assert status == 1
    assert "-m /nonexistent/mailer: no such executable" in err.splitlines()


@as_root
def test_a_mailer_the_run_user_cannot_run(site):
    mailer = os.path.join(site, "mailer")
    with open(mailer, "w") as f:
        f.write("#!/bin/sh\ncat >/dev/null\n")
    os.chmod(mailer, 0o700)
    status, out, err = run(*flags(site), "-m", mailer, "--uid", "nobody")
    assert "%s: not executable by nobody (root:root, mode 0700)" % mailer in err.splitlines()
    status, out, err = run(*flags(site), "-m", mailer)
    assert status == 0, err


def test_every_bad_flag_at_once():
    status, out, err = run("--workers", "0", "--listen", "nonsense:1", "--max-recipients", "5")
    assert status == 1
    assert err.splitlines() == ["--max-recipients must be at least 100 (RFC 5321 4.5.3.1)",
                                "--listen nonsense:1: Unknown endpoint type: 'nonsense'",
                                "--workers must be at least 1"]


def test_unknown_run_user():
    status, out, err = run("--uid", "no-such-user-here")
    assert (status, err) == (1, "upas-smtpd: --uid: no such user: no-such-user-here\n")


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "upasmail.checkconfig", "--root",
                           str(tmp_path / "mail"), "--changed", "--hop-limit", "7"],
                          capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "hop_limit = 7" in proc.stdout.splitlines()


@as_root
def test_a_mail_root_anyone_may_write_is_a_warning(site):
    mail = os.path.join(site, "mail")
    for d in ("", "box", "box/bob"):
        os.chmod(os.path.join(mail, d), 0o777)
    for name in ("mail/lib/passwd", "key.pem"):
        os.chown(os.path.join(site, name), 65534, 65534)
    status, out, err = run(*flags(site), "--uid", "nobody")
    assert status == 0, err
    assert ("%s: warning: owned by root:root, not by the run user nobody: what the server "
            "creates there is nobody's" % mail) in err.splitlines()
    assert "%s: warning: anyone may write here (root:root, mode 0777)" % mail in err.splitlines()
