"""``upas-policy replay``: recorded sessions run again through a changed policy.

    upas-policy replay [--conf new.conf] [--root DIR] [smtpd flags] [--json]
                       decisions.jsonl

Reads a decision log (``--decision-log``, ``decisionlog``) and runs each
session again, command by command, through the policy tables
(``simulate.run_session``) with the settings the flags give, as ``twistd
upas-smtpd`` would build them.  The facts come from the log: what the
server looked up for that command, never a guess; a fact the new policy
asks for that was not recorded (turning on ``-r`` asks for the sender's
domain) makes the transaction undecidable, named.  The policy's data (the
ratify lists of ``<lib>/blocked``, ``names.blocked``, ``ournets``...) come
from the new configuration.  Nothing is written: no greylist, counter or
grant, no DNS query, no validator run.

It prints the transactions (MAIL up to DATA; before MAIL, the session)
that would now be decided differently, and how, then a count by change;
``--json`` gives the same for machines.  Exit status: 0 nothing changes,
1 something changes or cannot be decided, 2 an error (options, a
configuration or log that cannot be read).

Not replayed: the AUTH exchanges themselves (the AUTH the log marks
``authenticated`` authenticates the recorded ``auth_user``), and the refusals counted
outside the tables (failed AUTHs, a message refused after its dot), which
feed the tarpit's count in the server.
"""

import collections
import datetime
import json
import os
import sys

from twisted.python import usage

from .. import conf as smtpdconf
from ..rules import decisionlog, policy, ratify, simulate
from .. import grammar
from ..smtpd import spam, validators
from .options import SmtpdOptions

EXIT_SAME, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2
# the facts replay takes from the new configuration, never from the log
POLICY_DATA = decisionlog.POLICY_DATA | {"nospamfiltering"}


class Options(SmtpdOptions):
    synopsis = ("upas-policy replay [--conf new.conf] [--root DIR] [smtpd flags] [--json] "
                "decisions.jsonl")
    longdesc = ("Run the sessions of a decision log (upas-smtpd --decision-log) again "
                "through the policy these flags and files give, and print the "
                "transactions that would now be decided differently.")
    optFlags = [["json", None, "print JSON instead of a table"]]

    def parseArgs(self, path):
        self["log"] = path


class PolicyData:
    """The policy's own data, from the new configuration (read once), and
    the users' opt-outs of spam filtering (``box/<user>/nospamfiltering``:
    data of the policy too, read only)."""

    def __init__(self, settings):
        self.settings = settings
        self.ratify = _read(settings.path("blocked"), ratify.parse, ratify.EMPTY)
        self.names_blocked = _read(os.path.join(settings.path("lib"), "names.blocked"),
                                   validators.parse_names_blocked, frozenset())

    def get(self, name, session):
        if name == "nospamfiltering":
            # the server's own test; it needs nothing of the filter but settings
            return spam.SpamFilter.opted_out(self, session.envelope.recipients, session.ours)
        return getattr(self, name)


def _read(path, parse, empty):
    if not os.path.exists(path):
        return empty
    return parse(smtpdconf.read_text(path), path)


# -- one session -------------------------------------------------------------


# ``mail``: the MAIL entry of the transaction, None for the session's part
Change = collections.namedtuple("Change", "record mail entry old new step")
Undecided = collections.namedtuple("Undecided", "record mail entry missing")


def replayed_lines(record):
    """The recorded command entries run again, in order: a STARTTLS only
    when it brought TLS up (the log marks it ``started_tls``; a log without
    the mark, every STARTTLS of a session where TLS came up)."""
    commands = record.get("commands", ())
    if any(entry.get("started_tls") for entry in commands):
        return [entry for entry in commands
                if grammar_verb(entry["line"]) != "STARTTLS" or entry.get("started_tls")]
    tls_came_up = record.get("tls", "none") != "none" and not record.get("encrypted")
    return [entry for entry in commands
            if grammar_verb(entry["line"]) != "STARTTLS" or tls_came_up]


def grammar_verb(line):
    words = line.split(None, 1)
    return words[0].upper() if words else ""


def replay_session(settings, record, data):
    """Run one recorded session: fires with [(entry, Step)], the connection
    first (the steps the run reached)."""
    entries = [record["connect"]] + replayed_lines(record)

    def gather(name, arg, session, index):
        if name in POLICY_DATA:
            return data.get(name, session)
        facts = entries[index].get("facts", {})
        if name not in facts:
            raise simulate.Undecidable(name, arg)
        return decisionlog.decode_fact(name, facts[name])

    connect_facts = entries[0].get("facts", {})
    d = simulate.run_session(
        settings, record["peer"], record.get("local") or "0.0.0.0",
        [e["line"] for e in entries[1:]], gather, encrypted=bool(record.get("encrypted")),
        authenticated=_authenticated(record, entries),
        connect_facts={k: connect_facts[k] for k in ("closing", "connections",
                                                     "connection_cap") if k in connect_facts})
    return d.addCallback(lambda result: list(zip(entries, result[1])))


# the AUTH table's last check: the exchange ran (and its outcome is known)
EXCHANGE = policy.AUTH[-1].__name__


def _authenticated(record, entries):
    """Who the AUTH at each index authenticated: the log marks the one that
    succeeded; in a log without the mark, every AUTH of a session that
    ended authenticated.  An AUTH the recorded policy refused never had its
    password checked: its outcome is undecidable."""
    user = record.get("auth_user")
    marked = any(e.get("authenticated") for e in entries)

    def who(index):
        entry = entries[index]
        if (entry.get("decision") or {}).get("check") != EXCHANGE:
            raise simulate.Undecidable("authenticated")
        return user if not marked or entry.get("authenticated") else None
    return who


def _now(d):
    """The result of a Deferred that has fired (replay's facts are all at hand)."""
    box = []
    d.addBoth(box.append)
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def _old(entry):
    decided = entry.get("decision")
    return None if decided is None else (decided["code"], decided["check"])


def _new(step):
    return None if step.decision is None else (step.code, step.check)


def _reason(decided):
    return decided.get("reason") if decided else None


def transactions(pairs):
    """Group (entry, step) pairs: the session's part before MAIL (None), then
    each transaction from its MAIL (the MAIL entry) to DATA, RSET or HELO."""
    groups = [(None, [])]
    current = None
    for entry, step in pairs:
        verb = grammar_verb(entry["line"])
        if verb == "MAIL":
            current = entry
            groups.append((entry, []))
        elif verb in ("RSET", "HELO", "EHLO", "STARTTLS", "QUIT"):
            current = None
            groups[0][1].append((entry, step))
            continue
        (groups[-1] if current is not None else groups[0])[1].append((entry, step))
        if verb == "DATA" and step.decision is not None and step.decision.ok:
            current = None
    return groups


def compare(record, pairs):
    """The changes and the undecidable step of one replayed session.

    Within a transaction a refusal for the order of commands (reason
    ``sequence``) after a change is its consequence, not reported: a MAIL
    now refused makes its RCPTs 503s.
    """
    changes, undecided = [], []
    for mail, group in transactions(pairs):
        changed = False
        for entry, step in group:
            if step.missing is not None:
                undecided.append(Undecided(record, mail, entry, step.missing))
                break
            old, new = _old(entry), _new(step)
            if old is None or new is None or old == new:
                continue
            sequence = "sequence" in (_reason(entry.get("decision")),
                                      getattr(step.decision, "reason", None))
            if changed and sequence:
                continue
            changed = True
            changes.append(Change(record, mail, entry, old, new, step))
    return changes, undecided


# -- the report ----------------------------------------------------------------


def _path(line):
    try:
        return grammar.parse(line.encode("utf-8")).path
    except (grammar.CommandSyntaxError, UnicodeError):
        return None


def _when(t):
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _what(entry):
    line = entry["line"]
    return (_path(line) or line) if grammar_verb(line) == "RCPT" else line


def _row(x):
    rec = x.record
    return {"session": rec.get("session"), "time": _when(rec.get("time")),
            "peer": rec.get("peer"), "sender": _path(x.mail["line"]) if x.mail else None,
            "command": _what(x.entry)}


def change_row(c):
    return dict(_row(c),
                old={"code": c.old[0], "check": c.old[1],
                     "reply": (c.entry.get("decision") or {}).get("reply")},
                new={"code": c.new[0], "check": c.new[1], "reply": " ".join(c.step.lines)})


def undecided_row(u):
    return dict(_row(u), missing=u.missing)


def change_key(row):
    return "%s → %s (%s)" % (row["old"]["code"], row["new"]["code"], row["new"]["check"])


def report(sessions, changes, undecided):
    rows = [change_row(c) for c in changes]
    return {"sessions": sessions, "changes": rows,
            "summary": dict(collections.Counter(change_key(r) for r in rows).most_common()),
            "undecidable": [undecided_row(u) for u in undecided]}


def print_text(result, out):
    columns = ("session", "time", "peer", "sender", "command")
    if result["changes"]:
        table = [[r[c] or "" for c in columns]
                 + ["%s (%s) → %s (%s)" % (r["old"]["code"], r["old"]["check"],
                                           r["new"]["code"], r["new"]["check"])]
                 for r in result["changes"]]
        head = ["SESSION", "TIME", "PEER", "SENDER", "RECIPIENT/COMMAND", "OLD → NEW"]
        widths = [max(len(str(row[i])) for row in table + [head]) for i in range(len(head) - 1)]
        for row in [head] + table:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[-1],
                  file=out)
        print(file=out)
    for u in result["undecidable"]:
        print("undecidable: session %s %s %s %s %s: needs %s, which was not recorded" % (
            u["session"], u["time"], u["peer"], u["sender"] or "-", u["command"],
            u["missing"]), file=out)
    if result["undecidable"]:
        print(file=out)
    for key, n in result["summary"].items():
        print("%s: %d" % (key, n), file=out)
    print("%d sessions replayed: %d changed, %d undecidable" % (
        result["sessions"], len(result["changes"]), len(result["undecidable"])), file=out)


def read_log(path):
    """The log's records; ValueError naming a line that is not one."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["connect"], record["peer"]  # noqa: B018 (must be there)
            except (ValueError, KeyError, TypeError):
                raise ValueError("%s:%d: not a decision log line" % (path, n))
            records.append(record)
    return records


def replay(settings, records):
    """(number of sessions, [Change], [Undecided]) for these records."""
    data = PolicyData(settings)
    changes, undecided = [], []
    for record in records:
        c, u = compare(record, _now(replay_session(settings, record, data)))
        changes += c
        undecided += u
    return len(records), changes, undecided


def main(argv=None, out=None, err=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print("upas-policy replay: %s" % e, file=err)
        return EXIT_ERROR
    except SystemExit as e:  # --help; or a configuration the server would not start with
        if not isinstance(e.code, str):
            return e.code or EXIT_SAME
        print(e.code.replace("upas-smtpd:", "upas-policy replay:", 1), file=err)
        return EXIT_ERROR
    try:
        records = read_log(options["log"])
        sessions, changes, undecided = replay(options["settings"], records)
    except (OSError, ValueError, smtpdconf.ConfigError) as e:
        print("upas-policy replay: %s" % (
            "%s: %s" % (e.filename, e.strerror) if isinstance(e, OSError) and e.strerror
            else e), file=err)
        return EXIT_ERROR
    result = report(sessions, changes, undecided)
    if options["json"]:
        json.dump(result, out, ensure_ascii=False, indent=1)
        out.write("\n")
    else:
        print_text(result, out)
    return EXIT_CHANGED if changes or undecided else EXIT_SAME


if __name__ == "__main__":
    sys.exit(main())
