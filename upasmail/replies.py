"""Every reply smtpd sends, in one table.

Texts are upas [9F] smtpd's, copied verbatim (spec upas-behaviour.md §1.21),
including their odd spacing and the few replies that carry no enhanced status
code.  Replies that upas does not have (limits and RFC 5321 sequence rules we
enforce where upas does not) are marked "ours" and listed in
docs/deviations.rst.
"""

from .decision import reject

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
NULL_MULTI_REPLY = "5.7.1 " + NULL_MULTI
BUSY = "4.3.2 We're busy right now, try later"
GO_AHEAD = "Input message; end with <CRLF>.<CRLF>"
SENT = "2.5.0 sent"
SPAM = "we believe this is spam."
DELAYED = "4.3.0 There will be a delay in delivery of this message."
LIAR = "5.7.0 Liar!"
YOU_LIE = "you lie.  authentication required."
TOO_MANY_ERRORS = "5.5.0 too many errors.  transaction failed."
DIALUP = "5.7.1 We don't accept mail from dial-up ports."
DENY_FROM = "5.7.1 We don't accept mail from {sender}."
DENY_CONTACT = "5.7.1 Contact postmaster@{dom} for more information."
NO_SUCH_DOMAIN = "5.7.1 Sender domain must exist: {sender}"
NO_SUCH_DOMAIN_MAIL = "5.1.8 Sender domain must exist: {sender}"
FILTERSTATE_ERROR = ("5.7.0 We have had an internal mailer error classifying your message.",
                     "5.7.0 Filterstate is {state}",
                     "5.7.0 Contact postmaster@{dom} for more information.")
MAILER_FAILED = "4.0.0 mail process terminated abnormally"
RSET_OK = "2.0.0 ok"
NOOP_OK = "2.0.0 Nothing to see here. Move along ..."
HELP_OK = "2.0.0 See http://www.ietf.org/rfc/rfc2821"
QUIT_OK = "2.0.0 Successful termination"
AUTH_REQUIRED = "5.7.0 Authentication required"
TLS_GO_AHEAD = "2.0.0 Go ahead make my day"
TLS_NOT_AVAILABLE = "4.7.5 TLS not available"

# ours (not in upas); see docs/deviations.rst
DOMAIN_TEMPFAIL = "4.4.3 Sender domain lookup failed; try again later: {sender}"
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
# the client's, as Postfix's smtp(8): a non-ASCII message the next server cannot take
SMTPUTF8_NOT_OFFERED = "5.6.7 SMTPUTF8 is required, but was not offered by host {host}"


def syntax_error():
    return reject(500, SYNTAX, counts=False, reason="syntax")


def no_relay():
    return reject(550, NO_RELAY, reason="relay")
