"""The bench's own SMTP load generator (asyncio, loopback only).

``run_load`` drives a server with ``concurrency`` sessions at once, each
sending ``per_connection`` messages on one connection before QUIT (1 is a
fresh connection per message), until ``total`` messages have been tried.
Every message carries a unique ``X-Bench-Id:`` and ``X-Bench-Sum:`` (a hash
of its body) so that ``bench.verify`` can find it in the server's store.
Latency is per message, from sending MAIL to the reply after the dot.

``idle_connections`` opens N sessions that say EHLO and then stay silent,
and ``noop_latencies`` times NOOPs on one more session.

Every wait is bounded by ``timeout`` seconds; a reply outside 2xx/3xx, a
timeout or a dropped connection counts as an error and the session goes on
(with RSET, or a new connection) until its share is tried.
"""

import asyncio
import functools
import hashlib
import itertools
import resource
import time
from dataclasses import dataclass, field

LINE = 76  # body line length, CRLF not counted


@functools.lru_cache(maxsize=8)
def _bulk(size):
    """The shared part of every body of about ``size`` bytes, and its running hash.

    No dots and no ``From `` at a line start: nothing a server may rightly
    rewrite.  The part that names the message comes last, so the hash of
    the shared part is computed once.
    """
    lines = []
    total = 0
    while total < size - LINE:
        text = ("line %d " % len(lines)).ljust(LINE, "x")
        lines.append(text + "\n")
        total += len(text) + 2
    bulk = "".join(lines).encode("ascii")
    return bulk.replace(b"\n", b"\r\n"), hashlib.sha1(bulk)


def checksum(body):
    """The hash a verifier recomputes: line ends as LF, trailing newlines dropped."""
    normal = body.replace(b"\r\n", b"\n").rstrip(b"\n")
    return hashlib.sha1(normal).hexdigest()


def message_of(bench_id, sender, rcpt, size):
    """(DATA payload with CRLF line ends, body checksum) for one message."""
    bulk, running = _bulk(size)
    last = ("end of %s" % bench_id).encode("ascii")
    h = running.copy()
    h.update(last)
    sum_ = h.hexdigest()
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: bench %s\r\nX-Bench-Id: %s\r\n"
            "X-Bench-Sum: %s\r\n\r\n" % (sender, rcpt, bench_id, bench_id, sum_))
    return head.encode("ascii") + bulk + last + b"\r\n", sum_


def raise_fd_limit():
    """Raise RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


class ReplyError(Exception):
    """The server answered outside 2xx/3xx."""


class Session:
    """One SMTP client connection: commands one at a time, bounded waits."""

    def __init__(self, reader, writer, timeout):
        self.reader, self.writer, self.timeout = reader, writer, timeout

    @classmethod
    async def open(cls, host, port, timeout):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout)
        session = cls(reader, writer, timeout)
        await session.reply()
        return session

    async def reply(self):
        """The code of the next (possibly multi-line) reply; ReplyError if not 2xx/3xx."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise ConnectionError("connection closed by the server")
            if line[3:4] != b"-":
                break
        code = line[:3]
        if code[:1] not in (b"2", b"3"):
            raise ReplyError(line.decode("latin-1").rstrip())
        return int(code)

    async def command(self, text):
        self.writer.write(text.encode("ascii") + b"\r\n")
        return await self.reply()

    async def send(self, sender, rcpt, data):
        await self.command("MAIL FROM:<%s>" % sender)
        await self.command("RCPT TO:<%s>" % rcpt)
        await self.command("DATA")
        self.writer.write(data + b".\r\n")
        return await self.reply()

    async def close(self):
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.read(), self.timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError):
            pass
        self.abort()

    def abort(self):
        self.writer.transport.abort()


@dataclass
class LoadResult:
    tried: int = 0
    acked: dict = field(default_factory=dict)  # bench id -> body checksum
    latencies: list = field(default_factory=list)  # seconds, acknowledged messages
    errors: int = 0
    error_samples: list = field(default_factory=list)
    elapsed: float = 0.0

    def error(self, why):
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(str(why) or type(why).__name__)


async def run_load(host, port, *, concurrency, per_connection, total, size, ehlo, sender,
                   recipients, tag, timeout=60.0):
    """Send ``total`` messages; fire with a LoadResult."""
    result = LoadResult()
    numbers = iter(range(total))

    # never fewer sessions than asked for: a small total is spread over all of them
    per_connection = max(1, min(per_connection, -(-total // concurrency)))

    async def worker():
        while True:
            batch = list(itertools.islice(numbers, per_connection))
            if not batch:
                return
            session = None
            try:
                session = await Session.open(host, port, timeout)
                await session.command("EHLO " + ehlo)
            except (OSError, asyncio.TimeoutError, ConnectionError, ReplyError) as e:
                result.tried += len(batch)
                for _ in batch:
                    result.error(e)
                if session:
                    session.abort()
                continue
            for i, n in enumerate(batch):
                bench_id = "%s-%d" % (tag, n)
                rcpt = recipients[n % len(recipients)]
                data, sum_ = message_of(bench_id, sender, rcpt, size)
                result.tried += 1
                start = time.perf_counter()
                try:
                    await session.send(sender, rcpt, data)
                except ReplyError as e:
                    result.error(e)
                    try:
                        await session.command("RSET")
                    except Exception:
                        pass
                    continue
                except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                    # the connection is gone: the rest of this batch is lost too
                    left = batch[i:]
                    result.tried += len(left) - 1
                    for _ in left:
                        result.error(e)
                    session.abort()
                    session = None
                    break
                result.latencies.append(time.perf_counter() - start)
                result.acked[bench_id] = sum_
            if session:
                await session.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


def percentile(values, p):
    """The p-th percentile (nearest rank) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


async def idle_connections(host, port, n, ehlo, timeout=60.0, parallel=200):
    """Open ``n`` sessions that say EHLO then stay silent; fire with (sessions, errors)."""
    sessions, errors = [], []
    todo = iter(range(n))

    async def opener():
        for _ in todo:
            try:
                s = await Session.open(host, port, timeout)
                await s.command("EHLO " + ehlo)
                sessions.append(s)
            except (OSError, asyncio.TimeoutError, ConnectionError, ReplyError) as e:
                errors.append(e)

    await asyncio.gather(*(opener() for _ in range(parallel)))
    return sessions, errors


async def noop_latencies(host, port, ehlo, count=200, per_session=50, timeout=60.0):
    """Seconds per NOOP, ``per_session`` on each new session (after its EHLO).

    Any reply counts as the answer (stock Twisted ESMTP has no NOOP: 500),
    and sessions are short because Postfix counts many NOOPs as junk
    (``smtpd_junk_command_limit``) and hangs up.
    """
    out = []
    while len(out) < count:
        s = await Session.open(host, port, timeout)
        try:
            await s.command("EHLO " + ehlo)
            for _ in range(min(per_session, count - len(out))):
                start = time.perf_counter()
                s.writer.write(b"NOOP\r\n")
                try:
                    await s.reply()
                except ReplyError:
                    pass
                out.append(time.perf_counter() - start)
        finally:
            await s.close()
    return out
