# twistd plugins for upasmail.  Only ServiceMaker lines belong here: options
# and wiring live in the upasmail package, so this file stays importable even
# when twistd scans plugins it never runs.  Never add __init__.py under
# twisted/ or twisted/plugins/: it would shadow Twisted's own package.
from twisted.application.service import ServiceMaker

upasSmtpd = ServiceMaker(
    "upas smtpd", "upasmail.cli.tap_smtpd", "Plan 9 upas smtpd: ESMTP server", "upas-smtpd"
)
upasSmtp = ServiceMaker(
    "upas smtp", "upasmail.cli.tap_smtp", "Plan 9 upas smtp: send one message (use -n)", "upas-smtp"
)
