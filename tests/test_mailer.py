"""The -m mailer hand-off (checklist items 50-52, 63-65, 70) with real processes."""

import os
import shutil
import stat
import sys
import tempfile

from twisted.internet import reactor, task
from twisted.trial import unittest

from upasmail import mailer, testing
from upasmail.decision import Reject

SCRIPT = """#!{python}
import sys
open({out!r} + "/argv", "w").write("\\n".join(sys.argv[1:]))
open({out!r} + "/stdin", "wb").write(sys.stdin.buffer.read())
sys.stderr.write({stderr!r})
sys.exit({code})
"""


class MailerTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="upasmail-mailer-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def makeMailer(self, code=0, stderr=""):
        path = os.path.join(self.dir, "fakemail")
        with open(path, "w") as f:
            f.write(SCRIPT.format(python=sys.executable, out=self.dir, stderr=stderr, code=code))
        os.chmod(path, stat.S_IRWXU)
        return path

    def dialogue(self, mailer_path, peer="127.0.0.1"):
        s = testing.make_settings("", root=os.path.join(self.dir, "root"), mailer=mailer_path)
        d = testing.Dialogue(s, peer=peer, reactor=reactor)
        self.addCleanup(d.close)
        d.send("HELO h.sender.net", "MAIL FROM:<alice@example.org>",
               "RCPT TO:<bob@example.com>", "RCPT TO:<carol@example.net>")
        return d

    def read(self, name):
        with open(os.path.join(self.dir, name), "rb") as f:
            return f.read()

    async def test_items50_51_52_argv_and_stream(self):
        d = self.dialogue(self.makeMailer())
        self.assertEqual(d.send("DATA"), ["354 Input message; end with <CRLF>.<CRLF>"])
        out = await d.sendAndWait("Subject: hi", "", "..hidden", "body", ".")
        self.assertEqual(out, ["250 2.5.0 sent"])
        self.assertEqual(self.read("argv").decode().split("\n"),
                         ["-r", "example.com!bob", "example.net!carol"])
        lines = self.read("stdin").split(b"\n")
        self.assertRegex(lines[0].decode(),
                         r"^From example\.org!alice \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d "
                         r"[+-]\d{4} \d{4} remote from $")
        self.assertRegex(lines[1].decode(),
                         r"^Received: from h\.sender\.net \(\[127\.0\.0\.1\]\) by gnot; "
                         r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d [+-]\d{4} \d{4}$")
        self.assertEqual(lines[2:], [b"From: example.org!alice",
                                     b"To: example.com!bob, example.net!carol",
                                     b"Subject: hi", b"", b".hidden", b"body", b""])

    async def test_item63_failure_lines(self):
        d = self.dialogue(self.makeMailer(1, "line one\nline two\n"))
        d.send("DATA")
        out = await d.sendAndWait("x", ".")
        self.assertEqual(out, ["450-4.0.0 line one", "450-4.0.0 line two",
                               "450 4.0.0 mail process terminated abnormally"])

    async def test_item64_mail_refused(self):
        d = self.dialogue(self.makeMailer(1, "mail refused:  from 'x'\nto 'y'\n"))
        d.send("DATA")
        out = await d.sendAndWait("x", ".")
        self.assertEqual(out, ["554 5.7.1 mail refused:  from 'x'"])

    async def test_item65_good_status_with_stderr(self):
        d = self.dialogue(self.makeMailer(0, "just saying\n"))
        d.send("DATA")
        out = await d.sendAndWait("x", ".")
        self.assertEqual(out, ["250 2.5.0 sent"])

    def test_item70_mailer_cannot_start(self):
        path = self.makeMailer()
        d = self.dialogue(path)
        os.chmod(path, 0o600)
        self.assertEqual(d.send("DATA"), ["450 4.3.2 We're busy right now, try later"])

    async def test_hung_mailer_is_killed(self):
        path = os.path.join(self.dir, "hang")
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexec sleep 30\n")
        os.chmod(path, stat.S_IRWXU)
        spool = os.path.join(self.dir, "stream")
        with open(spool, "wb") as f:
            f.write(b"From x now remote from \n")
        clock = task.Clock()
        m = mailer.Mailer(path, reactor, timeout=600, clock=clock)
        running = m.run(spool, ["bob"])
        clock.advance(600)
        verdict, _ = await running
        self.assertIsInstance(verdict, Reject)
        self.assertEqual(verdict.code, 450)
        self.assertIn("4.0.0 mailer timed out", verdict.lines)


class VerdictTests(unittest.SynchronousTestCase):
    def test_only_newline_terminated_lines(self):
        v = mailer.verdict(False, b"one\ntwo")
        self.assertEqual(v.lines, ("4.0.0 one", "4.0.0 mail process terminated abnormally"))

    def test_success(self):
        self.assertTrue(mailer.verdict(True, b"noise").ok)
