"""Privilege drop: ``twistd --uid/--gid`` (issue 15).

The end-to-end tests start a real ``twistd upas-smtpd`` as root that
switches to nobody/nogroup (65534).  They need root: without it they are
skipped, unless UPASMAIL_REQUIRE_ROOT_TESTS=1 (CI as root) makes that a
failure, so CI can never pass them by skipping.
"""

import atexit
import contextlib
import mailbox
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from types import SimpleNamespace

import pytest

from test_twistd import ROOT, Server, dns_port  # noqa: F401 (a fixture)
from upasmail import privileges
from upasmail.settings import merge
from upasmail.conf import SmtpdConf

NOBODY = 65534
PASSWORD = "correct horse 9"


def need_root():
    if os.geteuid() == 0:
        return
    why = "needs root: twistd --uid/--gid switches users"
    if os.environ.get("UPASMAIL_REQUIRE_ROOT_TESTS") == "1":
        pytest.fail(why + " (UPASMAIL_REQUIRE_ROOT_TESTS=1)")
    pytest.skip(why)


PYTHONPATH = [ROOT, sysconfig.get_paths()["purelib"]]


def nobody_env():
    """Our code first, then this interpreter's packages (not as a site dir:
    the editable install's .pth would point elsewhere)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(PYTHONPATH)
    return e


_found = []


def python_for_nobody(cwd):
    """An interpreter nobody can run with our packages.

    The server keeps importing modules after it switched users, and its
    workers run the interpreter again: a Python under a 0700 /root (pyenv)
    cannot serve nobody, so the system's Python of the same version is
    tried next (the compiled packages fit any build of that version).  A
    checkout or virtualenv nobody cannot reach (a clone under a 0700
    directory) is copied, once, to where nobody can read it.
    """
    if not _found:
        python, tried = _try_pythons(cwd)
        if python is None:
            PYTHONPATH[:] = _reachable_copy()
            python, more = _try_pythons(cwd)
            tried += more
        _found.append((python, tried))
    python, tried = _found[0]
    if python is not None:
        return python
    why = "no Python that nobody can run with our packages: " + "; ".join(tried)
    if os.environ.get("UPASMAIL_REQUIRE_ROOT_TESTS") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _try_pythons(cwd):
    version = "python%d.%d" % sys.version_info[:2]
    tried = []
    for candidate in (sys.executable, shutil.which(version, path="/usr/bin:/usr/local/bin")):
        if not candidate:
            continue
        try:
            r = subprocess.run([candidate, "-c", "import twisted.names.client, upasmail.service"],
                               user=NOBODY, group=NOBODY, extra_groups=[], env=nobody_env(),
                               cwd=cwd, capture_output=True, text=True, timeout=60)
        except OSError as e:
            tried.append("%s: %s" % (candidate, e))
            continue
        if r.returncode == 0:
            return candidate, tried
        tried.append("%s: %s" % (candidate, (r.stderr.strip().splitlines() or ["?"])[-1]))
    return None, tried


def _reachable_copy():
    """Our code and this interpreter's packages copied under a 0755 directory."""
    top = tempfile.mkdtemp(prefix="upasmail-privdrop-src-")
    os.chmod(top, 0o755)
    atexit.register(shutil.rmtree, top, True)
    ours, packages = os.path.join(top, "src"), os.path.join(top, "site-packages")
    for part in ("upasmail", os.path.join("twisted", "plugins")):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(ours, part),
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PYTHONPATH[1], packages, ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(top):
        os.chmod(d, 0o755)
        for name in files:
            os.chmod(os.path.join(d, name), 0o644 | os.stat(os.path.join(d, name)).st_mode)
    return [ours, packages]


@pytest.fixture
def world():
    """A fresh directory under /tmp that nobody can reach (pytest's
    tmp_path is under a 0700 directory), with root's config files in it."""
    need_root()
    base = tempfile.mkdtemp(prefix="upasmail-privdrop-")
    os.chmod(base, 0o755)
    etc = os.path.join(base, "etc")
    os.mkdir(etc, 0o755)
    files = {"smtpd.conf": ("ournets 127.0.0.1\n", 0o644),
             "blocked": ("*block example.org!spammer\n", 0o644),
             # plaintext (CRAM-MD5 needs it): readable by root and the run group only
             "passwd": ("alice:%s\n" % PASSWORD, 0o640)}
    for name, (text, mode) in files.items():
        path = os.path.join(etc, name)
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, 0, NOBODY)
        os.chmod(path, mode)
    yield base
    if not os.environ.get("KEEP"):
        shutil.rmtree(base, ignore_errors=True)


def make_mailbox(root, user):
    """``install -d -o nobody -g nogroup`` for the root, box/ and box/<user>/."""
    for d in (root, os.path.join(root, "box"), os.path.join(root, "box", user)):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chown(d, NOBODY, NOBODY)


class DroppedServer(Server):
    """``twistd -n --uid 65534 --gid 65534 upas-smtpd`` started as root."""

    def __init__(self, base, *args, python=None, mailboxes=()):
        self.root = os.path.join(base, "mail")
        etc = os.path.join(base, "etc")
        for user in mailboxes:  # as an administrator would: owned by the run user
            make_mailbox(self.root, user)
        self.log = open(os.path.join(base, "twistd.log"), "w+")
        run = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        self.proc = subprocess.Popen(
            [python or sys.executable, "-c", run, "-n", "--pidfile=",
             "--uid", str(NOBODY), "--gid", str(NOBODY), "upas-smtpd",
             "--listen", "tcp:0:interface=127.0.0.1", "--root", self.root,
             "--sysname", "gnot.example.org", "--conf", os.path.join(etc, "smtpd.conf"),
             "--blocked", os.path.join(etc, "blocked"), "--passwd", os.path.join(etc, "passwd"),
             "--tarpit-unit", "0", *args],
            env=nobody_env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=base)
        self.port = self._port()

    def ids(self, pid=None):
        """The (real, effective, saved, fs) uids and gids of the process, once
        it has switched: the port is logged as it is bound, before the switch."""
        deadline = time.monotonic() + 10
        while True:
            with open("/proc/%d/status" % (pid or self.proc.pid)) as f:
                status = f.read()
            ids = tuple(tuple(int(x) for x in re.search(r"^%s:\s+(.*)$" % key, status, re.M)
                              .group(1).split()) for key in ("Uid", "Gid"))
            if 0 not in ids[0] or time.monotonic() > deadline:
                return ids
            time.sleep(0.01)


def owners(top):
    """Every directory and file under ``top`` with its (uid, gid)."""
    found = {}
    for d, dirs, files in os.walk(top):
        for name in [""] + dirs + files:
            st = os.lstat(os.path.join(d, name))
            found[os.path.relpath(os.path.join(d, name), top)] = (st.st_uid, st.st_gid)
    return found


def untrusted(port):
    return smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0),
                        local_hostname="client.sender.net")


def test_switches_user_delivers_queues_and_reloads(world, dns_port):  # noqa: F811
    python = python_for_nobody(world)
    s = DroppedServer(world, "--resolver", "127.0.0.1:%d" % dns_port, "-d", "-g",
                      "--mx-port", "1", python=python, mailboxes=("bob",))
    try:
        assert s.ids() == ((NOBODY,) * 4, (NOBODY,) * 4)
        with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.example.net") as c:
            assert c.login("alice", PASSWORD)[0] == 235  # CRAM-MD5: root's file, read as nobody
            assert c.sendmail("alice@example.org", ["bob"], b"Subject: dropped\r\n\r\nhi\r\n") == {}
        [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
        assert msg["Subject"] == "dropped"
        with untrusted(s.port) as c:
            c.ehlo()
            c.mail("spammer@example.org")
            c.rcpt("bob")  # the ratify list, read as nobody, blocks it
            assert c.data(b"Subject: x\r\n\r\nhi\r\n") == (554, b"5.7.1 we believe this is spam.")
            c.rset()
            c.mail("alice@example.org")
            assert c.rcpt("x@far.example")[0] == 550  # 127.0.0.2 is not in ournets
        c = untrusted(s.port)  # -g: the greylist's files are written as nobody
        c.ehlo()
        c.mail("alice@example.org")
        c.rcpt("bob")
        assert c.docmd("DATA") == (451, b"please try again soon from the same IP.")
        c.close()
        with open(os.path.join(world, "etc", "smtpd.conf"), "w") as f:
            f.write("ournets 127.0.0.0/8\n")
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for("settings reloaded")
        with untrusted(s.port) as c:  # trusted now: the relayed message is queued
            assert c.sendmail("alice@example.org", ["x@far.example"],
                              b"Subject: relayed\r\n\r\nhi\r\n") == {}
        # the queue runner tried it (nothing listens on --mx-port 1) and wrote its envelope
        s.wait_for("status=deferred")
        # a re-read file the run user cannot read: the reload keeps what runs
        os.chmod(os.path.join(world, "etc", "smtpd.conf"), 0o600)
        s.proc.send_signal(signal.SIGHUP)
        s.wait_for("smtpd.conf: cannot read: Permission denied; keeping the running settings")
        with untrusted(s.port) as c:
            c.ehlo()
            c.mail("alice@example.org")
            assert c.rcpt("y@far.example")[0] == 250
        assert s.proc.poll() is None
        assert "Traceback" not in s.output() and "chmod 600" not in s.output()
    finally:
        s.stop()
    made = owners(s.root)
    assert {"tmp", "box", "queue", "routing.json", "log", "log/smtpdb", "grey"} <= set(made)
    assert [p for p, ids in made.items() if ids != (NOBODY, NOBODY)] == []
    assert any(p.startswith("queue/") and p.endswith(".env") for p in made)


def test_workers_are_the_run_user_and_deliver(world, dns_port):  # noqa: F811
    python = python_for_nobody(world)
    s = DroppedServer(world, "--resolver", "127.0.0.1:%d" % dns_port, "--workers", "2",
                      "--no-queue-runner", python=python)
    try:
        s.wait_for("worker 1 started")
        made = owners(s.root)  # all of it made by the server, as root, before the switch
        assert sorted(made) == [".", "box", "queue", "routing.json", "tmp"]
        assert set(made.values()) == {(NOBODY, NOBODY)}
        make_mailbox(s.root, "bob")
        [pid] = re.findall(r"worker 1 started \(pid (\d+)\)", s.output())
        for n in range(8):  # the kernel spreads them over both processes
            with smtplib.SMTP("127.0.0.1", s.port) as c:
                assert c.sendmail("alice@example.org", ["bob"], b"Subject: m%d\r\n\r\nx\r\n" % n) == {}
        assert s.ids(int(pid)) == ((NOBODY,) * 4, (NOBODY,) * 4)
        assert s.proc.poll() is None
        assert "died" not in s.output()
    finally:
        s.stop()
    assert sorted(m["Subject"] for m in mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))) \
        == ["m%d" % n for n in range(8)]


def run_failing(world, *args, python):
    run = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    return subprocess.run(
        [python, "-c", run, "-n", "--pidfile=", "--uid", str(NOBODY), "--gid", str(NOBODY),
         "upas-smtpd", "--listen", "tcp:0:interface=127.0.0.1", *args],
        env=nobody_env(), cwd=world, capture_output=True, text=True, timeout=60)


def test_mail_root_the_run_user_cannot_write(world):
    python = python_for_nobody(world)
    root = os.path.join(world, "mail")
    os.mkdir(root, 0o755)  # root's, as an administrator might have left it
    r = run_failing(world, "--root", root, python=python)
    assert one_line(r) == (
        "upas-smtpd: mail root %s is not writable by nobody (uid 65534, group nogroup); "
        "make it (and what is in it) the run user's, e.g. chown -R" % root)


def test_python_the_run_user_cannot_read(world):
    need_root()
    library = os.path.dirname(os.__file__)
    if os.access(library, os.R_OK | os.X_OK, effective_ids=True) and nobody_can_list(library):
        pytest.skip("nobody can read this Python's library (%s)" % library)
    r = run_failing(world, "--root", os.path.join(world, "mail"), python=sys.executable)
    assert one_line(r) == (
        "upas-smtpd: Python's library %s is not readable by nobody (uid 65534, group "
        "nogroup): modules imported after start-up would fail; run a Python installed "
        "where that user can read it" % library)


def nobody_can_list(directory):
    r = subprocess.run(["ls", directory], user=NOBODY, group=NOBODY, extra_groups=[],
                       capture_output=True)
    return r.returncode == 0


def one_line(r):
    """The run failed with one ``upas-smtpd:`` line and no traceback; that line."""
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    [line] = [line for line in out.splitlines() if "upas-smtpd:" in line]
    return line[line.index("upas-smtpd:"):]


# -- the pieces, without root ---------------------------------------------------

def test_run_user_as_twistd_decides():
    assert privileges.run_user(None) is None
    assert privileges.run_user({"uid": None, "gid": None}) is None
    me = pwd.getpwuid(os.getuid())
    assert privileges.run_user({"uid": me.pw_uid, "gid": None}) == privileges.RunUser(
        me.pw_uid, me.pw_gid)
    assert privileges.run_user({"uid": None, "gid": 5}) == privileges.RunUser(None, 5)


def test_not_yet_there_lists_missing_parents_once(tmp_path):
    (tmp_path / "mail").mkdir()
    paths = [tmp_path / "mail" / "tmp", tmp_path / "a" / "b" / "c", tmp_path / "a" / "d",
             tmp_path / "mail"]
    assert privileges.not_yet_there(paths) == [
        str(tmp_path / "mail" / "tmp"), str(tmp_path / "a" / "b" / "c"),
        str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path / "a" / "d")]


def make_needs(tmp_path, **kw):
    root = tmp_path / "mail"
    for d in ("tmp", "box/bob", "queue", "lib"):
        (root / d).mkdir(parents=True)
    (root / "lib" / "aliases").write_text("postmaster: bob\n")
    s = merge(SmtpdConf(), root=str(root), **kw)
    return privileges.needs(s, conf=str(tmp_path / "smtpd.conf"))


def test_needs_first_problem_names_the_path(tmp_path):
    needs = make_needs(tmp_path)
    user = privileges.RunUser(NOBODY, NOBODY)
    root = str(tmp_path / "mail")
    assert needs.problem(user, can=lambda path, mode: True) is None
    assert needs.problem(user, can=lambda path, mode: path != root + "/queue").startswith(
        "mail root directory %s/queue is not writable by nobody" % root)
    (tmp_path / "smtpd.conf").write_text("")
    assert needs.problem(user, can=lambda path, mode: not path.endswith("conf")) == (
        "%s is not readable by nobody (uid 65534, group nogroup): it is read again on "
        "SIGHUP; make it readable by that user or its group" % (tmp_path / "smtpd.conf"))
    lib = root + "/lib/aliases"
    assert lib in needs.problem(user, can=lambda path, mode: path != lib)
    # a file that is not there is not a problem (it may come later)
    assert needs.problem(user, can=lambda path, mode: "users" not in path) is None


def test_mailbox_directories_the_run_user_cannot_write(tmp_path):
    needs = make_needs(tmp_path)
    user = privileges.RunUser(NOBODY, NOBODY)
    box = str(tmp_path / "mail" / "box" / "bob")
    assert needs.mailbox_problems(user, can=lambda path, mode: path != box) == [
        "%s is not writable by nobody (uid 65534, group nogroup): mail to bob gets 451" % box]
    assert needs.mailbox_problems(user, can=lambda path, mode: True) == []


def test_password_file_in_the_run_group_is_not_exposed():
    from upasmail.passwd import exposed

    def st(mode, gid):
        return SimpleNamespace(st_mode=0o100000 | mode, st_gid=gid)

    assert not exposed(st(0o600, 0), egid=NOBODY)
    assert not exposed(st(0o640, NOBODY), egid=NOBODY)  # root:<run group> 640
    assert exposed(st(0o640, 0), egid=NOBODY)  # root's group: other users
    assert exposed(st(0o644, NOBODY), egid=NOBODY)  # everyone


# -- socket activation: systemd binds, the server never is root -----------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def activated(world, python, *args):
    """``systemd-socket-activate`` (systemd's socket unit, by hand) binds a
    port as root and starts, at the first connection, ``twistd upas-smtpd``
    as nobody (``setpriv``: systemd's ``User=``) on the socket it hands on.
    Gives the port and, once it is stopped, the output."""
    if not shutil.which("systemd-socket-activate") or not shutil.which("setpriv"):
        pytest.skip("needs systemd-socket-activate and setpriv")
    port = free_port()
    run = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    log = open(os.path.join(world, "activated.log"), "w+")
    proc = subprocess.Popen(
        # --fdname: systemd names every socket (LISTEN_FDNAMES); Twisted needs it
        ["systemd-socket-activate", "-l", "127.0.0.1:%d" % port, "--fdname=upas-smtpd.socket",
         "-E", "PYTHONPATH=" + nobody_env()["PYTHONPATH"],  # it passes on no other
         "setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
         python, "-c", run, "-n", "--pidfile=", "upas-smtpd",
         "--listen", "systemd:domain=INET:index=0", "--root", os.path.join(world, "mail"),
         "--sysname", "gnot.example.org", *args],
        env=nobody_env(), stdout=log, stderr=subprocess.STDOUT, cwd=world)
    run = SimpleNamespace(port=port, out=None)
    try:
        yield run
    finally:
        proc.terminate()
        proc.wait(30)
        log.seek(0)
        run.out = log.read()
        log.close()


def first_connection(port):
    """A connection to the activator once it listens: the server starts for it."""
    for _ in range(600):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise AssertionError("nothing listens on %d" % port)


def test_socket_activation_never_root(world):
    python = python_for_nobody(world)
    make_mailbox(os.path.join(world, "mail"), "bob")  # systemd's StateDirectory= does the root
    with activated(world, python) as run:
        first_connection(run.port).close()
        with smtplib.SMTP("127.0.0.1", run.port, timeout=30) as c:
            assert c.sendmail("alice@example.org", ["bob"], b"Subject: activated\r\n\r\nhi\r\n") == {}
        [msg] = mailbox.mbox(os.path.join(world, "mail", "box", "bob", "mbox"))
        assert msg["Subject"] == "activated"
        made = owners(os.path.join(world, "mail"))
        assert {"tmp", "queue", "routing.json"} <= set(made)
        assert set(made.values()) == {(NOBODY, NOBODY)}
    assert "Traceback" not in run.out


def test_socket_activation_refuses_workers(world):
    python = python_for_nobody(world)
    with activated(world, python, "--workers", "2") as run:
        with first_connection(run.port) as c:
            try:  # the server refused to start: no greeting
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
    assert ("upas-smtpd: --workers 2: the workers can share only a tcp: or ssl: listener, "
            "not systemd:domain=INET:index=0") in run.out
    assert "Traceback" not in run.out


def test_mail_root_error_names_the_user(world):
    python = python_for_nobody(world)
    with activated(world, python) as run:  # nobody cannot make <world>/mail
        with first_connection(run.port) as c:
            try:  # the server stopped at start-up: no greeting
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
    assert ("upas-smtpd: mail root %s/mail: permission denied: %s/mail; running as nobody "
            "(uid 65534, group nogroup)\n" % (world, world)) in run.out


def test_needs_covers_the_relay_auth_file(tmp_path):
    auth = tmp_path / "relay-auth"
    auth.write_text("relay.example.net alice pw\n")
    needs = make_needs(tmp_path, relay_auth_file=str(auth))
    problem = needs.problem(privileges.RunUser(NOBODY, NOBODY),
                            can=lambda path, mode: path != str(auth))
    assert problem.startswith("%s is not readable by nobody" % auth)


# -- examples/systemd -------------------------------------------------------------

UNITS = os.path.join(ROOT, "examples", "systemd")


def test_systemd_units_verify(tmp_path):
    """``systemd-analyze verify`` accepts every example unit, with the
    install path made this virtualenv's (verify wants the programs to exist)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("needs systemd-analyze")
    bindir = os.path.dirname(sys.executable)
    for program in ("twistd", "upas-runq", "upas-smtpd"):
        if not os.access(os.path.join(bindir, program), os.X_OK):
            pytest.skip("%s is not installed beside %s" % (program, sys.executable))
    names = sorted(os.listdir(UNITS))
    assert names == ["upas-runq.service", "upas-runq.timer", "upas-smtpd-root.service",
                     "upas-smtpd-stdio.socket", "upas-smtpd-stdio@.service",
                     "upas-smtpd.service", "upas-smtpd.socket"]
    for name in names:
        with open(os.path.join(UNITS, name)) as f:
            (tmp_path / name).write_text(f.read().replace("/opt/upasmail/bin", bindir))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        *[str(tmp_path / n) for n in names]],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_systemd_units_say_what_operations_rst_says():
    def unit(name):
        with open(os.path.join(UNITS, name)) as f:
            return f.read()

    daemon, root = unit("upas-smtpd.service"), unit("upas-smtpd-root.service")
    assert "--listen systemd:domain=INET:index=0" in daemon
    assert "ListenStream=0.0.0.0:25" in unit("upas-smtpd.socket")  # INET, as --listen says
    assert "--uid upasmail --gid upasmail upas-smtpd" in root
    for text in (daemon, root):
        assert "twistd -n --pidfile= " in text  # no pid file
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text
        assert "Restart=on-failure" in text
        assert "ReadWritePaths=/var/spool/upasmail" in text
        assert "--root /var/spool/upasmail" in text
    assert "User=upasmail" in daemon and "User=" not in root.split("# The third way")[0]
    assert "OnUnitInactiveSec=" in unit("upas-runq.timer")


def test_created_at_startup(tmp_path):
    s = merge(SmtpdConf(), root=str(tmp_path / "mail"), debug=True,
              log_dir=str(tmp_path / "log"))
    made = privileges.created_at_startup(s, {"logfile": str(tmp_path / "twistd.log")})
    assert made == [str(tmp_path / "mail" / p) for p in ("tmp", "box", "queue", "routing.json")
                    ] + [str(tmp_path / "log" / "smtpdb"), str(tmp_path / "twistd.log")]
    # no -d, twistd logging to standard output
    assert len(privileges.created_at_startup(merge(SmtpdConf(), root="m"), {"logfile": "-"})) == 4


def test_mailbox_left_to_root_is_said_at_start_without_a_switch(world):
    """systemd's User=: no switch, and still a mailbox the user cannot write is logged."""
    python = python_for_nobody(world)
    make_mailbox(os.path.join(world, "mail"), "bob")
    os.makedirs(os.path.join(world, "mail", "box", "carol"), mode=0o755)  # root's
    with activated(world, python) as run:
        first_connection(run.port).close()
        with smtplib.SMTP("127.0.0.1", run.port, timeout=30) as c:
            c.ehlo()
    assert ("%s/mail/box/carol is not writable by nobody (uid 65534, group nogroup): mail to "
            "carol gets 451" % world) in run.out
    assert "box/bob" not in run.out


def test_needs_covers_an_ssl_listeners_files_for_workers(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("")
    listen = "ssl:465:privateKey=%s:certKey=%s" % (key, key)
    root = str(tmp_path / "mail")
    s = merge(SmtpdConf(), root=root)
    assert privileges.endpoint_files(listen) == [str(key), str(key)]

    def unreadable_key(path, mode):
        return path != str(key)

    user = privileges.RunUser(NOBODY, NOBODY)
    assert privileges.needs(s, workers=1, listen=listen).problem(user, unreadable_key) is None
    assert privileges.needs(s, workers=2, listen=listen).problem(user, unreadable_key) == (
        "%s is not readable by nobody (uid 65534, group nogroup): it is read again by each "
        "worker process; make it readable by that user or its group" % key)
