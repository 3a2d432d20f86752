"""The log lines the policy's decisions call for, in upas's words.

A check that decides something upas logs says so in its decision
(``Decision.note``: a name from ``NOTES``); the protocol writes the line
when it applies the decision, with the session's logger.  Each function
takes the protocol (for its session and logger), the decision, the
command and the facts looked up.
"""

from ..rules import greylist, policy, ratify


def _disallowed(p, d, cmd, looked):
    s = p.session
    p.log.info("Disallowed {sender} ({him}/{rsys}) to blocked name {rcpt}",
               sender=s.envelope.sender, him=s.him, rsys=s.rsys, rcpt=cmd.arg,
               event="smtpd.ratify", verb="blocked-name", peer=s.rsys, helo=s.him)


def _validate_refused(why, text):
    def note(p, d, cmd, looked):
        p.log.info(text, rcpt=cmd.arg, event="smtpd.validate", why=why)
        _disallowed(p, d, cmd, looked)
    return note


def _tarpit(p, d, cmd, looked):
    s = p.session
    p.log.info("Rejected ({him}/{rsys})", him=s.him, rsys=s.rsys, event="smtpd.tarpit",
               peer=s.rsys, helo=s.him)


def _helo_hangup(p, d, cmd, looked):
    s = p.session
    if not p.settings.quiet:
        p.log.info("Hung up on {rsys}; claimed to be {him}", rsys=s.rsys, him=cmd.arg,
                   event="smtpd.helo.hangup", peer=s.rsys, helo=cmd.arg)


def _ptr_only(p, d, cmd, looked):
    s = p.session
    p.log.info("ptr only from {rsys} as {him}", rsys=s.rsys, him=cmd.arg,
               event="smtpd.helo.ptr_only", peer=s.rsys, helo=cmd.arg)


def _blocked_ip(p, d, cmd, looked):
    s = p.session
    p.log.info("Disallowed sending IP of {sender} ({him}/{rsys}) to {rcpt}",
               sender=s.envelope.sender, him=s.him, rsys=s.rsys, rcpt=cmd.arg,
               event="smtpd.ratify", verb="blocked-ip", peer=s.rsys, helo=s.him)


def _bad_forward(p, d, cmd, looked):
    s = p.session
    p.log.info("Bad Forward {sender} ({him}/{rsys}) ({rcpt})", sender=s.envelope.sender,
               him=s.him, rsys=s.rsys, rcpt=cmd.arg, event="smtpd.ratify", verb="bad-forward",
               peer=s.rsys, helo=s.him)


def _sendercheck(p, d, cmd, looked):
    s = p.session
    env = s.envelope
    for rcpt in env.recipients:
        p.log.info("[{him}/{rsys}] {sender} -> {rcpt} sendercheck: {err}", him=s.him,
                   rsys=s.rsys, sender=env.sender, rcpt=rcpt, err=d.text()[6:],
                   event="smtpd.sendercheck", peer=s.rsys, helo=s.him)


# upas's words for the ratify states it logs at DATA, and smtpd.ratify's ``verb``
_RATIFY_WORD = {"dial": "Dialup", "deny": "Denied", "block": "Blocked", "delay": "Blocked",
                ratify.REFUSED: "Refused", ratify.TEMPFAIL: "Deferred"}
_RATIFY_VERB = {"block": "block", "dial": "dialup", "deny": "deny", ratify.REFUSED: "refuse",
                "delay": "delay", ratify.TEMPFAIL: "tempfail"}


def _ratify(p, d, cmd, looked):
    s = p.session
    env = s.envelope
    state = policy.data_state(s, looked)
    for rcpt in env.recipients:
        p.log.info("{what} {sender} ({him}/{rsys}) ({rcpt})", what=_RATIFY_WORD[state],
                   sender=env.last_sender, him=s.him, rsys=s.rsys, rcpt=rcpt,
                   event="smtpd.ratify", verb=_RATIFY_VERB[state], peer=s.rsys, helo=s.him)


def _greylist(p, d, cmd, looked):
    s = p.session
    _, outcomes = looked["greylist"]
    for rcpt, state in outcomes:
        p.log.info(greylist.OUTCOME_LINES[state], rsys=s.rsys, rcpt=rcpt,
                   event="smtpd.greylist", peer=s.rsys, state=state)
    if not d.ok:
        p.log.info("no recent call from {rsys} for a rcpt; rejecting with temporary failure",
                   rsys=s.rsys, event="smtpd.greylist", peer=s.rsys, rcpt=None, state="refused")


def _rate(p, d, cmd, looked):
    s, conf = p.session, p.settings
    limit = conf.msg_rate if d.detail == "message" else conf.rcpt_rate
    p.log.info("rate limit: {n} {kind}s from {rsys} in {window} seconds (limit {limit})",
               n=looked[d.detail + "_rate"], kind=d.detail, rsys=s.rsys,
               window=conf.rate_window, limit=limit, event="smtpd.rate", peer=s.rsys)


NOTES = {
    "tarpit": _tarpit,
    "helo.hangup": _helo_hangup,
    "helo.ptr_only": _ptr_only,
    "rcpt.shellchars": _validate_refused("shellchars", "shellchars in user name"),
    "rcpt.unknown": _disallowed,
    "rcpt.names_blocked": _validate_refused("names.blocked", "names.blocked blocks {rcpt}"),
    "rcpt.blocked_ip": _blocked_ip,
    "rcpt.bad_forward": _bad_forward,
    "data.sendercheck": _sendercheck,
    "data.ratify": _ratify,
    "data.greylist": _greylist,
    "rate": _rate,
}
