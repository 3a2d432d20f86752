"""Golden scenarios: ``tests/scenarios/*.in`` run through the real policy
tables (``simulate.run_session``) with fake facts, and ``*.dialogue``
files replayed through the real server (``testing.Dialogue``).  The file
format is in tests/scenarios/README.rst; ``test_scenarios`` drives them."""

import json
import os
import shlex

from twisted.internet import task
from twisted.python import failure

from upasmail import auth, checkconfig, policy, process, replies, simulate, spam, testing
from upasmail import conf as smtpdconf
from upasmail import settings as smtpdsettings
from upasmail.decision import ACCEPT, reject
from upasmail.validators import sender_status

SYSNAME = "gnot.example.org"
EPOCH = 1_000_000_000  # the scenarios' clock starts here: greylist ages are in its seconds
CONNECT_FACTS = {"closing": False, "connections": 0, "connection_cap": None}
# facts whose value is a decision: "ok", or [code, "line", ...]
DECISIONS = ("validate_from", "validate_to", "mailer_ready", "validatesender")
# facts that are configuration, not looked up: the .ref leaves them out
CONFIGURED = ("ratify", "names_blocked") + tuple(CONNECT_FACTS)


class ScenarioError(Exception):
    pass


def is_command(line):
    """An SMTP line as sent: its first word is upper case (``MAIL FROM:<a@b>``)."""
    word = line.split(None, 1)[0].split(":", 1)[0]
    return word.isupper()


class Setup:
    """What the directives so far put in place (files, zone, flags)."""

    def __init__(self):
        self.conf, self.flags, self.blocked, self.names_blocked = [], [], [], []
        self.senders, self.whitelist, self.users, self.optout = [], [], [], []
        self.zone, self.failing, self.everything = {}, [], False

    def copy(self):
        new = Setup()
        for k, v in vars(self).items():
            setattr(new, k, dict(v) if isinstance(v, dict) else
                    list(v) if isinstance(v, list) else v)
        return new

    # the directives that add a line to a list (a file's, or the mailboxes)
    LINES = {"blocked": "blocked", "names.blocked": "names_blocked", "senders": "senders",
             "whitelist": "whitelist", "user": "users"}

    def directive(self, verb, rest):
        if verb == "conf":  # alone: smtpd.conf starts afresh
            self.conf = self.conf + [rest] if rest else []
        elif verb == "flags":  # replaces the flags so far
            self.flags = shlex.split(rest)
        elif verb in self.LINES:
            getattr(self, self.LINES[verb]).append(rest)
        elif verb == "optout":
            self.users.append(rest)
            self.optout.append(rest)
        elif verb == "dns":
            self._dns(rest)
        else:
            return False
        return True

    def _dns(self, rest):
        parts = rest.split(None, 2)
        if parts == ["*"]:  # every other name has the A record 192.0.2.1
            self.everything = True
            return
        if len(parts) == 2 and parts[1] == "SERVFAIL":
            self.failing.append(parts[0])
            return
        if len(parts) != 3:
            raise ScenarioError("dns <name> <TYPE> <value>, or dns <name> SERVFAIL: %r" % rest)
        name, rtype, value = parts
        self.zone.setdefault(name, [])
        if rtype != "NONE":  # a name that exists with no records
            self.zone[name].append([rtype, value])

    def resolver(self):
        return testing.FakeResolver(testing.zone_from_json(self.zone), failing=self.failing,
                                    everything_exists=self.everything)

    def write(self, root, written):
        """The mail root's policy files, as the directives say; a file is
        written only when its directives changed since the last session
        (``written``), so what the server adds (the greylist whitelist) stays."""
        lib = os.path.join(root, "lib")
        os.makedirs(lib, exist_ok=True)
        for name, lines in (("blocked", self.blocked), ("names.blocked", self.names_blocked),
                            ("senders", self.senders)):
            path = os.path.join(lib, name)
            if written.get(name) == lines:
                continue
            written[name] = lines
            if lines:
                with open(path, "w") as f:
                    f.write("".join(l + "\n" for l in lines))
            elif os.path.exists(path):
                os.remove(path)
        if self.whitelist and written.get("whitelist") != self.whitelist:
            written["whitelist"] = self.whitelist
            os.makedirs(os.path.join(root, "grey"), exist_ok=True)
            with open(os.path.join(root, "grey", "whitelist"), "w") as f:
                f.write("".join(l + "\n" for l in self.whitelist))
        testing.make_mailboxes(root, *self.users)
        for user in self.optout:
            open(os.path.join(root, "box", user, "nospamfiltering"), "w").close()

    def settings(self, root):
        """Settings as ``twistd upas-smtpd <flags>`` with this smtpd.conf makes them."""
        options = checkconfig.Options()
        options.parseOptions(self.flags)
        args = options.merge_args()
        args.update(root=root, sysname=SYSNAME, fqdn=SYSNAME, tarpit_unit=0.0,
                    auth_fail_delay=0.0)
        config = smtpdconf.parse("".join(l + "\n" for l in self.conf), "smtpd.conf")
        return smtpdsettings.merge(config, **args)


class Session:
    def __init__(self, header, peer, local, setup, facts, wait):
        self.header, self.peer, self.local = header, peer, local
        self.setup, self.wait = setup, wait
        self.lines = []
        self.pending = dict(facts)  # in force from here on
        self.facts = []  # facts[0]: the connection's; facts[i]: those for lines[i - 1]
        self.encrypted = False
        self.authenticated = None  # who every AUTH that starts authenticates
        self.notes = {}  # the .in's comments before the connection (0) or lines[i - 1]

    def add(self, line):
        if not self.facts:
            self.facts.append(dict(self.pending))
        self.lines.append(line)
        self.facts.append(dict(self.pending))

    def done(self):
        if not self.facts:
            self.facts.append(dict(self.pending))


class Show:
    def __init__(self, path, notes):
        self.path, self.notes = path, notes

    def done(self):
        pass

    def render(self, root):
        path = os.path.join(root, self.path)
        if not os.path.exists(path):
            return self.notes + ["show %s: absent" % self.path]
        with open(path) as f:
            lines = f.read().splitlines()
        return self.notes + ["show %s:%s" % (self.path, "" if lines else " empty")] + ["  | " + l for l in lines]


def parse(text):
    """The sessions of a .in file.  Setup directives are cumulative and a
    session takes them as they stand at its ``client`` line; facts are
    positional (in force for the commands that follow them)."""
    setup, file_facts, sessions, wait = Setup(), {}, [], 0
    current, notes = None, []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("#"):
            notes.append(raw.strip())  # the .ref shows it before what follows
            continue
        line = raw.split(" #", 1)[0].strip()
        if not line:
            continue
        if is_command(line):
            if current is None:
                raise ScenarioError("line %d: a command before any client line" % number)
            current.add(line)
            current.notes[len(current.lines)], notes = notes, []
            continue
        verb, _, rest = line.partition(" ")
        rest = rest.strip()
        if verb == "client":
            words = rest.split()
            local = words[2] if len(words) == 3 and words[1] == "local" else "127.0.0.1"
            current = Session(line, words[0], local, setup, file_facts, wait)
            current.notes[0], notes = notes, []
            sessions.append(current)
            wait = 0
        elif verb == "fact":
            name, _, value = rest.partition(" ")
            if name not in policy.FACTS:
                raise ScenarioError("line %d: no such fact %r" % (number, name))
            facts = current.pending if current else file_facts
            facts[name] = json.loads(value)
        elif verb == "wait":
            wait += float(rest)
        elif verb == "show":  # a file under the mail root, as it is then
            sessions.append(Show(rest, notes))
            current, notes = None, []
        elif verb == "repeat":
            count, _, command = rest.partition(" ")
            for _ in range(int(count)):
                current.add(command)
        elif verb == "tls" and current:
            current.encrypted = True
        elif verb == "auth" and current:
            current.authenticated = rest
        else:
            setup = setup.copy()  # for the sessions that follow
            if not setup.directive(verb, rest):
                raise ScenarioError("line %d: unknown directive %r" % (number, verb))
    for session in sessions:
        session.done()
    return sessions


def _decision(value):
    if value == "ok":
        return ACCEPT
    if value == "busy":  # the mailer cannot be started (mailer.py's answer)
        return reject(450, replies.BUSY, reason="busy")
    code, *lines = value
    return reject(code, *lines)


def _fact(name, value):
    """A ``fact`` line's JSON as the value the checks read."""
    if name == "validatesender" and isinstance(value, str) and value != "ok":
        # the program's exit status, read by the real parser
        return sender_status(process.Outcome(ok=False, stderr=value.encode()))
    if name in DECISIONS:
        return _decision(value)
    if name == "greylist":
        white, outcomes = value
        return bool(white), [tuple(o) for o in outcomes]
    if name == "auth_mechanisms":
        return bool(value[0]), list(value[1])
    return value


class Gatherer:
    """Facts for ``simulate.run_session``: a ``fact`` line's value, else the
    real ``spam.SpamFilter`` (DNS over the FakeResolver, the validators over
    the written lib files, the greylist in the local store), else the
    delivery back end's defaults (it accepts; AUTH has a checker)."""

    def __init__(self, scenario, settings, clock):
        self.scenario, self.settings = scenario, settings
        self.filter = spam.SpamFilter(settings, scenario.setup.resolver(), clock, clock)

    def __call__(self, name, arg, session, index):
        facts = self.scenario.facts[index]
        if name in facts:
            return _fact(name, facts[name])
        if name in ("validate_from", "validate_to", "mailer_ready"):
            return ACCEPT
        if name == "connection_slot":
            return None
        if name == "auth_mechanisms":
            return True, auth.offered(session.encrypted, self.settings.clear_passwords, True)
        return self.filter.gather(name, arg, session)


def simulated(text, root):
    """Run the sessions of a .in file through the tables: (session, [Step])
    per session, (Show, None) for a ``show`` (render it at once)."""
    clock = task.Clock()
    clock.advance(EPOCH)
    written = {}
    for scenario in parse(text):
        if isinstance(scenario, Show):
            yield scenario, None
            continue
        clock.advance(scenario.wait)
        scenario.setup.write(root, written)
        settings = scenario.setup.settings(root)
        connect = dict(CONNECT_FACTS)
        connect.update((k, v) for k, v in scenario.facts[0].items() if k in CONNECT_FACTS)
        d = simulate.run_session(settings, scenario.peer, scenario.local, scenario.lines,
                                 Gatherer(scenario, settings, clock), scenario.encrypted,
                                 scenario.authenticated, connect)
        yield scenario, _now(d)[1]


def run(text, root):
    """Run every session of a .in file; the .ref text."""
    out = []
    for scenario, steps in simulated(text, root):
        if steps is None:
            out += scenario.render(root)
            continue
        if scenario.wait:
            out.append("wait %g" % scenario.wait)
        out += scenario.notes.get(0, [])
        out.append(scenario.header)
        last, same = None, 0
        for index, step in enumerate(steps):
            notes = scenario.notes.get(index, []) if index else []
            if notes and same:
                out.append("  (the same %d more times)" % same)
                last, same = None, 0
            out += notes
            block = render(step)
            if block == last:
                same += 1
                continue
            if same:
                out.append("  (the same %d more times)" % same)
            out += block
            last, same = block, 0
        if same:
            out.append("  (the same %d more times)" % same)
    return "\n".join(out) + "\n"


MESSAGE = ("Subject: scenario", "", "hello", ".")


def served(text, sim_root, root):
    """The same sessions through the real server (``testing.Dialogue``):
    (what was sent, the tables' reply, the server's) per command, for the
    sessions whose facts all have a real source (no ``fact``, ``auth`` or
    ``tls`` lines, no AUTH: the server here has no password checker).  A
    command the tables let through to give its own reply (RSET, NOOP) is
    not compared; EHLO is compared by the lines the tables give (the
    extension lines are the protocol's); after a 354 a message is sent and
    its reply left out (the message is not the tables')."""
    clock = task.Clock()
    clock.advance(EPOCH)
    written = {}
    for scenario, steps in simulated(text, sim_root):
        if steps is None:
            continue
        clock.advance(scenario.wait)
        scenario.setup.write(root, written)
        if any(scenario.facts) or scenario.authenticated or scenario.encrypted or any(
                line.upper().startswith("AUTH") for line in scenario.lines):
            continue
        d = testing.Dialogue(scenario.setup.settings(root), peer=scenario.peer,
                             local=scenario.local, clock=clock,
                             resolver=scenario.setup.resolver())
        try:
            yield "%s: connect" % scenario.header, steps[0].reply(), d.greeting
            for line, step in zip(scenario.lines, steps[1:]):
                got = d.send(line)
                if step.decision is None or (step.decision.ok and not step.code):
                    continue  # QUIT, STARTTLS; RSET, NOOP: not the tables' replies
                want = step.reply()
                if line.upper().startswith("EHLO ") and step.decision.ok:
                    want = [w[4:] for w in want]
                    got = [g[4:] for g in got[:len(want)]]
                yield "%s: %s" % (scenario.header, line), want, got
                if step.code == 354:
                    d.send(*MESSAGE)
        finally:
            d.close()


def _now(d):
    """The result of a Deferred that has fired (the fakes answer at once)."""
    results = []
    d.addBoth(results.append)
    if not results:
        raise ScenarioError("a fact did not answer at once")
    if isinstance(results[0], failure.Failure):
        results[0].raiseException()
    return results[0]


# -- the .ref text -------------------------------------------------------------

def verdict(d):
    """One decision, short: ``ok``, ``ok 250``, ``REJECT 554 hangup``..."""
    words = ["ok" if d.ok else "REJECT"]
    if d.code:
        words.append(str(d.code))
    if d.ok:
        if d.value is not None and not d.code:
            words.append("value=%s" % _show(d.value))
        for flag in ("counts", "require_auth"):
            if getattr(d, flag):
                words.append(flag)
        for name in ("action", "filterstate"):
            if getattr(d, name) is not None:
                words.append("%s=%s" % (name, getattr(d, name)))
        if d.prefix:
            words.append("prefix")
    else:
        for flag in ("hangup", "hardreject"):
            if getattr(d, flag):
                words.append(flag)
        if not d.counts:
            words.append("uncounted")
    if d.delay:
        words.append("delay=%g" % d.delay)
    if d.note:
        words.append("note=" + d.note)
    return " ".join(words)


def _show(value):
    if hasattr(value, "ok"):
        return verdict(value)
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(_show(v) for v in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    return str(value)


def render(step):
    lines = [step.command]
    facts = {k: v for k, v in step.facts.items() if k not in CONFIGURED}
    if facts:
        lines.append("  facts: " + "; ".join("%s=%s" % (k, _show(v))
                                              for k, v in sorted(facts.items())))
    width = max([len(name) for name, _ in step.trace] or [0])
    for name, d in step.trace:
        lines.append("  %-*s  %s" % (width, name, verdict(d)))
    if step.missing:
        lines.append("  => undecidable: no fact %s" % step.missing)
    elif step.decision is None:
        lines.append("  => not policy")
    else:
        lines.append("  => %s by %s" % ("accepted" if step.decision.ok else "refused",
                                        step.check))
        lines += ["  < " + r for r in step.reply()]
        if step.decision.hangup:
            lines.append("  (connection closed)")
    return lines


# -- the dialogue files ----------------------------------------------------------------

CLOSED = "(closed)"  # S: (closed): the server closed the connection after that reply


def dialogues(text):
    """[setup, client line, [(C line, or None for the greeting; [S lines])]]
    per session; a session takes the setup as it stands at its client line."""
    setup, sessions = Setup(), []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("C: "):
            sessions[-1][2].append((line[3:], []))
        elif line.startswith("S: ") or line == "S:":
            sessions[-1][2][-1][1].append(line[3:])
        else:
            verb, _, rest = line.strip().partition(" ")
            if verb == "client":
                sessions.append([setup, rest, [(None, [])]])
                continue
            setup = setup.copy()  # for the sessions that follow
            if not setup.directive(verb, rest.strip()):
                raise ScenarioError("line %d: unknown directive %r" % (number, verb))
    return sessions


def replay(text, root):
    """Replay a .dialogue file; yields (what was sent, expected, got) per exchange."""
    written = {}
    for setup, client, exchanges in dialogues(text):
        setup.write(root, written)
        settings = setup.settings(root)
        words = client.split()
        local = words[2] if len(words) == 3 else "127.0.0.1"
        d = testing.Dialogue(settings, peer=words[0], local=local, resolver=setup.resolver())
        closed = False
        try:
            for sent, expected in exchanges:
                got = d.greeting if sent is None else d.send(sent)
                if not closed and d.transport.disconnecting:
                    closed, got = True, got + [CLOSED]
                yield "%s %s" % (client, sent or "(connect)"), expected, got
        finally:
            d.close()

