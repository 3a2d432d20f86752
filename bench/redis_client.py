"""Which Redis client for the state store: ``txredisapi`` or ``redis.asyncio``.

    .venv/bin/python bench/redis_client.py [--ops 3000] [--reps 3]

Starts its own ``redis-server`` on a free 127.0.0.1 port (tests/realservers),
then, for each repetition, each client and each concurrency (1 and 10
callers) in turn (interleaved, so a busy machine's noise falls on all
alike), runs a fresh child process that does the same ``EVALSHA`` of a
representative script (the connection-acquire shape: a sorted set and a
hash touched, one number back) ``--ops`` times from Twisted code:
``txredisapi`` on Twisted's default reactor (epoll), ``redis.asyncio``
under Twisted's asyncio reactor (its coroutines wrapped with
``Deferred.fromFuture``).  Reports ops/s and the child's CPU ms per op,
then the medians.  The server is stopped by its pid.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SCRIPT = """
redis.call('ZADD', KEYS[1], ARGV[1] + 30, ARGV[2])
local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
redis.call('EXPIRE', KEYS[2], 60)
return n
"""
KEYS = ["{bench}:nodes", "{bench}:conn:node"]


def child(client, port, ops, callers):
    """One measured run in this (fresh) process; prints a JSON line."""
    if client == "redis.asyncio":
        from twisted.internet import asyncioreactor
        asyncioreactor.install()
    from twisted.internet import defer, reactor, task

    args = lambda i: [str(i), "node", "10.0.0.%d" % (i % 250)]  # noqa: E731
    if client == "txredisapi":
        import txredisapi

        @defer.inlineCallbacks
        def connect():
            conn = yield txredisapi.ConnectionPool("127.0.0.1", port, poolsize=1)
            sha = yield conn.script_load(SCRIPT)
            return lambda i: conn.evalsha(sha, KEYS, args(i))
    else:
        import redis.asyncio as aredis

        @defer.inlineCallbacks
        def connect():
            conn = aredis.Redis(host="127.0.0.1", port=port)
            sha = yield defer.Deferred.fromFuture(
                reactor._asyncioEventloop.create_task(conn.script_load(SCRIPT)))
            return lambda i: defer.Deferred.fromFuture(
                reactor._asyncioEventloop.create_task(conn.evalsha(sha, len(KEYS), *KEYS,
                                                                   *args(i))))

    @defer.inlineCallbacks
    def main(_):
        call = yield connect()
        remaining = iter(range(ops))

        @defer.inlineCallbacks
        def caller():
            for i in remaining:
                yield call(i)

        before = os.times()
        start = reactor.seconds()
        yield defer.gatherResults([caller() for _ in range(callers)])
        elapsed = reactor.seconds() - start
        after = os.times()
        cpu = (after.user - before.user) + (after.system - before.system)
        print(json.dumps({"ops_per_s": ops / elapsed, "cpu_ms_per_op": 1000 * cpu / ops}))

    task.react(lambda r: main(None))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", type=int, default=3000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", nargs=4)
    a = p.parse_args()
    if a.child:
        client, port, ops, callers = a.child
        return child(client, int(port), int(ops), int(callers))
    from realservers import RedisServer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(tmp)
        try:
            for rep in range(a.reps):
                for client in ("txredisapi", "redis.asyncio"):
                    for callers in (1, 10):
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", client, str(server.port),
                             str(a.ops), str(callers)],
                            check=True, capture_output=True, text=True).stdout
                        r = json.loads(out.strip().splitlines()[-1])
                        results.setdefault((client, callers), []).append(r)
                        print("rep %d %-14s %2d callers: %7.0f ops/s %.3f CPU ms/op"
                              % (rep, client, callers, r["ops_per_s"], r["cpu_ms_per_op"]))
        finally:
            server.stop()
    print("medians:")
    for (client, callers), rs in results.items():
        print("%-14s %2d callers: %7.0f ops/s %.3f CPU ms/op" % (
            client, callers, statistics.median(r["ops_per_s"] for r in rs),
            statistics.median(r["cpu_ms_per_op"] for r in rs)))


if __name__ == "__main__":
    main()
