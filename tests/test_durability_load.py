"""Durability under load (issue 14): ``kill -9`` a busy real server, restart it,
and account for every message.

Black-box on purpose: it knows the product only as ``twistd upas-smtpd``, its
mail root (``box/<user>/mbox`` read with Python's ``mailbox``, ``queue/<id>.env``
and ``.msg``) and SMTP, so it holds whatever the acceptance path and the queue
become inside.  Several clients send at once (small and large bodies, several
mailboxes per message, relayed mail into the queue) so that batches of
commits and appends are in flight when the server dies.

The promise checked: a message that got its 250 after the final dot is found
complete, exactly once, in every mailbox (or queue job) it was for, after the
restart's recovery; any other message is found at most once and complete, and
only if its final dot was sent; the mailboxes parse cleanly and no lock is
left behind.

``kill -9`` leaves the kernel's page cache alone, so it cannot tell a
server that fsyncs from one that does not.  The power-cut case can: the
killed server runs with ``tests/powercut`` on its PYTHONPATH, whose
``sitecustomize`` logs every ``os.fsync``/``os.fdatasync``, and the test
then takes away what was never synced (file tails, directory entries) before
the restart.  A store that makes data durable another way (``O_SYNC``,
``O_DSYNC``, ``syncfs``) must be taught to that hook.  After a power cut an
unacknowledged message may remain cut short in a mailbox (the mbox's own
recovery record is not synced); everything else is checked as above.
"""

import collections
import hashlib
import json
import mailbox
import os
import random
import re
import signal
import smtplib
import threading
import time

import pytest

from test_twistd import server, dns_port  # noqa: F401 (fixtures)

USERS = ("bob", "carol", "dave", "erin")
REMOTE = "x@far.example"  # relayed: 127.0.0.1 is trusted, so it goes to the queue
CLIENTS = 8
BIG = 300 * 1024  # past the store's 256 KiB write chunk: appends are in flight a while
SENDER = "alice@example.org"
DEADLINE = 20.0  # seconds any one wait may take; normally far less
# (share of messages, recipients)
SHAPES = ((40, ("bob",)), (15, ("carol",)), (15, ("bob", "carol", "dave")),
          (10, ("dave", "erin")), (10, ("erin", REMOTE)), (10, (REMOTE,)))


def lines(mid, size):
    """The body's lines (no CRLF): checkable content of about ``size`` bytes.

    A dot line (stuffed on the wire) and a ``From `` line (escaped in the mbox)
    go through the protections on the way; every line names the message and
    its number, so a piece of another message or a repeated piece shows.
    """
    out = [b".dot line of " + mid, b"From the body of " + mid]
    filler = b" abcdefghijklmnopqrstuvwxyz0123456789" * 2
    n = 0
    total = 0
    while total < size:
        line = b"%s %06d%s" % (mid, n, filler)
        out.append(line)
        total += len(line) + 2
        n += 1
    out.append(b"end of " + mid)
    return out


def digest(data):
    return hashlib.sha256(data).hexdigest()


class Message:
    """One message as sent: its id, recipients, and its body as each store keeps it."""

    def __init__(self, mid, rcpts, size):
        self.mid = mid
        self.rcpts = rcpts
        self.size = size
        body = lines(mid.encode(), size)
        self.mbox_sum = digest(self.mbox_body(body))
        self.queue_sum = digest(b"".join(l + b"\n" for l in body))
        head = ("Subject: load %s\r\nX-Durability-Id: %s\r\nX-Body-SHA256: %s\r\n"
                "To: %s\r\n\r\n" % (mid, mid, self.queue_sum, ", ".join(rcpts))).encode()
        data = head + b"".join(l + b"\r\n" for l in body)
        self.wire = data.replace(b"\r\n.", b"\r\n..") + b".\r\n"

    def mbox_body(self, body=None):
        """The body as the mbox keeps it: LF lines, unstuffed, From_ escaped
        (mboxrd); the queue's mailer stream keeps them unescaped."""
        body = body or lines(self.mid.encode(), self.size)
        return b"".join(b">" + l + b"\n" if l.startswith(b"From ") else l + b"\n" for l in body)


class Gone(Exception):
    """The server went away (killed): the client stops."""


class UnexpectedReply(Exception):
    """A reply other than the one the dialogue needs: the test fails on it."""


class Load:
    """``CLIENTS`` threads sending continuously until the server dies or ``stop``."""

    def __init__(self, port, big_from=0):
        self.port = port
        self.big_from = big_from  # acks before large bodies are sent at all
        self.cond = threading.Condition()
        self.messages = {}  # id -> Message, once its DATA began
        self.dotted = set()  # ids whose final dot was sent
        self.acked = set()  # ids that got 250 after the final dot
        self.errors = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True)
                        for n in range(CLIENTS)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(DEADLINE)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def wait_acks(self, n):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.acked) >= n or self.errors, DEADLINE)
        assert ok and not self.errors, "%d acks of %d wanted; errors: %s" % (
            len(self.acked), n, self.errors[:5])

    def send_one(self, m):
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.net",
                          timeout=DEADLINE) as c:
            self._expect(c.ehlo(), 250)
            self._send(c, m)

    def _client(self, n):
        rng = random.Random(n)
        shapes = [rcpts for share, rcpts in SHAPES for _ in range(share)]
        count = 0
        try:
            while not self.stopping.is_set():
                with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.net",
                                  timeout=DEADLINE) as c:
                    self._expect(c.ehlo(), 250)
                    for _ in range(rng.randint(1, 30)):
                        if self.stopping.is_set():
                            return
                        big = len(self.acked) >= self.big_from and rng.random() < 0.08
                        size = BIG if big else rng.randint(100, 4000)
                        self._send(c, Message("c%dm%d" % (n, count), rng.choice(shapes), size))
                        count += 1
                    c.quit()
        except (smtplib.SMTPServerDisconnected, ConnectionError, Gone):
            pass  # killed
        except Exception as e:  # noqa: BLE001 - reported by the test
            with self.cond:
                self.errors.append("client %d: %r" % (n, e))
                self.cond.notify_all()

    @staticmethod
    def _expect(reply, code):
        if reply[0] == -1:
            raise Gone()
        if reply[0] != code:
            raise UnexpectedReply(reply)

    def _send(self, c, m):
        self._expect(c.mail(SENDER), 250)
        for r in m.rcpts:
            self._expect(c.rcpt(r), 250)
        self._expect(c.docmd("DATA"), 354)
        with self.cond:
            self.messages[m.mid] = m
        c.send(m.wire)  # raises SMTPServerDisconnected unless all of it is sent
        with self.cond:
            self.dotted.add(m.mid)
        self._expect(c.getreply(), 250)
        with self.cond:
            self.acked.add(m.mid)
            self.cond.notify_all()


def body_of(raw):
    """(id, body) of a stored message: the id header, and what follows the header."""
    head, sep, body = raw.partition(b"\n\n")
    m = re.search(rb"^X-Durability-Id: (\S+)$", head, re.M)
    return (m.group(1).decode() if m else None), (body if sep else None)


class Audit:
    """What the mail root holds, against what the clients were told."""

    def __init__(self, root, load, partial_ok=False):
        self.root = root
        self.load = load
        # after a power cut the mbox's own recovery record may be lost with
        # it, so an unacknowledged message may stay cut short
        self.partial_ok = partial_ok
        self.problems = collections.defaultdict(list)
        self.found = collections.Counter()  # (id, mailbox or REMOTE) -> copies

    def note(self, kind, what):
        self.problems[kind].append(what)

    def run(self):
        for user in USERS:
            self.mbox(user)
        self.queue()
        self.locks()
        self.accounting()
        return self.problems

    def stored(self, where, mid, body, expected_sum):
        m = self.load.messages.get(mid)
        if m is None or body is None:
            self.note("corrupt or unknown (no id of ours, or no body)", (where, mid))
            return
        self.found[mid, where if where in USERS else REMOTE] += 1
        if (where if where in USERS else REMOTE) not in m.rcpts:
            self.note("misdelivered", (where, mid))
        if digest(body) != expected_sum(m) and not self.cut_short(m, where, body):
            self.note("corrupt (checksum)", (where, mid, len(body)))

    def cut_short(self, m, where, body):
        """An unacknowledged message a power cut left incomplete at the end of a mailbox."""
        return (self.partial_ok and m.mid not in self.load.acked and where in USERS
                and m.mbox_body().startswith(body))

    def mbox(self, user):
        path = os.path.join(self.root, "box", user, "mbox")
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.startswith(b"From "):
            self.note("mbox does not start with a From line", (user, data[:60]))
        if data and not data.endswith(b"\n\n"):
            self.note("mbox does not end with a whole message", (user, data[-60:]))
        box = mailbox.mbox(path, create=False)
        try:
            keys = box.keys()
            starts = len(re.findall(rb"^From ", data, re.M))
            if starts != len(keys):
                self.note("From lines and parsed messages differ", (user, starts, len(keys)))
            for key in keys:
                mid, body = body_of(box.get_bytes(key))
                if not box.get_file(key, from_=True).readline().startswith(
                        b"From %s " % SENDER.encode()):
                    self.note("bad From line", (user, mid))
                self.stored(user, mid, body, lambda m: m.mbox_sum)
        finally:
            box.close()

    def queue(self):
        queue = os.path.join(self.root, "queue")
        names = set(os.listdir(queue)) if os.path.isdir(queue) else set()
        for name in sorted(n for n in names if n.endswith(".env")):
            job = name[:-4]
            if job + ".msg" not in names:
                self.note("queue job without its .msg", job)
                continue
            with open(os.path.join(queue, name)) as f:
                try:
                    envelope = json.dumps(json.load(f))
                except ValueError:
                    self.note("queue envelope not JSON", job)
                    continue
            with open(os.path.join(queue, job + ".msg"), "rb") as f:
                data = f.read()
            first, _, rest = data.partition(b"\n")
            if not first.startswith(b"From "):
                self.note("queue .msg does not start with a From line", job)
            mid, body = body_of(rest)
            if mid and mid in self.load.messages and REMOTE.split("@")[1] not in envelope:
                self.note("queue envelope without the recipient", (job, mid))
            self.stored("queue:" + job, mid, body, lambda m: m.queue_sum)

    def locks(self):
        for dirpath, _, files in os.walk(os.path.join(self.root, "box")):
            for name in files:
                if name.endswith(".lock"):
                    self.note("lock left", os.path.join(dirpath, name))

    def accounting(self):
        load = self.load
        for mid, m in sorted(load.messages.items()):
            for where in m.rcpts:
                copies = self.found[mid, where]
                if mid in load.acked and copies == 0:
                    self.note("acknowledged but missing", (mid, where))
                if copies > 1:
                    self.note("duplicated" + (" (acknowledged)" if mid in load.acked else ""),
                              (mid, where, copies))
                if copies and mid not in load.dotted:
                    self.note("stored without its final dot", (mid, where))


def report(problems, load, logs):
    """The failure message: each kind of problem with the ids it concerns."""
    out = ["%d messages begun, %d final dots sent, %d acknowledged"
           % (len(load.messages), len(load.dotted), len(load.acked))]
    for kind, items in sorted(problems.items()):
        out.append("%s: %d, e.g. %s" % (kind, len(items), items[:10]))
    for name, text in logs:
        out.append("--- %s server's log (last lines) ---" % name)
        out.extend(text.splitlines()[-25:])
    return "\n".join(out)


# -- how the server dies ---------------------------------------------------------

def state(pid):
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            # the fields after the command name, which may hold spaces
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def running(pid):
    st = state(pid)
    return st is not None and st[0] != "Z"  # a zombie holds no file or lock


def family(pid):
    """``pid`` and its running descendants: a server may run worker
    processes, and a crash takes all of them (each killed by its own pid)."""
    children = collections.defaultdict(list)
    for name in filter(str.isdigit, os.listdir("/proc")):
        st = state(name)
        if st is not None and st[0] != "Z":
            children[st[1]].append(int(name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children[p])
    return found


def kill(s, pids=None):
    """kill -9 the server's processes; return when none is left running."""
    pids = family(s.proc.pid) if pids is None else pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert s.proc.wait(DEADLINE) == -signal.SIGKILL, s.output()[-3000:]
    deadline = time.monotonic() + DEADLINE
    while any(map(running, pids[1:])):
        assert time.monotonic() < deadline, "server processes survived kill -9"
        time.sleep(0.01)


def after_acks(n):
    def moment(s, load):
        load.wait_acks(n)
        kill(s)
    return moment


def while_a_mailbox_is_locked(s, load):
    load.wait_acks(150)
    locks = [os.path.join(s.root, "box", user, "mbox.lock") for user in USERS]
    deadline = time.monotonic() + DEADLINE
    # the documented dot-lock in the mail root: an append is in progress
    while not any(map(os.path.exists, locks)):
        assert time.monotonic() < deadline, "no mailbox lock seen"
        time.sleep(0.0002)  # lets the clients' threads run
    kill(s)


def at_crash_point(s, load):
    """The first large append kills its process; the rest of the server goes too."""
    load.wait_acks(load.big_from)
    pids = family(s.proc.pid)
    deadline = time.monotonic() + DEADLINE
    while s.proc.poll() is None and all(map(running, pids[1:])):
        assert time.monotonic() < deadline, "the crash point was not reached"
        time.sleep(0.01)
    kill(s, pids)


def power_cut(root, fsync_log):
    """Take from the killed server's mail root what a power cut would: the
    bytes of each file past its last fsync, and each name its directory's
    last fsync did not hold (``tests/powercut`` logged the fsyncs)."""
    # Several batches fsync at once, so their lines come in any order: what
    # is durable is the most any fsync covered (files only grow; a name once
    # synced in its directory is never reused), not what the last line says.
    last = {}
    if os.path.exists(fsync_log):
        with open(fsync_log) as f:
            for line in f:
                dev, ino, size, names = json.loads(line)
                size0, names0 = last.get((dev, ino), (0, frozenset()))
                last[dev, ino] = max(size, size0), names0.union(names or ())
    lost = []
    for d in [os.path.join(root, "box", user) for user in USERS] + [os.path.join(root, "queue")]:
        st = os.stat(d)  # the directories themselves: made before the server started
        kept = last.get((st.st_dev, st.st_ino), (0, frozenset()))[1]
        for name in os.listdir(d):
            path = os.path.join(d, name)
            # a lock's record never reached the disk: as good as no lock
            if name not in kept or name.endswith(".lock"):
                os.unlink(path)
                lost.append(name)
                continue
            st = os.stat(path)
            size = last.get((st.st_dev, st.st_ino), (0, None))[0]
            if st.st_size > size:
                os.truncate(path, size)
                lost.append("%s: %d of %d bytes" % (name, size, st.st_size))
    return lost


Moment = collections.namedtuple("Moment", "die big_from crash_at power_cut")
MOMENTS = {
    "kill-after-100-acks": Moment(after_acks(100), 0, None, False),
    "kill-while-a-mailbox-is-locked": Moment(while_a_mailbox_is_locked, 0, None, False),
    # large bodies wait until 150 acks are in, so the crash comes under load
    "crash-at-mbox-mid-append": Moment(at_crash_point, 150, "mbox.mid-append", False),
    # kill -9, then what was never fsynced is taken away
    "power-cut-after-250-acks": Moment(after_acks(250), 0, None, True),
}


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_kill_9_under_load_keeps_every_acknowledged_message(server, monkeypatch, tmp_path,
                                                            moment):
    how = MOMENTS[moment]
    fsync_log = str(tmp_path / "fsync.log")
    environ = {}
    if how.crash_at:
        environ["UPASMAIL_CRASH_AT"] = how.crash_at
    if how.power_cut:
        environ["UPASMAIL_TEST_FSYNC_LOG"] = fsync_log
        environ["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(os.path.dirname(os.path.abspath(__file__)), "powercut")]
            + [p for p in [os.environ.get("PYTHONPATH")] if p])
    with monkeypatch.context() as m:  # only for the server that is killed
        for name, value in environ.items():
            m.setenv(name, value)
        s = server("--no-queue-runner", mailboxes=USERS)
    load = Load(s.port, how.big_from)
    load.start()
    try:
        how.die(s, load)
    except AssertionError as e:
        raise AssertionError("%s\n--- server's log (end) ---\n%s" % (e, s.output()[-5000:]))
    finally:
        load.stop()
    killed_log = s.output()
    assert not load.errors, report({"client errors": load.errors}, load, [("killed", killed_log)])
    if how.power_cut:
        lost = power_cut(s.root, fsync_log)
        killed_log += "\n(power cut: lost %s)" % lost

    s = server("--no-queue-runner", mailboxes=USERS)  # recovery runs before it listens
    load.port = s.port
    for user in USERS:  # a recovered mailbox takes new mail at once
        load.send_one(Message("after-" + user, (user,), 500))
    s.proc.send_signal(signal.SIGTERM)
    status = s.proc.wait(DEADLINE)

    problems = Audit(s.root, load, partial_ok=how.power_cut).run()
    if status not in (0, -signal.SIGTERM) or "Server Shut Down." not in s.output():
        problems["restarted server did not stop cleanly"].append(status)
    if "Traceback" in s.output():
        problems["restarted server logged a traceback"].append("see its log")
    assert not problems, report(problems, load, [("killed", killed_log),
                                                 ("restarted", s.output())])
