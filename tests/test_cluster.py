"""Several real ``twistd upas-smtpd`` nodes sharing one real ``redis-server``,
behind a real HAProxy sending PROXY protocol v2 (examples/cluster/).

Everything here is a real process on 127.0.0.1: what one node learns
about a client (greylist, AUTH failures, connections, rates) must hold on
the others, and HAProxy's PROXY header must carry the client's own
address into trust, ratify, -k, the Received line and the logs.

A test talks to a node either through HAProxy (the client binds its own
address, e.g. 127.0.0.2, and HAProxy forwards it) or straight to the
node's PROXY listener with a header it writes itself (``proxied``), to
pick the node and the client's address.  The child processes act on
their own clocks: waiting for them is polling, with a bound.
"""

import json
import mailbox
import os
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import time

import pytest

from bench.cluster import haproxy_config
from bench.servers import wait_until as poll  # the child processes act on their own clocks
from realservers import HAProxy, RedisServer, free_port
from test_twistd import ROOT, Server, dns_port, env  # noqa: F401  (dns_port is a fixture)

EXAMPLE = os.path.join(ROOT, "examples", "cluster")
BODY = b"Subject: %s\r\nFrom: alice@sender.net\r\n\r\nhello\r\n"


class Node(Server):
    """One node: a PROXY listener (HAProxy's on 127.0.0.1 only), the shared
    state in ``redis`` (None: local).  Made, it is starting; ``ready()``
    waits until it listens."""

    def __init__(self, directory, name, redis, dns, *args):
        self.name = name
        os.makedirs(directory, exist_ok=True)
        Server.__init__(self, directory,
                        "--listen", "haproxy:tcp:0:interface=127.0.0.1",
                        "--proxy-from", "127.0.0.1/32",
                        "--resolver", "127.0.0.1:%d" % dns, *(
                            ("--state", redis.url, "--node", name) if redis else ()), *args,
                        mailboxes=("bob",))

    def _port(self):  # the nodes start side by side: ready() reads the port
        return None

    def ready(self):
        self.port = Server._port(self)
        return self

    def kill(self):
        """kill -9, as a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def messages(self, user="bob"):
        path = os.path.join(self.root, "box", user, "mbox")
        return list(mailbox.mbox(path)) if os.path.exists(path) else []

    def subjects(self, user="bob"):
        return [m["Subject"] for m in self.messages(user)]


class Cluster:
    def __init__(self, tmp_path, dns, count, args, balancer, state, proxy):
        self.tmp = tmp_path
        self.dns = dns
        self.args = args
        self.nodes = []
        self.haproxy = self.redis = None
        try:
            if state == "redis":
                self.redis = RedisServer(tmp_path / "redis")
            for i in range(count):
                self.nodes.append(self._node(i))
            for n in self.nodes:
                n.ready()
            if balancer:
                port = free_port()
                config = haproxy_config(port, [n.port for n in self.nodes])
                config = config.replace("send-proxy-v2", proxy)
                # HAProxy's "${VAR}" in the comments are not str.format's
                self.haproxy = HAProxy(tmp_path / "haproxy",
                                       config.replace("{", "{{").replace("}", "}}"), port=port)
        except BaseException:
            self.stop()
            raise

    def _node(self, i):
        name = "node%d" % (i + 1)
        return Node(self.tmp / name, name, self.redis, self.dns, *self.args)

    def output(self):
        return "\n".join(n.output() for n in self.nodes)

    def stop(self):
        if self.haproxy:
            self.haproxy.stop()
        for n in self.nodes:  # all at once, then each waited for
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.proc.wait(30)
            n.stop()
        if self.redis:
            self.redis.stop()


@pytest.fixture
def cluster(tmp_path, dns_port):
    """``cluster(*node options, count=3, balancer=True, state="redis",
    proxy="send-proxy-v2")``: ``proxy`` is HAProxy's (``send-proxy``: v1)."""
    made = []

    def start(*args, count=3, balancer=True, state="redis", proxy="send-proxy-v2"):
        c = Cluster(tmp_path / ("c%d" % len(made)), dns_port, count, args, balancer, state,
                    proxy)
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()


# -- clients ----------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(client, port=40000, dest="127.0.0.1", dport=25):
    return b"PROXY TCP4 %s %s %d %d\r\n" % (client.encode(), dest.encode(), port, dport)


def v2_header(client, port=40000, dest="127.0.0.1", dport=25):
    addresses = socket.inet_aton(client) + socket.inet_aton(dest) + struct.pack("!HH", port,
                                                                                dport)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


class ProxiedSMTP(smtplib.SMTP):
    """smtplib straight to a node, the PROXY header written first (as HAProxy)."""

    def __init__(self, port, header, **kw):
        self.header = header
        kw.setdefault("local_hostname", "client.sender.net")
        kw.setdefault("timeout", 30)
        smtplib.SMTP.__init__(self, "127.0.0.1", port, **kw)

    def _get_socket(self, host, port, timeout):
        sock = smtplib.SMTP._get_socket(self, host, port, timeout)
        sock.sendall(self.header)
        return sock


def proxied(node, client, **kw):
    return ProxiedSMTP(node.port, v1_header(client), **kw)


def through(cluster, source="127.0.0.2", **kw):
    """smtplib to HAProxy from ``source`` (a loopback address of this host)."""
    kw.setdefault("local_hostname", "client.sender.net")
    return smtplib.SMTP("127.0.0.1", cluster.haproxy.port, source_address=(source, 0),
                        timeout=30, **kw)


def send(c, subject, rcpt="bob"):
    """One message; the DATA reply (250 means it is on disk)."""
    c.ehlo_or_helo_if_needed()
    assert c.mail("alice@sender.net")[0] == 250
    assert c.rcpt(rcpt)[0] == 250
    try:
        return c.data(BODY % subject.encode())
    except smtplib.SMTPDataError as e:  # refused at DATA or after the dot
        return e.smtp_code, e.smtp_error


def refused_at_connect(node, client):
    """The 421 a node answers a connection from ``client`` with, or None if it greets."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
        s.sendall(v1_header(client))
        f = s.makefile("rb")
        line = f.readline()
        if line.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
            return None
        return line


# quiet defaults for every node: no HELO DNS checks, no tarpit
QUIET = ("-e", "--tarpit-unit", "0")


# -- PROXY: the real client everywhere --------------------------------------

@pytest.mark.parametrize("version", ["send-proxy-v2", "send-proxy"])
def test_haproxy_carries_the_client_into_trust_helo_ratify_k_received_and_logs(cluster,
                                                                              version):
    c = cluster("--tarpit-unit", "0", "--conf", os.path.join(EXAMPLE, "smtpd.conf"),
                "-k", "127.0.0.3", "--no-queue-runner", proxy=version)
    for n in c.nodes:
        os.makedirs(os.path.join(n.root, "lib"), exist_ok=True)
        with open(os.path.join(n.root, "lib", "blocked"), "w") as f:
            f.write("deny 127.0.0.4\n")
    # the HELO checks look up 127.0.0.2's name (the balancer, trusted, is not checked)
    with through(c, "127.0.0.2", local_hostname="nowhere.sender.net") as s:
        assert s.ehlo() == (554, b"5.7.0 Liar!")
    # 127.0.0.2 is an outside peer: its own address in Received and the log,
    # and no relaying (the balancer, 127.0.0.1, is trusted: it would relay)
    with through(c, "127.0.0.2") as s:
        assert send(s, "from two")[0] == 250
        s.mail("alice@sender.net")
        assert s.rcpt("x@foreign.example")[0] == 550
    [msg] = [m for n in c.nodes if n.subjects() for m in n.messages()]
    assert msg["Received"].startswith("from client.sender.net ([127.0.0.2])")
    assert "127.0.0.2" in c.output()
    # 127.0.0.1 (ournets) through the same balancer may relay
    with through(c, "127.0.0.1") as s:
        s.ehlo()
        s.mail("alice@sender.net")
        assert s.rcpt("x@foreign.example")[0] == 250
    # ratify sees 127.0.0.4 (refused at DATA), -k 127.0.0.3 (dropped before a byte)
    with through(c, "127.0.0.4", local_hostname="broken.sender.net") as s:  # SERVFAIL: no lie
        s.ehlo()
        s.mail("alice@sender.net")
        s.rcpt("bob")
        assert s.docmd("DATA")[0] == 554
    with socket.create_connection(("127.0.0.1", c.haproxy.port),
                                  source_address=("127.0.0.3", 0), timeout=30) as s:
        assert s.recv(100) == b""
    assert "127.0.0.3" not in c.output()


@pytest.mark.parametrize("header", [v1_header, v2_header])
def test_v1_and_v2_headers_straight_to_a_node(cluster, header):
    c = cluster(*QUIET, count=1, balancer=False, state="local")
    [n] = c.nodes
    with ProxiedSMTP(n.port, header("198.51.100.7", 41000, "192.0.2.25", 25)) as s:
        assert send(s, "v")[0] == 250
    [msg] = n.messages()
    assert msg["Received"].startswith("from client.sender.net ([198.51.100.7])")
    assert "198.51.100.7" in n.output()


def test_no_header_or_a_foreign_balancer_is_closed_without_a_reply(cluster):
    c = cluster(*QUIET, count=1, balancer=False, state="local")
    [n] = c.nodes
    with socket.create_connection(("127.0.0.1", n.port), timeout=30) as s:
        s.sendall(b"EHLO client.sender.net\r\n")
        assert s.recv(100) == b""
    # 127.0.0.2 is not in --proxy-from: its header is not believed
    with socket.create_connection(("127.0.0.1", n.port), source_address=("127.0.0.2", 0),
                                  timeout=30) as s:
        s.sendall(v1_header("198.51.100.9"))
        assert s.recv(100) == b""
    n.wait_for("not in --proxy-from")
    assert "198.51.100.9" not in n.output()


# -- shared state over the nodes ----------------------------------------------

def test_greylist_entry_made_on_one_node_passes_on_another(cluster):
    c = cluster(*QUIET, "-g", "--greylist-min", "1", balancer=False)
    a, b = c.nodes[0], c.nodes[1]
    with proxied(a, "198.51.100.20") as s:
        assert send(s, "grey") == (451, b"please try again soon from the same IP.")
    # not yet: the entry is shared, and young
    with proxied(b, "198.51.100.20") as s:
        assert send(s, "grey")[0] == 451

    def retry_on_b():
        with proxied(b, "198.51.100.20") as s:
            return send(s, "grey")[0] == 250
    time.sleep(1.0)  # --greylist-min: the retry may not pass before
    poll(retry_on_b, 10, "the greylisted retry to pass on node B")
    assert b.subjects() == ["grey"] and a.subjects() == []
    assert c.redis.command("DBSIZE") > 0


def test_auth_failures_on_one_node_slow_and_stop_the_client_on_another(cluster, tmp_path):
    pw = tmp_path / "passwd"
    pw.write_text("alice:correct horse 9\n")
    pw.chmod(0o600)
    c = cluster(*QUIET, "--passwd", str(pw), "--auth-fail-delay", "0.3",
                "--auth-max-failures", "3", balancer=False)
    a, b = c.nodes[0], c.nodes[1]
    with proxied(a, "198.51.100.30") as s:
        s.ehlo()
        for _ in range(2):  # answered 0.3 s, then 0.6 s after the previous
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "wrong")
    # node B has seen nothing of this client itself: its third failure is
    # answered 1.2 s after the second (0.3 s, were the count B's own) ...
    with proxied(b, "198.51.100.30") as s:
        s.ehlo()
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "wrong")
        assert time.monotonic() - started > 0.9
    # ... and the budget of three is spent, on every node
    with proxied(c.nodes[2], "198.51.100.30") as s:
        s.ehlo()
        with pytest.raises((smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected)) \
                as e:
            s.login("alice", "correct horse 9")
        if isinstance(e.value, smtplib.SMTPAuthenticationError):
            assert e.value.smtp_code == 421 and b"Too many failed" in e.value.smtp_error
    # another client is not affected
    with proxied(b, "198.51.100.31") as s:
        s.ehlo()
        assert s.login("alice", "correct horse 9")[0] == 235


def test_a_grant_from_upas_grant_is_trusted_on_every_node(cluster):
    c = cluster(*QUIET, "--no-queue-runner", balancer=False)

    def relays(node):
        with proxied(node, "198.51.100.35") as s:
            s.ehlo()
            s.mail("alice@sender.net")
            return s.rcpt("x@foreign.example")[0] == 250

    assert not relays(c.nodes[2])
    r = subprocess.run([sys.executable, "-c", "from upasmail.cli.granttool import main; main()",
                        "--state", c.redis.url, "198.51.100.35"], env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(relays(n) for n in c.nodes)


def test_connections_per_client_are_counted_over_three_nodes(cluster):
    c = cluster(*QUIET, "--max-connections-per-peer", "2", balancer=False)
    n1, n2, n3 = c.nodes
    held = [proxied(n1, "198.51.100.40"), proxied(n2, "198.51.100.40")]
    try:
        line = refused_at_connect(n3, "198.51.100.40")
        assert line is not None and line.startswith(b"421"), line
        assert refused_at_connect(n3, "198.51.100.41") is None  # another client
    finally:
        for s in held:
            s.close()
    poll(lambda: refused_at_connect(n3, "198.51.100.40") is None, 10,
         "the released connections to stop counting")


RATE_WINDOW = 3600


def test_rate_limits_hold_over_three_nodes(cluster):
    c = cluster(*QUIET, "--conn-rate", "4", "--msg-rate", "3", "--rcpt-rate", "4",
                "--rate-window", str(RATE_WINDOW), balancer=False)
    nodes = c.nodes
    # the windows are fixed, on the clock: a new one starting halfway would
    # forget the first attempts, so the test keeps clear of the next edge
    left = RATE_WINDOW - time.time() % RATE_WINDOW
    if left < 30:
        time.sleep(left + 0.1)
    # messages: 3 a window, wherever they are sent
    for i, n in enumerate(nodes):
        with proxied(n, "198.51.100.50") as s:
            assert send(s, "m%d" % i)[0] == 250
    with proxied(nodes[0], "198.51.100.50") as s:
        s.ehlo()
        code, text = s.mail("alice@sender.net")
        assert code == 452 and text.startswith(b"4.7.0"), (code, text)
    # recipients: 4 a window (in 3 messages: the message limit is not hit)
    for n, rcpts in zip(nodes, (2, 1, 1)):
        with proxied(n, "198.51.100.51") as s:
            s.ehlo()
            assert s.mail("alice@sender.net")[0] == 250
            for _ in range(rcpts):
                assert s.rcpt("bob")[0] == 250
            if n is nodes[2]:
                code, text = s.rcpt("bob")  # the fifth
                assert code == 452 and text.startswith(b"4.5.3"), (code, text)
    # connections: 4 a window (the ones above were other clients)
    for n in nodes + [nodes[0]]:
        assert refused_at_connect(n, "198.51.100.52") is None
    line = refused_at_connect(nodes[2], "198.51.100.52")
    assert line is not None and line.startswith(b"421 4.7.0"), line


def test_a_killed_nodes_connections_stop_counting_once_its_lease_expires(cluster):
    c = cluster(*QUIET, "--max-connections-per-peer", "2", "--state-lease", "2",
                balancer=False)
    n1, n2 = c.nodes[0], c.nodes[1]
    held = [proxied(n1, "198.51.100.60"), proxied(n1, "198.51.100.60")]
    try:
        assert refused_at_connect(n2, "198.51.100.60").startswith(b"421")
        n1.kill()  # its two connections are never released by it
        killed = time.monotonic()
        poll(lambda: refused_at_connect(n2, "198.51.100.60") is None, 15,
             "node1's lease to expire")
        # not before the lease could have expired (2 s, give or take the renewal)
        assert time.monotonic() - killed > 0.5
    finally:
        for s in held:
            s.sock.close()


# -- Redis going away ---------------------------------------------------------

def test_a_node_answers_at_once_after_start(tmp_path, dns_port):
    """The listener opens once the store can answer: a client that connects
    the moment a node is up is greeted, not dropped for want of Redis."""
    redis = RedisServer(tmp_path / "redis")
    node = Node(tmp_path / "node1", "node1", redis, dns_port, *QUIET)
    try:
        node.ready()
        assert refused_at_connect(node, "198.51.100.80") is None
    finally:
        node.stop()
        redis.stop()


@pytest.mark.parametrize("failure", ["tempfail", "local"])
def test_redis_stopped_mid_session_then_back(cluster, failure):
    c = cluster(*QUIET, "--msg-rate", "100", "--rcpt-rate", "100", "--state-failure",
                failure, count=1, balancer=False)
    [n] = c.nodes
    s = proxied(n, "198.51.100.70")
    try:
        assert send(s, "before")[0] == 250
        c.redis.stop()
        assert s.noop()[0] == 250  # the session goes on
        # a new client: tempfail answers 421 at once, local greets it
        line = refused_at_connect(n, "198.51.100.71")
        if failure == "tempfail":
            assert line is not None and line.startswith(b"421 4."), line
        else:
            assert line is None
        code, text = s.mail("alice@sender.net")
        if failure == "tempfail":
            assert code // 100 == 4, (code, text)
            s.rset()
        else:
            assert code == 250, (code, text)
            assert s.rcpt("bob")[0] == 250
            assert s.data(BODY % b"during")[0] == 250
        assert s.noop()[0] == 250
    finally:
        s.close()
    assert n.proc.poll() is None
    c.redis.start()  # the same port: Redis returns

    def sends():
        try:
            with proxied(n, "198.51.100.70") as t:
                return send(t, "after")[0] == 250
        except smtplib.SMTPConnectError:  # 421: not yet
            return False
    poll(sends, 30, "the node to use Redis again")
    assert n.proc.poll() is None
    assert "Traceback" not in n.output()
    expected = ["before", "during", "after"] if failure == "local" else ["before", "after"]
    assert n.subjects() == expected


# -- HAProxy: a node dies -----------------------------------------------------

def test_killing_a_node_behind_haproxy_loses_no_acknowledged_message(cluster):
    c = cluster(*QUIET, "--no-queue-runner")
    acked = []
    # three sessions at once: leastconn gives each node one
    sessions = [through(c, "127.0.0.2") for _ in range(3)]
    for i, s in enumerate(sessions):
        assert send(s, "s%d-first" % i)[0] == 250
        acked.append("s%d-first" % i)
    where = {sub: n for n in c.nodes for sub in n.subjects()}
    victim = c.nodes[1]
    assert sorted(n.name for n in where.values()) == ["node1", "node2", "node3"]
    victim.kill()
    for i, s in enumerate(sessions):
        subject = "s%d-second" % i
        if where["s%d-first" % i] is victim:
            with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
                send(s, subject)
        else:
            assert send(s, subject)[0] == 250
            acked.append(subject)
    for s in sessions:
        s.close()
    # new sessions: none fails, none reaches the dead node
    for i in range(6):
        with through(c, "127.0.0.2") as s:
            assert send(s, "new%d" % i)[0] == 250
            acked.append("new%d" % i)
    stored = [sub for n in c.nodes for sub in n.subjects()]
    assert sorted(stored) == sorted(acked)  # each once, none lost
    assert not any(sub.startswith("new") for sub in victim.subjects())


# -- examples/cluster/cluster and bench/cluster.py ----------------------------

def test_example_cluster_script_starts_serves_and_stops(tmp_path):
    from realservers import need

    need("redis-server", "redis-server")
    need("haproxy", "haproxy")
    run = tmp_path / "run"
    e = dict(os.environ, UPAS_CLUSTER_DIR=str(run), UPAS_CLUSTER_PORT=str(free_port()),
             UPAS_NODE1_PORT=str(free_port()), UPAS_NODE2_PORT=str(free_port()),
             UPAS_NODE3_PORT=str(free_port()), UPAS_REDIS_PORT=str(free_port()),
             TWISTD=os.path.join(os.path.dirname(sys.executable), "twistd"),
             UPAS_CLUSTER_ARGS="-e --tarpit-unit 0")
    script = os.path.join(EXAMPLE, "cluster")

    def cluster(command):
        return subprocess.run([script, command], env=e, capture_output=True, text=True,
                              timeout=120)

    started = cluster("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pids = {p.name[:-4]: int(p.read_text()) for p in (run / "pids").iterdir()}
        assert sorted(pids) == ["haproxy", "node1", "node2", "node3", "redis"]
        assert cluster("status").returncode == 0
        assert cluster("start").returncode != 0  # not twice
        with smtplib.SMTP("127.0.0.1", int(e["UPAS_CLUSTER_PORT"]), timeout=30,
                          source_address=("127.0.0.2", 0),
                          local_hostname="client.sender.net") as s:
            assert send(s, "through the example")[0] == 250
        stored = [p for p in run.glob("node*/mail/box/bob/mbox")]
        assert len(stored) == 1
        assert "[127.0.0.2]" in stored[0].read_text()
    finally:
        stopped = cluster("stop")
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids.values():
        assert gone(pid), pid
    assert cluster("status").returncode == 1


def gone(pid):
    """Ended (the script's children are reaped by init, maybe later: a zombie is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_bench_cluster_quick(tmp_path):
    from realservers import need

    need("redis-server", "redis-server")
    need("haproxy", "haproxy")
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cluster.py"), "--reps",
                        "1", "--nodes", "2", "--total", "200", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    results = {x["state"]: x for x in json.loads(out.read_text())["results"]}
    assert results["redis"]["found"] == results["local"]["found"] == 200
    assert results["redis"]["redis_cmds_per_msg"] > 1  # the policy asked Redis
    assert "redis_cmds_per_msg" not in results["local"]
