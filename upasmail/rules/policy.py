"""The upas policy as data: one table of checks per phase, in upas's order.

Reading this file tells the order of every upas check (spec
upas-behaviour.md §1.6-§1.15; smtpd.c, spam.c).  A check is a pure function

    check(session, cmd, conf, looked) -> Decision

of the session's facts (``session.Session``), the command (``grammar.Command``;
for ``connect`` a ``CONNECT`` command whose ``arg`` is the peer address), the
settings (``settings.Settings``) and the looked-up facts (``looked``: a
``Facts``).  ``run`` runs a table until the first refusal, or to its last
check, which always decides and gives the reply.  Checks do no I/O: a fact
that needs some (a DNS answer, a validator's exit, the greylist state, the
store's answers, the delivery back end's) is read from ``looked``; when it
is not there yet ``run`` stops and says which one it needs (``Pending``),
the caller gathers it and runs on from that check.  So a fact is gathered
only when a check that is reached needs it, as upas does, and the same
tables serve the server (``server.UpasESMTP``), ``upas-policy explain``
(facts gathered without writing state) and ``upas-policy replay`` (facts
from a decision log).

The facts (``FACTS`` says what each is):

=================  ==========================================================
connect            ``closing``, ``connections``, ``connection_cap``,
                   ``ratify`` (the ratify lists), ``granted`` (the store's
                   grant), ``connection_rate`` (the store's count),
                   ``connection_slot`` (None, or which limit refused)
helo               ``helo_dns`` (dnscheck status of the name),
                   ``peer_ptr`` (the peer's PTR names)
mail               ``message_rate`` (the store's count),
                   ``ratify`` (the ratify lists), ``sender_domain`` (-r),
                   ``validate_from`` (the delivery back end's answer)
rcpt               ``recipient_rate`` (the store's count),
                   ``validateaddress`` ("ok", "unknown", "tempfail" or
                   "absent"), ``names_blocked``, ``senders`` (the senders
                   file's answer), ``validate_to`` (the back end's answer)
data               ``validatesender`` (its decision), ``nospamfiltering``,
                   ``greylist`` (whitelisted, [(rcpt, outcome)]),
                   ``mailer_ready`` (the back end's answer)
auth               ``auth_mechanisms`` (a checker exists, the mechanisms
                   the checkers take, TLS or not)
=================  ==========================================================

A fact the state store gives (``granted``, the ``*_rate`` counts,
``connection_slot``, ``greylist``) is ``UNAVAILABLE`` when the shared state
could not answer (``interfaces.StateUnavailable``): its check then refuses
with a temporary failure, never lets the client through.

This module is long because it is the whole policy, read in one place:
every table, every check in table order, the facts they ask for, and how
a run is driven and applied.  Splitting it would scatter the order that
upas's smtpd.c has in one function per command.
"""

from twisted.internet import defer

from . import auth, dnscheck, greylist, helo, ratify, tarpit
from .. import grammar, relay, replies
from ..smtpd import statestore
from ..address import NULL_SENDER
from ..decision import ACCEPT, Accept, reject
from ..session import Session

# -- the evaluator ---------------------------------------------------------


class Missing(Exception):
    """A check needs a fact that has not been gathered (``arg``: for what;
    ``waiting``: the Deferred that will give it, when its gathering began)."""

    def __init__(self, name, arg=None, waiting=None):
        Exception.__init__(self, name)
        self.name = name
        self.arg = arg
        self.waiting = waiting


class Facts(dict):
    """The looked-up facts of one evaluation.

    A missing fact is asked of ``gather`` (``decide`` sets it); one that
    comes at once is kept and the run goes on, one that comes later (a
    Deferred) or cannot be asked for stops the run (``Missing``).
    """

    __slots__ = ("gather",)

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self.gather = None

    def __missing__(self, name):
        return self.need(name)

    def need(self, name, arg=None):
        """The fact ``name`` (about ``arg``, for whoever gathers it)."""
        if name in self:
            return dict.__getitem__(self, name)
        if self.gather is None:
            raise Missing(name, arg)
        value = self.gather(name, arg)
        if isinstance(value, defer.Deferred):
            raise Missing(name, arg, value)
        self[name] = value
        return value


class Outcome:
    """A table's result: the deciding check's decision, and the decisions of
    the checks before it that carry effects (in order)."""

    __slots__ = ("decision", "check", "effects")

    def __init__(self, decision, check, effects):
        self.decision, self.check, self.effects = decision, check, effects

    def decisions(self):
        return self.effects + (self.decision,)

    def lines(self):
        """The reply's lines, any prefix first."""
        prefix = ()
        for d in self.decisions():
            prefix += d.prefix
        return prefix + tuple(self.decision.lines)


class Pending:
    """The run stopped at check ``index``: it needs fact ``name`` (about
    ``arg``), which ``waiting`` (a Deferred) will give, when not None."""

    __slots__ = ("name", "arg", "index", "effects", "waiting")

    def __init__(self, name, arg, index, effects, waiting=None):
        self.name, self.arg, self.index, self.effects = name, arg, index, effects
        self.waiting = waiting


def run(table, session, cmd, conf, looked, start=0, effects=(), trace=None):
    """Run ``table`` from check ``start``: an ``Outcome``, or ``Pending``.

    ``trace``, a list, gets ``(check name, decision)`` for every check run.
    """
    last = len(table) - 1
    for i in range(start, last + 1):
        check = table[i]
        try:
            d = check(session, cmd, conf, looked)
        except Missing as m:
            return Pending(m.name, m.arg, i, effects, m.waiting)
        if trace is not None:
            trace.append((check.__name__, d))
        if not d.ok or i == last:
            return Outcome(d, check.__name__, effects)
        if d is not ACCEPT:
            effects += (d,)
    raise ValueError("an empty table")


# -- facts the checks share ------------------------------------------------

# a state store's fact when the shared state could not answer (a string:
# the decision log records it, and replay reads it back, as it is)
UNAVAILABLE = "unavailable"


def state_unavailable(conf, code, what, hangup=False, note=""):
    """The temporary refusal of a check whose state store fact is
    ``UNAVAILABLE`` (``what``: which fact, for the log)."""
    return reject(code, replies.STATE_UNAVAILABLE.format(dom=conf.dom), hangup=hangup,
                  counts=False, reason="state-unavailable", detail=what, note=note)


def rate_exempt(trusted, conf):
    """Trusted and authenticated clients pass the rate limits, unless
    --rate-trusted (Postfix: smtpd_client_event_limit_exceptions)."""
    return trusted and not conf.rate_trusted


def is_balancer(ip, conf):
    """Is the peer one of the PROXY balancers (``--proxy-from``)?  A
    session has the balancer's own address only when its header says so
    (v2 LOCAL, v1 UNKNOWN): the balancer's health checks, which the
    connection rate must not count, or every node would be marked down."""
    return relay.in_nets(ip, conf.proxy_from)


def over_rate(count, limit):
    """A count of attempts in the window, this one included, against a
    limit (Postfix anvil: refused once the count passes the limit)."""
    return count > limit

def untrusted(s):
    return not (s.trusted or s.authenticated)


def sender_path(s, cmd):
    """The MAIL path in bang form, qualified with HELO when it has no ``!``."""
    path = cmd.arg
    if "!" not in path and path != NULL_SENDER:
        return "%s!%s" % (s.him, path)
    return path


def filter_state(s, sender, looked):
    """upas spam.c blocked(): the state a new transaction starts in."""
    if s.trusted or s.authenticated:
        return ratify.TRUSTED
    if s.hisaction != ratify.ACCEPT:
        return s.hisaction
    return looked["ratify"].account_action(sender)


def data_state(s, looked):
    """The filterstate at DATA, after the nospamfiltering opt-out."""
    state = s.envelope.filterstate
    if state not in (ratify.ACCEPT, ratify.TRUSTED) and looked["nospamfiltering"]:
        return ratify.ACCEPT
    return state


def data_action(s, looked):
    """deliver, block or delay: what DATA does with the message."""
    state = data_state(s, looked)
    return state if state in ("block", "delay") else "deliver"


def helo_delay(s, conf):
    """-D: tarpit units before the HELO reply, for untrusted peers."""
    return HELO_DELAY if conf.helo_delay and not s.trusted else 0


HELO_DELAY = 15  # -D, in tarpit units (upas [9F]: 15 s, quirk Q8)


def _path_too_long(cmd, conf):
    return grammar.path_too_long(cmd.path, conf.max_path, conf.max_local_part, conf.max_domain)


# -- every checked command: the tarpit (smtpd.c rejectcheck, §1.12) ----------
# (the wait itself, tarpit.delay, comes before the table runs)

def rejectcheck(s, cmd, conf, looked):
    if s.rejects or s.hardreject:
        return tarpit.rejectcheck(s.rejects, s.hardreject)
    return ACCEPT


# -- connect (smtpd.c main, spam.c; the factory) ----------------------------

def banned(s, cmd, conf, looked):
    """-k: no protocol at all; closed before a byte is written, nothing logged."""
    if relay.in_nets(cmd.arg, conf.evil):
        return reject(0, reason="banned", hangup=True, counts=False)
    return ACCEPT


def shutting_down(s, cmd, conf, looked):
    if looked["closing"]:
        return reject(421, replies.SHUTDOWN.format(dom=conf.dom), hangup=True, counts=False,
                      reason="shutdown", note="connect.shutdown")
    return ACCEPT


def process_limit(s, cmd, conf, looked):
    """This process's own connections (the open-file limit bounds them too)."""
    cap = looked["connection_cap"]
    limit = conf.max_connections if cap is None else min(conf.max_connections, cap)
    if looked["connections"] >= limit:
        return reject(421, replies.TOO_MANY_CONNECTIONS.format(dom=conf.dom), hangup=True,
                      counts=False, reason="limit", note="connect.limit")
    return ACCEPT


def peer_facts(ip, conf, looked):
    """(trusted, ratify IP action) of a peer: ournets, ratify ``trusted``, or
    the store's grant, asked only when nothing else trusts the peer."""
    lists = looked["ratify"]
    trusted = (relay.is_trusted(ip, conf.ournets) or lists.is_trusted(ip)
               or _grants(looked.need("granted", ip)))
    return trusted, lists.ip_action(ip)


def _grants(granted):
    return granted != UNAVAILABLE and bool(granted)


def peer_trust(s, cmd, conf, looked):
    facts = peer_facts(cmd.arg, conf, looked)
    if looked.get("granted") == UNAVAILABLE:  # a grant may trust the peer: unknown
        return state_unavailable(conf, 421, "granted", hangup=True, note="connect.state")
    return Accept(facts)


def connection_rate(s, cmd, conf, looked):
    """--conn-rate: connections from the peer in the window.  Before the
    connection limits: every attempt counts (Postfix anvil), and a
    connection refused here has taken no slot the factory must give back."""
    if not conf.conn_rate or rate_exempt(peer_facts(cmd.arg, conf, looked)[0], conf):
        return ACCEPT
    if is_balancer(cmd.arg, conf):
        return ACCEPT
    count = looked.need("connection_rate", cmd.arg)
    if count == UNAVAILABLE:
        return state_unavailable(conf, 421, "connection_rate", hangup=True,
                                 note="connect.state")
    if over_rate(count, conf.conn_rate):
        return reject(421, replies.RATE_CONNECTIONS.format(dom=conf.dom, ip=cmd.arg,
                                                           window=conf.rate_window),
                      hangup=True, counts=False, reason="limit", detail="rate",
                      note="connect.rate")
    return ACCEPT


def connection_limits(s, cmd, conf, looked):
    """Every process's connections, in all and per untrusted peer (the store)."""
    refused = looked["connection_slot"]
    if refused is None:
        return ACCEPT
    if refused == UNAVAILABLE:
        return state_unavailable(conf, 421, "connection_slot", hangup=True,
                                 note="connect.state")
    if refused == statestore.TOTAL:
        return reject(421, replies.TOO_MANY_CONNECTIONS.format(dom=conf.dom), hangup=True,
                      counts=False, reason="limit", note="connect.total")
    return reject(421, replies.TOO_MANY_FROM_PEER.format(dom=conf.dom, ip=cmd.arg),
                  hangup=True, counts=False, reason="limit", note="connect.peer")


def greet(s, cmd, conf, looked):
    return Accept(code=220, lines=(replies.GREETING.format(dom=conf.dom),))


CONNECT = (banned, shutting_down, process_limit, peer_trust, connection_rate, connection_limits,
           greet)


# -- HELO/EHLO (smtpd.c hello, heloclaims, ckhello; §1.7) ----------------------

def helo_lie(s, cmd, conf, looked):
    """For untrusted peers: claims to be us, a name that cannot be a host's
    (skipped with -e), a name DNS does not know and that is not the peer's
    PTR name (skipped with -e).  A temporary DNS failure does not make a
    liar (upas would hang up).  -E: not a refusal, MAIL needs AUTH."""
    if not untrusted(s):
        return ACCEPT
    him, ident = cmd.arg, conf.identity
    lie = helo.claims_to_be_us(him, s.rsys, s.lsys, ident.dom, ident.names) or (
        not conf.relax_helo and helo.static_lie(him))
    if not lie and not conf.relax_helo:
        status = looked.need("helo_dns", him)
        if status not in (dnscheck.EXISTS, dnscheck.TEMPFAIL):
            lie = him.lower().rstrip(".") not in looked.need("peer_ptr", s.rsys)
            if not lie:
                return Accept(note="helo.ptr_only")
    if not lie:
        return ACCEPT
    if conf.helo_lie_auth:
        return Accept(require_auth=True, prefix=(replies.YOU_LIE,))
    return reject(554, replies.LIAR, hangup=True, reason="helo", detail="lie",
                  delay=helo_delay(s, conf), note="helo.hangup")


def hello(s, cmd, conf, looked):
    """A dotless name from an address with dots is shown as the address."""
    him = cmd.arg
    if "." not in him and "." in s.rsys:
        him = s.rsys
    return Accept(him, code=250, lines=(replies.HELO_OK.format(dom=conf.dom, him=him),),
                  delay=helo_delay(s, conf))


HELO = (rejectcheck, helo_lie, hello)


# -- MAIL (smtpd.c sender; §1.8) ---------------------------------------------

def sender_length(s, cmd, conf, looked):
    if _path_too_long(cmd, conf):
        return reject(501, replies.SENDER_PATH_TOO_LONG, reason="syntax")
    return ACCEPT


def auth_required(s, cmd, conf, looked):
    """-a, or -E after a HELO lie."""
    if s.auth_required and not s.authenticated:
        return reject(530, replies.AUTH_REQUIRED, reason="auth-required")
    return ACCEPT


def helo_given_mail(s, cmd, conf, looked):
    if not s.him:
        return reject(503, replies.HELO_FIRST_MAIL, reason="sequence")
    return ACCEPT


def not_nested(s, cmd, conf, looked):
    """Ours: upas appends a second sender; RFC 5321 wants a 503."""
    if s.envelope.senders:
        return reject(503, replies.NESTED_MAIL, reason="sequence")
    return ACCEPT


def declared_size(s, cmd, conf, looked):
    size = cmd.params.get("SIZE")
    if size is not None and int(size) > conf.message_limit:
        return reject(552, replies.SIZE_EXCEEDED, reason="size")
    return ACCEPT


def smtputf8_sender(s, cmd, conf, looked):
    if cmd.utf8 and "SMTPUTF8" not in cmd.params:
        return reject(553, replies.NEED_SMTPUTF8, reason="syntax")
    return ACCEPT


def session_rate(s, conf, looked, limit, kind, text):
    """--msg-rate and --rcpt-rate: the peer's commands of ``kind``
    (``message``, ``recipient``) in the window, this one included."""
    if not limit or rate_exempt(not untrusted(s), conf):
        return ACCEPT
    fact = kind + "_rate"
    count = looked.need(fact, s.rsys)
    if count == UNAVAILABLE:
        return state_unavailable(conf, 451, fact)
    if over_rate(count, limit):
        return reject(452, text.format(dom=conf.dom, ip=s.rsys, window=conf.rate_window),
                      counts=False, reason="rate", detail=kind, note="rate")
    return ACCEPT


def message_rate(s, cmd, conf, looked):
    """--msg-rate: MAIL commands, counted whether or not they are accepted
    (Postfix anvil), once the command is well formed and in sequence,
    before the checks that look things up."""
    return session_rate(s, conf, looked, conf.msg_rate, "message", replies.RATE_MESSAGES)


def filterstate(s, cmd, conf, looked):
    """The ratify state; upas refuses for it only at DATA."""
    return Accept(filterstate=filter_state(s, sender_path(s, cmd), looked))


def sender_domain(s, cmd, conf, looked):
    """-r: the sender's domain must exist; an NXDOMAIN sender is refused
    at DATA, and at once by later MAILs of the session."""
    if not conf.verify_sender:
        return ACCEPT
    path = sender_path(s, cmd)
    domain = path.split("!", 1)[0]
    if path == NULL_SENDER or "!" not in path:
        return ACCEPT
    if filter_state(s, path, looked) != ratify.ACCEPT:
        return ACCEPT
    if domain in s.refused_domains:
        return reject(554, replies.NO_SUCH_DOMAIN_MAIL.format(sender=path),
                      reason="sender-check")
    status = looked.need("sender_domain", domain)
    if status == dnscheck.NXDOMAIN:
        return Accept(domain, filterstate=ratify.REFUSED)
    if status == dnscheck.TEMPFAIL:
        return Accept(filterstate=ratify.TEMPFAIL)
    return ACCEPT


def validate_from(s, cmd, conf, looked):
    """The delivery back end's ``validateFrom``."""
    return looked.need("validate_from", sender_path(s, cmd))


def sender_ok(s, cmd, conf, looked):
    path = sender_path(s, cmd)
    return Accept(path, code=250, lines=(replies.SENDER_OK.format(path=path),))


MAIL = (rejectcheck, sender_length, auth_required, helo_given_mail, not_nested, declared_size,
        smtputf8_sender, message_rate, filterstate, sender_domain, validate_from, sender_ok)


# -- RCPT (smtpd.c receiver, spam.c recipok, senderok, forwarding; §1.9) -------

def recipient_length(s, cmd, conf, looked):
    if _path_too_long(cmd, conf):
        return reject(501, replies.RECIPIENT_PATH_TOO_LONG, reason="syntax")
    return ACCEPT


def helo_given_rcpt(s, cmd, conf, looked):
    if not s.him:
        return reject(503, replies.HELO_FIRST_RCPT, reason="sequence")
    return ACCEPT


def mail_given(s, cmd, conf, looked):
    """Ours: upas takes RCPT without MAIL."""
    if not s.envelope.senders:
        return reject(503, replies.RCPT_NO_MAIL, reason="sequence")
    return ACCEPT


def recipient_limit(s, cmd, conf, looked):
    if len(s.envelope.recipients) >= conf.max_recipients:
        return reject(452, replies.TOO_MANY_RCPTS, counts=False, reason="recipients")
    return ACCEPT


def smtputf8_recipient(s, cmd, conf, looked):
    if cmd.utf8 and not s.envelope.smtputf8:
        return reject(553, replies.NEED_SMTPUTF8, reason="syntax")
    return ACCEPT


def _unknown(path, detail, note):
    return reject(550, replies.USER_UNKNOWN.format(path=path), reason="unknown-user",
                  detail=detail, note=note)


def recipient_rate(s, cmd, conf, looked):
    """--rcpt-rate: RCPT commands, counted as MAIL's (``message_rate``)."""
    return session_rate(s, conf, looked, conf.rcpt_rate, "recipient", replies.RATE_RECIPIENTS)


def shellchars(s, cmd, conf, looked):
    if "\r" in cmd.arg or "\n" in cmd.arg:
        return _unknown(cmd.arg, "shellchars", "rcpt.shellchars")
    return ACCEPT


def validateaddress(s, cmd, conf, looked):
    """<lib>/validateaddress, when it is executable; a hung or unstartable
    one is a temporary refusal."""
    status = looked.need("validateaddress", cmd.arg)
    if status == "tempfail":
        return reject(450, replies.CHECK_LATER.format(path=cmd.arg), reason="local-error",
                      detail="validateaddress")
    if status == "unknown":
        return _unknown(cmd.arg, "validateaddress", "rcpt.unknown")
    return ACCEPT


def names_blocked(s, cmd, conf, looked):
    if cmd.arg.lower() in looked["names_blocked"]:
        return _unknown(cmd.arg, "names.blocked", "rcpt.names_blocked")
    return ACCEPT


def senders(s, cmd, conf, looked):
    """<lib>/senders: mail to a listed recipient only from the listed systems."""
    status = looked.need("senders", cmd.arg)
    if status == "tempfail":
        return reject(450, replies.CHECK_LATER.format(path=cmd.arg), reason="ratify",
                      detail="blocked-ip", note="rcpt.blocked_ip")
    if status == "refused":
        return reject(550, replies.NOT_ALLOWED.format(path=cmd.arg), reason="ratify",
                      detail="blocked-ip", note="rcpt.blocked_ip")
    return ACCEPT


def relaying(s, cmd, conf, looked):
    """Relay control; upas checks it only in state ACCEPT (others are
    refused at DATA).  The value is the path as shown and delivered."""
    exempt = s.authenticated or s.envelope.filterstate != ratify.ACCEPT
    verdict = relay.check_recipient(cmd.arg, s.rsys, exempt, conf.relay_control, s.ours)
    if not verdict.ok:
        return reject(verdict.code, *verdict.lines, reason=verdict.reason,
                      note="rcpt.bad_forward")
    return verdict


def _rcpt_path(s, cmd, looked):
    return relay.loopback_rewrite(cmd.arg, s.rsys)


def validate_to(s, cmd, conf, looked):
    """The delivery back end's ``validateTo`` (local users, aliases)."""
    return looked.need("validate_to", _rcpt_path(s, cmd, looked))


def receiver_ok(s, cmd, conf, looked):
    path = _rcpt_path(s, cmd, looked)
    return Accept(path, code=250, lines=(replies.RECEIVER_OK.format(path=path),))


RCPT = (rejectcheck, recipient_length, helo_given_rcpt, mail_given, recipient_limit,
        smtputf8_recipient, recipient_rate, shellchars, validateaddress, names_blocked, senders,
        relaying, validate_to, receiver_ok)


# -- DATA (smtpd.c data, startcmd, spam.c; §1.10.1, §1.10.2) ------------------

def sender_given(s, cmd, conf, looked):
    if not s.envelope.senders:
        return reject(503, replies.DATA_NO_MAIL, reason="sequence")
    return ACCEPT


def recipient_given(s, cmd, conf, looked):
    if not s.envelope.recipients:
        return reject(503, replies.DATA_NO_RCPT, reason="sequence")
    return ACCEPT


def null_to_many(s, cmd, conf, looked):
    env = s.envelope
    if untrusted(s) and env.sender == NULL_SENDER and len(env.recipients) > 1:
        return reject(554, replies.REFUSED.format(text=replies.NULL_MULTI), reason="recipients")
    return ACCEPT


def validatesender(s, cmd, conf, looked):
    """<lib>/validatesender for the first sender, untrusted peers only."""
    if not untrusted(s):
        return ACCEPT
    verdict = looked.need("validatesender", s.envelope.sender)
    if not verdict.ok:
        return reject(verdict.code, *verdict.lines, reason=verdict.reason,
                      note="data.sendercheck")
    return ACCEPT


# the states whose refusal (or dump) upas logs per recipient at DATA
RATIFY_LOGGED = frozenset(["dial", "deny", "block", "delay", ratify.REFUSED, ratify.TEMPFAIL])


def filter_action(s, cmd, conf, looked):
    """smtpd.c startcmd for the filterstate, after the nospamfiltering
    opt-out (every recipient has box/<user>/nospamfiltering)."""
    state = s.envelope.filterstate
    if state in (ratify.ACCEPT, ratify.TRUSTED):
        return ACCEPT
    state = data_state(s, looked)
    sender, dom = s.envelope.last_sender, conf.dom
    note = "data.ratify" if state in RATIFY_LOGGED else ""
    if state == ratify.ACCEPT:
        return ACCEPT
    if state in ("block", "delay"):
        # upas counts the block before reading the message
        return Accept(action=state, counts=True, note=note)
    if state == "dial":
        return reject(554, replies.DIALUP, reason="ratify", detail="dialup", hardreject=True,
                      note=note)
    if state == "deny":
        return reject(554, replies.DENY_FROM.format(sender=sender),
                      replies.DENY_CONTACT.format(dom=dom), reason="ratify", detail="deny",
                      note=note)
    if state == ratify.REFUSED:
        return reject(554, replies.NO_SUCH_DOMAIN.format(sender=sender), reason="sender-check",
                      note=note)
    if state == ratify.TEMPFAIL:
        return reject(450, replies.DOMAIN_TEMPFAIL.format(sender=sender), reason="sender-check",
                      note=note)
    return reject(554, *(line.format(state=state, dom=dom) for line in replies.FILTERSTATE_ERROR),
                  reason="local-error")


def greylisting(s, cmd, conf, looked):
    """-g, untrusted peers, messages to be delivered: a first attempt from a
    peer not whitelisted is refused and the connection closed."""
    if not (conf.greylist and untrusted(s)) or data_action(s, looked) != "deliver":
        return ACCEPT
    grey = looked.need("greylist", s.rsys)
    if grey == UNAVAILABLE:  # not known to have tried before: not let through
        return state_unavailable(conf, 451, "greylist")
    white, outcomes = grey
    if white or any(state == greylist.RECENT for _, state in outcomes):
        return Accept(note="data.greylist") if outcomes else ACCEPT
    return reject(451, replies.TRY_AGAIN, hangup=True, reason="greylist", note="data.greylist")


def mailer_ready(s, cmd, conf, looked):
    """The mailer must be startable (upas startcmd); not for a dumped message."""
    if data_action(s, looked) != "deliver":
        return ACCEPT
    return looked.need("mailer_ready")


def go_ahead(s, cmd, conf, looked):
    return Accept(code=354, lines=(replies.GO_AHEAD,), action=data_action(s, looked))


DATA = (rejectcheck, sender_given, recipient_given, null_to_many, validatesender, filter_action,
        greylisting, mailer_ready, go_ahead)


# -- AUTH (smtpd.c auth; §1.11.1) ----------------------------------------------

def auth_available(s, cmd, conf, looked):
    available, _ = looked["auth_mechanisms"]
    if not available:
        return reject(502, replies.AUTH_NOT_OFFERED, counts=False, reason="syntax",
                      detail="auth-not-offered")
    return ACCEPT


def not_authenticated(s, cmd, conf, looked):
    if s.authenticated:
        return reject(503, replies.AUTH_BAD_SEQUENCE, reason="sequence")
    return ACCEPT


def helo_given_auth(s, cmd, conf, looked):
    if not s.him:
        return reject(503, replies.HELO_FIRST_MAIL, reason="sequence")
    return ACCEPT


def no_transaction(s, cmd, conf, looked):
    if s.envelope.senders:
        return reject(503, replies.AUTH_IN_TRANSACTION, reason="sequence")
    return ACCEPT


def encryption(s, cmd, conf, looked):
    """PLAIN and LOGIN only when encrypted, or with -p."""
    if cmd.arg in auth.CLEARTEXT and not (s.encrypted or conf.clear_passwords):
        return reject(538, replies.AUTH_ENCRYPTION_REQUIRED, reason="tls",
                      detail="encryption-required")
    return ACCEPT


def mechanism(s, cmd, conf, looked):
    _, mechanisms = looked["auth_mechanisms"]
    if cmd.arg not in mechanisms:
        return reject(501, replies.AUTH_UNRECOGNISED.format(mech=cmd.arg), reason="syntax")
    return ACCEPT


def exchange(s, cmd, conf, looked):
    """The exchange begins (its steps, the failure budget and the portal
    are the protocol's, ``auth``)."""
    return Accept(cmd.arg)


AUTH = (rejectcheck, auth_available, not_authenticated, helo_given_auth, no_transaction,
        encryption, mechanism, exchange)


# -- the other checked commands: only the tarpit ---------------------------------

def proceed(s, cmd, conf, looked):
    return ACCEPT


OTHER = (rejectcheck, proceed)

TABLES = {"connect": CONNECT, "helo": HELO, "mail": MAIL, "rcpt": RCPT, "data": DATA,
          "auth": AUTH}
# the table a command runs; commands not named here skip the tarpit
BY_VERB = {"HELO": HELO, "EHLO": HELO, "MAIL": MAIL, "RCPT": RCPT, "DATA": DATA, "AUTH": AUTH,
           "RSET": OTHER, "NOOP": OTHER, "HELP": OTHER, "VRFY": OTHER, "EXPN": OTHER}
assert frozenset(BY_VERB) == tarpit.CHECKED

FACTS = {
    "closing": "the server is shutting down",
    "connections": "this process's connections",
    "connection_cap": "what the open-file limit allows (None: no cap)",
    "granted": "the store's temporary grant trusts the peer",
    "connection_slot": "None, or the store's refusal (total or per peer)",
    "connection_rate": "the peer's connections in the rate window, this one included",
    "message_rate": "the peer's MAIL commands in the rate window, this one included",
    "recipient_rate": "the peer's RCPT commands in the rate window, this one included",
    "helo_dns": "the HELO name's DNS status (dnscheck)",
    "peer_ptr": "the peer's PTR names",
    "ratify": "the ratify lists",
    "sender_domain": "the -r DNS status of the sender's domain",
    "validate_from": "the delivery back end's answer for the sender",
    "validateaddress": "validateaddress: ok, unknown, tempfail or absent",
    "names_blocked": "the names.blocked set",
    "senders": "the senders file: ok, refused or tempfail",
    "validate_to": "the delivery back end's answer for the recipient",
    "validatesender": "validatesender's decision",
    "nospamfiltering": "every recipient opted out of spam filtering",
    "greylist": "(whitelisted, [(rcpt, new|recent|other)]) of this attempt",
    "mailer_ready": "the delivery back end's answer: may DATA start",
    "auth_mechanisms": "(a checker exists, the mechanisms the checkers take)",
}


# -- the session a connection starts ---------------------------------------------

def new_session(settings, rsys, lsys, id=""):
    """The session of a connection from ``rsys`` to our ``lsys``, as the
    server, ``explain`` and ``replay`` all start it."""
    s = Session(rsys=rsys, lsys=lsys, id=id)
    s.auth_required = settings.require_auth
    s.ours = settings.ours.with_local_ip(lsys)
    return s


# -- applying a decision to the session ----------------------------------------

def apply(session, outcome):
    """What the outcome's decisions change in the session besides the reply
    (a refusal's own count is the one who sends it: ``server.reply``);
    returns the tarpit units to wait before the reply (-D).  The server,
    ``explain`` and ``replay`` all apply decisions through this."""
    delay = 0
    for d in outcome.decisions():
        if d.ok and d.counts:
            session.rejects += 1
        if d.require_auth:
            session.auth_required = True
        if d.hardreject:
            session.hardreject = True
        if d.filterstate is not None:
            session.envelope.filterstate = d.filterstate
            if d.filterstate == ratify.REFUSED:
                session.refused_domains |= {d.value}
        delay += d.delay
    return delay


def accepted(session, cmd, decision):
    """The session state an accepted command changes (the protocol's
    back-end hand-offs aside)."""
    verb = cmd.verb
    if verb in ("HELO", "EHLO"):
        session.him = decision.value
        session.extended = verb == "EHLO"
        session.reset()  # RFC 5321 4.1.4: a new HELO/EHLO ends any transaction
    elif verb == "MAIL":
        env = session.envelope
        env.smtputf8 = "SMTPUTF8" in cmd.params
        env.bare_sender = decision.value != cmd.arg
        env.mail_from = cmd.path[1:-1]
        env.senders.append(decision.value)
    elif verb == "RCPT":
        session.envelope.recipients.append(decision.value)
        session.envelope.rcpt_paths.append(cmd.path[1:-1])
    elif verb == "DATA":
        session.envelope.action = decision.action
    elif verb == "RSET":
        session.reset()


# -- the driver: run a table, gathering the facts it asks for ---------------------

def decide(table, session, cmd, conf, gather, looked=None, trace=None):
    """Run ``table``; each missing fact comes from ``gather(name, arg)``, a
    value or a Deferred of one.  Returns the ``Outcome``, or a Deferred that
    fires with it once a fact that came later is in.  ``looked`` keeps the
    facts gathered (for the decision log); ``trace`` as in ``run``."""
    looked = Facts() if looked is None else looked
    looked.gather = gather
    return _drive(run(table, session, cmd, conf, looked, trace=trace),
                  table, session, cmd, conf, looked, trace)


def resume(pending, table, session, cmd, conf, gather, looked, trace=None):
    """Go on with a run that stopped at ``pending`` (``run``'s result)."""
    looked.gather = gather
    return _drive(pending, table, session, cmd, conf, looked, trace)


def _drive(r, table, session, cmd, conf, looked, trace):
    while isinstance(r, Pending):
        value = r.waiting if r.waiting is not None else looked.gather(r.name, r.arg)
        if isinstance(value, defer.Deferred):
            return value.addCallback(_gathered, r, table, session, cmd, conf, looked, trace)
        looked[r.name] = value
        r = run(table, session, cmd, conf, looked, r.index, r.effects, trace)
    return r


def _gathered(value, pending, table, session, cmd, conf, looked, trace):
    looked[pending.name] = value
    r = run(table, session, cmd, conf, looked, pending.index, pending.effects, trace)
    return _drive(r, table, session, cmd, conf, looked, trace)
