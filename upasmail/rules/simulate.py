"""A session run through the policy tables without a connection.

The one engine behind ``upas-policy explain`` (facts looked up without
writing state), ``upas-policy replay`` (facts from a decision log) and the
golden scenario tests (facts from the scenario file).  It keeps the session
state exactly as the server does, through the same ``policy.apply`` and
``policy.accepted``; what it leaves out is what is not policy: the tarpit's
waiting, the message itself, and the checks of the password.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from twisted.internet import defer

from .. import grammar, replies
from . import policy
from ..decision import ACCEPT, reject


class Undecidable(Exception):
    """A gatherer cannot give a fact (``replay``: it was not recorded)."""

    def __init__(self, name, arg=None):
        Exception.__init__(self, name)
        self.name = name
        self.arg = arg


@dataclass
class Step:
    """One command (or the connection) and what the policy made of it."""

    phase: str  # connect, helo, mail, rcpt, data, auth, other, syntax
    command: str  # as the client sent it; "CONNECT <ip>" for the connection
    trace: List[Tuple[str, Any]] = field(default_factory=list)  # (check, decision)
    decision: Any = None  # the deciding decision; None when undecidable
    check: str = ""  # the check that made it
    lines: Tuple[str, ...] = ()  # the reply's lines, any prefix first
    missing: Optional[str] = None  # the fact that could not be had
    facts: dict = field(default_factory=dict)  # the facts gathered for it

    @property
    def code(self):
        return self.decision.code if self.decision is not None else None

    def reply(self):
        """The reply as the client reads it, one string per line."""
        if self.decision is None or not self.code:
            return []
        n = len(self.lines)
        return ["%d%s%s" % (self.code, "-" if i < n - 1 else " ", line)
                for i, line in enumerate(self.lines)]


PHASES = {id(t): name for name, t in policy.TABLES.items()}
PHASES[id(policy.OTHER)] = "other"


@defer.inlineCallbacks
def run_session(settings, peer, local, lines, gather, encrypted=False, authenticated=None,
                connect_facts=None):
    """Run a connection from ``peer`` to ``local`` and the command ``lines``.

    ``gather(name, arg, session, index)`` gives each fact the checks ask
    for (a value or a Deferred), or raises ``Undecidable``; ``index`` is 0
    for the connection, n for ``lines[n - 1]``.  ``authenticated``:
    the user an AUTH command authenticates (its password is not checked),
    or a function of the line's index giving it (None: that AUTH failed;
    it may raise ``Undecidable``).
    A STARTTLS line is one that succeeded: the session goes on encrypted,
    with what the client said before forgotten, as the server's does.
    Fires with (the session, [Step]); the run stops at a hang-up, at QUIT
    or at the first fact that cannot be had.
    """
    s = policy.new_session(settings, peer, local)
    s.encrypted = encrypted
    steps = []
    looked = policy.Facts(connect_facts or {"closing": False, "connections": 0,
                                             "connection_cap": None})
    step = yield _step("connect", "CONNECT " + peer, policy.CONNECT, s,
                       grammar.Command("CONNECT", peer), settings, gather, looked, 0)
    steps.append(step)
    if step.decision is None or not step.decision.ok:
        return s, steps
    s.trusted, s.hisaction = policy.peer_facts(peer, settings, looked)
    for index, line in enumerate(lines, 1):
        step = yield _command(s, line, settings, gather, authenticated, index)
        steps.append(step)
        if step.decision is None or step.missing is not None or step.decision.hangup:
            break
    return s, steps


def _command(s, line, settings, gather, authenticated, index):
    try:
        cmd = grammar.parse(line.encode("utf-8"))
    except grammar.ParameterError as e:
        return defer.succeed(_refused(s, line, reject(e.code, e.text, reason="syntax")))
    except grammar.CommandSyntaxError:
        return defer.succeed(_refused(s, line, replies.syntax_error()))
    table = policy.BY_VERB.get(cmd.verb)
    if table is None:  # QUIT, STARTTLS: not policy
        if cmd.verb == "STARTTLS":  # one that succeeded: the session goes on, encrypted
            s.encrypted = True
            s.forget_client(settings.require_auth)
            return defer.succeed(Step("other", line, decision=ACCEPT))
        return defer.succeed(Step("other", line, decision=None))
    d = _step(PHASES[id(table)], line, table, s, cmd, settings, gather, policy.Facts(), index)
    return d.addCallback(_after, s, cmd, authenticated, index)


def _refused(s, line, decision):
    s.rejects += decision.counts
    return Step("syntax", line, decision=decision, check="grammar", lines=decision.lines)


def _after(step, s, cmd, authenticated, index):
    d = step.decision
    if d is None:
        return step
    if not d.ok:
        s.rejects += d.counts
    elif cmd.verb == "DATA":
        s.reset()  # the message is not simulated: its end starts a new transaction
    elif cmd.verb == "AUTH":
        try:
            user = authenticated(index) if callable(authenticated) else authenticated
        except Undecidable as e:  # the exchange's outcome cannot be had
            step.missing = e.name
            return step
        s.authenticated = user is not None
        s.user = user
    else:
        policy.accepted(s, cmd, d)
    return step


@defer.inlineCallbacks
def _step(phase, line, table, s, cmd, settings, gather, looked, index):
    trace = []
    step = Step(phase, line, trace=trace, facts=looked)
    try:
        outcome = yield policy.decide(table, s, cmd, settings,
                                      lambda name, arg: gather(name, arg, s, index), looked, trace)
    except Undecidable as e:
        step.missing = e.name
        return step
    policy.apply(s, outcome)
    step.decision, step.check, step.lines = outcome.decision, outcome.check, outcome.lines()
    return step
