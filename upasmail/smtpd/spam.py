"""upas spam.c: the anti-abuse state shared by every connection, and the
facts the policy checks need that take I/O.

``SpamFilter`` holds what outlives one connection: the ratify lists
(re-read when the file changes), the validator hooks, the DNS resolver,
and the state store (``statestore.IStateStore``: the temporary trusted
grants and the greylist, shared by every process).  ``gather`` looks up
one fact named by ``policy`` (``policy.FACTS``) when a check asks for it;
the decisions themselves are ``policy``'s tables.  A store's fact the
shared state cannot give (``StateUnavailable``) is ``policy.UNAVAILABLE``,
logged here; its check answers a temporary failure.
"""

import ipaddress
import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..rules import dnscheck, greylist, policy, ratify
from .. import logs, relay
from ..conf import WatchedFile
from ..interfaces import CONNECTION, MESSAGE, RECIPIENT, IReloadable, StateUnavailable
from .statestore import LocalStateStore
from .validators import Validators

log = Logger(namespace="smtpd")


@implementer(IReloadable)
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
        if IReloadable.providedBy(self.store):  # a local store's whitelist
            self.store.reread()

    # -- connect ---------------------------------------------------------

    def peer(self, rsys, granted=False):
        """(trusted, IP action) for a new connection, as the connect table
        decides it; ``granted``: the store's temporary grant."""
        facts = policy.Facts(ratify=self.ratify.current(), granted=granted)
        return policy.peer_facts(rsys, self.settings, facts)

    # -- facts (policy.FACTS) ------------------------------------------------

    def gather(self, name, arg, session):
        """The fact ``name`` about ``arg``: a value or a Deferred of one."""
        return getattr(self, "fact_" + name)(arg, session)

    def fact_granted(self, rsys, session):
        return unless_unavailable(self.store.isGranted(rsys), "granted", rsys, session)

    def _rate(self, kind, fact, rsys, session):
        d = self.store.countAttempt(kind, rsys, self.settings.rate_window)
        return unless_unavailable(d, fact, rsys, session)

    def fact_connection_rate(self, rsys, session):
        return self._rate(CONNECTION, "connection_rate", rsys, session)

    def fact_message_rate(self, rsys, session):
        return self._rate(MESSAGE, "message_rate", rsys, session)

    def fact_recipient_rate(self, rsys, session):
        return self._rate(RECIPIENT, "recipient_rate", rsys, session)

    def fact_ratify(self, arg, session):
        return self.ratify.current()

    def fact_helo_dns(self, him, session):
        d = dnscheck.name_status(self.resolver, him, self.clock, self.settings.dns_timeout)
        return d.addCallback(self._helo_dns_logged, him, session)

    def _helo_dns_logged(self, status, him, session):
        if status == dnscheck.TEMPFAIL:
            logs.SessionLogger(session.id).warn(
                "helo {him} from {rsys}: DNS lookup failed; not counted as a lie", him=him,
                rsys=session.rsys, event="smtpd.helo.dns_failed", peer=session.rsys, helo=him)
        return status

    def fact_peer_ptr(self, rsys, session):
        return dnscheck.ptr_names(self.resolver, rsys, self.clock, self.settings.dns_timeout)

    def fact_sender_domain(self, domain, session):
        """-r: the DNS status of the sender's domain (an address literal exists)."""
        if _is_literal(domain):
            return dnscheck.EXISTS
        return dnscheck.name_status(self.resolver, domain, self.clock, self.settings.dns_timeout)

    def fact_validateaddress(self, rcpt, session):
        return self.validators.validateaddress(rcpt, logs.SessionLogger(session.id))

    def fact_names_blocked(self, rcpt, session):
        return self.validators.names_blocked()

    def fact_senders(self, rcpt, session):
        return self.validators.senders(rcpt, session.rsys)

    def fact_validatesender(self, sender, session):
        return self.validators.sendermxcheck(sender, session.him, session.rsys)

    def fact_nospamfiltering(self, arg, session):
        return self.opted_out(session.envelope.recipients, session.ours)

    @defer.inlineCallbacks
    def fact_greylist(self, rsys, session):
        """This attempt, recorded: (whitelisted, [(rcpt, outcome)]); a peer
        whose earlier attempt was recent is added to the whitelist here."""
        log = logs.SessionLogger(session.id)
        try:
            white = yield self.store.isWhitelisted(rsys)
            outcomes = [] if white else (
                yield self.store.greylistAttempt(session.lsys, rsys, session.envelope.recipients))
        except StateUnavailable as e:
            state_unavailable(log, "greylist", rsys, e)
            return policy.UNAVAILABLE
        except OSError as e:
            log.error("greylist: {err}; letting {rsys} through", err=e, rsys=rsys,
                      event="smtpd.greylist", peer=rsys, state="error")
            return True, []
        if any(state == greylist.RECENT for _, state in outcomes):
            names = yield dnscheck.ptr_names(self.resolver, rsys, self.clock,
                                             self.settings.dns_timeout)
            try:
                yield self.store.addToWhitelist(rsys, names[0] if names else None)
            except (OSError, StateUnavailable) as e:  # the attempt passes all the same
                log.error("greylist whitelist: {err}", err=e, event="smtpd.greylist",
                          peer=rsys, state="error")
        return white, list(outcomes)

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


def state_unavailable(logger, fact, ip, err):
    """The log line of a store's fact the shared state could not give."""
    logger.warn("shared state unavailable for {fact} of {ip}: {err}; answering a "
                "temporary failure", fact=fact, ip=ip, err=str(err) or "no answer",
                event="state.unavailable", peer=ip, state="unavailable")


def unless_unavailable(d, fact, ip, session=None):
    """The store's answer ``d`` (a Deferred), or ``policy.UNAVAILABLE``
    when the shared state could not answer (``session``: whose log says
    so; None before the greeting)."""
    def unavailable(failure):
        failure.trap(StateUnavailable)
        logger = log if session is None else logs.SessionLogger(session.id)
        state_unavailable(logger, fact, ip, failure.value)
        return policy.UNAVAILABLE
    return d.addErrback(unavailable)


def _is_literal(domain):
    text = domain[1:-1] if domain.startswith("[") and domain.endswith("]") else domain
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
