"""``upas-policy``: ask the upas policy of a configuration, without a server.

``upas-policy explain --peer IP [...] [upas-smtpd options]`` runs one
session through the policy tables (``simulate.run_session``) and shows,
for each command, every check run with its verdict, the facts looked up
and the reply a client would get, then the outcome.  It takes every flag
``twistd upas-smtpd`` takes (``options.SmtpdOptions``: the same defaults,
the same start-up checks of the files), so the policy explained is the
one that server would apply.

The facts are looked up for real, as the server looks them up, but
nothing is written (``ReadOnlyLookups``): DNS through twisted.names (or a
zone file, ``--dns``), the validators as the server runs them, the
greylist only peeked at, the store's grants read, a connection slot taken
to be free, and the built-in delivery's answers from a mail root that is
not prepared (no directory is made).

``upas-policy replay ...`` is ``replay.main`` (when this build has it).

Exit status: 0 the mail would be accepted, 1 refused, 2 undecidable or
another error, 64 a usage error, 70 a subcommand this build lacks.

One tool, in one module: its options, the zone and peer it simulates,
the session it drives through ``simulate`` and the report it prints.
"""

import importlib.util
import ipaddress
import json
import sys

from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.mail import smtp
from twisted.python import usage

from .. import conf as smtpdconf
from .. import replies
from ..rules import simulate
from ..rules.auth import PLAIN, SessionRealm, session_mechanisms
from ..decision import ACCEPT, Accept, Reject, reject
from ..smtpd.delivery import UpasDelivery
from ..mailroot.mailer import Mailer
from .options import SmtpdOptions
from ..passwd import PasswordFile, PasswordFileUnavailable
from ..service import makeResolver
from ..session import Recipient
from ..smtpd.redisstate import RedisStateStore
from ..smtpd.spam import SpamFilter
from ..mailroot.store import MailRoot
from ..testing import FakeResolver, zone_from_lines

EX_ACCEPTED, EX_REFUSED, EX_OTHER, EX_USAGE, EX_SOFTWARE = 0, 1, 2, 64, 70

USAGE = """usage: upas-policy explain --peer IP [options]   (upas-policy explain --help)
       upas-policy replay [options]"""


# -- the facts, looked up without writing ------------------------------------

# the facts SpamFilter looks up by reading only (its greylist records the attempt)
SPAM_READS = frozenset(["granted", "ratify", "helo_dns", "peer_ptr", "sender_domain",
                        "validateaddress", "names_blocked", "senders", "validatesender",
                        "nospamfiltering"])


class ReadOnlyLookups:
    """``simulate.run_session``'s gatherer: each fact as the server finds it
    (``spam.SpamFilter``, the built-in delivery, the password file), by
    reading only.  A fact not known here is ``Undecidable`` rather than
    looked up some way that might write."""

    def __init__(self, settings, resolver, reactor, clock, run_blocking=defer.maybeDeferred,
                 store=None):
        self.settings = settings
        self.clock = clock
        self.spam = SpamFilter(settings, resolver, reactor, clock, store)
        # never prepare()d: that makes directories and tidies the spool
        self.root = MailRoot(settings.root, run_blocking, clock, settings.dom,
                             settings.path("lib"), settings.ours)
        self.backend = self.root
        if settings.mailer:
            self.backend = Mailer(settings.mailer, reactor, settings.mailer_timeout, clock)
        self.passwords = PasswordFile(settings.path("passwd"), run_blocking)
        self.portal = Portal(SessionRealm(), [self.passwords])

    def __call__(self, name, arg, session, index):
        if name in SPAM_READS:
            return self.spam.gather(name, arg, session)
        fact = getattr(self, "fact_" + name, None)
        if fact is None:
            raise simulate.Undecidable(name, arg)
        return fact(arg, session)

    def fact_connection_slot(self, ip, session):
        return None  # explaining holds no connection: the slot is free

    def fact_connection_rate(self, ip, session):
        return 1  # explaining counts nothing: the first attempt of its window

    fact_message_rate = fact_recipient_rate = fact_connection_rate

    @defer.inlineCallbacks
    def fact_greylist(self, rsys, session):
        """What this attempt would find (``Greylist.peek``), not recorded."""
        store = self.spam.store
        try:
            white = yield store.isWhitelisted(rsys)
            outcomes = [] if white else (
                yield store.greylistPeek(session.lsys, rsys, session.envelope.recipients))
        except OSError:
            return True, []  # the server lets the peer through (and logs why)
        return white, list(outcomes)

    def _delivery(self, session):
        return UpasDelivery(session, self.settings, self.root, self.backend, self.clock)

    def fact_validate_from(self, path, session):
        helo = (session.him.encode(), session.rsys.encode())
        d = defer.maybeDeferred(self._delivery(session).validateFrom, helo, path)
        return d.addCallbacks(lambda _: ACCEPT, _refusal)

    def fact_validate_to(self, path, session):
        helo = (session.him.encode(), session.rsys.encode())
        user = Recipient(path, None, helo, session.envelope.sender)
        d = defer.maybeDeferred(self._delivery(session).validateTo, user)
        return d.addCallbacks(lambda _: ACCEPT, _refusal)

    def fact_mailer_ready(self, arg, session):
        return self._delivery(session).ready()

    def fact_auth_mechanisms(self, arg, session):
        # what the checkers take, as the server's fact: TLS and -p are the
        # table's own check (policy.encryption)
        return session_mechanisms(self.portal, True, True)

    def has_user(self, user):
        """Is ``user`` in the password file? None when there is none."""
        try:
            return user.encode("utf-8") in self.passwords.entries()
        except PasswordFileUnavailable:
            return None


def _refusal(failure):
    """A delivery back end's refusal as the server replies it."""
    failure.trap(smtp.SMTPServerError)
    verdict = getattr(failure.value, "verdict", None)  # delivery.RefusedRecipient
    if verdict is not None:
        return verdict
    resp = failure.value.resp
    return reject(failure.value.code,
                  resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp))


# -- options -----------------------------------------------------------------

class ExplainOptions(SmtpdOptions):
    synopsis = ("explain --peer IP [--local IP] [--helo NAME | --ehlo NAME] [--from SENDER] "
                "[--rcpt ADDR]... [--data] [--then LINE]... [--auth USER] [--tls] "
                "[--dns FILE | --resolver HOST:PORT] [--json] [upas-smtpd options]")
    longdesc = ("Explain what upas smtpd with these options would do with one session: "
                "every check, the facts looked up (nothing is written) and the replies.")

    optFlags = [
        ["data", None, "send DATA after the recipients (the default when --rcpt is given)"],
        ["tls", None, "the session is encrypted (STARTTLS done, or --smtps)"],
        ["json", None, "print one JSON object instead of text"],
    ]
    optParameters = [
        ["peer", None, None, "the client's IP address (required)"],
        ["local", None, "127.0.0.1", "our IP address the client connected to"],
        ["helo", None, None, "send HELO NAME"],
        ["ehlo", None, None, "send EHLO NAME"],
        ["from", None, None, "send MAIL FROM:<SENDER> ('' for the null sender <>)"],
        ["auth", None, None, "send AUTH PLAIN and, if the policy lets it begin, be "
                             "authenticated as USER (the password is not checked)"],
        ["dns", None, None, "answer DNS from this file of NAME TYPE VALUE lines "
                            "instead of asking a server"],
    ]

    def __init__(self):
        SmtpdOptions.__init__(self)
        self["rcpt"] = []
        self["then"] = []

    def opt_rcpt(self, value):
        """send RCPT TO:<ADDR>; may be repeated"""
        self["rcpt"].append(value)

    def opt_then(self, value):
        """a command line sent last, as written (RSET, MAIL FROM:<a@b> ...); may be repeated"""
        self["then"].append(value)

    def parseOptions(self, options=None):
        usage.Options.parseOptions(self, options)  # not twistd's one-line exit

    def postOptions(self):
        if not self["peer"]:
            raise usage.UsageError("--peer IP is required")
        for name in ("peer", "local"):
            try:
                self[name] = str(ipaddress.ip_address(self[name]))
            except ValueError:
                raise usage.UsageError("--%s wants an IP address, not %r" % (name, self[name]))
        if self["helo"] and self["ehlo"]:
            raise usage.UsageError("--helo and --ehlo: give one")
        if self["dns"] and self["resolver"]:
            raise usage.UsageError("--dns and --resolver: give one")
        self["settings"] = self.make_settings()  # ConfigError: the server would not start

    def command_lines(self):
        """The session's command lines, in the order a client sends them."""
        lines = []
        if self["helo"] or self["ehlo"]:
            lines.append("HELO " + self["helo"] if self["helo"] else "EHLO " + self["ehlo"])
        if self["auth"] is not None:
            lines.append("AUTH " + PLAIN)
        if self["from"] is not None:
            lines.append("MAIL FROM:%s" % _bracketed(self["from"]))
        lines += ["RCPT TO:%s" % _bracketed(rcpt) for rcpt in self["rcpt"]]
        if self["data"] or self["rcpt"]:
            lines.append("DATA")
        return lines + self["then"]


def _bracketed(path):
    return path if path.startswith("<") else "<%s>" % path


# -- the explanation -----------------------------------------------------------

class Explanation:
    """A session's steps (``simulate.Step``) and what they come to."""

    def __init__(self, options, session, steps, notes):
        self.options = options
        self.session = session
        self.steps = steps
        self.notes = notes
        self.outcome = outcome(steps)

    @property
    def status(self):
        return {"accepted": EX_ACCEPTED, "refused": EX_REFUSED,
                "hang-up": EX_REFUSED}.get(self.outcome["result"], EX_OTHER)

    def as_json(self):
        o = self.options
        return {
            "session": {"peer": o["peer"], "local": o["local"],
                        "encrypted": self.session.encrypted, "auth": o["auth"],
                        "password_checked": False,
                        "commands": o.command_lines()},
            "phases": [phase_json(step) for step in self.steps],
            "notes": self.notes,
            "outcome": self.outcome,
        }

    def text(self):
        out = []
        for step in self.steps:
            out.append("%s: %s" % (step.phase, step.command))
            if step.decision is None and step.missing is None:
                out.append("  (not policy: no check runs)")
                continue
            for name, value in sorted(step.facts.items()):
                shown = jsonable(value)
                if shown is not OMIT:
                    out.append("  fact %s = %s" % (name, json.dumps(shown)))
            for check in checks(step):
                out.append("  %s: %s" % (check["check"], check_text(check)))
            if step.missing:
                out.append("  (stopped: the fact %s cannot be had)" % step.missing)
            out += ["  reply: " + line for line in client_reply(step)]
            if step.phase == "auth" and step.decision is not None and step.decision.ok:
                out.append("  (if the password is right: it is not checked)")
        out += ["note: " + note for note in self.notes]
        out.append(self.outcome["text"])
        return "\n".join(out) + "\n"


def checks(step):
    """Each check run: {check, verdict, code, reply, reason, detail, ...}."""
    trace = step.trace or ([(step.check, step.decision)] if step.decision is not None else [])
    return [check_json(name, d) for name, d in trace]


def check_json(name, d):
    entry = {"check": name, "verdict": "accept" if d.ok else
             ("defer" if d.code and 400 <= d.code < 500 else "refuse"),
             "code": d.code or None, "reply": list(d.lines), "reason": d.reason or None,
             "detail": d.detail or None}
    effects = {k: jsonable(getattr(d, k)) for k in EFFECTS if getattr(d, k)}
    if effects:
        entry["effects"] = effects
    return entry


EFFECTS = ("hangup", "hardreject", "require_auth", "delay", "action", "filterstate", "prefix")


def check_text(c):
    text = "accept"
    if c["verdict"] != "accept":
        text = " / ".join("%s %s" % (c["code"], line) for line in c["reply"]) or "no reply"
        text += " [%s%s]" % (c["reason"], ", " + c["detail"] if c["detail"] else "")
    if c.get("effects"):
        text += " (%s)" % ", ".join("%s=%s" % (k, json.dumps(v))
                                    for k, v in c["effects"].items())
    return text


def client_reply(step):
    if step.phase == "auth" and step.decision is not None and step.decision.ok:
        # the exchange is not simulated: its end, with the right password
        return ["235 " + replies.AUTH_OK]
    return step.reply()


def phase_json(step):
    facts = {}
    for name, value in step.facts.items():
        shown = jsonable(value)
        if shown is not OMIT:
            facts[name] = shown
    return {"phase": step.phase, "command": step.command, "checks": checks(step),
            "reply": client_reply(step), "facts": facts, "missing": step.missing}


OMIT = object()


def jsonable(value):
    """A fact (or effect) as JSON, or OMIT for one that has no such form
    (the ratify lists: the file is the admin's, not a lookup)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Accept):
        return "accept"
    if isinstance(value, Reject):
        return {"code": value.code, "reply": list(value.lines), "reason": value.reason}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        items = [jsonable(v) for v in value]
        return OMIT if any(v is OMIT for v in items) else items
    return OMIT


def outcome(steps):
    """What the session comes to: the first hang-up; else DATA's answer when
    it was asked; else the first refusal; else the last reply."""
    def described(result, step):
        reply = step.reply()
        text = "%s at %s by %s" % (result, step.phase, step.check)
        if reply:
            text += ": " + " / ".join(reply)
        return {"result": result, "phase": step.phase, "command": step.command,
                "check": step.check, "code": step.code or None, "reply": reply, "text": text}

    decided = [s for s in steps if s.decision is not None or s.missing]
    for step in decided:
        if step.missing:
            return {"result": "undecidable", "phase": step.phase, "command": step.command,
                    "missing": step.missing,
                    "text": "undecidable at %s: the fact %s cannot be had"
                            % (step.phase, step.missing)}
        if step.decision.hangup:
            return described("hang-up", step)
    data = next((s for s in decided if s.phase == "data"), None)
    refused = [s for s in decided if not s.decision.ok]
    if (data is None or not data.decision.ok) and refused:
        return described("refused", refused[0])
    last = data or decided[-1]
    code = last.code or (235 if last.phase == "auth" else None)
    return {"result": "accepted", "phase": last.phase, "command": last.command,
            "check": last.check, "code": code, "reply": client_reply(last),
            "text": "accepted: %s" % code}


def explain(options, reactor, clock=None, resolver=None):
    """Run the session ``options`` describe; fires with an ``Explanation``."""
    s = options["settings"]
    if resolver is None and options["dns"]:
        with open(options["dns"], encoding="utf-8") as f:
            resolver = FakeResolver(zone_from_lines(f, options["dns"]))
    resolver = resolver or makeResolver(reactor, options.get("resolverAddress"))
    store = None
    if s.state != "local":  # --state redis://: the greylist and grants every node sees
        store = RedisStateStore(s.state, s, clock or reactor, reactor)
    lookups = ReadOnlyLookups(s, resolver, reactor, clock or reactor, store=store)
    notes = []
    if options["auth"] is not None:
        known = lookups.has_user(options["auth"])
        notes.append("AUTH %s as %s: the password is not checked (%s)" % (
            PLAIN, options["auth"], {True: "the user is in the password file",
                                     False: "the user is NOT in the password file: "
                                            "a real AUTH fails",
                                     None: "there is no usable password file"}[known]))
    if options["ehlo"]:
        notes.append("EHLO's extension lines are not shown")
    def run(_):
        return simulate.run_session(s, options["peer"], options["local"],
                                    options.command_lines(), lookups,
                                    encrypted=bool(options["tls"] or s.smtps),
                                    authenticated=options["auth"])

    d = defer.succeed(None) if store is None else store.connect()
    d.addCallback(run)
    if store is not None:
        d.addBoth(lambda result: store.disconnect().addCallback(lambda _: result))
    return d.addCallback(lambda result: Explanation(options, result[0], result[1], notes))


# -- the command ----------------------------------------------------------------

def explain_main(argv, out, err, reactor=None):
    options = ExplainOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print("upas-policy explain: %s" % e, file=err)
        return EX_USAGE
    except smtpdconf.ConfigError as e:
        print("upas-policy explain: %s" % e, file=err)
        return EX_OTHER
    if reactor is None:
        from twisted.internet import reactor
    result = _wait(defer.maybeDeferred(explain, options, reactor), reactor)
    if not isinstance(result, Explanation):
        print("upas-policy explain: %s" % _error_text(result), file=err)
        return EX_OTHER
    if options["json"]:
        out.write(json.dumps(result.as_json(), indent=2) + "\n")
    else:
        out.write(result.text())
    return result.status


def _error_text(failure):
    e = failure.value
    if isinstance(e, OSError) and e.filename:
        return "%s: %s" % (e.filename, e.strerror)
    return str(e) or failure.type.__name__


def _wait(d, reactor):
    """The result (or Failure) of ``d``; the reactor runs only when a fact
    needs it (a DNS server, a validator), so that from a zone file and
    without validators nothing but the tables runs."""
    result = []
    d.addBoth(result.append)
    if not result:
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))
        reactor.run()
    return result[0]


def _replay_module():
    """``upasmail.replay``, imported only when asked for; None if this build lacks it."""
    if importlib.util.find_spec("upasmail.replay") is None:
        return None
    return importlib.import_module("upasmail.replay")


def main(argv=None, out=None, err=None, reactor=None):
    """``upas-policy SUBCOMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    if argv and argv[0] == "explain":
        return explain_main(argv[1:], out, err, reactor)
    if argv and argv[0] == "replay":
        replay = _replay_module()
        if replay is None:
            print("upas-policy: replay is not available in this build", file=err)
            return EX_SOFTWARE
        return replay.main(argv[1:])
    if argv in (["--help"], ["-h"]):
        print(USAGE, file=out)
        return EX_ACCEPTED
    print(USAGE, file=err)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
