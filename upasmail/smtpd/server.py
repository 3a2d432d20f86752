"""upas smtpd as a Twisted ``ESMTP`` subclass (its factory: ``factory``).

The protocol gathers facts (peer, HELO, envelope), asks the pure policy
modules for verdicts, and maps them to replies in one place (``reply``).
It keeps Twisted's ``ESMTP`` machinery (timeouts, AUTH and STARTTLS
states, ``IMessageDelivery``/``IMessage`` hand-off) but replaces what
twisted-notes.md §5 shows to be unsafe:

* Line framing is ours: commands end in LF or CRLF (upas), DATA lines only
  in CRLF, so ``<LF>.<LF>`` and friends never end DATA; a bare LF inside a
  DATA line is stored as a line end.  An over-long command line gets a 500
  and the session goes on; an over-long DATA line refuses that message at
  the dot without ever leaving DATA mode (no smuggling).
* Commands are answered strictly in order: while a reply waits on a
  Deferred, no further input is read.
* Replies use upas's texts (``replies``); validators' exceptions never
  drop the connection.
* AUTH is ours too (``auth``): PLAIN and LOGIN only when encrypted (or
  ``-p``), malformed input gets a 5xx and the session goes on, failures
  are delayed and counted, and a ``twisted.cred`` portal checks the
  credentials.  STARTTLS drops any plaintext pipelined behind it, forgets
  HELO, envelope and AUTH, and is not offered again; an implicit-TLS
  listener counts as encrypted from the start.

Which checks a command passes, and in which order, is not written here:
it is ``policy``'s tables (one per phase: connect, helo, mail, rcpt, data,
auth).  A command is parsed, the tarpit's wait done, its table run
(``policy.decide``, with the facts it asks for gathered by ``_gather``),
the decisions' effects applied (``_apply``), and the reply sent: a
refusal by ``reply``, an acceptance by the command's ``cmd_*`` handler,
which only records what was accepted.

Connection counts, the AUTH budget, the greylist and the grants live in
the state store (``statestore.IStateStore``), which may be another
process: its answers are Deferreds.

This module is one thing, the protocol class, in sections: limits (one
timer), connection, shutdown, framing (the drain loop over
``framing.Reader``), replies, commands, the policy's glue, DATA.  What
is not the protocol's own left it: the factory (``factory``), the AUTH
command (``authcommands``), the decisions' log lines (``notes``), the
bytes (``framing``), the phases and the session (``session``).
"""

from twisted.internet import defer, task
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from . import framing
from .. import grammar, logs, relay, replies
from ..rules import policy, tarpit
from .authcommands import AuthCommands
from .notes import NOTES
from .tls import describe as describe_tls, version_cipher as tls_version_cipher
from ..decision import ACCEPT, Reject, reject
from ..interfaces import IUpasDelivery, IUpasMessage
from ..session import ADMITTING, AUTH, CLOSING, COMMAND, DATA, GONE, Recipient

# for lines outside any session; a session logs through its own
# ``self.log``, which names it (logs.SessionLogger)
log = Logger(namespace="smtpd")

# The connection's phase (``session``'s ADMITTING ... GONE); COMMAND, DATA
# and AUTH are Twisted's modes, and name the ``state_*`` method that reads
# a line in them.
assert (COMMAND, DATA, AUTH) == (smtp.COMMAND, smtp.DATA, smtp.AUTH)
_READING = frozenset((COMMAND, DATA, AUTH))

# A client that pipelines and never reads its replies (a NOOP a million
# times: 47 bytes of reply for 6 read) must not fill our memory.  Replies
# pile up only in answer to input, so the send buffer is watched once a
# connection has sent WATCH_AFTER bytes (idle ones, the many, never are);
# while it is full no command is answered, and past HOLD bytes unanswered
# reading stops.  (Reading does not stop at once: TLS also says "full"
# during its handshake, which needs to read.)
WATCH_AFTER = HOLD = 64 * 1024


# The maillog parts of the lines (docs/logging.rst) are formatted here, with
# %, into one field (``maillog``): twisted.logger's formatting costs some
# microseconds per field, for every line, in every process.


def _bare(path):
    """A path as sent without its angle brackets; None for no path."""
    return path[1:-1] if path else None


def _verb_of(line):
    """The command word of a line that does not parse, for the log."""
    word = line.split(None, 1)[0] if line.split() else b""
    return logs.printable(word.decode("ascii", "replace").upper(), 10)


def _text(resp):
    if isinstance(resp, bytes):
        return resp.decode("utf-8", "replace")
    return str(resp)


@implementer(IHandshakeListener)
class UpasESMTP(AuthCommands, smtp.ESMTP):
    # Per-connection state that most connections never change lives here,
    # on the class: an idle connection then holds few attributes (its
    # instance dictionary stays a small shared-key one), which is most of
    # what 10,000 idle connections cost.
    _from = None  # Twisted's own transaction state, unused: ours is the session's
    _to = ()
    ctx = None
    challengers = {}  # Twisted's AUTH table, unused: AUTH is ours (``auth``)
    authenticated = False
    _messages = None
    _dataRefused = None
    _quietWaiters = ()
    _dropPlaintext = False  # STARTTLS was answered: drop what was pipelined behind it
    _handshakeDone = False
    _closeWaiters = ()  # closeGracefully's; not empty: the server is shutting down
    _accepted = 0  # messages answered 250, for the disconnect line
    _cmd = None  # the command being answered, for the refusal's line
    _end = "lost"  # how the connection ended, for the disconnect line
    _started = 0.0
    _watched = False  # the protocol is its transport's producer
    _sendFull = False  # the transport's send buffer is over its size
    _held = False  # reading stopped: HOLD bytes unanswered while _sendFull
    _factory = None  # the accepted recipient's message maker (validateTo), for RCPT
    logStates = False  # log each change of phase (smtpd.state, debug level)

    def __init__(self, settings, makeDelivery, clock, contextFactory=None,
                 spamfilter=None, store=None):
        # not smtp.ESMTP.__init__: what it sets is above, as class defaults
        if contextFactory is not None:
            self.ctx = contextFactory
        self.settings = settings
        self.spam = spamfilter
        self.store = store or spamfilter.store
        self.makeDelivery = makeDelivery
        self.clock = clock
        self.timeout = settings.idle_timeout
        self.host = settings.dom
        # what every connection sets, set first and in one order: the
        # instance dictionaries then share one key table and stay small
        # (_busy: a reply is pending, and reading is paused meanwhile;
        # _draining: _drain is on the stack, so a reply that comes at once
        # leaves the reading to it)
        self._state = ADMITTING
        self._busy = self._draining = False
        self._reader = framing.Reader()
        self.session = self.log = self.delivery = None
        self.canStartTLS = False
        # one timer for both limits (``_arm``): the idle limit and upas's alarm
        self.timeOut = self._idleDeadline = self._phaseDeadline = self._timer = None

    @property
    def mode(self):
        """Twisted's view of the phase (its ``connectionLost`` reads it)."""
        state = self._state
        return state if state is DATA or state is AUTH else COMMAND

    def _enter(self, state):
        if self.logStates:  # off: no event is built at all
            (self.log or log).debug("state {old} -> {new}", event="smtpd.state",
                                    old=self._state, new=state)
        self._state = state

    def lineReceived(self, line):
        # Twisted's, reading our state instead of its ``mode``
        self.resetTimeout()
        return getattr(self, "state_" + self._state)(line)

    # -- limits: one timer for two deadlines -------------------------------
    # The idle limit (RFC 5321 4.5.3.2; Twisted's TimeoutMixin API, which
    # ESMTP calls) and upas's session alarm share one DelayedCall: each
    # would cost an idle connection about 300 bytes.  Data from the client
    # only moves the idle deadline; the timer looks at the deadlines when
    # it fires and sets itself again if neither has passed.

    def setTimeout(self, period):
        prev, self.timeOut = self.timeOut, period
        self._idleDeadline = None if period is None else self.clock.seconds() + period
        self._arm()
        return prev

    def resetTimeout(self):
        if self._idleDeadline is not None:
            self._idleDeadline = self.clock.seconds() + self.timeOut

    def _setPhaseTimer(self, seconds):
        self._phaseDeadline = self.clock.seconds() + seconds if seconds else None
        self._arm()

    def _arm(self):
        idle, phase = self._idleDeadline, self._phaseDeadline
        due = phase if idle is None else idle if phase is None else min(idle, phase)
        timer = self._timer
        if timer is not None and not timer.active():
            timer = self._timer = None
        if due is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        wait = max(due - self.clock.seconds(), 0)
        if timer is None:
            self._timer = self.clock.callLater(wait, self._expired)
        elif timer.getTime() > due:  # else it fires first, and looks again
            timer.reset(wait)

    def _expired(self):
        self._timer = None
        now = self.clock.seconds()
        idle, phase = self._idleDeadline, self._phaseDeadline
        if phase is not None and now >= phase and (idle is None or phase <= idle):
            self._phaseDeadline = None
            self._phaseExpired()
        elif idle is not None and now >= idle:
            self._idleDeadline = None
            self.timeoutConnection()
        else:
            self._arm()

    def whenQuiet(self):
        """A Deferred that fires once no reply is pending (tests, shutdown)."""
        if not self._busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._quietWaiters += (d,)
        return d

    # -- connection ------------------------------------------------------

    def connectionMade(self):
        # the greeting waits for the store (a grant? over a connection
        # limit?); nothing the client sends is read before it
        self._busy = True
        self.transport.pauseProducing()
        self.factory.admit(self).addCallback(self._admitted)

    def _admitted(self, admitted):
        """Greet, once the factory has admitted the connection with (trusted,
        IP action), the connect table's outcome, its facts and its trace
        (None unless the decision log is kept); None: it has been refused
        and closed."""
        if admitted is None or self._state is GONE:
            return
        facts, outcome, looked, trace = admitted
        peer, host = self.transport.getPeer(), self.transport.getHost()
        rsys = relay.normalize_ip(getattr(peer, "host", str(peer)))
        lsys = relay.normalize_ip(getattr(host, "host", str(host)))
        self.session = s = policy.new_session(self.settings, rsys, lsys, logs.new_session_id())
        self.log = logs.SessionLogger(s.id)
        self._started = self.clock.seconds()
        s.trusted, s.hisaction = facts
        s.encrypted = ISSLTransport.providedBy(self.transport)  # implicit TLS
        if trace is not None:  # the decision log
            self.factory.decisions.connected(s, looked, trace, outcome)
        self.log.info("connect from {rsys}{trusted_text}", rsys=rsys,
                      trusted_text=" (trusted)" if s.trusted else "", event="smtpd.connect",
                      peer=rsys, local=lsys, trusted=s.trusted)
        self.delivery = self.makeDelivery(self.session)
        self.canStartTLS = (ITLSTransport.providedBy(self.transport)
                            and self.ctx is not None and not s.encrypted)
        self.sendReply(outcome.decision.code, *outcome.lines())
        self._enter(COMMAND)
        if self._handshakeDone:
            self._logTLSStarted()
        # upas: one alarm for the whole command phase, until DATA starts
        self._setPhaseTimer(self.settings.session_timeout)
        self._replied(None)  # read what the client has sent meanwhile

    def handshakeCompleted(self):
        self._handshakeDone = True
        if self._state is not ADMITTING:  # else the greeting logs it
            self._logTLSStarted()

    def _logTLSStarted(self):
        s = self.session
        s.cipher = tls_version_cipher(self.transport)
        version, _, cipher = (s.cipher or "/").partition("/")
        self.log.info("started TLS with {rsys}", rsys=s.rsys, event="smtpd.tls", peer=s.rsys,
                      status="started", version=version, cipher=cipher)

    def connectionLost(self, reason):
        greeted = self._state is not ADMITTING
        self._enter(GONE)
        if greeted:  # not when refused, or gone before the store answered
            s = self.session
            if s.encrypted and not self._handshakeDone:
                self.log.info("TLS start-up failed with {rsys}", rsys=s.rsys, event="smtpd.tls",
                              peer=s.rsys, status="failed")
            duration = self.clock.seconds() - self._started
            tls = s.cipher or "none"
            self.log.info("disconnect from {rsys}: {accepted} accepted, {refused} refused "
                          "{maillog}", event="smtpd.disconnect",
                          rsys=s.rsys, accepted=self._accepted, rejects=s.rejects,
                          refused=s.refusals, peer=s.rsys, helo=s.him, tls=tls,
                          auth_user=s.user, duration=duration, end=self._end,
                          maillog="helo=%s tls=%s auth=%s duration=%.3f end=%s" % (
                              s.him, tls, s.user or "none", duration, self._end))
            self._setPhaseTimer(None)
            self._abortMessages()
            if self.factory.decisions is not None:  # the decision log
                self.factory.decisions.ended(s, self._end, duration, self._accepted)
        smtp.ESMTP.connectionLost(self, reason)
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()
        self.factory.connectionGone(self)
        waiters, self._closeWaiters = self._closeWaiters, ()
        for d in waiters:
            d.callback(None)

    # -- shutdown ----------------------------------------------------------

    def closeGracefully(self):
        """Say 421 and close, once the transaction under way (DATA) is answered.

        Fires when the connection is gone.
        """
        d = defer.Deferred()
        if self._state is GONE:
            d.callback(None)
            return d
        self._closeWaiters += (d,)
        self._closeIfIdle()
        return d

    def _closeIfIdle(self):
        if self._closeWaiters and not self._busy and self._state is COMMAND \
                and not self.transport.disconnecting:
            self._end = "shutdown"
            self.sendReply(421, replies.SHUTDOWN.format(dom=self.settings.dom))
            self._close()

    def closeNow(self):
        """The grace period is over: 421, drop any message in DATA, close."""
        if self._state is GONE:
            return
        self._abortMessages()
        if not self.transport.disconnecting:
            self._end = "shutdown"
            self.sendReply(421, replies.SHUTDOWN.format(dom=self.settings.dom))
            self._close()

    def _phaseExpired(self):
        """upas's alarm: the session ends with no reply at all."""
        self._end = "session-limit"
        self.log.info("session limit reached for {rsys}; closing", rsys=self.session.rsys,
                      event="smtpd.session_limit", peer=self.session.rsys)
        self._abortMessages()
        self._close()

    def timeoutConnection(self):
        self._end = "timeout"
        self.sendReply(421, replies.TIMEOUT.format(dom=self.settings.dom))
        self._abortMessages()
        self._close()

    # -- framing ---------------------------------------------------------

    def dataReceived(self, data):
        self._reader.feed(data)
        # counted in the session: one more attribute here would cost each of
        # 10,000 idle connections its small shared-key dictionary
        s = self.session  # None only before the greeting (TLS may hand data on early)
        if s is not None:
            s.bytes_in += len(data)
            if s.bytes_in > WATCH_AFTER and not self._watched:
                self._watched = True
                self.transport.registerProducer(self, True)
        if not self._sendFull:
            self._drain()
        elif self._reader.pending() > HOLD and not self._held:
            self._held = True
            self.transport.pauseProducing()

    # IPushProducer, for the transport: its send buffer is full, or drained

    def pauseProducing(self):
        self._sendFull = True  # _drain answers nothing more

    def resumeProducing(self):
        self._sendFull = False
        if self.transport.disconnecting or self._state is GONE:
            return
        if self._held:
            self._held = False
            if not self._busy:  # else reading resumes with the reply
                self.transport.resumeProducing()
        self._drain()

    def stopProducing(self):
        pass  # the connection is going: nothing of ours to stop

    def _close(self):
        """Close once what was written is sent."""
        if self._state is not GONE and self._state is not CLOSING:
            self._enter(CLOSING)
        if self._watched:
            # TLS shuts down only once no producer is registered
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _drain(self):
        if self._draining:
            return
        self._draining = True
        reader = self._reader
        try:
            while not (self._busy or self._sendFull or self.transport.disconnecting):
                state = self._state
                if state is DATA and not reader.skipping:
                    if self._dataBlock():
                        continue
                    break
                if state not in _READING:
                    break
                limit = (self.settings.max_data_line if state is DATA
                         else self.settings.max_command_line)
                line = reader.line(limit, crlf_only=state is DATA)
                if line is None:
                    break
                if line is framing.TOO_LONG:
                    self._lineTooLong()
                    continue
                self._handle(self.lineReceived, line)
                if self._dropPlaintext:
                    # CVE-2011-0411: bytes behind STARTTLS were sent in the
                    # clear and may be an attacker's; the client must resend
                    self._dropPlaintext = False
                    dropped = reader.discard()
                    if dropped:
                        self.log.info("discarded {n} bytes pipelined after STARTTLS from {rsys}",
                                      n=dropped, rsys=self.session.rsys,
                                      event="smtpd.pipelined_after_starttls")
            reader.compact()
        finally:
            self._draining = False
        if not self._busy:
            self._quiet()

    def _dataBlock(self):
        """Take every complete DATA line received at once (``framing``);
        true when the end of data was reached.  A block ``framing.clean``
        does not vouch for goes line by line through ``state_DATA``, which
        decides.
        """
        limit = self.settings.max_data_line
        block, ended, too_long = self._reader.data(limit)
        if block:
            if self._dataRefused is not None:
                pass  # read to the dot, store nothing
            elif (framing.clean(block, limit)
                  and self._dataSize + len(block) <= self.settings.message_limit):
                self._dataSize += len(block)
                self._blockReceived(block)
            else:
                for line in framing.lines(block):
                    if len(line) > limit:
                        self._lineTooLong()
                    else:
                        self._handle(self.lineReceived, line)
        if ended:
            self._handle(self.lineReceived, b".")
            return True
        if too_long:  # an over-long line still arriving
            self._lineTooLong()
        return False

    def _blockReceived(self, block):
        """Clean DATA lines, many at once: to every message of the transaction."""
        data = framing.unstuff(block)
        try:
            for m in self._messages:
                if IUpasMessage.providedBy(m):
                    m.linesReceived(data)
                else:  # a plain IMessage gets lines, as Twisted's protocol gives them
                    for line in data.split(b"\n")[:-1]:
                        m.lineReceived(line)
        except Exception:
            self._dataRefused = self._failureReply(Failure(), "lineReceived")

    def _handle(self, f, arg):
        """Run one step of the dialogue; a bug costs one reply, never the connection."""
        try:
            result = f(arg)
        except Exception:
            self.log.failure("command failed", event="error")
            result = None
            if self._state is DATA:
                self._dataRefused = reject(451, replies.LOCAL_ERROR, reason="local-error")
            else:
                if self._state is AUTH:  # out of a broken AUTH exchange
                    self._enter(COMMAND)
                self.reply(reject(451, replies.LOCAL_ERROR, reason="local-error"))
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addBoth(self._replied)
            # a reply that is already there needs no pause of the reading
            if self._busy and not self.transport.disconnecting:
                self.transport.pauseProducing()
                self.setTimeout(None)  # the client is waiting for us

    def _replied(self, result):
        if isinstance(result, Failure):
            self.log.failure("command failed", result, event="error")
            if self._state is not GONE:
                self.reply(reject(451, replies.LOCAL_ERROR, reason="local-error"))
        self._busy = False
        if not self.transport.disconnecting and self._state is not GONE:
            self.setTimeout(self._idleLimit())
            if not self._draining:  # else answered at once: reading never paused
                if not self._held:
                    self.transport.resumeProducing()
                self._drain()  # else _drain goes on
        if not self._busy:
            if not self._draining:  # else _drain goes on, and says when it is quiet
                self._quiet()
            self._closeIfIdle()
        return None

    def _quiet(self):
        if self._quietWaiters:
            waiters, self._quietWaiters = self._quietWaiters, ()
            for d in waiters:
                d.callback(None)

    def _idleLimit(self):
        """RFC 5321 4.5.3.2: how long the client may be silent now."""
        return self.settings.data_block_timeout if self._state is DATA else self.timeout

    def _lineTooLong(self):
        """Once per over-long line: refuse it without leaving the mode."""
        if self._state is DATA:
            if self._dataRefused is None:
                self._refuseData(reject(554, replies.DATA_LINE_TOO_LONG, reason="syntax",
                                        detail="line-too-long"))
            return
        if self._state is AUTH:  # the exchange ends: the next line is a command
            self._enter(COMMAND)
            self._exchange = None
        self._cmd = None
        self.reply(reject(500, replies.LINE_TOO_LONG, counts=False, reason="syntax",
                          detail="line-too-long"))

    # -- replies ---------------------------------------------------------

    def sendReply(self, code, *lines):
        self.sendCode(code, "\n".join(lines).encode("utf-8"))

    def reply(self, verdict, envelope=None, log=None):
        """Send the reply for a refusal; the one place verdicts become text.

        Every refusal is logged here, once (``smtpd.refused``); a refusal
        after DATA names the transaction's ``envelope`` (the session's
        is a new one by then) and is logged with the message's ``log``.
        """
        s = self.session
        if verdict.counts:
            s.rejects += 1
        s.refusals += 1
        self._logRefusal(verdict, envelope, log or self.log)
        self.sendReply(verdict.code, *verdict.lines)
        if verdict.hangup:
            self._end = "hangup"
            self._close()

    def _logRefusal(self, verdict, envelope, log):
        s, cmd = self.session, self._cmd
        env = envelope or s.envelope
        verb = "DATA" if envelope is not None else (cmd.verb if cmd is not None else "")
        sender = env.mail_from if env.senders else None
        rcpt = _bare(cmd.path) if verb == "RCPT" else None
        if verb == "MAIL":
            sender = _bare(cmd.path)
        text = " ".join(verdict.lines)
        maillog = ["refused", verb]
        if sender is not None:
            maillog.append("from=<%s>" % sender)
        if rcpt is not None:
            maillog.append("to=<%s>" % rcpt)
        maillog.append("peer=%s helo=%s reason=%s%s (%d %s)" % (
            s.rsys, s.him, verdict.reason, "/" + verdict.detail if verdict.detail else "",
            verdict.code, text))
        log.info("{maillog}", event="smtpd.refused", maillog=" ".join(maillog),
                 command=verb, sender=sender, rcpt=rcpt,
                 recipients=list(env.recipients) if envelope is not None else None,
                 peer=s.rsys, helo=s.him, tls=s.cipher or "none", auth_user=s.user,
                 code=verdict.code, reply=text, temporary=verdict.temporary,
                 reason=verdict.reason, detail=verdict.detail)

    def _failureReply(self, failure, what):
        if failure.check(smtp.SMTPServerError):
            e = failure.value
            verdict = getattr(e, "verdict", None)  # delivery.RefusedRecipient
            if verdict is not None:
                return verdict
            # an embedder's IMessageDelivery: SMTPBadRcpt names a user it has not
            reason = "unknown-user" if failure.check(smtp.SMTPBadRcpt) else "other"
            return reject(e.code, _text(e.resp), reason=reason)
        self.log.failure("{what} failed", failure, what=what, event="error")
        return reject(451, replies.LOCAL_ERROR, reason="local-error")

    # -- commands --------------------------------------------------------

    def state_COMMAND(self, line):
        if self.factory.decisions is not None:  # the decision log
            self.factory.decisions.command(self.session, line)
        try:
            cmd = grammar.parse(line)
        except grammar.ParameterError as e:
            self._cmd = grammar.Command(_verb_of(line))
            return self.reply(reject(e.code, e.text, reason="syntax"))
        except grammar.CommandSyntaxError:
            self._cmd = grammar.Command(_verb_of(line))
            return self.reply(replies.syntax_error())
        self._cmd = cmd
        handler = getattr(self, "cmd_" + cmd.verb)
        table = policy.BY_VERB.get(cmd.verb)
        if table is None:  # QUIT, STARTTLS: no tarpit, no policy
            return handler(cmd)
        if table is policy.HELO and not self.settings.quiet:
            self._logHelo(cmd, cmd.arg)  # upas logs it first, before rejectcheck
        # the tarpit's wait comes before the command is looked at (rejectcheck)
        wait = tarpit.delay(self.session.rejects, self.settings.tarpit_unit,
                            self.settings.tarpit_max)
        if wait:
            return task.deferLater(self.clock, wait, self._decide, table, cmd, handler)
        return self._decide(table, cmd, handler)

    # -- the policy: gather facts, evaluate, apply ---------------------------

    def _decide(self, table, cmd, handler):
        """Run the command's policy table (``policy``), apply its decisions'
        effects, then refuse or hand the accepted command to ``handler``."""
        if self._state is GONE:
            return None
        looked = policy.Facts()
        trace = [] if self.factory.decisions is not None else None
        outcome = policy.decide(table, self.session, cmd, self.settings, self._gather, looked,
                                trace)
        if isinstance(outcome, defer.Deferred):
            return outcome.addCallback(self._decided, cmd, handler, looked, trace)
        return self._decided(outcome, cmd, handler, looked, trace)

    def _decided(self, outcome, cmd, handler, looked, trace):
        if self._state is GONE:
            return None
        if trace is not None:
            self.factory.decisions.record(self.session, cmd, looked, trace)
        delay = self._apply(outcome, cmd, looked)
        decision = outcome.decision
        if not decision.ok:
            return self._later(delay, self.reply, decision)
        if not decision.code:  # RSET, NOOP...: the command gives its own reply
            return handler(cmd)
        return handler(cmd, outcome, looked)

    def _gather(self, name, arg):
        """A fact a check asks for (``policy.FACTS``): the delivery back end's
        answers here, the rest from the anti-abuse state (``spam``)."""
        if name == "validate_from":
            return self._delivered(self.delivery.validateFrom, "validateFrom", self._heloPair(),
                                   arg)
        if name == "validate_to":
            user = Recipient(arg, self, self._heloPair(), self.session.envelope.sender)
            return self._delivered(self.delivery.validateTo, "validateTo", user)
        if name == "mailer_ready":  # a plain IMessageDelivery is always ready
            if IUpasDelivery.providedBy(self.delivery):
                return self.delivery.ready()
            return ACCEPT
        if name == "auth_mechanisms":
            return self._authCapability()
        return self.spam.gather(name, arg, self.session)

    def _heloPair(self):
        """Twisted's ``helo`` argument: (name, address) once HELO is
        accepted, (None, address) before it and after STARTTLS.  Made when
        asked: an idle connection need not keep it."""
        s = self.session
        return (s.him.encode(), s.rsys.encode()) if s.him else (None, s.rsys)

    def _delivered(self, f, what, *args):
        """The back end's answer as a decision (at once, if it gives one at
        once); validateTo's is the message's maker, kept for DATA."""
        try:
            result = f(*args)
        except Exception:
            return self._failureReply(Failure(), what)
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(self._answered, self._failureReply,
                                       callbackArgs=(what,), errbackArgs=(what,))
        return self._answered(result, what)

    def _answered(self, result, what):
        if what == "validateTo":
            self._factory = result  # not a fact: the message's maker, for DATA
        return ACCEPT

    def _apply(self, outcome, cmd, looked):
        """Apply the decisions' effects and log the lines they call for;
        returns the tarpit units to wait before the reply (-D)."""
        delay = policy.apply(self.session, outcome)
        for d in outcome.decisions():
            if d.note:
                NOTES[d.note](self, d, cmd, looked)
        return delay

    def _later(self, units, f, *args):
        """Run f after ``units`` tarpit units on our clock (-D)."""
        return self._after(units * self.settings.tarpit_unit, f, *args)

    def _after(self, seconds, f, *args):
        if seconds > 0:
            return task.deferLater(self.clock, seconds, f, *args)
        return f(*args)

    # -- what an accepted command does ------------------------------------

    def cmd_HELO(self, cmd, outcome, looked):
        s = self.session
        if self.settings.quiet:
            self._logHelo(cmd, outcome.decision.value)
        policy.accepted(s, cmd, outcome.decision)
        lines = outcome.lines()
        if s.extended:
            lines += tuple(self.ehloExtensions())
        return self._later(outcome.decision.delay, self.sendReply, 250, *lines)

    cmd_EHLO = cmd_HELO

    def _logHelo(self, cmd, him):
        s = self.session
        self.log.info("{verb} from {rsys} as {him}", verb=cmd.verb.lower(), rsys=s.rsys,
                      him=him, event="smtpd.helo", peer=s.rsys, helo=him)

    def ehloExtensions(self):
        # upas's first and last lines stay where upas puts them
        ext = ["ENHANCEDSTATUSCODES", "SIZE %d" % self.settings.message_limit, "8BITMIME",
               "PIPELINING", "SMTPUTF8"]
        if self.canStartTLS and not self.session.encrypted:
            ext.append("STARTTLS")
        _, mechanisms = self._authMechanisms()
        if mechanisms:
            ext.append("AUTH " + " ".join(mechanisms))
        return ext

    def cmd_MAIL(self, cmd, outcome, looked):
        policy.accepted(self.session, cmd, outcome.decision)
        self.sendReply(outcome.decision.code, *outcome.lines())

    def cmd_RCPT(self, cmd, outcome, looked):
        policy.accepted(self.session, cmd, outcome.decision)
        self.session.envelope.factories.append(self._factory)
        self._factory = None
        self.sendReply(outcome.decision.code, *outcome.lines())

    def cmd_DATA(self, cmd, outcome, looked):
        s = self.session
        env = s.envelope
        policy.accepted(s, cmd, outcome.decision)
        if s.encrypted and s.tls is None:
            s.tls = describe_tls(self.transport) or "TLS"
        messages = []
        try:
            for factory in env.factories:
                m = factory()
                if not any(m is other for other in messages):
                    messages.append(m)
        except Exception:
            for m in messages:
                m.connectionLost()
            return self.reply(self._failureReply(Failure(), "message"))
        self._messages = messages
        self._dataRefused = None
        self._dataSize = 0
        self._enter(DATA)
        self.setTimeout(self._idleLimit())
        # upas: the command-phase alarm ends here; one DATA transfer has its own
        self._setPhaseTimer(self.settings.data_timeout)
        self.sendReply(outcome.decision.code, *outcome.lines())

    def state_DATA(self, line):
        if line == b".":
            return self._endOfData()
        if self._dataRefused is not None:
            return None
        self._dataSize += len(line) + 2
        if self._dataSize > self.settings.message_limit:
            return self._refuseData(reject(552, replies.MESSAGE_TOO_BIG, reason="size"))
        if b"\n" in line or b"\r" in line:
            # a bare CR or LF: the CVE-2023-51764 family; never store it as a
            # line end a later hop could read as the end of the message
            return self._refuseData(reject(554, replies.BARE_LINE_END, reason="smuggling"))
        if line[:1] == b".":
            line = line[1:]
        try:
            for m in self._messages:
                m.lineReceived(line)
        except Exception:
            self._dataRefused = self._failureReply(Failure(), "lineReceived")

    def _refuseData(self, verdict):
        """The message is refused at the dot; stop writing it now."""
        self._dataRefused = verdict
        for m in self._messages or ():
            if IUpasMessage.providedBy(m):
                m.refuse(verdict)

    def _endOfData(self):
        s = self.session
        self._enter(COMMAND)
        self.setTimeout(self._idleLimit())
        self._setPhaseTimer(None)  # upas: no session alarm after the first DATA
        messages, self._messages = self._messages, None
        env = s.envelope
        s.reset()
        if self._dataRefused is not None:
            refused, self._dataRefused = self._dataRefused, None
            for m in messages:
                m.connectionLost()
            self._recordMessage(refused.code, None)
            return self.reply(refused, env, self._messageLog(messages))
        d = defer.DeferredList(
            [defer.maybeDeferred(m.eomReceived) for m in messages], consumeErrors=True
        )
        return d.addCallback(self._eomResults, env, messages, self.clock.seconds())

    def _eomResults(self, results, env, messages, dot_seen):
        s = self.session
        verdict = ACCEPT
        for ok, result in results:
            if not ok:
                v = self._failureReply(result, "eomReceived")
            elif isinstance(result, Reject):
                v = result
            else:
                continue
            if verdict.ok:
                verdict = v
        mlog = self._messageLog(messages)
        if verdict.ok:
            size = sum(m.size for m in messages if IUpasMessage.providedBy(m))
            self._accepted += 1
            tls = s.cipher or "none"
            mlog.info(
                "[{him}/{rsys}] {senders} sent {n} bytes to {rcpts}; {maillog}", him=s.him,
                rsys=s.rsys, senders=",".join(env.senders), n=size,
                rcpts=",".join(env.recipients), event="smtpd.accepted", sender=env.mail_from,
                recipients=list(env.rcpt_paths), nrcpt=len(env.recipients), size=size,
                peer=s.rsys, helo=s.him, tls=tls, auth_user=s.user, code=250,
                message_id=mlog.message_id, reply=replies.SENT,
                store_seconds=self.clock.seconds() - dot_seen,
                maillog="accepted from=<%s> to=<%s> nrcpt=%d size=%d peer=%s helo=%s tls=%s "
                "auth=%s message-id=%s (250 %s)" % (
                    env.mail_from, ">,<".join(env.rcpt_paths), len(env.recipients), size,
                    s.rsys, s.him, tls, s.user or "none", mlog.message_id or "none",
                    replies.SENT))
            self._recordMessage(250, mlog.queue_id)
            return self.sendReply(250, replies.SENT)
        self._recordMessage(verdict.code, mlog.queue_id)
        return self.reply(verdict, env, mlog)

    def _recordMessage(self, code, queue_id):
        if self.factory.decisions is not None:  # the decision log
            self.factory.decisions.message(self.session, code, queue_id)

    def _messageLog(self, messages):
        """The logger naming the message's queue id, when the back end gave one."""
        for m in messages:
            if IUpasMessage.providedBy(m) and m.log.queue_id is not None:
                return m.log
        return self.log

    def _abortMessages(self):
        messages, self._messages = self._messages, None
        for m in messages or ():
            try:
                m.connectionLost()
            except Exception:
                self.log.failure("IMessage.connectionLost failed", event="error")

    def cmd_RSET(self, cmd):
        policy.accepted(self.session, cmd, ACCEPT)
        self.sendReply(250, replies.RSET_OK)

    def cmd_NOOP(self, cmd):
        self.sendReply(250, replies.NOOP_OK)

    def cmd_HELP(self, cmd):
        self.sendReply(250, replies.HELP_OK)

    def cmd_QUIT(self, cmd):
        self._end = "quit"
        self.sendReply(221, replies.QUIT_OK)
        self._close()

    def cmd_VRFY(self, cmd):
        self.sendReply(252, replies.VRFY_CANNOT)

    cmd_EXPN = cmd_VRFY

    def cmd_STARTTLS(self, cmd):
        s = self.session
        if self.ctx is None:
            return self.reply(replies.syntax_error())
        if s.encrypted:
            return self.reply(reject(503, replies.TLS_ACTIVE, reason="sequence"))
        try:
            if not self.canStartTLS:
                raise RuntimeError("the transport cannot start TLS")
            self.ctx.getContext()
        except Exception as e:
            self.log.error("cannot start TLS for {rsys}: {err}", rsys=s.rsys, err=e,
                           event="smtpd.tls", peer=s.rsys, status="unavailable")
            return self.reply(reject(454, replies.TLS_NOT_AVAILABLE, counts=False, reason="tls"))
        self.sendReply(220, replies.TLS_GO_AHEAD)
        if self.factory.decisions is not None:
            self.factory.decisions.tls_started(s)
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self._dropPlaintext = True
        s.encrypted = True
        s.forget_client(self.settings.require_auth)
