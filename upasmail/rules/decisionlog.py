"""The decision log (``--decision-log FILE``): one JSON line per session.

Written at the session's end (and at once for a connection refused before
its greeting), so that sessions refused before MAIL are in it too.  It
holds what ``upas-policy replay`` needs to run the session again through
a changed policy (``replay``): the session's facts at connect, then each
command line as sent with the facts the policy looked up for it, the
checks run with their verdicts and the decision; for DATA the outcome
after the dot.  Field names are the logs' (docs/logging.rst).

What is not in it, by design: message bodies and headers, AUTH initial
responses and exchange lines (``AUTH <mechanism>`` only), the free text
of NOOP and HELP (``FREE_TEXT``), and the policy's
data (the ratify lists, names.blocked): replay takes those from the new
configuration.

Each line is one ``write`` to a file opened with ``O_APPEND``, so the
processes of ``--workers`` can share it.  When logrotate moves the file
away it is opened again at its path at the next line (as
``logging.handlers.WatchedFileHandler`` does), in every process, with no
signal.  A write that fails is logged once (until one succeeds again) and
never touches the session.
"""

import json
import os

from twisted.logger import Logger

from .. import grammar, logs
from . import policy
from ..decision import Accept, reject

log = Logger(namespace="smtpd")

# facts that are the policy's data, not observations: replay reads them
# from the configuration it is given
POLICY_DATA = frozenset(["ratify", "names_blocked"])
# facts that are decisions ("accept" or {code, lines, reason, detail})
DECISION_FACTS = frozenset(["validate_from", "validate_to", "validatesender", "mailer_ready"])


def encode_decision(d):
    if d.ok:
        return "accept"
    return {"code": d.code, "lines": list(d.lines), "reason": d.reason, "detail": d.detail}


def decode_decision(value):
    if value == "accept":
        return Accept()
    return reject(value["code"], *value["lines"], reason=value.get("reason", "other"),
                  detail=value.get("detail", ""))


def encode_fact(value):
    if isinstance(value, (tuple, list)):
        return [encode_fact(v) for v in value]
    if hasattr(value, "ok") and hasattr(value, "lines"):
        return encode_decision(value)
    return value


def decode_fact(name, value):
    """A recorded fact in the form the checks take (``policy.FACTS``)."""
    if value == policy.UNAVAILABLE:  # the shared state could not give it
        return value
    if name in DECISION_FACTS:
        return decode_decision(value)
    if name == "greylist":
        white, outcomes = value
        return white, [tuple(o) for o in outcomes]
    if name == "auth_mechanisms":
        return value[0], list(value[1])
    return value


def encode_facts(looked):
    return {name: encode_fact(value) for name, value in looked.items()
            if name not in POLICY_DATA}


def verdict(d):
    """A check's verdict in the trace: "accept", or the refusal's code."""
    return "accept" if d.ok else d.code


def decided(trace):
    """{check, code, reply, reason} of the check that decided (the trace's last)."""
    name, d = trace[-1]
    prefix = ()
    for _, earlier in trace[:-1]:
        prefix += earlier.prefix
    return {"check": name, "code": d.code, "reply": " ".join(prefix + tuple(d.lines)),
            "reason": d.reason or None}


# the command words; a line that does not parse is recorded as its word
# alone when it is one of these, else as "?"
VERBS = frozenset(policy.BY_VERB) | {"QUIT", "STARTTLS"}
# commands whose argument is free text no check reads (RFC 5321 4.1.1.9,
# 4.1.1.8): recorded as their word alone, since a message sent although
# DATA was refused arrives as command lines ("Help me with ...")
FREE_TEXT = frozenset(["NOOP", "HELP"])


def parsed_text(cmd, raw):
    """A command line that parsed, as recorded."""
    if cmd.verb == "AUTH":
        return "AUTH " + cmd.arg
    if cmd.verb in FREE_TEXT:
        return cmd.verb
    return raw.decode("utf-8", "replace")


def command_text(line):
    """A command line as recorded: as sent, but AUTH only with its mechanism
    (an initial response is a credential), NOOP and HELP without their free
    text, and of a line that does not
    parse only its command word (it may be a credential sent out of turn,
    an AUTH response pipelined behind a refused AUTH)."""
    raw = line if isinstance(line, bytes) else line.encode("utf-8")
    try:
        cmd = grammar.parse(raw)
    except grammar.ParameterError:  # MAIL or RCPT with a parameter we do not take
        return raw.decode("utf-8", "replace")
    except grammar.CommandSyntaxError:
        word = raw.split(None, 1)[0].decode("ascii", "replace").upper() if raw.split() else ""
        return word if word in VERBS else "?"
    return parsed_text(cmd, raw)


class DecisionLog:
    """The decision log at ``path``; ``clock`` gives the sessions' times."""

    def __init__(self, path, clock):
        self.path = path
        self.clock = clock
        self._open = {}  # session id -> its record, while the session lasts
        self._failing = False
        self._fd = None
        self._ino = None
        self._reopen()

    def _reopen(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        old, self._fd = self._fd, fd
        self._ino = os.fstat(fd).st_ino
        if old is not None:
            os.close(old)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the server's hooks --------------------------------------------------

    def connected(self, session, looked, trace, outcome):
        """A session greeted: its facts and the connect table's evaluation."""
        self._open[session.id] = {
            "session": session.id, "time": round(self.clock.seconds(), 3),
            "peer": session.rsys, "local": session.lsys, "trusted": session.trusted,
            "encrypted": session.encrypted,
            "connect": self._evaluation("CONNECT " + session.rsys, looked, trace),
            "commands": []}

    def refused(self, ip, looked, trace, end):
        """A connection refused before its greeting (-k, a limit, shutting
        down; ``error``: the store failed, nothing decided): its line, at once."""
        connect = self._evaluation("CONNECT " + ip, looked, trace)
        if end == "error":
            connect.pop("decision", None)
        self._write({"session": logs.new_session_id(), "time": round(self.clock.seconds(), 3),
                     "peer": ip, "local": None, "connect": connect, "commands": [],
                     "end": end})

    def command(self, session, line):
        """A command line as received, before it is parsed (kept as bytes:
        ``record`` or ``ended`` makes it text, parsing it only when the
        server did not)."""
        record = self._open.get(session.id)
        if record is not None:
            record["commands"].append({"line": line})

    def record(self, session, cmd, looked, trace):
        """The policy's evaluation of the command last received."""
        record = self._open.get(session.id)
        if record is not None and record["commands"]:
            entry = record["commands"][-1]
            entry["line"] = parsed_text(cmd, entry["line"])
            entry.update(self._evaluation(None, looked, trace))

    def tls_started(self, session):
        """The command last received, a STARTTLS, brought TLS up: replay
        forgets what the client said before only there (a refused one,
        "STARTTLS now" or one inside TLS, is recorded too)."""
        record = self._open.get(session.id)
        if record is not None and record["commands"]:
            record["commands"][-1]["started_tls"] = True

    def authenticated(self, session):
        """The session's last AUTH succeeded: replay lets only that one
        authenticate (an earlier one may have failed)."""
        record = self._open.get(session.id)
        for entry in reversed(record["commands"] if record is not None else ()):
            if isinstance(entry["line"], str) and entry["line"].startswith("AUTH "):
                entry["authenticated"] = True
                return

    def message(self, session, code, queue_id=None):
        """DATA's outcome after the dot: the last command is that DATA (no
        command is read before the dot's reply)."""
        record = self._open.get(session.id)
        if record is not None and record["commands"]:
            record["commands"][-1]["message"] = {"code": code, "queue_id": queue_id}

    def ended(self, session, end, duration, accepted):
        record = self._open.pop(session.id, None)
        if record is None:
            return
        for entry in record["commands"]:
            if isinstance(entry["line"], bytes):  # not evaluated: QUIT, a syntax error...
                entry["line"] = command_text(entry["line"])
        record.update(end=end, helo=session.him or None, tls=session.cipher or "none",
                      auth_user=session.user, duration=round(duration, 3),
                      accepted=accepted, refused=session.refusals)
        self._write(record)

    # -- writing ---------------------------------------------------------------

    @staticmethod
    def _evaluation(line, looked, trace):
        entry = {} if line is None else {"line": line}
        entry["facts"] = encode_facts(looked)
        entry["checks"] = [[name, verdict(d)] for name, d in trace]
        if trace:
            entry["decision"] = decided(trace)
        return entry

    def _write(self, record):
        try:
            data = (json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":"))
                    + "\n").encode("utf-8", "replace")
            try:
                moved = os.stat(self.path).st_ino != self._ino
            except FileNotFoundError:
                moved = True
            if moved:  # logrotate: write at the path again
                self._reopen()
            os.write(self._fd, data)
        except Exception as e:
            if not self._failing:
                self._failing = True
                log.error("decision log {path}: {err}; sessions go on unrecorded until "
                          "it can be written", path=self.path,
                          err=getattr(e, "strerror", None) or e, event="smtpd.decision_log")
            return
        self._failing = False


def attach(factory, path, clock):
    """Keep the decision log ``path`` for ``factory`` (None: off)."""
    if path:
        factory.decisions = DecisionLog(path, clock)
    return factory.decisions
