"""upas smtp: deliver one message to one destination.

``client`` (``deliver()``, the library API), ``conversation`` (one SMTP
conversation), ``wire`` (replies and commands on one connection),
``clientresult`` (options, results, outcomes), ``mxdial`` (dial strings,
MX plans), ``convert`` (the outgoing form), ``factotum`` (passwords),
``thumbprint`` (pinning).

May import: ``mailroot`` (upas's date and stream forms), ``rules``
(DNS facts) and the shared modules.
"""
