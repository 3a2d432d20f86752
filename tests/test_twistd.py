"""The product from outside: a real ``twistd upas-smtpd`` and real clients."""

import base64
import json
import mailbox
import os
import re
import signal
import smtplib
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


TWISTD = [sys.executable, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def twistd(*args, **kw):
    return subprocess.run([*TWISTD, *args], env=env(),
                          capture_output=True, text=True, timeout=60, **kw)


class Server:
    """``twistd -n upas-smtpd`` on an ephemeral loopback port."""

    def __init__(self, tmp_path, *args, mailboxes=()):
        self.root = str(tmp_path / "mail")
        for user in mailboxes:  # only existing local users get mail
            os.makedirs(os.path.join(self.root, "box", user), exist_ok=True)
        self.log = open(tmp_path / "twistd.log", "w+")
        self.proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "upas-smtpd",
             "--listen", "tcp:0:interface=127.0.0.1", "--root", self.root,
             "--sysname", "gnot.example.org", *args],
            env=env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=str(tmp_path))
        self.port = self._port()

    def _port(self):
        # waiting for a child process to start is not a timed test: poll its log
        for _ in range(600):
            self.log.seek(0)
            m = re.search(r"starting on (\d+)", self.log.read())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise AssertionError("server did not start:\n" + self.log.read())

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, text):
        """Poll the log until ``text`` appears (the child acts on its own time)."""
        for _ in range(600):
            if text in self.output():
                return
            time.sleep(0.05)
        raise AssertionError("%r not logged:\n%s" % (text, self.output()))

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.log.close()


ZONE = {
    "client.sender.net": [["A", "127.0.0.2"]],
    "sender.net": [["MX", "10 client.sender.net"]],
    "example.org": [["MX", "10 mx.example.org"]],
    "2.0.0.127.in-addr.arpa": [["PTR", "ptr-only.sender.net"]],
    "example.test": [["MX", "10 mx.example.test"]],
    "far.example": [["MX", "10 mx.far.example"]],
    "mx.far.example": [["A", "127.0.0.2"]],
    "mx.example.test": [["A", "127.0.0.2"]],
    "servfail": ["broken.sender.net"],
}


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory):
    """A twisted.names server on 127.0.0.1 serving ZONE, in a subprocess."""
    path = tmp_path_factory.mktemp("dns") / "zone.json"
    path.write_text(json.dumps(ZONE))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "dnsserver.py"),
                             str(path)], env=env(), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("port "), line
    yield int(line.split()[1])
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def server(tmp_path, dns_port):
    servers = []

    def start(*args, where=None, mailboxes=("bob", "carol")):
        if where is not None:
            os.makedirs(tmp_path / where, exist_ok=True)
        s = Server(tmp_path / where if where else tmp_path,
                   "--resolver", "127.0.0.1:%d" % dns_port, *args, mailboxes=mailboxes)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_plugins_listed():
    out = twistd("--help").stdout
    assert "upas-smtpd" in out and "upas-smtp" in out


BODY = (b"Subject: real client\r\nFrom: Alice <alice@example.org>\r\n\r\n"
        b"line one\r\n.starts with a dot\r\nFrom the start\r\n\tindented\r\n"
        b"8bit \xc3\xa9\r\nlast\r\n")


def test_smtplib_to_local_mbox(server):
    s = server()
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.example.net") as c:
        code, banner = c.ehlo()
        assert code == 250 and banner.startswith(b"gnot.example.org you are")
        refused = c.sendmail("alice@example.org", ["bob", "Carol@gnot.example.org"], BODY)
        assert refused == {}
    for user in ("bob", "carol"):
        [msg] = mailbox.mbox(os.path.join(s.root, "box", user, "mbox"))
        assert msg.get_from().startswith("alice@example.org ")
        assert msg["Received"].startswith("from client.example.net ([127.0.0.1]) by gnot;")
        with open(os.path.join(s.root, "box", user, "mbox"), "rb") as f:
            data = f.read()
        # the body byte for byte: CRLF -> LF, dots unstuffed, From_ escaped (mboxrd)
        assert data.endswith(b"\n\nline one\n.starts with a dot\n>From the start\n"
                             b"\tindented\n8bit \xc3\xa9\nlast\n\n")


def test_relay_refused_from_outside(server):
    s = server()
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("client.sender.net")
        c.mail("alice@example.org")
        code, text = c.rcpt("x@foreign.example")
    assert (code, text) == (550, b"5.7.1 we don't relay.  send to your-path@[] for loopback.")


def test_relay_from_loopback_is_queued(server):
    s = server("--no-queue-runner")
    with smtplib.SMTP("127.0.0.1", s.port) as c:
        assert c.sendmail("alice@example.org", ["x@foreign.example"], b"Subject: q\r\n\r\nq\r\n") == {}
    jobs = os.listdir(os.path.join(s.root, "queue"))
    assert sorted(j.rsplit(".", 1)[1] for j in jobs) == ["env", "msg"]


def test_kill_9_after_250_keeps_the_message(server):
    s = server()
    c = smtplib.SMTP("127.0.0.1", s.port)
    c.ehlo("client.example.net")
    c.mail("alice@example.org")
    c.rcpt("bob")
    code, _ = c.data(b"Subject: durable\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100 + b"end\r\n")
    assert code == 250
    s.proc.kill()
    s.proc.wait(30)
    [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    assert msg["Subject"] == "durable"
    assert msg.get_payload() == ("x" * 998 + "\n") * 100 + "end\n"
    c.close()


def test_mailer_flag(server, tmp_path):
    out = tmp_path / "got"
    script = tmp_path / "mailer"
    script.write_text("#!/bin/sh\necho \"$@\" > %s.argv\ncat > %s\n" % (out, out))
    script.chmod(0o755)
    s = server("-m", str(script))
    with smtplib.SMTP("127.0.0.1", s.port) as c:
        assert c.sendmail("alice@example.org", ["bob@example.com"], b"Subject: m\r\n\r\nm\r\n") == {}
    assert (tmp_path / "got.argv").read_text() == "-r example.com!bob\n"
    assert out.read_bytes().startswith(b"From example.org!alice ")


def test_bad_config_stops_startup(tmp_path):
    conf = tmp_path / "smtpd.conf"
    conf.write_text("norelay on\nournets 10.0.0.300/8\n")
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--conf", str(conf), "--root", str(tmp_path))
    assert r.returncode != 0
    assert "%s:2: bad address or CIDR '10.0.0.300/8'" % conf in r.stdout + r.stderr


def test_missing_config_is_an_error(tmp_path):
    r = twistd("-n", "--pidfile=", "upas-smtpd", "--conf", str(tmp_path / "none.conf"))
    assert r.returncode != 0
    assert "none.conf: cannot read" in r.stdout + r.stderr


def test_require_auth_without_password_file_stops_startup(tmp_path):
    r = twistd("-n", "--pidfile=", "upas-smtpd", "-a", "-p", "--root", str(tmp_path))
    assert r.returncode != 0
    assert "%s: cannot read: No such file" % (tmp_path / "lib" / "passwd") in r.stdout + r.stderr


def test_open_relay_warning(server):
    s = server("--conf", "/dev/null")  # empty conf: relay control stays on
    assert "OPEN RELAY" not in s.output()


def test_kill_9_after_250_keeps_the_queue_job(server):
    s = server("--no-queue-runner")
    c = smtplib.SMTP("127.0.0.1", s.port)
    assert c.sendmail("alice@example.org", ["x@far.example"],
                      b"Subject: queued\r\n\r\n" + b"q" * 50000 + b"\r\n") == {}
    s.proc.kill()
    s.proc.wait(30)
    queue = os.path.join(s.root, "queue")
    [env] = [j for j in os.listdir(queue) if j.endswith(".env")]
    with open(os.path.join(queue, env[:-4] + ".msg"), "rb") as f:
        data = f.read()
    assert data.startswith(b"From example.org!alice ")
    assert data.endswith(b"\nSubject: queued\n\n" + b"q" * 50000 + b"\n")
    c.close()


def test_concurrent_clients_all_stored(server):
    import threading

    s = server()
    errors = []

    def client(n):
        try:
            with smtplib.SMTP("127.0.0.1", s.port) as c:
                for i in range(10):
                    c.sendmail("c%d@example.org" % n, ["bob", "carol"],
                               b"Subject: c%d m%d\r\n\r\nbody\r\n" % (n, i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for user in ("bob", "carol"):
        subjects = sorted(m["Subject"] for m in
                          mailbox.mbox(os.path.join(s.root, "box", user, "mbox")))
        assert subjects == sorted("c%d m%d" % (n, i) for n in range(6) for i in range(10))


def test_k_banned_peer_sees_no_bytes(server):
    import socket

    s = server("-k", "127.0.0.2/32")
    with socket.create_connection(("127.0.0.1", s.port), source_address=("127.0.0.2", 0)) as c:
        c.settimeout(30)
        assert c.recv(100) == b""
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.3", 0),
                      local_hostname="client.sender.net") as c:
        assert c.noop()[0] == 250
    assert "127.0.0.2" not in s.output()


def test_helo_checks_use_the_resolver(server):
    s = server()
    for name, code in (("client.sender.net", 250), ("ptr-only.sender.net", 250),
                       ("nowhere.sender.net", 554), ("broken.sender.net", 250)):
        with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                          local_hostname=name) as c:
            assert c.ehlo()[0] == code, name
    assert "ptr only from 127.0.0.2 as ptr-only.sender.net" in s.output()
    assert "Hung up on 127.0.0.2; claimed to be nowhere.sender.net" in s.output()


def test_ratify_file_reloaded_and_d_trace(server, tmp_path):
    s = server("-d", "--tarpit-unit", "0")
    lib = os.path.join(s.root, "lib")
    os.makedirs(lib, exist_ok=True)

    def attempt():
        with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                          local_hostname="client.sender.net") as c:
            c.ehlo()
            c.mail("alice@example.org")
            c.rcpt("bob")
            return c.data(b"Subject: x\r\n\r\nhi\r\n")

    assert attempt()[0] == 250
    with open(os.path.join(lib, "blocked"), "w") as f:
        f.write("*block example.org!alice\n")
    assert attempt() == (554, b"5.7.1 we believe this is spam.")
    with open(os.path.join(lib, "blocked"), "w") as f:
        f.write("*block example.org!alice\nnonsense here\n")
    assert attempt()[0] == 554  # the last good version stays in force
    assert "blocked:2: unknown verb 'nonsense'" in s.output()
    traces = os.listdir(os.path.join(s.root, "log", "smtpdb"))
    assert len(traces) == 3
    with open(os.path.join(s.root, "log", "smtpdb", sorted(traces)[0])) as f:
        assert "FROM:<alice@example.org>" in f.read()


def test_greylisting_in_a_real_server(server):
    s = server("-g")
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                      local_hostname="client.sender.net") as c:
        c.ehlo()
        c.mail("alice@example.org")
        c.rcpt("bob")
        assert c.docmd("DATA") == (451, b"please try again soon from the same IP.")
    assert os.path.exists(os.path.join(s.root, "grey", "tmp", "127.0.0.1", "127.0.0.2", "bob"))


# -- AUTH and TLS (issue 5) ------------------------------------------------

PASSWORD = "correct horse 9"


@pytest.fixture
def tls_files(tmp_path):
    """A self-signed certificate for 127.0.0.1, made for this test, and a password file."""
    from upasmail import testing

    cert, key = testing.self_signed_pem("localhost")
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    (tmp_path / "both.pem").write_text(cert + key)
    pw = tmp_path / "passwd"
    pw.write_text("alice:%s\n" % PASSWORD)
    pw.chmod(0o600)
    return tmp_path


def client_context(tls_files):
    import ssl

    ctx = ssl.create_default_context(cafile=str(tls_files / "cert.pem"))
    return ctx  # verifies the chain and the name (127.0.0.1 is in the certificate)


def assert_no_password(s):
    assert PASSWORD not in s.output()
    secrets = (PASSWORD.encode(), base64.b64encode(b"\0alice\0" + PASSWORD.encode()),
               base64.b64encode(PASSWORD.encode()))
    trace_dir = os.path.join(s.root, "log", "smtpdb")
    for name in os.listdir(trace_dir) if os.path.isdir(trace_dir) else ():
        with open(os.path.join(trace_dir, name), "rb") as f:
            data = f.read()
        assert not any(x in data for x in secrets), name


def test_starttls_then_plain_login_with_smtplib(server, tls_files):
    s = server("-c", str(tls_files / "both.pem"), "-a", "--passwd", str(tls_files / "passwd"),
               "-d", "-f", "--tarpit-unit", "0",  # the 530 below would tarpit 8 s per command
               "--no-queue-runner")
    with smtplib.SMTP("127.0.0.1", s.port, source_address=("127.0.0.2", 0),
                      local_hostname="client.sender.net") as c:
        c.ehlo()
        assert c.has_extn("starttls") and c.esmtp_features["auth"] == " CRAM-MD5"
        assert c.mail("alice@example.org")[0] == 530
        c.rset()
        c.starttls(context=client_context(tls_files))
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        c.user, c.password = "alice", PASSWORD
        assert c.auth("PLAIN", c.auth_plain) == (235, b"2.0.0 Authentication successful")
        refused = c.sendmail("alice@example.org", ["bob", "x@foreign.example"],
                             b"Subject: submitted\r\n\r\nhello over TLS\r\n")
        assert refused == {}
    [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    received = " ".join(msg["Received"].split())
    assert re.match(r"from client\.sender\.net \(\[127\.0\.0\.2\]\) \(using TLSv1\.[23] with "
                    r"cipher \S+ \(\d+/\d+ bits\)\) \(Authenticated sender: alice\) by gnot "
                    r"with ESMTPSA; ", received), received
    assert len(os.listdir(os.path.join(s.root, "queue"))) == 2  # relayed: authenticated
    assert "started TLS with 127.0.0.2" in s.output()
    assert_no_password(s)


def test_login_and_cram_md5_and_failures(server, tls_files):
    s = server("-c", str(tls_files / "cert.pem"), "--key", str(tls_files / "key.pem"),
               "--passwd", str(tls_files / "passwd"), "-d", "--auth-fail-delay", "0", "--tarpit-unit", "0")
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
        c.ehlo()
        assert c.login("alice", PASSWORD)[0] == 235  # CRAM-MD5, in the clear
    with smtplib.SMTP("127.0.0.1", s.port, local_hostname="client.sender.net") as c:
        c.starttls(context=client_context(tls_files))
        c.ehlo()
        c.user, c.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.auth("LOGIN", c.auth_login, initial_response_ok=False)
        c.user, c.password = "alice", PASSWORD
        assert c.auth("LOGIN", c.auth_login, initial_response_ok=False)[0] == 235
    assert "authentication failed: alice from 127.0.0.1 (LOGIN, failure 1)" in s.output()
    assert_no_password(s)


def test_implicit_tls_listener(server, tls_files):
    s = server("-c", str(tls_files / "both.pem"), "--smtps", "--passwd",
               str(tls_files / "passwd"), "-k", "127.0.0.3")
    with smtplib.SMTP_SSL("127.0.0.1", s.port, context=client_context(tls_files),
                          local_hostname="client.sender.net") as c:
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        c.user, c.password = "alice", PASSWORD
        assert c.auth("PLAIN", c.auth_plain)[0] == 235
        assert c.docmd("STARTTLS") == (503, b"5.5.1 Error: TLS already active")
    import socket
    with socket.create_connection(("127.0.0.1", s.port), source_address=("127.0.0.3", 0)) as c:
        c.settimeout(30)
        assert c.recv(100) == b""  # -k still applies behind TLS


def test_ssl_endpoint_counts_as_encrypted(server, tls_files):
    listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        tls_files / "key.pem", tls_files / "cert.pem")
    s = server("--listen", listen, "--passwd", str(tls_files / "passwd"), "-k", "127.0.0.3")
    import socket
    with socket.create_connection(("127.0.0.1", s.port), source_address=("127.0.0.3", 0)) as c:
        c.settimeout(30)
        with pytest.raises(ConnectionResetError):
            c.recv(100)  # -k: dropped at once, not a byte
    with smtplib.SMTP_SSL("127.0.0.1", s.port, context=client_context(tls_files),
                          local_hostname="client.sender.net") as c:
        c.ehlo()
        assert c.esmtp_features["auth"].split() == ["CRAM-MD5", "PLAIN", "LOGIN"]
        c.user, c.password = "alice", PASSWORD
        assert c.auth("PLAIN", c.auth_plain)[0] == 235
    assert "127.0.0.3" not in s.output() and "Traceback" not in s.output()


def test_bad_certificate_stops_startup(tmp_path, tls_files):
    other, _ = __import__("upasmail.testing").testing.self_signed_pem("other")
    (tmp_path / "mismatch.pem").write_text(other + (tls_files / "key.pem").read_text())
    r = twistd("-n", "--pidfile=", "upas-smtpd", "-c", str(tmp_path / "mismatch.pem"),
               "--root", str(tmp_path / "m"))
    assert r.returncode != 0
    assert "mismatch.pem: the private key does not belong to the certificate" in r.stderr + r.stdout


# -- upas-smtp (issue 6) ----------------------------------------------------

UPAS_SMTP = [sys.executable, "-c", "from upasmail.tap_smtp import main; main()"]


def upas_smtp(*args, stdin=b"", **kw):
    return subprocess.run([*UPAS_SMTP, *args], input=stdin, env=env(), capture_output=True,
                          timeout=60, **kw)


def test_upas_smtp_delivers_through_mx_to_a_real_smtpd(server, dns_port):
    s = server("--listen", "tcp:0:interface=127.0.0.2", "-h", "example.test")
    message = (b"From alice Wed Mar  7 23:47:45 -0400 2024 remote from gnot\n"
               b"Subject: end to end\n\n.a dot line\nFrom the body\nlast\n")
    r = upas_smtp("--resolver", "127.0.0.1:%d" % dns_port, "--sysname", "gnot",
                  ".example.org", "tcp!example.test!%d" % s.port, "alice", "bob",
                  stdin=message)
    assert (r.returncode, r.stderr) == (0, b"")
    [msg] = mailbox.mbox(os.path.join(s.root, "box", "bob", "mbox"))
    assert msg.get_from().startswith("alice@gnot.example.org ")
    assert msg["Date"] == "Wed, 7 Mar 2024 23:47:45 -0400"
    assert msg["To"] == "bob@example.test"
    assert re.match(r"<[0-9A-F]{32}@gnot\.example\.org>$", msg["Message-ID"])
    # unstuffed by smtpd; ">From" is the mbox's own (mboxrd) escape
    assert msg.get_payload() == ".a dot line\n>From the body\nlast\n"


def test_upas_smtp_exit_statuses(tmp_path):
    r = upas_smtp("-z", "x")
    assert r.returncode == 64
    assert r.stderr.decode().splitlines()[-2:] == [
        "usage: upas-smtp [-aAdfipst] [-b busted-mx] [-g gw] [-h host] [-u user] "
        "[.domain] destaddr sender rcpt-list", "Permanent Failure"]
    r = upas_smtp("tcp!127.0.0.2!1", "alice", "bob", stdin=b"x\n")  # nothing listens there
    assert r.returncode == 75
    assert r.stderr.decode().splitlines()[-1] == "Retry, Temporary Failure"
    r = upas_smtp("net![192.0.2.1]", "alice", "bob", stdin=b"x\n")
    assert r.returncode == 69
    assert r.stderr.decode().splitlines()[-1] == "Permanent Failure"


def test_upas_smtp_filter_mode_touches_no_network():
    data = os.path.join(ROOT, "tests", "data")
    with open(os.path.join(data, "filter-in.txt"), "rb") as f:
        r = upas_smtp("-f", "--resolver", "127.0.0.1:1", "--sysname", "gnot", ".example.com",
                      "net!nowhere.invalid", "alice", stdin=f.read())
    assert r.returncode == 0, r.stderr
    with open(os.path.join(data, "filter-out.txt"), "rb") as f:
        expected = f.read()
    assert r.stdout.split(b"\r\n", 1)[1] == expected.split(b"\r\n", 1)[1]


def test_twistd_one_shot_exit_status(server, dns_port):
    s = server("--listen", "tcp:0:interface=127.0.0.2", "-h", "example.test")
    args = ["--resolver", "127.0.0.1:%d" % dns_port, "--sysname", "gnot",
            "tcp!example.test!%d" % s.port, "alice", "bob"]
    r = twistd("-n", "--pidfile=", "upas-smtp", *args, input="Subject: one shot\n\nhi\n")
    assert r.returncode == 0, r.stdout + r.stderr
    r = twistd("-n", "--pidfile=", "upas-smtp", "tcp!127.0.0.2!1", "alice", "bob", input="x\n")
    assert r.returncode == 75
    assert "Retry, Temporary Failure" in r.stderr


# -- the outbound queue (issue 7) ---------------------------------------------

def test_relayed_mail_reaches_the_destination_mx(server):
    """smtplib -> upas-smtpd (trusted peer, foreign recipient) -> queue -> upas-smtp
    -> a second upas-smtpd, found by MX lookup, as the destination."""
    far = server("--listen", "tcp:0:interface=127.0.0.2", "-h", "far.example",
                 "--no-queue-runner", where="far")
    near = server("--mx-port", str(far.port), "--queue-scan", "1", where="near")
    body = b"Subject: across\r\n\r\nline one\r\n.dotted\r\n" + b"z" * 3000 + b"\r\nend\r\n"
    with smtplib.SMTP("127.0.0.1", near.port) as c:
        assert c.sendmail("alice@example.org", ["bob@far.example"], body) == {}
    mbox_path = os.path.join(far.root, "box", "bob", "mbox")
    for _ in range(600):  # waiting on two child processes: poll the result
        if os.path.exists(mbox_path) and not os.listdir(os.path.join(near.root, "queue")):
            break
        time.sleep(0.05)
    [msg] = mailbox.mbox(mbox_path)
    assert msg["Subject"] == "across"
    assert msg.get_payload() == "line one\n.dotted\n" + "z" * 3000 + "\nend\n"
    assert msg.get_from().startswith("alice@example.org ")
    assert os.listdir(os.path.join(near.root, "queue")) == []
    assert re.search(r"to=far.example!bob relay=\(mx.far.example:127.0.0.2\) status=sent",
                     near.output())
