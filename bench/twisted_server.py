"""Stock Twisted ESMTP for the bench: one file per message.

    python bench/twisted_server.py --dir DIR [--no-fsync] [--port N]

``twisted.mail.smtp.ESMTP`` with an IMessageDelivery that accepts any
sender and recipient; each message is written to its own file in DIR and,
unless ``--no-fsync`` (the relay scenario's sink), fsynced in a thread
before the 250.  Prints ``listening on PORT`` (127.0.0.1).
"""

import argparse
import itertools
import os

from twisted.internet import defer, reactor, threads
from twisted.mail import smtp
from zope.interface import implementer


def store(directory, name, data, fsync):
    # written under a dot name and renamed, so a count never sees half a message
    tmp = os.path.join(directory, "." + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, name))


@implementer(smtp.IMessage)
class FileMessage:
    def __init__(self, delivery):
        self.delivery = delivery
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        data = b"\n".join(self.lines) + b"\n"
        self.lines = None
        d = self.delivery
        name = "%d.%d" % (os.getpid(), next(d.counter))
        if d.fsync:
            return threads.deferToThread(store, d.directory, name, data, True)
        store(d.directory, name, data, False)
        return defer.succeed(None)

    def connectionLost(self):
        self.lines = None


@implementer(smtp.IMessageDelivery)
class FileDelivery:
    def __init__(self, directory, fsync):
        self.directory, self.fsync = directory, fsync
        self.counter = itertools.count()

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        return lambda: FileMessage(self)


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def __init__(self, delivery):
        smtp.SMTPFactory.__init__(self)
        self.delivery = delivery

    def buildProtocol(self, addr):
        p = smtp.SMTPFactory.buildProtocol(self, addr)
        p.delivery = self.delivery
        p.challengers = {}
        return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-fsync", dest="fsync", action="store_false")
    args = ap.parse_args()
    port = reactor.listenTCP(args.port, Factory(FileDelivery(args.dir, args.fsync)),
                             backlog=4096, interface="127.0.0.1")
    print("listening on %d" % port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
