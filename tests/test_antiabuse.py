"""Anti-abuse checklist items of spec §3 (issue 4), over StringTransport.

Peers are 127.0.0.x (127.0.0.1 is ours by default); DNS is a FakeResolver;
every wait runs on a task.Clock.  Items that run helper programs
(validateaddress, validatesender) use the real reactor for the processes.
"""

import ipaddress
import mailbox
import os
import shutil
import stat
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.logger import capturedLogs
from twisted.names import dns
from twisted.trial import unittest

from upasmail import listening, store, testing

LIAR = ["554 5.7.0 Liar!"]
DIALUP = "554 5.7.1 We don't accept mail from dial-up ports."
SPAM = "554 5.7.1 we believe this is spam."
DELAYED = "450 4.3.0 There will be a delay in delivery of this message."
NOOP_OK = "250 2.0.0 Nothing to see here. Move along ..."

ZONE = {
    "h.sender.net": [dns.Record_A("127.0.0.2")],
    "ptr-only.sender.net": [],  # the name exists only as a PTR target
    "2.0.0.127.in-addr.arpa": [dns.Record_PTR("ptr-only.sender.net")],
    "example.org": [dns.Record_MX(10, "mx.example.org")],
    "gw.corp.example": [dns.Record_A("127.0.0.8")],
}
del ZONE["ptr-only.sender.net"]


def script(path, body, code=0):
    with open(path, "w") as f:
        f.write("#!%s\nimport sys\n%s\nsys.exit(%d)\n" % (sys.executable, body, code))
    os.chmod(path, stat.S_IRWXU)


class Case(unittest.TestCase):
    peer = "127.0.0.2"
    mailboxes = ("bob", "carol")  # the local users the tests write to

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="upasmail-abuse-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.lib = os.path.join(self.root, "lib")
        os.makedirs(self.lib)

    def write(self, name, text):
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def dialogue(self, conf="", peer=None, resolver=None, clock=None, reactor=None, **kw):
        s = testing.make_settings(conf, root=self.root, **kw)
        d = testing.Dialogue(s, peer=peer or self.peer, clock=clock, reactor=reactor,
                             resolver=resolver or testing.FakeResolver(ZONE),
                             mailboxes=self.mailboxes)
        self.addCleanup(d.close)
        return d

    def transaction(self, d, sender="alice@example.org", rcpts=("bob",), helo="h.sender.net"):
        out = d.send("HELO " + helo, "MAIL FROM:<%s>" % sender,
                     *["RCPT TO:<%s>" % r for r in rcpts])
        return out

    def mbox(self, user):
        path = os.path.join(self.root, "box", user, "mbox")
        return list(mailbox.mbox(path, create=False)) if os.path.exists(path) else []


class ConnectTests(Case):
    def test_item4_banned_peer_gets_nothing(self):
        with capturedLogs() as events:
            d = self.dialogue(evil=(ipaddress.ip_network("127.0.0.0/29"),))
        self.assertIsInstance(d.proto, listening.Dropped)
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(d.greeting, [])
        self.assertEqual([e for e in events if "127.0.0.2" in repr(e)], [])

    def test_item4_other_peers_still_served(self):
        d = self.dialogue(evil=(ipaddress.ip_network("192.0.2.0/24"),))
        self.assertEqual(d.greeting, ["220 gnot.example.org ESMTP"])

    def test_item8_ratify_trusted(self):
        self.write("lib/blocked", "trusted 127.0.0.9\n")
        d = self.dialogue(peer="127.0.0.9")
        self.assertEqual(d.send("HELO gnot"), ["250 gnot.example.org you are 127.0.0.9"])
        d.send("MAIL FROM:<a@b.example>")
        self.assertEqual(d.send("RCPT TO:<x@foreign.example>"),
                         ["250 2.0.0 receiver is foreign.example!x"])

    def test_temporary_grant_trusts_for_two_hours(self):
        clock = task.Clock()
        clock.advance(time.time())
        self.dialogue(clock=clock).factory.store.grant("127.0.0.9")
        d = self.dialogue(peer="127.0.0.9", clock=clock)
        self.assertEqual(d.send("HELO gnot"), ["250 gnot.example.org you are 127.0.0.9"])
        clock.advance(2 * 3600 + 1)
        d = self.dialogue(peer="127.0.0.9", clock=clock)
        self.assertEqual(d.send("HELO gnot"), LIAR)

    def test_grant_file_named_with_hash_for_slash(self):
        clock = task.Clock()
        clock.advance(time.time())
        path = self.write("lib/trusted.d/127.0.0.8#29", "")
        os.utime(path, (clock.seconds(), clock.seconds()))
        d = self.dialogue(peer="127.0.0.9", clock=clock)
        self.assertEqual(d.send("HELO gnot"), ["250 gnot.example.org you are 127.0.0.9"])


class HeloTests(Case):
    def test_item13_claims_our_domain(self):
        d = self.dialogue(domain="mail.sender.net")
        self.assertEqual(d.send("HELO mail.sender.net"), LIAR)
        self.assertTrue(d.transport.disconnecting)

    def test_item14_claims_our_sysname_any_case(self):
        for name in ("GNOT.example.ORG", "gnot", "Gnot"):
            d = self.dialogue()
            self.assertEqual(d.send("HELO " + name), LIAR, name)

    def test_claims_from_our_own_address_are_exempt(self):
        d = self.dialogue(peer="127.0.0.2", relax_helo=True)
        d2 = testing.Dialogue(d.proto.settings, peer="127.0.0.2", local="127.0.0.2",
                              resolver=testing.FakeResolver(ZONE))
        self.addCleanup(d2.close)
        self.assertEqual(d2.send("HELO gnot"), ["250 gnot.example.org you are 127.0.0.2"])

    def test_item15_reserved_names(self):
        for name in ("localhost", "host.test", "host.local", "host.lan", "host.invalid",
                     "host.localdomain", "host.example", "HOST.LOCALHOST"):
            d = self.dialogue()
            self.assertEqual(d.send("EHLO " + name), LIAR, name)

    def test_item16_www_example_org(self):
        for name in ("www.example.org", "a.example.com", "example.net"):
            d = self.dialogue()
            self.assertEqual(d.send("HELO " + name), LIAR, name)

    def test_item17_address_literal_without_e(self):
        d = self.dialogue()
        self.assertEqual(d.send("HELO [192.0.2.1]"), LIAR)
        d = self.dialogue(relax_helo=True)
        self.assertEqual(d.send("HELO [192.0.2.1]"), ["250 gnot.example.org you are [192.0.2.1]"])

    def test_no_letters_is_a_claim_even_with_e(self):
        d = self.dialogue(relax_helo=True)
        self.assertEqual(d.send("HELO 192.0.2.1"), LIAR)

    def test_item18_name_without_dns_records(self):
        d = self.dialogue()
        self.assertEqual(d.send("HELO nowhere.sender.net"), LIAR)

    def test_item18_ptr_name_is_accepted(self):
        with capturedLogs() as events:
            d = self.dialogue()
            out = d.send("HELO ptr-only.sender.net")
        self.assertEqual(out, ["250 gnot.example.org you are ptr-only.sender.net"])
        self.assertTrue(any("ptr only from" in e.get("log_format", "") and
                            e["rsys"] == "127.0.0.2" for e in events))

    def test_item18_resolving_name_is_accepted(self):
        d = self.dialogue()
        self.assertEqual(d.send("HELO h.sender.net"), ["250 gnot.example.org you are h.sender.net"])

    def test_dns_server_failure_is_not_a_lie(self):
        d = self.dialogue(resolver=testing.FakeResolver(ZONE, failing=["h.broken.net"]))
        self.assertEqual(d.send("HELO h.broken.net"), ["250 gnot.example.org you are h.broken.net"])

    def test_hung_dns_times_out_on_the_clock(self):
        d = self.dialogue(resolver=testing.FakeResolver(ZONE, hanging=["slow.sender.net"]))
        self.assertEqual(d.send("HELO slow.sender.net"), [])
        d.clock.advance(20)
        self.assertEqual(d.take(), ["250 gnot.example.org you are slow.sender.net"])

    def test_item19_e_relaxes(self):
        d = self.dialogue(relax_helo=True)
        self.assertEqual(d.send("HELO foo.invalid"), ["250 gnot.example.org you are foo.invalid"])

    def test_item20_E_turns_lies_into_auth_required(self):
        d = self.dialogue(helo_lie_auth=True)
        self.assertEqual(d.send("EHLO foo.invalid"),
                         ["250-you lie.  authentication required.",
                          "250-gnot.example.org you are foo.invalid",
                          "250-ENHANCEDSTATUSCODES", "250-SIZE 134217728", "250-8BITMIME",
                          "250-PIPELINING", "250 SMTPUTF8"])
        self.assertEqual(d.send("MAIL FROM:<a@b.example>"),
                         ["530 5.7.0 Authentication required"])
        self.assertFalse(d.transport.disconnecting)

    def test_item21_trusted_peer_skips_checks(self):
        d = self.dialogue("ournets 192.0.2.0/24\n", peer="192.0.2.5")
        self.assertEqual(d.send("HELO gnot"), ["250 gnot.example.org you are 192.0.2.5"])

    def test_item22_ehlo_without_argument(self):
        d = self.dialogue()
        self.assertEqual(d.send("EHLO"), ["500 5.5.1 illegal command or bad syntax"])

    def test_item23_D_delays_the_reply_15_units(self):
        d = self.dialogue(helo_delay=True, tarpit_unit=1.0)
        self.assertEqual(d.send("HELO h.sender.net"), [])
        d.clock.advance(14.9)
        self.assertEqual(d.take(), [])
        d.clock.advance(0.1)
        self.assertEqual(d.take(), ["250 gnot.example.org you are h.sender.net"])

    def test_item23_D_delays_the_liar_reply_too(self):
        d = self.dialogue(helo_delay=True, tarpit_unit=1.0)
        self.assertEqual(d.send("HELO localhost"), [])
        d.clock.advance(15)
        self.assertEqual(d.take(), LIAR)


class RatifyActionTests(Case):
    def data(self, d, body=("Subject: t", "", "hello")):
        self.assertEqual(d.send("DATA"), ["354 Input message; end with <CRLF>.<CRLF>"])
        return d.send(*body, ".")

    def test_item35_denied_account_refused_at_data(self):
        self.write("lib/blocked", "*deny example.org!alice\n")
        d = self.dialogue()
        self.assertEqual(self.transaction(d)[1:], ["250 2.0.0 sender is example.org!alice",
                                                   "250 2.0.0 receiver is bob"])
        self.assertEqual(d.send("DATA"), [
            "554-5.7.1 We don't accept mail from example.org!alice.",
            "554 5.7.1 Contact postmaster@gnot.example.org for more information."])

    def test_item71_dial(self):
        self.write("lib/blocked", "dial 127.0.0.0/29\n")
        d = self.dialogue()
        self.assertEqual([l[:4] for l in self.transaction(d)], ["250 "] * 3)
        self.assertEqual(d.send("DATA"), [DIALUP])
        self.assertEqual(d.send("NOOP"), [DIALUP])
        self.assertEqual(d.send("RSET"), [DIALUP])
        self.assertEqual(d.send("QUIT"), ["221 2.0.0 Successful termination"])

    def test_item72_deny_ip(self):
        self.write("lib/blocked", "deny 127.0.0.2\n")
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(d.send("DATA"), [
            "554-5.7.1 We don't accept mail from example.org!alice.",
            "554 5.7.1 Contact postmaster@gnot.example.org for more information."])
        self.assertEqual(d.send("NOOP"), [NOOP_OK])

    def test_item73_blocked_account_pattern(self):
        self.write("lib/blocked", "*block *!freeporn*\n")
        d = self.dialogue()
        self.transaction(d, sender="FreePorn4u@spam.example")
        self.assertEqual(self.data(d), [SPAM])
        self.assertEqual(self.mbox("bob"), [])
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])

    def test_item73_blocked_with_mailer_does_not_run_it(self):
        self.write("lib/blocked", "* block *.spam.example\n")
        marker = os.path.join(self.root, "ran")
        script(os.path.join(self.root, "mailer"), "open(%r, 'w').close()" % marker)
        d = self.dialogue(mailer=os.path.join(self.root, "mailer"), reactor=reactor)
        self.transaction(d, sender="x@a.spam.example")
        self.assertEqual(self.data(d), [SPAM])
        self.assertFalse(os.path.exists(marker))

    def test_item74_delay_and_relay_verb(self):
        for verb in ("delay", "relay"):
            self.write("lib/blocked", "%s 127.0.0.2\n" % verb)
            d = self.dialogue()
            self.transaction(d)
            self.assertEqual(self.data(d), [DELAYED], verb)
            self.assertEqual(self.mbox("bob"), [])

    def test_item75_allow_beats_block(self):
        self.write("lib/blocked", "block 127.0.0.0/24\nallow 127.0.0.2\n")
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(self.data(d), ["250 2.5.0 sent"])
        self.assertEqual(len(self.mbox("bob")), 1)

    def test_precedence_is_by_action_not_line_order(self):
        self.write("lib/blocked", "delay 127.0.0.2\ndial 127.0.0.2\ndeny 127.0.0.2\n")
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(d.send("DATA")[0][:4], "554-")  # deny before dial and delay

    def test_item76_trusted_peer_skips_account_lists(self):
        self.write("lib/blocked", "*block example.org!*\n")
        d = self.dialogue(peer="127.0.0.1")
        self.transaction(d)
        self.assertEqual(self.data(d), ["250 2.5.0 sent"])

    def test_item77_nospamfiltering_for_every_recipient(self):
        self.write("lib/blocked", "*block example.org!*\n")
        self.write("box/bob/nospamfiltering", "")
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(self.data(d), ["250 2.5.0 sent"])
        d = self.dialogue()
        self.transaction(d, rcpts=("bob", "carol"))
        self.assertEqual(self.data(d), [SPAM])  # carol did not opt out

    def test_item78_s_saves_blocked_messages(self):
        self.write("lib/blocked", "*block example.org!*\n")
        d = self.dialogue(save_blocked=True)
        self.transaction(d)
        self.assertEqual(self.data(d), [SPAM])
        day = store.dump_dir_name(d.clock.seconds())
        self.assertRegex(day, r"^[A-Z][a-z]{2}[1-9]\d?$")
        [name] = os.listdir(os.path.join(self.root, "queue.dump", day))
        self.assertTrue(name.isdigit())
        with open(os.path.join(self.root, "queue.dump", day, name), "rb") as f:
            saved = f.read()
        self.assertTrue(saved.startswith(b"From example.org!alice "))
        self.assertIn(b"Subject: t\n\nhello\n", saved)

    def test_delay_is_saved_too_and_nothing_without_s(self):
        self.write("lib/blocked", "delay 127.0.0.2\n")
        d = self.dialogue()
        self.transaction(d)
        self.data(d)
        self.assertFalse(os.path.exists(os.path.join(self.root, "queue.dump")))

    def test_block_counts_as_rejections(self):
        self.write("lib/blocked", "*block example.org!*\n")
        d = self.dialogue()
        self.transaction(d)
        self.data(d)
        self.assertEqual(d.proto.session.rejects, 2)

    def test_file_change_takes_effect_without_restart(self):
        path = self.write("lib/blocked", "")
        d = self.dialogue()
        self.transaction(d)
        self.assertEqual(self.data(d), ["250 2.5.0 sent"])
        self.write("lib/blocked", "dial 127.0.0.2\n")
        os.utime(path, (time.time() + 5, time.time() + 5))
        d2 = self.dialogue()  # a new connection to a new server on the same root
        self.transaction(d2)
        self.assertEqual(d2.send("DATA"), [DIALUP])
        self.assertEqual(d.factory.spam.peer("127.0.0.2"), (False, "dial"))  # the old one too

    def test_syntax_error_keeps_last_good_version(self):
        path = self.write("lib/blocked", "dial 127.0.0.2\n")
        d = self.dialogue()
        spam = d.factory.spam
        self.assertEqual(spam.peer("127.0.0.2")[1], "dial")
        self.write("lib/blocked", "dial 127.0.0.2\nbogus 127.0.0.3\n")
        os.utime(path, (time.time() + 5, time.time() + 5))
        with capturedLogs() as events:
            self.assertEqual(spam.peer("127.0.0.2")[1], "dial")
        self.assertTrue(any("blocked:2: unknown verb 'bogus'" in str(e.get("err"))
                            for e in events))


class RelayAndRecipientTests(Case):
    def test_item45_validateaddress(self):
        script(os.path.join(self.lib, "validateaddress"),
               "sys.exit(0 if sys.argv[1] == 'bob' else 1)")
        d = self.dialogue("ourdomains example.com\n", reactor=reactor)
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")

        def check(out):
            self.assertEqual(out, ["550 5.1.1 example.com!nobody ... user unknown",
                                   "250 2.0.0 receiver is bob"])

        return d.sendAndWait("RCPT TO:<nobody@example.com>", "RCPT TO:<bob>").addCallback(check)

    def test_hung_validateaddress_is_a_temporary_failure(self):
        script(os.path.join(self.lib, "validateaddress"), "import time; time.sleep(60)")
        d = self.dialogue(reactor=reactor)
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
        waiting = d.sendAndWait("RCPT TO:<bob>")
        d.clock.advance(61)
        return waiting.addCallback(self.assertEqual, [
            "450 4.3.0 bob ... cannot check this address now; try again later"])

    def test_item46_names_blocked(self):
        self.write("lib/names.blocked", "# traps\n  Example.com!Spamtrap  # a trap\n")
        d = self.dialogue()
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
        self.assertEqual(d.send("RCPT TO:<spamtrap@example.com>"),
                         ["550 5.1.1 example.com!spamtrap ... user unknown"])

    def test_item47_senders_file(self):
        self.write("lib/senders", "corp.example!ceo 127.0.0.7\ncorp.example!cfo gw.corp.example\n")
        conf = "ourdomains corp.example\n"
        testing.make_mailboxes(self.root, "ceo", "cfo", "other")
        d = self.dialogue(conf, peer="127.0.0.3")
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
        self.assertEqual(d.send("RCPT TO:<ceo@corp.example>"),
                         ["550 5.7.1 corp.example!ceo ... sending system not allowed"])
        self.assertEqual(d.send("RCPT TO:<other@corp.example>"),
                         ["250 2.0.0 receiver is corp.example!other"])
        for peer, rcpt in (("127.0.0.7", "ceo"), ("127.0.0.8", "cfo")):
            d = self.dialogue(conf, peer=peer, relax_helo=True)
            d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
            self.assertEqual(d.send("RCPT TO:<%s@corp.example>" % rcpt),
                             ["250 2.0.0 receiver is corp.example!%s" % rcpt])


class ForgeryTests(Case):
    conf = "ourdomains example.com\n"

    def deliver(self, sender="x@sender.net", header=()):
        d = self.dialogue(self.conf)
        self.transaction(d, sender=sender)
        d.send("DATA", *header, "Subject: s", "", "body", ".")
        [msg] = self.mbox("bob")
        return msg

    def test_item59_suspect_from(self):
        msg = self.deliver(header=["From: boss@example.com"])
        self.assertEqual(msg.get_all("X-warning"), ["suspect From: domain"])
        lines = msg.as_string().splitlines()
        received = next(i for i, line in enumerate(lines) if line.startswith("Received:"))
        self.assertTrue(lines[received + 1].startswith("X-warning: suspect From: domain"))

    def test_item60_suspect_envelope(self):
        msg = self.deliver(sender="boss@example.com", header=["From: x@sender.net"])
        self.assertEqual(msg.get_all("X-warning"), ["suspect envelope domain"])

    def test_item61_sender_not_ours_skips_from_check(self):
        msg = self.deliver(header=["Sender: list@lists.other.org", "From: boss@example.com"])
        self.assertIsNone(msg.get_all("X-warning"))

    def test_no_tagging_for_trusted_peers(self):
        d = self.dialogue(self.conf, peer="127.0.0.1")
        self.transaction(d)
        d.send("DATA", "From: boss@example.com", "", "b", ".")
        self.assertIsNone(self.mbox("bob")[0].get_all("X-warning"))


class ValidateSenderTests(Case):
    def test_item69_validatesender_status(self):
        argv = os.path.join(self.root, "argv")
        script(os.path.join(self.lib, "validatesender"),
               "open(%r + sys.argv[3], 'w').write(' '.join(sys.argv[1:]))\n"
               "msg = {'busy.example': 'deferred: busy', 'gone.example': 'rejected: no such user'}"
               ".get(sys.argv[3])\nif msg: sys.stderr.write(msg + '\\n'); sys.exit(1)" % argv)
        results = []
        for domain in ("busy.example", "gone.example", "example.org"):
            d = self.dialogue(reactor=reactor)
            self.transaction(d, sender="alice@" + domain)
            results.append(d.sendAndWait("DATA"))

        def check(outs):
            self.assertEqual(outs[0], ["450 4.7.0 deferred: busy"])
            self.assertEqual(outs[1], ["554 5.7.1 rejected: no such user"])
            self.assertEqual(outs[2], ["354 Input message; end with <CRLF>.<CRLF>"])
            with open(argv + "example.org") as f:
                self.assertEqual(f.read(), "-n /net example.org alice 127.0.0.2 h.sender.net")

        from twisted.internet import defer
        return defer.gatherResults(results).addCallback(check)

    def test_trusted_peer_skips_validatesender(self):
        script(os.path.join(self.lib, "validatesender"), "", code=1)
        d = self.dialogue(peer="127.0.0.1", reactor=reactor)
        self.transaction(d)
        self.assertEqual(d.send("DATA"), ["354 Input message; end with <CRLF>.<CRLF>"])


class VerifySenderTests(Case):
    def test_r_nxdomain_refused_at_data_and_remembered(self):
        d = self.dialogue(verify_sender=True)
        out = self.transaction(d, sender="a@nowhere.example")
        self.assertEqual(out[1], "250 2.0.0 sender is nowhere.example!a")
        self.assertEqual(d.send("DATA"),
                         ["554 5.7.1 Sender domain must exist: nowhere.example!a"])
        d.send("RSET")
        self.assertEqual(d.send("MAIL FROM:<b@nowhere.example>"),
                         ["554 5.1.8 Sender domain must exist: nowhere.example!b"])

    def test_r_server_failure_is_temporary(self):
        d = self.dialogue(verify_sender=True,
                          resolver=testing.FakeResolver(ZONE, failing=["broken.example"]))
        self.transaction(d, sender="a@broken.example")
        self.assertEqual(d.send("DATA"), [
            "450 4.4.3 Sender domain lookup failed; try again later: broken.example!a"])

    def test_r_existing_domain_and_literals_pass(self):
        for sender in ("a@example.org", "a@[127.0.0.2]", "<>"):
            d = self.dialogue(verify_sender=True)
            d.send("HELO h.sender.net")
            d.send("MAIL FROM:%s" % (sender if sender == "<>" else "<%s>" % sender), "RCPT TO:<bob>")
            self.assertEqual(d.send("DATA")[0][:4], "354 ", sender)

    def test_without_r_no_lookup(self):
        d = self.dialogue()
        self.transaction(d, sender="a@nowhere.example")
        self.assertEqual(d.send("DATA")[0][:4], "354 ")


class GreylistTests(Case):
    def grey(self, clock, peer="127.0.0.2"):
        d = self.dialogue(greylist=True, clock=clock, peer=peer)
        self.transaction(d)
        return d, d.send("DATA")

    def clock(self):
        c = task.Clock()
        c.advance(time.time())
        return c

    def test_item79_first_attempt(self):
        d, out = self.grey(self.clock())
        self.assertEqual(out, ["451 please try again soon from the same IP."])
        self.assertTrue(d.transport.disconnecting)
        self.assertTrue(os.path.exists(os.path.join(self.root, "grey/tmp/127.0.0.1/127.0.0.2/bob")))

    def test_item80_retry_after_ten_minutes(self):
        clock = self.clock()
        self.grey(clock)
        clock.advance(600)
        d, out = self.grey(clock)
        self.assertEqual(out, ["354 Input message; end with <CRLF>.<CRLF>"])
        with open(os.path.join(self.root, "grey/whitelist")) as f:
            self.assertEqual(f.read(), "127.0.0.2 ptr-only.sender.net\n")
        clock.advance(1)  # whitelisted now: no more greylisting
        d, out = self.grey(clock)
        self.assertEqual(out[0][:4], "354 ")

    def test_item81_retry_after_one_minute_restarts_the_clock(self):
        clock = self.clock()
        self.grey(clock)
        clock.advance(60)
        self.assertEqual(self.grey(clock)[1], ["451 please try again soon from the same IP."])
        clock.advance(280)  # 5:40 after the first call, 4:40 after the second
        self.assertEqual(self.grey(clock)[1], ["451 please try again soon from the same IP."])
        clock.advance(301)
        self.assertEqual(self.grey(clock)[1][0][:4], "354 ")

    def test_too_old_call_does_not_count(self):
        clock = self.clock()
        self.grey(clock)
        clock.advance(15 * 3600)
        self.assertEqual(self.grey(clock)[1][0][:4], "451 ")

    def test_item82_whitelisted_network(self):
        self.write("grey/whitelist", "# big senders\n127.0.0.0/24 loopback\n")
        d, out = self.grey(self.clock())
        self.assertEqual(out[0][:4], "354 ")

    def test_state_survives_a_restart(self):
        clock = self.clock()
        self.grey(clock)  # one server
        clock.advance(600)
        d, out = self.grey(clock)  # a new factory on the same root
        self.assertEqual(out[0][:4], "354 ")

    def test_trusted_peers_are_not_greylisted(self):
        d, out = self.grey(self.clock(), peer="127.0.0.1")
        self.assertEqual(out[0][:4], "354 ")


class TarpitTests(Case):
    def test_item95_growing_delay(self):
        d = self.dialogue(tarpit_unit=1.0)
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
        self.assertEqual(d.send("RCPT TO:<x@foreign.example>")[0][:4], "550 ")
        self.assertEqual(d.send("RCPT TO:<y@foreign.example>"), [])
        d.clock.advance(7.9)
        self.assertEqual(d.take(), [])
        d.clock.advance(0.1)
        self.assertEqual(d.take()[0][:4], "550 ")
        self.assertEqual(d.send("NOOP"), [])
        d.clock.advance(15.9)
        self.assertEqual(d.take(), [])
        d.clock.advance(0.1)
        self.assertEqual(d.take(), [NOOP_OK])

    def test_delay_is_capped(self):
        d = self.dialogue(tarpit_unit=1.0, tarpit_max=30.0)
        d.proto.session.rejects = 40
        self.assertEqual(d.send("NOOP"), [])
        d.clock.advance(30)
        self.assertEqual(d.take(), [NOOP_OK])

    def test_item96_too_many_errors(self):
        d = self.dialogue()
        d.send("HELO h.sender.net", "MAIL FROM:<a@example.org>")
        for i in range(101):
            self.assertEqual(d.send("RCPT TO:<x%d@foreign.example>" % i)[0][:4], "550 ")
        self.assertEqual(d.send("NOOP"), ["554 5.5.0 too many errors.  transaction failed."])
        self.assertTrue(d.transport.disconnecting)

    def test_syntax_errors_do_not_count(self):
        d = self.dialogue(tarpit_unit=1.0)
        d.send("XYZZY", "MAIL FROM:a@b")
        self.assertEqual(d.proto.session.rejects, 0)
        self.assertEqual(d.send("NOOP"), [NOOP_OK])

    def test_idle_timeout_does_not_fire_during_a_tarpit_wait(self):
        d = self.dialogue(tarpit_unit=1.0, idle_timeout=10.0)
        d.proto.session.rejects = 3  # 32 s
        d.send("NOOP")
        d.clock.advance(32)
        self.assertEqual(d.take(), [NOOP_OK])
        self.assertFalse(d.transport.disconnecting)

    def test_item97_session_limit_without_data(self):
        d = self.dialogue(idle_timeout=3600.0)
        for _ in range(9):
            d.clock.advance(299)
            self.assertEqual(d.send("NOOP"), [NOOP_OK])
        d.clock.advance(45 * 60 - 9 * 299)
        self.assertEqual(d.take(), [])
        self.assertTrue(d.transport.disconnecting)

    def test_item97_started_data_is_not_cut_at_45_minutes(self):
        d = self.dialogue(idle_timeout=3600.0, data_block_timeout=3600.0)
        self.transaction(d)
        d.send("DATA", "Subject: slow")
        d.clock.advance(50 * 60)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.send("", "x", "."), ["250 2.5.0 sent"])
