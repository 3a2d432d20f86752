"""The upas smtp client (issue 6): checklist items 98-120 of spec §3, each its
own test, against ``testing.ScriptedSMTPServer`` on 127.0.0.x and a
``testing.FakeResolver``; every client time limit runs on a task.Clock.

Mail servers listen on 127.0.0.2 (127.0.0.1 is never a mail server for
an MX, as upas says); 127.0.0.3 has nothing listening (refused).
"""

import base64
import hashlib
import hmac
import io
import os

from twisted.internet import defer, reactor, task
from twisted.names import dns
from twisted.trial import unittest

from upasmail import client, convert, mxdial, testing, thumbprint, tls

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MSG = b"Subject: test\n\nbody\n"


def A(ip):
    return dns.Record_A(ip)


def MX(pref, name):
    return dns.Record_MX(pref, name)


ZONE = {
    "example.com": [MX(10, "mx.example.com")],
    "mx.example.com": [A("127.0.0.2")],
    "two.example": [MX(20, "b.two.example"), MX(10, "a.two.example")],
    "a.two.example": [A("127.0.0.3")],
    "b.two.example": [A("127.0.0.2")],
    "plain.example": [A("127.0.0.2")],
    "loop.example": [MX(10, "mx.loop.example")],
    "mx.loop.example": [A("127.0.0.1")],
    "nullmx.example": [MX(0, "")],
    "gw.example": [A("127.0.0.2")],
}


class Case(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.scripts = []
        self.debug = []

    def serve(self, interface="127.0.0.2", **kw):
        script = testing.ScriptedSMTPServer(**kw)
        port = script.listen(reactor, interface)
        self.port = port.getHost().port
        self.scripts.append(script)
        self.addCleanup(self._stop, port, script)
        return script

    @defer.inlineCallbacks
    def _stop(self, port, script):
        yield defer.gatherResults([s.closed for s in script.sessions])
        yield port.stopListening()

    def options(self, **kw):
        kw.setdefault("sysname", "gnot")
        kw.setdefault("domain", ".example.org")
        kw.setdefault("debug", self.debug.append)
        return client.ClientOptions(**kw)

    def deliver(self, msg=MSG, dest="tcp!example.com!%(port)d", sender="alice",
                rcpts=("bob@example.net",), zone=None, options=None, **kw):
        self.resolver = testing.FakeResolver(ZONE if zone is None else zone)
        dest = dest % {"port": getattr(self, "port", 25)}
        return client.deliver(io.BytesIO(msg), dest, sender, rcpts,
                              options or self.options(**kw), reactor, self.resolver, self.clock)

    def commands(self, script=None):
        return (script or self.scripts[-1]).sessions[-1].commands


class FindingTheServerTests(Case):
    @defer.inlineCallbacks
    def test_item98_mx_in_preference_order_then_a_record(self):
        s = self.serve()
        # a.two.example (pref 10) refuses the connection, b.two.example takes it
        r = yield self.deliver(dest="tcp!two.example!%(port)d")
        self.assertEqual(r.status, "")
        dialed = [line for line in self.debug if line.startswith("dialing")]
        self.assertEqual(dialed, ["dialing (a.two.example:127.0.0.3)",
                                  "dialing (b.two.example:127.0.0.2)"])
        self.assertEqual(len(s.sessions), 1)
        self.debug[:] = []
        r = yield self.deliver(dest="tcp!plain.example!%(port)d")  # no MX: its A record
        self.assertEqual(r.status, "")
        self.assertIn("dialing (127.0.0.2:127.0.0.2)", self.debug)
        self.assertIn(("plain.example", dns.MX), self.resolver.queries)

    @defer.inlineCallbacks
    def test_item99_loopback_mx_is_illegal(self):
        s = self.serve(interface="127.0.0.1")
        r = yield self.deliver(dest="tcp!loop.example!%(port)d")
        self.assertEqual(r.status, client.PERMANENT)
        self.assertEqual(r.exit_code, 69)
        self.assertIn("illegal", r.report[0])
        self.assertEqual(s.sessions, [])

    @defer.inlineCallbacks
    def test_item100_busted_mx_skipped(self):
        self.serve()
        r = yield self.deliver(dest="tcp!two.example!%(port)d", busted=("a.two.example",))
        self.assertEqual(r.status, "")
        self.assertEqual([line for line in self.debug if line.startswith("dialing")],
                         ["dialing (b.two.example:127.0.0.2)"])

    @defer.inlineCallbacks
    def test_item101_address_literal_destination(self):
        r = yield self.deliver(dest="net![192.0.2.1]")
        self.assertEqual(r.status, client.PERMANENT)
        self.assertEqual(r.report, ["smtp: delivery to net![192.0.2.1] failed: illegal address "
                                    "(net![192.0.2.1])"])
        self.assertEqual(self.resolver.queries, [])

    @defer.inlineCallbacks
    def test_null_mx_nxdomain_and_servfail(self):
        r = yield self.deliver(dest="nullmx.example")
        self.assertEqual((r.status, "null MX" in r.report[0]), (client.PERMANENT, True))
        r = yield self.deliver(dest="nowhere.example")
        self.assertEqual(r.status, client.PERMANENT)
        self.assertIn("can't translate nowhere.example", r.report[0])
        self.resolver = None
        r = yield client.deliver(io.BytesIO(MSG), "broken.example", "alice", ["bob"],
                                 self.options(), reactor,
                                 testing.FakeResolver(failing=["broken.example"]), self.clock)
        self.assertEqual((r.status, r.exit_code), (client.RETRY, 75))
        self.assertEqual([x.status for x in r.recipients], [client.TEMPORARY])

    @defer.inlineCallbacks
    def test_connection_refused_everywhere_is_temporary(self):
        r = yield self.deliver(dest="tcp!a.two.example!1")
        self.assertEqual(r.status, client.RETRY)
        self.assertIn("connection refused", r.report[0])

    @defer.inlineCallbacks
    def test_gateway_when_nothing_else_works(self):
        s = self.serve()
        r = yield self.deliver(dest="tcp!nowhere.example!%(port)d",
                               gateway="tcp!gw.example!%d" % self.port)
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[2], "RCPT TO:<bob@example.net>")

    def test_dial_strings(self):
        p = mxdial.parse_dial
        self.assertEqual(p("example.com"), mxdial.DialString("example.com", 25, "net"))
        self.assertEqual(p("tcp!Mail.Example.com!ssmtp").port, 465)
        self.assertEqual(p("/net.alt/tcp!h.example!587"), mxdial.DialString("h.example", 587,
                                                                            "tcp"))
        for bad in ("net![192.0.2.1]", "il!h!25", "net!$smtp", "tcp!h!nosuchservice"):
            with self.assertRaises(mxdial.DialError) as e:
                p(bad)
            self.assertTrue(e.exception.permanent, bad)


class ConversationTests(Case):
    @defer.inlineCallbacks
    def test_item102_greeting(self):
        self.serve(greeting="554 go away")
        r = yield self.deliver()
        self.assertEqual(r.status, client.PERMANENT)
        self.assertIn("554 go away", r.report)
        self.serve(greeting="421 busy")
        r = yield self.deliver()
        self.assertEqual(r.status, client.RETRY)
        self.assertEqual(self.commands(), ["QUIT"])

    @defer.inlineCallbacks
    def test_item103_helo_after_ehlo_500(self):
        s = self.serve(replies={"EHLO": "500 what"})
        r = yield self.deliver()
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[:2], ["EHLO gnot.example.org", "HELO gnot.example.org"])

    @defer.inlineCallbacks
    def test_item104_ehlo_name_is_sysname_with_domain(self):
        s = self.serve()
        yield self.deliver(host="other", domain=".cs.example.com")
        self.assertEqual(self.commands(s)[0], "EHLO gnot.cs.example.com")

    @defer.inlineCallbacks
    def test_item105_mail_from(self):
        s = self.serve()
        for sender, want in (("alice", "MAIL FROM:<alice@gnot.example.com>"),
                             ("/dev/null", "MAIL FROM:<>"),
                             ("example.org!alice", "MAIL FROM:<alice@example.org>")):
            yield self.deliver(sender=sender, host="gnot", domain=".example.com")
            self.assertEqual(self.commands(s)[1], want)

    @defer.inlineCallbacks
    def test_item106_rcpt_to(self):
        s = self.serve()
        yield self.deliver(rcpts=("example.net!bob", "a.b!c.d!bob", "bob"))
        self.assertEqual(self.commands(s)[2:5], ["RCPT TO:<bob@example.net>",
                                                 "RCPT TO:<@a.b:bob@c.d>",
                                                 "RCPT TO:<bob@example.com>"])

    @defer.inlineCallbacks
    def test_item107_all_recipients_refused(self):
        s = self.serve(replies={"RCPT": "550 5.1.1 no such user"})
        r = yield self.deliver(rcpts=("bob", "eve"))
        self.assertEqual(r.status, client.PERMANENT)
        self.assertNotIn("DATA", self.commands(s))
        self.assertRegex(r.report[0], r" connect to tcp!example.com!\d+ "
                                      r"\(mx.example.com:127.0.0.2\) rcptto:$")
        self.assertEqual(r.report[1], "550 5.1.1 no such user")
        self.assertEqual([x.status for x in r.recipients], [client.PERMANENT_FAILURE] * 2)

    @defer.inlineCallbacks
    def test_item108_temporary_recipient_means_no_data(self):
        s = self.serve(replies={"RCPT TO:<eve@example.com>": "451 4.3.0 later"})
        r = yield self.deliver(rcpts=("bob", "eve"))
        self.assertEqual((r.status, r.exit_code), (client.RETRY, 75))
        self.assertNotIn("DATA", self.commands(s))
        self.assertEqual([x.status for x in r.recipients], [client.TEMPORARY] * 2)

    @defer.inlineCallbacks
    def test_item109_partial_success(self):
        s = self.serve(replies={"RCPT TO:<eve@example.com>": "550 5.1.1 eve unknown"})
        r = yield self.deliver(rcpts=("bob", "eve"))
        self.assertIn("DATA", self.commands(s))
        self.assertEqual(r.status, client.PERMANENT)
        self.assertIn("  mail to eve@example.com failed: 550 5.1.1 eve unknown", r.report)
        self.assertEqual([(x.status, x.rcpt) for x in r.recipients],
                         [(client.DELIVERED, "bob@example.com"),
                          (client.PERMANENT_FAILURE, "eve@example.com")])

    @defer.inlineCallbacks
    def test_item110_final_reply(self):
        for reply, status in (("452 4.3.1 full", client.RETRY),
                              ("554 5.6.0 no", client.PERMANENT), ("250 ok", "")):
            self.serve(replies={".": reply})
            r = yield self.deliver()
            self.assertEqual(r.status, status, reply)
            want = {"": client.DELIVERED, client.RETRY: client.TEMPORARY,
                    client.PERMANENT: client.PERMANENT_FAILURE}[status]
            self.assertEqual(r.recipients[0].status, want)

    @defer.inlineCallbacks
    def test_item116_auth_mechanism_choice(self):
        creds = lambda server, user: ("alice", "pw")  # noqa: E731
        s = self.serve(replies={"EHLO": "250-x\r\n250 AUTH PLAIN"})
        r = yield self.deliver(auth=True, auth_in_clear=True, credentials=creds)
        self.assertEqual(r.status, "")
        self.assertEqual(s.sessions[-1].auth,
                         ["AUTH PLAIN " + base64.b64encode(b"\0alice\0pw").decode()])
        s = self.serve(replies={"EHLO": "250-x\r\n250 AUTH LOGIN PLAIN"})
        yield self.deliver(auth=True, auth_in_clear=True, credentials=creds)
        self.assertEqual(s.sessions[-1].auth, ["AUTH LOGIN", "YWxpY2U=", "cHc="])
        s = self.serve(replies={"EHLO": "250-x\r\n250 AUTH LOGIN CRAM-MD5 PLAIN"})
        yield self.deliver(auth=True, auth_in_clear=True, credentials=creds)
        digest = hmac.new(b"pw", b"<12345@fake.example>", hashlib.md5).hexdigest()
        self.assertEqual(s.sessions[-1].auth,
                         ["AUTH CRAM-MD5", base64.b64encode(b"alice " + digest.encode()).decode()])
        self.assertNotIn("cHc=", "\n".join(self.debug))  # -d never shows the password

    @defer.inlineCallbacks
    def test_auth_failure_and_missing_credentials(self):
        self.serve(replies={"EHLO": "250-x\r\n250 AUTH PLAIN", "AUTH": "535 5.7.1 no"})
        r = yield self.deliver(auth=True, auth_in_clear=True,
                               credentials=lambda s, u: ("alice", "pw"))
        self.assertEqual(r.status, client.RETRY)
        self.serve(replies={"EHLO": "250-x\r\n250 AUTH PLAIN"})
        r = yield self.deliver(auth=True, auth_in_clear=True)
        self.assertEqual(r.status, client.PERMANENT)
        self.assertIn("failed to get userpasswd", r.report[0])
        self.serve(replies={"EHLO": "250-x\r\n250 AUTH XOAUTH2"})
        r = yield self.deliver(auth=True, auth_in_clear=True,
                               credentials=lambda s, u: ("alice", "pw"))
        self.assertEqual((r.status, r.exit_code), ("No supported AUTH method", 69))

    @defer.inlineCallbacks
    def test_item117_auth_needs_tls_or_i(self):
        s = self.serve(replies={"EHLO": "250-x\r\n250 AUTH PLAIN"})
        r = yield self.deliver(auth=True, credentials=lambda server, user: ("a", "b"))
        self.assertEqual(r.status, "")
        self.assertEqual(s.sessions[-1].auth, [])

    @defer.inlineCallbacks
    def test_item118_ping(self):
        s = self.serve()
        r = yield self.deliver(ping=True, rcpts=("bob", "eve"))
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[-1], "QUIT")
        self.assertNotIn("DATA", self.commands(s))
        self.assertEqual([x.status for x in r.recipients], [client.ACCEPTED] * 2)

    @defer.inlineCallbacks
    def test_item120_silent_server_times_out(self):
        for ping, units in ((False, 600), (True, 100)):
            s = self.serve(silent=("RCPT",))
            d = self.deliver(ping=ping)
            yield s.seen("RCPT")
            self.clock.advance(units - 1)
            self.assertFalse(d.called)
            self.clock.advance(1)
            r = yield d
            self.assertEqual(r.report, ["smtp timeout: connection to tcp!example.com!%d timed "
                                        "out" % self.port])
            self.assertEqual(r.status, client.RETRY)

    @defer.inlineCallbacks
    def test_avoidant_server(self):
        # greets only once it hears something: the 220 is thrown away, NOOP's 250 greets
        s = self.serve(greeting=None, replies={"NOOP": "220 late greeting\r\n250 ok"})
        r = yield self.deliver(avoidant=True)
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[:2], ["NOOP", "EHLO gnot.example.org"])

    @defer.inlineCallbacks
    def test_no_recipients_is_success_without_data(self):
        s = self.serve()
        r = yield self.deliver(rcpts=())
        self.assertEqual(r.status, "")
        self.assertNotIn("DATA", self.commands(s))


class TLSTests(Case):
    def setUp(self):
        Case.setUp(self)
        cert, key = testing.self_signed_pem("mx.example.com")
        self.server_tls = tls.options_from_pem(cert, key)
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        self.der = x509.load_pem_x509_certificate(cert.encode()).public_bytes(
            serialization.Encoding.DER)

    def tls_script(self, **kw):
        kw.setdefault("replies", {"EHLO": "250-x\r\n250-STARTTLS\r\n250 AUTH PLAIN"})
        return self.serve(tls=self.server_tls, **kw)

    @defer.inlineCallbacks
    def test_starttls_then_auth(self):
        s = self.tls_script()
        r = yield self.deliver(auth=True, credentials=lambda server, user: ("alice", "pw"))
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[:3], ["EHLO gnot.example.org", "STARTTLS",
                                                "EHLO gnot.example.org"])
        self.assertEqual(s.sessions[-1].auth[0][:10], "AUTH PLAIN")

    @defer.inlineCallbacks
    def test_item115_unlisted_certificate_is_permanent(self):
        s = self.tls_script()
        other = thumbprint.Thumbprints({("sha256", hashlib.sha256(b"other").digest())})
        r = yield self.deliver(starttls=True, thumbprints=other)
        self.assertEqual(r.status, client.PERMANENT)
        self.assertIn("cert for example.com not recognized", r.report[0])
        self.assertEqual(self.commands(s)[:2], ["EHLO gnot.example.org", "STARTTLS"])
        self.assertNotIn("MAIL", " ".join(self.commands(s)))  # no plaintext fallback either
        self.assertEqual(len(s.sessions), 1)

    @defer.inlineCallbacks
    def test_listed_certificate_passes(self):
        self.tls_script()
        pins = thumbprint.Thumbprints(thumbprint.parse(thumbprint.line_for(self.der)))
        r = yield self.deliver(starttls=True, thumbprints=pins)
        self.assertEqual(r.status, "")

    @defer.inlineCallbacks
    def test_starttls_refused_is_permanent_and_injection_ignored(self):
        self.tls_script(replies={"EHLO": "250-x\r\n250 STARTTLS", "STARTTLS": "454 not now"})
        r = yield self.deliver(starttls=True)
        self.assertEqual(r.status, client.PERMANENT)
        # a reply smuggled behind the 220 in the clear is not taken as EHLO's
        s = self.tls_script(after_starttls=b"250-x\r\n250 AUTH PLAIN\r\n")
        r = yield self.deliver(starttls=True)
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(s)[2], "EHLO gnot.example.org")

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        from twisted.protocols.tls import TLSMemoryBIOFactory
        script = testing.ScriptedSMTPServer()
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(self.server_tls, False,
                                                        script.factory()),
                                 interface="127.0.0.2")
        self.port = port.getHost().port
        self.scripts.append(script)
        self.addCleanup(self._stop, port, script)
        r = yield self.deliver(implicit_tls=True)
        self.assertEqual(r.status, "")
        self.assertEqual(self.commands(script)[0], "EHLO gnot.example.org")


class ConversionTests(unittest.TestCase):
    def convert(self, data, sender="alice", toline="bob@example.com", **kw):
        m = convert.OutboundMessage(io.BytesIO(data), sender, "gnot.example.com",
                                    random_bytes=lambda n: bytes(range(n)), **kw)
        return b"".join(m.wire(toline))

    def test_item111_added_headers_in_order(self):
        out = self.convert(b"Subject: hi\n\nbody\n")
        self.assertEqual(out, b"Message-ID: <000102030405060708090A0B0C0D0E0F@gnot.example.com>"
                              b"\r\nFrom: alice@gnot.example.com\r\nTo: bob@example.com\r\n"
                              b"Subject: hi\r\n\r\nbody\r\n.\r\n")

    def test_item112_from_line_becomes_date(self):
        out = self.convert(b"From alice Wed Mar  7 23:47:45 -0400 2024 remote from gnot\n"
                           b"Message-ID: <x@y>\nFrom: a@b.c\nTo: d@e.f\n\nb\n")
        self.assertEqual(out, b"Date: Wed, 7 Mar 2024 23:47:45 -0400\r\nMessage-ID: <x@y>\r\n"
                              b"From: a@b.c\r\nTo: d@e.f\r\n\r\nb\r\n.\r\n")

    def test_item113_transparency(self):
        out = self.convert(b"Message-ID: <x@y>\nFrom: a@b.c\nTo: d@e.f\n\n.foo\nbar\r\nend")
        self.assertTrue(out.endswith(b"\r\n\r\n..foo\r\nbar\r\r\nend\r\n.\r\n"), out)

    def test_item114_header_addresses(self):
        out = self.convert(b"From: a@b.c\nTo: bob\nCc: x.org!carol, Dee <y.org!dee>\n\nb\n")
        self.assertIn(b"\r\nTo: bob@gnot.example.com\r\nCc: carol@x.org, Dee <dee@y.org>\r\n",
                      out)

    def test_from_values(self):
        self.assertIn(b"From: Postmaster@gnot.example.com", self.convert(b"\n", "/dev/null"))
        self.assertIn(b'From: "Alice Liddell" <alice@gnot.example.com>',
                      self.convert(b"\n", full_name=lambda u: "Alice Liddell"))
        self.assertIn(b"From: alice@example.org", self.convert(b"\n", "example.org!alice"))

    def test_item119_filter_output(self):
        """-f: compared byte for byte with tests/data (no network is touched)."""
        with open(os.path.join(DATA, "filter-in.txt"), "rb") as f:
            source = io.BytesIO(f.read())
        out = io.BytesIO()
        opts = client.ClientOptions(sysname="gnot", domain=".example.com")
        client.filter_message(source, "alice", opts, out)
        with open(os.path.join(DATA, "filter-out.txt"), "rb") as f:
            expected = f.read()
        # the Message-ID is random: compare its shape, then the rest exactly
        got = out.getvalue()
        self.assertRegex(got.split(b"\r\n", 1)[0],
                         rb"^Message-ID: <[0-9A-F]{32}@gnot\.example\.com>$")
        self.assertEqual(got.split(b"\r\n", 1)[1], expected.split(b"\r\n", 1)[1])

    def test_bangtoat_and_domainify(self):
        self.assertEqual(convert.bangtoat("a.x!b.y!c!d"), "@a.x:c!d@b.y")
        self.assertEqual(convert.bangtoat("gnot!bob"), "gnot!bob")
        self.assertEqual(convert.unescape("a%21b"), "a!b")
        self.assertEqual(convert.domainify("gnot", "gnot.cs.example.com"), "gnot.cs.example.com")
        self.assertEqual(convert.domainify("gnot", "com"), "gnot.com")
        self.assertEqual(convert.domainify("gnot", ""), "gnot")

    def test_chunk_boundaries_never_miss_a_dot(self):
        body = b"".join(b"x" * n + b"\n.\n" for n in range(1, 40))
        m = convert.OutboundMessage(io.BytesIO(b"Message-ID: <a@b>\nFrom: a@b\nTo: c@d\n\n" + body),
                                    "alice", "h.example")
        whole = b"".join(m.wire("x"))
        for size in (1, 2, 3, 7, 64):
            self.assertEqual(b"".join(m.wire("x", chunk=size)), whole)
        self.assertNotIn(b"\r\n.\r\n", whole[:-5])


class CredentialTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name, text, mode=0o600):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_file_then_netrc(self):
        from upasmail import factotum
        path = self.write("auth", "# server user password\nmx.example.com alice two words\n")
        netrc = self.write("netrc", "machine other.example login bob password nb\n")
        self.assertEqual(factotum.lookup("MX.example.com", "alice", path, netrc),
                         ("alice", "two words"))
        self.assertEqual(factotum.lookup("other.example", "bob", path, netrc), ("bob", "nb"))
        with self.assertRaises(factotum.NoCredentials):
            factotum.lookup("other.example", "alice", path, netrc)
        loose = self.write("loose", "mx.example.com alice pw\n", mode=0o644)
        with self.assertRaises(factotum.NoCredentials) as e:
            factotum.lookup("mx.example.com", "alice", loose, netrc)
        self.assertIn("chmod 600", str(e.exception))

    def test_thumbprint_files(self):
        der = b"certificate bytes"
        path = self.write("smtp", "# pinned\n" + thumbprint.line_for(der) + " server=mx\n"
                          "x509 sha1=" + hashlib.sha1(b"other").hexdigest() + "\n")
        excl = self.write("smtp.exclude", "")
        pins = thumbprint.Thumbprints.load(path, excl)
        self.assertTrue(pins.accepts(der))
        self.assertTrue(pins.accepts(b"other"))
        self.assertFalse(pins.accepts(b"stranger"))
        excl = self.write("smtp.exclude", thumbprint.line_for(der) + "\n")
        self.assertFalse(thumbprint.Thumbprints.load(path, excl).accepts(der))
        bad = self.write("bad", "x509 sha256=!!!\n")
        with self.assertRaises(Exception) as e:
            thumbprint.Thumbprints.load(bad)
        self.assertIn("bad:1: bad sha256 value", str(e.exception))


class CommandLineTests(unittest.TestCase):
    @defer.inlineCallbacks
    def run_cli(self, argv, stdin=b"x\n"):
        from upasmail import tap_smtp
        out, err = io.BytesIO(), io.StringIO()
        code = yield tap_smtp.run(reactor, argv, io.BytesIO(stdin), out, err,
                                  resolver=testing.FakeResolver(ZONE), clock=task.Clock())
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_flags_reach_the_options(self):
        from upasmail import tap_smtp
        o = tap_smtp.Options()
        o.parseOptions(["-aAdipst", "-b", "a.example", "-b", "b.example", "-g", "gw.example",
                        "-h", "gnot", "-u", "alice", ".example.com", "net!d.example", "me",
                        "r1", "r2"])
        opts = tap_smtp.client_options(o, io.StringIO())
        self.assertEqual((opts.auth, opts.avoidant, opts.auth_in_clear, opts.ping,
                          opts.starttls, opts.implicit_tls), (True,) * 6)
        self.assertEqual((opts.busted, opts.gateway, opts.host, opts.user, opts.domain),
                         (("a.example", "b.example"), "gw.example", "gnot", "alice",
                          ".example.com"))
        self.assertEqual((o["destaddr"], o["sender"], o["rcpts"]), ("net!d.example", "me",
                                                                     ["r1", "r2"]))
        code, _, err = yield self.run_cli(["onlydest"])
        self.assertEqual(code, 64)
        self.assertTrue(err.endswith("Permanent Failure\n"))
        code, _, err = yield self.run_cli(sum((["-b", "x%d" % i] for i in range(101)), [])
                                          + ["d", "s"])
        self.assertEqual(code, 64)
        self.assertIn("more than 100 busted mxs given", err)

    @defer.inlineCallbacks
    def test_filter_flag(self):
        code, out, err = yield self.run_cli(["-f", "--sysname", "gnot", ".example.com",
                                             "net!x.example", "alice"], b"Subject: s\n\nb\n")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.endswith(b"From: alice@gnot.example.com\r\nSubject: s\r\n\r\nb\r\n"))
