"""Test helpers: drive a UpasESMTP over a StringTransport, fake effects.

Importable by users' own tests too.
"""

import os

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.names import common, dns, error
from twisted.protocols import basic
from zope.interface import alsoProvides, implementer

from . import conf as smtpdconf
from . import replies
from . import settings as smtpdsettings
from .smtpd.listening import Dropped
from .service import makeSmtpdFactory


def run_now(f, *args):
    """A synchronous ``run_blocking``: the call happens before it returns."""
    return defer.maybeDeferred(f, *args)


def address(ip, port):
    cls = IPv6Address if ":" in ip else IPv4Address
    return cls("TCP", ip, port)


def make_settings(conf_text="", root="mail", sysname="gnot.example.org", **kw):
    config = smtpdconf.parse(conf_text, "smtpd.conf")
    kw.setdefault("fqdn", sysname)
    kw.setdefault("tarpit_unit", 0.0)  # spec §3: tarpit sleeps are 0 unless tested
    kw.setdefault("auth_fail_delay", 0.0)
    return smtpdsettings.merge(config, sysname=sysname, root=root, **kw)


def make_mailboxes(root, *users):
    """Create ``<root>/box/<user>/`` for each user: only existing users get mail."""
    for user in users:
        os.makedirs(os.path.join(root, "box", user), exist_ok=True)


class FakeResolver(common.ResolverBase):
    """An IResolver from a dict: ``{"name": [dns.Record_A("192.0.2.1"), ...]}``.

    Names not in the dict are NXDOMAIN, unless ``everything_exists``
    (then they have the A record 192.0.2.1).  Names in ``failing`` get a
    server failure; names in ``hanging`` never answer.  ``queries``
    records (name, type) in order.
    """

    def __init__(self, records=None, everything_exists=False, failing=(), hanging=()):
        common.ResolverBase.__init__(self)
        self.records = {self._key(k): list(v) for k, v in (records or {}).items()}
        self.everything_exists = everything_exists
        self.failing = {self._key(n) for n in failing}
        self.hanging = {self._key(n) for n in hanging}
        self.queries = []

    @staticmethod
    def _key(name):
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        return name.lower().rstrip(".")

    def _lookup(self, name, cls, type, timeout):
        key = self._key(name)
        self.queries.append((key, type))
        if key in self.hanging:
            return defer.Deferred()
        if key in self.failing:
            return defer.fail(error.DNSServerError(key))
        if key not in self.records:
            if not self.everything_exists:
                return defer.fail(error.DNSNameError(key))
            payloads = [dns.Record_A("192.0.2.1")]
        else:
            payloads = self.records[key]
        answers = [dns.RRHeader(key, p.TYPE, dns.IN, 60, p) for p in payloads
                   if type in (dns.ALL_RECORDS, p.TYPE)]
        return defer.succeed((answers, [], []))


def serveDNS(reactor, resolver, interface="127.0.0.1", port=0):
    """Serve ``resolver`` as an authoritative DNS server (UDP and TCP).

    Returns the UDP port (its ``tcpPort`` attribute is the TCP one); answers
    NXDOMAIN for DNSNameError and SERVFAIL for DNSServerError.
    """
    from twisted.names import server

    class Factory(server.DNSServerFactory):
        def gotResolverError(self, failure, protocol, message, address):
            if failure.check(error.DNSServerError):  # Twisted would say NXDOMAIN
                response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
                return self.sendReply(protocol, response, address)
            return server.DNSServerFactory.gotResolverError(
                self, failure, protocol, message, address)

    factory = Factory(authorities=[resolver])
    # an ephemeral UDP port's number may be taken for TCP: try other numbers
    for attempt in range(1 if port else 20):
        udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=interface)
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            if port or attempt == 19:
                raise
            continue
        udp.tcpPort = tcp
        return udp


def zone_from_json(data):
    """{"name": [["A", "192.0.2.1"], ["MX", "10 mx.example"]], ...} -> records."""
    records = {}
    for name, rrs in data.items():
        out = records.setdefault(name, [])
        for rtype, value in rrs:
            if rtype == "MX":
                pref, host = value.split()
                out.append(dns.Record_MX(int(pref), host))
            else:
                out.append(getattr(dns, "Record_" + rtype)(value))
    return records


def zone_from_lines(lines, filename="zone"):
    """``NAME TYPE VALUE`` lines (``#`` comments, blank lines) -> records,
    as ``zone_from_json``; ValueError names the line that is not one.

    ``mx.example.net A 192.0.2.9``, ``example.net MX 10 mx.example.net``,
    ``9.2.0.192.in-addr.arpa PTR mx.example.net``.
    """
    records = {}
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split(None, 2)
        try:
            if len(parts) < 3 or not hasattr(dns, "Record_" + parts[1].upper()):
                raise ValueError("want NAME TYPE VALUE")
            rrs = zone_from_json({parts[0]: [[parts[1].upper(), parts[2]]]})
        except (TypeError, ValueError, OSError) as e:  # OSError: inet_aton's
            raise ValueError("%s:%d: %r: %s" % (filename, lineno, text, e)) from None
        records.setdefault(parts[0], []).extend(rrs[parts[0]])
    return records


@implementer(ITLSTransport)
class FakeTLSTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the context and
    from then on provides ISSLTransport; bytes stay clear for the test."""

    tlsContext = None

    def startTLS(self, contextFactory):
        self.tlsContext = contextFactory
        self.clearBeforeTLS = self.value()
        alsoProvides(self, ISSLTransport)


def _wire(lines):
    return b"".join((l if isinstance(l, bytes) else l.encode()) + b"\r\n" for l in lines)


class Dialogue:
    """One SMTP connection over a StringTransport.

    ``send(line)`` feeds a command (CRLF added) and returns the reply lines
    written since; ``clock`` is a task.Clock unless a reactor is given.
    ``mailboxes``: local users to create under the settings' root first.
    ``decisions``: the decision log (``decisionlog.DecisionLog``) to keep.
    """

    def __init__(self, settings, peer="127.0.0.2", local="127.0.0.1", clock=None,
                 reactor=None, run_blocking=run_now, resolver=None, checker=None,
                 contextFactory=None, implicit_tls=False, mailboxes=(), decisions=None):
        make_mailboxes(settings.root, *mailboxes)
        self.clock = clock or task.Clock()
        self.resolver = resolver or FakeResolver(everything_exists=True)
        self.factory = makeSmtpdFactory(settings, reactor=reactor or self.clock,
                                        run_blocking=run_blocking, clock=self.clock,
                                        resolver=self.resolver, checker=checker,
                                        contextFactory=contextFactory)
        self.root = self.factory.root
        self.factory.decisions = decisions
        self.proto = self.factory.buildProtocol(address(peer, 4321))
        self.transport = FakeTLSTransport(
            peerAddress=address(peer, 4321), hostAddress=address(local, 25)
        )
        if implicit_tls:
            alsoProvides(self.transport, ISSLTransport)
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self):
        out = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return out.splitlines()

    def raw(self, data):
        self.proto.dataReceived(data)
        return self.take()

    def send(self, *lines):
        return self.raw(_wire(lines))

    def sendAndWait(self, *lines):
        """Send, then wait (really) for pending replies; fires with them."""
        self.raw(_wire(lines))
        return self.proto.whenQuiet().addCallback(lambda _: self.take())

    def close(self):
        if isinstance(self.proto, Dropped):  # -k: gone before any byte
            return
        if not self.transport.disconnecting:
            self.proto.connectionLost(None)
        self.proto.setTimeout(None)


def self_signed_pem(hostname="localhost", days=2):
    """A fresh self-signed certificate and key for ``hostname``: (cert, key) PEM text."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return cert_pem, key_pem


class ScriptedSMTPServer:
    """A fake SMTP server for client tests: answers from a table, records all.

    ``replies`` maps an exact command line (``"RCPT TO:<eve@x.org>"``) or a
    verb (``"RCPT"``, ``"."`` for the end of DATA) to the reply text (lines
    joined with CRLF).  ``greeting=None`` sends none; verbs in ``silent``
    get no answer at all.  ``tls`` (a server context factory) lets STARTTLS
    succeed; ``after_starttls`` is written in the clear behind its 220.
    ``sessions`` holds, per connection, the command lines and the raw
    DATA bytes; ``seen(verb)`` fires when a command with that verb arrives.
    """

    DEFAULTS = {"EHLO": "250-fake.example you are there\r\n250 8BITMIME", "HELO": "250 ok",
                "MAIL": "250 ok", "RCPT": "250 ok", "DATA": "354 go ahead", ".": "250 ok",
                "NOOP": "250 ok", "RSET": "250 ok", "QUIT": "221 bye",
                "STARTTLS": "220 ready", "AUTH": "235 ok"}

    def __init__(self, replies=None, greeting="220 fake.example ESMTP", silent=(), tls=None,
                 after_starttls=b""):
        self.replies = dict(self.DEFAULTS)
        self.replies.update(replies or {})
        self.greeting = greeting
        self.silent = set(silent)
        self.tls = tls
        self.after_starttls = after_starttls
        self.sessions = []
        self._waiters = {}

    def seen(self, verb):
        d = defer.Deferred()
        self._waiters.setdefault(verb, []).append(d)
        return d

    def _saw(self, verb):
        for d in self._waiters.pop(verb, []):
            d.callback(None)

    def reply_for(self, line):
        if line in self.replies:
            return self.replies[line]
        return self.replies.get(line.split(" ", 1)[0].split(":", 1)[0].upper(), "500 what?")

    def factory(self):
        from twisted.internet import protocol

        f = protocol.Factory.forProtocol(_ScriptedSMTP)
        f.script = self
        return f

    def listen(self, reactor, interface="127.0.0.1", port=0):
        return reactor.listenTCP(port, self.factory(), interface=interface)


class _ScriptedSession:
    def __init__(self):
        self.commands = []
        self.data = b""
        self.auth = []  # the AUTH exchange lines, as sent
        self.closed = defer.Deferred()  # fires when the connection is gone


class _ScriptedSMTP(basic.LineOnlyReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.script = self.factory.script
        self.session = _ScriptedSession()
        self.script.sessions.append(self.session)
        self.in_data = False
        self.auth_steps = []
        if self.script.greeting is not None:
            self.send(self.script.greeting)

    def send(self, text):
        self.transport.write(text.encode() + b"\r\n")

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.script._saw(".")
                if "." not in self.script.silent:
                    self.send(self.script.reply_for("."))
            else:
                self.session.data += line + b"\r\n"
            return
        if self.auth_steps:
            self.session.auth.append(line.decode())
            self.send(self.auth_steps.pop(0))
            return
        text = line.decode("utf-8", "replace")
        self.session.commands.append(text)
        verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
        self.script._saw(verb)
        if verb in self.script.silent:
            return
        reply = self.script.reply_for(text)
        if verb == "AUTH":
            self.session.auth.append(text)
            mech = text.split()[1].upper() if len(text.split()) > 1 else ""
            if mech == "LOGIN" and len(text.split()) == 2:
                self.send("334 " + replies.AUTH_USERNAME_PROMPT)
                self.auth_steps = ["334 " + replies.AUTH_PASSWORD_PROMPT, reply]
                return
            if mech == "CRAM-MD5":
                self.send("334 PDEyMzQ1QGZha2UuZXhhbXBsZT4=")  # <12345@fake.example>
                self.auth_steps = [reply]
                return
        if verb == "STARTTLS" and reply.startswith("220") and self.script.tls is not None:
            self.transport.write(reply.encode() + b"\r\n" + self.script.after_starttls)
            self.transport.startTLS(self.script.tls)
            return
        self.send(reply)
        if verb == "DATA" and reply.startswith("354"):
            self.in_data = True
        elif verb == "QUIT":
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.session.closed.callback(None)
