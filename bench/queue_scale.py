"""What an enqueue and a scan cost with many jobs already queued.

    .venv/bin/python bench/queue_scale.py [--enqueues E] [QUEUED ...]

For each size, a mail root gets QUEUED jobs that are not due (their
destination waits an hour), written straight to disk; then a
``QueueRunner`` (smarthost routing, a delivery that succeeds at once,
synchronous file work, a fake clock) starts, and the bench times:

* start-up (the runner's first look at the queue);
* a scan when nothing is due (``runner.scan()``);
* an enqueue: ``MailRoot.deliver`` of one remote message, its wake-up and
  the scan that delivers it, averaged over E messages (200); the fsyncs of
  the enqueue itself are included, so compare across sizes.

The cost per enqueue and per scan must not grow with QUEUED.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from upasmail import client, queue, testing
from upasmail.session import Transaction
from upasmail.store import MailRoot, new_id



def instant_deliver(source, dest, sender, rcpts, options, reactor, resolver, clock=None,
                    watch=None, outcome=None, queue_id=None, smtputf8=False, **kw):
    result = client.Result("", [client.RecipientResult(r, r, client.DELIVERED, "250 ok")
                                for r in rcpts])
    if outcome is not None:
        outcome(result)
    return defer.succeed(result)


def fill(root, n, now):
    """n jobs, written without fsync (this is set-up, not the thing measured)."""
    body = b"From a!b Wed Mar  7 23:47:45 -0400 2024 remote from \nSubject: b\n\nx\n"
    for i in range(n):
        qid = new_id(now)
        with open(os.path.join(root.queue, qid + ".msg"), "wb") as f:
            f.write(body)
        with open(os.path.join(root.queue, qid + ".env"), "w") as f:
            json.dump({"id": qid, "sender": "a!b", "recipients": ["remote.example!u%d" % i],
                       "created": now, "attempts": {"smarthost": 1},
                       "next": {"smarthost": now + 3600}}, f)


def measure(n, enqueues=200):
    work = tempfile.mkdtemp(prefix="upasmail-scale-")
    try:
        clock = task.Clock()
        clock.advance(time.time())
        root = MailRoot(os.path.join(work, "mail"), testing.run_now, clock)
        root.prepare()
        fill(root, n, clock.seconds())
        settings = testing.make_settings("", root=root.root, smarthost="tcp!127.0.0.1!25",
                                         outbound_tls=False)
        runner = queue.QueueRunner(root, settings, None, None, clock, deliver=instant_deliver)
        loads = [0]
        real_load = runner.queue.load

        def counting_load(qid):
            loads[0] += 1
            return real_load(qid)

        runner.queue.load = counting_load
        t = time.perf_counter()
        runner.startService()
        clock.advance(0)
        startup = time.perf_counter() - t
        loads_startup, loads[0] = loads[0], 0
        t = time.perf_counter()
        for _ in range(10):
            runner.scan()
        scan = (time.perf_counter() - t) / 10
        loads_scan, loads[0] = loads[0] / 10, 0
        t = time.perf_counter()
        for i in range(enqueues):
            path, f = root.open_spool()
            with f:
                f.write(b"From a!b Wed Mar  7 23:47:45 -0400 2024 remote from \n\nx\n")
            root.deliver(path, Transaction("a!b", ("r.example!x",), (), ("r.example!x",),
                                           "127.0.0.1", "h"))
            os.unlink(path)
            clock.advance(0)
        enqueue = (time.perf_counter() - t) / enqueues
        loads_enqueue = loads[0] / enqueues
        left = len(runner.queue.ids())
        runner.stopService()
        return dict(queued=n, startup_s=startup, scan_ms=scan * 1000,
                    enqueue_ms=enqueue * 1000, loads_startup=loads_startup,
                    loads_per_scan=loads_scan, loads_per_enqueue=loads_enqueue,
                    left=left - n)
    finally:
        shutil.rmtree(work, True)


if __name__ == "__main__":
    args = sys.argv[1:]
    enqueues = 200
    if args[:1] == ["--enqueues"]:
        enqueues, args = int(args[1]), args[2:]
    for n in [int(a) for a in args] or [0, 1000, 100000]:
        r = measure(n, enqueues)
        print("queued=%(queued)d  start-up %(startup_s).2f s (%(loads_startup)d loads)  "
              "scan %(scan_ms).2f ms (%(loads_per_scan).0f loads)  enqueue+delivery "
              "%(enqueue_ms).3f ms (%(loads_per_enqueue).1f loads)  undelivered new jobs "
              "%(left)d" % r, flush=True)
