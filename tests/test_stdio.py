"""Stdio mode: ``upas-smtpd`` with the connection on stdin/stdout, as
inetd, xinetd or a systemd ``Accept=yes`` socket starts it."""

import configparser
import fcntl
import importlib
import json
import mailbox
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from test_twistd import ROOT, dns_port, env, tls_files  # noqa: F401 (fixtures)
from upasmail import replies, stdio

MESSAGE = b"Subject: hi\r\n\r\nhello from stdio\r\n"


class Session:
    """``python -m upasmail.stdio`` with ``conn`` (a socket) as its stdin and
    stdout, or pipes when ``conn`` is None; its stderr in a file."""

    def __init__(self, tmp_path, *args, conn=None, stderr=None, mailboxes=("bob",)):
        self.root = tmp_path / "mail"
        for user in mailboxes:  # only existing local users get mail
            os.makedirs(self.root / "box" / user, exist_ok=True)
        self.errors = tmp_path / "stderr"
        with open(self.errors, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "upasmail.stdio", "--root", str(self.root),
                 "--sysname", "gnot.example.org", "-e", "--tarpit-unit", "0", *args],
                stdin=conn if conn is not None else subprocess.PIPE,
                stdout=conn if conn is not None else subprocess.PIPE,
                stderr=stderr if stderr is not None else err, env=env(), cwd=str(tmp_path))

    def wait(self):
        return self.proc.wait(30)

    def log(self):
        return self.errors.read_text()

    def mbox(self, user="bob"):
        return [m.as_bytes() for m in mailbox.mbox(str(self.root / "box" / user / "mbox"))]

    def raw(self, user="bob"):
        return (self.root / "box" / user / "mbox").read_bytes()

    def queued(self):
        return sorted(n for n in os.listdir(self.root / "queue") if n.endswith(".env"))


def on_socketpair(tmp_path, *args, **kw):
    """(Session, our end of the socketpair it runs on: no IP address at all)."""
    ours, theirs = socket.socketpair()
    session = Session(tmp_path, *args, conn=theirs, **kw)
    theirs.close()
    return session, ours


def over_socketpair(tmp_path, *args, **kw):
    """(Session, smtplib client) joined by a socketpair."""
    session, ours = on_socketpair(tmp_path, *args, **kw)
    return session, client_on(ours)


def received(sock):
    """Everything the server sends until it closes."""
    sock.settimeout(20)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


# a whole transaction in one write, as a pipelining client sends it
TO_BOB = (b"HELO client.example.net\r\nMAIL FROM:<alice@example.org>\r\n"
          b"RCPT TO:<bob>\r\nDATA\r\n" + MESSAGE + b".\r\n")


def client_on(sock):
    sock.settimeout(20)
    s = smtplib.SMTP()
    s.sock, s._host = sock, "localhost"  # smtplib's own connect, minus the dialling
    code, msg = s.getreply()
    assert code == 220, msg
    return s


@pytest.fixture
def resolver(dns_port):  # noqa: F811 (the fixture, imported above)
    return ["--resolver", "127.0.0.1:%d" % dns_port]


def test_local_delivery_over_a_socketpair(tmp_path, resolver):
    session, s = over_socketpair(tmp_path, *resolver)
    s.ehlo("client.example.net")
    assert s.sendmail("alice@example.org", ["bob"], MESSAGE) == {}
    s.quit()
    assert session.wait() == 0
    [msg] = session.mbox()
    assert session.raw().startswith(b"From alice@example.org ")
    assert b"Received: from client.example.net ([unknown]) by gnot" in msg
    assert msg.endswith(b"\n\nhello from stdio\n")
    log = session.log()
    assert "connect from unknown\n" in log  # a socketpair has no IP address: untrusted
    assert "example.org!alice sent" in log and "bytes to bob" in log


def test_quit_right_after_the_dot_gets_250_first_and_the_mail_is_stored(tmp_path, resolver):
    """Everything in one write: the 250 comes after the store (fsync) and
    before the 221, and the message is in the mailbox when the process ends."""
    session, ours = on_socketpair(tmp_path, *resolver)
    ours.sendall(TO_BOB + b"QUIT\r\n")
    got = received(ours)
    codes = [line[:3] for line in got.split(b"\r\n") if line]
    assert codes[-3:] == [b"354", b"250", b"221"], got
    assert session.wait() == 0
    assert len(session.mbox()) == 1


def test_hang_up_after_the_dot_still_stores_before_exit(tmp_path, resolver):
    """No QUIT, and the client's end shut right after the dot: the message
    is stored before the process ends.  The test holds the mailbox's lock
    (another mbox writer, say mutt), so the store has to wait; the process
    must wait with it, not take the end of the connection as its own."""
    box = tmp_path / "mail" / "box" / "bob"
    box.mkdir(parents=True)
    holder = open(box / "mbox", "ab")
    fcntl.lockf(holder, fcntl.LOCK_EX)
    session, ours = on_socketpair(tmp_path, *resolver)
    ours.sendall(TO_BOB)
    ours.shutdown(socket.SHUT_WR)
    with pytest.raises(subprocess.TimeoutExpired):  # waiting for the lock
        session.proc.wait(1)
    holder.close()
    assert session.wait() == 0
    assert len(session.mbox()) == 1
    assert os.listdir(session.root / "tmp") == []


def test_sigterm_waits_for_the_message_under_way(tmp_path, resolver):
    """systemd stops a unit with SIGTERM: as in the daemon, a message being
    stored is finished and answered (the grace period) before the 421."""
    started, go = tmp_path / "started", tmp_path / "go"
    script = tmp_path / "mailer"
    script.write_text("#!/bin/sh\ncat > %s.msg\n: > %s\nwhile [ ! -e %s ]; do sleep 0.05; done\n"
                      % (started, started, go))
    script.chmod(0o755)
    session, ours = on_socketpair(tmp_path, "-m", str(script), "-n", "127.0.0.1", *resolver)
    ours.sendall(b"HELO client.example.net\r\nMAIL FROM:<alice@example.org>\r\n"
                 b"RCPT TO:<bob@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n")
    for _ in range(200):  # poll for the mailer to have the message
        if started.exists():
            break
        time.sleep(0.05)
    session.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):  # the mailer has not finished
        session.proc.wait(1)
    go.touch()
    assert session.wait() == 0
    shutdown = replies.SHUTDOWN.format(dom="gnot.example.org")
    assert received(ours).endswith(b"250 2.5.0 sent\r\n421 %s\r\n" % shutdown.encode())


def test_relay_refused_for_an_untrusted_peer(tmp_path, resolver):
    session, s = over_socketpair(tmp_path, "-n", "192.0.2.7!4711", *resolver)
    s.ehlo("client.example.net")
    s.mail("alice@example.org")
    code, msg = s.rcpt("someone@far.example")
    assert code == 550 and b"we don't relay" in msg
    s.quit()
    assert session.wait() == 0
    assert session.queued() == []
    assert "connect from 192.0.2.7\n" in session.log()


@pytest.mark.parametrize("peer, shown", [("127.0.0.1!4711", "127.0.0.1"),
                                         ("::ffff:127.0.0.1", "127.0.0.1"),
                                         ("::1!25", "::1")])
def test_n_ip_port_names_the_peer_and_ournets_may_relay(tmp_path, resolver, peer, shown):
    session, s = over_socketpair(tmp_path, "-n", peer, *resolver)
    s.ehlo("client.example.net")
    assert s.sendmail("alice@example.org", ["someone@far.example", "bob"], MESSAGE) == {}
    s.quit()
    assert session.wait() == 0
    [msg] = session.mbox()
    assert ("Received: from client.example.net ([%s])" % shown).encode() in msg
    assert len(session.queued()) == 1  # no queue runner here: left for the daemon
    assert "connect from %s (trusted)\n" % shown in session.log()


def test_n_netdir_directory_gives_both_addresses(tmp_path, resolver):
    netdir = tmp_path / "net" / "tcp" / "7"
    netdir.mkdir(parents=True)
    (netdir / "remote").write_text("198.51.100.4!51234\n")
    (netdir / "local").write_text("192.0.2.25!25\n")
    session, s = over_socketpair(tmp_path, "-n", str(netdir), *resolver)
    s.ehlo("client.example.net")
    s.mail("alice@example.org")
    assert s.rcpt("someone@far.example")[0] == 550  # untrusted: no relaying
    # an address literal of our own address (``local``) is our domain
    assert s.rcpt("bob@[192.0.2.25]")[0] == 250
    assert s.data(MESSAGE)[0] == 250
    s.quit()
    assert session.wait() == 0
    [msg] = session.mbox()
    assert b"Received: from client.example.net ([198.51.100.4]) by gnot" in msg
    assert "connect from 198.51.100.4\n" in session.log()


def test_a_pipe_has_no_peer_and_is_untrusted(tmp_path, resolver):
    session = Session(tmp_path, *resolver)
    out, _ = session.proc.communicate(
        b"HELO client.example.net\r\nMAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<someone@far.example>\r\nRCPT TO:<bob>\r\nDATA\r\n" + MESSAGE + b".\r\nQUIT\r\n",
        timeout=30)
    assert session.proc.returncode == 0
    lines = out.decode().split("\r\n")
    assert lines[0].startswith("220 ")
    assert any(line.startswith("550 5.7.1 we don't relay") for line in lines), out
    assert lines[-3:] == ["250 2.5.0 sent", "221 2.0.0 Successful termination", ""], out
    log = session.log()
    assert "peer address unknown" in log and "untrusted" in log
    [msg] = session.mbox()
    assert b"([unknown])" in msg


@pytest.mark.parametrize("arg, why", [
    ("not-an-address", "not an IP address"),
    ("192.0.2.1!http", "not a port number"),
    ("/no/such/netdir", "no such directory"),
    ("EMPTY", "cannot read"),  # a directory without ``remote``
])
def test_bad_n_is_one_line_and_exit_64_before_any_byte(tmp_path, arg, why):
    if arg == "EMPTY":
        arg = str(tmp_path / "empty")
        os.mkdir(arg)
    session = Session(tmp_path, "-n", arg)
    out, _ = session.proc.communicate(b"", timeout=30)
    assert session.proc.returncode == 64
    assert out == b""
    [line] = session.log().splitlines()
    assert line.startswith("upas-smtpd: ") and why in line


@pytest.mark.parametrize("args", [["--listen", "tcp:25"], ["--workers", "2"]])
def test_listen_and_workers_are_refused(tmp_path, args):
    session = Session(tmp_path, *args)
    out, _ = session.proc.communicate(b"", timeout=30)
    assert session.proc.returncode == 64
    assert out == b""
    [line] = session.log().splitlines()
    assert line.startswith("upas-smtpd: " + args[0])


def test_a_tcp_socket_on_stdin_gives_the_peer_and_starttls(tmp_path, resolver, tls_files):
    """An accepted TCP socket as fd 0, as inetd passes it: getpeername names
    the peer (127.0.0.2 is outside the default ournets), and STARTTLS works
    on the adopted socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), source_address=("127.0.0.2", 0))
    conn, _ = listener.accept()
    listener.close()
    session = Session(tmp_path, "-c", str(tls_files / "cert.pem"), "--key",
                      str(tls_files / "key.pem"), *resolver, conn=conn)
    conn.close()
    s = client_on(client)
    s.ehlo("client.example.net")
    assert s.has_extn("starttls")
    s.starttls(context=ssl.create_default_context(cafile=str(tls_files / "cert.pem")))
    s.ehlo("client.example.net")
    s.mail("alice@example.org")
    assert s.rcpt("someone@far.example")[0] == 550
    assert s.rcpt("bob")[0] == 250
    assert s.data(MESSAGE)[0] == 250
    s.quit()
    assert session.wait() == 0
    [msg] = session.mbox()
    assert b"Received: from client.example.net ([127.0.0.2])" in msg
    assert b"TLS" in msg  # the Received comment names the TLS version
    log = session.log()
    assert "connect from 127.0.0.2\n" in log and "started TLS with 127.0.0.2" in log


def test_stderr_on_the_connection_keeps_the_logs_off_it(tmp_path, resolver):
    """inetd and xinetd put the socket on fds 0, 1 and 2: the client must see
    protocol lines only (the logs go to syslog then)."""
    ours, theirs = socket.socketpair()
    session = Session(tmp_path, *resolver, conn=theirs, stderr=theirs)
    theirs.close()
    ours.sendall(TO_BOB + b"QUIT\r\n")
    got = received(ours)
    assert session.wait() == 0
    lines = got.split(b"\r\n")
    assert lines[-1] == b"" and all(re.match(rb"\d{3}[ -]", line) for line in lines[:-1]), got
    assert lines[-2] == b"221 2.0.0 Successful termination"
    assert len(session.mbox()) == 1


def test_check_config_goes_to_its_module(tmp_path, capsys):
    """``upas-smtpd --check-config`` is the checker: the effective settings,
    exit 0; a broken smtpd.conf, its file:line, exit 1."""
    root = str(tmp_path / "mail")
    assert stdio.main(["--check-config", "--root", root]) == 0
    out, err = capsys.readouterr()
    assert "root = %s\n" % root in out
    conf = tmp_path / "smtpd.conf"
    conf.write_text("ournets 10.0.0.0/8\nnosuchkeyword x\n")
    assert stdio.main(["--check-config", "--root", root, "--conf", str(conf)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "%s:2: " % conf in err


def test_parse_netdir_forms(tmp_path):
    remote, local = stdio.parse_netdir("::ffff:192.0.2.1!25")
    assert (remote.host, remote.port, local) == ("192.0.2.1", 25, None)
    assert stdio.parse_netdir("2001:db8::1")[0].host == "2001:db8::1"
    with pytest.raises(stdio.NetdirError):
        stdio.parse_netdir("192.0.2.1!70000")
    (tmp_path / "remote").write_text("192.0.2.9!1\n")
    remote, local = stdio.parse_netdir(str(tmp_path))
    assert (remote.host, local) == ("192.0.2.9", None)  # ``local`` is optional


def test_the_placeholders_are_never_trusted():
    """An unknown peer is no network's member, so no ournets or ratify line
    (0.0.0.0/0 and ::/0 included) can trust or match it."""
    from upasmail import relay
    from upasmail.conf import parse_network

    everything = [parse_network("0.0.0.0/0"), parse_network("::/0")]
    for name in (stdio.UNKNOWN_PEER, stdio.UNKNOWN_LOCAL):
        assert not relay.is_trusted(name, everything)
        assert not relay.NetSet(everything).contains(name)


def test_console_script_entry_point():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    scripts = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    module, func = scripts["upas-smtpd"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_socket_addresses_show_v4_mapped_as_v4_and_v6():
    v6 = socket.socket(socket.AF_INET6)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as xinetd's IPv6
    v6.bind(("::ffff:127.0.0.1", 0))
    v6.listen()
    with v6, socket.create_connection(("127.0.0.1", v6.getsockname()[1])) as c:
        conn, _ = v6.accept()
        with conn:
            assert conn.getpeername()[0] == "::ffff:127.0.0.1"
            peer, ours = stdio.socket_addresses(conn)
            assert (peer.host, peer.port, ours.host) == ("127.0.0.1", c.getsockname()[1],
                                                         "127.0.0.1")
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener, \
            socket.create_connection(("::1", listener.getsockname()[1])):
        conn, _ = listener.accept()
        with conn:
            assert stdio.socket_addresses(conn)[0].host == "::1"
    a, b = socket.socketpair()
    with a, b:
        assert stdio.socket_addresses(a) == (None, None)  # no IP: the placeholders


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                    reason="systemd-socket-activate not installed")
def test_accept_yes_under_systemd_socket_activate(tmp_path, resolver):
    """``systemd-socket-activate --inetd`` accepts and starts one process per
    connection with the socket on its stdin and stdout, as an ``Accept=yes``
    unit does."""
    with socket.socket() as probe:  # a free port (the activator wants a number)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "mail"
    os.makedirs(root / "box" / "bob")
    errors = open(tmp_path / "stderr", "w")
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--inetd", "--accept", "-l", "127.0.0.1:%d" % port,
         "-E", "PYTHONPATH=" + env()["PYTHONPATH"],  # it passes no environment on
         sys.executable, "-m", "upasmail.stdio", "--root", str(root), "--sysname",
         "gnot.example.org", "--tarpit-unit", "0", *resolver],
        env=env(), stdout=subprocess.DEVNULL, stderr=errors, cwd=str(tmp_path))
    try:
        for _ in range(200):  # poll for the activator to listen
            try:
                client = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        s = client_on(client)
        assert s.sendmail("alice@example.org", ["bob", "someone@far.example"], MESSAGE) == {}
        s.quit()
        for _ in range(200):  # poll for the session's process to end
            if "Main loop terminated" in (tmp_path / "stderr").read_text():
                break
            time.sleep(0.05)
    finally:
        activator.terminate()
        activator.wait(30)
        errors.close()
    log = (tmp_path / "stderr").read_text()
    assert "connect from 127.0.0.1 (trusted)" in log
    assert len(mailbox.mbox(str(root / "box" / "bob" / "mbox"))) == 1
    assert len([n for n in os.listdir(root / "queue") if n.endswith(".env")]) == 1


@pytest.mark.parametrize("over", ["pipe", "socket"])
def test_k_banned_peer_gets_no_byte(tmp_path, over):
    """-k: the connection is closed before a byte is written, on a pipe too
    (StandardIO cannot abort a connection)."""
    args = ("-n", "192.0.2.1", "-k", "192.0.2.0/24")
    if over == "pipe":
        session = Session(tmp_path, *args)
        out, _ = session.proc.communicate(b"HELO client.example.net\r\n", timeout=30)
    else:
        session, ours = on_socketpair(tmp_path, *args)
        out = received(ours)
    assert session.wait() == 0
    assert out == b""
    assert "Traceback" not in session.log()


def test_d_traces_the_session_as_the_daemon_does(tmp_path, resolver):
    session, s = over_socketpair(tmp_path, "-d", "-n", "192.0.2.7!4711", *resolver)
    s.helo("client.example.net")
    s.quit()
    assert session.wait() == 0
    traces = session.root / "log" / "smtpdb"
    [name] = os.listdir(traces)
    assert name.endswith(".192.0.2.7")  # named by the peer -n gave
    trace = (traces / name).read_text()
    assert "C 1: b'helo client.example.net\\r\\n'" in trace  # smtplib's lower case
    assert "b'221 2.0.0 Successful termination'" in trace


def test_the_log_is_the_daemons_json_too_and_no_debug_lines(tmp_path, resolver):
    """``--log-json`` as under twistd: one JSON event per line, the accepted
    message among them with its fields; the per-fsync debug events stay out
    of both logs."""
    json_log = tmp_path / "events.json"
    session, s = over_socketpair(tmp_path, *resolver, "--log-json", str(json_log))
    s.ehlo("client.example.net")
    assert s.sendmail("alice@example.org", ["bob"], MESSAGE) == {}
    s.quit()
    assert session.wait() == 0
    events = [json.loads(line) for line in json_log.read_text().splitlines()]
    [accepted] = [e for e in events if e.get("event") == "smtpd.accepted"]
    assert (accepted["recipients"], accepted["nrcpt"], accepted["code"]) == (["bob"], 1, 250)
    assert accepted["helo"] == "client.example.net" and accepted["queue_id"]
    assert "store.sync" not in {e.get("event") for e in events}
    assert "store.sync" not in session.log() and "fsync" not in session.log()


def test_metrics_is_refused_in_stdio_mode(tmp_path):
    session = Session(tmp_path, "--metrics", "tcp:0")
    assert session.wait() == 64
    assert session.log().count("\n") == 1 and "--metrics" in session.log()
