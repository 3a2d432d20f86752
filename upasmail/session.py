"""Per-connection (Session) and per-transaction (Envelope) state.

upas keeps these as process globals because it runs one process per
connection; here they are plain objects owned by one protocol instance.
RSET, HELO/EHLO and the end of DATA replace the Envelope; the Session
lives as long as the connection.

Both have ``__slots__``: a Session lives as long as its connection, and
10,000 idle connections each keep one Session and one Envelope.
"""

from dataclasses import dataclass, field
from typing import List, Optional


# The connection's phase: one value, not a set of booleans (OpenSMTPD's
# smtp_enter_state), changed only by the protocol's ``_enter``.  COMMAND, DATA
# and AUTH are Twisted's mode names (``twisted.mail.smtp``).
#
#   ADMITTING   the store decides on the connection; nothing is read
#   COMMAND     commands are read (one at a time: see ``_busy``)
#   DATA        a message is read, up to its dot
#   AUTH        an AUTH exchange awaits the client's next response
#   CLOSING     the last reply is written; the connection is closing
#   GONE        the connection is lost (from any phase)
#
# A reply pending (``_busy``) is not a phase: the 354 or 334 that moves
# the dialogue to DATA or AUTH goes out while it is pending, and a reply
# may still be pending once the connection is closing or gone (stdio's
# shutdown waits for a message's fsync behind a closed connection).
ADMITTING, CLOSING, GONE = "ADMITTING", "CLOSING", "GONE"
COMMAND, DATA, AUTH = "COMMAND", "DATA", "AUTH"


@dataclass(slots=True)
class Envelope:
    senders: List[str] = field(default_factory=list)
    recipients: List[str] = field(default_factory=list)
    factories: List[object] = field(default_factory=list)
    message: Optional[object] = None  # the IMessage shared by all recipients
    filterstate: str = "accept"  # upas filterstate, set at MAIL (ratify)
    action: str = "deliver"  # at DATA: deliver, block or delay (dump it)
    smtputf8: bool = False  # MAIL said SMTPUTF8
    bare_sender: bool = False  # MAIL gave a name without a domain (qualified with HELO)
    mail_from: str = ""  # the first MAIL path as sent, without <>: for the log
    rcpt_paths: List[str] = field(default_factory=list)  # the RCPT paths as sent, for the log

    @property
    def sender(self):
        """The first sender: the ``From `` line (upas)."""
        return self.senders[0] if self.senders else None

    @property
    def last_sender(self):
        """The last sender: the added From: header (upas)."""
        return self.senders[-1] if self.senders else None


@dataclass(slots=True)
class Session:
    rsys: str  # peer IP as text
    lsys: str  # our IP as text
    id: str = ""  # the session id every log line of the connection names
    him: str = ""  # HELO argument as upas keeps it; "" before HELO
    extended: bool = False
    trusted: bool = False
    authenticated: bool = False
    rejects: int = 0
    hisaction: str = "accept"  # ratify action for the peer IP, at connect
    hardreject: bool = False  # after a dial refusal: refuse every command
    auth_required: bool = False  # -a, or -E after a HELO lie
    user: Optional[str] = None  # the authenticated user, printable
    encrypted: bool = False  # STARTTLS done, or an implicit-TLS listener
    tls: Optional[str] = None  # the TLS summary for Received:, once known
    cipher: Optional[str] = None  # "<version>/<cipher>" once TLS is up, for the log
    refusals: int = 0  # every 4xx/5xx reply, for the disconnect line
    bytes_in: int = 0  # what the client has sent, in bytes
    refused_domains: frozenset = frozenset()  # -r: NXDOMAIN senders (a set is 216 B)
    envelope: Envelope = field(default_factory=Envelope)
    ours: Optional[object] = None  # our names and addresses (policy.new_session)

    def reset(self):
        self.envelope = Envelope()

    def forget_client(self, require_auth):
        """After STARTTLS (RFC 3207 4.2): nothing the client said before counts.

        What we learnt ourselves (peer trust, ratify action, reject count,
        hard reject) stays.
        """
        self.him = ""
        self.extended = False
        self.authenticated = False
        self.user = None
        self.auth_required = require_auth
        self.reset()


@dataclass(frozen=True)
class Transaction:
    """What a delivery back end needs to store one accepted message."""

    sender: str
    recipients: tuple  # bang paths in RCPT order
    local: tuple  # user names for local mailboxes
    remote: tuple  # bang paths for the outbound queue
    peer: str
    helo: str
    session: str = ""  # ids for log lines (logs.SessionLogger)
    queue_id: str = ""
    message_id: Optional[str] = None
    smtputf8: bool = False  # MAIL said SMTPUTF8: the queue needs it for a UTF-8 header


class Recipient:
    """The ``user`` handed to ``IMessageDelivery.validateTo``.

    Carries the bang path (``path``), the address Twisted-style
    (``dest``, ``orig``) and the protocol, as ``twisted.mail.smtp.User``.
    """

    def __init__(self, path, protocol, helo, orig):
        self.path = path
        self.dest = path
        self.protocol = protocol
        self.helo = helo
        self.orig = orig

    def __str__(self):
        return self.path
