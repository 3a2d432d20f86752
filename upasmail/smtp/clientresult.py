"""What a delivery attempt of the client came to, and what it was asked to do.

``ClientOptions`` (upas-smtp's flags), ``Result`` with one
``RecipientResult`` per recipient, and ``Outcome``: delivered, retry or
give up, with upas's status text and the exit code.  Plain data, used by
the conversation (``conversation``), ``client.deliver``, the queue and
``upas-smtp``.
"""

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Callable, List, Optional


from . import convert
from .. import replies

# upas smtp's statuses, documented API (docs/embedding.rst)
RETRY, PERMANENT = replies.RETRY, replies.PERMANENT
EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 64, 69, 75
DELIVERED, TEMPORARY, PERMANENT_FAILURE, ACCEPTED, NOT_SENT = (
    replies.DELIVERED, replies.TEMPORARY, replies.PERMANENT_FAILURE, replies.ACCEPTED,
    replies.NOT_SENT)


class Kind(enum.Enum):
    """How a delivery ended, as far as the caller must act on it."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give up"


_EXIT_CODES = {Kind.DELIVERED: EX_OK, Kind.RETRY: EX_TEMPFAIL, Kind.GIVE_UP: EX_UNAVAILABLE}


@dataclass(frozen=True)
class Outcome:
    """The end of one delivery: its kind decides, the texts are upas's.

    ``status`` is the line upas smtp exits with (``""``, ``RETRY``,
    ``PERMANENT``, or another text it gives up with, such as
    ``No supported AUTH method``); ``detail`` is why (upas's last stderr
    line, else the status).  The kind is set where the ending is known (a
    reply's class, a dial error's permanence), never read back from a text.
    """

    kind: Kind
    status: str = ""
    detail: str = ""

    @classmethod
    def delivered(cls):
        return cls(Kind.DELIVERED)

    @classmethod
    def retry(cls):
        return cls(Kind.RETRY, RETRY, RETRY)

    @classmethod
    def give_up(cls, status=PERMANENT):
        return cls(Kind.GIVE_UP, status, status)

    @classmethod
    def of_reply(cls, reply):
        """A reply that is not the one wanted: 5xx gives up, anything else retries."""
        return cls.give_up() if reply.kind == 5 else cls.retry()

    @classmethod
    def of_status(cls, status, detail=""):
        """The outcome of a status text from elsewhere (a Result built by hand,
        ``exit_code(status)``): only upas's own ``RETRY`` is worth a retry."""
        if not status:
            return cls(Kind.DELIVERED, "", detail)
        return cls(Kind.RETRY if status == RETRY else Kind.GIVE_UP, status, detail or status)

    def because(self, detail):
        """The same ending, with upas's last stderr line as its detail."""
        return dataclasses.replace(self, detail=detail or self.status)

    @property
    def exit_code(self):
        return _EXIT_CODES[self.kind]

    @property
    def recipient_status(self):
        """What a recipient without its own answer gets from this ending."""
        return {Kind.DELIVERED: DELIVERED, Kind.RETRY: TEMPORARY,
                Kind.GIVE_UP: PERMANENT_FAILURE}[self.kind]


def exit_code(status):
    """Unix exit code for a upas status string (0, 75, else 69)."""
    return Outcome.of_status(status).exit_code


@dataclass
class ClientOptions:
    """The seed's flags and what upas takes from the system.

    ``domain`` is our mail domain, ``example.org``: an undotted sysname or
    host ``gnot`` becomes ``gnot.example.org`` (EHLO, MAIL FROM, header
    addresses), and a bare recipient ``bob@example.org`` when DNS gave no
    destination domain.  upas's ``.example.org`` (the command line's form)
    means the same.  Any other value gets a dot prepended (``org``:
    ``gnot.org``), except the machine's FQDN, upas's default: a domain
    that starts with the sysname's first label and a dot
    (``gnot.example.org``) counts from its first dot, as in upas.  upas's
    ``domainify`` itself would make ``example.org`` into ``gnot.org``.
    """

    sysname: str
    host: Optional[str] = None  # -h: names addresses; default sysname
    domain: str = ""  # our mail domain; see the class docstring
    starttls: bool = False  # -s
    implicit_tls: bool = False  # -t
    auth: bool = False  # -a (implies -s)
    auth_in_clear: bool = False  # -i
    avoidant: bool = False  # -A: NOOP before the greeting
    ping: bool = False  # -p
    busted: tuple = ()  # -b MX hosts to skip
    gateway: Optional[str] = None  # -g dial string
    user: Optional[str] = None  # -u
    credentials: Optional[Callable] = None  # (server, user) -> (user, password)
    thumbprints: Optional[object] = None  # thumbprint.Thumbprints: pin TLS servers
    ipv6: bool = False  # also dial AAAA addresses
    ours: tuple = ()  # our own addresses: never a mail server
    debug: Optional[Callable] = None  # -d: gets one text line at a time
    full_name: Optional[Callable] = None  # user -> full name for an added From:
    connect_timeout: float = 10.0
    dns_timeout: float = 60.0
    tls_options: Optional[object] = None  # client TLS context factory

    @property
    def dotdomain(self):
        """``domain`` in upas's ``.example.org`` form, for ``convert.domainify``."""
        domain = self.domain
        me = self.sysname.split(".")[0].lower()
        if domain.lower().startswith(me + "."):  # our FQDN, upas's default
            domain = domain[len(me):]
        return domain if not domain or domain.startswith(".") else "." + domain

    @property
    def maildomain(self):
        """What a bare recipient gets without a destination domain from DNS."""
        return self.dotdomain[1:] or self.hostdomain

    @property
    def hostdomain(self):
        return convert.domainify(self.host or self.sysname, self.dotdomain)

    @property
    def hellodomain(self):
        return convert.domainify(self.sysname, self.dotdomain)

    @property
    def unit(self):
        return 10.0 if self.ping else 60.0

    @property
    def try_tls(self):
        return self.starttls or self.auth


@dataclass
class RecipientResult:
    address: str  # as given
    rcpt: str = ""  # as sent in RCPT TO
    status: str = NOT_SENT
    reply: str = ""


@dataclass
class Result:
    status: str
    recipients: List[RecipientResult]
    report: List[str] = field(default_factory=list)  # upas's stderr lines
    phase: str = ""
    target: Optional[object] = None
    outcome: Optional[Outcome] = None  # from the conversation; else from ``status``

    def __post_init__(self):
        if self.outcome is None:
            self.outcome = Outcome.of_status(self.status,
                                             self.report[-1] if self.report else "")
        elif self.outcome.status != self.status:
            raise ValueError("status %r is not the outcome's %r"
                             % (self.status, self.outcome.status))

    @property
    def exit_code(self):
        return self.outcome.exit_code
