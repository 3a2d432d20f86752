"""Outbound queue throughput: N queued messages to a local sink, end to end.

    .venv/bin/python bench/queue_throughput.py [N] [DOMAINS]

Each message goes through the runner (envelope writes with fsync), the
upas-smtp client (MX lookup on a fake resolver, a real TCP conversation)
and a scripted sink on 127.0.0.2.  Prints messages per second.
"""

import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.names import dns

from upasmail import queue, service, testing
from upasmail.session import Transaction
from upasmail.store import MailRoot


@defer.inlineCallbacks
def main(n, domains):
    work = tempfile.mkdtemp(prefix="upasmail-bench-")
    try:
        sink = testing.ScriptedSMTPServer()
        port = sink.listen(reactor, "127.0.0.2")
        zone = {}
        for i in range(domains):
            zone["d%d.example" % i] = [dns.Record_MX(10, "mx.example")]
        zone["mx.example"] = [dns.Record_A("127.0.0.2")]
        root = MailRoot(os.path.join(work, "mail"), service.threadRunner(reactor), reactor)
        root.prepare()
        body = b"From a!b Wed Mar  7 23:47:45 -0400 2024 remote from \nSubject: b\n\n" + \
            b"x" * 4000 + b"\n"
        for i in range(n):
            path, f = root.open_spool()
            with f:
                f.write(body)
            rcpt = "d%d.example!user%d" % (i % domains, i)
            yield root.deliver(path, Transaction("a!b", (rcpt,), (), (rcpt,), "127.0.0.1", "h"))
            os.unlink(path)
        settings = testing.make_settings("", root=root.root, mx_port=port.getHost().port,
                                         outbound_tls=False, queue_scan=0.5)
        runner = queue.QueueRunner(root, settings, reactor, testing.FakeResolver(zone))
        start = time.monotonic()
        runner.startService()
        while runner.queue.ids():
            yield task.deferLater(reactor, 0.05, lambda: None)
        took = time.monotonic() - start
        yield runner.stopService()
        yield port.stopListening()
        print("%d messages to %d domains delivered in %.2f s: %.0f msg/s "
              "(max %d at once, %d per domain)" % (n, domains, took, n / took,
                                                   settings.max_deliveries,
                                                   settings.max_per_destination))
    finally:
        shutil.rmtree(work, True)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    domains = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    task.react(lambda r: main(n, domains))
