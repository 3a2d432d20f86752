"""upas smtpd dialogue: checklist items of spec §3 over a StringTransport.

Each test names its checklist item.  Peers 127.0.0.x other than 127.0.0.1
are "outside" unless smtpd.conf says otherwise.  The greeting, relay control
and MAIL/RCPT sequence tests are dialogue files now
(tests/scenarios/*.dialogue, run by test_scenarios.py).
"""

import mailbox
import os
import shutil
import tempfile

from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from upasmail import testing

SYNTAX = "500 5.5.1 illegal command or bad syntax"


class DialogueCase(unittest.TestCase):
    conf = ""
    peer = "127.0.0.2"
    extra = {}
    mailboxes = ("bob", "carol")  # the local users the tests write to

    def dialogue(self, conf=None, peer=None, **kw):
        root = tempfile.mkdtemp(prefix="upasmail-test-")
        self.addCleanup(shutil.rmtree, root, True)
        opts = dict(self.extra)
        opts.update(kw)
        s = testing.make_settings(self.conf if conf is None else conf, root=root, **opts)
        d = testing.Dialogue(s, peer=peer or self.peer, mailboxes=self.mailboxes)
        self.addCleanup(d.close)
        return d

    def helo(self, d, name="h.sender.net"):
        self.assertEqual(d.send("HELO " + name)[0][:4], "250 ")
        return d

    def mbox(self, d, user):
        return mailbox.mbox(os.path.join(d.root.boxes, user, "mbox"), create=False)


class SyntaxTests(DialogueCase):
    def test_item24_empty_line_and_unknown_verb(self):
        d = self.dialogue()
        self.assertEqual(d.send(""), [SYNTAX])
        self.assertEqual(d.send("XYZZY"), [SYNTAX])
        self.assertEqual(d.send("XHELO foo.example"), [SYNTAX])
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])

    def test_item25_parameters_and_brackets(self):
        # upas takes no parameter but AUTH=; SIZE, BODY and SMTPUTF8 are ours
        d = self.helo(self.dialogue())
        self.assertEqual(d.send("MAIL FROM:<a@b.example> FOO=1"),
                         ["555 5.5.4 Unsupported parameter FOO"])
        self.assertEqual(d.send("MAIL FROM:a@b.example"), [SYNTAX])

    def test_item26_auth_parameter(self):
        d = self.helo(self.dialogue())
        self.assertEqual(d.send("MAIL FROM:<a@b.example> AUTH=<>"),
                         ["250 2.0.0 sender is b.example!a"])

    def test_item27_case(self):
        d = self.helo(self.dialogue())
        self.assertEqual(d.send("mail from: <Alice@B.Example>"),
                         ["250 2.0.0 sender is B.Example!Alice"])

    def test_item29_bare_lf(self):
        d = self.dialogue()
        self.assertEqual(d.raw(b"HELO h.sender.net\nNOOP\n"),
                         ["250 gnot.example.org you are h.sender.net",
                          "250 2.0.0 Nothing to see here. Move along ..."])

    def test_helo_needs_a_domain(self):
        d = self.dialogue()
        self.assertEqual(d.send("EHLO"), [SYNTAX])
        self.assertEqual(d.send("HELO two words"), [SYNTAX])

    def test_non_ascii_and_control_bytes(self):
        d = self.dialogue()
        self.assertEqual(d.raw(b"\xff\xfe\r\n"), [SYNTAX])
        self.assertEqual(d.raw(b"NO\x00OP\r\n"), [SYNTAX])
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])

    def test_long_command_line(self):
        d = self.dialogue()
        self.assertEqual(d.raw(b"NOOP " + b"x" * 10000 + b"\r\n"),
                         ["500 5.5.2 Error: command line too long"])
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])

    def test_long_command_line_in_pieces(self):
        d = self.dialogue()
        out = []
        for _ in range(5):
            out += d.raw(b"y" * 2000)
        out += d.raw(b"\r\nNOOP\r\n")
        self.assertEqual(out, ["500 5.5.2 Error: command line too long",
                               "250 2.0.0 Nothing to see here. Move along ..."])


class RcptTests(DialogueCase):
    def test_recipient_limit(self):
        d = self.helo(self.dialogue())
        os.makedirs(os.path.join(d.root.root, "lib"))
        with open(os.path.join(d.root.root, "lib", "users"), "w") as f:
            f.write("".join("u%d\n" % i for i in range(1001)))
        d.send("MAIL FROM:<a@b.example>")
        out = d.send(*["RCPT TO:<u%d>" % i for i in range(1001)])
        self.assertEqual(out[999], "250 2.0.0 receiver is u999")
        self.assertEqual(out[1000], "452 4.5.3 Error: too many recipients")


class DataTests(DialogueCase):
    def transaction(self, d, sender="alice@example.org", rcpts=("bob",), helo="h.sender.net"):
        self.helo(d, helo)
        d.send("MAIL FROM:<%s>" % sender)
        for r in rcpts:
            d.send("RCPT TO:<%s>" % r)
        return d.send("DATA")

    def test_item48_sequence(self):
        d = self.helo(self.dialogue())
        self.assertEqual(d.send("DATA"), ["503 2.5.2 Data without MAIL FROM:"])
        d.send("MAIL FROM:<a@b.example>")
        self.assertEqual(d.send("DATA"), ["503 2.5.2 Data without RCPT TO:"])

    def test_item49_data_and_sent(self):
        d = self.dialogue()
        self.assertEqual(self.transaction(d), ["354 Input message; end with <CRLF>.<CRLF>"])
        self.assertEqual(d.send("Subject: hi", "", "hello", "."), ["250 2.5.0 sent"])
        [msg] = self.mbox(d, "bob")
        self.assertEqual(msg.get_payload(), "hello\n")

    def test_item53_unstuffing_crlf_nul(self):
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(d.raw(b"Subject: x\r\n\r\n..hidden\r\na\x00b\r\n.\r\n"),
                         ["250 2.5.0 sent"])
        with open(os.path.join(d.root.boxes, "bob", "mbox"), "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(b"\n\n.hidden\nab\n\n"), data)
        self.assertNotIn(b"\r", data)

    def test_item54_55_from_and_to_added(self):
        d = self.dialogue(peer="127.0.0.1")
        self.transaction(d, rcpts=("bob@example.com", "carol@example.net"))
        d.send("Subject: x", "", "body", ".")
        [path] = os.listdir(d.root.queue)[:1] and [p for p in os.listdir(d.root.queue)
                                                   if p.endswith(".msg")]
        with open(os.path.join(d.root.queue, path), "rb") as f:
            lines = f.read().split(b"\n")
        self.assertTrue(lines[0].startswith(b"From example.org!alice "))
        self.assertTrue(lines[0].endswith(b" remote from "))
        self.assertTrue(lines[1].startswith(b"Received: from h.sender.net ([127.0.0.1]) by gnot; "))
        # the built-in store adds them in RFC 5322 form (upas's form: test_local_delivery)
        self.assertEqual(lines[2], b"From: alice@example.org")
        self.assertEqual(lines[3], b"To: bob@example.com, carol@example.net")

    def test_item56_header_address_qualified(self):
        d = self.dialogue()
        self.transaction(d, helo="h.sender.net")
        d.send("From: alice", "To: bob (Bob), Carol <carol>", "", "x", ".")
        [msg] = self.mbox(d, "bob")
        self.assertEqual(msg["From"], "alice@h.sender.net")
        self.assertEqual(msg["To"], "bob@h.sender.net (Bob), Carol <carol@h.sender.net>")

    def test_item57_badheader(self):
        d = self.dialogue()
        self.transaction(d)
        d.send("garbage without colon", "Subject: ok", "", "x", ".")
        [msg] = self.mbox(d, "bob")
        self.assertEqual(msg["BadHeader"], "garbage without colon")
        self.assertEqual(msg["Subject"], "ok")

    def test_item58_return_path_is_not_an_originator(self):
        d = self.dialogue()
        self.transaction(d)
        d.send("Return-Path: <x@y>", "", "x", ".")
        [msg] = self.mbox(d, "bob")
        self.assertEqual(msg["From"], "alice@example.org")

    def test_item62_illegal_header_chars(self):
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(d.raw(b"Subject: caf\xe9\r\n\r\nx\r\n.\r\n"),
                         ["554 5.7.1 mail refused: illegal header chars"])
        self.assertFalse(os.path.exists(os.path.join(d.root.boxes, "bob", "mbox")))

    def test_item66_close_before_dot(self):
        d = self.dialogue()
        self.transaction(d)
        d.send("Subject: x", "", "partial")
        d.proto.connectionLost(None)
        self.assertFalse(os.path.exists(os.path.join(d.root.boxes, "bob", "mbox")))
        self.assertEqual(os.listdir(d.root.tmp), [])

    def test_item67_lists_cleared_after_data(self):
        d = self.dialogue()
        self.transaction(d)
        d.send("x", ".")
        self.assertEqual(d.send("DATA"), ["503 2.5.2 Data without MAIL FROM:"])

    def test_item68_null_sender_many_rcpts(self):
        d = self.dialogue()
        self.assertEqual(self.transaction(d, sender="", rcpts=("bob", "carol")),
                         ["554 5.7.1 rejected: /dev/null sending to multiple recipients"])

    def test_null_sender_many_rcpts_trusted(self):
        d = self.dialogue(peer="127.0.0.1")
        self.assertEqual(self.transaction(d, sender="", rcpts=("bob", "carol")),
                         ["354 Input message; end with <CRLF>.<CRLF>"])

    def test_item83_rset(self):
        d = self.helo(self.dialogue())
        d.send("MAIL FROM:<a@b.example>", "RCPT TO:<bob>")
        self.assertEqual(d.send("RSET"), ["250 2.0.0 ok"])
        self.assertEqual(d.send("DATA"), ["503 2.5.2 Data without MAIL FROM:"])

    def test_item84_noop_help_quit(self):
        d = self.dialogue()
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])
        self.assertEqual(d.send("HELP"), ["250 2.0.0 See http://www.ietf.org/rfc/rfc2821"])
        self.assertEqual(d.send("QUIT"), ["221 2.0.0 Successful termination"])
        self.assertTrue(d.transport.disconnecting)

    def test_one_copy_per_mailbox_and_queue(self):
        d = self.dialogue(peer="127.0.0.1")
        self.transaction(d, rcpts=("bob", "Bob@gnot.example.org", "x@far.example", "y@far.example"))
        self.assertEqual(d.send("Subject: x", "", "once", "."), ["250 2.5.0 sent"])
        self.assertEqual(len(self.mbox(d, "bob")), 1)
        jobs = sorted(os.listdir(d.root.queue))
        self.assertEqual([j.rsplit(".", 1)[1] for j in jobs], ["env", "msg"])

    def test_second_message_is_rewritten_too(self):
        d = self.dialogue()
        self.transaction(d)
        d.send("Subject: one", "", "x", ".")
        d.send("MAIL FROM:<alice@example.org>", "RCPT TO:<bob>", "DATA")
        d.send("Subject: two", "", "y", ".")
        msgs = list(self.mbox(d, "bob"))
        self.assertEqual([m["From"] for m in msgs], ["alice@example.org"] * 2)

    def test_bare_lf_dot_does_not_end_data(self):
        d = self.dialogue()
        self.transaction(d)
        out = d.raw(b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<evil@x.example>\r\n")
        self.assertEqual(out, [])
        # every smuggling variant is in test_limits.py
        self.assertEqual(d.raw(b".\r\n"), ["554 5.5.2 Error: bare <CR> or <LF> in the "
                                           "message; send CRLF line ends"])
        self.assertFalse(os.path.exists(os.path.join(d.root.boxes, "bob", "mbox")))

    def test_long_data_line_refuses_message_but_stays_in_data(self):
        d = self.dialogue()
        self.transaction(d)
        out = d.raw(b"Subject: x\r\n\r\n" + b"a" * 70000 + b"\r\nMAIL FROM:<e@x.example>\r\n")
        self.assertEqual(out, [])
        self.assertEqual(d.raw(b".\r\n"), ["554 5.3.4 Error: message line too long"])
        self.assertEqual(d.send("NOOP"), ["250 2.0.0 Nothing to see here. Move along ..."])
        self.assertFalse(os.path.exists(os.path.join(d.root.boxes, "bob", "mbox")))

    def test_pipelined_transaction(self):
        d = self.dialogue()
        out = d.raw(b"EHLO h.sender.net\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob>\r\n"
                    b"DATA\r\nSubject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual([l[:4] for l in out if l[3] == " "],
                         ["250 ", "250 ", "250 ", "354 ", "250 ", "221 "])

    def test_idle_timeout(self):
        d = self.dialogue()
        d.clock.advance(301)
        self.assertEqual(d.take(), ["421 4.4.2 gnot.example.org Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)

    def test_store_failure_gives_451_and_no_partial_entry(self):
        d = self.dialogue()
        self.transaction(d)
        box = os.path.join(d.root.boxes, "bob")
        os.mkdir(os.path.join(box, "mbox"))  # cannot be opened as a file
        with capturedLogs() as events:
            self.assertEqual(d.send("x", "."),
                             ["451 4.3.0 Error: message not stored; try again later"])
        self.assertEqual(os.listdir(d.root.tmp), [])
        self.assertEqual(d.send("NOOP")[0][:3], "250")
        # one line with the session's ids and the reason, no traceback
        [line] = [formatEvent(e) for e in events if "not stored: " in formatEvent(e)]
        self.assertIn(d.proto.session.id, line)
        self.assertIn("Is a directory", line)
        self.assertEqual(self.flushLoggedErrors(), [])


class RobustnessTests(DialogueCase):
    def test_a_bug_costs_one_reply_not_the_connection(self):
        d = self.dialogue()

        def broken(cmd):
            raise RuntimeError("bug")

        d.proto.cmd_NOOP = broken
        self.assertEqual(d.send("NOOP"),
                         ["451 4.3.0 Error: local error in processing; try again later"])
        self.assertEqual(d.send("HELP"), ["250 2.0.0 See http://www.ietf.org/rfc/rfc2821"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_validator_gets_451(self):
        d = self.helo(self.dialogue())

        def broken(helo, origin):
            raise ValueError("backend down")

        d.proto.delivery.validateFrom = broken
        self.assertEqual(d.send("MAIL FROM:<a@b.example>"),
                         ["451 4.3.0 Error: local error in processing; try again later"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_validator_refusal_with_bytes_or_str_text(self):
        from twisted.mail import smtp

        d = self.helo(self.dialogue())
        d.send("MAIL FROM:<a@b.example>")
        for resp in ("5.1.1 no such user", b"5.1.1 no such user"):
            def refuse(user, resp=resp):
                raise smtp.SMTPBadRcpt(user, 550, resp)

            d.proto.delivery.validateTo = refuse
            self.assertEqual(d.send("RCPT TO:<bob>"), ["550 5.1.1 no such user"])

    def test_stale_spool_files_removed_at_start(self):
        root = tempfile.mkdtemp(prefix="upasmail-test-")
        self.addCleanup(shutil.rmtree, root, True)
        os.makedirs(os.path.join(root, "tmp"))
        open(os.path.join(root, "tmp", "123.abc"), "w").close()
        testing.Dialogue(testing.make_settings("", root=root)).close()
        self.assertEqual(os.listdir(os.path.join(root, "tmp")), [])
