"""Crash recovery and lock isolation of local mailboxes (issue 13, items 1 and 2).

The end-to-end tests kill a real ``twistd upas-smtpd`` with SIGKILL at the
named crash point ``mbox.mid-append`` (``UPASMAIL_CRASH_AT``), so they hold
for any store that keeps the mbox format and its locks.
"""

import fcntl
import mailbox
import os
import smtplib
import subprocess
import sys
import threading
import time

from twisted.internet import defer, task
from twisted.trial import unittest

from test_twistd import ROOT, env, server, dns_port  # noqa: F401 (fixtures)
from upasmail import mbox, store
from upasmail.session import Transaction
from upasmail.testing import run_now

BIG = 1024 * 1024  # well past mbox.CHUNK: the crash point is reached


def stream(subject, size=0):
    return (b"From example.org!alice Wed Mar  7 23:47:45 -0400 2024 remote from \n"
            b"Subject: %s\n\n" % subject.encode() + (b"b" * 99 + b"\n") * (size // 100)
            + b"end\n")


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def crash_mid_append(mbox_path, stream_path):
    """mbox.append in a child process that SIGKILLs itself mid-append."""
    e = env()
    e["UPASMAIL_CRASH_AT"] = "mbox.mid-append"
    r = subprocess.run([sys.executable, "-c", "import sys; from upasmail import mbox; "
                        "mbox.append(sys.argv[1], sys.argv[2])", mbox_path, stream_path],
                       env=e, timeout=60)
    assert r.returncode == -9, r


class HeldLock:
    """The fcntl lock and a dot-lock naming ``pid``, as another program holds them."""

    def __init__(self, path, pid):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        write(path + ".lock", b"%d\n" % pid)

    def release(self):
        os.unlink(self.path + ".lock")
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# -- the decisions ------------------------------------------------------------

class DecisionTests(unittest.TestCase):
    mine = (100, "gnot", "t0")
    record = mbox.Record(dev=1, ino=2, offset=1000, done=1000, upto=5000, head=b"From a x\nSub")

    def test_lock_format_round_trip(self):
        data = mbox.lock_header(*self.mine) + mbox.record_line(self.record)
        info = mbox.parse_lock(data)
        self.assertEqual(info, mbox.LockInfo(100, "gnot", "t0", self.record))
        self.assertEqual(data.split(b"\n")[0], b"100")  # liblockfile reads the pid there

    def test_foreign_formats(self):
        self.assertEqual(mbox.parse_lock(b""), mbox.LockInfo(None, None, None, None))
        self.assertEqual(mbox.parse_lock(b"4242\n"), mbox.LockInfo(4242, None, None, None))
        self.assertEqual(mbox.parse_lock(b"4242\nupasmail h t\nappend 1 2 x\n"),
                         mbox.LockInfo(4242, "h", "t", None))

    def test_stale_reasons(self):
        def reason(data, age=0, alive=True):
            return mbox.stale_reason(mbox.parse_lock(data), age, alive, self.mine)

        self.assertIsNone(reason(b"55\n"))
        self.assertEqual(reason(b"55\n", alive=False), "process 55 no longer exists")
        self.assertEqual(reason(b"100\nupasmail gnot old\n"),
                         "left by an earlier run with our pid 100")
        self.assertIsNone(reason(b"100\nupasmail gnot t0\n"))  # another thread of ours
        # a pid from another host means nothing here: only the age counts
        self.assertIsNone(reason(b"55\nupasmail other t\n", alive=False))
        self.assertEqual(reason(b"", age=301), "not touched for 301 seconds")
        self.assertIsNone(reason(b"", age=299))

    def test_cutback(self):
        r = self.record

        def decide(dev=1, ino=2, size=5000, head=b"From a x\nSub"):
            return mbox.cutback(r, dev, ino, size, head)

        self.assertEqual(decide(), (True, "cut back 4000 bytes of a partial message to size 1000"))
        self.assertTrue(decide(size=1004, head=b"From").cut)
        self.assertIn("another inode", decide(ino=3).why)
        self.assertEqual(decide(size=1000, head=b""), (False, "no part of the message was written"))
        self.assertIn("changed by another program", decide(size=5001).why)
        self.assertIn("changed by another program", decide(size=900).why)
        self.assertIn("not the interrupted message", decide(head=b"From b y\nSub").why)


# -- stale locks and partial messages, below the server ------------------------

class RecoveryTests(unittest.TestCase):
    def setUp(self):
        self.root = store.MailRoot(self.mktemp(), run_now, task.Clock())
        self.root.prepare()
        self.path = self.root.mailbox_path("bob")
        os.makedirs(os.path.dirname(self.path))
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.small = write(os.path.join(self.tmp, "small"), stream("kept"))
        self.big = write(os.path.join(self.tmp, "big"), stream("partial", BIG))
        mbox.append(self.path, self.small)
        self.kept = os.path.getsize(self.path)

    def assert_only_kept(self):
        msgs = list(mailbox.mbox(self.path))
        self.assertEqual([m["Subject"] for m in msgs], ["kept"])
        self.assertEqual(msgs[0].get_payload(), "end\n")

    def test_crash_leaves_lock_and_partial_message(self):
        crash_mid_append(self.path, self.big)
        self.assertTrue(os.path.exists(self.path + ".lock"))
        self.assertGreater(os.path.getsize(self.path), self.kept)

    def test_next_append_breaks_the_lock_and_cuts_back(self):
        crash_mid_append(self.path, self.big)
        notes = []
        mbox.append(self.path, self.small, notes)
        self.assertEqual(os.path.getsize(self.path), 2 * self.kept)
        self.assertEqual([m["Subject"] for m in mailbox.mbox(self.path)], ["kept", "kept"])
        self.assertIn("interrupted append: cut back", notes[0])
        self.assertRegex(notes[1], r"broke a stale lock: process \d+ no longer exists")

    def test_startup_cuts_back(self):
        crash_mid_append(self.path, self.big)
        logged = []
        self.patch(store.log, "observer", logged.append)
        self.root.prepare()
        self.assertFalse(os.path.exists(self.path + ".lock"))
        self.assert_only_kept()
        self.assertIn("cut back", logged[0]["note"])
        self.assertIn("broke a stale lock", logged[1]["note"])

    def test_mailbox_changed_since_is_left_alone(self):
        crash_mid_append(self.path, self.big)
        with open(self.path, "ab") as f:  # another program wrote after the crash
            f.write(b"\nFrom procmail Thu Mar  8 00:00:00 2024\nSubject: theirs\n\nx\n\n")
        size = os.path.getsize(self.path)
        notes = []
        mbox.recover(self.path, notes)
        self.assertEqual(os.path.getsize(self.path), size)
        self.assertIn("left alone: its size %d is not what the interrupted append left" % size,
                      notes[0])
        self.assertFalse(os.path.exists(self.path + ".lock"))

    def test_mailbox_replaced_since_is_left_alone(self):
        crash_mid_append(self.path, self.big)
        with open(self.path, "rb") as f:
            data = f.read()
        # a mail reader rewrote it as readers do: a new file renamed over the old
        os.rename(write(self.path + ".new", data), self.path)
        notes = []
        mbox.recover(self.path, notes)
        self.assertEqual(os.path.getsize(self.path), len(data))
        self.assertIn("left alone: the mailbox was replaced since", notes[0])

    def test_lock_of_an_earlier_run_with_our_pid_is_stale(self):
        write(self.path + ".lock", mbox.lock_header(os.getpid(), os.uname().nodename, "old"))
        notes = []
        mbox.append(self.path, self.small, notes)
        self.assertIn("earlier run with our pid", notes[0])

    def test_live_holder_is_left_alone_at_startup(self):
        write(self.path + ".lock", b"%d\n" % os.getppid())
        self.root.prepare()
        self.assertTrue(os.path.exists(self.path + ".lock"))
        self.assertRaises(mbox.Busy, mbox.append, self.path, self.small)
        os.unlink(self.path + ".lock")


# -- a held mailbox delays only its own mail, and holds no thread --------------

class CountingRunner:
    """run_blocking that runs at once and counts the calls per function."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        name = getattr(f, "__name__", "")
        if name == "_write_batch":  # the mailboxes it tries
            self.calls.extend(job[1] for job in args[0] if job[0] == "mbox")
        elif name != "_sync_batch":
            self.calls.append(args[0] if f is mbox.append else f.__name__)
        return defer.maybeDeferred(f, *args)


class HeldMailboxTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.run = CountingRunner()
        self.root = store.MailRoot(self.mktemp(), self.run, self.clock)
        self.root.prepare()
        self.root.fsync = lambda paths: None
        self.spool = write(os.path.join(self.root.tmp, "spool"), stream("held"))
        for user in ("bob", "alice"):
            os.makedirs(os.path.dirname(self.root.mailbox_path(user)))
        self.held = HeldLock(self.root.mailbox_path("bob"), os.getppid())

    def tearDown(self):
        if os.path.exists(self.held.path + ".lock"):
            self.held.release()

    def deliver(self, user):
        return self.root.deliver(self.spool, Transaction(
            "example.org!alice", (user,), (user,), (), "127.0.0.1", "h.example"))

    def test_other_mailboxes_go_at_once_and_one_try_at_a_time(self):
        bob = [self.deliver("bob") for _ in range(20)]
        # each try returned at once (no thread waits); the other 19 wait in the reactor
        self.assertEqual(self.run.calls, [self.held.path])
        self.assertNoResult(bob[0])
        self.successResultOf(self.deliver("alice"))
        self.assertEqual(len(mailbox.mbox(self.root.mailbox_path("alice"))), 1)
        del self.run.calls[:]
        self.clock.advance(store.LOCK_RETRY)
        self.assertEqual(self.run.calls, [self.held.path])
        self.clock.pump([store.LOCK_RETRY_MAX] * 5)
        self.assertEqual(len(self.run.calls), 6)
        self.held.release()
        self.clock.advance(store.LOCK_RETRY_MAX)
        for d in bob:
            self.successResultOf(d)
        self.assertEqual(len(mailbox.mbox(self.held.path)), 20)
        self.assertEqual(self.root._mailboxes, {})

    def test_directories_made_by_a_busy_try_are_synced(self):
        os.makedirs(os.path.join(self.root.boxes, "carol"))
        write(self.root.mailbox_path("carol") + ".lock", b"%d\n" % os.getppid())
        synced = []
        self.root.fsync = synced.extend
        d = self.deliver("carol")
        os.unlink(self.root.mailbox_path("carol") + ".lock")
        self.clock.advance(store.LOCK_RETRY)
        self.successResultOf(d)
        self.assertTrue(os.path.exists(self.root.mailbox_path("carol")))
        # the first try made the mbox: its directory entry must reach the disk
        self.assertIn(os.path.join(self.root.boxes, "carol"), synced)

    def test_gives_up_after_the_lock_timeout(self):
        first, second = self.deliver("bob"), self.deliver("bob")
        self.clock.pump([store.LOCK_RETRY_MAX] * int(store.LOCK_TIMEOUT - 1))
        self.assertNoResult(first)
        self.clock.advance(store.LOCK_RETRY_MAX)
        self.failureResultOf(first, mbox.Busy)
        self.failureResultOf(second, mbox.Busy)  # it waited as long: one try, then 451
        self.assertEqual(os.path.getsize(self.held.path), 0)


    def test_gives_up_with_the_reason_in_the_failure(self):
        d = self.deliver("bob")
        self.clock.pump([store.LOCK_RETRY_MAX] * int(store.LOCK_TIMEOUT + 1))
        failure = self.failureResultOf(d, mbox.Busy)
        # delivery logs this one line with its session and queue ids
        self.assertIn("locked by another program for 30 s", failure.getErrorMessage())

    def test_a_link_or_fifo_in_a_mailbox_place_is_not_followed(self):
        target = os.path.abspath(self.mktemp())
        write(target, b"precious\n")
        os.makedirs(os.path.join(self.root.boxes, "eve"))
        os.symlink(target, self.root.mailbox_path("eve"))
        self.failureResultOf(self.deliver("eve"), OSError)
        self.assertEqual(open(target, "rb").read(), b"precious\n")
        os.makedirs(os.path.join(self.root.boxes, "fifo"))
        os.mkfifo(self.root.mailbox_path("fifo"))
        failure = self.failureResultOf(self.deliver("fifo"), OSError)  # at once, no blocked thread
        self.assertIn("not a regular file", failure.getErrorMessage())

    def test_a_forged_lock_cannot_cut_back_a_linked_file(self):
        target = os.path.abspath(self.mktemp())
        write(target, b"From x\n" * 100)
        os.makedirs(os.path.join(self.root.boxes, "eve"))
        os.symlink(target, self.root.mailbox_path("eve"))
        st = os.stat(target)
        forged = mbox.Record(st.st_dev, st.st_ino, 21, 21, 700, b"From x\n")
        write(self.root.mailbox_path("eve") + ".lock",
              mbox.lock_header(999999, os.uname().nodename, "x") + mbox.record_line(forged))
        self.failureResultOf(self.deliver("eve"), OSError)
        self.assertEqual(os.path.getsize(target), 700)


# -- a real server, killed ------------------------------------------------------

def body(subject, size=0):
    return (b"Subject: %s\r\n\r\nfirst line\r\n" % subject.encode()
            + (b"z" * 98 + b"\r\n") * (size // 100) + b"end\r\n")


def send(port, rcpt, data):
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net") as c:
        c.ehlo()
        c.mail("alice@example.org")
        c.rcpt(rcpt)
        return c.data(data)


def test_kill_9_mid_append_then_restart(server, monkeypatch, tmp_path):
    os.makedirs(tmp_path / "mail" / "box" / "bob")
    monkeypatch.setenv("UPASMAIL_CRASH_AT", "mbox.mid-append")
    s = server()
    for i in range(3):
        assert send(s.port, "bob", body("kept %d" % i, 1000))[0] == 250
    path = os.path.join(s.root, "box", "bob", "mbox")
    kept = os.path.getsize(path)
    try:
        send(s.port, "bob", body("cut", BIG))
        raise AssertionError("the server did not crash")
    except smtplib.SMTPServerDisconnected:
        pass
    assert s.proc.wait(30) == -9
    assert os.path.getsize(path) > kept and os.path.exists(path + ".lock")

    monkeypatch.delenv("UPASMAIL_CRASH_AT")
    s = server()
    start = time.monotonic()
    assert send(s.port, "bob", body("after", 10))[0] == 250
    assert time.monotonic() - start < 5  # no wait for the old lock
    msgs = list(mailbox.mbox(path))
    assert [m["Subject"] for m in msgs] == ["kept 0", "kept 1", "kept 2", "after"]
    assert all(m.get_payload() == "first line\n" + ("z" * 98 + "\n") * 10 + "end\n"
               for m in msgs[:3])
    out = s.output()
    assert "box/bob/mbox: interrupted append: cut back" in out
    assert "box/bob/mbox.lock: broke a stale lock: process" in out


def test_mailbox_held_by_another_program_delays_only_its_mail(server, tmp_path):
    box = tmp_path / "mail" / "box"
    for user in ("bob", "alice"):
        os.makedirs(box / user)
    held = HeldLock(str(box / "bob" / "mbox"), os.getpid())
    s = server()
    n = 12  # more than the reactor's 10 pool threads
    results = []
    # larger than a spool kept in memory, so each waiting message is a file in tmp/
    big = body("b", 300 * 1024)
    clients = [threading.Thread(target=lambda: results.append(send(s.port, "bob", big)))
               for _ in range(n)]
    for t in clients:
        t.start()
    try:
        tmp = os.path.join(s.root, "tmp")
        for _ in range(600):  # until every message to bob is in, waiting for the mailbox
            names = os.listdir(tmp)
            done = 0
            for name in names:
                try:
                    with open(os.path.join(tmp, name), "rb") as f:
                        done += f.read().endswith(b"\nend\n")
                except FileNotFoundError:
                    pass
            if done == n:
                break
            time.sleep(0.05)
        assert done == n and results == []
        start = time.monotonic()
        assert send(s.port, "alice", body("a"))[0] == 250
        assert time.monotonic() - start < 3
        assert results == []  # bob's mailbox is still held
    finally:
        held.release()
        for t in clients:
            t.join(60)
    assert [code for code, _ in results] == [250] * n
    assert len(mailbox.mbox(str(box / "bob" / "mbox"))) == n
