"""The AUTH command of the protocol: the exchange's steps, the check, the throttle.

``auth`` holds what AUTH is (the mechanisms, the exchange as a state
machine, the failure throttle's arithmetic), pure; this is what the
protocol does with it: it moves the connection into and out of the AUTH
phase, asks the state store whether the client's address may still try,
logs in through the ``twisted.cred`` portal, and answers a failure once
the address's turn comes.  When the shared state cannot say whether the
address may try (``StateUnavailable``), AUTH is a temporary failure
(454, RFC 4954): no password is checked without its throttle.
``AuthCommands`` is mixed into the protocol (``server.UpasESMTP``),
whose reply, phase and log it uses.
"""

from twisted.cred import error
from twisted.mail import smtp

from ..rules import auth
from .. import replies
from ..decision import reject
from ..interfaces import StateUnavailable
from ..session import AUTH, COMMAND, GONE


class AuthCommands:
    """cmd_AUTH and the steps after it, for the protocol class."""

    _exchange = None  # the AUTH exchange under way
    _logout = None  # the realm's logout after AUTH, called when the connection ends

    def _authMechanisms(self):
        """(a checker exists, the mechanisms this session may use: EHLO's list)."""
        return auth.session_mechanisms(self.portal, self.session.encrypted,
                                       self.settings.clear_passwords)

    def _authCapability(self):
        """(a checker exists, the mechanisms the checkers take): the auth
        table's fact.  Whether PLAIN and LOGIN may be used now (TLS, -p) is
        the table's own check (``policy.encryption``), so that replay with
        another -p decides it again rather than reading it from the log."""
        return auth.session_mechanisms(self.portal, True, True)

    def cmd_AUTH(self, cmd):
        s = self.session
        self.log.info("auth({mech}, (protected)) from {him}", mech=cmd.arg, him=s.him,
                      event="smtpd.auth.start", mechanism=cmd.arg, helo=s.him)
        self._exchange = auth.Exchange(cmd.arg, cmd.extra, self.settings.dom,
                                       self.clock.seconds())
        return self._authStep(self._exchange.start())

    def state_AUTH(self, line):
        return self._authStep(self._exchange.respond(line))

    def _authStep(self, step):
        if isinstance(step, auth.Prompt):
            if self._state is not AUTH:
                self._enter(AUTH)
            return self.sendReply(334, step.text)
        if self._state is AUTH:
            self._enter(COMMAND)
        exchange, self._exchange = self._exchange, None
        if not (step.ok or auth.is_failure(step)):
            return self.reply(step)
        d = self.store.authBegin(self.session.rsys)
        return d.addCallbacks(self._authBegun, self._authUnavailable,
                              callbackArgs=(step, exchange), errbackArgs=(exchange.mech,))

    def _authBegun(self, begun, step, exchange):
        s = self.session
        if self._state is GONE:  # gone while the store answered: the check is not made
            if begun:
                self._settled(self.store.authAbandoned(s.rsys))
            return None
        if not begun:
            # the address has spent its failures: nothing more is checked
            self.log.info("authentication refused: too many failures from {rsys}", rsys=s.rsys,
                          event="smtpd.auth", peer=s.rsys, user=None, mechanism=exchange.mech,
                          result="throttled")
            return self.reply(self._tooManyFailures())
        if not step.ok:
            return self._authFailure(step, "(malformed response)", exchange.mech)
        creds = step.value
        user = auth.printable_user(creds.username)
        d = self.portal.login(creds, None, smtp.IMessageDelivery)
        return d.addCallbacks(self._authenticated, self._authFailed,
                              callbackArgs=(user, exchange.mech),
                              errbackArgs=(user, exchange.mech))

    def _authUnavailable(self, failure, mech):
        """The throttle's state cannot be had (authBegin, authFailed): 454."""
        failure.trap(StateUnavailable)
        s = self.session
        self.log.warn("temporary authentication failure for {rsys}: shared state "
                      "unavailable ({err})", rsys=s.rsys, err=str(failure.value) or "no answer",
                      event="smtpd.auth", peer=s.rsys, user=None, mechanism=mech,
                      result="tempfail")
        if self._state is not GONE:
            self.reply(reject(454, replies.AUTH_TEMPORARY, counts=False,
                              reason="state-unavailable", detail="auth"))

    def _settled(self, d):
        """authSucceeded, authAbandoned: nothing waits for them; a store that
        cannot answer them only loses a count, which is logged."""
        def unavailable(failure):
            failure.trap(StateUnavailable)
            self.log.warn("shared state unavailable: AUTH outcome for {rsys} not counted "
                          "({err})", rsys=self.session.rsys,
                          err=str(failure.value) or "no answer", event="state.unavailable",
                          peer=self.session.rsys, state="unavailable")
        return d.addErrback(unavailable)

    def _tooManyFailures(self):
        return reject(421, replies.AUTH_TOO_MANY.format(dom=self.settings.dom), hangup=True,
                      reason="auth-throttled")

    def _authenticated(self, result, user, mech):
        _, avatar, logout = result
        s = self.session
        self._settled(self.store.authSucceeded(s.rsys))
        if self._state is GONE:
            logout()
            return None
        if avatar is not None:  # an embedder's realm may deliver per user
            self.delivery = avatar
        self._logout = logout  # the realm's, called when the connection ends
        s.authenticated = True
        s.user = user
        if self.factory.decisions is not None:
            self.factory.decisions.authenticated(s)
        self.log.info("authenticated {user} from {rsys}", user=user, rsys=s.rsys,
                      event="smtpd.auth", peer=s.rsys, mechanism=mech, result="success")
        self.sendReply(235, replies.AUTH_OK)

    def _authFailed(self, failure, user, mech):
        s = self.session
        if not failure.check(error.LoginFailed):
            self._settled(self.store.authAbandoned(s.rsys))
            self.log.error("temporary authentication failure for {user} from {rsys}: {err}",
                           user=user, rsys=s.rsys, err=failure.getErrorMessage(),
                           event="smtpd.auth", peer=s.rsys, mechanism=mech, result="tempfail")
            return self.reply(reject(454, replies.AUTH_TEMPORARY, reason="auth-error"))
        return self._authFailure(reject(535, replies.AUTH_FAILED, reason="auth-failed"), user, mech)

    def _authFailure(self, verdict, user, mech):
        """Answer a failed attempt once the address's turn comes (``auth.Throttle``)."""
        s = self.session

        def counted(result):
            wait, n, limit = result
            self.log.info("authentication failed: {user} from {rsys} ({mech}, failure {n})",
                          user=user, rsys=s.rsys, mech=mech, n=n, event="smtpd.auth",
                          peer=s.rsys, mechanism=mech, result="failure", failures=n)
            answer = self._tooManyFailures() if n >= limit else verdict
            return self._after(wait, self._answerFailure, answer)

        return self.store.authFailed(s.rsys).addCallbacks(counted, self._authUnavailable,
                                                          errbackArgs=(mech,))

    def _answerFailure(self, verdict):
        if self._state is not GONE:
            self.reply(verdict)
