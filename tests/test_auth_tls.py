"""AUTH and TLS (issue 5): checklist items 10-12, 20, 34, 40, 86-94 of spec §3,
STARTTLS injection and state reset, implicit TLS, brute-force throttling,
password files, redaction, and AUTH garbage from hypothesis.

Sessions run over ``testing.Dialogue`` (a StringTransport that can "start
TLS": bytes stay clear, the protocol sees an encrypted channel); every
wait runs on a task.Clock.  Real TLS is in test_tls_real.py.
"""

import base64
import hashlib
import hmac
import mailbox
import os
import shutil
import stat
import sys
import tempfile
import warnings

import bcrypt
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.cred import credentials, error
from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.mail import smtp
from twisted.names import dns
from twisted.trial import unittest

from upasmail import auth, passwd, pipemsg, testing, tls, trace

SECRET = "s3cret-Pa55"
HASHED = bcrypt.hashpw(b"hashed-pw", bcrypt.gensalt(rounds=4)).decode()
NOOP_OK = ["250 2.0.0 Nothing to see here. Move along ..."]
OURS = ["250-SIZE 134217728", "250-8BITMIME", "250-PIPELINING", "250-SMTPUTF8"]
ZONE = {"h.sender.net": [dns.Record_A("127.0.0.2")]}


def b64(data):
    return base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()


def plain(user="alice", password=SECRET, authzid=""):
    return b64("%s\0%s\0%s" % (authzid, user, password))


def cram_answer(challenge_line, user="alice", password=SECRET):
    challenge = base64.b64decode(challenge_line[4:])
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    return b64("%s %s" % (user, digest))


_PEM = None


def pem():
    global _PEM
    if _PEM is None:
        _PEM = testing.self_signed_pem("gnot.example.org")
    return _PEM


class Case(unittest.TestCase):
    peer = "127.0.0.2"
    passwords = "alice:%s\n" % SECRET

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="upasmail-auth-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.lib = os.path.join(self.root, "lib")
        os.makedirs(self.lib)
        if self.passwords is not None:
            self.write_passwd(self.passwords)

    def write_passwd(self, text):
        path = os.path.join(self.lib, "passwd")
        with open(path + ".new", "w") as f:
            f.write(text)
        os.chmod(path + ".new", 0o600)
        os.replace(path + ".new", path)

    def cert_file(self):
        path = os.path.join(self.root, "cert.pem")
        with open(path, "w") as f:
            f.write("".join(pem()))
        return tls.CertificateFile(path)

    def dialogue(self, conf="norelay on\n", peer=None, cert=False, implicit_tls=False,
                 clock=None, reactor=None, **kw):
        s = testing.make_settings(conf, root=self.root, **kw)
        d = testing.Dialogue(s, peer=peer or self.peer, clock=clock, reactor=reactor,
                             resolver=testing.FakeResolver(ZONE),
                             contextFactory=self.cert_file() if cert else None,
                             implicit_tls=implicit_tls, mailboxes=("bob",))
        self.addCleanup(d.close)
        return d

    def mbox(self, user):
        return list(mailbox.mbox(os.path.join(self.root, "box", user, "mbox")))

    def login(self, d):
        self.assertEqual(d.send("AUTH PLAIN " + plain()), ["235 2.0.0 Authentication successful"])

    def assertMailNeedsLogin(self, d):
        self.assertEqual(d.send("MAIL FROM:<a@h.sender.net>"),
                         ["530 5.7.0 Authentication required"])
        self.login(d)
        self.assertEqual(d.send("MAIL FROM:<a@h.sender.net>"),
                         ["250 2.0.0 sender is h.sender.net!a"])


class AdvertisingTests(Case):
    def test_item10_ehlo_offers_cram_md5_only(self):
        d = self.dialogue()
        self.assertEqual(d.send("EHLO h.sender.net"),
                         ["250-gnot.example.org you are h.sender.net",
                          "250-ENHANCEDSTATUSCODES"] + OURS + ["250 AUTH CRAM-MD5"])
        d = self.dialogue()
        self.assertEqual(d.send("HELO h.sender.net"),
                         ["250 gnot.example.org you are h.sender.net"])

    def test_item11_starttls_between_codes_and_auth(self):
        d = self.dialogue(cert=True)
        self.assertEqual(d.send("EHLO h.sender.net"),
                         ["250-gnot.example.org you are h.sender.net",
                          "250-ENHANCEDSTATUSCODES"] + OURS +
                         ["250-STARTTLS", "250 AUTH CRAM-MD5"])

    def test_item12_p_offers_plain_and_login(self):
        d = self.dialogue(clear_passwords=True)
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 AUTH CRAM-MD5 PLAIN LOGIN")

    def test_no_password_file_no_auth(self):
        os.unlink(os.path.join(self.lib, "passwd"))
        d = self.dialogue(cert=True)
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 STARTTLS")
        self.assertEqual(d.send("AUTH CRAM-MD5"),
                         ["502 5.5.1 Error: AUTH not available on this server"])

    def test_hashed_entries_turn_cram_md5_off(self):
        self.write_passwd("alice:%s\nbob:%s\n" % (SECRET, HASHED))
        d = self.dialogue(cert=True)
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 STARTTLS")
        self.assertEqual(d.send("AUTH CRAM-MD5"),
                         ["501 5.5.1 Unrecognised authentication type CRAM-MD5"])
        d.send("STARTTLS")
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 AUTH PLAIN LOGIN")
        self.assertEqual(d.send("AUTH PLAIN " + plain("bob", "hashed-pw")),
                         ["235 2.0.0 Authentication successful"])

    def test_password_file_edits_apply_to_the_next_ehlo(self):
        d = self.dialogue(clear_passwords=True)
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 AUTH CRAM-MD5 PLAIN LOGIN")
        self.write_passwd("alice:%s\nbob:%s\n" % (SECRET, HASHED))
        self.assertEqual(d.send("EHLO h.sender.net")[-1], "250 AUTH PLAIN LOGIN")


class MechanismTests(Case):
    def test_item87_plain_needs_encryption(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH PLAIN " + plain()),
                         ["538 5.7.1 Encryption required for requested authentication mechanism"])
        self.assertEqual(d.send("AUTH LOGIN"),
                         ["538 5.7.1 Encryption required for requested authentication mechanism"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)

    def test_item88_plain_with_p(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH PLAIN " + plain(password="wrong")),
                         ["535 5.7.1 Authentication failed"])
        self.assertEqual(d.send("AUTH PLAIN " + plain()),
                         ["235 2.0.0 Authentication successful"])

    def test_item89_plain_without_argument(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.raw(b"AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(d.send(plain()), ["235 2.0.0 Authentication successful"])

    def test_item90_login(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH LOGIN"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(d.send(b64("alice")), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(d.send(b64(SECRET)), ["235 2.0.0 Authentication successful"])
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH LOGIN " + b64("alice")), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(d.send(b64(SECRET)), ["235 2.0.0 Authentication successful"])

    def test_item91_cram_md5(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        [challenge] = d.send("AUTH CRAM-MD5")
        self.assertTrue(challenge.startswith("334 "))
        text = base64.b64decode(challenge[4:]).decode()
        self.assertRegex(text, r"^<\d+\.\d+@gnot\.example\.org>$")
        self.assertEqual(d.send(cram_answer(challenge)), ["235 2.0.0 Authentication successful"])
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        d.send("AUTH CRAM-MD5")
        self.assertEqual(d.send(b64("alice-no-space")),
                         ["501 5.5.4 Poorly formed CRAM-MD5 response"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)

    def test_cram_md5_wrong_digest_and_fresh_challenges(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        [first] = d.send("AUTH CRAM-MD5")
        self.assertEqual(d.send(cram_answer(first, password="nope")),
                         ["535 5.7.1 Authentication failed"])
        [second] = d.send("AUTH CRAM-MD5")
        self.assertNotEqual(first, second)
        self.assertEqual(d.send(cram_answer(first)), ["535 5.7.1 Authentication failed"])

    def test_item92_bad_base64(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH PLAIN !!!"), ["501 5.5.4 Cannot decode base64"])
        d.send("AUTH LOGIN")
        self.assertEqual(d.send("!!!"), ["501 5.5.4 Cannot decode base64"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)

    def test_item93_second_auth_and_unknown_mechanism(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH XOAUTH2 dG9rZW4="),
                         ["501 5.5.1 Unrecognised authentication type XOAUTH2"])
        self.login(d)
        self.assertEqual(d.send("AUTH PLAIN " + plain()), ["503 5.5.2 Bad sequence of commands"])

    def test_cancel_empty_and_malformed_each_have_their_reply(self):
        d = self.dialogue(clear_passwords=True, auth_max_failures=10)
        d.send("EHLO h.sender.net")
        d.send("AUTH LOGIN")
        self.assertEqual(d.send("*"), ["501 5.7.0 Authentication cancelled"])
        self.assertEqual(d.send("AUTH PLAIN " + b64("only\0one-nul")),
                         ["501 5.5.4 Poorly formed PLAIN response"])
        self.assertEqual(d.send("AUTH PLAIN " + b64("a\0b\0c\0d")),
                         ["501 5.5.4 Poorly formed PLAIN response"])
        self.assertEqual(d.send("AUTH PLAIN ="), ["501 5.5.4 Poorly formed PLAIN response"])
        self.assertEqual(d.send("AUTH CRAM-MD5 " + b64("x")),
                         ["501 5.5.2 CRAM-MD5 takes no initial response"])
        self.assertEqual(d.send("AUTH"), ["500 5.5.1 illegal command or bad syntax"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)
        self.assertFalse(d.transport.disconnecting)

    def test_over_long_response_ends_the_exchange(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net", "AUTH LOGIN")
        self.assertEqual(d.send("A" * 5000), ["500 5.5.2 Error: command line too long"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)

    def test_plain_authzid_must_be_the_user(self):
        d = self.dialogue(clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH PLAIN " + plain(authzid="bob")),
                         ["535 5.7.1 Authentication failed: authorization identity must be "
                          "the user"])
        self.assertEqual(d.send("AUTH PLAIN " + plain(authzid="alice")),
                         ["235 2.0.0 Authentication successful"])

    def test_auth_needs_ehlo_and_no_transaction(self):
        d = self.dialogue(clear_passwords=True)
        self.assertEqual(d.send("AUTH PLAIN " + plain()), ["503 Start by saying HELO, please."])
        d.send("EHLO h.sender.net", "MAIL FROM:<a@h.sender.net>")
        self.assertEqual(d.send("AUTH PLAIN " + plain()),
                         ["503 5.5.1 AUTH not permitted during a mail transaction"])

    def test_pipelined_mail_after_auth_sees_the_login(self):
        d = self.dialogue("norelay on\n", clear_passwords=True, require_auth=True)
        out = d.send("EHLO h.sender.net", "AUTH PLAIN " + plain(), "MAIL FROM:<a@h.sender.net>",
                     "RCPT TO:<x@foreign.example>")
        self.assertEqual(out[-3:], ["235 2.0.0 Authentication successful",
                                    "250 2.0.0 sender is h.sender.net!a",
                                    "250 2.0.0 receiver is foreign.example!x"])

    def test_bcrypt_runs_through_run_blocking(self):
        self.write_passwd("bob:%s\n" % HASHED)
        calls = []

        def run_blocking(f, *args):
            calls.append(f.__name__)
            return testing.run_now(f, *args)

        s = testing.make_settings("", root=self.root, clear_passwords=True)
        d = testing.Dialogue(s, peer=self.peer, run_blocking=run_blocking,
                             resolver=testing.FakeResolver(ZONE))
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("AUTH PLAIN " + plain("bob", "hashed-pw")),
                         ["235 2.0.0 Authentication successful"])
        self.assertIn("_bcrypt_ok", calls)
        d.close()


class PolicyTests(Case):
    def test_item34_a_requires_auth_before_mail(self):
        d = self.dialogue(require_auth=True, clear_passwords=True)
        d.send("EHLO h.sender.net")
        self.assertMailNeedsLogin(d)

    def test_item20_E_liar_can_authenticate(self):
        d = self.dialogue(helo_lie_auth=True)
        out = d.send("EHLO foo.invalid")
        self.assertEqual(out[0], "250-you lie.  authentication required.")
        self.assertEqual(d.send("MAIL FROM:<a@h.sender.net>"),
                         ["530 5.7.0 Authentication required"])
        [challenge] = d.send("AUTH CRAM-MD5")
        self.assertEqual(d.send(cram_answer(challenge)), ["235 2.0.0 Authentication successful"])
        self.assertEqual(d.send("MAIL FROM:<a@h.sender.net>"),
                         ["250 2.0.0 sender is h.sender.net!a"])

    def test_item40_authenticated_client_may_relay(self):
        d = self.dialogue("norelay on\n", clear_passwords=True)
        d.send("EHLO h.sender.net", "MAIL FROM:<a@h.sender.net>")
        self.assertEqual(d.send("RCPT TO:<x@foreign.example>"),
                         ["550 5.7.1 we don't relay.  send to your-path@[] for loopback."])
        d.send("RSET")
        self.login(d)
        d.send("MAIL FROM:<a@h.sender.net>")
        self.assertEqual(d.send("RCPT TO:<x@foreign.example>"),
                         ["250 2.0.0 receiver is foreign.example!x"])

    def test_item94_authenticated_no_warnings_no_validatesender(self):
        marker = os.path.join(self.root, "validatesender-ran")
        path = os.path.join(self.lib, "validatesender")
        with open(path, "w") as f:
            f.write("#!%s\nopen(%r, 'w').close()\nimport sys\nsys.exit(1)\n"
                    % (sys.executable, marker))
        os.chmod(path, stat.S_IRWXU)
        d = self.dialogue("norelay on\n", clear_passwords=True, reactor=reactor)
        d.send("EHLO h.sender.net")
        self.login(d)
        out = d.send("MAIL FROM:<boss@gnot.example.org>", "RCPT TO:<x@foreign.example>",
                     "RCPT TO:<bob>", "DATA", "From: boss@gnot.example.org", "", "hi", ".")
        self.assertEqual(out[-2:], ["354 Input message; end with <CRLF>.<CRLF>",
                                    "250 2.5.0 sent"])
        self.assertFalse(os.path.exists(marker))
        [msg] = self.mbox("bob")
        self.assertIsNone(msg.get_all("X-warning"))
        self.assertEqual(msg["Received"].split(";")[0].split(),
                         ["from", "h.sender.net", "([127.0.0.2])", "(Authenticated", "sender:",
                          "alice)", "by", "gnot", "with", "ESMTPA"])

    def test_unauthenticated_forgery_still_tagged(self):
        d = self.dialogue("norelay on\n")
        d.send("EHLO h.sender.net", "MAIL FROM:<boss@gnot.example.org>", "RCPT TO:<bob>",
               "DATA", "From: boss@gnot.example.org", "", "hi", ".")
        [msg] = self.mbox("bob")
        self.assertEqual(msg.get_all("X-warning"),
                         ["suspect envelope domain", "suspect From: domain"])


class StartTLSTests(Case):
    def test_item86_starttls(self):
        d = self.dialogue()
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("STARTTLS"), ["500 5.5.1 illegal command or bad syntax"])
        d = self.dialogue(cert=True)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("STARTTLS"), ["220 2.0.0 Go ahead make my day"])
        self.assertIsInstance(d.transport.tlsContext, tls.CertificateFile)

    def test_plaintext_pipelined_after_starttls_is_discarded(self):
        d = self.dialogue(cert=True)
        d.send("EHLO h.sender.net")
        out = d.raw(b"STARTTLS\r\nMAIL FROM:<evil@h.sender.net>\r\nRCPT TO:<bob>\r\n"
                    b"DATA\r\n")
        self.assertEqual(out, ["220 2.0.0 Go ahead make my day"])
        self.assertEqual(d.transport.clearBeforeTLS, b"220 2.0.0 Go ahead make my day\r\n")
        # what comes now is "inside TLS": the injected commands left no trace
        self.assertEqual(d.send("RCPT TO:<bob>"), ["503 Start by saying HELO, please"])
        self.assertEqual(d.send("EHLO h.sender.net", "MAIL FROM:<a@h.sender.net>"),
                         ["250-gnot.example.org you are h.sender.net",
                          "250-ENHANCEDSTATUSCODES"] + OURS + ["250 AUTH CRAM-MD5 PLAIN LOGIN",
                          "250 2.0.0 sender is h.sender.net!a"])
        self.assertEqual(d.send("DATA"), ["503 2.5.2 Data without RCPT TO:"])

    def test_starttls_forgets_helo_envelope_and_auth(self):
        d = self.dialogue(cert=True, require_auth=True)
        d.send("EHLO h.sender.net")
        [challenge] = d.send("AUTH CRAM-MD5")
        d.send(cram_answer(challenge))
        d.send("MAIL FROM:<a@h.sender.net>")
        d.send("STARTTLS")
        self.assertEqual(d.send("MAIL FROM:<a@h.sender.net>"),
                         ["530 5.7.0 Authentication required"])
        d.send("EHLO h.sender.net")
        self.assertMailNeedsLogin(d)

    def test_starttls_not_offered_again(self):
        d = self.dialogue(cert=True)
        d.send("EHLO h.sender.net", "STARTTLS")
        self.assertNotIn("250-STARTTLS", d.send("EHLO h.sender.net"))
        self.assertEqual(d.send("STARTTLS"), ["503 5.5.1 Error: TLS already active"])

    def test_implicit_tls_counts_as_encrypted(self):
        d = self.dialogue(cert=True, implicit_tls=True)
        self.assertEqual(d.send("EHLO h.sender.net")[1:],
                         ["250-ENHANCEDSTATUSCODES"] + OURS + ["250 AUTH CRAM-MD5 PLAIN LOGIN"])
        self.login(d)
        d.send("MAIL FROM:<a@h.sender.net>", "RCPT TO:<bob>", "DATA", "Subject: x", "", "b", ".")
        [msg] = self.mbox("bob")
        received = msg["Received"]
        self.assertIn("(using TLS)", received)
        self.assertIn("(Authenticated sender: alice)", received)
        self.assertIn("by gnot with ESMTPSA;", received)

    def test_starttls_with_unusable_context_is_454(self):
        class Broken:
            def getContext(self):
                raise ValueError("no key")

        s = testing.make_settings("", root=self.root)
        d = testing.Dialogue(s, peer=self.peer, contextFactory=Broken(),
                             resolver=testing.FakeResolver(ZONE))
        self.addCleanup(d.close)
        d.send("EHLO h.sender.net")
        self.assertEqual(d.send("STARTTLS"), ["454 4.7.5 TLS not available"])
        self.assertEqual(d.send("NOOP"), NOOP_OK)
        self.flushLoggedErrors()


class BruteForceTests(Case):
    def failing(self, d, n=1):
        return [d.send("AUTH PLAIN " + plain(password="guess%d" % i)) for i in range(n)]

    def test_failures_wait_progressively_then_close(self):
        d = self.dialogue(clear_passwords=True, auth_fail_delay=1.0, auth_max_failures=3)
        d.send("EHLO h.sender.net")
        self.assertEqual(self.failing(d), [[]])
        d.clock.advance(0.99)
        self.assertEqual(d.take(), [])
        d.clock.advance(0.01)
        self.assertEqual(d.take(), ["535 5.7.1 Authentication failed"])
        self.assertEqual(self.failing(d), [[]])
        d.clock.advance(1.99)
        self.assertEqual(d.take(), [])
        d.clock.advance(0.01)
        self.assertEqual(d.take(), ["535 5.7.1 Authentication failed"])
        self.failing(d)
        d.clock.advance(4)
        self.assertEqual(d.take(), ["421 4.7.0 gnot.example.org Too many failed "
                                    "authentication attempts; closing connection"])
        self.assertTrue(d.transport.disconnecting)

    def test_delay_follows_the_peer_across_connections(self):
        s = testing.make_settings("", root=self.root, clear_passwords=True,
                                  auth_fail_delay=1.0, auth_max_failures=3)
        d = testing.Dialogue(s, peer=self.peer, resolver=testing.FakeResolver(ZONE))
        d.send("EHLO h.sender.net")
        self.failing(d)
        d.clock.advance(1)
        self.assertEqual(d.send("QUIT")[-1], "221 2.0.0 Successful termination")
        again = d.factory.buildProtocol(testing.address(self.peer, 4322))
        t = testing.FakeTLSTransport(peerAddress=testing.address(self.peer, 4322),
                                     hostAddress=testing.address("127.0.0.1", 25))
        again.makeConnection(t)
        again.dataReceived(b"EHLO h.sender.net\r\nAUTH PLAIN " + plain(password="x").encode()
                           + b"\r\n")
        t.clear()
        d.clock.advance(1.99)
        self.assertEqual(t.value(), b"")
        d.clock.advance(0.01)
        self.assertEqual(t.value(), b"535 5.7.1 Authentication failed\r\n")
        # a success clears the record
        again.dataReceived(b"AUTH PLAIN " + plain().encode() + b"\r\n")
        self.assertEqual(t.value().splitlines()[-1], b"235 2.0.0 Authentication successful")
        self.assertTrue(d.factory.store.throttle.begin(self.peer))
        self.assertEqual(d.factory.store.throttle.failed(self.peer), (1.0, 1))
        again.connectionLost(None)
        again.setTimeout(None)
        d.close()

    def test_failures_are_logged_without_the_password(self):
        d = self.dialogue(clear_passwords=True, auth_max_failures=10)
        d.send("EHLO h.sender.net")
        with capturedLogs() as events:
            d.send("AUTH PLAIN " + plain(password="hunter2-guess"))
            d.send("AUTH LOGIN", b64("alice"), b64("hunter2-login"))
            [challenge] = d.send("AUTH CRAM-MD5")
            d.send(cram_answer(challenge, password="hunter2-cram"))
            self.login(d)
        from twisted.logger import formatEvent
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("authentication failed: alice from 127.0.0.2 (PLAIN, failure 1)", text)
        self.assertIn("auth(LOGIN, (protected)) from h.sender.net", text)
        self.assertIn("authenticated alice from 127.0.0.2", text)
        for secret in ("hunter2", SECRET, plain(), b64(SECRET)):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr(events))


class GarbageTests(Case):
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(st.lists(st.one_of(
        st.binary(max_size=80),
        st.sampled_from([b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"AUTH PLAIN =",
                         b"AUTH plain AGFsaWNlAA==", b"*", b"=", b"AUTH X", b"AUTH LOGIN *",
                         b"AUTH", b"AUTH PLAIN a b", b"AUTH CRAM-MD5 =", b"YWxpY2U=",
                         b"AUTH PLAIN " + base64.b64encode(b"\0\0\0\0")]),
        st.binary(max_size=60).map(lambda b: b"AUTH PLAIN " + base64.b64encode(b)),
        st.binary(max_size=60).map(base64.b64encode),
    ), max_size=12))
    def test_auth_garbage_never_drops_the_session(self, lines):
        d = self.dialogue(clear_passwords=True, auth_max_failures=1000)
        d.send("EHLO h.sender.net")
        for line in lines:
            line = line.replace(b"\r", b"").replace(b"\n", b"")
            if [w.upper() for w in line.split()[:1]] == [b"QUIT"]:
                continue  # the one line that rightly ends the session
            out = d.raw(line + b"\r\n")
            self.assertFalse(d.transport.disconnecting, (line, out))
            for reply in out:
                self.assertRegex(reply, r"^[2345]\d\d[ -]")
        d.send("*")  # end any exchange under way
        self.assertEqual(d.send("NOOP"), NOOP_OK)
        self.assertEqual(self.flushLoggedErrors(), [])


class PasswordFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="upasmail-pw-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "passwd")

    def write(self, text, mode=0o600):
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.chmod(self.path + ".new", mode)
        os.replace(self.path + ".new", self.path)

    def check(self, checker, creds):
        return checker.requestAvatarId(creds)

    def test_parse_forms_and_errors(self):
        entries = passwd.parse("# users\n\nalice:pw\nbob:{PLAIN}$2b$x\ncarol:%s\n"
                               "dave:{BLF-CRYPT}%s:extra\n" % (HASHED, HASHED))
        self.assertEqual(entries[b"alice"], (b"pw", False))
        self.assertEqual(entries[b"bob"], (b"$2b$x", False))
        self.assertEqual(entries[b"carol"], (HASHED.encode(), True))
        self.assertEqual(entries[b"dave"], (HASHED.encode(), True))
        for text, err in [("alice\n", "pw:1: expected user:secret"),
                          ("a:x\na:y\n", "pw:2: user a listed twice"),
                          ("a:{SHA512-CRYPT}$6$x\n", "pw:1: unsupported password scheme"),
                          ("a:$2b$12$short\n", "pw:1: malformed bcrypt hash"),
                          ("a:\n", "pw:1: empty secret"), (":x\n", "pw:1: expected")]:
            with self.assertRaises(passwd.ConfigError) as e:
                passwd.parse(text, "pw")
            self.assertIn(err, str(e.exception))

    def test_plaintext_hashed_and_cram(self):
        self.write("alice:%s\nbob:%s\n" % (SECRET, HASHED))
        checker = passwd.PasswordFile(self.path)
        ok = self.check(checker, credentials.UsernamePassword(b"alice", SECRET.encode()))
        self.assertEqual(self.successResultOf(ok), b"alice")
        ok = self.check(checker, credentials.UsernamePassword(b"bob", b"hashed-pw"))
        self.assertEqual(self.successResultOf(ok), b"bob")
        for user, pw in ((b"bob", b"x"), (b"alice", b"x"), (b"nobody", b"x"),
                         (b"bob", b"y" * 100)):
            self.failureResultOf(self.check(checker, credentials.UsernamePassword(user, pw)),
                                 error.UnauthorizedLogin)
        cram = credentials.CramMD5Credentials(b"gnot")
        cram.challenge = b"<1.2@gnot>"
        cram.setResponse(b"alice " + passwd.cram_md5_digest(SECRET.encode(), cram.challenge))
        self.assertEqual(self.successResultOf(self.check(checker, cram)), b"alice")
        cram.setResponse(b"bob " + passwd.cram_md5_digest(b"hashed-pw", cram.challenge))
        self.failureResultOf(self.check(checker, cram), error.UnauthorizedLogin)
        self.assertFalse(checker.cram_md5_ok())

    def test_reload_keeps_last_good_and_removal_turns_auth_off(self):
        self.write("alice:one\n")
        checker = passwd.PasswordFile(self.path)
        self.assertTrue(checker.cram_md5_ok())
        self.write("alice:two\n")
        self.successResultOf(self.check(checker, credentials.UsernamePassword(b"alice", b"two")))
        with capturedLogs() as events:
            self.write("alice:two\nbroken line\n")
            self.successResultOf(self.check(
                checker, credentials.UsernamePassword(b"alice", b"two")))
        self.assertIn("passwd:2: expected user:secret", repr(events))
        os.unlink(self.path)
        self.assertFalse(checker.available())
        self.failureResultOf(self.check(checker, credentials.UsernamePassword(b"a", b"b")),
                             passwd.PasswordFileUnavailable)

    def test_world_readable_plaintext_is_warned_about(self):
        self.write("alice:pw\n", mode=0o644)
        with capturedLogs() as events:
            passwd.PasswordFile(self.path).available()
        self.assertIn("chmod 600", repr(events))
        self.assertNotIn("pw\\n", repr(events))

    def test_main_prints_a_bcrypt_line(self):
        import io
        from unittest import mock
        out = io.StringIO()
        with mock.patch("sys.stdin", io.StringIO("pass word\n")), mock.patch("sys.stdout", out):
            self.assertEqual(passwd.main(["carol"]), 0)
        user, hashed = out.getvalue().strip().split(":", 1)
        self.assertEqual(user, "carol")
        self.assertTrue(bcrypt.checkpw(b"pass word", hashed.encode()))
        self.assertEqual(passwd.parse(out.getvalue())[b"carol"][1], True)


class PureTests(unittest.TestCase):
    def test_offered(self):
        self.assertEqual(auth.offered(False, False, True), ["CRAM-MD5"])
        self.assertEqual(auth.offered(True, False, True), ["CRAM-MD5", "PLAIN", "LOGIN"])
        self.assertEqual(auth.offered(False, True, False), ["PLAIN", "LOGIN"])
        self.assertEqual(auth.offered(False, False, False), [])

    def test_exchange_steps(self):
        ex = auth.Exchange("LOGIN", None, "gnot", 0)
        self.assertEqual(ex.start().text, "VXNlcm5hbWU6")
        self.assertEqual(ex.respond(b"YWxpY2U=").text, "UGFzc3dvcmQ6")
        creds = ex.respond(b"cHc=").value
        self.assertEqual((creds.username, creds.password), (b"alice", b"pw"))
        ex = auth.Exchange("PLAIN", "=", "gnot", 0)
        self.assertEqual(ex.start().code, 501)

    def test_throttle(self):
        from twisted.internet import task
        clock = task.Clock()
        t = auth.Throttle(clock, unit=1.0, cap=30.0, limit=100, memory=900.0, size=3)
        waits = []
        for _ in range(7):
            self.assertTrue(t.begin("a"))
            wait, _ = t.failed("a")
            waits.append(wait)
            clock.advance(wait)
        self.assertEqual(waits, [1, 2, 4, 8, 16, 30, 30])
        clock.advance(900)
        t.begin("a")
        self.assertEqual(t.failed("a"), (1, 1))
        for ip in "bcdef":
            t.begin(ip)
            t.failed(ip)
        self.assertLessEqual(len(t._records), 3)
        t.begin("f")
        t.succeeded("f")
        clock.advance(1)  # f's failure has been answered
        t.begin("f")
        self.assertEqual(t.failed("f"), (1, 1))

    def test_printable_user(self):
        self.assertEqual(auth.printable_user(b"al(ice)\r\n\xff"), "al?ice????")
        self.assertEqual(auth.printable_user("x" * 70), "x" * 64 + "...")

    def test_received_line_forms(self):
        self.assertEqual(pipemsg.received_line("h", "1.2.3.4", "gnot", "D"),
                         "Received: from h ([1.2.3.4]) by gnot; D\n")
        self.assertEqual(
            pipemsg.received_line("h", "1.2.3.4", "gnot", "D", tls="TLSv1.3 with cipher X "
                                  "(256/256 bits)", user="alice"),
            "Received: from h ([1.2.3.4])\n\t(using TLSv1.3 with cipher X (256/256 bits))\n"
            "\t(Authenticated sender: alice)\n\tby gnot with ESMTPSA; D\n")
        self.assertTrue(pipemsg.received_line("h", "i", "g", "D", tls="TLS")
                        .endswith("\tby g with ESMTPS; D\n"))

    def test_redactor(self):
        r = trace.AuthRedactor()
        lines = [b"EHLO x\r\n", b"AUTH PLAIN c2VjcmV0\r\n", b"MAIL FROM:<a@b>\r\n",
                 b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"cGFzcw==\r\n", b"auth login dXNlcg==\r\n",
                 b"cGFzcw==\r\n", b"AUTH CRAM-MD5\r\n", b"YWxpY2UgZGln\r\n", b"DATA\r\n"]
        self.assertEqual([r.line(l) for l in lines],
                         [b"EHLO x\r\n", b"AUTH PLAIN <removed>\r\n", b"MAIL FROM:<a@b>\r\n",
                          b"AUTH LOGIN\r\n", b"<removed>\r\n", b"<removed>\r\n",
                          b"auth login <removed>\r\n", b"<removed>\r\n", b"AUTH CRAM-MD5\r\n",
                          b"<removed>\r\n", b"DATA\r\n"])
        r.server(b"354 go ahead\r\n")
        self.assertEqual(r.line(b"AUTH PLAIN in a message body\r\n"),
                         b"AUTH PLAIN in a message body\r\n")
        self.assertEqual(r.line(b".\r\n"), b".\r\n")
        self.assertEqual(r.line(b"AUTH PLAIN eA==\r\n"), b"AUTH PLAIN <removed>\r\n")


class TraceTests(Case):
    def test_d_trace_holds_no_password(self):
        from twisted.internet import task
        from twisted.internet.testing import StringTransport
        from upasmail import service
        s = testing.make_settings("", root=self.root, clear_passwords=True, debug=True)
        clock = task.Clock()
        factory = service.makeSmtpdFactory(s, reactor=clock, clock=clock,
                                           run_blocking=testing.run_now,
                                           resolver=testing.FakeResolver(ZONE))
        traced = trace.TraceFactory(factory, s.path("log_dir"), clock)
        p = traced.buildProtocol(testing.address("127.0.0.2", 1))
        t = StringTransport(peerAddress=testing.address("127.0.0.2", 1),
                            hostAddress=testing.address("127.0.0.1", 25))
        p.makeConnection(t)
        wire = ("EHLO h.sender.net\r\nAUTH PLAIN %s\r\nAUTH LOGIN\r\n" % plain()).encode()
        for i in range(0, len(wire), 7):  # lines split across packets
            p.dataReceived(wire[i:i + 7])
        p.dataReceived(b64("alice").encode() + b"\r\n")
        p.dataReceived(b64(SECRET).encode() + b"\r\nQUIT\r\n")
        p.connectionLost(None)
        [name] = os.listdir(os.path.join(s.path("log_dir"), "smtpdb"))
        with open(os.path.join(s.path("log_dir"), "smtpdb", name)) as f:
            text = f.read()
        self.assertIn("AUTH PLAIN <removed>", text)
        self.assertIn("235 2.0.0 Authentication successful", text)
        for secret in (SECRET, plain(), b64(SECRET), b64("alice")):
            self.assertNotIn(secret, text)


class CertificateTests(Case):
    def test_only_tls12_and_later(self):
        from OpenSSL import SSL
        options = self.cert_file().load()
        flags = options.getContext().set_options(0)  # returns the options in force
        self.assertTrue(flags & SSL.OP_NO_TLSv1 and flags & SSL.OP_NO_TLSv1_1)
        self.assertFalse(flags & SSL.OP_NO_TLSv1_2)

    def test_errors_name_the_problem(self):
        cert, key = pem()
        other, _ = testing.self_signed_pem("other")
        for text, err in [("", "no PEM certificate found"), (cert, "no PEM private key found"),
                          (other + key, "the private key does not belong to the certificate"),
                          (cert + key.replace("A", "B", 5), "unusable certificate or key")]:
            with self.assertRaises(passwd.ConfigError) as e:
                tls.options_from_pem(text, None, "c.pem")
            self.assertIn("c.pem: " + err, str(e.exception))
        self.assertIsNotNone(tls.options_from_pem(cert, key, "c.pem"))

    def test_renewed_certificate_is_used_and_a_broken_one_is_not(self):
        cf = self.cert_file()
        first = cf.load()
        self.assertIs(cf.options(), first)
        cert, key = testing.self_signed_pem("renewed")
        with open(cf.cert_path, "w") as f:
            f.write(cert + key)
        second = cf.options()
        self.assertIsNot(second, first)
        with capturedLogs() as events:
            with open(cf.cert_path, "w") as f:
                f.write("half a file")
            self.assertIs(cf.options(), second)
        self.assertIn("keeping the previous certificate", repr(events))


class RealTLSTests(Case):
    """A real handshake on 127.0.0.1: Python's ssl client against the -c options."""

    def listen(self):
        s = testing.make_settings("", root=self.root)
        factory = testing.makeSmtpdFactory(s, reactor=reactor, run_blocking=testing.run_now,
                                           resolver=testing.FakeResolver(ZONE),
                                           contextFactory=self.cert_file())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port

    def handshake(self, ciphers="DEFAULT", **client):
        import ssl

        from twisted.internet import threads

        port = self.listen()

        def talk():
            import smtplib
            ctx = ssl.create_default_context(cafile=self.cert_file().cert_path)
            ctx.check_hostname = False
            ctx.set_ciphers(ciphers)
            with warnings.catch_warnings():  # old TLS versions are deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                for k, v in client.items():
                    setattr(ctx, k, v)
            with smtplib.SMTP("127.0.0.1", port.getHost().port,
                              local_hostname="h.sender.net", timeout=30) as c:
                c.starttls(context=ctx)
                return c.sock.version(), c.ehlo()

        return threads.deferToThread(talk)

    def test_injected_plaintext_after_starttls_is_ignored(self):
        import socket
        import ssl

        from twisted.internet import threads

        port = self.listen()

        def talk():
            with socket.create_connection(("127.0.0.1", port.getHost().port),
                                          source_address=("127.0.0.2", 0), timeout=30) as raw:
                f = raw.makefile("rb")
                f.readline()
                raw.sendall(b"EHLO h.sender.net\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                # one packet: STARTTLS plus commands an attacker slipped in
                raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@h.sender.net>\r\n"
                            b"RCPT TO:<bob>\r\n")
                go_ahead = f.readline()
                ctx = ssl.create_default_context(cafile=self.cert_file().cert_path)
                ctx.check_hostname = False
                with ctx.wrap_socket(raw) as tls_sock:
                    g = tls_sock.makefile("rb")
                    tls_sock.sendall(b"RCPT TO:<bob>\r\nQUIT\r\n")
                    return go_ahead, g.readline(), g.readline()

        def check(lines):
            self.assertEqual(lines, (b"220 2.0.0 Go ahead make my day\r\n",
                                     b"503 Start by saying HELO, please\r\n",
                                     b"221 2.0.0 Successful termination\r\n"))

        return threads.deferToThread(talk).addCallback(check)

    def test_tls13_handshake_and_no_starttls_in_the_new_ehlo(self):
        def check(result):
            version, (code, text) = result
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            self.assertEqual(code, 250)
            self.assertNotIn(b"STARTTLS", text)
            self.assertIn(b"AUTH CRAM-MD5 PLAIN LOGIN", text)

        return self.handshake().addCallback(check)

    def test_tls11_client_is_refused(self):
        import ssl

        def check(failure):
            failure.trap(ssl.SSLError)
            self.assertIn("PROTOCOL_VERSION", str(failure.value))  # the server's alert

        # SECLEVEL=0 lets this client offer TLS 1.1: the refusal must be the server's
        d = self.handshake(ciphers="DEFAULT:@SECLEVEL=0", minimum_version=ssl.TLSVersion.TLSv1_1,
                           maximum_version=ssl.TLSVersion.TLSv1_1)
        d.addCallbacks(lambda r: self.fail("TLS 1.1 was accepted: %r" % (r,)), check)
        return d
