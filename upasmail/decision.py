"""Verdicts: what a policy check answers.

Every upas decision (may this peer relay, is this recipient ours, may DATA
start) is a plain function that returns one of these small immutable values.
The protocol maps them to replies in one place (``server.UpasESMTP.reply``).

* ``Accept(value)``: go on; ``value`` carries a result such as a rewritten
  recipient path.
* ``Reject(code, lines)``: a permanent (5xx) refusal.
* ``Defer(code, lines)``: a temporary (4xx) refusal: the client should retry.

``counts`` says whether the refusal feeds upas's reject counter (smtpd.c
``rejectcount``); syntax errors do not.  ``reason`` (and ``detail``) name
the refusal in the log (``smtpd.refused``: a closed set, docs/logging.rst).
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Tuple


@dataclass(frozen=True)
class Accept:
    value: Any = None

    ok = True


@dataclass(frozen=True)
class Reject:
    code: int
    lines: Tuple[str, ...]
    counts: bool = field(default=True, compare=False)
    hangup: bool = field(default=False, compare=False)
    reason: str = field(default="other", compare=False)
    detail: str = field(default="", compare=False)

    ok = False

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def text(self) -> str:
        return "\n".join(self.lines)


class Defer(Reject):
    """A temporary refusal; same shape as Reject, with a 4xx code."""


def reject(code: int, *lines: str, counts: bool = True, hangup: bool = False,
           reason: str = "other", detail: str = "") -> Reject:
    cls = Defer if 400 <= code < 500 else Reject
    return cls(code, tuple(lines), counts, hangup, reason, detail)


ACCEPT = Accept()


def evaluate(checks: Iterable[Callable[..., Any]], *args, **kwargs):
    """Run checks in order and return the first verdict that is not Accept.

    This is upas's "order of checks is the specification": each phase lists
    its checks as a tuple and the first refusal wins.
    """
    verdict = ACCEPT
    for check in checks:
        verdict = check(*args, **kwargs)
        if not verdict.ok:
            return verdict
    return verdict
