"""Issue 13, client and headers: items 12, 13, 14, 15 and 17.

Mail servers are ``testing.ScriptedSMTPServer``\\s on 127.0.0.x; DNS is a
``testing.FakeResolver``, or for item 13 the product's own resolver
(``service.makeResolver`` with a hosts file) pointed at a DNS server on
127.0.0.1 that knows no names at all.
"""

import base64
import io
import os
import re

from twisted.internet import defer, reactor
from twisted.names import client as names_client
from twisted.names import dns

import test_client
from upasmail import client, factotum, tap_smtp, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSG = b"Subject: test\n\nbody\n"
FROM_LINE = b"From alice Wed Mar  7 23:47:45 -0400 2024 remote from gnot\n"
ZONE = {"example.com": [dns.Record_MX(10, "mx.example.com")],
        "mx.example.com": [dns.Record_A("127.0.0.2")]}


class Case(test_client.Case):
    def deliver(self, dest, rcpts=("bob",), **kw):
        kw.setdefault("sysname", "gnot")
        return client.deliver(io.BytesIO(MSG), dest % self.port, "alice", rcpts,
                              client.ClientOptions(**kw), reactor,
                              testing.FakeResolver(ZONE), self.clock)

    def upas_smtp(self, *argv, stdin=MSG, **kw):
        """tap_smtp.run, the command itself: fires with (exit code, stdout, stderr)."""
        out, err = io.BytesIO(), io.StringIO()
        d = tap_smtp.run(reactor, list(argv), io.BytesIO(stdin), out, err, **kw)
        return d.addCallback(lambda code: (code, out.getvalue(), err.getvalue()))


def rcpts(script):
    return [c for c in script.sessions[-1].commands if c.startswith("RCPT")]


class BareRecipientTests(Case):
    """Item 12: ``RCPT TO:<bob@>`` when DNS gave no destination domain."""

    @defer.inlineCallbacks
    def test_item12_address_destination_qualifies_with_the_domain_argument(self):
        s = self.serve()
        code, _, err = yield self.upas_smtp("--sysname", "gnot", ".example.org",
                                            "tcp!127.0.0.2!%d" % self.port, "alice", "bob",
                                            "carol@example.net",
                                            resolver=testing.FakeResolver())
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(rcpts(s), ["RCPT TO:<bob@example.org>",
                                    "RCPT TO:<carol@example.net>"])

    @defer.inlineCallbacks
    def test_item12_without_dot_domain_our_domain_never_the_ip(self):
        s = self.serve()
        for domain in ("example.org", "gnot.example.org"):  # a domain; our FQDN
            r = yield self.deliver("tcp!127.0.0.2!%d", domain=domain)
            self.assertEqual(r.status, "")
            self.assertEqual(rcpts(s), ["RCPT TO:<bob@example.org>"])

    @defer.inlineCallbacks
    def test_item12_domain_learnt_from_dns_still_wins(self):
        s = self.serve()
        r = yield self.deliver("tcp!example.com!%d", domain=".example.org")
        self.assertEqual(r.status, "")
        self.assertEqual(rcpts(s), ["RCPT TO:<bob@example.com>"])


class HostsFileTests(Case):
    """Item 13: a name in the hosts file is dialled although DNS says NXDOMAIN."""

    def dns_server(self):
        udp = testing.serveDNS(reactor, testing.FakeResolver({}))  # NXDOMAIN for all
        self.addCleanup(udp.tcpPort.stopListening)
        self.addCleanup(udp.stopListening)
        return udp.getHost().port

    def hosts_file(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    @defer.inlineCallbacks
    def test_item13_localhost_from_the_hosts_file(self):
        s = self.serve(interface="127.0.0.1")
        hosts = self.hosts_file("127.0.0.1\tlocalhost\n")
        code, _, err = yield self.upas_smtp(
            "-d", "--resolver", "127.0.0.1:%d" % self.dns_server(), "--sysname", "gnot",
            ".example.org", "tcp!localhost!%d" % self.port, "alice", "bob", hosts=hosts)
        self.assertEqual(code, 0, err)
        self.assertIn("dialing (127.0.0.1:127.0.0.1)", err)
        self.assertEqual(rcpts(s), ["RCPT TO:<bob@example.org>"])

    @defer.inlineCallbacks
    def test_item13_a_name_nowhere_is_still_permanent(self):
        hosts = self.hosts_file("127.0.0.1\tlocalhost\n")
        code, _, err = yield self.upas_smtp(
            "--resolver", "127.0.0.1:%d" % self.dns_server(), "--sysname", "gnot",
            "tcp!nowhere.example!2", "alice", "bob", hosts=hosts)
        self.assertEqual(code, client.EX_UNAVAILABLE)
        self.assertIn("can't translate nowhere.example: no such domain", err)


def readme_snippet(after, section="Sending: upas-smtp\n"):
    """The indented block after ``after``, in the README's ``section``."""
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    text = text[text.index(section):]
    block = text[text.index(after) + len(after):].lstrip("\n")
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


class DomainTests(Case):
    """Item 14: ``ClientOptions(domain="example.org")`` means example.org."""

    def test_item14_which_domains_get_a_dot(self):
        def names(**kw):
            o = client.ClientOptions(sysname="gnot", **kw)
            return o.hellodomain, o.hostdomain

        self.assertEqual(names(domain="example.org"), ("gnot.example.org",) * 2)
        self.assertEqual(names(domain=".example.org"), ("gnot.example.org",) * 2)
        self.assertEqual(names(domain="gnot.cs.example.com", host="other"),
                         ("gnot.cs.example.com", "other.cs.example.com"))
        self.assertEqual(names(domain="com"), ("gnot.com",) * 2)
        self.assertEqual(names(domain=""), ("gnot",) * 2)
        self.assertEqual(names(domain="example.org", host="h.example.net"),
                         ("gnot.example.org", "h.example.net"))

    def test_item14_command_line_default_is_the_fqdn_after_its_first_dot(self):
        o = tap_smtp.Options()
        o.parseOptions(["--sysname", "gnot.example.org", "-h", "other", "d", "s"])
        opts = tap_smtp.client_options(o, io.StringIO())
        self.assertEqual((opts.hellodomain, opts.hostdomain, opts.maildomain),
                         ("gnot.example.org", "other.example.org", "example.org"))

    @defer.inlineCallbacks
    def test_item14_readme_deliver_snippet_runs_as_printed(self):
        s = self.serve(interface="127.0.0.1")
        code = readme_snippet("a test runs this\nprogram against a local server)::")
        namespace = {"__name__": "readme"}
        exec(compile(code, "README.rst", "exec"), namespace)  # noqa: S102 - our own README
        self.addCleanup(self.stop_resolvers)
        result = yield namespace["send"](reactor, "tcp!127.0.0.1!%d" % self.port)
        self.assertEqual(result.status, "")
        self.assertEqual(s.sessions[0].commands[:3], [
            "EHLO gnot.example.org", "MAIL FROM:<alice@gnot.example.org>",
            "RCPT TO:<bob@example.net>"])

    @staticmethod
    def stop_resolvers():
        """The resolv.conf resolver rereads its file every minute: not after the test."""
        for call in reactor.getDelayedCalls():
            if isinstance(getattr(call.func, "__self__", None), names_client.Resolver):
                call.cancel()


class FilterTests(Case):
    """Item 15: what ``-f`` adds, as upas (spec §2.7 4 and 8)."""

    def head(self, out):
        return out.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")

    @defer.inlineCallbacks
    def test_item15_filter_adds_no_to_even_with_recipients(self):
        code, out, _ = yield self.upas_smtp("-f", "--sysname", "gnot", ".example.org",
                                            "net!nowhere.invalid", "alice", "bob", "carol")
        self.assertEqual(code, 0)
        self.assertEqual([line.split(":")[0] for line in self.head(out)],
                         ["Message-ID", "From", "Subject"])

    @defer.inlineCallbacks
    def test_item15_date_only_from_the_from_line(self):
        _, out, _ = yield self.upas_smtp("-f", "--sysname", "gnot", ".example.org",
                                         "net!nowhere.invalid", "alice", stdin=FROM_LINE + MSG)
        self.assertIn("Date: Wed, 7 Mar 2024 23:47:45 -0400", self.head(out))
        self.assertNotIn(b"From alice", out)

    def test_item15_readme_says_what_filter_adds(self):
        text = readme_snippet("``-f``\n").replace("\n", " ")
        self.assertIn("no ``To:``", text)
        self.assertIn("``Date:`` only from", text)


class NetrcTests(Case):
    """Item 17: without ``-u`` the netrc entry for the host names the user."""

    def setUp(self):
        Case.setUp(self)
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        self.netrc = os.path.join(home, ".netrc")
        with open(self.netrc, "w") as f:
            f.write("machine mail.example.org login alice password Secret\n"
                    "machine 127.0.0.2 login carol password Hush\n")
        os.chmod(self.netrc, 0o600)
        self.patch(os, "environ", dict(os.environ, HOME=home))

    def test_item17_netrc_user_without_u_must_match_with_u(self):
        self.assertEqual(factotum.lookup("mail.example.org", None, netrc_path=self.netrc),
                         ("alice", "Secret"))
        self.assertEqual(factotum.lookup("mail.example.org", "alice", netrc_path=self.netrc),
                         ("alice", "Secret"))
        with self.assertRaises(factotum.NoCredentials):
            factotum.lookup("mail.example.org", "bob", netrc_path=self.netrc)

    @defer.inlineCallbacks
    def test_item17_upas_smtp_authenticates_with_the_netrc_login(self):
        s = self.serve(replies={"EHLO": "250-fake.example\r\n250 AUTH PLAIN"})
        code, _, err = yield self.upas_smtp("-a", "-i", "--sysname", "gnot",
                                            "tcp!127.0.0.2!%d" % self.port, "alice",
                                            "bob@example.net", resolver=testing.FakeResolver())
        self.assertEqual(code, 0, err)
        [auth] = s.sessions[0].auth
        self.assertTrue(re.match(r"AUTH PLAIN \S+$", auth))
        self.assertEqual(base64.b64decode(auth.split()[2]), b"\0carol\0Hush")
