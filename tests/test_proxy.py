"""Issue 18: PROXY protocol listeners (``--listen haproxy:...``,
``--proxy-from``): the client's real address everywhere, from the header
on; nothing before it.  In process over StringTransports and a Clock, then
real ``twistd upas-smtpd`` processes, behind a real ``haproxy`` too."""

import ipaddress
import json
import mailbox
import os
import smtplib
import socket
import struct

import pytest
from twisted.internet import task
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import capturedLogs

from upasmail import service, testing
from upasmail.cli import options as smtpd_options
from upasmail.rules import decisionlog
from upasmail.smtpd import proxylistener
from upasmail.smtpd.proxyheader import V2_SIGNATURE

from realservers import HAProxy
from test_workers import logged_by, worker_pids
from test_twistd import client_context, dns_port, server, tls_files  # noqa: F401  (fixtures)

BALANCER = "127.0.0.1"
CLIENT = "192.0.2.7"  # outside ournets: not trusted
US = "198.51.100.1"  # the address the client reached (the balancer's)
PROXY_LISTEN = "haproxy:tcp:0:interface=127.0.0.1"


def v1(src=CLIENT, dst=US, sport=40000, dport=25):
    family = "TCP6" if ":" in src else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (family, src, dst, sport, dport)).encode()


def v2(src=CLIENT, dst=US, sport=40000, dport=25, command=1):
    if command == 0:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    block = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


class Node:
    """One upas-smtpd built as ``makeSmtpdService`` builds it for a PROXY
    listener, its connections over StringTransports from the balancer."""

    def __init__(self, root, listen=PROXY_LISTEN, proxy_from=(BALANCER,), conf_text="",
                 **kw):
        os.makedirs(os.path.join(root, "box", "bob"), exist_ok=True)
        kw.setdefault("queue_runner", False)
        self.settings = testing.make_settings(
            conf_text, root=root,
            proxy_from=tuple(ipaddress.ip_network(n) for n in proxy_from), **kw)
        self.clock = task.Clock()
        self.top = service.makeSmtpdService(
            self.settings, listen, reactor=self.clock, clock=self.clock,
            run_blocking=testing.run_now, resolver=testing.FakeResolver(everything_exists=True),
            contextFactory=kw.get("contextFactory"))
        self.factory = self.top.factory
        self.listening = self.top.server.endpoint.wrap(self.top.server.factory)

    def connect(self, balancer=BALANCER, local="127.0.0.1"):
        peer = testing.address(balancer, 5555)
        p = self.listening.buildProtocol(peer)
        t = testing.FakeTLSTransport(peerAddress=peer, hostAddress=testing.address(local, 2525))
        p.makeConnection(t)
        return Conn(p, t)


class Conn:
    def __init__(self, proto, transport):
        self.proto, self.transport = proto, transport

    def raw(self, data):
        self.proto.dataReceived(data)
        out = self.transport.value().decode()
        self.transport.clear()
        return out.splitlines()

    def send(self, *lines):
        return self.raw(b"".join(line.encode() + b"\r\n" for line in lines))

    @property
    def inner(self):
        return self.proto.wrappedProtocol

    def lose(self):
        if not self.transport.disconnecting or self.proto.wrappedProtocol is not None:
            self.proto.connectionLost(None)


def named(events, name):
    return [e for e in events if e.get("event") == name]


@pytest.fixture
def node(tmp_path):
    nodes = []

    def make(**kw):
        n = Node(str(tmp_path / ("mail%d" % len(nodes))), **kw)
        nodes.append(n)
        return n

    return make


# -- the real client in everything that uses the peer --------------------------

@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_untrusted_client_behind_a_trusted_balancer_cannot_relay(node, header):
    n = node()
    with capturedLogs() as events:
        c = n.connect()
        assert c.raw(header)[0].startswith("220 ")
        c.send("EHLO client.sender.net")
        assert c.send("MAIL FROM:<a@example.org>")[0].startswith("250")
        assert c.send("RCPT TO:<x@elsewhere.example>")[0].startswith("5")
        c.send("QUIT")
        c.lose()
    [connect] = named(events, "smtpd.connect")
    assert (connect["peer"], connect["local"], connect["trusted"]) == (CLIENT, US, False)
    [refused] = named(events, "smtpd.refused")
    assert (refused["peer"], refused["reason"]) == (CLIENT, "relay")
    [gone] = named(events, "smtpd.disconnect")
    assert gone["peer"] == CLIENT


def test_the_balancer_itself_would_relay(node):
    """The test above is one: a loopback peer (LOCAL: the connection's own
    addresses, a health check) is trusted and may relay."""
    n = node()
    c = n.connect()
    assert c.raw(v2(command=0))[0].startswith("220 ")
    c.send("EHLO client.sender.net", "MAIL FROM:<a@example.org>")
    assert c.send("RCPT TO:<x@elsewhere.example>")[0].startswith("250")
    assert c.inner.session.rsys == BALANCER and c.inner.session.lsys == "127.0.0.1"
    c.lose()


def test_v1_unknown_is_the_connection_too(node):
    c = node().connect()
    assert c.raw(b"PROXY UNKNOWN\r\n")[0].startswith("220 ")
    assert c.inner.session.rsys == BALANCER
    c.lose()


def test_ipv6_client(node):
    c = node().connect()
    c.raw(v1("2001:db8::7", "2001:db8::1"))
    assert (c.inner.session.rsys, c.inner.session.lsys) == ("2001:db8::7", "2001:db8::1")
    assert c.proto.getPeer().type == "TCP" and c.proto.getPeer().host == "2001:db8::7"
    c.lose()


def test_ratify_entry_for_the_real_address(node, tmp_path):
    n = node()
    lib = os.path.join(n.settings.root, "lib")
    os.makedirs(lib, exist_ok=True)
    with open(os.path.join(lib, "blocked"), "w") as f:
        f.write("deny %s\n" % CLIENT)
    n.factory.spam.reread()
    denied, other = n.connect(), n.connect()
    denied.raw(v1())
    other.raw(v1(src="192.0.2.8"))
    for c in (denied, other):
        c.send("EHLO client.sender.net", "MAIL FROM:<a@example.org>", "RCPT TO:<bob>")
    assert denied.send("DATA")[0].startswith("554-")  # upas refuses a denied IP at DATA
    assert other.send("DATA")[0].startswith("354")


def test_k_ban_on_the_real_address_drops_without_a_byte(node):
    n = node(evil=(ipaddress.ip_network(CLIENT), ipaddress.ip_network("127.0.0.0/8")))
    banned = n.connect()
    assert banned.raw(v1()) == [] and banned.transport.disconnecting
    assert len(n.factory.connections) == 0
    # the balancer's own address being banned does not matter: the header decides
    fine = n.connect()
    assert fine.raw(v1(src="192.0.2.8"))[0].startswith("220 ")
    fine.lose()


def test_per_peer_limit_counts_real_addresses(node):
    n = node(max_connections_per_peer=1)
    first, second, other = n.connect(), n.connect(), n.connect()
    assert first.raw(v2())[0].startswith("220 ")
    assert second.raw(v2(sport=40001))[0].startswith("421 ")
    assert second.transport.disconnecting
    assert other.raw(v2(src="192.0.2.8"))[0].startswith("220 ")
    first.lose()
    again = n.connect()
    assert again.raw(v2(sport=40002))[0].startswith("220 ")


def test_received_line_names_the_real_client(node):
    n = node()
    c = n.connect()
    c.raw(v1())
    c.send("EHLO client.sender.net", "MAIL FROM:<a@example.org>", "RCPT TO:<bob>", "DATA")
    assert c.raw(b"Subject: hi\r\n\r\nhello\r\n.\r\n")[0].startswith("250")
    c.lose()
    [msg] = mailbox.mbox(os.path.join(n.settings.root, "box", "bob", "mbox"))
    assert msg["Received"].startswith("from client.sender.net ([%s]) by" % CLIENT)


def test_user_at_our_literal_is_the_headers_destination(node):
    """lsys (``user@[]``, the greylist key) is the address the client reached."""
    n = node()
    c = n.connect()
    c.raw(v1())
    c.send("EHLO client.sender.net", "MAIL FROM:<a@example.org>")
    assert c.send("RCPT TO:<bob@[%s]>" % US)[0].startswith("250")
    assert c.send("RCPT TO:<bob@[127.0.0.1]>")[0][0] == "5"  # the balancer's side is not us
    c.lose()


def test_helo_that_is_us_uses_both_header_addresses(node):
    """HELO with our name is a lie, except from our own address (rsys = lsys):
    both sides come from the header.  (-e: only that check.)"""
    n = node(relax_helo=True)
    liar, us = n.connect(), n.connect()
    liar.raw(v1(src=CLIENT, dst=US))
    us.raw(v1(src=US, dst=US))
    assert liar.send("HELO gnot.example.org") == ["554 5.7.0 Liar!"]
    assert us.send("HELO gnot.example.org")[0].startswith("250")
    us.lose()


def test_greylist_keyed_by_real_addresses(node):
    n = node(greylist=True)
    c = n.connect()
    c.raw(v1())
    c.send("EHLO client.sender.net", "MAIL FROM:<a@example.org>", "RCPT TO:<bob>")
    assert c.send("DATA")[0].startswith("451")
    c.lose()
    grey = os.path.join(n.settings.root, "grey", "tmp")
    assert os.listdir(grey) == [US] and os.listdir(os.path.join(grey, US)) == [CLIENT]


def test_decision_log_sees_the_real_address(node, tmp_path):
    n = node(evil=(ipaddress.ip_network(CLIENT),))
    path = str(tmp_path / "decisions.jsonl")
    decisionlog.attach(n.factory, path, n.clock)
    n.connect().raw(v1())
    c = n.connect()
    c.raw(v1(src="192.0.2.8"))
    c.send("QUIT")
    c.lose()
    with open(path) as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["peer"] for r in records) == [CLIENT, "192.0.2.8"]


def test_d_trace_is_named_after_the_real_client(node, tmp_path):
    n = node(debug=True, log_dir=str(tmp_path / "log"))
    c = n.connect()
    c.raw(v1() + b"EHLO client.sender.net\r\n")
    c.lose()
    [trace] = os.listdir(str(tmp_path / "log" / "smtpdb"))
    assert trace.endswith("." + CLIENT)


# -- nothing before the header ---------------------------------------------------

def test_no_greeting_and_no_session_before_the_header(node):
    n = node()
    c = n.connect()
    assert c.transport.value() == b"" and not c.transport.disconnecting
    assert c.inner is None and len(n.factory.connections) == 0


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_header_byte_by_byte(node, header):
    n = node()
    c = n.connect()
    for i in range(len(header) - 1):
        assert c.raw(header[i:i + 1]) == []
    assert c.inner is None
    assert c.raw(header[-1:])[0].startswith("220 ")
    assert c.inner.session.rsys == CLIENT
    c.lose()


def test_client_bytes_in_the_headers_read_reach_the_session(node):
    c = node().connect()
    out = c.raw(v2() + b"EHLO client.sender.net\r\nNOOP\r\n")
    assert out[0].startswith("220 ") and out[-1].startswith("250")
    assert any(line.startswith("250-") for line in out)
    c.lose()


@pytest.mark.parametrize("data, why", [
    (b"EHLO client.sender.net\r\n", "no PROXY header"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 25\r\n", "v1 address"),
    (b"\x16\x03\x01\x02\x00", "no PROXY header"),
])
def test_invalid_header_closed_without_a_byte_and_logged(node, data, why):
    n = node()
    with capturedLogs() as events:
        c = n.connect()
        assert c.raw(data) == [] and c.transport.disconnecting
        c.lose()
    [e] = named(events, "smtpd.proxy")
    assert (e["balancer"], e["status"]) == (BALANCER, "invalid") and why in e["why"]
    assert named(events, "smtpd.connect") == [] and len(n.factory.connections) == 0


def test_proxy_refusals_are_counted():
    pytest.importorskip("prometheus_client")
    from upasmail import metrics
    m = metrics.Metrics()
    for status in ("invalid", "invalid", "timeout"):
        m({"event": "smtpd.proxy", "status": status, "balancer": BALANCER, "why": "x"})
    value = m.registry.get_sample_value
    assert value("upasmail_proxy_closed_total", {"status": "invalid"}) == 2
    assert value("upasmail_proxy_closed_total", {"status": "timeout"}) == 1


def test_peer_outside_proxy_from_closed_at_once(node):
    n = node(proxy_from=("10.0.0.0/8",))
    with capturedLogs() as events:
        c = n.connect(balancer="127.0.0.1")
        assert c.transport.disconnecting and c.raw(v1()) == []
    [e] = named(events, "smtpd.proxy")
    assert (e["balancer"], e["status"]) == ("127.0.0.1", "refused")
    assert c.inner is None and n.clock.getDelayedCalls() == []
    c.lose()


def test_header_timeout(node):
    n = node()
    with capturedLogs() as events:
        c = n.connect()
        c.raw(b"PROXY TCP4 ")
        n.clock.advance(proxylistener.HEADER_TIMEOUT - 0.1)
        assert not c.transport.disconnecting
        n.clock.advance(0.1)
        assert c.transport.disconnecting and c.transport.value() == b""
    [e] = named(events, "smtpd.proxy")
    assert e["status"] == "timeout"
    c.lose()


def test_header_in_time_cancels_the_timer(node):
    n = node()
    c = n.connect()
    c.raw(v1())
    n.clock.advance(proxylistener.HEADER_TIMEOUT + 1)
    assert not c.transport.disconnecting
    c.lose()


def test_connection_gone_before_the_header(node):
    n = node()
    c = n.connect()
    c.raw(b"PRO")
    c.proto.connectionLost(None)
    assert n.clock.getDelayedCalls() == [] and len(n.listening.protocols) == 0


# -- the transport under the session -------------------------------------------

def test_starttls_reaches_the_real_transport(node, tmp_path):
    cert, key = testing.self_signed_pem("gnot.example.org")
    (tmp_path / "both.pem").write_text(cert + key)
    n = node(cert=str(tmp_path / "both.pem"))
    c = n.connect()
    c.raw(v1())
    assert ITLSTransport.providedBy(c.proto)
    assert any(line[4:] == "STARTTLS" for line in c.send("EHLO client.sender.net"))
    assert c.send("STARTTLS")[0].startswith("220")
    assert c.transport.tlsContext is not None and ISSLTransport.providedBy(c.transport)
    # Twisted's STARTTLS puts TLS under the wrapper, and tells the wrapper
    with capturedLogs() as events:
        c.proto.handshakeCompleted()
    [started] = named(events, "smtpd.tls")
    assert (started["peer"], started["status"]) == (CLIENT, "started")
    c.lose()


def test_close_and_abort_go_to_the_connection(node):
    n = node()
    c = n.connect()
    c.raw(v1())
    c.send("QUIT")
    assert c.transport.disconnecting
    c.lose()
    assert len(n.factory.connections) == 0 and len(n.listening.protocols) == 0
    d = n.connect()
    d.raw(v1())
    d.inner.transport.abortConnection()
    assert d.transport.disconnecting
    d.lose()


def test_producer_calls_reach_the_connection(node):
    """The session's flow control (pause, resume, its producer) is the socket's."""
    c = node().connect()
    c.raw(v1())
    session = c.inner
    session.transport.pauseProducing()
    assert c.transport.producerState == "paused"
    session.transport.resumeProducing()
    assert c.transport.producerState == "producing"
    session.transport.registerProducer(session, True)
    assert c.transport.producer is session
    session.transport.unregisterProducer()
    assert c.transport.producer is None
    c.lose()


# -- configuration ---------------------------------------------------------------

def test_proxy_from_repeated_and_comma_separated(tmp_path):
    o = smtpd_options.SmtpdOptions()
    o.parseOptions(["--root", str(tmp_path), "--listen", PROXY_LISTEN,
                    "--proxy-from", "10.0.0.1, 10.1.0.0/16", "--proxy-from", "::1"])
    assert o["settings"].proxy_from == tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.1/32", "10.1.0.0/16", "::1/128"))


@pytest.mark.parametrize("args, error", [
    (["--listen", PROXY_LISTEN], "a PROXY listener needs --proxy-from"),
    (["--proxy-from", "127.0.0.1"], "--proxy-from is only for a PROXY listener"),
    (["--listen", PROXY_LISTEN, "--proxy-from", "nonsense"], "--proxy-from: bad address"),
    (["--listen", "haproxy:ssl:0", "--proxy-from", "127.0.0.1"],
     "the PROXY header comes before TLS: write haproxy:tcp:... with --smtps"),
])
def test_proxy_options_refused(tmp_path, args, error):
    from upasmail import tap_smtpd
    from twisted.python import usage
    with pytest.raises((SystemExit, usage.UsageError), match=error.replace("+", r"\+")
                       .replace(".", r"\.")):
        tap_smtpd.Options().parseOptions(["--root", str(tmp_path), *args])


def test_makeSmtpdService_needs_proxy_from(tmp_path):
    from upasmail import conf
    s = testing.make_settings(root=str(tmp_path), queue_runner=False)
    with pytest.raises(conf.ConfigError, match="needs --proxy-from"):
        service.makeSmtpdService(s, PROXY_LISTEN, reactor=task.Clock())


def test_open_relay_behind_a_balancer_even_on_loopback():
    s = testing.make_settings("norelay off")
    assert not service.open_relay(s, "tcp:25:interface=127.0.0.1")
    assert service.open_relay(s, "haproxy:tcp:25:interface=127.0.0.1")


def test_no_private_twisted_imports():
    import re
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "upasmail")
    found = []
    for d, _, files in os.walk(here):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(d, name)) as f:
                    found += [(name, m) for m in re.findall(
                        r"^\s*(?:from|import) (twisted\.[\w.]*\._\w*)", f.read(), re.M)]
    assert found == []


# -- real processes ------------------------------------------------------------

def proxied_session(port, header, source="127.0.0.1", helo="client.sender.net"):
    """An SMTP session to ``port`` after ``header``, as a balancer would open it."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=30)
    s.sendall(header)
    f = s.makefile("rb")
    greeting = f.readline()
    replies = []
    for line in ("EHLO " + helo, "MAIL FROM:<a@example.org>", "RCPT TO:<bob>", "DATA"):
        s.sendall(line.encode() + b"\r\n")
        while True:
            reply = f.readline()
            if reply[3:4] != b"-":
                break
        replies.append(reply)
    s.sendall(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    replies.append(f.readline())
    s.close()
    return greeting, replies


def test_twistd_with_proxy_listener(server):
    srv = server("--listen", PROXY_LISTEN, "--proxy-from", "127.0.0.1", "-e",
                 "--tarpit-unit", "0")
    greeting, replies = proxied_session(srv.port, v1(src="203.0.113.9", dst="127.0.0.1"))
    assert greeting.startswith(b"220 ") and replies[-1].startswith(b"250")
    # not from a balancer: nothing at all
    with socket.create_connection(("127.0.0.1", srv.port), source_address=("127.0.0.2", 0),
                                  timeout=30) as c:
        assert c.recv(100) == b""
    srv.wait_for("PROXY connection from 127.0.0.2 closed: not in --proxy-from")
    assert "connect from 203.0.113.9" in srv.output()
    [msg] = mailbox.mbox(os.path.join(srv.root, "box", "bob", "mbox"))
    assert "([203.0.113.9])" in msg["Received"]


def test_twistd_smtps_behind_proxy_header(server, tls_files):  # noqa: F811
    """HAProxy's send-proxy with an ssl server: the header in clear, then TLS."""
    srv = server("--listen", PROXY_LISTEN, "--proxy-from", "127.0.0.1",
                 "-c", str(tls_files / "both.pem"), "--smtps")
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    raw.sendall(v2(src="203.0.113.10", dst="127.0.0.1"))
    with client_context(tls_files).wrap_socket(raw, server_hostname="localhost") as c:
        assert c.recv(100).startswith(b"220 ")
        c.sendall(b"QUIT\r\n")
        assert c.recv(100).startswith(b"221")
    srv.wait_for("connect from 203.0.113.10")


def test_twistd_starttls_behind_proxy_header(server, tls_files):  # noqa: F811
    """STARTTLS reaches the real connection through the PROXY layer."""
    srv = server("--listen", PROXY_LISTEN, "--proxy-from", "127.0.0.1", "-e",
                 "-c", str(tls_files / "both.pem"), "--tarpit-unit", "0")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(v1(src="203.0.113.11", dst="127.0.0.1"))
    c = smtplib.SMTP(local_hostname="client.sender.net", timeout=30)
    c.sock, c._host = sock, "localhost"  # connected by hand, after the header
    try:
        assert c.getreply()[0] == 220
        assert c.starttls(context=client_context(tls_files))[0] == 220
        assert c.sendmail("a@example.org", ["bob"], b"Subject: hi\r\n\r\nhello\r\n") == {}
        c.quit()
    finally:
        c.close()
    srv.wait_for("started TLS with 203.0.113.11")
    [msg] = mailbox.mbox(os.path.join(srv.root, "box", "bob", "mbox"))
    assert msg["Received"].startswith("from client.sender.net ([203.0.113.11])\n\t(using TLS")


def test_twistd_workers_read_the_header_too(server):
    """--workers: each worker puts the PROXY layer back on the socket it adopts."""
    srv = server("--listen", PROXY_LISTEN, "--proxy-from", "127.0.0.1", "-e", "--workers", "2",
                 "--tarpit-unit", "0")
    worker_pids(srv)
    for i in range(1, 301):  # the kernel chooses the process; bounded
        greeting, replies = proxied_session(srv.port, v1(src="203.0.113.%d" % (i % 250),
                                                         dst="127.0.0.1"))
        assert greeting.startswith(b"220 ") and replies[-1].startswith(b"250"), replies
        if i >= 4 and set(logged_by(srv, "connect from 203.0.113.")) == {"main", "w1"}:
            break
    assert set(logged_by(srv, "connect from 203.0.113.")) == {"main", "w1"}, srv.output()
    assert "connect from 127.0.0.1" not in srv.output()


HAPROXY_CONFIG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{{port}}
    default_backend nodes
backend nodes
    server n1 127.0.0.1:{smtpd} {send}
"""


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
def test_behind_a_real_haproxy(server, tmp_path, send):
    srv = server("--listen", PROXY_LISTEN, "--proxy-from", "127.0.0.1", "-e",
                 "--tarpit-unit", "0")
    lb = HAProxy(tmp_path, HAPROXY_CONFIG.format(smtpd=srv.port, send=send))
    try:
        with smtplib.SMTP("127.0.0.1", lb.port, source_address=("127.0.0.9", 0),
                          local_hostname="client.sender.net", timeout=30) as c:
            c.sendmail("a@example.org", ["bob"], b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        lb.stop()
    srv.wait_for("disconnect from 127.0.0.9")
    assert "connect from 127.0.0.9" in srv.output()
    [msg] = mailbox.mbox(os.path.join(srv.root, "box", "bob", "mbox"))
    assert msg["Received"].startswith("from client.sender.net ([127.0.0.9]) by")
