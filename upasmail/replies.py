"""Every reply smtpd sends, in one table.

Texts are upas [9F] smtpd's, copied verbatim (spec upas-behaviour.md §1.21),
including their odd spacing and the few replies that carry no enhanced status
code.  Replies that upas does not have (limits and RFC 5321 sequence rules we
enforce where upas does not) are marked "ours" and listed in
docs/deviations.rst.

The client's texts are here too: what it says in place of a server's reply
(a reply it could not read, a recipient it never sent) and the lines of its
failure report.  No other module spells a reply text
(tests/test_reply_table.py); a module that names one of these in its own
public API keeps an alias, ``X = replies.X``, never a second literal.
"""

import base64

from .decision import reject

# -- server/smtpd -------------------------------------------------------------

GREETING = "{dom} ESMTP"
HELO_OK = "{dom} you are {him}"
SYNTAX = "5.5.1 illegal command or bad syntax"
HELO_FIRST_MAIL = "Start by saying HELO, please."
HELO_FIRST_RCPT = "Start by saying HELO, please"
SENDER_OK = "2.0.0 sender is {path}"
RECEIVER_OK = "2.0.0 receiver is {path}"
NO_RELAY = "5.7.1 we don't relay.  send to your-path@[] for loopback."
USER_UNKNOWN = "5.1.1 {path} ... user unknown"
DATA_NO_MAIL = "2.5.2 Data without MAIL FROM:"
DATA_NO_RCPT = "2.5.2 Data without RCPT TO:"
NULL_MULTI = "rejected: /dev/null sending to multiple recipients"
BUSY = "4.3.2 We're busy right now, try later"
GO_AHEAD = "Input message; end with <CRLF>.<CRLF>"
SENT = "2.5.0 sent"
MAILER_FAILED = "4.0.0 mail process terminated abnormally"
RSET_OK = "2.0.0 ok"
NOOP_OK = "2.0.0 Nothing to see here. Move along ..."
HELP_OK = "2.0.0 See http://www.ietf.org/rfc/rfc2821"
QUIT_OK = "2.0.0 Successful termination"
AUTH_REQUIRED = "5.7.0 Authentication required"
TLS_GO_AHEAD = "2.0.0 Go ahead make my day"
TLS_NOT_AVAILABLE = "4.7.5 TLS not available"

# ours (not in upas); see docs/deviations.rst
NESTED_MAIL = "5.5.1 Error: nested MAIL command"
RCPT_NO_MAIL = "5.5.1 Error: need MAIL command"
TOO_MANY_RCPTS = "4.5.3 Error: too many recipients"
LINE_TOO_LONG = "5.5.2 Error: command line too long"
DATA_LINE_TOO_LONG = "5.3.4 Error: message line too long"
LOCAL_ERROR = "4.3.0 Error: local error in processing; try again later"
STORE_FAILED = "4.3.0 Error: message not stored; try again later"
TIMEOUT = "4.4.2 {dom} Error: timeout exceeded"
VRFY_CANNOT = "2.5.2 Cannot VRFY user; try RCPT to attempt delivery"
ALIAS_TOO_LARGE = "4.3.0 {path} ... alias expands to more than {n} addresses; try again later"
ALIASES_UNREADABLE = "4.3.0 {path} ... cannot read the aliases or users file; try again later"
BAD_USER = "5.1.3 {path} ... bad destination mailbox address"
TLS_ACTIVE = "5.5.1 Error: TLS already active"
MESSAGE_TOO_BIG = "5.3.4 Error: message file too big"
SIZE_EXCEEDED = "5.3.4 Error: message size exceeds the fixed limit"
NEED_SMTPUTF8 = "5.6.7 Error: a non-ASCII address needs SMTPUTF8"
SENDER_PATH_TOO_LONG = "5.1.7 Path too long"
RECIPIENT_PATH_TOO_LONG = "5.1.3 Path too long"
BARE_LINE_END = "5.5.2 Error: bare <CR> or <LF> in the message; send CRLF line ends"
TOO_MANY_CONNECTIONS = "4.3.2 {dom} Error: too many connections; try again later"
TOO_MANY_FROM_PEER = "4.7.0 {dom} Error: too many connections from {ip}"
TOO_MANY_HOPS = "5.4.6 Too many hops"
FORWARDING_LOOP = "5.4.6 mail forwarding loop for {addr}"
SHUTDOWN = "4.3.2 {dom} Error: service shutting down"
# the per-client rate limits (Postfix anvil's codes; upas has none), {window} in seconds
RATE_CONNECTIONS = "4.7.0 {dom}: too many connections from {ip} in {window:g} seconds; try later"
RATE_MESSAGES = "4.7.0 {dom}: too many messages from {ip} in {window:g} seconds; try later"
RATE_RECIPIENTS = "4.5.3 {dom}: too many recipients from {ip} in {window:g} seconds; try later"
# the shared anti-abuse state (the state store) cannot answer: 421 at connect,
# 451 for MAIL, RCPT and DATA; AUTH says AUTH_TEMPORARY (454, RFC 4954)
STATE_UNAVAILABLE = "4.3.0 {dom}: anti-abuse state temporarily unavailable; try later"
# MAIL parameters (ours: upas knows only AUTH=)
BAD_SIZE = "5.5.4 Bad SIZE= value"
BAD_BODY = "5.5.4 BODY= takes 7BIT or 8BITMIME"
SMTPUTF8_VALUE = "5.5.4 SMTPUTF8 takes no value"
AUTH_PARAM_EMPTY = "5.5.4 AUTH= needs a value"
UNSUPPORTED_PARAM = "5.5.4 Unsupported parameter {name}"
PARAM_TWICE = "5.5.4 Parameter given twice: {name}"

# -- the policy's refusals (policy.py) --------------------------------------------
DIALUP = "5.7.1 We don't accept mail from dial-up ports."
SPAM_WHY = "we believe this is spam."
DELAYED = "4.3.0 There will be a delay in delivery of this message."
NO_SUCH_DOMAIN = "5.7.1 Sender domain must exist: {sender}"
NO_SUCH_DOMAIN_MAIL = "5.1.8 Sender domain must exist: {sender}"
DOMAIN_TEMPFAIL = "4.4.3 Sender domain lookup failed; try again later: {sender}"
DENY_FROM = "5.7.1 We don't accept mail from {sender}."
DENY_CONTACT = "5.7.1 Contact postmaster@{dom} for more information."
FILTERSTATE_ERROR = (
    "5.7.0 We have had an internal mailer error classifying your message.",
    "5.7.0 Filterstate is {state}",
    "5.7.0 Contact postmaster@{dom} for more information.",
)
TOO_MANY_ERRORS = "5.5.0 too many errors.  transaction failed."
LIAR = "5.7.0 Liar!"
YOU_LIE = "you lie.  authentication required."

# -- AUTH (upas's texts) ---------------------------------------------------------
AUTH_OK = "2.0.0 Authentication successful"
AUTH_FAILED = "5.7.1 Authentication failed"
AUTH_BAD_SEQUENCE = "5.5.2 Bad sequence of commands"
AUTH_ENCRYPTION_REQUIRED = "5.7.1 Encryption required for requested authentication mechanism"
AUTH_CANNOT_DECODE = "5.5.4 Cannot decode base64"
AUTH_POOR_CRAM = "5.5.4 Poorly formed CRAM-MD5 response"
AUTH_UNRECOGNISED = "5.5.1 Unrecognised authentication type {mech}"
AUTH_TEMPORARY = "4.7.0 Temporary authentication failure"
# AUTH before HELO gets MAIL's text: HELO_FIRST_MAIL
# the 334 prompts: LOGIN's, and CRAM-MD5's challenge (sent base64-encoded)
AUTH_USERNAME_PROMPT = base64.b64encode(b"Username:").decode()  # VXNlcm5hbWU6
AUTH_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()  # UGFzc3dvcmQ6
AUTH_CRAM_CHALLENGE = b"<%d.%d@%s>"  # random, time, our name (RFC 2195)
# ours
AUTH_CANCELLED = "5.7.0 Authentication cancelled"
AUTH_POOR_PLAIN = "5.5.4 Poorly formed PLAIN response"
AUTH_NOT_AUTHORIZED = "5.7.1 Authentication failed: authorization identity must be the user"
AUTH_NO_INITIAL = "5.5.2 CRAM-MD5 takes no initial response"
AUTH_IN_TRANSACTION = "5.5.1 AUTH not permitted during a mail transaction"
AUTH_TOO_MANY = "4.7.0 {dom} Too many failed authentication attempts; closing connection"
AUTH_NOT_OFFERED = "5.5.1 Error: AUTH not available on this server"

# -- validators (validateaddress, validatesender, the senders file) ---------------
# USER_UNKNOWN (above) for validateaddress and names.blocked
NOT_ALLOWED = "5.7.1 {path} ... sending system not allowed"
CHECK_LATER = "4.3.0 {path} ... cannot check this address now; try again later"
# validatesender: its own words, behind 5.7.1 ("rejected: ...") or 4.7.0
SENDER_DEFERRED = "4.7.0 {text}"
VALIDATESENDER_NOT_STARTED = "deferred: fork: cannot start validatesender"
VALIDATESENDER_TIMED_OUT = "deferred: validatesender timed out"
DOMAINLESS_SENDER = "rejected: domainless sender {who}"
EVIL_SENDER = "rejected: evil sender/domain/helo"

# -- greylist ---------------------------------------------------------------------
TRY_AGAIN = "please try again soon from the same IP."

# -- delivery/store (the -m mailer, the message stream, the spam filter) -----------
# upas's refusals of a message or sender: the text behind 5.7.1
REFUSED = "5.7.1 {text}"
SPAM = REFUSED.format(text=SPAM_WHY)
# each line the mailer wrote on stderr, before MAILER_FAILED
MAILER_SAID = "4.0.0 {line}"
MAILER_TIMED_OUT = "mailer timed out"
ILLEGAL_HEADER_CHARS = "mail refused: illegal header chars"
HOPS_WHY = "too many hops"  # the reply is TOO_MANY_HOPS; this is the reason logged

# -- client/queue -------------------------------------------------------------------
# upas smtp's statuses (client.RETRY and client.PERMANENT)
RETRY = "Retry, Temporary Failure"
PERMANENT = "Permanent Failure"
# what became of one recipient of a delivery (client.RecipientResult.status)
DELIVERED, TEMPORARY, PERMANENT_FAILURE, ACCEPTED, NOT_SENT = (
    "delivered", "temporary", "permanent", "accepted", "not sent")
NO_AUTH_METHOD = "No supported AUTH method"
# as Postfix's smtp(8): a non-ASCII message the next server cannot take
SMTPUTF8_NOT_OFFERED = "5.6.7 SMTPUTF8 is required, but was not offered by host {host}"
# in place of a server's reply
REPLY_TOO_LONG = "(reply line too long)"
CONNECTION_CLOSED = "connection closed"
# a recipient (or sender) never sent: its "reply"
ILLEGAL_ADDRESS = "{kind} {way} {addr} failed: illegal address"
# upas smtp's failure report (stderr, and the recipients' reply in the bounce)
REPORT_CONNECT = "{date} connect to {addr} {mx} {phase}:"
REPORT_CONNECT_PARTIAL = "{date} connect to {addr}: {mx} {phase}:"
REPORT_RCPT_FAILED = "  mail to {rcpt} failed: {reply}"
REPORT_TIMEOUT = "smtp timeout: connection to {addr} timed out"
REPORT_LOCAL_ERROR = "smtp: local error: {err} ({addr})"
REPORT_DIAL = "smtp: {err} ({addr})"
# the queue's for a message past its lifetime
GAVE_UP = "4.4.7 gave up after {days} days: {why}"
NO_ANSWER = "no answer"


def syntax_error():
    return reject(500, SYNTAX, counts=False, reason="syntax")


def no_relay():
    return reject(550, NO_RELAY, reason="relay")
