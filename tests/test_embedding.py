"""The embedding API from outside (issue 15): ``examples/embedded.py`` runs
as shipped, and docs/embedding.rst's own ``IMessageDelivery`` stores what
the upas policy let through."""

import io
import mailbox
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from upasmail import client, testing
from upasmail.service import makeSmtpdFactory

from test_twistd import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "embedded.py")


def free_ports(n):
    """Ports free on 127.0.0.1 now (held together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Example:
    """``python examples/embedded.py`` in a subprocess, its output in a file."""

    def __init__(self, tmp_path):
        self.smtp, self.web = free_ports(2)
        self.root = tmp_path / "mail"
        self.out = open(tmp_path / "embedded.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, EXAMPLE, "--port", str(self.smtp), "--web-port", str(self.web),
             "--root", str(self.root)],
            env=env(), stdout=self.out, stderr=subprocess.STDOUT, cwd=str(tmp_path))

    def output(self):
        self.out.seek(0)
        return self.out.read()

    def wait_for(self, text):
        # a child process starting up is not a timed test: poll its output
        for _ in range(600):
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("%r not in the output:\n%s" % (text, self.output()))

    def page(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/" % self.web, timeout=10) as r:
            return r.headers["Content-Type"], r.read().decode("utf-8")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode


def test_the_embedded_example_serves_sends_and_shows(tmp_path):
    ex = Example(tmp_path)
    try:
        ex.wait_for("bob has 1 message(s); the newest: 'hello from the embedded example'")
        assert "sent to bob@example.org: delivered (250 2.5.0 sent)" in ex.output()
        [msg] = mailbox.mbox(str(ex.root / "box" / "bob" / "mbox"))
        assert msg["Subject"] == "hello from the embedded example"
        assert msg["Delivered-To"] == "bob@example.org"
        kind, page = ex.page()
        assert kind == "text/plain; charset=utf-8"
        assert page == "bob: 1 message\n  alice@mail.example.org: hello from the embedded example\n"
        # the same server takes mail from outside the program, and the page shows it
        with smtplib.SMTP("127.0.0.1", ex.smtp) as c:
            assert c.sendmail("carol@example.net", ["bob@example.org"],
                              b"Subject: second\r\n\r\nfrom smtplib\r\n") == {}
        assert ex.page()[1].startswith("bob: 2 messages\n")
        assert "  carol@example.net: second\n" in ex.page()[1]
    finally:
        code = ex.stop()
    assert code == 0, ex.output()
    assert "Main loop terminated." in ex.output()
    ex.out.close()


def doc_example():
    """The tested ``IMessageDelivery`` in docs/embedding.rst."""
    with open(os.path.join(ROOT, "docs", "embedding.rst"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("A whole example, tested:", 1)[1].split("and to use it::", 1)[0]
    block = block.split(".. code-block:: python\n", 1)[1]
    lines = block.splitlines()
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines) + "\n"


class OwnDeliveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_documented_delivery_stores_what_the_policy_let_through(self):
        namespace = {"__name__": "embedding_doc"}
        exec(compile(doc_example(), "docs/embedding.rst", "exec"), namespace)  # noqa: S102
        root = self.mktemp()
        s = testing.make_settings("", root=root)
        stored = []
        factory = makeSmtpdFactory(
            s, reactor=reactor, run_blocking=testing.run_now, resolver=testing.FakeResolver(),
            makeDelivery=lambda session: namespace["MemoryDelivery"](session, {"bob"}, stored))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        options = client.ClientOptions(sysname="client.example.net")
        message = io.BytesIO(b"Subject: mine\n\n.leading dot\nend\n")
        result = yield client.deliver(
            message, "tcp!127.0.0.1!%d" % port.getHost().port, "alice@example.net",
            ["bob@gnot.example.org", "carol@gnot.example.org", "eve@far.example"],
            options, reactor, testing.FakeResolver())
        while factory.connections:  # the server's side of the QUIT
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual([(r.status, r.reply) for r in result.recipients], [
            ("delivered", "250 2.5.0 sent"),
            ("permanent", "550 5.1.1 gnot.example.org!carol ... user unknown"),
            # from 127.0.0.1 (trusted) the policy lets eve@far.example through;
            # the delivery refuses it: it relays nothing
            ("permanent", "550 5.1.1 far.example!eve ... user unknown")])
        [(sender, rcpt, data)] = stored
        self.assertEqual((sender, rcpt), ("example.net!alice", "bob"))
        self.assertIn(b"Subject: mine\n", data)
        self.assertIn(b"\n.leading dot\nend", data)  # unstuffed
        self.assertFalse(re.search(rb"^Received:", data, re.M))
