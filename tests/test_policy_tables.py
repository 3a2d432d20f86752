"""The policy tables themselves (issue 16), without any server.

* The TABLE-ORDER test: each table runs upas's checks in the spec's order
  (upas-behaviour.md §1.7-§1.12), quoted here step by step; the checks that
  are ours, not upas's, are named as such and may sit between them.
* Pure-table unit tests of a few checks.
* ``policy.FACTS`` names every fact a check asks for, and nothing else.
"""

import pytest

from upasmail import dnscheck, grammar, policy, ratify, replies, testing
from upasmail.decision import ACCEPT, reject
from upasmail.session import Session

# (spec step, check name): the spec's order, quoted from its text
SPEC_ORDER = {
    "connect": [
        ("§1.16: before the greeting, if the peer IP matches any -k entry, "
         "smtpd exits at once", "banned"),
        ("§1.13: trusted: /mail/ratify/trusted/<rsys>; the IP action at connect "
         "time", "peer_trust"),
        ("§1.6: 220 <dom> ESMTP right after the connect checks", "greet"),
    ],
    "helo": [
        ("§1.7 2. rejectcheck() (§1.12). If it rejects, stop here.", "rejectcheck"),
        ("§1.7 3. If not trusted, run the checks: heloclaims() ... Unless -e, "
         "ckhello()", "helo_lie"),
        ("§1.7 6. Reply: HELO: 250 <dom> you are <him>", "hello"),
    ],
    "mail": [
        ("§1.8 1. rejectcheck.", "rejectcheck"),
        ("§1.8 2. If authenticate && !authenticated: ... 530 5.7.0 Authentication "
         "required", "auth_required"),
        ("§1.8 3. If no HELO yet: ... 503 Start by saying HELO, please.", "helo_given_mail"),
        ("§1.8 6. filterstate = blocked(path) (§1.13)", "filterstate"),
        ("§1.15: when the state was ACCEPT, -r was set and the sender was not "
         "/dev/null, smtpd called rmtdns", "sender_domain"),
        ("§1.8 8. Reply 250 2.0.0 sender is <path>.", "sender_ok"),
    ],
    "rcpt": [
        ("§1.9 1. rejectcheck.", "rejectcheck"),
        ("§1.9 2. No HELO: ... 503 Start by saying HELO, please", "helo_given_rcpt"),
        ("§1.9 4. recipok(path) ... fails when: the path contains CR or LF", "shellchars"),
        ("§1.9 4. ... or /mail/lib/validateaddress is executable and ... exits with "
         "a non-empty status", "validateaddress"),
        ("§1.9 4. ... or /mail/lib/names.blocked has a line whose first token ... "
         "equals the whole path", "names_blocked"),
        ("§1.9 5. senderok(path): /mail/lib/senders", "senders"),
        ("§1.9 6. Relay check, done only when filterstate == ACCEPT && fflag && "
         "!authenticated", "relaying"),
        ("§1.9 7. Append to the recipient list ... Reply 250 2.0.0 receiver is "
         "<path>", "receiver_ok"),
    ],
    "data": [
        ("§1.10.1 1. rejectcheck.", "rejectcheck"),
        ("§1.10.1 2. No sender: ... 503 2.5.2 Data without MAIL FROM:", "sender_given"),
        ("§1.10.1 3. No recipient: ... 503 2.5.2 Data without RCPT TO:", "recipient_given"),
        ("§1.10.1 4. If not trusted, sendermxcheck(): If the first sender is "
         "/dev/null and there is more than one recipient", "null_to_many"),
        ("§1.10.1 4. ... Run /mail/lib/validatesender", "validatesender"),
        ("§1.10.1 5. startcmd() dispatches on filterstate, after the opt-out rule",
         "filter_action"),
        ("§1.10.1 5. ACCEPT, TRUSTED: If -g: greylist (§1.10.2)", "greylisting"),
        ("§1.10.1 5. Then start <mailer> ... If a process cannot be started: 450 "
         "4.3.2", "mailer_ready"),
        ("§1.10.1 6. Reply 354 Input message; end with <CRLF>.<CRLF>", "go_ahead"),
    ],
    "auth": [
        ("§1.11.1: rejectcheck.", "rejectcheck"),
        ("§1.11.1: Already authenticated: ... 503 5.5.2 Bad sequence of commands",
         "not_authenticated"),
        ("§1.11.1 PLAIN: Needs passwordinclear, else ... 538 5.7.1 Encryption "
         "required", "encryption"),
        ("§1.11.1: Any other mechanism: ... 501 5.5.1 Unrecognised authentication "
         "type <mech>", "mechanism"),
        ("§1.11.1: Success (any mechanism)", "exchange"),
    ],
}

# the checks that are ours, not upas's (docs/deviations.rst says why)
OURS = {
    "connect": {"shutting_down", "process_limit", "connection_rate", "connection_limits"},
    "helo": set(),
    "mail": {"sender_length", "not_nested", "declared_size", "smtputf8_sender",
             "message_rate", "validate_from"},
    "rcpt": {"recipient_length", "mail_given", "recipient_limit", "smtputf8_recipient",
             "recipient_rate", "validate_to"},
    "data": set(),
    "auth": {"auth_available", "helo_given_auth", "no_transaction"},
}


def names(table):
    return [check.__name__ for check in table]


@pytest.mark.parametrize("phase", sorted(policy.TABLES))
def test_table_order_is_the_spec_order(phase):
    table = names(policy.TABLES[phase])
    spec = [name for _, name in SPEC_ORDER[phase]]
    positions = [table.index(name) for name in spec]
    assert positions == sorted(positions), "%s: %s not in the spec's order" % (phase, table)
    assert set(table) - set(spec) == OURS[phase], "an unclassified check in %s" % phase


def test_every_checked_command_starts_with_rejectcheck():
    """§1.12: every HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, HELP, VRFY/EXPN
    and AUTH first calls rejectcheck (QUIT and STARTTLS do not)."""
    for verb, table in policy.BY_VERB.items():
        assert table[0] is policy.rejectcheck, verb
    assert "QUIT" not in policy.BY_VERB and "STARTTLS" not in policy.BY_VERB


def test_the_order_test_can_fail():
    """Swapping two spec-ordered checks is caught."""
    rcpt = list(names(policy.RCPT))
    i, j = rcpt.index("senders"), rcpt.index("names_blocked")
    rcpt[i], rcpt[j] = rcpt[j], rcpt[i]
    positions = [rcpt.index(name) for _, name in SPEC_ORDER["rcpt"]]
    assert positions != sorted(positions)


# -- pure checks ---------------------------------------------------------------

SETTINGS = testing.make_settings("ourdomains example.com\n", root="/nonexistent")


def session(**kw):
    s = Session(rsys="192.0.2.1", lsys="127.0.0.1", him="mx.sender.net")
    s.ours = SETTINGS.ours.with_local_ip("127.0.0.1")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def command(line):
    return grammar.parse(line.encode())


def test_helo_lie_asks_dns_only_when_the_name_could_be_true():
    s = session(him="")
    with pytest.raises(policy.Missing) as e:
        policy.helo_lie(s, command("HELO mx.sender.net"), SETTINGS, policy.Facts())
    assert (e.value.name, e.value.arg) == ("helo_dns", "mx.sender.net")
    # a reserved name is a lie without DNS
    d = policy.helo_lie(s, command("HELO host.test"), SETTINGS, policy.Facts())
    assert (d.code, d.lines, d.hangup) == (554, (replies.LIAR,), True)
    # NXDOMAIN: then the PTR decides
    looked = policy.Facts(helo_dns=dnscheck.NXDOMAIN, peer_ptr=["mx.sender.net"])
    assert policy.helo_lie(s, command("HELO mx.sender.net"), SETTINGS, looked).ok


def test_relaying_is_checked_only_in_state_accept():
    cmd = command("RCPT TO:<x@foreign.example>")
    assert not policy.relaying(session(), cmd, SETTINGS, policy.Facts()).ok
    s = session()
    s.envelope.filterstate = "dial"  # refused at DATA anyway
    assert policy.relaying(s, cmd, SETTINGS, policy.Facts()).ok
    assert policy.relaying(session(authenticated=True), cmd, SETTINGS, policy.Facts()).ok


def test_rejectcheck_too_many_then_dialup():
    facts = policy.Facts()
    cmd = command("NOOP")
    assert policy.rejectcheck(session(rejects=100), cmd, SETTINGS, facts) is ACCEPT
    d = policy.rejectcheck(session(rejects=101, hardreject=True), cmd, SETTINGS, facts)
    assert (d.code, d.hangup) == (554, True)
    d = policy.rejectcheck(session(hardreject=True), cmd, SETTINGS, facts)
    assert (d.code, d.lines, d.counts) == (554, (replies.DIALUP,), True)


def test_filter_action_opt_out_cancels_only_the_spam_states():
    s = session()
    s.envelope.senders = ["sender.net!a"]
    s.envelope.filterstate = "deny"
    assert policy.filter_action(s, command("DATA"), SETTINGS,
                                policy.Facts(nospamfiltering=True)) is ACCEPT
    d = policy.filter_action(s, command("DATA"), SETTINGS, policy.Facts(nospamfiltering=False))
    assert d.code == 554
    s.envelope.filterstate = ratify.TRUSTED  # the opt-out is not even asked
    assert policy.filter_action(s, command("DATA"), SETTINGS, policy.Facts()) is ACCEPT


def test_run_stops_at_the_first_refusal_and_keeps_earlier_effects():
    s = session()
    s.envelope.senders = ["sender.net!a"]
    s.envelope.recipients = ["bob"]
    s.envelope.filterstate = "block"
    trace = []
    looked = policy.Facts(validatesender=ACCEPT, nospamfiltering=False,
                          mailer_ready=reject(450, replies.BUSY))
    out = policy.run(policy.DATA, s, command("DATA"), SETTINGS, looked, trace=trace)
    # a blocked message is dumped: the mailer is not asked, 354
    assert (out.check, out.decision.code, out.decision.action) == ("go_ahead", 354, "block")
    assert [d.action for d in out.effects] == ["block"]
    assert "greylisting" in [name for name, _ in trace]


# -- FACTS names every fact a check asks for ------------------------------------

# a value per fact that lets a check run on (to the next fact it may ask for)
SAMPLES = {
    "closing": False, "connections": 0, "connection_cap": None, "granted": False,
    "connection_slot": None, "ratify": ratify.EMPTY, "helo_dns": dnscheck.NXDOMAIN,
    "peer_ptr": [], "sender_domain": dnscheck.EXISTS, "validate_from": ACCEPT,
    "validateaddress": "ok", "names_blocked": frozenset(), "senders": "ok",
    "validate_to": ACCEPT, "validatesender": ACCEPT, "nospamfiltering": False,
    "greylist": (False, [("bob", "new")]), "mailer_ready": ACCEPT,
    "auth_mechanisms": (True, ["CRAM-MD5"]),
    "connection_rate": 1, "message_rate": 1, "recipient_rate": 1,
}
COMMANDS = {"connect": "CONNECT 192.0.2.1", "helo": "HELO mx.sender.net",
            "mail": "MAIL FROM:<a@sender.net>", "rcpt": "RCPT TO:<bob>", "data": "DATA",
            "auth": "AUTH CRAM-MD5"}


def _command(phase):
    if phase == "connect":
        return grammar.Command("CONNECT", "192.0.2.1")
    return command(COMMANDS[phase])


def asked(check, s, cmd, conf):
    """The facts ``check`` asks for, starting from an empty Facts and
    giving each the sample value, until it decides."""
    looked, names = policy.Facts(), []
    while True:
        try:
            check(s, cmd, conf, looked)
            return names
        except policy.Missing as m:
            assert m.name not in names, "asked twice for %s" % m.name
            names.append(m.name)
            looked[m.name] = SAMPLES[m.name]


def test_facts_names_every_fact_a_check_asks_for():
    conf = testing.make_settings("", root="/nonexistent", verify_sender=True, greylist=True,
                                 conn_rate=1, msg_rate=1, rcpt_rate=1)
    seen = set()
    for state in ("accept", "block", "deny"):
        for phase, table in policy.TABLES.items():
            s = session(him="")  # untrusted, no HELO yet: every check runs
            s.envelope.senders = ["sender.net!a"]
            s.envelope.recipients = ["bob"]
            s.envelope.filterstate = state
            for check in table:
                seen.update(asked(check, s, _command(phase), conf))
    assert seen == set(policy.FACTS)
