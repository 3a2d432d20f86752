"""upas-smtpd, a web page and the upasmail client in one Twisted program.

    .venv/bin/python examples/embedded.py [--port 2525] [--web-port 8080] [--root embedded-mail]

It serves SMTP on 127.0.0.1:PORT (the upas policy, mailboxes under
ROOT/box/, the outbound queue and its runner), and a page on
http://127.0.0.1:WEB-PORT/ listing the mailboxes with their messages.
Once both listen, it sends a message to bob through the upasmail client,
in the same reactor, and logs its arrival.  Send more with any SMTP
client (``swaks --server 127.0.0.1:2525 --to bob@example.org``) and
reload the page.  Ctrl-C or SIGTERM stops it; a message being received
may finish first, as under twistd.

A script with ``task.react`` rather than a ``.tac`` for ``twistd -y``:
it takes options, and it is the shape of a program that has a main of
its own, of which the mail server is one part.  docs/embedding.rst shows
the same services in a ``.tac``.
"""

import argparse
import io
import mailbox
import os
import sys

from twisted.internet import defer, endpoints, task
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web import resource, server

from upasmail import client, conf, settings
from upasmail.service import makeResolver, makeSmtpdService

SYSNAME = "mail.example.org"  # fixed names: no DNS question about this host
DOMAIN = "example.org"
USER = "bob"

log = Logger(namespace="embedded")


class MailboxesPage(resource.Resource):
    """Every mailbox under the mail root, with each message's sender and subject."""

    isLeaf = True

    def __init__(self, root):
        resource.Resource.__init__(self)
        self.root = root  # the server's upasmail.store.MailRoot

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        # read in the reactor thread: fine for a demo's few small mailboxes;
        # a real page would use threads.deferToThread
        lines = []
        for user in sorted(os.listdir(self.root.boxes)):
            messages = read_mailbox(self.root.mailbox_path(user))
            lines.append("%s: %d message%s" % (user, len(messages),
                                               "" if len(messages) == 1 else "s"))
            lines.extend("  %s: %s" % (oneline(m["From"]), oneline(m["Subject"]))
                         for m in messages)
        return ("\n".join(lines) + "\n").encode("utf-8")


def read_mailbox(path):
    if not os.path.exists(path):  # box/<user>/ made, nothing delivered yet
        return []
    return list(mailbox.mbox(path, create=False))


def oneline(value):
    return " ".join(str(value or "").split())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=2525, help="SMTP port on 127.0.0.1")
    p.add_argument("--web-port", type=int, default=8080, help="HTTP port on 127.0.0.1")
    p.add_argument("--root", default="embedded-mail", help="the mail root")
    return p.parse_args(argv)


@defer.inlineCallbacks
def main(reactor, *argv):
    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    # only users that exist get mail: a user is a directory box/<user>/
    os.makedirs(os.path.join(args.root, "box", USER), exist_ok=True)
    s = settings.merge(conf.SmtpdConf(), root=args.root, sysname=SYSNAME, domain=DOMAIN)
    resolver = makeResolver(reactor)  # resolv.conf; the queue runner's MX lookups

    smtpd = makeSmtpdService(s, "tcp:%d:interface=127.0.0.1" % args.port,
                             reactor=reactor, resolver=resolver)
    smtpd.startService()  # listening now, or it raised (the port is taken)
    # stopping drains sessions in DATA, then stops the queue runner
    reactor.addSystemEventTrigger("before", "shutdown", smtpd.stopService)

    web = endpoints.TCP4ServerEndpoint(reactor, args.web_port, interface="127.0.0.1")
    yield web.listen(server.Site(MailboxesPage(smtpd.factory.root)))
    log.info("SMTP on 127.0.0.1:{port}, mailboxes on http://127.0.0.1:{web}/",
             port=args.port, web=args.web_port)

    # the client library, as the outbound queue and upas-smtp use it
    options = client.ClientOptions(sysname=SYSNAME, domain=DOMAIN)
    message = io.BytesIO(b"Subject: hello from the embedded example\n\n"
                         b"Sent by upasmail's client to upas-smtpd, in one reactor.\n")
    result = yield client.deliver(message, "tcp!127.0.0.1!%d" % args.port, "alice",
                                  ["%s@%s" % (USER, DOMAIN)], options, reactor, resolver)
    for r in result.recipients:
        log.info("sent to {rcpt}: {status} ({reply})", rcpt=r.rcpt, status=r.status,
                 reply=r.reply)
    # 250 came after the fsync: the message is in the mailbox now
    arrived = read_mailbox(smtpd.factory.root.mailbox_path(USER))
    log.info("{user} has {n} message(s); the newest: {subject!r}", user=USER, n=len(arrived),
             subject=oneline(arrived[-1]["Subject"]) if arrived else None)
    yield defer.Deferred()  # serve until Ctrl-C or SIGTERM


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
