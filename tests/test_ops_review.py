"""Defects found by the operations review of issue 15 (an administrator
following the docs, and a hostile client), each with its regression test."""

import mailbox
import os
import smtplib
import socket

import pytest

from twisted.internet import task
from twisted.internet.testing import StringTransport

from test_stdio import Session
from test_twistd import client_context, dns_port, server, tls_files  # noqa: F401
from test_privdrop import NOBODY, DroppedServer, owners, python_for_nobody, world  # noqa: F401
from upasmail import testing
from upasmail.service import connectionFactory, makeSmtpdFactory


def test_a_restart_as_root_with_uid_keeps_routing_json_the_run_users(world):  # noqa: F811
    """routing.json was rewritten as root before twistd's switch: the second
    start-up on the same mail root found it root's and stopped ("routing
    record ... is not writable by nobody")."""
    python = python_for_nobody(world)
    first = DroppedServer(world, python=python)
    first.stop()
    again = DroppedServer(world, "--sysname", "other.example.org", python=python)
    try:
        with smtplib.SMTP("127.0.0.1", again.port) as c:  # it serves: start-up passed
            assert c.noop()[0] == 250
        assert again.proc.poll() is None, again.output()
    finally:
        again.stop()
    assert owners(again.root)["routing.json"] == (NOBODY, NOBODY)


def test_a_link_planted_for_routing_json_tmp_is_not_followed_as_root(world):  # noqa: F811
    """Root rewrote routing.json before the switch, through whatever the run
    user had put at ``routing.json.tmp``: a root-owned file was overwritten."""
    python = python_for_nobody(world)
    first = DroppedServer(world, python=python)
    first.stop()
    victim = os.path.join(world, "victim")
    with open(victim, "w") as f:
        f.write("root's own\n")
    os.chmod(victim, 0o600)
    # the run user owns the mail root: it can put a link where root writes
    planted = os.path.join(first.root, "routing.json.tmp")
    if os.path.lexists(planted):  # left by a first server stopped mid-write (a busy machine)
        os.unlink(planted)
    os.symlink(victim, planted)
    again = DroppedServer(world, "--sysname", "other.example.org", python=python)
    try:
        again.wait_for("cannot record the routing for upas-runq: Permission denied")
        assert again.proc.poll() is None
    finally:
        again.stop()
    with open(victim) as f:
        assert f.read() == "root's own\n"


def test_stdio_with_a_listening_socket_on_stdin_is_one_line_not_a_traceback(tmp_path):
    """inetd ``wait`` or systemd ``Accept=no`` (or systemd-socket-activate
    without ``-a``) hands over the listening socket: the session crashed
    with ENOTCONN in adoptStreamConnection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        session = Session(tmp_path, conn=listener)
        assert session.wait() == 64
    [line] = session.log().splitlines()
    assert line.startswith("upas-smtpd: standard input is a listening socket")


class SendBuffer(StringTransport):
    """A transport whose client never reads: what is written stays in the
    send buffer, and over 64 KiB its streaming producer is paused, as
    Twisted's TCP transport does.  A paused transport reads nothing more."""

    def write(self, data):
        StringTransport.write(self, data)
        if self.producer is not None and self.streaming and len(self.value()) > 65536 \
                and not getattr(self, "full", False):
            self.full = True
            self.producer.pauseProducing()

    def writeSequence(self, seq):
        self.write(b"".join(seq))


def test_a_client_that_never_reads_its_replies_cannot_fill_the_servers_memory(tmp_path):
    """20 MB of pipelined NOOPs from a client that read nothing made the
    server hold about 350 MB of replies (stdio session, measured): it went
    on reading and answering however much was unsent."""
    s = testing.make_settings(root=str(tmp_path / "mail"))
    clock = task.Clock()
    factory = makeSmtpdFactory(s, reactor=clock, run_blocking=testing.run_now, clock=clock,
                               resolver=testing.FakeResolver(everything_exists=True))
    proto = connectionFactory(factory, s, clock).buildProtocol(testing.address("127.0.0.2", 4321))
    transport = SendBuffer(peerAddress=testing.address("127.0.0.2", 4321),
                           hostAddress=testing.address("127.0.0.1", 25))
    proto.makeConnection(transport)
    chunk = b"NOOP\r\n" * 10000
    for _ in range(40):  # 2.4 MB, or until the server stops reading
        if transport.producerState == "paused":
            break
        proto.dataReceived(chunk)
    assert transport.producerState == "paused"
    assert len(transport.value()) < 1024 * 1024  # not 19 MB of replies
    proto.connectionLost(None)


def test_the_listener_line_still_names_the_smtp_factory(tmp_path):
    """Scripts (bench/run) wait for "UpasSMTPFactory starting on <port>"."""
    s = testing.make_settings(root=str(tmp_path / "mail"))
    clock = task.Clock()
    factory = makeSmtpdFactory(s, reactor=clock, run_blocking=testing.run_now, clock=clock,
                               resolver=testing.FakeResolver(everything_exists=True))
    assert connectionFactory(factory, s, clock).logPrefix() == "UpasSMTPFactory"


@pytest.mark.parametrize("starttls", [False, True], ids=["tcp", "starttls"])
def test_a_connection_whose_send_buffer_is_watched_still_closes(server, tls_files, starttls):
    """Past 64 KiB read, the protocol watches its send buffer as the
    transport's producer; TLS shuts down only once no producer is
    registered, so QUIT (and every other close) must let go of it first,
    or the connection stays open after the 221."""
    s = server("-c", str(tls_files / "both.pem"), "--no-queue-runner")
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as raw:
        c = smtplib.SMTP()
        c.sock, c._host = raw, "127.0.0.1"
        assert c.getreply()[0] == 220
        c.ehlo("client.example.net")
        if starttls:
            c.starttls(context=client_context(tls_files))
            c.ehlo("client.example.net")
        big = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2000  # 160 KiB
        assert c.sendmail("alice@example.org", ["bob"], big) == {}
        assert c.docmd("QUIT")[0] == 221
        c.sock.settimeout(10)
        assert c.sock.recv(1) == b""  # the server closed: not left open for ever
    [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    assert msg.get_payload().count("y" * 78) == 2000
