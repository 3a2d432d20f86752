"""aiosmtpd for the bench: one file per message, fsynced before the 250.

    python bench/aiosmtpd_server.py --dir DIR [--no-fsync] [--port N]

The handler writes the message to its own file in DIR and fsyncs it in the
default executor before returning ``250``.  Prints ``listening on PORT``
(127.0.0.1).
"""

import argparse
import asyncio
import itertools
import os
import signal

from aiosmtpd.smtp import SMTP

from twisted_server import store  # same file layout and durability as the Twisted one


class FileHandler:
    def __init__(self, directory, fsync):
        self.directory, self.fsync = directory, fsync
        self.counter = itertools.count()

    async def handle_DATA(self, server, session, envelope):
        name = "%d.%d" % (os.getpid(), next(self.counter))
        await asyncio.get_running_loop().run_in_executor(
            None, store, self.directory, name, envelope.original_content, self.fsync)
        return "250 OK"


async def serve(args):
    loop = asyncio.get_running_loop()
    handler = FileHandler(args.dir, args.fsync)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", enable_SMTPUTF8=True),
        "127.0.0.1", args.port, backlog=4096)
    print("listening on %d" % server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    server.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-fsync", dest="fsync", action="store_false")
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
