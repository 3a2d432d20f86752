"""Decisions: what a policy check answers.

Every upas decision (may this peer relay, is this recipient ours, may DATA
start) is a plain function that returns one of these small immutable values.
The protocol applies them in one place (``server.UpasESMTP._apply``).

* ``Accept(value)``: go on; ``value`` carries a result such as a rewritten
  recipient path.  The check that ends a phase's table gives the reply
  (``code``, ``lines``).
* ``Reject(code, lines)``: a permanent (5xx) refusal.
* ``Defer(code, lines)``: a temporary (4xx) refusal: the client should retry.

Besides the reply a decision carries its effects, which only the protocol
applies:

``counts``        feed upas's reject counter (smtpd.c ``rejectcount``);
                  syntax errors do not, a ``block`` accept does
``hangup``        close the connection after the reply (``code`` 0: no reply)
``hardreject``    refuse every later checked command (a ``dial`` refusal)
``require_auth``  MAIL needs AUTH from now on (``-E`` after a HELO lie)
``delay``         tarpit units to wait before the reply (``-D``)
``action``        what DATA does with the message: deliver, block or delay
``filterstate``   the ratify state the transaction starts in (MAIL)
``prefix``        reply lines sent before the phase's reply (``-E``)
``note``          names the log line the decision calls for (server ``_NOTES``)

``reason`` (and ``detail``) name a refusal in the log (``smtpd.refused``: a
closed set, docs/logging.rst).
"""

from dataclasses import dataclass, field
from typing import Any, Tuple


@dataclass(frozen=True)
class Accept:
    value: Any = None
    code: int = field(default=0, compare=False)
    lines: Tuple[str, ...] = field(default=(), compare=False)
    counts: bool = field(default=False, compare=False)
    require_auth: bool = field(default=False, compare=False)
    delay: float = field(default=0, compare=False)
    action: Any = field(default=None, compare=False)
    filterstate: Any = field(default=None, compare=False)
    prefix: Tuple[str, ...] = field(default=(), compare=False)
    note: str = field(default="", compare=False)

    ok = True
    hangup = hardreject = False
    reason = detail = ""

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Reject:
    code: int
    lines: Tuple[str, ...]
    counts: bool = field(default=True, compare=False)
    hangup: bool = field(default=False, compare=False)
    reason: str = field(default="other", compare=False)
    detail: str = field(default="", compare=False)
    hardreject: bool = field(default=False, compare=False)
    delay: float = field(default=0, compare=False)
    note: str = field(default="", compare=False)

    ok = False
    value = action = filterstate = None
    require_auth = False
    prefix = ()

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def text(self) -> str:
        return "\n".join(self.lines)


class Defer(Reject):
    """A temporary refusal; same shape as Reject, with a 4xx code."""


def reject(code: int, *lines: str, counts: bool = True, hangup: bool = False,
           reason: str = "other", detail: str = "", hardreject: bool = False,
           delay: float = 0, note: str = "") -> Reject:
    cls = Defer if 400 <= code < 500 else Reject
    return cls(code, tuple(lines), counts, hangup, reason, detail, hardreject, delay, note)


ACCEPT = Accept()
