"""The reject counter and tarpit (upas smtpd.c ``rejectcheck``).

Spec upas-behaviour.md §1.12.  Refusals marked "counts" raise the
session's reject counter.  Before HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP,
HELP, VRFY/EXPN and AUTH:

1. with n > 0 rejections, wait 4·2^n units (upas: seconds; the unit is
   ``--tarpit-unit``, 0 in tests), at most ``maximum`` seconds (ours: upas
   has no cap, so its waits grow past any client's patience);
2. more than 100 rejections: ``554 5.5.0 too many errors.  transaction
   failed.`` and the connection is closed;
3. after a ``dial`` refusal (hard reject): every such command gets
   ``554 5.7.1 We don't accept mail from dial-up ports.`` and is not run.

The wait is done by the protocol with ``deferLater`` on its clock; these
functions only compute.
"""

from .. import replies
from ..decision import ACCEPT, reject

MAX_REJECTS = 100
CHECKED = frozenset(["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "HELP",
                     "VRFY", "EXPN", "AUTH"])
TOO_MANY = replies.TOO_MANY_ERRORS


def doubling(n, base, cap):
    """``base``·2^(n-1) for the n-th time, at most ``cap``; 0 before the first.

    The one growth rule for waits after failures: the tarpit here, AUTH
    failures (``auth.Throttle``) and queue retries (``queue.backoff``).
    """
    if n <= 0 or base <= 0:
        return 0.0
    # the power grows past any cap quickly; stop computing once it has
    return min(base * 2.0 ** min(n - 1, 64), cap)


def delay(rejects, unit, maximum):
    """Seconds to wait before running the next checked command: 4·2^n units."""
    if rejects <= 0:
        return 0.0
    return doubling(rejects + 3, unit, maximum)


def rejectcheck(rejects, hardreject):
    if rejects > MAX_REJECTS:
        return reject(554, TOO_MANY, counts=False, hangup=True, reason="tarpit",
                      note="tarpit")
    if hardreject:
        return reject(554, replies.DIALUP, reason="ratify", detail="dialup")
    return ACCEPT
