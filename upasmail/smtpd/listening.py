"""The listener's own pieces: the listening service and the -k drop."""

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

log = Logger(namespace="smtpd")


class ListeningService(service.Service):
    """A listening endpoint as a service, whose port must be bound to start.

    Twisted's ``StreamServerEndpointService`` logs a port it cannot bind
    and starts anyway, unless a private flag says otherwise.  Here a
    failure to listen while the service starts is raised from
    ``privilegedStartService`` (twistd binds there, before it drops
    privileges), so the command line turns it into its one-line start-up
    error and the server does not run deaf.  ``listening`` fires with the
    port once bound; ``port`` is it.
    """

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        self.listening = None  # the port's Deferred, from the start on
        self.port = None  # once bound

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        starting = [True]
        at_start = []

        def bound(port):
            self.port = port
            return port

        def failed(reason):
            if starting[0]:
                at_start.append(reason)
            elif not reason.check(CancelledError):  # stopped before it was bound
                log.failure("cannot listen on {endpoint}", reason, endpoint=self.endpoint)

        self.listening = self.endpoint.listen(self.factory)
        self.listening.addCallbacks(bound, failed)
        starting[0] = False
        if at_start:
            at_start[0].raiseException()

    def startService(self):
        service.Service.startService(self)
        if self.listening is None:  # not bound in privilegedStartService
            self.privilegedStartService()

    def stopService(self):
        service.Service.stopService(self)
        listening, self.listening = self.listening, None
        port, self.port = self.port, None
        if listening is not None:
            listening.cancel()  # not bound yet: stop trying
        return port.stopListening() if port is not None else None


class Dropped(protocol.Protocol):
    """A banned peer (``-k``): the connection is closed at once, before any
    byte is written and without a log line, as upas does.

    The factory hands it out in place of a session (never None), so an
    endpoint that wraps the factory (``ssl:``, stdio) needs nothing for
    it.  Our own layers pass it on unwrapped: the ``-d`` trace has nothing
    to record, and ``--smtps`` would put TLS around a close before its
    handshake, which Twisted can only abort.  Twisted's own TLS endpoints
    do wrap it, so there the peer sees a reset.
    """

    def connectionMade(self):
        self.transport.loseConnection()
