"""upas spam.c: the anti-abuse state shared by every connection.

``SpamFilter`` holds what the checks need that outlives one connection:
the ratify lists (re-read when the file changes), the validator hooks,
the DNS resolver, and the state store (``statestore.IStateStore``: the
temporary trusted grants and the greylist, shared by every process).  The
protocol asks it for facts and verdicts at upas's points:

connect  ``banned`` (-k) → ``peer`` (trusted?, ratify IP action; the store's
         grant, asked only when nothing else trusts the peer)
HELO     ``helo_verdict`` (lie checks, §1.7)
MAIL     ``filterstate`` (TRUSTED / IP action / account action, §1.13)
         → ``sender_domain`` (-r, §1.15)
RCPT     ``validators.recipok`` / ``senderok`` (§1.9)
DATA     ``validators.sendermxcheck`` → ``startcmd`` (filterstate actions,
         ``nospamfiltering``, §1.10.1) → ``greylist_verdict`` (-g)

The decisions themselves are the pure functions of ``ratify``, ``helo``,
``tarpit`` and ``greylist``; this class only gathers the facts.
"""

import ipaddress
import os

from twisted.internet import defer
from twisted.logger import Logger

from . import dnscheck, greylist, helo, logs, ratify, relay
from .conf import WatchedFile
from .decision import ACCEPT, reject
from .greylist import NEWLY_WHITE
from .statestore import LocalStateStore
from .validators import Validators

log = Logger(namespace="smtpd")

HELO_DELAY = 15  # -D, in tarpit units (upas [9F]: 15 s, quirk Q8)
DIALUP = "5.7.1 We don't accept mail from dial-up ports."
SPAM = "5.7.1 we believe this is spam."
DELAYED = "4.3.0 There will be a delay in delivery of this message."
NO_SUCH_DOMAIN = "5.7.1 Sender domain must exist: {sender}"
NO_SUCH_DOMAIN_MAIL = "5.1.8 Sender domain must exist: {sender}"
DOMAIN_TEMPFAIL = "4.4.3 Sender domain lookup failed; try again later: {sender}"


def deny_lines(sender, dom):
    return ("5.7.1 We don't accept mail from %s." % sender,
            "5.7.1 Contact postmaster@%s for more information." % dom)


def startcmd(state, sender, dom):
    """What DATA does for a filterstate (smtpd.c startcmd; pure).

    Returns ``(verdict, action)``: a refusal, or ACCEPT with the action
    ``deliver``, ``block`` or ``delay`` (read the message, do not deliver).
    """
    if state in (ratify.ACCEPT, ratify.TRUSTED):
        return ACCEPT, "deliver"
    if state in ("block", "delay"):
        return ACCEPT, state
    if state == "dial":
        return reject(554, DIALUP, reason="ratify", detail="dialup"), None
    if state == "deny":
        return reject(554, *deny_lines(sender, dom), reason="ratify", detail="deny"), None
    if state == ratify.REFUSED:
        return reject(554, NO_SUCH_DOMAIN.format(sender=sender), reason="sender-check"), None
    if state == ratify.TEMPFAIL:
        return reject(450, DOMAIN_TEMPFAIL.format(sender=sender), reason="sender-check"), None
    return reject(554, "5.7.0 We have had an internal mailer error classifying your message.",
                  "5.7.0 Filterstate is %s" % state,
                  "5.7.0 Contact postmaster@%s for more information." % dom,
                  reason="local-error"), None


LOG_WORD = {"dial": "Dialup", "deny": "Denied", "block": "Blocked", "delay": "Blocked",
            ratify.REFUSED: "Refused", ratify.TEMPFAIL: "Deferred"}


class SpamFilter:
    def __init__(self, settings, resolver, reactor, clock, store=None):
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.store = store or LocalStateStore(settings, clock)
        self.ratify = WatchedFile(settings.path("blocked"), ratify.parse, ratify.EMPTY)
        self.validators = Validators(settings.path("lib"), reactor, clock, resolver,
                                     settings.validator_timeout)

    def reread(self):
        """SIGHUP: every watched policy file is read again."""
        self.ratify.reread()
        self.validators.reread()
        getattr(self.store, "reread", lambda: None)()  # a local store's whitelist

    # -- connect ---------------------------------------------------------

    def banned(self, ip):
        return relay.in_nets(ip, self.settings.evil)

    def peer(self, rsys, granted=False):
        """(trusted, IP action) for a new connection; ``granted``: the
        store's temporary grant (``peer_facts`` asks for it)."""
        lists = self.ratify.current()
        trusted = (relay.is_trusted(rsys, self.settings.ournets)
                   or lists.is_trusted(rsys) or granted)
        return trusted, lists.ip_action(rsys)

    def peer_facts(self, rsys):
        """``peer`` once the store has said whether a grant trusts the peer;
        it is asked only when nothing else does."""
        trusted, action = self.peer(rsys)
        if trusted:
            return defer.succeed((trusted, action))
        return self.store.isGranted(rsys).addCallback(lambda granted: self.peer(rsys, granted))

    # -- HELO ------------------------------------------------------------

    @defer.inlineCallbacks
    def helo_verdict(self, session, him):
        s, ident = self.settings, self.settings.identity
        claims = helo.claims_to_be_us(him, session.rsys, session.lsys, ident.dom, ident.names)
        static = not s.relax_helo and helo.static_lie(him)
        status, ptr_match = None, False
        log = logs.SessionLogger(session.id)
        if not (claims or static or s.relax_helo):
            status = yield dnscheck.name_status(self.resolver, him, self.clock, s.dns_timeout)
            if status == dnscheck.TEMPFAIL:
                log.warn("helo {him} from {rsys}: DNS lookup failed; not counted as a lie",
                         him=him, rsys=session.rsys, event="smtpd.helo.dns_failed",
                         peer=session.rsys, helo=him)
            elif status != dnscheck.EXISTS:
                names = yield dnscheck.ptr_names(self.resolver, session.rsys, self.clock,
                                                 s.dns_timeout)
                ptr_match = him.lower().rstrip(".") in names
                if ptr_match:
                    log.info("ptr only from {rsys} as {him}", rsys=session.rsys, him=him,
                             event="smtpd.helo.ptr_only", peer=session.rsys, helo=him)
        return helo.lie_verdict(claims, static, status, ptr_match)

    # -- MAIL ------------------------------------------------------------

    def filterstate(self, session, sender):
        """upas spam.c blocked(): the state a new transaction starts in."""
        if session.trusted or session.authenticated:
            return ratify.TRUSTED
        if session.hisaction != ratify.ACCEPT:
            return session.hisaction
        return self.ratify.current().account_action(sender)

    def sender_domain(self, sender):
        """-r: fires with ACCEPT, REFUSED or TEMPFAIL for the sender's domain."""
        domain = sender.split("!", 1)[0]
        if "!" not in sender or _is_literal(domain):
            return defer.succeed(ratify.ACCEPT)
        d = dnscheck.name_status(self.resolver, domain, self.clock, self.settings.dns_timeout)
        states = {dnscheck.NXDOMAIN: ratify.REFUSED, dnscheck.TEMPFAIL: ratify.TEMPFAIL}
        return d.addCallback(lambda status: states.get(status, ratify.ACCEPT))

    # -- DATA ------------------------------------------------------------

    def opted_out(self, recipients, ours):
        """Has every recipient a ``box/<user>/nospamfiltering`` file?"""
        boxes = os.path.join(self.settings.root, "box")
        for path in recipients:
            kind, user = relay.route(path, ours)
            if kind != "local" or "/" in user or user in (".", ".."):
                return False
            if not os.path.exists(os.path.join(boxes, user.lower(), "nospamfiltering")):
                return False
        return bool(recipients)

    @defer.inlineCallbacks
    def greylist_verdict(self, session):
        env = session.envelope
        log = logs.SessionLogger(session.id)
        try:
            white = yield self.store.isWhitelisted(session.rsys)
            outcomes = [] if white else (
                yield self.store.greylistAttempt(session.lsys, session.rsys, env.recipients))
        except OSError as e:
            log.error("greylist: {err}; letting {rsys} through", err=e, rsys=session.rsys,
                      event="smtpd.greylist", peer=session.rsys, state="error")
            return ACCEPT
        v = greylist.verdict(white, session.rsys, outcomes, log)
        if v.ok and v.value == NEWLY_WHITE:
            names = yield dnscheck.ptr_names(self.resolver, session.rsys, self.clock,
                                             self.settings.dns_timeout)
            try:
                yield self.store.addToWhitelist(session.rsys, names[0] if names else None)
            except OSError as e:
                log.error("greylist whitelist: {err}", err=e, event="smtpd.greylist",
                          peer=session.rsys, state="error")
            return ACCEPT
        return v


def _is_literal(domain):
    text = domain[1:-1] if domain.startswith("[") and domain.endswith("]") else domain
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
